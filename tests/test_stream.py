"""The resumable training stream on the committed sample shards and on tiny shard sets built here; its order
(data/order.py) and the binary index it reads (data/index.py)."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.config import DataConfig, load_config
from mimscale.pipeline.masking import build_mask_generator
from mimscale.pipeline.order import EpochPlan, epoch_sequence
from mimscale.pipeline.stream import build_train_loader, iter_eval_batches
from mimscale.shards.format import ShardError
from mimscale.shards.sets import expand_shards
from mimscale.shards.sets import open_shard_set as load_table
from mimscale.shards.writer import write_manifest, write_shard

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "shards/sample/*.tar")
SAMPLE_COUNT = 384
SAMPLE_SHARDS = [120, 104, 88, 72]
MASK = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)


def make_cfg(shards: str = SAMPLE, batch_size: int = 8, workers: int = 0, seed: int = 0):
    return load_config(
        None,
        [
            f"data.shards={shards}",
            f"data.batch_size={batch_size}",
            "data.image_size=32",
            f"data.num_workers={workers}",
            f"run.seed={seed}",
        ],
    )


def order(global_batch: int, streams: int, counts=SAMPLE_SHARDS, epoch: int = 0, window: int = 8) -> list[int]:
    """One epoch's sample ids in global-batch order, as every rank must see them."""
    return epoch_sequence(
        counts, seed=0, epoch=epoch, streams=streams, window=window, global_batch=global_batch
    ).tolist()


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
    assert batch["sample_id"].tolist() == order(8, streams=1)[:8]
    assert stream.state_dict()["consumed"] == 8 and stream.corrupt_count == 0


def test_two_ranks_two_workers_see_disjoint_samples_covering_the_epoch():
    cfg = make_cfg(batch_size=8, workers=2)
    streams = [build_train_loader(cfg, rank=r, world_size=2, mask_generator=MASK) for r in (0, 1)]
    steps = streams[0].steps_per_epoch
    assert steps == SAMPLE_COUNT // 16
    seen = [torch.cat([b["sample_id"] for b in take(s, steps)]).tolist() for s in streams]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(SAMPLE_COUNT))
    expected = order(16, streams=2)  # data.streams=0: one canonical stream per rank of the run's start
    assert seen[0][:8] == expected[:8] and seen[1][:8] == expected[8:16]
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
    two = [
        take(build_train_loader(make_cfg(batch_size=8), rank=r, world_size=2, mask_generator=MASK), 30) for r in (0, 1)
    ]
    stopped = build_train_loader(make_cfg(batch_size=8), rank=0, world_size=2, mask_generator=MASK)
    take(stopped, 20)  # 20 steps of 16 = 320 of 384: the run crosses the epoch end after the resume
    one = build_train_loader(
        make_cfg(batch_size=16), rank=0, world_size=1, mask_generator=MASK, state=stopped.state_dict()
    )
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
    planned = order(4, streams=1, counts=[20, 12])
    ids = torch.cat([b["sample_id"] for b in take(stream, 8)]).tolist()
    assert len(ids) == 32 and not set(ids) & bad
    assert stream.corrupt_count >= len(bad)
    for position, sample_id in enumerate(ids):
        if planned[position] not in bad:
            assert sample_id == planned[position]  # a replacement never shifts the samples after it
        else:
            later = [s for s in planned[position + 1 :] + planned[:position] if s not in bad]
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


