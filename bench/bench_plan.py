"""Plan the paper and giant presets for 8 / 64 / 256 GPUs and print one table (no GPU needed).

    python bench/bench_plan.py [--gpu-memory 80GB] [--mfu 0.4] [--peak-tflops 989]

Plans every non-demo config in configs/ as written, plus built-in override sets (bf16, activation checkpointing)
for the ViT-B/L, ViT-g 1B and SwinV2-G 3B models no config covers yet.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mimscale.config import load_config
from mimscale.plan import GIB, make_plan, parse_memory

ROOT = Path(__file__).resolve().parents[1]
BF16_ZERO = ["deepspeed.precision=bf16", "deepspeed.activation_checkpointing=true"]
SWINV2_GIANT = "model.student_args={embed_dim: 512, depths: [2, 2, 42, 4], num_heads: [16, 32, 64, 128]}"
BUILTIN = {
    "vit_b simmim 224 (builtin)": [
        "model.student=vit_base_patch16_224",
        "data.image_size=224",
        "deepspeed.zero_stage=1",
    ],
    "vit_l maskdistill 224 (builtin)": [
        "model.student=vit_large_patch16_224",
        "data.image_size=224",
        "method.name=maskdistill",
        "teacher.kind=open_clip",
        "teacher.name=ViT-B-16",
        "deepspeed.zero_stage=2",
    ],
    "vit_g 1B maskalign 224 (builtin)": [
        "model.student=vit_giant_patch14_224",
        "data.image_size=224",
        "mask.patch_size=28",
        "mask.ratio=0.7",
        "method.name=maskalign",
        "teacher.kind=open_clip",
        "teacher.name=ViT-L-14",
        "deepspeed.zero_stage=3",
    ],
    "swinv2_g 3B simmim 192 (builtin)": [
        "model.student=swinv2_base_window12_192",
        SWINV2_GIANT,
        "data.image_size=192",
        "deepspeed.zero_stage=3",
    ],
}


def preset_configs() -> dict[str, tuple[Path | None, list[str]]]:
    """Every non-demo config in configs/, plus the built-in sets for models no config covers yet."""
    found: dict[str, tuple[Path | None, list[str]]] = {}
    covered = set()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.stem.startswith("demo"):
            continue
        cfg = load_config(path)
        found[path.stem] = (path, [])
        covered.add((cfg.model.student, str(cfg.model.student_args)))
    for name, overrides in BUILTIN.items():
        cfg = load_config(None, overrides)
        if (cfg.model.student, str(cfg.model.student_args)) not in covered:
            found[name] = (None, BF16_ZERO + overrides)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-memory", default="80GB")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256])
    args = parser.parse_args()
    memory = parse_memory(args.gpu_memory)
    header = (
        f"{'config':<32} {'gpus':>4} {'ZeRO':>4} {'ckpt':>4} {'student':>8} {'teacher':>8} {'states/rank':>11} "
        f"{'act/img':>9} {'max mb':>6} {'GFLOP/img':>9} {'img/s':>9} {'plan s':>6}"
    )
    print(f"GPU memory {args.gpu_memory}, MFU {args.mfu:.0%} of {args.peak_tflops:g} TFLOP/s")
    print(header)
    print("-" * len(header))
    for name, (path, overrides) in preset_configs().items():
        cfg = load_config(path, overrides)
        for gpus in args.gpus:
            start = time.perf_counter()
            plan = make_plan(cfg, gpus=gpus, gpu_memory_bytes=memory, mfu=args.mfu, peak_tflops=args.peak_tflops)
            seconds = time.perf_counter() - start
            print(
                f"{name[:32]:<32} {gpus:>4} {plan.zero_stage:>4} {'on' if plan.activation_checkpointing else 'off':>4} "
                f"{plan.student_params / 1e9:>7.2f}B {plan.teacher_params / 1e9:>7.2f}B "
                f"{plan.model_state_bytes / GIB:>7.2f} GiB {plan.activation_bytes_per_sample / 2**20:>5.1f} MiB "
                f"{plan.max_micro_batch:>6} {plan.flops_per_image / 1e9:>9.1f} {plan.images_per_second:>9,.0f} "
                f"{seconds:>6.2f}"
            )


if __name__ == "__main__":
    main()
