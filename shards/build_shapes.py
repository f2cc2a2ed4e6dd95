"""Textured shapes under occlusion: a procedural 10-class set harder than the digits (issue 22.4), made on demand.

    python shards/build_shapes.py OUT [--pretrain 4800 --train 1000 --val 500 --seed 0]

The class is the outline of one shape (disk, square, triangle, star, plus, ring, half disk, L, two bars,
chevron), drawn at a random place, size and rotation. Everything else is drawn independently of the class, so it
carries no label: the shape's fill and the background are random textures (stripes at any angle, checks, smooth
noise, dots) in random colours, and 0-2 textured boxes occlude parts of the image. Drawn at 64 px and reduced
to 32 px RGB png (box filter), like the digits' size. Written as three labelled WebDataset sets with manifests
(`mimscale shards create`'s layout): OUT/pretrain (for label-free pretraining), OUT/train and OUT/val (fine-tuning
and probes); the same seed writes the same bytes.

Why: converged fine-tuning from scratch reaches ~97 % on the 240 val digits (bench/RESULTS.md, Claims, fifth run),
so the digits cannot separate pretraining methods by fine-tuning accuracy; here a shape has to be told from its
texture, its occluders and the background, and the labelled set is small next to the unlabelled one, the setting
MIM pretraining is for. It is hard: on the 2-core CPU a 4-block ViT-Tiny trained on the 1000 labels for 20 epochs,
and a 300-step SimMIM fine-tuned 600 steps, both stayed near chance (10.6 % and 14.2 %), so
`bench_claims.py --scale shapes` has GPU-sized steps. It is learnable: a small CNN (bench/bench_shapes_learnable.py)
reached 46.4 % on the 1000 train labels and 97.4 % on the 5800 labels of train + pretrain in 30 epochs (RESULTS,
Claims, fifth run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mimscale.shards.images import encode
from mimscale.shards.writer import image_size_stats, write_manifest, write_shard

SHAPES = ("disk", "square", "triangle", "star", "plus", "ring", "half_disk", "ell", "two_bars", "chevron")
DRAW_SIDE, SIDE = 64, 32
SHARD_SIZE = 1000
MIN_CONTRAST = 0.35  # RGB distance between the mean colours of shape and background: the outline stays visible
TEXTURE_SPREAD = 0.3  # how far a texture's second colour may be from its first, per channel
OCCLUDERS = (0.4, 0.4, 0.2)  # probability of 0, 1, 2 occluding boxes


def _rotated(points: list[tuple[float, float]], centre: tuple[float, float], radius: float, angle: float):
    """Unit-shape ``points`` scaled by ``radius``, rotated by ``angle`` and moved to ``centre``."""
    cos, sin = math.cos(angle), math.sin(angle)
    return [(centre[0] + radius * (x * cos - y * sin), centre[1] + radius * (x * sin + y * cos)) for x, y in points]


def _regular(corners: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (math.cos(start + 2 * math.pi * k / corners), math.sin(start + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5), _regular(5, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, [(0.45 * x, 0.45 * y) for x, y in inner], strict=True) for p in pair]


POLYGONS = {  # unit shapes (radius 1) drawn as one or more polygons
    "square": [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]],
    "triangle": [_regular(3)],
    "star": [_star()],
    "plus": [[(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)], [(-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)]],
    "ell": [[(-0.7, -1), (-0.15, -1), (-0.15, 0.45), (0.8, 0.45), (0.8, 1), (-0.7, 1)]],
    "two_bars": [[(-1, -0.75), (1, -0.75), (1, -0.25), (-1, -0.25)], [(-1, 0.25), (1, 0.25), (1, 0.75), (-1, 0.75)]],
    "chevron": [[(-1, -0.7), (-0.55, -0.7), (0.15, 0.1), (0.85, -0.7), (1.3, -0.7), (0.15, 0.9)]],
}


def shape_mask(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A [64, 64] bool mask of one shape of ``kind`` at a random centre, radius (16-26 px) and rotation."""
    centre = (float(rng.uniform(22, 42)), float(rng.uniform(22, 42)))
    radius, angle = float(rng.uniform(16, 26)), float(rng.uniform(0, 2 * math.pi))
    canvas = Image.new("L", (DRAW_SIDE, DRAW_SIDE), 0)
    draw = ImageDraw.Draw(canvas)

    def circle(scale: float, fill: int, offset=(0.0, 0.0)) -> None:
        x, y, r = centre[0] + offset[0] * radius, centre[1] + offset[1] * radius, radius * scale
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    if kind == "disk":
        circle(0.9, 255)
    elif kind == "ring":
        circle(1.0, 255)
        circle(0.55, 0)
    elif kind == "half_disk":
        box = [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius]
        start = math.degrees(angle)
        draw.pieslice(box, start, start + 180, fill=255)
    else:
        for polygon in POLYGONS[kind]:
            draw.polygon(_rotated(polygon, centre, radius, angle), fill=255)
    return np.asarray(canvas) > 127


