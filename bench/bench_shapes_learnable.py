"""Is the textured-shapes set (shards/build_shapes.py) learnable, and how short of labels is it?

A small CNN (5 conv layers with batch norm, AdamW one-cycle to 2e-3, batch 64, random flips and shifts of up to
4 px) is trained on the set's labels twice: on the 1000 train labels (the fine-tuning budget of
``bench_claims.py --scale shapes``) and on train + pretrain (5800 labels, an upper bound no label-free method
gets). It prints the val top-1 five times along the way. A convolution's locality prior makes this the cheap
check that the class is in the pixels; it is not a baseline for the ViT arms.

    python shards/build_shapes.py runs/shapes
    OMP_NUM_THREADS=1 python bench/bench_shapes_learnable.py runs/shapes --epochs 30
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.eval.finetune import load_labelled

INPUT = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def small_cnn(classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
    )  # fmt: skip


def augment(images: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips per image and one random shift of up to 4 px per batch (the class is the outline)."""
    flipped = torch.where(torch.rand(len(images), 1, 1, 1) < 0.5, images.flip(3), images)
    dy, dx = torch.randint(-4, 5, (2,)).tolist()
    return torch.roll(flipped, (dy, dx), (2, 3))


def train_and_score(train: tuple, val: tuple, epochs: int, batch: int = 64, lr: float = 2e-3) -> list[float]:
    images, labels = train
    net = small_cnn()
    optimizer = torch.optim.AdamW(net.parameters(), lr, weight_decay=0.05)
    per_epoch = len(labels) // batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * per_epoch)
    curve = []
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(labels))
        for start in range(0, per_epoch * batch, batch):
            pick = order[start : start + batch]
            loss = F.cross_entropy(net(augment(images[pick])), labels[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % max(1, epochs // 5) == 0:
            net.eval()
            with torch.no_grad():
                curve.append(100 * (net(val[0]).argmax(1) == val[1]).float().mean().item())
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the folder build_shapes.py wrote (pretrain/, train/, val/)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    val = load_labelled(f"{args.root}/val/*.tar", "val", INPUT)
    for name, parts in (("train", ["train"]), ("train + pretrain", ["train", "pretrain"])):
        sets = [load_labelled(f"{args.root}/{part}/*.tar", part, INPUT) for part in parts]
        train = torch.cat([s[0] for s in sets]), torch.cat([s[1] for s in sets])
        torch.manual_seed(args.seed)
        start = time.time()
        curve = train_and_score(train, val, args.epochs)
        print(
            f"{name} ({len(train[1])} labels), {args.epochs} epochs: val top-1 "
            f"{' / '.join(f'{x:.1f}' for x in curve)} % ({time.time() - start:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
