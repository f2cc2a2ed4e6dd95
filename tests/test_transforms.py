"""The worker-side transforms: batch assembly with the flip folded in, and uint8 + device normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.pipeline.transforms import normalise_batch, normalise_on_device, stack_uint8, train_crop, train_transform

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def photo_jpeg(width: int = 120, height: int = 90) -> bytes:
    """A JPEG with structure in every direction, so a missed or doubled flip changes pixels."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 2 % 256, y * 3 % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=95)
    return out.getvalue()


def reference_normalise(images: torch.Tensor) -> torch.Tensor:
    """The textbook formula, in float64: (x / 255 - mean) / std."""
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    return (images.double() / 255.0 - mean.view(3, 1, 1)) / std.view(3, 1, 1)


def crops(count: int, size: int = 48) -> tuple[list[torch.Tensor], list[bool]]:
    images, flips = [], []
    for seed in range(count):
        image, flip = train_crop(
            photo_jpeg(), size=size, scale=(0.3, 1.0), ratio=(0.75, 1.333), hflip=0.5, rng=np.random.default_rng(seed)
        )
        images.append(image)
        flips.append(flip)
    return images, flips


def test_train_crop_and_transform_draw_the_same_randomness():
    images, flips = crops(8)
    assert any(flips) and not all(flips)  # both branches are exercised
    for seed, (image, flip) in enumerate(zip(images, flips, strict=True)):
        whole = train_transform(
            photo_jpeg(), size=48, scale=(0.3, 1.0), ratio=(0.75, 1.333), hflip=0.5, rng=np.random.default_rng(seed)
        )
        assert torch.equal(whole, image.flip(-1) if flip else image)


def test_stack_uint8_applies_exactly_the_marked_flips_and_is_contiguous():
    images, flips = crops(6)
    batch = stack_uint8(images, flips)
    assert batch.dtype == torch.uint8 and batch.shape == (6, 3, 48, 48) and batch.is_contiguous()
    for row, image, flip in zip(batch, images, flips, strict=True):
        assert torch.equal(row, image.flip(-1) if flip else image)
        assert not torch.equal(image.flip(-1), image)  # the test image is not mirror-symmetric
    assert torch.equal(stack_uint8(images), torch.stack(images))


def test_normalise_batch_matches_the_textbook_formula():
    images, _ = crops(4)
    got = normalise_batch(images, MEAN, STD)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.allclose(got.double(), reference_normalise(torch.stack(images)), atol=1e-6)
    assert torch.equal(normalise_batch(torch.stack(images), MEAN, STD), got)


def test_normalise_on_device_equals_worker_normalisation_and_casts_last():
    images, flips = crops(4)
    pixels = stack_uint8(images, flips)
    flipped = [image.flip(-1) if flip else image for image, flip in zip(images, flips, strict=True)]
    worker = normalise_batch(flipped, MEAN, STD)
    device = normalise_on_device(pixels, MEAN, STD, torch.float32)
    assert device.dtype == torch.float32 and (device - worker).abs().max() <= 1e-6
    assert torch.allclose(device.double(), reference_normalise(pixels), atol=1e-6)
    half = normalise_on_device(pixels, MEAN, STD, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, worker.to(torch.bfloat16))
    assert pixels.dtype == torch.uint8  # the input is left alone
    with pytest.raises(TypeError, match="uint8"):
        normalise_on_device(worker, MEAN, STD)
