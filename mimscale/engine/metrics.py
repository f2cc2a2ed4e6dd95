"""Rank 0's step line, progress bar and scalars for TensorBoard and (optionally) Weights & Biases.

Metrics are accumulated as device tensors and read back to the host only at log steps, so logging costs no
per-step synchronisation. ``train.loggers`` picks the scalar sinks (LOGGERS); both get the very same scalars.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

LOGGERS = ("tensorboard", "wandb")  # the choices of train.loggers (config.py's rule reads this)
WANDB_RUN_ID_KEY = "wandb_run_id"  # in each checkpoint's mimscale.json: a resume continues the same W&B run
_WANDB_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def require_loggers(loggers: Sequence[str]) -> None:
    """Fail before training starts (on every rank alike) when a chosen logger's package is not installed."""
    if "wandb" not in loggers:
        return
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise ValueError(
            "train.loggers includes wandb but the wandb package is not installed; install the extra with "
            f"`pip install 'mimscale[wandb]'` (or `pip install wandb`), or drop wandb from train.loggers ({err})"
        ) from err


def saved_wandb_run_id(meta: dict | None) -> str | None:
    """The W&B run id a checkpoint recorded, if it is a well-formed one (mimscale.json is hostile input)."""
    run_id = (meta or {}).get(WANDB_RUN_ID_KEY)
    if run_id is None:
        return None
    if not (isinstance(run_id, str) and _WANDB_RUN_ID.fullmatch(run_id)):
        print(f"mimscale: ignoring the checkpoint's malformed {WANDB_RUN_ID_KEY} {run_id!r}; starting a new W&B run")
        return None
    return run_id


# Dense (not sparse) bf16/fp16 tensor-core peaks in TFLOP/s, by a fragment of torch.cuda.get_device_name(); the
# first matching fragment wins, so the specific variants come before the family name. fp32 runs use TF32 (half).
# Sources: NVIDIA data sheets (H100 SXM 989, PCIe 756, NVL 835; H200 SXM 989, NVL 835; H800 SXM as H100 SXM;
# GH200 989; B200 2250, B100 1750, GB200 2500 per GPU; A100/A800 312; L40S 362, L40 181, L4 121, A10 125).
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H800 PCIe": 756.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "GB200": 2500.0,
    "B200": 2250.0,
    "B100": 1750.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
}


def lookup_peak_tflops(device_name: str, precision: str) -> float | None:
    """A known GPU's dense peak for ``precision`` (TF32 for fp32), or None."""
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return peak if precision in ("bf16", "fp16") else peak / 2
    return None


def peak_tflops(device: torch.device, precision: str, configured: float) -> float | None:
    """The per-device peak used for MFU: train.peak_tflops if set, else a known GPU's dense peak."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    return lookup_peak_tflops(torch.cuda.get_device_name(device), precision)


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**30
    except ImportError:
        return float("nan")


class MetricAccumulator:
    """Sums detached metric tensors between log steps without syncing the device."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def pop_means(self) -> dict[str, float]:
        means = {name: float(total) / max(1, self.count) for name, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


class WandbRun:
    """The same scalars in a Weights & Biases run, with the resolved config as the run's config (rank 0 only).

    ``run_id`` (from the resumed checkpoint) continues that run; W&B keeps the first value it got for a step, so
    steps logged after the checkpoint and before a crash keep their old values. Files go to ``WANDB_DIR`` or, when
    that is unset, ``<output_dir>/wandb``; project and entity come from ``WANDB_PROJECT`` (default mimscale) and
    ``WANDB_ENTITY``; ``WANDB_MODE=offline`` writes the run locally for a later ``wandb sync``.
    """

    def __init__(self, output_dir: Path, config: dict, run_id: str | None):
        require_loggers(["wandb"])
        import wandb

        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "mimscale"),
                name=None if run_id else output_dir.resolve().name,
                id=run_id,
                resume="allow" if run_id else None,
                dir=None if os.environ.get("WANDB_DIR") else str(output_dir),
            )
        except wandb.errors.Error as err:  # no API key, no server: say what to do instead of W&B's traceback
            raise ValueError(
                f"could not start the W&B run ({err}); log in (`wandb login` or WANDB_API_KEY), set "
                "WANDB_MODE=offline to write the run locally for a later `wandb sync`, or drop wandb from train.loggers"
            ) from err
        self.run.config.update(config, allow_val_change=True)  # a resume may change keys (e.g. max_steps)

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


