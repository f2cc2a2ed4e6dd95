"""Issue 23 part 1: a published WebDataset set starts from its per-shard counts, without a scan (shards/counts.py).

Each counts source is parsed from real files beside real tars; hostile counts files are refused with a message
naming the file and the entry; a counted set streams the very ids (and labels) the indexed set streams; a count
that disagrees with a shard is named (or skipped as corrupt when allowed); and a remote counted set downloads
only the shards the first windows read (the server's request log).
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimscale.config import load_config
from mimscale.pipeline.masking import build_mask_generator
from mimscale.pipeline.stream import build_train_loader
from mimscale.shards import counts as counts_module
from mimscale.shards.counts import find_counts, parse_counts, parse_stats
from mimscale.shards.format import ShardError
from mimscale.shards.index import LazySetIndex, SetIndex
from mimscale.shards.sets import open_shard_set
from mimscale.shards.writer import write_shard

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "shards/sample"
SAMPLE_SHARDS = [120, 104, 88, 72]
NAMES = [f"sample-{n:03d}.tar" for n in range(4)]
MASK = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)


def bare_copy(tmp_path: Path, name: str = "set") -> Path:
    """The sample tars without manifest.json and samples.idx: a set another tool published."""
    folder = tmp_path / name
    folder.mkdir()
    for shard in NAMES:
        shutil.copy(SAMPLE / shard, folder / shard)
    return folder


def wids_index(urls: list[str], counts: list[int], sizes: list[int] | None = None) -> dict:
    """What `widsindex create` writes (wids/wids_index.py: main_create), md5sum left out."""
    entries = [{"url": url, "nsamples": n} for url, n in zip(urls, counts, strict=True)]
    for entry, size in zip(entries, sizes or [], strict=False):
        entry["filesize"] = size
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": entries, "name": "sample"}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def cfg_for(shards: str, tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            f"data.shards={shards}",
            "data.batch_size=16",
            "data.image_size=32",
            "data.num_workers=0",
            "data.streams=4",
            "data.shuffle_window=2",
            "run.seed=3",
            f"data.cache_dir={tmp_path / 'cache'}",
            *extra,
        ],
    )


def streamed(cfg, batches: int = 24) -> tuple[list[int], list[int], dict]:
    stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK)
    got = list(itertools.islice(iter(stream), batches))
    ids = [int(i) for batch in got for i in batch["sample_id"]]
    labels = [int(i) for batch in got for i in batch["label"]]
    return ids, labels, stream.state_dict()


# ----------------------------------------------------------------------------------------------- sources


def test_each_counts_source_is_read_in_order_of_preference(tmp_path):
    folder = bare_copy(tmp_path)
    locations = {name: str(folder / name) for name in NAMES}
    assert find_counts(str(folder), NAMES, locations) is None  # nothing beside the shards: index it
    user = write_json(tmp_path / "counts.json", dict(zip(NAMES, [1, 2, 3, 4], strict=True)))
    found = find_counts(str(folder), NAMES, locations, user_counts=str(user))
    assert found.counts == [1, 2, 3, 4] and found.source == str(user)
    for name, n in zip(NAMES, [5, 6, 7, 8], strict=True):  # img2dataset: 00000.tar beside 00000_stats.json
        write_json(folder / name.replace(".tar", "_stats.json"), {"count": 9, "successes": n, "failed_to_download": 1})
    found = find_counts(str(folder), NAMES, locations, user_counts=str(user))
    assert found.counts == [5, 6, 7, 8] and "stats" in found.source
    urls = [f"https://example.org/data/{name}?sig=x/y" for name in NAMES]  # matched by file name, never fetched
    write_json(folder / "shardindex.json", wids_index(urls, [9, 10, 11, 12], [1024] * 4))
    found = find_counts(str(folder), NAMES, locations, user_counts=str(user))
    assert found.counts == [9, 10, 11, 12] and found.sizes == [1024] * 4
    shutil.copy(SAMPLE / "manifest.json", folder / "manifest.json")
    found = find_counts(str(folder), NAMES, locations, user_counts=str(user))
    assert found.counts == SAMPLE_SHARDS and found.source.endswith("manifest.json")


def test_an_old_manifest_counts_nothing_and_its_set_is_indexed_as_ever(tmp_path):
    folder = bare_copy(tmp_path)
    old = {"format": "mimscale-shards/1", "shards": [{"name": n, "samples": [{"key": "a"}]} for n in NAMES]}
    write_json(folder / "manifest.json", old)
    assert find_counts(str(folder), NAMES, {name: str(folder / name) for name in NAMES}) is None
    table = open_shard_set(f"{folder}/*.tar", data_cfg=cfg_for("x", tmp_path).data, counts=True)
    assert isinstance(table.indexes[0], SetIndex) and list(table.counts) == SAMPLE_SHARDS


def test_a_source_that_misses_a_shard_gives_way_to_the_next(tmp_path):
    folder = bare_copy(tmp_path)
    locations = {name: str(folder / name) for name in NAMES}
    write_json(folder / "shardindex.json", wids_index(NAMES[:3], [1, 2, 3]))
    user = write_json(tmp_path / "counts.json", wids_index([f"x/{n}" for n in NAMES], [4, 3, 2, 1]))
    assert find_counts(str(folder), NAMES, locations, user_counts=str(user)).counts == [4, 3, 2, 1]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "not a JSON object"),
        ({"a.tar": True}, "entry 'a.tar': count=true is not an integer"),
        ({"a.tar": -1}, "entry 'a.tar': count=-1"),
        ({"a.tar": 2**41}, "is not an integer in [0, 1099511627776)"),
        ({"a.tar": "7"}, 'count="7"'),
        ({"../a.tar": 3}, "escapes its folder"),
        ({"..": 3}, "does not name a shard file"),
        ({"dir/": 3}, "does not name a shard file"),
        ({"a\0.tar": 3}, "does not name a shard file"),
        ({"wids_version": 2, "shardlist": []}, "only version 1"),
        ({"wids_version": 1, "shardlist": {}}, "'shardlist' is not a list"),
        ({"wids_version": 1, "shardlist": [{"nsamples": 3}]}, "entry #0 is not an object with a 'url'"),
        ({"wids_version": 1, "shardlist": [{"url": "a.tar", "nsamples": 1.5}]}, "entry 'a.tar': nsamples=1.5"),
        ({"wids_version": 1, "shardlist": [{"url": "a.tar", "nsamples": 1, "filesize": -4}]}, "filesize=-4"),
        (
            {"wids_version": 1, "shardlist": [{"url": "x/a.tar", "nsamples": 1}, {"url": "y/a.tar", "nsamples": 2}]},
            "'a.tar' is listed twice",
        ),
        ({"wids_version": 1, "shardlist": [], "datasets": [{"source_url": "http://x/y.json"}]}, "'datasets'"),
    ],
)
def test_hostile_counts_files_are_refused_naming_file_and_entry(data, message):
    with pytest.raises(ShardError) as caught:
        parse_counts(json.dumps(data).encode(), "/data/counts.json")
    assert "counts file /data/counts.json" in str(caught.value) and message in str(caught.value)


def test_counts_files_are_read_bounded(tmp_path, monkeypatch):
    folder = bare_copy(tmp_path)
    write_json(folder / "shardindex.json", wids_index(NAMES, SAMPLE_SHARDS))
    monkeypatch.setattr(counts_module, "MAX_COUNTS_BYTES", 100)
    with pytest.raises(ShardError, match=r"shardindex.json: larger than 100 bytes"):
        find_counts(str(folder), NAMES, {name: str(folder / name) for name in NAMES})
    with pytest.raises(ShardError, match="not valid JSON"):
        parse_counts(b"\xff\xfe", "c.json")
    with pytest.raises(ShardError, match="no 'successes' field"):
        parse_stats(b'{"count": 3}', "00000_stats.json")
    (folder / "shardindex.json").unlink()
    (folder / "shardindex.json").mkdir()  # not a regular file: refused, not read
    with pytest.raises(ShardError, match="shardindex.json cannot be read"):
        find_counts(str(folder), NAMES, {name: str(folder / name) for name in NAMES})


def write_img2dataset_parquet(path: Path, successes: int, failures: int = 3, *, row_group_size: int = 50) -> Path:
    """What img2dataset writes beside NNNNN.tar (writer.py, BufferedParquetWriter): one row per attempted sample,
    its status "success" for the samples in the tar; failed ones carry an error message (one with no status)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    status = ["success"] * successes + ["failed_to_download"] * failures + [None]
    table = pa.table(
        {
            "url": [f"https://example.org/{k}.jpg" for k in range(len(status))],
            "key": [f"{k:09d}" for k in range(len(status))],
            "status": pa.array(status, pa.string()),
            "error_message": [None if s == "success" else "timed out" for s in status],
            "width": pa.array([32 if s == "success" else None for s in status], pa.int64()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_img2dataset_parquet_files_give_the_counts(tmp_path, capsys, monkeypatch):
    pytest.importorskip("pyarrow.parquet")
    folder = bare_copy(tmp_path)
    locations = {name: str(folder / name) for name in NAMES}
    user = write_json(tmp_path / "counts.json", dict(zip(NAMES, [1, 2, 3, 4], strict=True)))
    for name, n in zip(NAMES, SAMPLE_SHARDS, strict=True):  # several row groups each: all are read
        write_img2dataset_parquet(folder / name.replace(".tar", ".parquet"), n)
    found = find_counts(str(folder), NAMES, locations, user_counts=str(user))
    assert found.counts == SAMPLE_SHARDS and found.sizes == [-1] * 4 and "parquet" in found.source
    table = open_shard_set(f"{folder}/*.tar", data_cfg=cfg_for("x", tmp_path).data, counts=True)
    assert isinstance(table.indexes[0], LazySetIndex) and table.indexes[0].scanned == 0
    indexed = open_shard_set(f"{SAMPLE}/*.tar", data_cfg=cfg_for("x", tmp_path).data, counts=True)
    shard_2 = range(sum(SAMPLE_SHARDS[:2]), sum(SAMPLE_SHARDS[:3]))  # its rows built on first read, as indexed
    assert [table.label(i) for i in shard_2] == [indexed.label(i) for i in shard_2]
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # without the parquet extra: said, and the set is indexed
    assert find_counts(str(folder), NAMES, locations) is None
    assert "pip install 'mimscale[parquet]'" in capsys.readouterr().err
    monkeypatch.undo()
    for name, n in zip(NAMES, [5, 6, 7, 8], strict=True):  # img2dataset's stats files, beside them, come first
        write_json(folder / name.replace(".tar", "_stats.json"), {"successes": n})
    assert find_counts(str(folder), NAMES, locations).counts == [5, 6, 7, 8]


def test_a_parquet_count_that_disagrees_with_the_tar_is_named(tmp_path):
    pytest.importorskip("pyarrow.parquet")
    folder = bare_copy(tmp_path)
    for name, n in zip(NAMES, [120, 104, 89, 72], strict=True):  # sample-002.tar holds 88
        write_img2dataset_parquet(folder / name.replace(".tar", ".parquet"), n)
    table = open_shard_set(f"{folder}/*.tar", data_cfg=cfg_for("x", tmp_path).data, counts=True)
    with pytest.raises(ShardError) as caught:
        table.read(sum(SAMPLE_SHARDS[:2]))
    message = str(caught.value)
    assert "sample-002.tar" in message and "sample-000.parquet" in message
    assert "says 89 samples" in message and "holds 88" in message


def hostile_parquet(folder: Path, kind: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = folder / "sample-001.parquet"
    good = write_img2dataset_parquet(target, 104).read_bytes()
    if kind == "truncated":
        target.write_bytes(good[: len(good) // 2])
    elif kind == "footer_lies":  # the footer length claims more than the file holds
        target.write_bytes(good[:-8] + (1 << 31 - 1).to_bytes(4, "little") + b"PAR1")
    elif kind == "not_parquet":
        target.write_bytes(b"PAR1" + bytes(64) + b"PAR1")
    elif kind == "no_status":
        pq.write_table(pa.table({"key": ["a"], "state": ["success"]}), target)
    elif kind == "number_status":
        pq.write_table(pa.table({"status": [1, 2]}), target)
    elif kind == "directory":
        target.unlink()
        target.mkdir()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "not a readable parquet file"),
        ("footer_lies", "not a readable parquet file"),
        ("not_parquet", "not a readable parquet file"),
        ("no_status", "no 'status' column"),
        ("number_status", "'status' column holds int64, not text"),
        ("directory", "cannot be read"),
    ],
)
def test_hostile_parquet_files_are_refused_naming_the_file(tmp_path, kind, message):
    pytest.importorskip("pyarrow.parquet")
    folder = bare_copy(tmp_path)
    for name, n in zip(NAMES, SAMPLE_SHARDS, strict=True):
        write_img2dataset_parquet(folder / name.replace(".tar", ".parquet"), n)
    hostile_parquet(folder, kind)
    with pytest.raises(ShardError) as caught:
        find_counts(str(folder), NAMES, {name: str(folder / name) for name in NAMES})
    assert "sample-001.parquet" in str(caught.value) and message in str(caught.value)


def test_parquet_files_are_read_bounded_locally_and_over_http(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow.parquet")
    from http_serve import ShardServer

    folder = bare_copy(tmp_path)
    for name, n in zip(NAMES, SAMPLE_SHARDS, strict=True):
        write_img2dataset_parquet(folder / name.replace(".tar", ".parquet"), n)
    locations = {name: str(folder / name) for name in NAMES}
    with ShardServer(folder) as server:
        urls = {name: server.url(name) for name in NAMES}
        found = find_counts(server.url("").rstrip("/"), NAMES, urls)
        assert found.counts == SAMPLE_SHARDS and all(server.requests[n.replace(".tar", ".parquet")] == 1 for n in NAMES)
        assert not any(server.requests[name] for name in NAMES)  # counted without a byte of a tar
        monkeypatch.setattr(counts_module, "MAX_PARQUET_BYTES", 512)
        with pytest.raises(ShardError, match="sample-000.parquet"):
            find_counts(server.url("").rstrip("/"), NAMES, urls)
    with pytest.raises(ShardError, match=r"sample-000.parquet: larger than 512 bytes"):
        find_counts(str(folder), NAMES, locations)
    monkeypatch.setattr(counts_module, "MAX_PARQUET_BYTES", 1 << 20)
    monkeypatch.setattr(counts_module, "MAX_PARQUET_ROWS", 100)  # the metadata's row count, checked before reading
    with pytest.raises(ShardError, match=r"sample-000.parquet: 124 rows; a shard's parquet has at most 100"):
        find_counts(str(folder), NAMES, locations)
    monkeypatch.setattr(counts_module, "MAX_PARQUET_ROWS", 1 << 24)
    monkeypatch.setattr(counts_module, "MAX_STATUS_BYTES", 100)
    with pytest.raises(ShardError, match=r"sample-000.parquet: its 'status' column is \d+ bytes decompressed"):
        find_counts(str(folder), NAMES, locations)


# ----------------------------------------------------------------------------------------------- the lazy path


def test_a_counted_set_streams_the_same_ids_and_labels_as_the_indexed_set(tmp_path):
    folder = bare_copy(tmp_path)
    write_json(folder / "shardindex.json", wids_index([f"s3://bucket/sample/{n}" for n in NAMES], SAMPLE_SHARDS))
    indexed = streamed(cfg_for(f"{SAMPLE}/*.tar", tmp_path))
    table = open_shard_set(f"{folder}/*.tar", data_cfg=cfg_for(f"{folder}/*.tar", tmp_path).data, counts=True)
    assert isinstance(table.indexes[0], LazySetIndex) and table.indexes[0].scanned == 0  # started without a scan
    counted = streamed(cfg_for(f"{folder}/*.tar", tmp_path))
    assert counted == indexed  # ids, labels and the data state (fingerprint included), two epochs' worth
    assert not (folder / "samples.idx").exists() and not list((tmp_path / "cache").rglob("*.idx"))
    kept = sorted(path.name for path in (tmp_path / "cache").rglob("*.rows") if path.is_file())
    assert kept == [f"{name}.rows" for name in NAMES]  # each shard's rows, kept once on this node
    again = open_shard_set(f"{folder}/*.tar", data_cfg=cfg_for(f"{folder}/*.tar", tmp_path).data, counts=True)
    assert [again.label(i) for i in range(len(again))] == [table.label(i) for i in range(len(table))]
    assert again.indexes[0].scanned == 0  # the kept rows served it
    full = SetIndex(SAMPLE / "samples.idx")
    assert np.array_equal(again.indexes[0].shard_rows(2), full.shard_rows(2))
    shutil.rmtree(tmp_path / "cache")  # DataLoader workers: each builds (and keeps) the rows of what it reads
    workers = streamed(cfg_for(f"{folder}/*.tar", tmp_path, "data.num_workers=2"), batches=8)
    assert workers[0] == indexed[0][:128] and workers[1] == indexed[1][:128]


def test_an_index_beside_the_shards_still_wins_over_counts(tmp_path):
    folder = bare_copy(tmp_path)
    shutil.copy(SAMPLE / "samples.idx", folder / "samples.idx")
    write_json(folder / "shardindex.json", wids_index(NAMES, [1, 1, 1, 1]))
    table = open_shard_set(f"{folder}/*.tar", data_cfg=cfg_for("x", tmp_path).data, counts=True)
    assert isinstance(table.indexes[0], SetIndex) and list(table.counts) == SAMPLE_SHARDS


def test_a_wrong_count_is_named_or_skipped_as_corrupt(tmp_path):
    folder = bare_copy(tmp_path)
    wrong = [120, 104, 90, 72]  # sample-002.tar holds 88
    write_json(folder / "shardindex.json", wids_index(NAMES, wrong))
    with pytest.raises(ShardError) as caught:
        streamed(cfg_for(f"{folder}/*.tar", tmp_path))
    message = str(caught.value)
    assert "sample-002.tar" in message and "says 90 samples" in message and "holds 88" in message
    assert "data.count_mismatch=skip" in message
    ids, _, state = streamed(cfg_for(f"{folder}/*.tar", tmp_path, "data.count_mismatch=skip"))
    assert state["num_samples"] == sum(wrong) and state["corrupt_count"] > 0  # the order kept its 384 + 2
    first_shard_2 = sum(wrong[:2])  # its samples were replaced by the next of their streams, none served
    assert not any(first_shard_2 <= i < first_shard_2 + wrong[2] for i in ids)


def test_a_wrong_file_size_is_named(tmp_path):
    folder = bare_copy(tmp_path)
    sizes = [(folder / n).stat().st_size for n in NAMES]
    write_json(folder / "shardindex.json", wids_index(NAMES, SAMPLE_SHARDS, [sizes[0] + 512, *sizes[1:]]))
    table = open_shard_set(f"{folder}/*.tar", data_cfg=cfg_for("x", tmp_path).data, counts=True)
    with pytest.raises(ShardError, match=rf"sample-000.tar is {sizes[0]} bytes but .*shardindex.json says"):
        table.read(0)


# ----------------------------------------------------------------------------------------------- remote


def jpeg(number: int) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(number).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format="JPEG", quality=70)
    return out.getvalue()


def test_a_remote_counted_set_downloads_only_what_it_streams(tmp_path):
    """16 shards, 2 streams, windows of 1 shard: the first batches read (and fetch ahead) 4 shards, no more."""
    from http_serve import ShardServer

    served = tmp_path / "served"
    served.mkdir()
    names = [f"{n:05d}.tar" for n in range(16)]
    for number, name in enumerate(names):
        samples = [(f"{number}_{k}", {"jpg": jpeg(number * 100 + k), "cls": str(k % 3).encode()}) for k in range(8)]
        write_shard(served / name, samples)
        write_json(served / name.replace(".tar", "_stats.json"), {"successes": 8, "count": 8})
    with ShardServer(served) as server:
        cfg = cfg_for(
            server.url("{00000..00015}.tar"), tmp_path, "data.streams=2", "data.shuffle_window=1", "data.batch_size=4"
        )
        stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK)
        got = list(itertools.islice(iter(stream), 2))
        tars = {name: n for name, n in server.requests.items() if name.endswith(".tar")}
    assert len(got) == 2 and stream.num_samples == 16 * 8
    assert all(n == 1 for n in tars.values())  # no byte twice
    assert 1 <= len(tars) <= 4, tars  # the first window of each stream and the one fetched ahead
    assert server.requests["samples.idx"] <= 1 and server.requests["shardindex.json"] == 1
    assert sum(server.requests[n.replace(".tar", "_stats.json")] for n in names) == 16
    assert not list((tmp_path / "cache/index").glob("*.idx"))  # no samples.idx built: rows per shard read


# ----------------------------------------------------------------------------------------------- split indexing


SAMPLE_IDX_SHA256 = "1557969619d265260504a0704c4c43d1bee3b6747979e9ed775af716483753d9"  # tests/test_data_pins.py


def test_shards_index_split_across_nodes_joins_into_the_same_bytes(tmp_path, capsys):
    """Where no counts exist: three "nodes" each index their share (--part K/3), one joins the pieces; the joined
    samples.idx is byte for byte the one a single `shards index` writes, for a local folder and a URL set."""
    import hashlib

    from http_serve import ShardServer

    from mimscale.cli import main as cli_main

    folder, pieces = bare_copy(tmp_path), tmp_path / "pieces"
    for part in (2, 0):
        assert cli_main(["shards", "index", str(folder), "--part", f"{part}/3", "--out", str(pieces)]) == 0
    assert cli_main(["shards", "index", str(folder), "--join", str(pieces)]) != 0
    assert "pieces [1] of 3 are missing" in capsys.readouterr().err and not (folder / "samples.idx").exists()
    assert cli_main(["shards", "index", str(folder), "--part", "1/3", "--out", str(pieces)]) == 0
    assert sorted(p.name for p in pieces.iterdir()) == [f"samples.idx.part-{k}-of-3" for k in range(3)]
    shares = [SetIndex(pieces / f"samples.idx.part-{k}-of-3").names for k in range(3)]
    assert shares == [NAMES[:1], NAMES[1:2], NAMES[2:]]  # contiguous, near-equal shares
    assert cli_main(["shards", "index", str(folder), "--join", str(pieces)]) == 0
    assert hashlib.sha256((folder / "samples.idx").read_bytes()).hexdigest() == SAMPLE_IDX_SHA256
    served, url_pieces = bare_copy(tmp_path, "served"), tmp_path / "url-pieces"
    with ShardServer(served) as server:
        pattern, cache = server.url("sample-{000..003}.tar"), str(tmp_path / "cache")
        for part in range(2):
            args = ["shards", "index", pattern, "--part", f"{part}/2", "--out", str(url_pieces), "--cache", cache]
            assert cli_main(args) == 0
        assert all(server.requests[name] == 1 for name in NAMES)  # each shard downloaded by one node, once
        assert cli_main(["shards", "index", pattern, "--join", str(url_pieces), "--cache", cache]) == 0
    [joined] = (tmp_path / "cache/index").glob("*.idx")
    assert hashlib.sha256(joined.read_bytes()).hexdigest() == SAMPLE_IDX_SHA256
    (url_pieces / "samples.idx.part-1-of-2").write_bytes(b"MIMSIDX\0" + bytes(100))  # a damaged piece is named
    assert cli_main(["shards", "index", pattern, "--join", str(url_pieces), "--cache", cache]) != 0
    assert "part-1-of-2 is unusable" in capsys.readouterr().err
