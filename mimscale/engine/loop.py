"""The training loop: build, resume, then step / log / checkpoint until max_steps.

``train(cfg)`` runs for `mimscale train` (one process) and under `deepspeed --module mimscale.train` (many). A
``Trainer`` (torchtitan's Trainer is the model) owns the run's state: the method and its DeepSpeed engine, the
counters a checkpoint records, the step-line window and the stop request; the functions around it stay small.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mimscale.config import Config, save_config
from mimscale.engine import checkpoint as ckpt
from mimscale.engine import distributed, faults, metrics, preempt
from mimscale.engine.ckpt_meta import method_record, objective_change
from mimscale.engine.deepspeed import DTYPES, gathered_own_parameters, initialize_engine, write_deepspeed_config
from mimscale.engine.metrics import MetricAccumulator, StepLogger, memory_gib, peak_tflops, progress_wanted
from mimscale.engine.optim import restore_adamw_implementation
from mimscale.engine.runlock import lock_output_dir
from mimscale.engine.safe_load import refuse_forced_unsafe_loading
from mimscale.engine.slurm import requeue_stopped_startup, write_requeue_marker
from mimscale.methods.base import COMPILE_ZERO3_NOTE, MIMMethod
from mimscale.models.backbone import as_pair
from mimscale.models.students import frozen_table_difference
from mimscale.pipeline.device_decode import DeviceDecodedStream, DeviceDecoder
from mimscale.pipeline.transforms import normalise_on_device

EXIT_REQUEUE = preempt.EXIT_REQUEUE  # checkpointed after SIGTERM/SIGUSR1; the job script requeues on this code
HISTORY_LENGTH = 1000  # (step, loss) pairs of the most recent log steps kept in memory
# An in-run evaluation: given the student backbone (gathered under ZeRO-3), returns scalars to log.
Evaluator = Callable[[torch.nn.Module], dict[str, float]]


class TrainingError(RuntimeError):
    """A run cannot go on (e.g. the loss stayed non-finite); the message says what to change."""


@dataclass
class Window:
    """What the step line averages over since the last log step."""

    images: int = 0
    data_wait: float = 0.0
    id_sum: int = 0  # sum of the sample ids this rank trained on (data-order fingerprint)
    start: float = field(default_factory=time.perf_counter)


def train(
    cfg: Config,
    resume: str = "auto",
    evaluators: Sequence[Evaluator] = (),
    *,
    trusted: bool = False,
    allow_objective_change: bool = False,
) -> dict:
    """Run (or resume) training; returns a summary {step, last_loss, output_dir, exit_code}.

    ``evaluators`` run every ``eval.knn_every`` steps and at the end (the entry point passes the kNN monitor).
    ``trusted`` (the command's safe_load.trust_decision) loads the resumed checkpoint's pickles without the allowlist.
    ``allow_objective_change`` (``--allow-objective-change``) resumes a checkpoint of another objective, warned.
    """
    preempt.install_stop_handlers()  # mimscale.cli installed them before its imports; a direct caller gets them here
    preempt.set_stop_timeout(cfg.run.stop_timeout_s)
    try:
        return _start_and_train(cfg, resume, evaluators, trusted, allow_objective_change)
    finally:
        preempt.forget_stop()  # in-process callers may train again: this run's signal is spent


def _start_and_train(
    cfg: Config, resume: str, evaluators: Sequence[Evaluator], trusted: bool, allow_objective_change: bool
) -> dict:
    """train() from the output-folder check on: a stop before the process group exists exits with nothing saved."""
    check_output_dir(Path(cfg.run.output_dir))
    metrics.require_loggers(cfg.train.loggers)  # every rank, before any rank waits for the others
    device_kind = distributed.resolve_device_kind(cfg.run.device)
    faults.maybe_slow_start(int(os.environ.get("RANK", "0")))
    early = preempt.exit_if_stopped_during_startup("before joining the other ranks")
    if early is not None:
        requeue_stopped_startup(cfg.run.output_dir, early, EXIT_REQUEUE)
        return {"step": 0, "last_loss": float("nan"), "output_dir": cfg.run.output_dir, "exit_code": early}
    info = distributed.init_distributed(device_kind, timeout_s=cfg.run.startup_timeout_s)
    run_lock = lock_output_dir(Path(cfg.run.output_dir), info.rank)  # one run per folder; dies with the process
    try:
        summary = _train(cfg, info, resume, evaluators, trusted, allow_objective_change)
    except RuntimeError as err:  # gloo and NCCL report collective timeouts as (subclasses of) RuntimeError
        if not _is_collective_failure(err):
            raise
        raise TrainingError(
            f"rank {info.rank}: a collective failed or timed out (run.collective_timeout_s="
            f"{cfg.run.collective_timeout_s:g}): {distributed.describe_stall(info.world_size)}. Check the stalled "
            f"rank's log and node. Original error: {str(err).splitlines()[0]}"
        ) from err
    distributed.shutdown()
    run_lock.release()
    return summary


def _is_collective_failure(err: RuntimeError) -> bool:
    text = str(err)
    return isinstance(err, torch.distributed.DistError) or "Timed out" in text or "Connection closed by peer" in text


def check_output_dir(output_dir: Path) -> None:
    """Fail before any work if run.output_dir cannot be written (every rank checks; the error is the same)."""
    probe = output_dir / f".write_probe_{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"run.output_dir={output_dir} is not writable ({err}); choose a writable folder") from err


def build_engine(cfg: Config, info: distributed.DistInfo, load_universal: bool = False) -> tuple:
    """(method, DeepSpeed engine, lr scheduler, DeepSpeed JSON): identical initial weights on every rank."""
    from mimscale.methods import build_method

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    method = build_method(cfg)
    if cfg.deepspeed.activation_checkpointing:
        method.set_grad_checkpointing(True)
    teacher_dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    for frozen in method.frozen_modules():
        frozen.to(device=info.device, dtype=teacher_dtype)
    _cast_float_buffers(method, DTYPES[cfg.deepspeed.precision])
    configure_matmul_precision(info.device, cfg.deepspeed.precision)
    if cfg.model.compile:
        compiled = method.compile_for_training(zero_stage=cfg.deepspeed.zero_stage)
        if info.is_main:
            print(f"model.compile: compiled {compiled} modules{COMPILE_ZERO3_NOTE * (cfg.deepspeed.zero_stage == 3)}")
    engine, scheduler, ds_config = initialize_engine(
        method, cfg, info.world_size, info.device, load_universal=load_universal
    )
    torch.manual_seed(cfg.run.seed + 1 + info.rank)  # per-rank randomness (drop path) from here on
    return method, engine, scheduler, ds_config


def configure_matmul_precision(device: torch.device, precision: str) -> None:
    """fp32 runs on a GPU use TF32 tensor cores for matmuls (cuDNN convolutions already do by default);
    the MFU peak for fp32 is the TF32 one accordingly. bf16/fp16 runs and CPUs are unaffected."""
    if device.type == "cuda" and precision == "fp32":
        torch.set_float32_matmul_precision("high")


def _cast_float_buffers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed casts parameters to bf16/fp16 but, under ZeRO-3, not buffers (SwinV2's coordinate tables)."""
    for submodule in module.modules():
        for name, buffer in submodule.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(submodule, name, buffer.to(dtype))


def _flops_per_image(cfg: Config, info: distributed.DistInfo) -> float | None:
    """For the MFU column, counted once on rank 0 from meta-device models; never fatal."""
    if not info.is_main:
        return None
    try:
        from mimscale.engine.flops import flops_per_image

        return flops_per_image(cfg)
    except Exception as err:  # noqa: BLE001 - a planner gap must not stop training
        print(f"mimscale: MFU unavailable (could not count FLOPs: {err})", flush=True)
        return None


def _train(
    cfg: Config,
    info: distributed.DistInfo,
    resume: str,
    evaluators: Sequence[Evaluator],
    trusted: bool,
    allow_objective_change: bool,
) -> dict:
    from mimscale.pipeline.masking import mask_generator_for
    from mimscale.pipeline.stream import build_train_loader

    output_dir = Path(cfg.run.output_dir)
    allow = allow_objective_change
    plan = plan_resume(cfg, output_dir / "checkpoints", resume, info, trusted=trusted, allow_objective_change=allow)
    trainer = Trainer(cfg, info, load_universal=bool(plan and plan.universal), evaluators=evaluators)
    if info.is_main:
        save_config(cfg, output_dir / "config.yaml")
        write_deepspeed_config(trainer.ds_config, output_dir)
    data_state = trainer.resume(plan) if plan else None
    stream = build_train_loader(
        cfg,
        rank=info.rank,
        world_size=info.world_size,
        mask_generator=mask_generator_for(cfg, trainer.method),
        state=data_state,
        normalise_on_device=info.device.type == "cuda",  # 4x fewer bytes to copy; on CPU workers normalise
    )
    if cfg.data.decode == "device":  # workers send JPEG bytes; decoded, cropped, resized here on the device
        stream = DeviceDecodedStream(stream, DeviceDecoder(info.device, cfg.data.image_size))
    logger = StepLogger(
        output_dir,
        enabled=info.is_main,
        max_steps=cfg.train.max_steps,
        start_step=trainer.step,
        progress=progress_wanted(cfg.train.progress_bar),
        loggers=cfg.train.loggers,
        run_config=cfg.to_dict(),
        wandb_run_id=metrics.saved_wandb_run_id(plan.meta if plan else None) if info.is_main else None,
    )
    trainer.install_stop_handlers()
    try:
        exit_code = trainer.fit(stream, logger)
    finally:
        logger.close()
    last_loss = trainer.history[-1][1] if trainer.history else float("nan")
    return {"step": trainer.step, "last_loss": last_loss, "output_dir": str(output_dir), "exit_code": exit_code}


@dataclass(frozen=True)
class ResumePlan:
    tag_dir: Path
    meta: dict
    universal: bool  # load DeepSpeed's universal copy: the world size or ZeRO stage changed
    trusted: bool = False  # the command's trust decision: load its pickles without the allowlist


def plan_resume(
    cfg: Config,
    root: Path,
    resume: str,
    info: distributed.DistInfo,
    *,
    trusted: bool = False,
    allow_objective_change: bool = False,
) -> ResumePlan | None:
    """Decide what to resume from ('auto', 'none' or a path) before the engine exists; convert if needed."""
    log = print if info.is_main else (lambda *_: None)
    if resume == "none":
        if ckpt.list_checkpoints(root):
            raise ValueError(
                f"{root} already holds checkpoints and --resume none was given; use --resume auto to continue "
                "that run, or set run.output_dir to a new folder for a fresh one"
            )
        return None
    where = (root, log, info.rank, info.world_size)  # verifying files is collective: the ranks share the hashing
    tag_dir = (
        ckpt.find_resume_checkpoint(*where, trusted=trusted)
        if resume == "auto"
        else ckpt.resolve_checkpoint(Path(resume), *where[1:], trusted=trusted)
    )
    if tag_dir is None:
        return None
    if not trusted:
        refuse_forced_unsafe_loading()  # say so now, not after the engine is built
    meta = ckpt.read_meta(tag_dir)
    other_objective = objective_change(meta, cfg.method.name, str(tag_dir))
    if other_objective is not None and not allow_objective_change:
        raise ckpt.CheckpointMismatchError(other_objective)
    if other_objective is not None:
        log(f"warning: --allow-objective-change: going on although {other_objective.partition('. ')[0]}")
    changed = meta["world_size"] != info.world_size or meta["zero_stage"] != cfg.deepspeed.zero_stage
    universal = changed and max(meta["zero_stage"], cfg.deepspeed.zero_stage) > 0
    if universal:
        log(
            f"checkpoint {tag_dir.name} was written by {meta['world_size']} ranks at ZeRO-{meta['zero_stage']}; "
            f"this run has {info.world_size} ranks at ZeRO-{cfg.deepspeed.zero_stage}: loading it as a universal "
            "checkpoint"
        )
        _convert_on_rank0(tag_dir, info, trusted)
    return ResumePlan(tag_dir=tag_dir, meta=meta, universal=universal, trusted=trusted)


def _convert_on_rank0(tag_dir: Path, info: distributed.DistInfo, trusted: bool) -> None:
    error = ""
    if info.is_main:
        try:
            ckpt.convert_to_universal(tag_dir, trusted=trusted)
        except RuntimeError as err:
            error = str(err)
    if distributed.all_reduce_max(1.0 if error else 0.0)[0] > 0:
        raise RuntimeError(error or f"rank 0 could not convert {tag_dir} to a universal checkpoint (see its log)")


def frozen_table_in_checkpoint(tag_dir: Path, grid: tuple[int, int], trusted: bool) -> str | None:
    """What a checkpoint's own sincos_frozen table is, from its files (models/students.frozen_table_difference)."""
    _, state = ckpt.load_fp32_state(tag_dir, trusted=trusted)
    table = state.get(ckpt.FROZEN_TABLE)
    return "missing" if table is None else frozen_table_difference(table, grid)


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype, data_cfg) -> dict:
    """Move a batch in one copy per tensor; uint8 images (GPU runs) are normalised on the device.

    ``masked_count`` (masked tokens per sample, when every sample has the same count) is read off the host mask
    here, so the visible-only students never need a device sync to learn it.
    """
    moved = {"masked_count": equal_masked_count(batch["mask"])} if "mask" in batch else {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            if name == "image" and value.dtype == torch.uint8:
                value = normalise_on_device(value.to(device, non_blocking=True), data_cfg.mean, data_cfg.std, dtype)
            else:
                value = value.to(device, dtype=dtype if value.is_floating_point() else None, non_blocking=True)
        moved[name] = value
    return moved


def equal_masked_count(host_mask: torch.Tensor) -> int | None:
    """Masked tokens per sample of a host (CPU) mask batch if every sample has the same count, else None."""
    if host_mask.device.type != "cpu" or host_mask.ndim < 2 or not len(host_mask):
        return None
    counts = host_mask.numpy().reshape(len(host_mask), -1).sum(1, dtype=np.int64)  # numpy: host memory only
    return int(counts[0]) if (counts == counts[0]).all() else None


def agree_bad_loss_and_stop(loss: torch.Tensor, stop_signal: int) -> tuple[bool, int]:
    """Has any rank a non-finite loss, and the largest stop signal of any rank: one all-reduce of a device tensor
    and one host read per micro-batch (the NaN guard's only sync; the flag is made on the device, not copied)."""
    import torch.distributed as dist

    flags = torch.stack(
        [(~torch.isfinite(loss.detach())).to(torch.float32), torch.full((), float(stop_signal), device=loss.device)]
    )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop = flags.tolist()
    return bad > 0, int(stop)


def _grad_norm_if_untracked(engine) -> float | None:
    """DeepSpeed reports no grad norm for plain fp32 without ZeRO; compute it then (only on log steps)."""
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [param.grad for param in engine.module.parameters() if param.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


class Trainer:
    """One rank's training run: the method in its DeepSpeed engine and everything the loop carries between steps.

    ``step``, ``samples_seen`` and ``skipped_micro_batches`` are what a checkpoint records besides the engine;
    ``window`` is what the next step line averages; ``stop_signal`` is set by SIGTERM/SIGUSR1 on this rank and
    ``stop_agreed`` is the largest any rank received, once the ranks agreed on it.
    """

    def __init__(
        self,
        cfg: Config,
        info: distributed.DistInfo,
        *,
        load_universal: bool = False,
        evaluators: Sequence[Evaluator] = (),
    ):
        self.cfg, self.info = cfg, info
        self.method: MIMMethod
        self.method, self.engine, self.scheduler, self.ds_config = build_engine(cfg, info, load_universal)
        self.dtype = DTYPES[cfg.deepspeed.precision]
        self.root = Path(cfg.run.output_dir) / "checkpoints"
        self.evaluators = list(evaluators)
        # The engine's forward as is; wrapped only when the failure tests set MIMSCALE_INJECT_FAULT.
        self.forward = faults.with_step_faults(self.engine, info.rank, lambda: self.step + 1)
        self.step = 0
        self.samples_seen = 0
        self.skipped_micro_batches = 0
        self.consecutive_bad = 0
        self.stop_signal = 0
        self.stop_agreed = 0
        self.resumed_from: Path | None = None  # never pruned while this run lives: the fallback if a save fails
        self.window = Window()
        self.accumulator = MetricAccumulator()
        self.grad_norm: float | None = None
        self.lr = float("nan")  # the learning rate of the last optimizer step, as the scheduler set it
        self.corrupt_samples = 0  # corrupt samples this rank's stream replaced so far
        self.history: deque[tuple[int, float]] = deque(maxlen=HISTORY_LENGTH)
        self.flops_per_image = _flops_per_image(cfg, info)  # for TFLOP/s and MFU
        self.peak_tflops = peak_tflops(info.device, cfg.deepspeed.precision, cfg.train.peak_tflops)

    # ------------------------------------------------------------------------------------------ resume, signals
    def resume(self, plan: ResumePlan) -> dict:
        """Load the planned checkpoint into the engine and the counters; returns the saved data position."""
        meta = ckpt.load_checkpoint(
            self.engine,
            plan.tag_dir,
            self.info.rank,
            universal=plan.universal,
            config=self.cfg.to_dict(),
            trusted=plan.trusted,
        )
        if self.cfg.model.pos_embed_init == "sincos_frozen":
            self.refuse_another_frozen_table(plan)
        if self.engine.optimizer is not None:
            restore_adamw_implementation(self.engine.optimizer, fused=self.info.device.type == "cuda")
        self.resumed_from = plan.tag_dir
        self.step = meta["step"]
        self.samples_seen = meta["samples_seen"]
        self.skipped_micro_batches = meta.get("skipped_micro_batches", 0)
        if self.info.is_main:
            print(f"resumed from {plan.tag_dir} at step {self.step} ({self.samples_seen} samples seen)", flush=True)
        return meta["data_state"]

    def refuse_another_frozen_table(self, plan: ResumePlan) -> None:
        """A sincos_frozen position table is never trained, so the checkpoint's copy must be the table this version
        builds: one written before the MAE preset holds timm's channel order, which its encoder learned to read.
        Going on with it gives a table no fresh run or export has; rebuilding it feeds the encoder permuted
        positions: refused, by name. The loaded table is checked; a universal load leaves frozen parameters out
        (the model keeps its own), so there rank 0 reads the checkpoint's copy from its files."""
        backbone = self.engine.module.student.backbone
        grid = as_pair(backbone.patch_embed.grid_size)
        if not plan.universal:
            with gathered_own_parameters(backbone):  # ZeRO-3: the whole table on every rank
                found = frozen_table_difference(backbone.pos_embed, grid)
        else:
            found = frozen_table_in_checkpoint(plan.tag_dir, grid, plan.trusted) if self.info.is_main else None
            if distributed.all_reduce_max(1.0 if found else 0.0)[0] > 0:
                found = found or "not the table this version builds (rank 0 names it)"
        if found is not None:
            raise ckpt.CheckpointMismatchError(
                f"checkpoint {plan.tag_dir}: its frozen position table (model.pos_embed_init=sincos_frozen) is "
                f"{found}, not the MAE channel order this mimscale version builds; its encoder was trained on that "
                "table and cannot go on with another. Finish that run with the mimscale version that wrote it, or "
                "start a new run (set run.output_dir to a new folder)"
            )

    def install_stop_handlers(self) -> None:
        self.stop_signal = preempt.stop_requested()
        preempt.install_stop_handlers(lambda signum: setattr(self, "stop_signal", signum))

    # ------------------------------------------------------------------------------------------ one step
    def _next_batch(self, iterator: Iterator[dict]) -> dict:
        start = time.perf_counter()
        with preempt.signals_kept_from_children():  # workers forked in here must not die on the scheduler's signal
            batch = next(iterator)
        self.window.data_wait += time.perf_counter() - start
        return batch

    def train_step(self, iterator: Iterator[dict]) -> None:
        """One optimizer step: grad_accum_steps good micro-batches (non-finite ones are skipped on every rank)."""
        cfg, info = self.cfg, self.info
        done = 0
        while done < cfg.train.grad_accum_steps:
            host_batch = self._next_batch(iterator)
            if "sample_id" in host_batch:  # numpy: a host read, never a device sync
                self.window.id_sum += int(host_batch["sample_id"].numpy().sum())
            batch = _to_device(host_batch, info.device, self.dtype, cfg.data)
            outputs = self.forward(batch)
            distributed.report_progress(info.rank, self.step + 1, done)
            loss = outputs["loss"]
            if cfg.train.nan_guard:  # one tiny collective per micro-batch: agree on "bad loss" and "stop signal"
                bad, self.stop_agreed = agree_bad_loss_and_stop(loss, self.stop_signal)
                if bad:
                    self._skip_bad_micro_batch()
                    continue
            self.consecutive_bad = 0
            self.engine.backward(loss)
            if done == cfg.train.grad_accum_steps - 1:
                if (self.step + 1) % cfg.train.log_every == 0:
                    self.grad_norm = _grad_norm_if_untracked(self.engine)
                self.lr = float(self.scheduler.get_last_lr()[0])  # what engine.step() applies now
            self.engine.step()
            self.accumulator.add(outputs)
            done += 1
        self.step += 1
        images = cfg.data.batch_size * cfg.train.grad_accum_steps * info.world_size
        self.samples_seen += images
        self.window.images += images

    def _skip_bad_micro_batch(self) -> None:
        self.skipped_micro_batches += 1
        self.consecutive_bad += 1
        if self.info.is_main:
            print(f"step {self.step + 1}: non-finite loss on some rank; micro-batch skipped on all ranks", flush=True)
        if self.consecutive_bad >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"the loss was NaN/Inf for {self.consecutive_bad} consecutive micro-batches at step "
                f"{self.step + 1}; resume from the last checkpoint with a lower optim.lr, deepspeed.precision=bf16 "
                "instead of fp16, or a smaller optim.grad_clip (train.max_bad_steps sets this limit)"
            )

    # ------------------------------------------------------------------------------------------ log, eval, save
    def log(self, logger: StepLogger) -> None:
        """Reduce the window's metrics over the ranks and write the step line and TensorBoard scalars."""
        elapsed = max(1e-9, time.perf_counter() - self.window.start)
        means = distributed.all_reduce_mean(self.accumulator.pop_means())
        id_sum = distributed.all_reduce_sum(float(self.window.id_sum))
        corrupt = distributed.all_reduce_sum(float(self.corrupt_samples))
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = self.grad_norm if grad_norm is None else grad_norm
        per_rank = self.window.images / elapsed / self.info.world_size
        scalars = {f"train/{name}": value for name, value in means.items()}
        scalars.update(
            {
                "train/lr": self.lr,
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/skipped_steps": float(self.skipped_micro_batches + getattr(self.engine, "skipped_steps", 0)),
                "perf/images_per_sec": self.window.images / elapsed,
                "perf/images_per_sec_per_rank": per_rank,
                "perf/data_wait_frac": self.window.data_wait / elapsed,
                "perf/memory_gib": memory_gib(self.info.device),
                "train/samples_seen": float(self.samples_seen),
                "data/sample_id_sum": id_sum,
                "data/corrupt_samples": corrupt,
            }
        )
        if self.flops_per_image:
            tflops = per_rank * self.flops_per_image / 1e12
            scalars["perf/tflops_per_device"] = tflops
            if self.peak_tflops:
                # With activation checkpointing the FLOPs count the recompute: hardware-FLOPs utilisation, not MFU.
                utilisation = "perf/hfu" if self.cfg.deepspeed.activation_checkpointing else "perf/mfu"
                scalars[utilisation] = tflops / self.peak_tflops
        self.history.append((self.step, scalars.get("train/loss", math.nan)))
        self.window = Window()
        logger.log(self.step, self.cfg.train.max_steps, scalars)

    def evaluate(self, logger: StepLogger) -> None:
        """Run the in-run evaluators on the student backbone (every rank: ZeRO-3 gathers its parameters)."""
        start = time.perf_counter()
        scalars: dict[str, float] = {}
        with gathered_own_parameters(self.engine.module.student.backbone) as backbone:  # forward_features skips hooks
            for evaluator in self.evaluators:
                scalars.update(evaluator(backbone))
        if self.info.is_main:
            logger.log_scalars(self.step, scalars)
            values = " | ".join(f"{name.split('/')[-1]} {100 * value:.2f}%" for name, value in scalars.items())
            logger.text(f"eval step {self.step} | {values} ({time.perf_counter() - start:.1f}s)")

    def checkpoint_meta(self, stream) -> dict:
        """What mimscale.json records besides DeepSpeed's shards."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped_micro_batches": self.skipped_micro_batches,
            "world_size": self.info.world_size,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "precision": self.cfg.deepspeed.precision,
            "data_state": stream.state_dict(),
            "config": self.cfg.to_dict(),
            "method": method_record(self.cfg.method.name),
            "time": time.time(),
        }

    def save(self, stream, logger: StepLogger) -> None:
        cfg = self.cfg.checkpoint
        meta = {**self.checkpoint_meta(stream), **logger.checkpoint_meta()}  # rank 0's logger: the W&B run id
        tag_dir = ckpt.save_checkpoint(self.engine, self.root, self.step, meta, self.info.rank)
        if self.info.is_main:
            removed = ckpt.prune_checkpoints(
                self.root, keep_last=cfg.keep_last, keep_every=cfg.keep_every, protect=[tag_dir, self.resumed_from]
            )
            pruned = f" (pruned {', '.join(path.name for path in removed)})" if removed else ""
            logger.text(f"saved checkpoint {tag_dir}{pruned}")

    def _stopped(self, stop_signal: int, logger: StepLogger) -> int:
        """After the checkpoint of a stop: rank 0 asks the job script to requeue (not after Ctrl-C); the exit code."""
        exit_code = preempt.exit_code_for(stop_signal)
        if exit_code == EXIT_REQUEUE and self.info.is_main:  # the checkpoint is complete and no rank has exited
            write_requeue_marker(self.root / ckpt.tag_for_step(self.step))
        then = "requeue me" if exit_code == EXIT_REQUEUE else f"exiting {exit_code} (Ctrl-C)"
        logger.text(f"stopped by signal {int(stop_signal)} at step {self.step} after checkpointing; {then}")
        return exit_code

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self, stream, logger: StepLogger) -> int:
        """Step until max_steps (or stop_at_step, or a stop signal); returns the process exit code."""
        cfg = self.cfg
        if self.step >= cfg.train.max_steps:
            logger.text(
                f"nothing to do: the run is at step {self.step} and train.max_steps={cfg.train.max_steps}; "
                "raise train.max_steps to train further, or set run.output_dir to a new folder for a fresh run"
            )
            return 0
        iterator = iter(stream)
        try:
            return self._fit(stream, iterator, logger)
        finally:  # shut the DataLoader workers down now: left to exit-time cleanup they can hang the process
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _fit(self, stream, iterator, logger: StepLogger) -> int:
        cfg = self.cfg
        self.window = Window()
        first_step = self.step + 1
        while self.step < cfg.train.max_steps:
            self.train_step(iterator)
            if self.stop_signal:  # this rank reached a step boundary after the signal: it is not wedged
                preempt.acknowledge_stop()
            if self.step == first_step:  # start-up (workers spawned, first batch) is over on every rank
                distributed.set_collective_timeout(cfg.run.collective_timeout_s)
            logger.advance()
            at_end = self.step in (cfg.train.max_steps, cfg.train.stop_at_step)
            if self.step % cfg.train.log_every == 0 or at_end:
                self.corrupt_samples = getattr(stream, "corrupt_count", 0)
                self.log(logger)
            if not cfg.train.nan_guard and self.step % cfg.train.log_every == 0:  # else agreed every micro-batch
                self.stop_agreed = int(distributed.all_reduce_max(self.stop_signal)[0])
            if self.evaluators and cfg.eval.knn_every and (self.step % cfg.eval.knn_every == 0 or at_end):
                self.evaluate(logger)
            stop_signal = self.stop_agreed
            if self.step % cfg.checkpoint.every_steps == 0 or at_end or stop_signal:
                self.save(stream, logger)
            if stop_signal:
                return self._stopped(stop_signal, logger)
            if self.step == cfg.train.stop_at_step:
                break
        return 0
