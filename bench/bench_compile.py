"""model.compile's speed-up for one training step: eager vs compiled (inductor; attention + MLP of each block).

    python bench/bench_compile.py [--config configs/demo_cpu.yaml] [--rounds 6] [--steps 5] [--set k=v ...]

Same method and weights, same batch, AdamW; blocks of steps alternate between the two models in one process, so
both see the same machine load; prints best and median ms/step and the ratios. CPU by default (1 thread): on a
GPU the figures come from bench/gpu_suite.py's compile rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo_cpu.yaml")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", action="append", default=["data.batch_size=16", "model.drop_path_rate=0.1"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from mimscale.config import load_config
    from mimscale.engine.optim import build_optimizer
    from mimscale.methods import build_method
    from mimscale.pipeline.masking import mask_generator_for

    cfg = load_config(args.config, args.set)

    def make(compiled: bool):
        torch.manual_seed(0)
        method = build_method(cfg)
        if compiled:
            method.compile_for_training()
        return method, build_optimizer(method, cfg.optim, fused=False)

    runs = {"eager": make(False), "compiled": make(True)}
    generator, rng = mask_generator_for(cfg, runs["eager"][0]), np.random.default_rng(0)
    size, batch_size = cfg.data.image_size, cfg.data.batch_size
    batch = {
        "image": torch.randn(batch_size, 3, size, size),
        "mask": torch.from_numpy(np.stack([generator(rng) for _ in range(batch_size)])),
    }

    def step(method, optimizer) -> None:
        method(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for method, optimizer in runs.values():
        for _ in range(3):
            step(method, optimizer)
    print(f"warm-up (compile included) {time.perf_counter() - start:.1f} s")
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (method, optimizer) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(method, optimizer)
            times[name].append((time.perf_counter() - start) / args.steps)
    for name, values in times.items():
        print(f"{name:<9} best {1000 * min(values):8.1f} ms/step | median {1000 * statistics.median(values):8.1f}")
    best = min(times["eager"]) / min(times["compiled"])
    median = statistics.median(times["eager"]) / statistics.median(times["compiled"])
    print(f"speed-up best {best:.2f}x, median {median:.2f}x")


if __name__ == "__main__":
    main()
