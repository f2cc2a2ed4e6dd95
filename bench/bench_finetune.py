"""Fine-tuning on digits: a SimMIM-pretrained student vs the same student at random init, equal steps.

Pretrains the bench_quality digits setup (ViT-Tiny, 6 blocks, 32 px, 4-px patches, sin-cos position start) with
`mimscale train`, exports it, then runs `mimscale eval finetune` twice with the same recipe, seed, head init and
data order: once on the export (through timm's `local-dir:` loader with a new 10-way head) and once on
`random:<run folder>` (the run's own config, untrained). Prints a markdown table for bench/RESULTS.md.

    nice -n 10 python bench/bench_finetune.py --pretrain-steps 400 --steps 150 --out runs/bench_finetune

One torch thread per process (OMP_NUM_THREADS=1 unless set): on a shared 2-core machine OpenMP's spinning threads
made every step several times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import REPO, pretrain  # noqa: E402  (same pretraining setup as the quality bench)

TRAIN, VAL = "shards/digits/train-*.tar", "shards/digits/val-000.tar"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the train / finetune subprocesses


def finetune(model: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "mimscale.cli", "eval", "finetune", "--model", model, "--train", TRAIN, "--val", VAL]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--blr", str(args.blr)]
    cmd += ["--eval-every", str(max(1, args.steps // 3)), "--json", *args.finetune_args]
    start = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.time() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--depth", type=int, default=4, help="ViT blocks (the quality bench uses 6)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps (both models)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--blr", type=float, default=5e-3, help="base lr per 512 images (SimMIM's default: 1.25e-3)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_finetune")
    parser.add_argument("finetune_args", nargs="*", help="more `mimscale eval finetune` options, after --")
    args = parser.parse_args()

    run = args.out / "pretrain"
    seconds = pretrain(
        run, args.pretrain_steps, "digits", [f"model.student_args={{patch_size: 4, depth: {args.depth}}}"]
    )
    export = args.out / "export"
    subprocess.run([sys.executable, "-m", "mimscale.cli", "export", str(run), str(export)], check=True, cwd=REPO)
    rows = {"SimMIM pretrained (export, timm local-dir)": finetune(str(export), args)}
    rows["random init (random:<run folder>)"] = finetune(f"random:{run}", args)

    first = next(iter(rows.values()))
    recipe = first["recipe"]
    print(
        f"\npretraining: ViT-Tiny, {args.depth} blocks, {args.pretrain_steps} steps in {seconds:.0f} s; fine-tuning: {args.steps} steps, batch "
        f"{args.batch_size}, lr {recipe['lr']:.2e}, layer decay {first['layer_decay']}, drop path "
        f"{first['drop_path']}, label smoothing {recipe['label_smoothing']}, {first['train_samples']} train / "
        f"{first['val_samples']} val, device {first['device']}\n"
    )
    steps = [entry["step"] for entry in first["history"]]
    print("| backbone | " + " | ".join(f"val top-1 @ {s}" for s in steps) + " | final train loss | wall s |")
    print("|---" * (len(steps) + 3) + "|")
    for name, result in rows.items():
        accs = " | ".join(f"{100 * entry['top1']:.1f} %" for entry in result["history"])
        print(f"| {name} | {accs} | {result['final_loss']:.3f} | {result['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
