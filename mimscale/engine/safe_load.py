"""Unpickling checkpoint files without running their code: ``weights_only=True`` with the exact allowlist of
classes DeepSpeed's states hold, unless the user trusts the folder (``--trust-checkpoint`` or
MIMSCALE_TRUST_CHECKPOINTS=1). Used before DeepSpeed touches a checkpoint and while it loads one.

The decision is a value, ``trusted``, that each command computes once from its arguments (``trust_decision``) and
passes down to the loaders; every loader defaults to untrusted. No module state: two callers in one process (tests,
an in-process evaluator next to a resume) each get their own decision.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

TRUST_ENV = "MIMSCALE_TRUST_CHECKPOINTS"  # "1": load checkpoint pickles without the allowlist (the user wrote them)
FORCE_UNSAFE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch's switch to unpickle anything; clashes with ours


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would need arbitrary code to load; refused unless the user trusts the folder."""


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint`` on a sub-command that loads checkpoint files (train, export, ckpt, eval, analyze)."""
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load checkpoint pickles without the weights-only allowlist: only for checkpoints you wrote yourself "
        "(files from anyone else can run code when loaded that way)",
    )


def trust_decision(args: argparse.Namespace) -> bool:
    """A command's one trust decision: --trust-checkpoint on its command line, or MIMSCALE_TRUST_CHECKPOINTS=1 set
    by the user. Each command passes the result to the loaders as ``trusted``; child processes decide for
    themselves (the launcher's ranks parse the same flag and see the same environment)."""
    return bool(getattr(args, "trust_checkpoint", False)) or os.environ.get(TRUST_ENV, "") == "1"


class UnsafeLoadingEnvironmentError(ValueError):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set while mimscale must force weights-only loads."""


def refuse_forced_unsafe_loading() -> None:
    """Name TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD and what to do, instead of torch's "Only one of ..." mid-resume.

    torch reads it (1/y/yes/true) in every torch.load, and refuses it together with the
    TORCH_FORCE_WEIGHTS_ONLY_LOAD we set while DeepSpeed loads; left to torch, every resume fails with that."""
    if os.environ.get(FORCE_UNSAFE_ENV, "0").lower() in ("1", "y", "yes", "true"):
        raise UnsafeLoadingEnvironmentError(
            f"{FORCE_UNSAFE_ENV}={os.environ[FORCE_UNSAFE_ENV]} is set in the environment: it asks torch to unpickle "
            "checkpoint files without weights_only, which could run code planted in them, so mimscale will not "
            f"load checkpoints with it. Unset it (`unset {FORCE_UNSAFE_ENV}`); for checkpoints you wrote yourself, "
            f"pass --trust-checkpoint (or set {TRUST_ENV}=1) instead"
        )


def deepspeed_safe_globals() -> list:
    """The classes (besides tensors and containers) that DeepSpeed 0.19's checkpoint states hold; nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _legacy_rng_globals() -> list:
    """numpy arrays in rng_rank*.pt files written before they held only tensors."""
    from numpy._core.multiarray import _reconstruct

    return [
        np.ndarray,
        np.dtype,
        np.dtypes.UInt32DType,
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
    ]


def _allowlist_for(path: Path) -> list:
    return deepspeed_safe_globals() + (_legacy_rng_globals() if path.name.startswith("rng_rank") else [])


def _refusal(path: Path, err: Exception) -> str:
    lines = [
        line.strip() for line in str(err).splitlines() if any(w in line for w in ("Unsupported", "GLOBAL", "but got"))
    ]
    reason = lines[0] if lines else "not loadable with weights_only=True"
    return (
        f"refusing to load {path}: it is not a weights-only checkpoint file (it needs objects outside the allowlist "
        f"of checkpoint contents, so loading it could run arbitrary code: {reason}). If you wrote this checkpoint yourself, pass --trust-checkpoint (or set "
        f"{TRUST_ENV}=1); otherwise delete it"
    )


def load_file(path: Path, trusted: bool = False, mmap: bool = False):
    """torch.load a checkpoint file: a regular file, ``weights_only=True`` with DeepSpeed's allowlist unless
    ``trusted`` (the command's trust_decision).

    Raises UnsafeCheckpointError naming the file when it would need anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing or not a regular file")
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_allowlist_for(path)), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4": a foreign pickle
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not (mmap and "mmap can only be used" in str(err)):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(_refusal(path, err)) from err


@contextlib.contextmanager
def deepspeed_loads_weights_only(trusted: bool = False):
    """While DeepSpeed loads (it calls ``torch.load(weights_only=False)``), force weights_only with our allowlist.

    torch honours TORCH_FORCE_WEIGHTS_ONLY_LOAD over the caller's argument; files were checked beforehand, this
    is the second line of defence (a file swapped after the check is still refused).
    """
    if trusted:
        yield
        return
    refuse_forced_unsafe_loading()
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals() + _legacy_rng_globals()):
            yield
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(_refusal(Path("a checkpoint file"), err)) from err
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
