"""The training loop: build, resume, then step / log / checkpoint until max_steps.

The same function runs for `mimscale train` (one process) and under `deepspeed --module mimscale.train` (many).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mimscale.config import Config, save_config
from mimscale.data.device_decode import DeviceDecodedStream, DeviceDecoder
from mimscale.data.transforms import normalise_on_device
from mimscale.engine import checkpoint as ckpt
from mimscale.engine import distributed, faults
from mimscale.engine.deepspeed import DTYPES, gathered_own_parameters, initialize_engine, write_deepspeed_config
from mimscale.engine.metrics import MetricAccumulator, StepLogger, memory_gib, peak_tflops, progress_wanted
from mimscale.engine.optim import restore_adamw_implementation, warmup_cosine
from mimscale.engine.slurm import write_requeue_marker
from mimscale.methods.base import COMPILE_ZERO3_NOTE

EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpointed after SIGTERM/SIGUSR1; the job script requeues on this code


class TrainingError(RuntimeError):
    """A run cannot go on (e.g. the loss stayed non-finite); the message says what to change."""


@dataclass
class RunState:
    """What the loop carries between steps, and what a checkpoint records besides the engine."""

    step: int = 0
    samples_seen: int = 0
    skipped_micro_batches: int = 0
    consecutive_bad: int = 0
    stop_signal: int = 0  # set by the signal handler on this rank
    stop_agreed: int = 0  # the largest signal any rank received, once the ranks have agreed on it
    window_images: int = 0
    window_data_wait: float = 0.0
    grad_norm: float | None = None
    flops_per_image: float | None = None  # from the planner, for TFLOP/s and MFU
    peak_tflops: float | None = None
    resumed_from: Path | None = None  # never pruned while this run lives: it is the fallback if a save fails
    corrupt_samples: int = 0  # corrupt samples this rank's stream replaced so far
    window_id_sum: int = 0  # sum of the sample ids this rank trained on since the last log (data-order fingerprint)
    history: list = field(default_factory=list)


def train(cfg: Config, resume: str = "auto") -> dict:
    """Run (or resume) training; returns a summary {step, last_loss, output_dir, exit_code}."""
    check_output_dir(Path(cfg.run.output_dir))
    device_kind = distributed.resolve_device_kind(cfg.run.device)
    faults.maybe_slow_start(int(os.environ.get("RANK", "0")))
    info = distributed.init_distributed(device_kind, timeout_s=cfg.run.startup_timeout_s)
    try:
        summary = _train(cfg, info, resume)
    except RuntimeError as err:  # gloo and NCCL report collective timeouts as (subclasses of) RuntimeError
        if not _is_collective_failure(err):
            raise
        raise TrainingError(
            f"rank {info.rank}: a collective failed or timed out (run.collective_timeout_s="
            f"{cfg.run.collective_timeout_s:g}): {distributed.describe_stall(info.world_size)}. Check the stalled "
            f"rank's log and node. Original error: {str(err).splitlines()[0]}"
        ) from err
    distributed.shutdown()
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


def _build(cfg: Config, info: distributed.DistInfo, load_universal: bool):
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


def _flops_per_image(cfg: Config, info) -> float | None:
    """For the MFU column, counted once on rank 0 from meta-device models; never fatal."""
    if not info.is_main:
        return None
    try:
        from mimscale.engine.flops import flops_per_image

        return flops_per_image(cfg)
    except Exception as err:  # noqa: BLE001 - a planner gap must not stop training
        print(f"mimscale: MFU unavailable (could not count FLOPs: {err})", flush=True)
        return None


def _train(cfg: Config, info: distributed.DistInfo, resume: str) -> dict:
    from mimscale.data.masking import mask_generator_for
    from mimscale.data.stream import build_train_loader

    output_dir = Path(cfg.run.output_dir)
    root = output_dir / "checkpoints"
    plan = plan_resume(cfg, root, resume, info)
    method, engine, _, ds_config = _build(cfg, info, load_universal=bool(plan and plan.universal))
    if info.is_main:
        save_config(cfg, output_dir / "config.yaml")
        write_deepspeed_config(ds_config, output_dir)
    state = RunState(
        flops_per_image=_flops_per_image(cfg, info),
        peak_tflops=peak_tflops(info.device, cfg.deepspeed.precision, cfg.train.peak_tflops),
    )
    data_state = load_resume_plan(engine, plan, info, state) if plan else None
    mask_generator = mask_generator_for(cfg, method)
    stream = build_train_loader(
        cfg,
        rank=info.rank,
        world_size=info.world_size,
        mask_generator=mask_generator,
        state=data_state,
        normalise_on_device=info.device.type == "cuda",  # 4x fewer bytes to copy; on CPU workers normalise
    )
    if cfg.data.decode == "device":  # workers send JPEG bytes; decoded, cropped, resized here on the device
        stream = DeviceDecodedStream(stream, DeviceDecoder(info.device, cfg.data.image_size))
    logger = StepLogger(
        output_dir,
        enabled=info.is_main,
        max_steps=cfg.train.max_steps,
        start_step=state.step,
        progress=progress_wanted(cfg.train.progress_bar),
    )
    _install_stop_handlers(state)
    try:
        exit_code = run_loop(engine, stream, cfg, info, state, logger, root)
    finally:
        logger.close()
    last_loss = state.history[-1][1] if state.history else float("nan")
    return {"step": state.step, "last_loss": last_loss, "output_dir": str(output_dir), "exit_code": exit_code}


@dataclass(frozen=True)
class ResumePlan:
    tag_dir: Path
    meta: dict
    universal: bool  # load DeepSpeed's universal copy: the world size or ZeRO stage changed


def plan_resume(cfg: Config, root: Path, resume: str, info) -> ResumePlan | None:
    """Decide what to resume from ('auto', 'none' or a path) before the engine exists; convert if needed."""
    log = print if info.is_main else (lambda *_: None)
    if resume == "none":
        if ckpt.list_checkpoints(root):
            raise ValueError(
                f"{root} already holds checkpoints and --resume none was given; use --resume auto to continue "
                "that run, or set run.output_dir to a new folder for a fresh one"
            )
        return None
    tag_dir = (
        ckpt.find_resume_checkpoint(root, log=log) if resume == "auto" else ckpt.resolve_checkpoint(Path(resume), log)
    )
    if tag_dir is None:
        return None
    meta = ckpt.read_meta(tag_dir)
    changed = meta["world_size"] != info.world_size or meta["zero_stage"] != cfg.deepspeed.zero_stage
    universal = changed and max(meta["zero_stage"], cfg.deepspeed.zero_stage) > 0
    if universal:
        log(
            f"checkpoint {tag_dir.name} was written by {meta['world_size']} ranks at ZeRO-{meta['zero_stage']}; "
            f"this run has {info.world_size} ranks at ZeRO-{cfg.deepspeed.zero_stage}: loading it as a universal "
            "checkpoint"
        )
        _convert_on_rank0(tag_dir, info)
    return ResumePlan(tag_dir=tag_dir, meta=meta, universal=universal)


def _convert_on_rank0(tag_dir: Path, info) -> None:
    error = ""
    if info.is_main:
        try:
            ckpt.convert_to_universal(tag_dir)
        except RuntimeError as err:
            error = str(err)
    if distributed.all_reduce_max(1.0 if error else 0.0)[0] > 0:
        raise RuntimeError(error or f"rank 0 could not convert {tag_dir} to a universal checkpoint (see its log)")


def load_resume_plan(engine, plan: ResumePlan, info, state: RunState) -> dict:
    """Load the planned checkpoint into the engine and the run state; returns the saved data position."""
    meta = ckpt.load_checkpoint(engine, plan.tag_dir, info.rank, universal=plan.universal)
    if engine.optimizer is not None:
        restore_adamw_implementation(engine.optimizer, fused=info.device.type == "cuda")
    state.resumed_from = plan.tag_dir
    state.step = meta["step"]
    state.samples_seen = meta["samples_seen"]
    state.skipped_micro_batches = meta.get("skipped_micro_batches", 0)
    if info.is_main:
        print(f"resumed from {plan.tag_dir} at step {state.step} ({state.samples_seen} samples seen)", flush=True)
    return meta["data_state"]


def _install_stop_handlers(state: RunState) -> None:
    def request_stop(signum, _frame):
        state.stop_signal = signum

    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, request_stop)


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


def _next_batch(iterator, state: RunState):
    start = time.perf_counter()
    batch = next(iterator)
    state.window_data_wait += time.perf_counter() - start
    return batch


def train_one_step(engine, iterator, cfg: Config, info, state: RunState, accumulator: MetricAccumulator) -> None:
    """One optimizer step: grad_accum_steps good micro-batches (non-finite ones are skipped on every rank)."""
    dtype = DTYPES[cfg.deepspeed.precision]
    done = 0
    while done < cfg.train.grad_accum_steps:
        host_batch = _next_batch(iterator, state)
        if "sample_id" in host_batch:  # numpy: a host read, never a device sync
            state.window_id_sum += int(host_batch["sample_id"].numpy().sum())
        batch = _to_device(host_batch, info.device, dtype, cfg.data)
        faults.maybe_hang(info.rank, state.step + 1)
        outputs = engine(batch)
        distributed.report_progress(info.rank, state.step + 1, done)
        loss = faults.maybe_corrupt_loss(outputs["loss"], info.rank, state.step + 1)
        if cfg.train.nan_guard:  # one tiny collective per micro-batch: agree on "bad loss" and "stop signal"
            bad, state.stop_agreed = agree_bad_loss_and_stop(loss, state.stop_signal)
            if bad:
                _skip_bad_micro_batch(cfg, info, state)
                continue
        state.consecutive_bad = 0
        engine.backward(loss)
        if done == cfg.train.grad_accum_steps - 1 and (state.step + 1) % cfg.train.log_every == 0:
            state.grad_norm = _grad_norm_if_untracked(engine)
        engine.step()
        accumulator.add(outputs)
        done += 1
    state.step += 1
    images = cfg.data.batch_size * cfg.train.grad_accum_steps * info.world_size
    state.samples_seen += images
    state.window_images += images


def _grad_norm_if_untracked(engine) -> float | None:
    """DeepSpeed reports no grad norm for plain fp32 without ZeRO; compute it then (only on log steps)."""
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [param.grad for param in engine.module.parameters() if param.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _skip_bad_micro_batch(cfg: Config, info, state: RunState) -> None:
    state.skipped_micro_batches += 1
    state.consecutive_bad += 1
    if info.is_main:
        print(f"step {state.step + 1}: non-finite loss on some rank; micro-batch skipped on all ranks", flush=True)
    if state.consecutive_bad >= cfg.train.max_bad_steps:
        raise TrainingError(
            f"the loss was NaN/Inf for {state.consecutive_bad} consecutive micro-batches at step {state.step + 1}; "
            "resume from the last checkpoint with a lower optim.lr, deepspeed.precision=bf16 instead of fp16, "
            "or a smaller optim.grad_clip (train.max_bad_steps sets this limit)"
        )


def log_step(engine, cfg: Config, info, state: RunState, accumulator: MetricAccumulator, logger, window_start):
    elapsed = max(1e-9, time.perf_counter() - window_start)
    means = distributed.all_reduce_mean(accumulator.pop_means())
    id_sum = distributed.all_reduce_sum(float(state.window_id_sum))
    corrupt = distributed.all_reduce_sum(float(state.corrupt_samples))
    grad_norm = engine.get_global_grad_norm()
    grad_norm = state.grad_norm if grad_norm is None else grad_norm
    scalars = {f"train/{name}": value for name, value in means.items()}
    scalars.update(
        {
            "train/lr": warmup_cosine(
                state.step - 1,
                base_lr=cfg.optim.lr,
                min_lr=cfg.optim.min_lr,
                warmup_steps=cfg.optim.warmup_steps,
                max_steps=cfg.train.max_steps,
            ),
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/skipped_steps": float(state.skipped_micro_batches + getattr(engine, "skipped_steps", 0)),
            "perf/images_per_sec": state.window_images / elapsed,
            "perf/images_per_sec_per_rank": state.window_images / elapsed / info.world_size,
            "perf/data_wait_frac": state.window_data_wait / elapsed,
            "perf/memory_gib": memory_gib(info.device),
            "train/samples_seen": float(state.samples_seen),
            "data/sample_id_sum": id_sum,
            "data/corrupt_samples": corrupt,
        }
    )
    if state.flops_per_image:
        tflops = scalars["perf/images_per_sec_per_rank"] * state.flops_per_image / 1e12
        scalars["perf/tflops_per_device"] = tflops
        if state.peak_tflops:
            # With activation checkpointing the FLOPs count the recompute: hardware-FLOPs utilisation, not MFU.
            utilisation = "perf/hfu" if cfg.deepspeed.activation_checkpointing else "perf/mfu"
            scalars[utilisation] = tflops / state.peak_tflops
    state.history.append((state.step, scalars.get("train/loss", math.nan)))
    state.window_images, state.window_data_wait, state.window_id_sum = 0, 0.0, 0
    logger.log(state.step, cfg.train.max_steps, scalars)


def evaluate_knn(engine, cfg: Config, info, logger, step: int) -> None:
    """In-run kNN top-1 of the student backbone on small labelled shards (every rank runs it: ZeRO-3 gathers)."""
    from mimscale.data.stream import iter_eval_batches
    from mimscale.eval.probe import knn_top1

    dtype = DTYPES[cfg.deepspeed.precision]

    def batches(pattern: str, key: str):
        for images, labels in iter_eval_batches(
            pattern,
            image_size=cfg.data.image_size,
            batch_size=cfg.data.batch_size,
            mean=cfg.data.mean,
            std=cfg.data.std,
            key=key,
        ):
            yield images.to(info.device, dtype=dtype), labels

    start = time.perf_counter()
    with gathered_own_parameters(engine.module.student.backbone) as backbone:  # forward_features skips its hooks
        top1 = knn_top1(
            backbone,
            batches(cfg.eval.train_shards, "eval.train_shards"),
            batches(cfg.eval.val_shards, "eval.val_shards"),
            k=cfg.eval.k,
            temperature=cfg.eval.temperature,
            pool=cfg.eval.pool,
        )
    if info.is_main:
        logger.log_scalars(step, {"eval/knn_top1": top1})
        logger.text(f"eval step {step} | knn_top1 {100 * top1:.2f}% ({time.perf_counter() - start:.1f}s)")


def save(engine, stream, cfg: Config, info, state: RunState, root: Path, logger) -> None:
    meta = {
        "step": state.step,
        "samples_seen": state.samples_seen,
        "skipped_micro_batches": state.skipped_micro_batches,
        "world_size": info.world_size,
        "zero_stage": cfg.deepspeed.zero_stage,
        "precision": cfg.deepspeed.precision,
        "data_state": stream.state_dict(),
        "config": cfg.to_dict(),
        "time": time.time(),
    }
    tag_dir = ckpt.save_checkpoint(engine, root, state.step, meta, info.rank)
    if info.is_main:
        removed = ckpt.prune_checkpoints(
            root,
            keep_last=cfg.checkpoint.keep_last,
            keep_every=cfg.checkpoint.keep_every,
            protect=[tag_dir, state.resumed_from],
        )
        pruned = f" (pruned {', '.join(path.name for path in removed)})" if removed else ""
        logger.text(f"saved checkpoint {tag_dir}{pruned}")


def run_loop(engine, stream, cfg: Config, info, state: RunState, logger, root: Path) -> int:
    """Step until max_steps (or stop_at_step, or a stop signal); returns the process exit code."""
    if state.step >= cfg.train.max_steps:
        logger.text(
            f"nothing to do: the run is at step {state.step} and train.max_steps={cfg.train.max_steps}; "
            "raise train.max_steps to train further, or set run.output_dir to a new folder for a fresh run"
        )
        return 0
    iterator = iter(stream)
    accumulator = MetricAccumulator()
    window_start = time.perf_counter()
    first_step = state.step + 1
    while state.step < cfg.train.max_steps:
        train_one_step(engine, iterator, cfg, info, state, accumulator)
        if state.step == first_step:  # start-up (workers spawned, first batch) is over on every rank
            distributed.set_collective_timeout(cfg.run.collective_timeout_s)
        logger.advance()
        at_end = state.step == cfg.train.max_steps or state.step == cfg.train.stop_at_step
        if state.step % cfg.train.log_every == 0 or at_end:
            state.corrupt_samples = getattr(stream, "corrupt_count", 0)
            log_step(engine, cfg, info, state, accumulator, logger, window_start)
            window_start = time.perf_counter()
        if not cfg.train.nan_guard and state.step % cfg.train.log_every == 0:  # else agreed every micro-batch
            state.stop_agreed = int(distributed.all_reduce_max(state.stop_signal)[0])
        if cfg.eval.knn_every and (state.step % cfg.eval.knn_every == 0 or at_end):
            evaluate_knn(engine, cfg, info, logger, state.step)
        stop_signal = state.stop_agreed
        if state.step % cfg.checkpoint.every_steps == 0 or at_end or stop_signal:
            save(engine, stream, cfg, info, state, root, logger)
        if stop_signal:
            if info.is_main:  # the checkpoint is complete and no rank has exited yet: the job script may requeue
                write_requeue_marker(root / ckpt.tag_for_step(state.step))
            logger.text(f"stopped by signal {int(stop_signal)} at step {state.step} after checkpointing; requeue me")
            return EXIT_REQUEUE
        if state.step == cfg.train.stop_at_step:
            break
    return 0
