"""Fine-tuning on digits: the papers' augmentation vs light shifts, live vs EMA weights, pretrained vs random init.

Pretrains the bench_quality digits setup (ViT-Tiny, 4 blocks by default, 32 px, 4-px patches, sin-cos position start)
with `mimscale train`, exports it, then runs `mimscale eval finetune` on the export (timm's `local-dir:` loader, new
10-way head) once per augmentation arm and seed, with the same recipe otherwise:

- `light`: random shifts of up to 4 px, label-smoothed cross-entropy (the command's small-data path);
- `paper`: timm's create_transform with RandAugment rand-m9-mstd0.5-inc1 and random erasing 0.25 (whole images:
  32 px is under the tiny-image bound), Mixup 0.8 / CutMix 1.0 with SoftTargetCrossEntropy (MAE's, SimMIM's).

Every run keeps an EMA of the weights (`--ema`, timm's ModelEmaV3 with its warmup): it does not change training, so
one run gives both the live ("without EMA") and the EMA top-1. `--random` adds `random:<run folder>` (the run's own
config, untrained) for each arm. Prints markdown tables for bench/RESULTS.md.

    nice -n 10 python bench/bench_finetune.py --pretrain-steps 400 --steps 150 --seeds 0 1 --out runs/bench_finetune

One torch thread per process (OMP_NUM_THREADS=1 unless set): on a shared 2-core machine OpenMP's spinning threads
made every step several times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import REPO, pretrain  # noqa: E402  (same pretraining setup as the quality bench)

TRAIN, VAL = "shards/digits/train-*.tar", "shards/digits/val-000.tar"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the train / finetune subprocesses


def finetune(model: str, aug: str, seed: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "mimscale.cli", "eval", "finetune", "--model", model, "--train", TRAIN, "--val", VAL]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--blr", str(args.blr)]
    cmd += ["--aug", aug, "--seed", str(seed), "--ema", str(args.ema), "--ema-warmup"]
    cmd += ["--eval-every", str(max(1, args.steps // 3)), "--json", *args.finetune_args]
    start = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.time() - start
    print(
        f"{model} {aug} seed {seed}: top-1 {100 * result['top1']:.1f} %, EMA {100 * result['top1_ema']:.1f} %, "
        f"{result['wall_s']:.0f} s",
        flush=True,
    )
    return result


def print_tables(runs: list[tuple[str, str, int, dict]]) -> None:
    steps = [entry["step"] for entry in runs[0][3]["history"]]
    print("| backbone | aug | seed | " + " | ".join(f"top-1 @ {s}" for s in steps) + " | EMA top-1 | loss | wall s |")
    print("|---" * (len(steps) + 6) + "|")
    for backbone, aug, seed, result in runs:
        accs = " | ".join(f"{100 * entry['top1']:.1f} %" for entry in result["history"])
        print(
            f"| {backbone} | {aug} | {seed} | {accs} | {100 * result['top1_ema']:.1f} % | "
            f"{result['final_loss']:.3f} | {result['wall_s']:.0f} |"
        )
    print("\n| backbone | aug | seeds | val top-1, live weights (mean, min-max) | val top-1, EMA weights |")
    print("|---|---|---|---|---|")
    for backbone, aug in dict.fromkeys((b, a) for b, a, _, _ in runs):
        live = [100 * r["top1"] for b, a, _, r in runs if (b, a) == (backbone, aug)]
        ema = [100 * r["top1_ema"] for b, a, _, r in runs if (b, a) == (backbone, aug)]
        print(
            f"| {backbone} | {aug} | {len(live)} | {statistics.mean(live):.1f} % ({min(live):.1f}-{max(live):.1f}) | "
            f"{statistics.mean(ema):.1f} % ({min(ema):.1f}-{max(ema):.1f}) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--depth", type=int, default=4, help="ViT blocks (the quality bench uses 6)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps (every arm)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--blr", type=float, default=5e-3, help="base lr per 512 images (SimMIM's default: 1.25e-3)")
    parser.add_argument("--augs", nargs="+", default=["light", "paper"], choices=["light", "paper"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--ema", type=float, default=0.99, help="EMA decay (with timm's warmup)")
    parser.add_argument("--random", action="store_true", help="also fine-tune the random-init twin in every arm")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_finetune")
    parser.add_argument("finetune_args", nargs="*", help="more `mimscale eval finetune` options, after --")
    args = parser.parse_args()

    run = args.out / "pretrain"
    seconds = pretrain(
        run, args.pretrain_steps, "digits", [f"model.student_args={{patch_size: 4, depth: {args.depth}}}"]
    )
    export = args.out / "export"
    subprocess.run([sys.executable, "-m", "mimscale.cli", "export", str(run), str(export)], check=True, cwd=REPO)
    backbones = {"SimMIM pretrained": str(export), **({"random init": f"random:{run}"} if args.random else {})}
    runs = []
    for name, model in backbones.items():
        for aug in args.augs:
            runs += [(name, aug, seed, finetune(model, aug, seed, args)) for seed in args.seeds]

    recipe = runs[0][3]["recipe"]
    print(
        f"\npretraining: ViT-Tiny, {args.depth} blocks, {args.pretrain_steps} steps in {seconds:.0f} s; fine-tuning: "
        f"{args.steps} steps, batch {args.batch_size}, lr {recipe['lr']:.2e}, layer decay {runs[0][3]['layer_decay']}, "
        f"drop path {runs[0][3]['drop_path']}, label smoothing {recipe['label_smoothing']}, EMA {args.ema} (warmup), "
        f"{runs[0][3]['train_samples']} train / {runs[0][3]['val_samples']} val, device {runs[0][3]['device']}\n"
    )
    print_tables(runs)


if __name__ == "__main__":
    main()