def test_epoch_order_is_a_lazy_permutation_keyed_by_seed_and_epoch_only():
    from mimscale.pipeline.order import KeyedPermutation

    counts = [50, 7, 33, 0, 61, 20, 9, 44]  # uneven, one empty shard
    for streams in (1, 3, 4):
        for window in (1, 2, 5):
            plan = EpochPlan(counts, seed=5, epoch=2, streams=streams, window=window)
            ids = [plan.sample(s, k) for s in range(streams) for k in range(plan.stream_length)]
            assert len(set(ids)) == len(ids) == streams * (sum(counts) // streams) and max(ids) < sum(counts)
    a = order(8, streams=2, window=2)
    assert a == order(8, streams=2, window=2)  # recomputed anywhere (any rank, worker, process): the same
    assert a != order(8, streams=2, window=2, epoch=1)
    assert sorted(a) == sorted(order(8, streams=2, window=2, epoch=1)) == list(range(SAMPLE_COUNT))
    assert a != epoch_sequence(SAMPLE_SHARDS, seed=1, epoch=0, streams=2, window=2, global_batch=8).tolist()
    # the global batch only regroups the streams: each stream's sequence is the same for any global batch
    plan = EpochPlan(SAMPLE_SHARDS, seed=0, epoch=0, streams=2, window=2)
    assert order(16, streams=2, window=2)[:8] == [plan.sample(0, k) for k in range(8)]
    assert order(4, streams=2, window=2)[:2] == [plan.sample(0, k) for k in range(2)]
    huge = KeyedPermutation(400_000_000, (0, 0))  # no per-epoch array: O(1) memory per worker
    picks = [huge[p] for p in range(0, 400_000_000, 40_000_000)]
    assert len(set(picks)) == 10 and all(0 <= p < 400_000_000 for p in picks)
    with pytest.raises(IndexError):
        huge[400_000_000]


def test_streams_read_few_shards_each_and_ranks_own_their_streams():
    """With W dividing C each rank reads only its streams' shards; a window spans at most `window` shards."""
    counts = [30] * 16
    plan = EpochPlan(counts, seed=0, epoch=3, streams=4, window=2)
    shard_of = np.repeat(np.arange(16), 30)
    owned = [{int(shard_of[plan.sample(s, k)]) for k in range(plan.stream_length)} for s in range(4)]
    assert all(len(shards) == 4 for shards in owned) and len(set.union(*owned)) == 16
    for s in range(4):
        for start in range(0, plan.stream_length, 60):  # windows of 2 shards = 60 samples here
            window = {int(shard_of[plan.sample(s, k)]) for k in range(start, start + 60)}
            assert len(window) == 2
    next_epoch = EpochPlan(counts, seed=0, epoch=4, streams=4, window=2)
    assert owned == [{int(shard_of[next_epoch.sample(s, k)]) for k in range(120)} for s in range(4)]  # caches stay warm
    sequence = epoch_sequence(counts, seed=0, epoch=3, streams=4, window=2, global_batch=8)
    rank_shards = [set(shard_of[sequence.reshape(-1, 2, 4)[:, r].ravel()].tolist()) for r in (0, 1)]
    assert rank_shards[0] == owned[0] | owned[1] and rank_shards[1] == owned[2] | owned[3]


def test_streams_and_window_are_fixed_for_a_run():
    stopped = build_train_loader(make_cfg(batch_size=8), rank=0, world_size=2, mask_generator=MASK)
    take(stopped, 2)
    state = stopped.state_dict()
    assert state["streams"] == 2 and state["shuffle_window"] == 8
    cfg = make_cfg(batch_size=8)
    cfg.data.streams = 4
    with pytest.raises(ShardError, match=r"data.streams=2 .*data.streams=4"):
        build_train_loader(cfg, rank=0, world_size=2, mask_generator=MASK, state=state)
    cfg = make_cfg(batch_size=8)
    cfg.data.shuffle_window = 3
    with pytest.raises(ShardError, match="data.shuffle_window=8"):
        build_train_loader(cfg, rank=0, world_size=2, mask_generator=MASK, state=state)
    cfg = make_cfg(batch_size=6)
    cfg.data.streams = 4
    with pytest.raises(ShardError, match="not a multiple of data.streams=4"):
        build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK)
    with pytest.raises(ShardError, match="older mimscale"):
        build_train_loader(make_cfg(), rank=0, world_size=1, mask_generator=MASK, state={**state, "version": 1})


