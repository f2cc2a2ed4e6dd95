"""``data.decode: device``: workers hand over encoded JPEG bytes; the main process decodes them on the GPU.

Split of the work, so that order, randomness and resume are exactly the worker path's:

* **Worker** (``DeferredRows``, filled by the stream): reads the bytes, reads the JPEG header, draws the crop
  box, the flip and the mask from the sample's generator in the same order as ``train_crop`` (box, flip, mask),
  and packs the bytes of every row it defers into one uint8 tensor (one shared-memory transfer per batch). Rows
  the hardware decoder cannot take (progressive or CMYK JPEGs, PNG, WebP, anything without an end-of-image
  marker) are decoded in the worker as before and travel as pixels in ``image``.
* **Main process** (``DeviceDecoder``): decodes the deferred rows in one batched call, crops, resizes
  (antialiased bilinear, rounded back to uint8, so every row has the worker path's value range and the engine's
  ``normalise_on_device`` follows unchanged) and flips them on the device. A failing batch is retried image by
  image; an image that still fails is a corrupt sample (counted, its slot filled with the next good row of the
  batch, so one bad image never fails a step).

Decoder: ``torchcodec.decoders.decode_jpeg`` (batched nvJPEG; torchcodec is where torchvision's CUDA decoder
moved: torchvision 0.29 deprecates ``decode_jpeg(device="cuda")``, which serialises every caller on one global
decoder, and torchcodec keeps several per GPU), with ``torchvision.io.decode_jpeg`` as the fallback when
torchcodec is not installed. Both are asked for ``mode=RGB`` (grayscale JPEGs come back with 3 channels).
On CUDA the decode runs on a dedicated stream in a producer thread one batch ahead, synchronising that stream
before each decode (nvJPEG's hardware path can write output memory before earlier work on the stream has
finished with it: silent corruption reported on H100), and the consumer's stream waits on an event. Without a
GPU the same code (thread included) runs on the CPU (libjpeg-turbo), which is what the tests compare with the worker
path.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mimscale.shards.images import BadImage, open_image

ENCODED_KEYS = ("encoded", "encoded_offsets", "deferred_rows", "crop_box", "flip")


@dataclass(frozen=True)
class DeferredCrop:
    """A row the main process decodes: the encoded bytes and the crop box (left, top, width, height) in pixels."""

    payload: bytes
    box: tuple[int, int, int, int]


def device_decodable(payload: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG the hardware decoder takes (baseline, RGB/grayscale, complete), else None.

    Reads the header only. Progressive and CMYK JPEGs are not on nvJPEG's hardware path (and CMYK is CPU-only
    in torchvision), PNG/WebP are not JPEGs, and a JPEG without its end-of-image marker is probably truncated:
    these are decoded in the worker, where a failure replaces the sample exactly as the worker path does.
    """
    try:
        image = open_image(payload)
    except BadImage:
        return None
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or image.info.get("progressive"):
        return None
    if b"\xff\xd9" not in payload[-64:]:
        return None
    return image.size


class DeferredRows:
    """Worker side: collects a batch's deferred rows and packs them into tensors for the trip to the main process."""

    def __init__(self):
        self.rows: list[int] = []
        self.payloads: list[bytes] = []
        self.boxes: list[tuple[int, int, int, int]] = []
        self.flips: list[bool] = []

    def add(self, row: int, crop: DeferredCrop, flip: bool) -> None:
        self.rows.append(row)
        self.payloads.append(crop.payload)
        self.boxes.append(crop.box)
        self.flips.append(flip)

    def fields(self) -> dict[str, torch.Tensor]:
        """``encoded`` (all payloads, concatenated), ``encoded_offsets`` [R+1], ``deferred_rows`` [R],
        ``crop_box`` [R, 4] and ``flip`` [R]: plain tensors, so they share memory and pin like the image."""
        sizes = [len(payload) for payload in self.payloads]
        encoded = torch.empty(sum(sizes), dtype=torch.uint8)
        if sizes:
            np.copyto(encoded.numpy(), np.frombuffer(b"".join(self.payloads), dtype=np.uint8))
        return {
            "encoded": encoded,
            "encoded_offsets": torch.tensor(np.cumsum([0, *sizes]), dtype=torch.int64),
            "deferred_rows": torch.tensor(self.rows, dtype=torch.int64),
            "crop_box": torch.tensor(self.boxes, dtype=torch.int64).reshape(-1, 4),
            "flip": torch.tensor(self.flips, dtype=torch.bool),
        }


