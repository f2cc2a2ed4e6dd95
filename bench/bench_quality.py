"""Quality of what SimMIM learns on the demo: kNN / linear probe and attention distance, pretrained vs random init.

Pretrains a ViT-Tiny (default: 6 blocks on the digit shards at 32 px, 4-px patches; --setup photos: the demo's
64 px, 8-px patches on the sample photos; photos-fine: 4-px patches) with `mimscale train` for a few CPU minutes,
then scores the frozen features of the trained and of a randomly initialised copy (same config, same seed:
``random:<run folder>``) with the weighted kNN and the linear probe, on the sample photos (shards/sample ->
shards/sample-val) and on digits, probes every block's output on the setup's own data (``--layer``), and prints
attention distance/entropy/head diversity per block and occlusion robustness. Prints markdown tables for
bench/RESULTS.md.

    python bench/bench_quality.py --setup digits --steps 1500 --out runs/bench_quality_digits
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
# Pretraining setups: overrides of the demo config. "digits" pretrains on the digit shards at 32 px (4-px patches,
# an 8x8 grid, 4-px mask cells, 6 blocks, per-patch normalised pixel targets) where strokes, not colour, carry the
# label; "photos" is the demo as is (the setup of the first figures in bench/RESULTS.md); "photos-fine" is the
# photos at a 16x16 grid of 4-px patches with raw-pixel targets. Both ViT setups start the position embedding from
# the 2-D sin-cos table: with timm's trunc-normal init, attention never became local in a few CPU minutes.
SETUPS = {
    "digits": {
        "data.shards": "shards/digits/train-*.tar",
        "data.image_size": 32,
        "model.student_args": {"patch_size": 4, "depth": 6},
        "model.pos_embed_init": "sincos",
        "mask.patch_size": 4,
        "method.target_norm": "patch_pixel",
        "optim.lr": 2e-3,
        "optim.warmup_steps": 30,
    },
    "photos": {},
    "photos-fine": {
        "model.student_args": {"patch_size": 4, "depth": 4},
        "model.pos_embed_init": "sincos",
        "mask.patch_size": 8,
        "optim.lr": 2e-3,
        "optim.warmup_steps": 30,
    },
}
EVAL_SETS = {
    "photos (sample -> sample-val)": ("shards/sample/*.tar", "shards/sample-val/*.tar"),
    "digits (train -> val)": ("shards/digits/train-*.tar", "shards/digits/val-000.tar"),
}


def run_overrides(run_dir: Path, steps: int, seed: int | None = None) -> list[str]:
    """The settings every pretraining run of the benches shares: its folder, length, one final checkpoint (and
    its seed, when given; else the config's)."""
    return [
        f"run.output_dir={run_dir}",
        *([f"run.seed={seed}"] if seed is not None else []),
        f"train.max_steps={steps}",
        f"checkpoint.every_steps={steps}",
        "eval.knn_every=0",
        "data.num_workers=1",
        "train.progress_bar=false",
        f"train.log_every={max(1, steps // 10)}",
    ]


def pretrain(out: Path, steps: int, setup: str, extra: list[str]) -> float:
    """Run `mimscale train` on the demo config + setup; returns wall seconds (resumes if the run already exists)."""
    overrides = (
        [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in SETUPS[setup].items()]
        + extra
        + run_overrides(out, steps)
    )
    cmd = [sys.executable, "-m", "mimscale.cli", "train", "--config", str(DEMO)]
    for item in overrides:
        cmd += ["--set", item]
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return time.time() - start


def score(loaded, train: str, val: str, *, pool: str, layer: int | None = None) -> dict:
    """kNN (DINO, k=20, T=0.07) and linear-probe top-1 of ``loaded``'s frozen features, train shards -> val shards."""
    from mimscale.eval.probe import extract_features, knn_accuracy, linear_probe
    from mimscale.pipeline.stream import iter_eval_batches

    common = {"image_size": loaded.image_size, "batch_size": 64, "mean": loaded.mean, "std": loaded.std}
    features = {"pool": pool, "layer": layer}
    train_feats, train_labels = extract_features(
        loaded.model, iter_eval_batches(str(REPO / train), **common), **features
    )
    val_feats, val_labels = extract_features(loaded.model, iter_eval_batches(str(REPO / val), **common), **features)
    probe = linear_probe(train_feats, train_labels, val_feats, val_labels)
    return {
        "knn": knn_accuracy(train_feats, train_labels, val_feats, val_labels, k=20, temperature=0.07),
        "linear": probe["top1"],
        "linear_lr": probe["lr"],
        "linear_wd": probe["weight_decay"],
    }


def evaluate(spec: str, pool: str, attention_images: str) -> dict:
    """kNN and linear-probe top-1 on every eval set (``pool`` features), mean attention distance per block."""
    from mimscale.eval.analysis import analyze_model
    from mimscale.eval.export import load_backbone
    from mimscale.pipeline.stream import iter_eval_batches

    loaded = load_backbone(spec)
    scores = {name: score(loaded, train, val, pool=pool) for name, (train, val) in EVAL_SETS.items()}
    common = {"image_size": loaded.image_size, "batch_size": 32, "mean": loaded.mean, "std": loaded.std}
    images, _ = next(iter(iter_eval_batches(str(REPO / attention_images), **common)))
    analysis = analyze_model(loaded.model, images, pool=pool)
    distance = [sum(heads) / len(heads) for heads in analysis["attention_distance"]]
    entropy = [sum(h) / len(h) / analysis["uniform_entropy"] for h in analysis["attention_entropy"]]
    return {
        "scores": scores,
        "attention_distance": distance,
        "attention_distance_heads": analysis["attention_distance"],
        "most_local_head": [min(heads) for heads in analysis["attention_distance"]],
        "uniform_distance": analysis["uniform_attention_distance"],
        "attention_entropy_rel": entropy,
        "head_diversity": analysis["head_diversity"],
        "occlusion": analysis["occlusion"],
    }


def probe_blocks(spec: str, eval_set: str, pool: str = "mean") -> list[dict]:
    """kNN and linear-probe top-1 of every block's raw output (``--layer``), the final norm left out."""
    from mimscale.eval.export import load_backbone
    from mimscale.eval.probe import block_count

    loaded = load_backbone(spec)
    train, val = EVAL_SETS[eval_set]
    return [score(loaded, train, val, pool=pool, layer=layer) for layer in range(1, block_count(loaded.model) + 1)]


def print_block_table(blocks: dict[str, list[dict]], eval_set: str) -> None:
    depth = max(len(rows) for rows in blocks.values())
    print(
        f"\n| {eval_set}, mean pooling, per block: kNN / linear | "
        + " | ".join(f"b{i + 1}" for i in range(depth))
        + " |"
    )
    print("|---|" + "---|" * depth)
    for model, rows in blocks.items():
        cells = [f"{100 * r['knn']:.1f} / {100 * r['linear']:.1f}" for r in rows]
        print(f"| {model} | " + " | ".join(cells) + " |")


def print_tables(results: dict[str, dict]) -> None:
    print("\n| model | eval set | kNN top-1 (k=20, T=0.07) | linear probe top-1 (best lr, wd) |")
    print("|---|---|---|---|")
    for model, result in results.items():
        for name, s in result["scores"].items():
            print(
                f"| {model} | {name} | {100 * s['knn']:.1f} % | {100 * s['linear']:.1f} % "
                f"({s['linear_lr']:g}, {s['linear_wd']:g}) |"
            )
    depth = max(len(r["attention_distance"]) for r in results.values())
    rows = {
        "mean attention distance (px)": ("attention_distance", "{:.1f}"),
        "most local head's distance (px)": ("most_local_head", "{:.1f}"),
        "attention entropy / log(tokens)": ("attention_entropy_rel", "{:.3f}"),
        "head diversity (JS, nats)": ("head_diversity", "{:.3f}"),
    }
    for title, (key, fmt) in rows.items():
        print(f"\n| {title} | " + " | ".join(f"b{i + 1}" for i in range(depth)) + " |")
        print("|---|" + "---|" * depth)
        for model, result in results.items():
            if model.endswith(", cls"):  # attention does not depend on the pooling
                print(f"| {model[: -len(', cls')]} | " + " | ".join(fmt.format(v) for v in result[key]) + " |")
    print("\n| occlusion: cos(masked, intact) | " + " | ".join(next(iter(results.values()))["occlusion"]) + " |")
    print("|---|" + "---|" * len(next(iter(results.values()))["occlusion"]))
    for model, result in results.items():
        print(f"| {model} | " + " | ".join(f"{v:.3f}" for v in result["occlusion"].values()) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="SimMIM pretraining steps")
    parser.add_argument("--out", default="runs/bench_quality", help="run folder of the pretraining")
    parser.add_argument("--setup", choices=sorted(SETUPS), default="digits", help="what to pretrain on (see SETUPS)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the run already in --out")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    if not args.skip_train:
        seconds = pretrain(out, args.steps, args.setup, args.set)
        print(f"pretraining: {args.steps} steps in {seconds:.0f} s ({out})")
    images = "shards/digits/val-000.tar" if args.setup == "digits" else "shards/sample-val/*.tar"
    torch.manual_seed(0)
    results = {}
    for pool in ("cls", "mean"):  # SimMIM's loss never reaches the class token directly: mean pooling matters
        results[f"SimMIM {args.steps} steps, {pool}"] = evaluate(str(out), pool, images)
        results[f"random init, {pool}"] = evaluate(f"random:{out}", pool, images)  # the run's own config
    own_set = next(name for name in EVAL_SETS if name.startswith("digits" if args.setup == "digits" else "photos"))
    blocks = {
        f"SimMIM {args.steps} steps": probe_blocks(str(out), own_set),
        "random init": probe_blocks(f"random:{out}", own_set),
    }
    (out / "quality.json").write_text(json.dumps({"final": results, "blocks": blocks}, indent=2) + "\n")
    print_tables(results)
    print_block_table(blocks, own_set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
