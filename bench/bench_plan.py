"""Plan the paper and giant presets for 8 / 64 / 256 GPUs and print one table (no GPU needed).

    python bench/bench_plan.py [--gpu-memory 80GB] [--mfu 0.4] [--peak-tflops 989]

Uses configs/*.yaml whose names mention vit_b / vit_l / vit_g / 1b / swinv2 when they exist; otherwise (and in
addition, for models no preset covers yet) plans built-in override sets on the default config.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mimscale.config import load_config
from mimscale.plan import GIB, make_plan, parse_memory

ROOT = Path(__file__).resolve().parents[1]
BF16_ZERO = ["deepspeed.precision=bf16", "deepspeed.activation_checkpointing=true"]
BUILTIN = {
    "vit_b simmim 224": ["model.student=vit_base_patch16_224", "data.image_size=224", "deepspeed.zero_stage=1"],
    "vit_l maskdistill 224": [
        "model.student=vit_large_patch16_224",
        "data.image_size=224",
        "method.name=maskdistill",
        "teacher.kind=open_clip",
        "teacher.name=ViT-B-16",
        "deepspeed.zero_stage=2",
    ],
    "vit_g(1B) maskalign 224": [
        "model.student=vit_giant_patch14_224",
        "data.image_size=224",
        "mask.patch_size=28",
        "mask.ratio=0.7",
        "method.name=maskalign",
        "teacher.kind=open_clip",
        "teacher.name=ViT-L-14",
        "deepspeed.zero_stage=3",
    ],
    "swinv2_g(2.6B) simmim 224": [
        "model.student=swinv2_cr_giant_224",
        "data.image_size=224",
        "deepspeed.zero_stage=3",
    ],
}
PRESET_WORDS = ("vit_b", "vitb", "vit-b", "vit_l", "vitl", "vit-l", "vit_g", "1b", "swinv2")


def preset_configs() -> dict[str, tuple[Path | None, list[str]]]:
    """Presets from configs/ when they exist, else the built-in override sets."""
    found = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if any(word in path.stem.lower() for word in PRESET_WORDS):
            found[path.stem] = (path, [])
    if not found:
        found = {name: (None, BF16_ZERO + overrides) for name, overrides in BUILTIN.items()}
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
        f"{'config':<28} {'gpus':>4} {'ZeRO':>4} {'ckpt':>4} {'student':>8} {'teacher':>8} {'states/rank':>11} "
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
                f"{name[:28]:<28} {gpus:>4} {plan.zero_stage:>4} {'on' if plan.activation_checkpointing else 'off':>4} "
                f"{plan.student_params / 1e9:>7.2f}B {plan.teacher_params / 1e9:>7.2f}B "
                f"{plan.model_state_bytes / GIB:>7.2f} GiB {plan.activation_bytes_per_sample / 2**20:>5.1f} MiB "
                f"{plan.max_micro_batch:>6} {plan.flops_per_image / 1e9:>9.1f} {plan.images_per_second:>9,.0f} "
                f"{seconds:>6.2f}"
            )


if __name__ == "__main__":
    main()