def jpeg_backend() -> str:
    """torchcodec when installed with its image decoder (0.12+), else torchvision."""
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401 - 0.11 and older have no image decoders
    except Exception:  # noqa: BLE001 - missing, too old, or built against another torch/CUDA: use torchvision's
        return "torchvision"
    return "torchcodec"


def _decode_jpegs(payloads: list[torch.Tensor], device: torch.device, backend: str) -> list[torch.Tensor]:
    if backend == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return list(decode_jpeg(payloads, mode="RGB", device=device))
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 warns that its CUDA decoder moves to torchcodec
        warnings.simplefilter("ignore")
        decoded = decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)
    return list(decoded) if isinstance(decoded, (list, tuple)) else [decoded]


def resize_crop_on_device(
    pixels: torch.Tensor, box: tuple[int, int, int, int], size: int, out: torch.Tensor, flip: bool = False
) -> None:
    """Write into ``out`` (uint8 [3, size, size]) the crop (left, top, width, height) of a uint8 CHW image, resized
    with antialiased bilinear in float32 (torch's uint8 kernel is CPU-only), rounded, mirrored if ``flip``.

    Few kernels per image (the loop runs once per image of every batch): the +0.5 and the float-to-uint8 copy
    (which truncates) round half up; no clamp is needed, as the triangle filter's weights are non-negative and
    sum to one, so results stay within the input's 0..255.
    """
    left, top, width, height = box
    crop = pixels[:, top : top + height, left : left + width]
    if tuple(crop.shape[-2:]) == (size, size):
        out.copy_(crop.flip(-1) if flip else crop)
        return
    resized = F.interpolate(
        crop.unsqueeze(0).to(torch.float32), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )[0].add_(0.5)
    out.copy_(resized.flip(-1) if flip else resized)


