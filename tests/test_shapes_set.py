"""shards/build_shapes.py: the procedural textured-shapes set of bench_claims' `--scale shapes` (issue 22.4)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from mimscale.cli import main as cli_main
from mimscale.pipeline.stream import iter_eval_batches

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "shards"))
from build_shapes import SHAPES, build_shapes, shape_mask  # noqa: E402


def _images_and_labels(pattern: str) -> tuple[np.ndarray, np.ndarray]:
    batches = list(iter_eval_batches(pattern, image_size=32, batch_size=128, mean=(0, 0, 0), std=(1, 1, 1)))
    images = np.concatenate([b[0].numpy() for b in batches])
    return images, np.concatenate([b[1].numpy() for b in batches])


def test_shapes_repeat_byte_for_byte_verify_and_balance_classes(tmp_path: Path) -> None:
    first = build_shapes(tmp_path / "a", pretrain=0, train=120, val=60, seed=3)
    again = build_shapes(tmp_path / "b", pretrain=0, train=120, val=60, seed=3)
    other = build_shapes(tmp_path / "c", pretrain=0, train=120, val=0, seed=4)
    for split in ("train", "val"):
        shards = json.loads((first / split / "manifest.json").read_text())["shards"]
        assert shards == json.loads((again / split / "manifest.json").read_text())["shards"]
        assert cli_main(["shards", "verify", str(first / split)]) == 0
    sha = json.loads((first / "train" / "manifest.json").read_text())["shards"][0]["sha256"]
    assert sha != json.loads((other / "train" / "manifest.json").read_text())["shards"][0]["sha256"]
    assert not (other / "val").exists() and not (first / "pretrain").exists()
    images, labels = _images_and_labels(str(first / "train" / "*.tar"))
    assert images.shape == (120, 3, 32, 32) and np.bincount(labels).tolist() == [12] * len(SHAPES)
    assert json.loads((first / "train" / "classes.json").read_text()) == list(SHAPES)


def test_every_shape_draws_a_distinct_mask() -> None:
    masks = {kind: shape_mask(kind, np.random.default_rng(0)) for kind in SHAPES}
    for kind, mask in masks.items():
        assert 150 < mask.sum() < 64 * 64 / 2, kind  # visible, and not the whole canvas
    flat = [m.ravel() for m in masks.values()]
    assert min((a != b).mean() for i, a in enumerate(flat) for b in flat[i + 1 :]) > 0.02


def test_only_the_outline_carries_the_label(tmp_path: Path) -> None:
    """Colours and textures are drawn independently of the class: a logistic regression on each image's colour
    statistics (mean and std per channel) or on its pixels (4x4 averages) stays near chance (10 %), while the set's classes are
    told apart by shape (bench/RESULTS.md: a ViT fine-tuned from scratch on the 1000 labelled images)."""
    root = build_shapes(tmp_path, pretrain=0, train=600, val=300, seed=0)
    (train_x, train_y), (val_x, val_y) = (_images_and_labels(str(root / s / "*.tar")) for s in ("train", "val"))

    def colour_stats(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1)

    def pixels(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), 3, 8, 4, 8, 4).mean(axis=(3, 5)).reshape(len(x), -1)

    for features in (colour_stats, pixels):
        model = LogisticRegression(max_iter=500).fit(features(train_x), train_y)
        assert model.score(features(val_x), val_y) < 0.2
