"""The resumable training stream on the committed sample shards and on tiny shard sets built here."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.config import load_config
from mimscale.data.masking import build_mask_generator
from mimscale.data.shards import ShardError, expand_shards, write_manifest, write_shard
from mimscale.data.stream import build_train_loader, epoch_order, iter_eval_batches

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "shards/sample/*.tar")
SAMPLE_COUNT = 384
MASK = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)


def make_cfg(shards: str = SAMPLE, batch_size: int = 8, workers: int = 0, seed: int = 0):
    return load_config(
        None,
        [f"data.shards={shards}", f"data.batch_size={batch_size}", "data.image_size=32",
         f"data.num_workers={workers}", f"run.seed={seed}"],
    )  # fmt: skip


def take(stream, count: int) -> list[dict]:
    return list(itertools.islice(iter(stream), count))


def jpeg(colour: tuple[int, int, int], size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


def test_batch_contract_shapes_dtypes_and_labels():
    stream = build_train_loader(make_cfg(), rank=0, world_size=1, mask_generator=MASK)
    assert stream.num_samples == SAMPLE_COUNT and stream.steps_per_epoch == SAMPLE_COUNT // 8
    batch = take(stream, 1)[0]
    assert set(batch) == {"image", "mask", "label", "sample_id"}
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (8, 4, 4) and batch["mask"].dtype == torch.bool
    assert (batch["mask"].sum(dim=(1, 2)) == 8).all()
    assert batch["label"].dtype == torch.int64 and batch["sample_id"].dtype == torch.int64
    assert ((batch["label"] >= 0) & (batch["label"] < 19)).all()
    # normalised with ImageNet statistics: roughly centred, clearly not in [0, 1]
    assert batch["image"].min() < -0.5 and batch["image"].max() > 1.0
    assert batch["sample_id"].tolist() == epoch_order(0, 0, SAMPLE_COUNT)[:8].tolist()
    assert stream.state_dict()["consumed"] == 8 and stream.corrupt_count == 0


def test_two_ranks_two_workers_see_disjoint_samples_covering_the_epoch():
    cfg = make_cfg(batch_size=8, workers=2)
    streams = [build_train_loader(cfg, rank=r, world_size=2, mask_generator=MASK) for r in (0, 1)]
    steps = streams[0].steps_per_epoch
    assert steps == SAMPLE_COUNT // 16
    seen = [torch.cat([b["sample_id"] for b in take(s, steps)]).tolist() for s in streams]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(SAMPLE_COUNT))
    order = epoch_order(0, 0, SAMPLE_COUNT)
    assert seen[0][:8] == order[:8].tolist() and seen[1][:8] == order[8:16].tolist()
    assert all(s.state_dict()["epoch"] == 0 and s.state_dict()["consumed"] == SAMPLE_COUNT for s in streams)


def test_resume_same_world_size_replays_identical_batches_with_other_worker_count():
    reference = take(build_train_loader(make_cfg(workers=2), rank=1, world_size=2, mask_generator=MASK), 12)
    first = build_train_loader(make_cfg(workers=2), rank=1, world_size=2, mask_generator=MASK)
    take(first, 7)
    state = first.state_dict()
    assert state["consumed"] == 7 * 16
    resumed = build_train_loader(make_cfg(workers=0), rank=1, world_size=2, mask_generator=MASK, state=state)
    for expected, got in zip(reference[7:], take(resumed, 5), strict=True):
        for key in ("image", "mask", "label", "sample_id"):
            assert torch.equal(expected[key], got[key]), key


def test_resume_on_one_rank_with_doubled_batch_continues_the_global_order():
    two = [take(build_train_loader(make_cfg(batch_size=8), rank=r, world_size=2, mask_generator=MASK), 30)
           for r in (0, 1)]  # fmt: skip
    stopped = build_train_loader(make_cfg(batch_size=8), rank=0, world_size=2, mask_generator=MASK)
    take(stopped, 20)  # 20 steps of 16 = 320 of 384: the run crosses the epoch end after the resume
    one = build_train_loader(make_cfg(batch_size=16), rank=0, world_size=1, mask_generator=MASK,
                             state=stopped.state_dict())  # fmt: skip
    for step, got in enumerate(take(one, 10), start=20):
        expected_ids = torch.cat([two[0][step]["sample_id"], two[1][step]["sample_id"]])
        assert torch.equal(got["sample_id"], expected_ids), step
        assert torch.equal(got["image"], torch.cat([two[0][step]["image"], two[1][step]["image"]]))
    assert one.epoch == 1 and one.consumed == 6 * 16


def test_epochs_reshuffle_and_each_covers_every_sample_once():
    stream = build_train_loader(make_cfg(batch_size=32), rank=0, world_size=1, mask_generator=MASK)
    steps = stream.steps_per_epoch
    ids = torch.cat([b["sample_id"] for b in take(stream, 2 * steps)]).tolist()
    first, second = ids[:SAMPLE_COUNT], ids[SAMPLE_COUNT:]
    assert sorted(first) == sorted(second) == list(range(SAMPLE_COUNT))
    assert first != second
    assert stream.epoch == 1


def test_state_from_other_data_or_seed_is_a_clear_error():
    stream = build_train_loader(make_cfg(), rank=0, world_size=1, mask_generator=MASK)
    take(stream, 2)
    state = stream.state_dict()
    other = str(ROOT / "shards/sample/sample-00[012].tar")
    with pytest.raises(ShardError, match="another shard set.*data.shards"):
        build_train_loader(make_cfg(shards=other), rank=0, world_size=1, mask_generator=MASK, state=state)
    with pytest.raises(ShardError, match="run.seed"):
        build_train_loader(make_cfg(seed=3), rank=0, world_size=1, mask_generator=MASK, state=state)


def test_patterns_brace_glob_and_missing(tmp_path):
    assert len(expand_shards(str(ROOT / "shards/sample/sample-{000..003}.tar"))) == 4
    assert len(expand_shards(str(ROOT / "shards/sample"))) == 4
    with pytest.raises(ShardError, match=r"data.shards.*do not exist.*sample-004"):
        expand_shards(str(ROOT / "shards/sample/sample-{000..004}.tar"))
    with pytest.raises(ShardError, match=r"data.shards=.*matches no .tar"):
        build_train_loader(make_cfg(shards=str(tmp_path / "*.tar")), rank=0, world_size=1, mask_generator=MASK)
    with pytest.raises(ShardError, match="data.shards is empty"):
        expand_shards("")
    with pytest.raises(ShardError, match="fewer than one global batch"):
        build_train_loader(make_cfg(batch_size=256), rank=0, world_size=2, mask_generator=MASK)


def test_corrupt_samples_are_replaced_counted_and_never_shift_positions(tmp_path):
    samples = []
    bad = {3, 10, 11, 25}
    for number in range(32):
        payload = jpeg((number * 7 % 256, 50, 90))
        if number in bad:  # garbage, and a JPEG cut in half
            payload = b"not an image" if number % 2 else payload[: len(payload) // 2]
        samples.append((f"s{number:04d}", {"jpg": payload, "cls": str(number).encode()}))
    entries = [write_shard(tmp_path / "a-000.tar", samples[:20]), write_shard(tmp_path / "a-001.tar", samples[20:])]
    write_manifest(tmp_path, entries)
    stream = build_train_loader(make_cfg(shards=str(tmp_path), batch_size=4), rank=0, world_size=1, mask_generator=MASK)
    order = epoch_order(0, 0, 32).tolist()
    ids = torch.cat([b["sample_id"] for b in take(stream, 8)]).tolist()
    assert len(ids) == 32 and not set(ids) & bad
    assert stream.corrupt_count >= len(bad)
    for position, sample_id in enumerate(ids):
        planned = order[position]
        if planned not in bad:
            assert sample_id == planned  # a replacement never shifts the samples after it
        else:
            later = [s for s in order[position + 1 :] + order[:position] if s not in bad]
            assert sample_id == later[0]
    assert stream.state_dict()["corrupt_count"] == stream.corrupt_count


def test_eval_batches_fixed_order_all_samples_and_labels():
    kwargs = dict(image_size=32, batch_size=50, mean=[0.5] * 3, std=[0.5] * 3)
    plain = list(iter_eval_batches(str(ROOT / "shards/digits/val-*.tar"), **kwargs))
    workers = list(iter_eval_batches(str(ROOT / "shards/digits/val-*.tar"), num_workers=2, **kwargs))
    labels = torch.cat([y for _, y in plain])
    assert len(labels) == 240 and [len(y) for _, y in plain][-1] == 40
    assert sorted(set(labels.tolist())) == list(range(10))
    assert torch.equal(labels, torch.cat([y for _, y in workers]))
    assert torch.equal(plain[-1][0], workers[-1][0])
    assert plain[0][0].shape == (50, 3, 32, 32) and float(plain[0][0].min()) >= -1.0 - 1e-6
    with pytest.raises(ShardError, match="eval.val_shards"):
        next(iter_eval_batches("nowhere/*.tar", key="eval.val_shards", **kwargs))


def test_worker_count_does_not_change_augmentation():
    a = take(build_train_loader(make_cfg(workers=0), rank=0, world_size=1, mask_generator=MASK), 3)
    b = take(build_train_loader(make_cfg(workers=2), rank=0, world_size=1, mask_generator=MASK), 3)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert not np.array_equal(a[0]["mask"][0].numpy(), a[0]["mask"][1].numpy()) or not torch.equal(
        a[0]["image"][0], a[0]["image"][1]
    )


def test_truncated_shard_is_reindexed_and_its_broken_tail_replaced(tmp_path, capsys):
    import shutil

    shutil.copytree(ROOT / "shards/sample-val", tmp_path / "set")
    shard = tmp_path / "set/val-000.tar"
    shard.write_bytes(shard.read_bytes()[:150_000])  # the manifest's cached index no longer matches the file
    stream = build_train_loader(make_cfg(shards=str(tmp_path / "set")), rank=0, world_size=1, mask_generator=MASK)
    assert 56 < stream.num_samples < 128  # val-001 whole, val-000 up to the cut
    ids = torch.cat([b["sample_id"] for b in take(stream, stream.steps_per_epoch)])
    assert len(ids) == stream.steps_per_epoch * 8
    assert stream.corrupt_count == 0  # the member cut in half is not indexed
    assert "val-000.tar is damaged" in capsys.readouterr().err


def test_stream_decodes_every_mode_to_rgb(tmp_path):
    def encoded(image: Image.Image, fmt: str) -> bytes:
        out = io.BytesIO()
        image.save(out, format=fmt)
        return out.getvalue()

    base = Image.new("RGB", (40, 40), (200, 40, 40))
    transparent = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    deep = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))
    cases = {
        "rgbjpg": ("jpg", encoded(base, "JPEG")),
        "grayjpg": ("jpg", encoded(base.convert("L"), "JPEG")),
        "cmykjpg": ("jpg", encoded(base.convert("CMYK"), "JPEG")),
        "palettepng": ("png", encoded(base.convert("P"), "PNG")),
        "alphapng": ("png", encoded(transparent, "PNG")),
        "deeppng": ("png", encoded(deep, "PNG")),
        "rgbwebp": ("webp", encoded(base, "WEBP")),
    }
    write_shard(tmp_path / "modes.tar", [(key, {ext: data}) for key, (ext, data) in cases.items()])
    kwargs = dict(image_size=32, batch_size=len(cases), mean=[0.0] * 3, std=[1.0] * 3)
    images, labels = next(iter_eval_batches(str(tmp_path / "modes.tar"), **kwargs))
    assert images.shape == (7, 3, 32, 32) and labels.tolist() == [-1] * 7
    centre = images[:, :, 16, 16]
    for row in (0, 2, 3, 6):  # colour survives jpg, CMYK jpg, palette png and webp
        assert centre[row, 0] > 0.7 and centre[row, 1] < 0.3, (row, centre[row])
    assert torch.allclose(centre[1], centre[1].mean().expand(3), atol=0.02)  # grayscale -> equal channels
    assert torch.allclose(centre[4], torch.ones(3)) and torch.allclose(centre[5], torch.ones(3))  # white


def test_epoch_order_is_a_lazy_permutation_keyed_by_seed_and_epoch():
    from mimscale.data.stream import EpochOrder

    for size in (1, 2, 3, 257, 1000):
        assert sorted(epoch_order(5, 2, size).tolist()) == list(range(size))
    assert epoch_order(0, 0, 500).tolist() == epoch_order(0, 0, 500).tolist()
    assert epoch_order(0, 0, 500).tolist() != epoch_order(0, 1, 500).tolist() != epoch_order(1, 0, 500).tolist()
    huge = EpochOrder(0, 0, 400_000_000)  # no per-epoch array: O(1) memory per worker
    picks = [huge[p] for p in range(0, 400_000_000, 40_000_000)]
    assert len(set(picks)) == 10 and all(0 <= p < 400_000_000 for p in picks)
    with pytest.raises(IndexError):
        huge[400_000_000]


def test_several_sets_joined_with_double_colon():
    both = f"{SAMPLE}::{ROOT / 'shards/sample-val'}"
    stream = build_train_loader(make_cfg(shards=both), rank=0, world_size=1, mask_generator=MASK)
    assert stream.num_samples == SAMPLE_COUNT + 128


def test_resume_with_another_global_batch_continues_from_the_consumed_position():
    stopped = build_train_loader(make_cfg(batch_size=8), rank=0, world_size=2, mask_generator=MASK)
    take(stopped, 3)  # 48 samples consumed
    resumed = build_train_loader(make_cfg(batch_size=24), rank=0, world_size=1, mask_generator=MASK,
                                 state=stopped.state_dict())  # fmt: skip
    ids = torch.cat([b["sample_id"] for b in take(resumed, 2)]).tolist()
    assert ids == epoch_order(0, 0, SAMPLE_COUNT)[48:96].tolist()


def test_normalise_on_device_flag_hands_uint8_with_the_same_pixels():
    from mimscale.data.transforms import normalise_on_device

    cfg = make_cfg(workers=2)
    floats = take(build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK), 3)
    uint8 = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK, normalise_on_device=True)
    for expected, got in zip(floats, take(uint8, 3), strict=True):
        assert set(got) == set(expected)
        assert got["image"].dtype == torch.uint8 and got["image"].shape == (8, 3, 32, 32)
        assert int(got["image"].max()) > 200  # raw 0-255 pixels, not normalised
        for key in ("mask", "label", "sample_id"):
            assert torch.equal(expected[key], got[key]), key
        device = normalise_on_device(got["image"], cfg.data.mean, cfg.data.std, torch.float32)
        assert (device - expected["image"]).abs().max() <= 1e-6
    assert uint8.state_dict()["consumed"] == 3 * 8