def test_several_sets_joined_with_double_colon():
    both = f"{SAMPLE}::{ROOT / 'shards/sample-val'}"
    stream = build_train_loader(make_cfg(shards=both), rank=0, world_size=1, mask_generator=MASK)
    assert stream.num_samples == SAMPLE_COUNT + 128


def test_resume_with_another_global_batch_continues_every_stream_where_it_stopped():
    stopped = build_train_loader(make_cfg(batch_size=8), rank=0, world_size=2, mask_generator=MASK)
    take(stopped, 3)  # 48 samples consumed: 24 of each of the 2 streams
    resumed = build_train_loader(
        make_cfg(batch_size=24), rank=0, world_size=1, mask_generator=MASK, state=stopped.state_dict()
    )
    ids = torch.cat([b["sample_id"] for b in take(resumed, 2)]).tolist()
    plan = EpochPlan(SAMPLE_SHARDS, seed=0, epoch=0, streams=2, window=8)
    expected = [plan.sample(s, k) for start in (24, 36) for s in (0, 1) for k in range(start, start + 12)]
    assert ids == expected


def test_normalise_on_device_flag_hands_uint8_with_the_same_pixels():
    from mimscale.pipeline.transforms import normalise_on_device

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


def test_start_up_memory_is_per_shard_not_per_sample(tmp_path):
    """A 1M-sample set (1000 sparse tars + a real samples.idx): load + plan + lookups allocate O(shards) only."""
    import os
    import tracemalloc

    from mimscale.shards.index import SAMPLE_DTYPE, IndexWriter

    shards, per_shard = 1000, 1000
    names = [f"{n:06d}.tar" for n in range(shards)]
    rows = np.zeros(per_shard, SAMPLE_DTYPE)
    rows["block"], rows["size"], rows["label"] = np.arange(per_shard) * 4 + 1, 700, np.arange(per_shard) % 10
    writer = IndexWriter(tmp_path / "samples.idx", names)
    for number, name in enumerate(names):
        with open(tmp_path / name, "wb") as handle:
            handle.truncate(per_shard * 4 * 512 + 1024)  # sparse: the right size, no disk used
        writer.add(number, per_shard * 4 * 512 + 1024, rows)
    writer.close()
    tracemalloc.start()
    table = load_table(str(tmp_path), "data.shards")
    plan = EpochPlan(table.counts, seed=0, epoch=0, streams=8, window=8)
    picked = [plan.sample(s, k) for s in range(8) for k in range(0, plan.stream_length, 9973)]
    labels = [table.label(sample_id) for sample_id in picked]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(table) == shards * per_shard and len(set(picked)) == len(picked)
    assert labels == [sample_id % per_shard % 10 for sample_id in picked]
    assert peak < 1_500_000, f"{peak} bytes: something allocates per sample (8 MB would be one int64 per sample)"
    assert os.path.getsize(tmp_path / "samples.idx") / len(table) < 12.1


def test_remote_shards_stream_the_same_batches_through_the_node_cache_and_resume(tmp_path):
    """Real HTTP server on 127.0.0.1: the published samples.idx is fetched once; without it the index is built."""
    import shutil

    from http_serve import ShardServer

    local = take(build_train_loader(make_cfg(batch_size=8), rank=0, world_size=1, mask_generator=MASK), 6)
    with ShardServer(ROOT / "shards/sample") as server:
        cfg = make_cfg(shards=server.url("sample-{000..003}.tar"), batch_size=8)
        cfg.data.cache_dir, cfg.data.shuffle_window = str(tmp_path / "cache"), 8
        stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK)
        first = take(stream, 3)
        resumed = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK, state=stream.state_dict())
        rest = take(resumed, 3)
    for expected, got in zip(local, first + rest, strict=True):
        assert torch.equal(expected["sample_id"], got["sample_id"]) and torch.equal(expected["image"], got["image"])
    assert len(list((tmp_path / "cache/shards").glob("*-sample-00?.tar"))) == 4  # whole shards, one download each
    shutil.copytree(ROOT / "shards/sample", tmp_path / "bare")
    (tmp_path / "bare/samples.idx").unlink()
    (tmp_path / "bare/manifest.json").unlink()  # its counts would start the run unindexed (tests/test_counts.py)
    with ShardServer(tmp_path / "bare") as server:  # nothing published: each shard downloaded once and indexed
        cfg = make_cfg(shards=server.url("sample-{000..003}.tar"), batch_size=8)
        cfg.data.cache_dir = str(tmp_path / "cache2")
        cfg.data.shuffle_window = 1  # one shard per window: the table keeps this window and the next pinned
        stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK)
        ids = torch.cat([b["sample_id"] for b in take(stream, 20)])
        assert len(set(ids.tolist())) == 160 and len(stream_table_pins(stream)) <= 2
    assert list((tmp_path / "cache2/index").glob("*.idx"))