class DeviceDecoder:
    """Main-process side: turns a worker batch with deferred rows into a complete uint8 [B, 3, S, S] on ``device``."""

    def __init__(self, device: torch.device, size: int, backend: str = "auto"):
        self.device, self.size = torch.device(device), size
        self.backend = jpeg_backend() if backend == "auto" else backend
        self.failures = 0
        self._reported = 0
        self._last_error = ""

    def decode_all(self, payloads: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """One batched call; if it fails, image by image (None where an image cannot be decoded)."""
        try:
            return _decode_jpegs(payloads, self.device, self.backend)
        except Exception:  # noqa: BLE001 - one bad image fails the whole batched call
            pass
        decoded = [self._decode_one(payload) for payload in payloads]
        if (
            self.backend == "torchcodec"
            and all(image is None for image in decoded)
            and self._torchvision_works(payloads)
        ):
            return self.decode_all(payloads)
        for image in decoded:
            if image is None:
                self._report(RuntimeError(self._last_error))
        return decoded

    def _decode_one(self, payload: torch.Tensor) -> torch.Tensor | None:
        try:
            return _decode_jpegs([payload], self.device, self.backend)[0]
        except Exception as err:  # noqa: BLE001 - decoders raise many types for corrupt data
            self._last_error = f"{type(err).__name__}: {err}"
            return None

    def _torchvision_works(self, payloads: list[torch.Tensor]) -> bool:
        """torchcodec imported but decodes nothing (e.g. built for another CUDA): switch to torchvision for good
        if it decodes this batch."""
        try:
            _decode_jpegs(payloads, self.device, "torchvision")
        except Exception:  # noqa: BLE001 - then the images themselves are bad: keep torchcodec
            return False
        print(
            f"mimscale data: torchcodec failed on a whole batch ({self._last_error}); decoding with torchvision "
            "from now on",
            file=sys.stderr,
        )
        self.backend = "torchvision"
        return True

    def _report(self, err: Exception) -> None:
        self.failures += 1
        if self._reported < 5:
            print(
                f"mimscale data: device decode failed, replacing the image ({type(err).__name__}: {err})",
                file=sys.stderr,
            )
            self._reported += 1

    def __call__(self, batch: dict) -> dict:
        """The batch with ``image`` complete on the device and the encoded fields removed (a new dict)."""
        out = {key: value for key, value in batch.items() if key not in ENCODED_KEYS}
        images = batch["image"].to(self.device, non_blocking=True)
        if "encoded" not in batch or not len(batch["deferred_rows"]):
            out["image"] = images
            return out
        offsets = batch["encoded_offsets"].tolist()
        encoded = batch["encoded"]
        payloads = [encoded[start:end] for start, end in zip(offsets[:-1], offsets[1:], strict=True)]
        rows, boxes, flips = (batch[key].tolist() for key in ("deferred_rows", "crop_box", "flip"))
        bad = []
        for row, pixels, box, flip in zip(rows, self.decode_all(payloads), boxes, flips, strict=True):
            if pixels is None or not _box_inside(box, pixels):
                if pixels is not None:
                    self._report(ValueError(f"crop box {box} outside the decoded {tuple(pixels.shape)}"))
                bad.append(row)
                continue
            resize_crop_on_device(pixels, tuple(box), self.size, images[row], flip)
        _fill_bad_rows(images, bad)
        out["image"] = images
        return out


def _box_inside(box, pixels: torch.Tensor) -> bool:
    left, top, width, height = box
    return width > 0 and height > 0 and left + width <= pixels.shape[2] and top + height <= pixels.shape[1]


def _fill_bad_rows(images: torch.Tensor, bad: list[int]) -> None:
    """Corrupt rows take the pixels of the next good row (cyclically), like a corrupt sample in the worker path."""
    if not bad:
        return
    good = [row for row in range(len(images)) if row not in set(bad)]
    if not good:
        raise BadImage("undecodable", f"no image of a {len(images)}-image batch could be decoded on {images.device}")
    for row in bad:
        images[row] = images[next((g for g in good if g > row), good[0])]


class DeviceDecodedStream:
    """Wraps a TrainStream: yields its batches with ``image`` decoded on the device, one batch ahead in a producer
    thread (on its own CUDA stream on a GPU), and a ``state_dict()`` that is the stream's position after the last
    batch *handed out*, not after the one the thread already read, so a checkpoint never skips a batch."""

    def __init__(self, stream, decoder: DeviceDecoder, prefetch: int = 2):
        self.stream, self.decoder, self.prefetch = stream, decoder, prefetch
        self._state, self._corrupt = stream.state_dict(), int(getattr(stream, "corrupt_count", 0))

    @property
    def corrupt_count(self) -> int:
        return self._corrupt + self.decoder.failures

    def state_dict(self) -> dict:
        return dict(self._state, corrupt_count=self.corrupt_count)

    def _snapshot(self) -> tuple[dict, int]:
        return self.stream.state_dict(), int(getattr(self.stream, "corrupt_count", 0))

    def _produce(
        self, first: tuple, source: Iterator[dict], ready: queue.Queue, stop: threading.Event, side_stream
    ) -> None:
        """Producer thread: decode batch after batch; hand (batch, ready event, stream state, corrupt) over."""
        try:
            (batch, snapshot), sentinel = first, object()
            with _on_stream(side_stream):
                while batch is not sentinel:
                    if side_stream is not None:
                        side_stream.synchronize()  # nvJPEG may write before earlier work on this stream is done
                    decoded = self.decoder(batch)
                    event = None
                    if side_stream is not None:
                        event = torch.cuda.Event()
                        event.record(side_stream)
                    if not _put_until_stopped(ready, (decoded, event, *snapshot), stop):
                        return
                    batch = next(source, sentinel)
                    snapshot = self._snapshot()
            _put_until_stopped(ready, (StopIteration(), None, None, None), stop)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            _put_until_stopped(ready, (err, None, None, None), stop)

    def __iter__(self) -> Iterator[dict]:
        cuda = self.decoder.device.type == "cuda"
        side_stream = torch.cuda.Stream(device=self.decoder.device) if cuda else None
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        source = iter(self.stream)
        try:  # the first batch on this thread: DataLoader workers fork here, never from the producer thread
            first = (next(source), self._snapshot())
        except StopIteration:
            return
        thread = threading.Thread(
            target=self._produce,
            args=(first, source, ready, stop, side_stream),
            daemon=True,
            name="mimscale-device-decode",
        )
        thread.start()
        try:
            while True:
                decoded, event, state, corrupt = ready.get()
                if isinstance(decoded, StopIteration):
                    return
                if isinstance(decoded, BaseException):
                    raise decoded
                if event is not None:
                    consumer = torch.cuda.current_stream(self.decoder.device)
                    consumer.wait_event(event)
                    for value in decoded.values():
                        if isinstance(value, torch.Tensor) and value.is_cuda:
                            value.record_stream(consumer)  # the allocator must not reuse it while the step runs
                self._state, self._corrupt = state, corrupt
                yield decoded
        finally:  # the loop stopped (or the iterator was dropped): let the thread finish its batch and end, so it
            stop.set()  # is never killed inside a decoder or the DataLoader at interpreter exit
            thread.join(timeout=60)


def _put_until_stopped(ready: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


@contextlib.contextmanager
def _on_stream(side_stream) -> Iterator[None]:
    if side_stream is None:
        yield
        return
    with torch.cuda.device(side_stream.device), torch.cuda.stream(side_stream):
        yield
