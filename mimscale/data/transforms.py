"""Image transforms driven by an explicit numpy Generator, so augmentation depends only on (seed, epoch, sample).

torchvision's RandomResizedCrop draws from torch's global RNG, which differs per worker and per resume; here
the crop box is sampled with the same algorithm from the generator the stream seeds per sample. JPEGs are
decoded with PIL's draft mode (DCT scaling) at the smallest scale that still covers the crop at full output
resolution, which makes decode + crop cheaper than a plain full-size decode.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from mimscale.data.images import BadImage, open_image, to_rgb


def sample_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters (left, top, crop_width, crop_height), torchvision's algorithm."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1)), crop_w, crop_h
    in_ratio = width / height  # fallback: the largest centred crop within the ratio range
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_w, crop_h = int(round(height * ratio[1])), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def _decode_for_box(payload: bytes, box: tuple[int, int, int, int] | None, out_size: int, rng_box=None):
    """Open, draft-decode and convert to RGB; returns the image and the box rescaled to the decoded size."""
    image = open_image(payload)
    try:
        width, height = image.size
        if box is None:
            box = rng_box(width, height)
        left, top, crop_w, crop_h = box
        if image.format == "JPEG":
            factor = out_size / max(1, min(crop_w, crop_h))
            image.draft(None, (max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))))
        image = to_rgb(image)
        image.load()
    except BadImage:
        raise
    except Exception as err:  # truncated data, broken headers: PIL raises many types
        raise BadImage("undecodable", f"{type(err).__name__}: {err}") from err
    sx, sy = image.size[0] / width, image.size[1] / height
    return image, (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)


def train_transform(
    payload: bytes,
    *,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Decode + RandomResizedCrop + horizontal flip; returns uint8 HWC [size, size, 3]."""
    image, box = _decode_for_box(
        payload, None, size, rng_box=lambda w, h: sample_crop_box(w, h, tuple(scale), tuple(ratio), rng)
    )
    flip = rng.random() < hflip
    image = image.resize((size, size), Image.BILINEAR, box=box)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(image)


def eval_transform(payload: bytes, *, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Decode + resize the shorter side to size/crop_fraction + centre crop; returns uint8 HWC."""

    def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
        side = min(width, height) * crop_fraction
        crop_w, crop_h = max(1, round(side)), max(1, round(side))
        return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h

    image, box = _decode_for_box(payload, None, size, rng_box=centre_box)
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=box))


def normalise_batch(images: list[np.ndarray], mean: list[float], std: list[float]) -> torch.Tensor:
    """Stack uint8 HWC images into a float32 [B,3,S,S] tensor normalised per channel."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return batch.sub_(mean_t).div_(std_t).contiguous()
