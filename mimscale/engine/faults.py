"""Fault injection for the failure tests: make one rank produce a NaN loss or stall, at a chosen step.

Set MIMSCALE_INJECT_FAULT="<kind>:rank=<r>:step=<s>" with kind nan, hang, kill_in_save, stall_in_save or slow_start
(comma-separate several; slow_start delays joining the rendezvous by <s> seconds). Unset, the training step runs the
engine's forward unwrapped (``with_step_faults``). Real runs never set it; it exists so the tests can reproduce what
happens on clusters (a rank's loss going NaN, a rank stalling) with the real launcher.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

import torch

ENV = "MIMSCALE_INJECT_FAULT"


def _parse(spec: str) -> list[tuple[str, int, int]]:
    faults = []
    for item in filter(None, spec.split(",")):
        kind, *fields = item.split(":")
        values = dict(field.split("=", 1) for field in fields)
        faults.append((kind, int(values["rank"]), int(values["step"])))
    return faults


FAULTS = _parse(os.environ.get(ENV, ""))
_FIRED: set[tuple[str, int, int]] = set()


def maybe_corrupt_loss(loss: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """Return NaN instead of the loss if a nan fault is set for this rank and (1-based) step."""
    fault = ("nan", rank, step)
    if FAULTS and fault in FAULTS and fault not in _FIRED:  # once, like a transient overflow
        _FIRED.add(fault)
        return loss * float("nan")
    return loss


def maybe_hang(rank: int, step: int) -> None:
    """Stall this rank (as a dead GPU or a stuck filesystem would) if a hang fault is set for it."""
    if FAULTS and ("hang", rank, step) in FAULTS:
        print(f"fault injection: rank {rank} hangs at step {step}", file=sys.stderr, flush=True)
        time.sleep(10**6)


def maybe_kill_in_save(rank: int, step: int) -> None:
    """SIGKILL this rank after its shards are written but before the checkpoint is marked complete."""
    if FAULTS and ("kill_in_save", rank, step) in FAULTS:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_stall_in_save(rank: int, step: int) -> None:
    """Stall this rank after its shards are written, before the checkpoint is marked complete (a test cuts the
    network then: a partition during a save)."""
    if FAULTS and ("stall_in_save", rank, step) in FAULTS:
        print(f"fault injection: rank {rank} stalls in save at step {step}", file=sys.stderr, flush=True)
        time.sleep(10**6)


def maybe_slow_start(rank: int) -> None:
    """Join the rendezvous late (as a rank on a loaded node does) if a slow_start fault is set for this rank."""
    for kind, fault_rank, seconds in FAULTS:
        if kind == "slow_start" and fault_rank == rank:
            time.sleep(seconds)


def with_step_faults(
    forward: Callable[[dict], dict], rank: int, next_step: Callable[[], int]
) -> Callable[[dict], dict]:
    """``forward`` itself unless a nan or hang fault is set (then the production loop never sees a fault check);
    else a wrapper that stalls this rank before, or returns a NaN loss from, the forward of the chosen step."""
    if not any(kind in ("nan", "hang") for kind, _, _ in FAULTS):
        return forward

    def forward_with_faults(batch: dict) -> dict:
        step = next_step()
        maybe_hang(rank, step)
        outputs = forward(batch)
        return {**outputs, "loss": maybe_corrupt_loss(outputs["loss"], rank, step)}

    return forward_with_faults