class StepLogger:
    """One fixed-format line per log step on rank 0, plus the scalar sinks (``loggers``) and a progress bar."""

    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool,
        max_steps: int,
        start_step: int,
        progress: bool,
        loggers: Sequence[str] = ("tensorboard",),
        run_config: dict | None = None,
        wandb_run_id: str | None = None,
    ):
        self.enabled = enabled
        self.writer = None
        self.wandb: WandbRun | None = None
        self.bar = None
        self.redirect: OutputRedirect | None = None
        self.clock = RunClock(start_step)
        if not enabled:
            if progress:  # rank 0 draws a bar on the terminal this rank shares: keep its warnings off it
                rank = os.environ.get("RANK", "x")
                self.redirect = OutputRedirect(output_dir / "logs" / f"rank{rank}.log")
            return
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1)
        if "wandb" in loggers:
            self.wandb = WandbRun(output_dir, run_config or {}, wandb_run_id)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
            self.redirect = OutputRedirect(None, write=lambda text: self.bar.write(text.rstrip("\n"), file=sys.stderr))

    def advance(self) -> None:
        self.clock.tick()
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, max_steps: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = format_step_line(step, max_steps, scalars)
        if self.bar is not None:
            self.bar.write(line)
        else:  # a log file: the bar's clock goes into the line
            print(f"{line} | {self.clock.describe(step, max_steps)}", flush=True)
        self.log_scalars(step, scalars)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """The same scalars to every sink train.loggers chose."""
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(step, scalars)

    def checkpoint_meta(self) -> dict:
        """What a checkpoint records for the loggers: the W&B run id, so that a resume continues that run."""
        return {WANDB_RUN_ID_KEY: self.wandb.run_id} if self.wandb is not None else {}

    def text(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.redirect is not None:
            self.redirect.restore()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()


def format_duration(seconds: float) -> str:
    """H:MM:SS (hours unbounded), or '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class RunClock:
    """Wall-clock time, elapsed time and ETA for log lines; the rate is measured from the first step on, so
    start-up (engine, workers, the first batch) does not inflate the ETA."""

    def __init__(self, start_step: int):
        self.start = time.monotonic()
        self.first_tick: tuple[int, float] | None = None
        self.steps = start_step

    def tick(self) -> None:
        self.steps += 1
        if self.first_tick is None:
            self.first_tick = (self.steps, time.monotonic())

    def describe(self, step: int, max_steps: int) -> str:
        now = time.monotonic()
        eta = float("nan")
        if self.first_tick is not None and step > self.first_tick[0]:
            per_step = (now - self.first_tick[1]) / (step - self.first_tick[0])
            eta = per_step * (max_steps - step)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        return f"{stamp} | elapsed {format_duration(now - self.start)} | eta {format_duration(eta)}"


class OutputRedirect:
    """Send Python warnings and log records that would hit the terminal to ``path`` (or ``write``); undo on restore.

    Ranks > 0 share rank 0's terminal; a warning they print would tear rank 0's progress bar, so while the bar is
    shown their warnings and log records (DeepSpeed's included) go to ``<output_dir>/logs/rank<r>.log``. On rank 0
    they are written above the bar instead of through it.
    """

    def __init__(self, path: Path | None, write=None):
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in restore()
            write = self.file.write
        self.write = write
        self.saved_showwarning = warnings.showwarning
        warnings.showwarning = self._show
        self.saved_streams: list[tuple[logging.StreamHandler, object]] = []
        self.added_handler: logging.Handler | None = None
        stream = _WriteStream(write)
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", []):
                if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr):
                    self.saved_streams.append((handler, handler.setStream(stream)))
        if not logging.getLogger().handlers:  # else logging.warning() would add a stderr handler (basicConfig)
            self.added_handler = logging.StreamHandler(stream)
            logging.getLogger().addHandler(self.added_handler)

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.write(warnings.formatwarning(message, category, filename, lineno, line))

    def restore(self) -> None:
        warnings.showwarning = self.saved_showwarning
        for handler, stream in self.saved_streams:
            handler.setStream(stream)
        if self.added_handler is not None:
            logging.getLogger().removeHandler(self.added_handler)
        if self.file is not None:
            self.file.close()


class _WriteStream:
    """The file-like object a logging.StreamHandler needs, around a write function."""

    def __init__(self, write):
        self.write = write

    def flush(self) -> None:
        pass


def format_step_line(step: int, max_steps: int, scalars: dict[str, float]) -> str:
    width = len(str(max_steps))
    parts = [
        f"step {step:>{width}}/{max_steps}",
        f"loss {scalars.get('train/loss', float('nan')):.4f}",
        f"lr {scalars.get('train/lr', float('nan')):.2e}",
        f"grad_norm {scalars.get('train/grad_norm', float('nan')):.3f}",
        f"img/s {scalars.get('perf/images_per_sec', float('nan')):.1f}",
    ]
    for kind in ("mfu", "hfu"):  # hfu: the FLOPs include activation-checkpointing recompute
        if f"perf/{kind}" in scalars:
            parts.append(f"{kind} {100 * scalars[f'perf/{kind}']:.1f}%")
    parts.append(f"mem {scalars.get('perf/memory_gib', float('nan')):.2f}GiB")
    if scalars.get("data/corrupt_samples"):
        parts.append(f"corrupt {int(scalars['data/corrupt_samples'])}")
    if scalars.get("train/skipped_steps"):
        parts.append(f"skipped {int(scalars['train/skipped_steps'])}")
    return " | ".join(parts)


def progress_wanted(requested: bool) -> bool:
    """A bar only on an interactive terminal: in log files it would be noise."""
    return requested and sys.stderr.isatty()
