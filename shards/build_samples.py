"""Build the committed sample shard sets from images that ship inside Python packages (no downloads).

    python shards/build_samples.py [--out shards]

Writes (deterministically; re-running reproduces the same bytes):
  sample/      training shards: random crops of scikit-image's sample photos, labelled by source photo
  sample-val/  a held-out set made the same way with another crop seed (kNN evaluation)
  digits/      scikit-learn digits upscaled to 32 px png, train-*.tar / val-*.tar (probes)
Each folder gets classes.json and a manifest.json with the member index the training stream seeks with.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from mimscale.shards.images import encode, to_rgb
from mimscale.shards.writer import image_size_stats, write_manifest, write_shard

PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
TRAIN_SHARD_SIZES = (120, 104, 88, 72)  # uneven on purpose: the stream must not assume equal shards
VAL_SHARD_SIZES = (72, 56)
CROP_SIDE = 96


def load_photos() -> dict[str, Image.Image]:
    """The skimage sample photos that load offline, as PIL images (grayscale ones stay mode L)."""
    import skimage.data

    photos = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PHOTOS:
            try:
                array = getattr(skimage.data, name)()
            except Exception as err:  # a photo missing from this skimage version is skipped, not fatal
                print(f"skipping skimage.data.{name}: {err}", file=sys.stderr)
                continue
            image = Image.fromarray(array)
            photos[name] = image if image.mode == "L" else to_rgb(image)
    return photos


def random_crop(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[int]]:
    """A random box (aspect 3:4 to 4:3, 25-100 % of the shorter side) resized so its shorter side is 96 px."""
    width, height = image.size
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    short = int(rng.uniform(0.25, 1.0) * min(width, height))
    box_w, box_h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
    box_w, box_h = min(box_w, width), min(box_h, height)
    left, top = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
    box = [left, top, left + box_w, top + box_h]
    scale = CROP_SIDE / min(box_w, box_h)
    size = (max(CROP_SIDE, round(box_w * scale)), max(CROP_SIDE, round(box_h * scale)))
    return image.resize(size, Image.BICUBIC, box=tuple(box)), box


def build_photo_set(out: Path, photos: dict[str, Image.Image], shard_sizes: tuple[int, ...], seed: int, prefix: str):
    """Crops labelled by source photo, classes balanced, order shuffled, split over uneven shards."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    total = sum(shard_sizes)
    labels = rng.permutation(np.arange(total) % len(names))
    samples, sizes = [], []
    for number, label in enumerate(labels):
        name = names[int(label)]
        crop, box = random_crop(photos[name], rng)
        meta = {"source": f"skimage.data.{name}", "box": box, "mode": photos[name].mode}
        members = {
            "jpg": encode(crop, "jpg", quality=85),
            "cls": str(int(label)).encode(),
            "json": json.dumps(meta).encode(),
        }
        samples.append((f"{prefix}{seed:02d}{number:05d}", members))
        sizes.append(crop.size)
    entries, start = [], 0
    for shard_number, count in enumerate(shard_sizes):
        entries.append(write_shard(out / f"{prefix}-{shard_number:03d}.tar", samples[start : start + count]))
        start += count
    (out / "classes.json").write_text(json.dumps(names, indent=1) + "\n")
    write_manifest(out, entries, **_extra(names, sizes))


def build_digits(out: Path, seed: int = 0, train_count: int = 600, val_count: int = 240):
    """scikit-learn digits upscaled to 32 px grayscale png, shuffled, split into train-*.tar and val-*.tar."""
    from sklearn.datasets import load_digits

    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))[: train_count + val_count]
    samples, sizes = [], []
    for row in order:
        pixels = (digits.images[row] * (255.0 / 16.0)).round().astype(np.uint8)
        image = Image.fromarray(pixels, "L").resize((32, 32), Image.BILINEAR)
        members = {"png": encode(image, "png"), "cls": str(int(digits.target[row])).encode()}
        samples.append((f"digit{int(row):05d}", members))
        sizes.append(image.size)
    train, val = samples[:train_count], samples[train_count:]
    half = (len(train) + 1) // 2
    entries = [
        write_shard(out / "train-000.tar", train[:half]),
        write_shard(out / "train-001.tar", train[half:]),
        write_shard(out / "val-000.tar", val),
    ]
    names = [str(d) for d in range(10)]
    (out / "classes.json").write_text(json.dumps(names) + "\n")
    write_manifest(out, entries, **_extra(names, sizes))


def _extra(names: list[str], sizes: list[tuple[int, int]]) -> dict:
    return {
        "command": "python shards/build_samples.py",
        "classes": names,
        "image_stats": image_size_stats(sizes),
        "rejects": {"count": 0, "by_reason": {}, "items": []},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for the shard sets")
    args = parser.parse_args(argv)
    out = Path(args.out)
    photos = load_photos()
    build_photo_set(out / "sample", photos, TRAIN_SHARD_SIZES, seed=0, prefix="sample")
    build_photo_set(out / "sample-val", photos, VAL_SHARD_SIZES, seed=1, prefix="val")
    build_digits(out / "digits")
    total = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    print(f"wrote sample, sample-val and digits shard sets under {out} ({total / 1e6:.2f} MB in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
