"""data.decode=device on a machine without a GPU: the same code path on the CPU, compared with the worker path.

Tolerance: where the worker decodes at full size (crop side at most twice the output, as at 64 px from the
~100 px sample photos) the two paths differ by at most 1 grey level per pixel (torch's fixed-point uint8
antialiased resize in the worker vs the float32 one on the device, rounded). Sample ids, masks, labels, order and
resume are exact. (Where the worker uses PIL's DCT-scaled draft decode, i.e. crops over twice the output side, the
device path decodes at full size instead: a few grey levels on average, more on edges.)
"""

from __future__ import annotations

import io
import itertools
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.config import load_config
from mimscale.pipeline.device_decode import (
    DeferredCrop,
    DeferredRows,
    DeviceDecodedStream,
    DeviceDecoder,
    device_decodable,
    jpeg_backend,
)
from mimscale.pipeline.masking import build_mask_generator
from mimscale.pipeline.stream import build_train_loader

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["torchvision"] + (["torchcodec"] if jpeg_backend() == "torchcodec" else [])


def _stream(shards: str, decode: str, *, batch: int = 16, size: int = 64, workers: int = 0, state=None):
    cfg = load_config(
        None,
        [
            f"data.shards={shards}",
            f"data.batch_size={batch}",
            f"data.image_size={size}",
            f"data.num_workers={workers}",
            f"data.decode={decode}",
            "mask.patch_size=32",
        ],
    )
    mask = build_mask_generator("random_cells", image_size=size, token_stride=16, ratio=0.6, cell_size=32)
    return build_train_loader(cfg, rank=0, world_size=1, mask_generator=mask, normalise_on_device=True, state=state)


def _assert_same_samples(worker: list[dict], device: list[dict]) -> None:
    for ours, theirs in zip(worker, device, strict=True):
        for key in ("sample_id", "mask", "label"):
            assert torch.equal(ours[key], theirs[key]), key
        diff = (ours["image"].int() - theirs["image"].int()).abs()
        assert int(diff.max()) <= 1 and float(diff.float().mean()) < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_decode_gives_the_worker_path_samples_and_resumes_exactly(backend, one_torch_thread):
    shards = str(REPO / "shards" / "sample" / "*.tar")
    worker = list(itertools.islice(_stream(shards, "worker", workers=1), 3))
    device_stream = DeviceDecodedStream(_stream(shards, "device", workers=1), DeviceDecoder("cpu", 64, backend))
    device, states = [], []
    for batch in itertools.islice(device_stream, 3):
        device.append(batch)
        states.append(device_stream.state_dict())
    assert not any(key in device[0] for key in ("encoded", "crop_box", "deferred_rows"))
    _assert_same_samples(worker, device)
    resumed = DeviceDecodedStream(_stream(shards, "device", state=states[1]), DeviceDecoder("cpu", 64, backend))
    (third,) = itertools.islice(resumed, 1)
    for key in ("image", "sample_id", "mask"):
        assert torch.equal(third[key], device[2][key]), key
    assert states[1]["consumed"] == 32 and states[2]["consumed"] == 48


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """Baseline RGB and grayscale JPEGs (device), progressive and CMYK JPEGs and a PNG (worker), a truncated JPEG
    (corrupt: replaced by the next sample in both paths)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (90, 110, 3), dtype=np.uint8)).resize((110, 90))
    png = io.BytesIO()
    photo.save(png, format="PNG")
    payloads = {
        "rgb": _jpeg(photo),
        "gray": _jpeg(photo.convert("L")),
        "progressive": _jpeg(photo, progressive=True),
        "cmyk": _jpeg(photo.convert("CMYK")),
        "png": png.getvalue(),
        "truncated": _jpeg(photo)[:-400],
    }
    folder = tmp_path_factory.mktemp("mixed")
    with tarfile.open(folder / "mixed-000.tar", "w") as tar:
        for number in range(4):
            for name, payload in payloads.items():
                extension = "png" if name == "png" else "jpg"
                info = tarfile.TarInfo(f"{name}{number}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder, payloads


def test_only_complete_baseline_rgb_or_gray_jpegs_go_to_the_device(mixed_shard):
    _, payloads = mixed_shard
    routed = {name: device_decodable(payload) for name, payload in payloads.items()}
    assert routed["rgb"] == routed["gray"] == (110, 90)
    assert routed["progressive"] is routed["cmyk"] is routed["png"] is routed["truncated"] is None


def test_mixed_formats_are_transparent_and_corrupt_samples_replaced_alike(mixed_shard, one_torch_thread):
    folder, _ = mixed_shard
    worker_stream, device_stream = _stream(str(folder), "worker", batch=8), _stream(str(folder), "device", batch=8)
    worker = list(itertools.islice(worker_stream, 3))
    raw = list(itertools.islice(_stream(str(folder), "device", batch=8), 3))
    assert all(0 < len(batch["deferred_rows"]) < 8 for batch in raw)  # some rows encoded, the others as pixels
    wrapped = DeviceDecodedStream(device_stream, DeviceDecoder("cpu", 64))
    device = list(itertools.islice(wrapped, 3))
    _assert_same_samples(worker, device)
    assert wrapped.corrupt_count == worker_stream.corrupt_count > 0  # truncated JPEGs, replaced in the worker


def test_a_batch_with_an_undecodable_image_falls_back_per_image(mixed_shard):
    """The header says JPEG but the data are broken: the batched call fails, the others decode one by one, and
    the broken row takes the next good row's pixels and is counted as a corrupt sample."""
    _, payloads = mixed_shard
    broken = payloads["rgb"][:200] + bytes(300) + payloads["rgb"][-2:]
    rows = DeferredRows()
    for row, payload in enumerate([payloads["rgb"], broken, payloads["gray"]]):
        rows.add(row, DeferredCrop(payload, (10, 5, 80, 70)), flip=row == 2)
    batch = {"image": torch.zeros(3, 3, 32, 32, dtype=torch.uint8), "sample_id": torch.arange(3), **rows.fields()}
    decoder = DeviceDecoder("cpu", 32)
    out = decoder(batch)["image"]
    assert decoder.failures == 1
    assert torch.equal(out[1], out[2]) and not torch.equal(out[0], out[2])
    gray = np.asarray(Image.open(io.BytesIO(payloads["gray"])).convert("RGB"))[5:75, 10:90]
    expected = torch.from_numpy(gray).permute(2, 0, 1).unsqueeze(0).float()
    expected = torch.nn.functional.interpolate(expected, size=(32, 32), mode="bilinear", antialias=True)[0]
    assert float((out[2].float() - expected.round().flip(-1)).abs().max()) <= 2  # cropped, resized, flipped


