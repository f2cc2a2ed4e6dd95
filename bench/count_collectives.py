"""mimscale.train with every torch.distributed collective counted: which ops one training step issues, in which
dtype and how many elements, to take bench/bench_multinode.py's measured bytes apart.

    mimscale launch --num_gpus 2 --module bench.count_collectives --config configs/demo_cpu.yaml --set ...

Each rank wraps the torch.distributed collectives (before DeepSpeed binds them), DeepSpeedEngine.backward (the
start of backward) and .step (the step boundary); at exit rank 0 prints, for the last complete step, each (phase,
op, dtype) with its number of calls, its
bytes (of the full tensor: the input of a reduce-scatter, the output of an all-gather) and the bytes an optimal
ring sends per rank for it on N ranks: all-reduce 2 (N-1)/N x bytes, reduce-scatter, all-gather and reduce
(N-1)/N x bytes, broadcast the whole tensor (from the source only; bench/gloo_wire.py measures what gloo sends).
"""

from __future__ import annotations

import atexit
import functools
import os
import runpy
from collections import Counter

import torch
import torch.distributed as dist

# op name -> (the argument holding the full tensor: keyword, position; ring bytes per rank per byte of it on N ranks)
COLLECTIVES = {
    "all_reduce": ("tensor", 0, lambda n: 2 * (n - 1) / n),
    "reduce": ("tensor", 0, lambda n: (n - 1) / n),
    "broadcast": ("tensor", 0, lambda n: 1.0),
    "all_gather_into_tensor": ("output_tensor", 0, lambda n: (n - 1) / n),
    "reduce_scatter_tensor": ("input", 1, lambda n: (n - 1) / n),
    "all_gather": ("tensor_list", 0, lambda n: (n - 1) / n),
    "reduce_scatter": ("input_list", 1, lambda n: (n - 1) / n),
    "all_to_all_single": ("input", 1, lambda n: (n - 1) / n),
}
TIMELINE: list = []


def _size(value) -> tuple[str, int]:
    if isinstance(value, (list, tuple)):
        return str(value[0].dtype).removeprefix("torch."), sum(t.numel() * t.element_size() for t in value)
    return str(value.dtype).removeprefix("torch."), value.numel() * value.element_size()


def _wrap(name: str, argument: str, position: int, original):
    @functools.wraps(original)
    def counted(*args, **kwargs):
        tensor = kwargs.get(argument, args[position] if len(args) > position else None)
        if tensor is not None:
            TIMELINE.append((name, *_size(tensor)))
        return original(*args, **kwargs)

    return counted


def _mark_after(original, mark: str):
    @functools.wraps(original)
    def marked(*args, **kwargs):
        result = original(*args, **kwargs)
        TIMELINE.append((mark, "", 0))
        return result

    return marked


def _mark_before(original, mark: str):
    @functools.wraps(original)
    def marked(*args, **kwargs):
        TIMELINE.append((mark, "", 0))
        return original(*args, **kwargs)

    return marked


def summary(timeline: list, world_size: int) -> str:
    """The ops of the last complete step (between the last two step markers), by (phase, op, dtype)."""
    marks = [i for i, entry in enumerate(timeline) if entry[0] == "STEP"]
    if len(marks) < 2:
        return "fewer than two steps: nothing to summarise"
    calls, sizes = Counter(), Counter()
    phase = "forward"
    for name, dtype, size in timeline[marks[-2] + 1 : marks[-1]]:
        if name == "BACKWARD":
            phase = "backward+step"
            continue
        calls[phase, name, dtype] += 1
        sizes[phase, name, dtype] += size
    lines = [f"collectives of step {len(marks)} ({world_size} ranks):"]
    total = 0.0
    for key, count in sorted(calls.items(), key=lambda item: (item[0][0] != "forward", item[0])):
        phase, name, dtype = key
        ring = COLLECTIVES[name][2](world_size) * sizes[key]
        total += ring
        lines.append(
            f"  {phase:13s} {name:22s} {dtype:8s} calls {count:4d}  bytes {sizes[key]:>11,}  ring/rank {ring:>12,.0f}"
        )
    lines.append(f"  total ring bytes per rank per step: {total:,.0f}")
    return "\n".join(lines)


def _print_summary() -> None:
    if os.environ.get("RANK", "0") == "0":  # the process group may be gone at exit: the launcher's variables
        print(summary(TIMELINE, int(os.environ.get("WORLD_SIZE", "1"))), flush=True)


def install() -> None:
    for name, (argument, position, _) in COLLECTIVES.items():
        if hasattr(dist, name):
            setattr(dist, name, _wrap(name, argument, position, getattr(dist, name)))
    from deepspeed.runtime.engine import DeepSpeedEngine

    DeepSpeedEngine.step = _mark_after(DeepSpeedEngine.step, "STEP")
    DeepSpeedEngine.backward = _mark_before(DeepSpeedEngine.backward, "BACKWARD")
    atexit.register(_print_summary)


if __name__ == "__main__":
    install()
    assert torch.distributed is dist
    runpy.run_module("mimscale.train", run_name="__main__", alter_sys=True)
