"""Decoding any image PIL can read into 8-bit RGB, the one mode the rest of the pipeline handles.

Grayscale, palette (with or without transparency), CMYK, 16-bit and float images, alpha channels (composited
on white, so transparent logos do not turn black) and EXIF rotations are all normalised here, once.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

FORMAT_NAMES = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


class BadImage(ValueError):
    """An input image is unusable; ``reason`` is a short category for reject counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    array = np.asarray(image)
    if image.mode == "F":
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(np.nan_to_num(scaled).clip(0, 255).astype(np.uint8), "L")
    peak = 65535 if array.max(initial=0) > 255 else 255
    return Image.fromarray((array.astype(np.float64) * (255.0 / peak)).round().clip(0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on white, 16-bit/float rescaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _high_bit_depth_to_8bit(image)
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def open_image(payload: bytes) -> Image.Image:
    """Open (lazily) an encoded image; BadImage if PIL cannot identify it."""
    try:
        return Image.open(io.BytesIO(payload))
    except Image.DecompressionBombError as err:
        raise BadImage("too_many_pixels", str(err)) from err
    except Exception as err:  # PIL raises many types for garbage input
        raise BadImage("undecodable", f"{type(err).__name__}: {err}") from err


def decode_rgb(payload: bytes, exif: bool = True) -> Image.Image:
    """Fully decode an image to RGB (EXIF orientation applied); BadImage on any decoding failure."""
    image = open_image(payload)
    try:
        image.load()
        if exif:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except BadImage:
        raise
    except Exception as err:
        raise BadImage("undecodable", f"{type(err).__name__}: {err}") from err


def encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """Encode an RGB image as jpg, png or webp."""
    out = io.BytesIO()
    name = FORMAT_NAMES[fmt]
    if name == "PNG":
        image.save(out, format=name, optimize=False, compress_level=6)
    else:
        image.save(out, format=name, quality=quality)
    return out.getvalue()
