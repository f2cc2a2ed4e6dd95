"""Image transforms driven by an explicit numpy Generator, so augmentation depends only on (seed, epoch, sample).

torchvision's RandomResizedCrop draws from torch's global RNG, which differs per worker and per resume; here
the crop box is sampled with the same algorithm from the generator the stream seeds per sample. A JPEG whose
crop is at least twice the output is decoded by PIL in draft mode (DCT scaling), which is cheaper than a full
decode; other JPEGs go through torchvision's libjpeg-turbo decoder; the resize is torch's antialiased uint8
bilinear kernel (same pixels as PIL's, about twice as fast). The resize leaves pixels channels-last (HWC in
memory); the batch is assembled with one numpy copy per image that also applies the flip, and normalisation
runs over the contiguous uint8 batch (elementwise ops on strided channels-last images cost 5x more), or on the
device through ``normalise_on_device`` (4x fewer bytes to pin and transfer).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from mimscale.pipeline.device_decode import DeferredCrop, device_decodable
from mimscale.shards.images import BadImage, open_image, to_rgb


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


def train_crop(
    payload: bytes,
    *,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    rng: np.random.Generator,
    defer: bool = False,
) -> tuple[torch.Tensor | DeferredCrop, bool]:
    """Decode + RandomResizedCrop; returns (uint8 [3, size, size], flip?) so the flip can ride on the batch copy.

    Draws from ``rng`` in the same order as ``train_transform`` (crop box, then flip), so both give the same pixels.
    ``defer`` (``data.decode: device``): a JPEG the GPU decoder takes is not decoded here but returned as a
    DeferredCrop with the same crop box and flip, drawn from the header's size, so the sample's randomness (and
    the mask drawn after) do not depend on where it is decoded; the main process decodes, crops and resizes it
    (``mimscale.pipeline.device_decode``).
    """
    dims = device_decodable(payload) if defer else None
    if dims is not None:
        box = sample_crop_box(dims[0], dims[1], tuple(scale), tuple(ratio), rng)
        return DeferredCrop(payload, box), bool(rng.random() < hflip)
    pixels, box = _decode_for_box(payload, size, lambda w, h: sample_crop_box(w, h, tuple(scale), tuple(ratio), rng))
    return _resize_crop(pixels, box, size), bool(rng.random() < hflip)


def train_transform(payload: bytes, **crop: Any) -> torch.Tensor:
    """Decode + RandomResizedCrop + horizontal flip; returns uint8 CHW [3, size, size] (``train_crop``'s keywords)."""
    image, flip = train_crop(payload, **crop)
    return image.flip(-1) if flip else image


def eval_transform(payload: bytes, *, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """Decode + resize the shorter side to size/crop_fraction + centre crop; returns uint8 CHW."""

    def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
        side = max(1, round(min(width, height) * crop_fraction))
        return (width - side) // 2, (height - side) // 2, side, side

    pixels, box = _decode_for_box(payload, size, centre_box)
    return _resize_crop(pixels, box, size)


def write_chw(out: np.ndarray, image: torch.Tensor, flip: bool = False) -> None:
    """Copy a uint8 CHW image of any layout into the contiguous [3,S,S] slot ``out``, mirrored if ``flip``.

    numpy views take negative strides, so the flip costs nothing on top of this one copy (a torch flip is a
    second copy, ~0.05 ms per 224-px image). The stream calls it right after each resize, while the image is
    still in cache (stacking a batch afterwards costs twice as much).
    """
    hwc = image.permute(1, 2, 0).numpy()
    np.copyto(out, (hwc[:, ::-1] if flip else hwc).transpose(2, 0, 1))


def stack_uint8(images: list[torch.Tensor], flips: list[bool] | None = None) -> torch.Tensor:
    """Contiguous uint8 [B,3,S,S] from CHW images of any layout, flipping the marked ones horizontally."""
    batch = torch.empty((len(images), *images[0].shape), dtype=torch.uint8)
    rows = batch.numpy()
    for number, image in enumerate(images):
        write_chw(rows[number], image, flips is not None and flips[number])
    return batch


_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std_constants(
    mean: list[float], std: list[float], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (scale, shift) with x_norm = x_uint8 * scale - shift; one definition so every path gives equal bits.

    Made once per (mean, std, device) and cached: a fresh host tensor copied to the GPU on every batch is a
    blocking copy from pageable memory, i.e. a host sync per micro-batch.
    """
    key = (tuple(float(v) for v in mean), tuple(float(v) for v in std), str(torch.device(device)))
    if key not in _CONSTANTS:
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        scale, shift = 1.0 / (255.0 * std_t), torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t
        _CONSTANTS[key] = (scale.to(device), shift.to(device))
    return _CONSTANTS[key]


def normalise_on_device(
    images_uint8: torch.Tensor, mean: list[float], std: list[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalise a uint8 [B,3,S,S] (or [3,S,S]) batch where it lives (the GPU), then cast to ``dtype``.

    The arithmetic is the worker path's in float32 (exact uint8 conversion, one multiply, one subtract, each
    IEEE-rounded), so a float32 result equals ``build_train_loader(..., normalise_on_device=False)``'s ``image``
    (only a compiler that fuses the two into an FMA could move the last bit); the cast to bf16/fp16 comes last
    so it rounds once.
    """
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"normalise_on_device expects uint8 images, got {images_uint8.dtype}")
    scale, shift = _mean_std_constants(mean, std, images_uint8.device)
    out = images_uint8.to(torch.float32).mul_(scale).sub_(shift)
    return out if dtype == torch.float32 else out.to(dtype)


def normalise_batch(images: list[torch.Tensor] | torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """float32 [B,3,S,S] normalised per channel, from uint8 CHW images (a list, or an already stacked batch)."""
    batch = stack_uint8(images) if isinstance(images, list) else images
    return normalise_on_device(batch, mean, std)
