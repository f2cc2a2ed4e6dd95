"""Our engine's step time at ZeRO-0 on CPU against a bare PyTorch loop: same method, same data tensors, same
AdamW parameter groups, same batch, same clipping. Blocks of steps alternate between the two in one process, so
the ratio is measured under the same machine load.

    python bench/bench_engine.py [--config configs/demo_cpu.yaml] [--steps 10] [--rounds 5] [--set k=v ...]

The engine side is mimscale.engine.loop.Trainer.train_step on the DeepSpeed engine (single rank, gloo); "engine, no
NaN guard" is the same with train.nan_guard=false, which shows what the per-micro-batch loss check costs.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def fixed_batches(cfg, method, count: int) -> list[dict]:
    """Random images and real masks from the method's mask generator, made once and reused by every loop."""
    from mimscale.pipeline.masking import mask_generator_for

    generator = mask_generator_for(cfg, method)
    rng = np.random.default_rng(0)
    size, batch = cfg.data.image_size, cfg.data.batch_size
    return [
        {
            "image": torch.randn(batch, 3, size, size),
            "mask": torch.from_numpy(np.stack([generator(rng) for _ in range(batch)])),
        }
        for _ in range(count)
    ]


def bare_loop(cfg, batches: list[dict]):
    """The reference: method + AdamW + clipping + schedule, nothing else."""
    from mimscale.engine.optim import build_optimizer, build_scheduler
    from mimscale.methods import build_method

    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    optimizer = build_optimizer(method, cfg.optim, fused=False)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    source = itertools.cycle(batches)

    def step() -> None:
        loss = method(next(source))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def engine_loop(cfg, info, batches: list[dict]):
    from mimscale.engine.loop import Trainer

    trainer, source = Trainer(cfg, info), itertools.cycle(batches)

    def step() -> None:
        trainer.train_step(source)

    return step


def time_steps(step, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per loop")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is least sensitive to other load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mimscale.config import load_config
    from mimscale.engine.distributed import init_distributed, shutdown
    from mimscale.methods import build_method

    base = ["deepspeed.zero_stage=0", "deepspeed.precision=fp32", "run.device=cpu", "train.log_every=1000000"]
    cfg = load_config(args.config, base + args.set)
    unguarded = load_config(args.config, base + args.set + ["train.nan_guard=false"])
    info = init_distributed("cpu")
    torch.manual_seed(cfg.run.seed)
    batches = fixed_batches(cfg, build_method(cfg), 4)
    loops = {
        "bare PyTorch": bare_loop(cfg, batches),
        "engine (ZeRO-0)": engine_loop(cfg, info, batches),
        "engine, no NaN guard": engine_loop(unguarded, info, batches),
    }
    for step in loops.values():
        time_steps(step, 2)  # warm-up: allocator, optimizer state, first-call overheads
    times = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, step in loops.items():
            times[name].append(time_steps(step, args.steps))
    print(
        f"{cfg.model.student}, img {cfg.data.image_size}, batch {cfg.data.batch_size}, fp32, CPU "
        f"({torch.get_num_threads()} threads), {args.rounds} alternating blocks x {args.steps} steps; "
        "best block = least disturbed by other load"
    )
    best_reference = min(times["bare PyTorch"])
    median_reference = statistics.median(times["bare PyTorch"])
    for name, values in times.items():
        best, median = min(values), statistics.median(values)
        print(
            f"{name:<22} best {1000 * best:7.1f} ms/step x{best / best_reference:.3f} | median {1000 * median:7.1f} "
            f"x{median / median_reference:.3f}"
        )
    shutdown()


if __name__ == "__main__":
    main()