def texture(rng: np.random.Generator, colours: np.ndarray) -> np.ndarray:
    """A [64, 64, 3] float texture in [0, 1] mixing two ``colours``: stripes, checks, smooth noise or dots."""
    yy, xx = np.mgrid[0:DRAW_SIDE, 0:DRAW_SIDE].astype(np.float32)
    kind = int(rng.integers(4))
    if kind == 0:  # stripes at any angle
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 12)
        mix = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    elif kind == 1:  # checks
        cell = int(rng.integers(4, 11))
        mix = ((xx // cell + yy // cell) % 2).astype(np.float32)
    elif kind == 2:  # smooth noise
        coarse = rng.uniform(0, 1, (int(rng.integers(3, 9)),) * 2).astype(np.float32)
        mix = np.asarray(Image.fromarray(coarse, "F").resize((DRAW_SIDE, DRAW_SIDE), Image.BICUBIC)).clip(0, 1)
    else:  # dots on a jittered grid
        spacing = rng.uniform(6, 12)
        phase = rng.uniform(0, spacing, 2)
        dx, dy = (xx + phase[0]) % spacing - spacing / 2, (yy + phase[1]) % spacing - spacing / 2
        mix = (dx**2 + dy**2 < (spacing * rng.uniform(0.2, 0.4)) ** 2).astype(np.float32)
    return colours[0] * (1 - mix[..., None]) + colours[1] * mix[..., None]


def colour_pair(rng: np.random.Generator) -> np.ndarray:
    """A random colour and a second one near it (each channel within TEXTURE_SPREAD): a visible, not loud texture."""
    first = rng.uniform(0, 1, 3)
    return np.stack([first, (first + rng.uniform(-TEXTURE_SPREAD, TEXTURE_SPREAD, 3)).clip(0, 1)])


def contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colour pairs (shape, background) whose means are at least MIN_CONTRAST apart."""
    while True:
        shape, background = colour_pair(rng), colour_pair(rng)
        if np.linalg.norm(shape.mean(0) - background.mean(0)) >= MIN_CONTRAST:
            return shape, background


def render(label: int, rng: np.random.Generator) -> Image.Image:
    """One 32-px RGB image of shape ``label`` on a textured background, with 0-2 textured occluding boxes."""
    mask = shape_mask(SHAPES[label], rng)[..., None]
    shape_colours, background_colours = contrasting_colours(rng)
    pixels = np.where(mask, texture(rng, shape_colours), texture(rng, background_colours))
    for _ in range(int(rng.choice(len(OCCLUDERS), p=OCCLUDERS))):
        width, height = rng.integers(6, 17, 2)
        left, top = rng.integers(0, DRAW_SIDE - width), rng.integers(0, DRAW_SIDE - height)
        box = texture(rng, colour_pair(rng))
        pixels[top : top + height, left : left + width] = box[top : top + height, left : left + width]
    image = Image.fromarray((pixels * 255).round().astype(np.uint8), "RGB")
    return image.resize((SIDE, SIDE), Image.BOX)


def build_split(out: Path, name: str, count: int, seed: int) -> None:
    """``count`` images, classes balanced and shuffled, in shards of SHARD_SIZE, with classes.json and a manifest."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(SHAPES))
    samples = []
    for number, label in enumerate(labels):
        members = {"png": encode(render(int(label), rng), "png"), "cls": str(int(label)).encode()}
        samples.append((f"{name}{seed:03d}{number:06d}", members))
    entries = [
        write_shard(out / f"{name}-{start // SHARD_SIZE:03d}.tar", samples[start : start + SHARD_SIZE])
        for start in range(0, count, SHARD_SIZE)
    ]
    (out / "classes.json").write_text(json.dumps(list(SHAPES)) + "\n")
    write_manifest(
        out,
        entries,
        command="python shards/build_shapes.py",
        classes=list(SHAPES),
        image_stats=image_size_stats([(SIDE, SIDE)] * count),
        rejects={"count": 0, "by_reason": {}, "items": []},
    )


def build_shapes(out: Path, pretrain: int = 4800, train: int = 1000, val: int = 500, seed: int = 0) -> Path:
    """The three sets under ``out`` (each from its own seed); a set whose manifest exists is kept as it is."""
    for offset, (name, count) in enumerate((("pretrain", pretrain), ("train", train), ("val", val))):
        if count and not (out / name / "manifest.json").is_file():
            build_split(out / name, name, count, seed * 10 + offset)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for pretrain/, train/ and val/")
    parser.add_argument("--pretrain", type=int, default=4800, help="unlabelled-use images (default 4800)")
    parser.add_argument("--train", type=int, default=1000, help="labelled training images (default 1000)")
    parser.add_argument("--val", type=int, default=500, help="validation images (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.pretrain, args.train, args.val) < 0:
        parser.error("image counts must be >= 0")
    out = build_shapes(Path(args.out), args.pretrain, args.train, args.val, args.seed)
    print(f"wrote {args.pretrain} / {args.train} / {args.val} shape images under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