def test_an_error_in_the_producer_thread_reaches_the_training_loop(mixed_shard, tmp_path):
    """JPEGs whose header is fine but whose data are not: the worker defers them, the decode thread finds no
    decodable image in the batch, and that error is raised where the loop asks for the batch, message intact."""
    from mimscale.shards.images import BadImage

    _, payloads = mixed_shard
    broken = payloads["rgb"][:200] + bytes(300) + payloads["rgb"][-2:]
    with tarfile.open(tmp_path / "broken-000.tar", "w") as tar:
        for number in range(8):
            info = tarfile.TarInfo(f"broken{number}.jpg")
            info.size = len(broken)
            tar.addfile(info, io.BytesIO(broken))
    wrapped = DeviceDecodedStream(_stream(str(tmp_path), "device", batch=4), DeviceDecoder("cpu", 64))
    with pytest.raises(BadImage, match="no image of a 4-image batch could be decoded"):
        next(iter(wrapped))


def test_a_torchcodec_without_image_decoders_falls_back_to_torchvision(tmp_path, monkeypatch):
    """torchcodec 0.11 (the release paired with torch 2.11, a GPU image's torch) imports but has no decode_jpeg."""
    package = tmp_path / "torchcodec" / "decoders"
    package.mkdir(parents=True)
    (tmp_path / "torchcodec" / "__init__.py").write_text("__version__ = '0.11.1+cpu'\n")
    (package / "__init__.py").write_text("class VideoDecoder:  # 0.11's decoders: video and audio only\n    pass\n")
    for name in [name for name in sys.modules if name.split(".")[0] == "torchcodec"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert jpeg_backend() == "torchvision"
    assert DeviceDecoder(torch.device("cpu"), 32).backend == "torchvision"