def test_a_published_index_lacking_shards_is_completed_with_only_those_downloaded(tmp_path, capsys):
    """A samples.idx published for 3 of the 4 shards: only the 4th is downloaded to complete it, the others' rows
    are kept, and the completed index equals the local one."""
    import shutil

    from http_serve import ShardServer

    from mimscale.shards.index import build_folder_index

    names = [f"sample-00{n}.tar" for n in range(4)]
    shutil.copytree(ROOT / "shards/sample", tmp_path / "partial")
    build_folder_index(str(tmp_path / "partial"), names[:3], tmp_path / "partial/samples.idx")
    local = load_table(str(ROOT / "shards/sample/*.tar"), "data.shards")
    with ShardServer(tmp_path / "partial") as server:
        table = load_table(
            server.url("sample-{000..003}.tar"), "data.shards", data_cfg=DataConfig(cache_dir=str(tmp_path / "cache"))
        )
        assert [server.requests[name] for name in names] == [0, 0, 0, 1]
    assert "covers 3 of the 4 shards" in capsys.readouterr().err
    assert list(table.counts) == list(local.counts) and len(table) == len(local)
    for sample_id in range(0, len(local), 7):
        assert table.locate(sample_id)[1].item() == local.locate(sample_id)[1].item()


def test_the_next_epochs_first_shard_is_fetched_during_the_last_window(tmp_path):
    """Remote shards, one shard per window and a cache that holds two shards: while a stream reads the last window
    of an epoch, the next epoch's first shard (a new shard order) is downloaded ahead, not on demand."""
    import os
    import time

    from http_serve import ShardServer

    names = [f"sample-00{n}.tar" for n in range(4)]
    sizes = [(ROOT / "shards/sample" / name).stat().st_size for name in names]

    def plan(seed: int, epoch: int) -> list[int]:
        return [int(s) for s in EpochPlan(SAMPLE_SHARDS, seed=seed, epoch=epoch, streams=1, window=1).streams[0].shard]

    # a seed whose next-epoch first shard is neither of the two shards cached at the end of epoch 0
    seed = next(seed for seed in range(50) if plan(seed, 1)[0] not in plan(seed, 0)[-2:])
    upcoming = names[plan(seed, 1)[0]]
    with ShardServer(ROOT / "shards/sample") as server:
        cfg = make_cfg(shards=server.url("sample-{000..003}.tar"), batch_size=8, seed=seed)
        cfg.data.cache_dir, cfg.data.shuffle_window, cfg.data.streams = str(tmp_path / "cache"), 1, 1
        cfg.data.cache_limit_gb = (2 * max(sizes) + 16384) / 1e9  # two shards and the index, never three
        stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK)
        batches = take(stream, sum(SAMPLE_SHARDS) // 8)  # exactly epoch 0
        assert len(batches) == 48
        cached = stream.table.cache.path_for(server.url(upcoming))  # read in epoch 0, evicted since (2 fit)
        deadline = time.monotonic() + 60
        while not cached.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cached.exists(), f"{upcoming} was not fetched ahead: {sorted(os.listdir(cached.parent))}"


def stream_table_pins(stream) -> dict:
    return stream.table._pinned
