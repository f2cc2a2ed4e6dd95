"""Image transforms driven by an explicit numpy Generator, so augmentation depends only on (seed, epoch, sample).

torchvision's RandomResizedCrop draws from torch's global RNG, which differs per worker and per resume; here
the crop box is sampled with the same algorithm from the generator the stream seeds per sample. A JPEG whose
crop is at least twice the output is decoded by PIL in draft mode (DCT scaling), which is cheaper than a full
decode; other JPEGs go through torchvision's libjpeg-turbo decoder; the resize is torch's antialiased uint8
bilinear kernel (same pixels as PIL's, about twice as fast).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

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


def _jpeg_tensor(payload: bytes) -> torch.Tensor:
    """libjpeg-turbo through torchvision: ~15 % faster than PIL and straight to CHW; raises on truncated data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return decode_jpeg(torch.frombuffer(payload, dtype=torch.uint8), mode=ImageReadMode.RGB)


def _decode_for_box(payload: bytes, out_size: int, choose_box) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Decode to uint8 CHW RGB at the cheapest scale that still covers the crop; returns pixels and the box.

    JPEGs whose crop is at least twice the output are decoded by PIL in draft mode (DCT scaling to 1/2..1/8);
    other JPEGs by torchvision's decoder; everything else by PIL (any mode, converted to RGB).
    """
    image = open_image(payload)
    try:
        width, height = image.size
        left, top, crop_w, crop_h = choose_box(width, height)
        factor = out_size / max(1, min(crop_w, crop_h))
        if image.format == "JPEG" and factor > 0.5 and image.mode in ("RGB", "L", "CMYK"):
            pixels = _jpeg_tensor(payload)
        else:
            if image.format == "JPEG":
                image.draft(None, (max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))))
            with warnings.catch_warnings():  # PIL's buffer is read-only; pixels are only read (resize copies)
                warnings.simplefilter("ignore", UserWarning)
                pixels = torch.from_numpy(np.asarray(to_rgb(image))).permute(2, 0, 1)
    except BadImage:
        raise
    except Exception as err:  # truncated data, broken headers: PIL and torchvision raise many types
        raise BadImage("undecodable", f"{type(err).__name__}: {err}") from err
    sx, sy = pixels.shape[2] / width, pixels.shape[1] / height
    x0, y0 = int(left * sx), int(top * sy)
    x1, y1 = max(x0 + 1, round((left + crop_w) * sx)), max(y0 + 1, round((top + crop_h) * sy))
    return pixels, (x0, y0, x1, y1)


def _resize_crop(pixels: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop and resize to size x size with antialiased bilinear (torch's uint8 kernel: PIL quality, ~2x faster)."""
    x0, y0, x1, y1 = box
    crop = pixels[:, y0:y1, x0:x1].unsqueeze(0)
    if crop.shape[-2:] == (size, size):
        return crop[0]
    crop = crop.contiguous(memory_format=torch.channels_last)  # the fast layout for the uint8 kernel
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def train_transform(
    payload: bytes,
    *,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Decode + RandomResizedCrop + horizontal flip; returns uint8 CHW [3, size, size]."""
    pixels, box = _decode_for_box(payload, size, lambda w, h: sample_crop_box(w, h, tuple(scale), tuple(ratio), rng))
    image = _resize_crop(pixels, box, size)
    return image.flip(-1) if rng.random() < hflip else image


def eval_transform(payload: bytes, *, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """Decode + resize the shorter side to size/crop_fraction + centre crop; returns uint8 CHW."""

    def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
        side = max(1, round(min(width, height) * crop_fraction))
        return (width - side) // 2, (height - side) // 2, side, side

    pixels, box = _decode_for_box(payload, size, centre_box)
    return _resize_crop(pixels, box, size)


def normalise_batch(images: list[torch.Tensor], mean: list[float], std: list[float]) -> torch.Tensor:
    """Stack uint8 CHW images into a float32 [B,3,S,S] tensor normalised per channel (two passes in all)."""
    batch = torch.empty((len(images), *images[0].shape), dtype=torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    scale, shift = 1.0 / (255.0 * std_t), torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t
    for row, image in zip(batch, images, strict=True):
        torch.mul(image, scale, out=row)
    return batch.sub_(shift)
