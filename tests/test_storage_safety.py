"""What the node cache may write, delete and serve, what a pipe: or signed location may lead to, and bounded time and
memory on hostile input (issue 20, sections 1-4 and 7's cache messages): real HTTP server, real files, real mounts."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from http_serve import ShardServer

from mimscale.config import DataConfig
from mimscale.shards import index as idx
from mimscale.shards.format import ShardError
from mimscale.shards.sets import open_shard_set as load_table
from mimscale.storage import shard_cache
from mimscale.storage.atomic import atomic_output
from mimscale.storage.remote import RemoteError
from mimscale.storage.shard_cache import ShardCache

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "shards/sample"
NAMES = [f"sample-00{n}.tar" for n in range(4)]
SIZES = {name: (SAMPLE / name).stat().st_size for name in NAMES}


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_in(folder: Path, limit: int = 10**9, **options) -> ShardCache:
    return ShardCache(folder, limit, **{"backoff_s": 0.01, "timeout_s": 20.0, **options})


# ----------------------------------------------------------------------------------------------- 1. write, delete


def test_eviction_never_deletes_or_counts_files_the_cache_did_not_write(tmp_path, server, capsys):
    folder = tmp_path / "cache"
    folder.mkdir()
    own_data, notes = folder / "my-own-data.tar", folder / "notes.txt"
    own_data.write_bytes(b"\1" * 900_000)  # larger than the whole limit: counting it would stop every download
    notes.write_text("mine")
    cache = cache_in(folder, limit=SIZES[NAMES[0]] + 1, space_wait_s=0.5)
    for name in NAMES:  # room for one shard at a time: each download evicts the previous one
        url = server.url(name)
        cache.expect(url, SIZES[name])
        assert sha(cache.local_path(url)) == sha(SAMPLE / name)
        cache.release(url)
    assert own_data.read_bytes() == b"\1" * 900_000 and notes.read_text() == "mine"
    assert cache.usage() <= cache.limit
    message = capsys.readouterr().err
    assert "holds 2 file(s) it did not write (my-own-data.tar, notes.txt); they are left untouched" in message
    cache.close()


def test_planted_lock_links_are_refused_and_never_followed(tmp_path, server):
    cache = cache_in(tmp_path / "cache")
    url = server.url(NAMES[0])
    victim = tmp_path / "outside" / "created-by-mimscale"
    victim.parent.mkdir()
    os.symlink(victim, cache.dir / ".locks" / cache.path_for(url).name)
    with pytest.raises(RemoteError, match=r"\.locks/.*-sample-000.tar is a symbolic link; .* never follows links"):
        cache.local_path(url)
    assert not victim.exists() and server.requests[NAMES[0]] == 0
    cache.close()
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / ".locks").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(RemoteError, match=r"planted/.locks is a link or not a folder"):
        cache_in(planted)
    assert os.listdir(tmp_path / "outside") == []


# ----------------------------------------------------------------------------------------------- 2. what we trust


def test_a_poisoned_cached_shard_is_dropped_and_fetched_again(tmp_path, server, capsys):
    cache = cache_in(tmp_path / "cache")
    url = server.url(NAMES[1])
    cache.expect(url, SIZES[NAMES[1]])
    path = cache.local_path(url)
    cache.release(url)
    record = json.loads((cache.dir / ".records" / path.name).read_text())
    assert record["sha256"] == sha(SAMPLE / NAMES[1]) and record["bytes"] == SIZES[NAMES[1]]
    mtime = path.stat().st_mtime_ns
    with open(path, "r+b") as handle:  # same size, same mtime: only the bytes (and the ctime) change
        handle.write(b"poison" * 100)
    os.utime(path, ns=(mtime, mtime))
    assert sha(cache.local_path(url)) == sha(SAMPLE / NAMES[1])
    assert server.requests[NAMES[1]] == 2 and "changed since it was downloaded" in capsys.readouterr().err
    cache.release(url)
    other = server.url(NAMES[2])  # planted under the cache's own name before any download: no record, never served
    cache.path_for(other).write_bytes(b"\0" * SIZES[NAMES[2]])
    assert sha(cache.local_path(other)) == sha(SAMPLE / NAMES[2])
    assert "has no record of its download" in capsys.readouterr().err
    cache.release(other)
    cache.expect(other, sha256="0" * 64)  # the manifest disagrees with what was recorded: dropped, refetch refused
    cache.retries = 0
    with pytest.raises(RemoteError, match="differs from the manifest's 000000"):
        cache.local_path(other)
    assert "the manifest says 000000" in capsys.readouterr().err and not cache.path_for(other).exists()
    cache.close()


def test_the_default_cache_folder_is_private(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = Path(shard_cache.cache_dir_for(""))
    assert folder.parent == tmp_path and folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o777)
    with pytest.raises(RemoteError, match=r"is writable by group and others \(mode 777\): another user could plant"):
        shard_cache.cache_dir_for("")
    folder.chmod(0o700)
    if os.getuid() == 0:  # only root can give a folder away
        os.chown(folder, 12345, -1)
        with pytest.raises(RemoteError, match=r"is owned by uid 12345, not by you .* set data.cache_dir"):
            shard_cache.cache_dir_for("")
    assert shard_cache.cache_dir_for(str(tmp_path / "mine")) == str(tmp_path / "mine")  # a named folder is the user's


# ----------------------------------------------------------------------------------------------- 3. pipe:, signed


def test_a_pipe_set_runs_one_command_per_shard_and_nothing_else(tmp_path):
    log = tmp_path / "commands.log"
    script = tmp_path / "fetch.sh"
    script.write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec cat "$1"\n')
    pattern = f"pipe:sh {script} {SAMPLE}/sample-{{000..003}}.tar"
    local = load_table(str(SAMPLE), "data.shards")
    table = load_table(pattern, "data.shards", data_cfg=DataConfig(cache_dir=str(tmp_path / "c1")))
    assert sorted(log.read_text().split()) == [str(SAMPLE / name) for name in NAMES]  # never samples.idx / manifest
    assert table.fingerprint == local.fingerprint and list(table.counts) == list(local.counts)
    log.unlink()
    named = DataConfig(cache_dir=str(tmp_path / "c2"), index=str(SAMPLE / "samples.idx"))
    table = load_table(pattern, "data.shards", data_cfg=named)  # data.index: nothing downloaded to index
    assert not log.exists() and table.fingerprint == local.fingerprint
    assert table.read(0) == local.read(0) and sorted(log.read_text().split()) == [str(SAMPLE / NAMES[0])]
    missing = DataConfig(cache_dir=str(tmp_path / "c3"), index=str(tmp_path / "nothing.idx"))
    with pytest.raises(ShardError, match="data.index=.*nothing.idx' does not exist"):
        load_table(pattern, "data.shards", data_cfg=missing)


def test_signed_urls_are_never_edited_to_look_for_siblings(tmp_path, server):
    server.require_query = "X-Amz-Signature=good"
    query = "?X-Amz-Credential=AKIA/20261202/us-east-1/s3/aws4_request&X-Amz-Signature=good"
    pattern = server.url("sample-{000..003}.tar") + query
    table = load_table(pattern, "data.shards", data_cfg=DataConfig(cache_dir=str(tmp_path / "c")))
    local = load_table(str(SAMPLE), "data.shards")
    assert server.requests["samples.idx"] == server.requests["manifest.json"] == 0
    assert all(server.requests[name] == 1 for name in NAMES)
    assert table.fingerprint == local.fingerprint  # re-signed URLs (or a local copy) are the same shards
    assert table.read(len(table) - 1) == local.read(len(local) - 1)


# ----------------------------------------------------------------------------------------------- 4. time, memory


def test_a_trickling_server_is_cut_off_by_the_download_deadline(tmp_path, server):
    size = SIZES[NAMES[3]]
    server.trickle_s = 0.1  # one byte per 0.1 s: every read returns well within the 5 s per-read timeout
    server.faults[NAMES[3]] = ["trickle", "trickle"]
    cache = cache_in(tmp_path / "cache", retries=1, timeout_s=5.0, min_rate=size / 1.0)  # deadline 1 s + 5 s
    url = server.url(NAMES[3])
    started = time.monotonic()
    with pytest.raises(RemoteError, match=r"slower than data.download_min_rate=.* \(2 attempts"):
        cache.local_path(url)
    assert time.monotonic() - started < 45 and server.requests[NAMES[3]] == 2
    assert sha(cache.local_path(url)) == sha(SAMPLE / NAMES[3])  # the next, normal answer is used
    cache.close()


def test_download_min_rate_and_index_are_config_keys(tmp_path):
    from mimscale.config import ConfigError, load_config

    cfg = load_config(overrides=["data.download_min_rate=2500", f"data.index={tmp_path / 'set.idx'}"])
    assert cfg.data.index == str(tmp_path / "set.idx")
    assert ShardCache.from_config(DataConfig(cache_dir=str(tmp_path), download_min_rate=2500)).min_rate == 2500
    with pytest.raises(ConfigError, match="data.download_min_rate"):
        load_config(overrides=["data.download_min_rate=0"])


def _forge_index(path: Path, names: list[str], table: list[tuple[int, int, int]], samples: int | None = None) -> None:
    """An index file written by hand (header, shard table, names, rows), to say what a hostile one may say."""
    blob = "\n".join(names).encode()
    rows_at = idx._layout(len(names), len(blob))[1]
    total = sum(row[1] for row in table) % 2**64 if samples is None else samples
    with open(path, "wb") as handle:
        handle.write(idx.HEADER.pack(idx.MAGIC, idx.VERSION, 0, len(names), total, len(blob)))
        handle.write(np.array(table, dtype=idx.SHARD_DTYPE).tobytes() + blob)
        handle.truncate(rows_at + total * idx.SAMPLE_DTYPE.itemsize)


def test_hostile_index_headers_are_refused_before_anything_is_allocated(tmp_path):
    sparse = tmp_path / "sparse.idx"
    shards, name_bytes = 10**7, 16 * 10**7
    with open(sparse, "wb") as handle:  # 4 KB on disk, 400 MB claimed
        handle.write(idx.HEADER.pack(idx.MAGIC, idx.VERSION, 0, shards, 0, name_bytes))
        handle.truncate(idx._layout(shards, name_bytes)[1])
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(idx.IndexFileError, match=f"header claims {shards} shards .* beyond the"):
            idx.SetIndex(sparse)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20 and time.monotonic() - started < 5
    sample = idx.SetIndex(SAMPLE / "samples.idx")
    counts, sizes = [int(c) for c in sample.counts], [int(b) for b in sample.shard_bytes]
    wrapped = tmp_path / "wrapped.idx"  # 2^64-1 samples read as -1 would balance the extra one: the sum still matches
    _forge_index(
        wrapped,
        NAMES[:2],
        [(sizes[0], counts[0] + counts[1] + 1, 0), (sizes[1], 2**64 - 1, 0)],
        samples=counts[0] + counts[1],
    )
    with pytest.raises(idx.IndexFileError, match="out of range .a wrapped 64-bit value"):
        idx.SetIndex(wrapped)
    for hostile in ("../../../../etc/passwd", "..", "a\0b.tar"):
        path = tmp_path / "names.idx"
        _forge_index(path, [hostile, NAMES[1]], [(sizes[0], 0, 0), (sizes[1], 0, 0)])
        with pytest.raises(idx.IndexFileError, match="is not a plain file name"):
            idx.SetIndex(path)


# ----------------------------------------------------------------------------------------------- 7. messages


def test_a_shard_the_cache_cannot_fetch_stops_the_stream_by_name_not_as_corrupt_samples(tmp_path):
    served = tmp_path / "served"
    shutil.copytree(SAMPLE, served)
    with ShardServer(served) as server:
        pattern = server.url("sample-{000..003}.tar")
        table = load_table(
            pattern, "data.shards", data_cfg=DataConfig(cache_dir=str(tmp_path / "c"), download_retries=0)
        )
        (served / NAMES[3]).unlink()  # gone from the store after the index was read
        with pytest.raises(RemoteError, match=r"sample-003.tar: HTTP 404"):
            table.read(len(table) - 1)  # the last sample lies in sample-003.tar, not yet cached


def _in_small_mount(tmp_path: Path, code: str, *, read_only: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` with a 300 KB tmpfs at tmp_path/mnt in a private mount namespace (root or user namespaces)."""
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed")
    mount = tmp_path / "mnt"
    mount.mkdir(parents=True)
    steps = f"mount -t tmpfs -o size=300k tmpfs {mount} && mkdir -p {mount}/c/.locks {mount}/c/.records"
    if read_only:
        steps += f" && mount -o remount,ro {mount}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    flags = ["-m"] if os.getuid() == 0 else ["-r", "-m"]
    probe = subprocess.run(["unshare", *flags, "sh", "-c", f"mount -t tmpfs tmpfs {mount}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a private namespace here: {probe.stderr.decode()[:200]}")
    command = [sys.executable, "-c", code]
    return subprocess.run(
        ["unshare", *flags, "sh", "-c", f'{steps} && exec "$@"', "sh", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_full_or_read_only_cache_folder_is_named(tmp_path, server):
    folder = tmp_path / "mnt" / "c"
    code = (
        "from mimscale.storage.shard_cache import ShardCache\n"
        f"cache = ShardCache({str(folder)!r}, 10**9, retries=2, backoff_s=0.01)\n"
        f"cache.expect({server.url(NAMES[0])!r}, {SIZES[NAMES[0]]})\n"  # known size: refused while reserving
        f"for url in ({server.url(NAMES[0])!r}, {server.url(NAMES[1])!r}):\n"  # unknown size: refused while writing
        "    try:\n        cache.local_path(url)\n    except Exception as err:\n"
        "        print(type(err).__name__, err)\n"
    )
    result = _in_small_mount(tmp_path, code)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith(f"RemoteError no space left on {folder} while reserving {SIZES[NAMES[0]]} bytes")
    assert lines[1].startswith(f"RemoteError no space left on {folder} while downloading {server.url(NAMES[1])}")
    assert server.requests[NAMES[0]] == 0 and server.requests[NAMES[1]] == 1  # a full disk is not retried
    code = (
        "from mimscale.storage.shard_cache import ShardCache\n"
        f"try:\n    ShardCache({str(folder)!r}, 10**9)\nexcept Exception as err:\n    print(type(err).__name__, err)\n"
    )
    folder = tmp_path / "ro" / "mnt" / "c"
    code = code.replace(str(tmp_path / "mnt" / "c"), str(folder))
    result = _in_small_mount(tmp_path / "ro", code, read_only=True)
    assert result.stdout.startswith("RemoteError the shard cache folder"), result.stdout + result.stderr
    assert "is not writable (Read-only file system) while creating the lock file .cache" in result.stdout


def test_inspect_names_a_manifest_whose_classes_is_not_a_list(tmp_path):
    from mimscale.shards.cli import cmd_inspect

    shutil.copytree(SAMPLE, tmp_path / "set")
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    manifest["classes"] = 5
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(manifest))
    args = argparse.Namespace(out=str(tmp_path / "set"), cache="", sheet="", count=4)
    with pytest.raises(ShardError, match=r'manifest.json: "classes" must be a list of class names, got int 5'):
        cmd_inspect(args)


def test_atomic_output_streams_into_place_and_a_failure_keeps_the_old_file(tmp_path):
    """The streaming form of the one atomic writer (shards, samples.idx, downloads): readers see the old file until
    the block ends, a failure removes the temporary file, and a link planted at a known temporary name is replaced,
    never written through."""
    target = tmp_path / "shard.tar"
    target.write_bytes(b"old")
    with atomic_output(target) as sink:
        sink.write(b"new ")
        sink.write(b"content")
        assert target.read_bytes() == b"old"
        assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 1
    assert target.read_bytes() == b"new content" and (target.stat().st_mode & 0o777) == 0o644
    with pytest.raises(RuntimeError, match="mid-write"), atomic_output(target) as sink:
        sink.write(b"half")
        raise RuntimeError("mid-write")
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.tar"]
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep")
    (tmp_path / "shard.tar.tmp").symlink_to(precious)
    with atomic_output(target, temp=tmp_path / "shard.tar.tmp") as sink:
        sink.write(b"third")
    assert target.read_bytes() == b"third" and precious.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "shard.tar"]
    (tmp_path / "folder").mkdir()
    with (
        pytest.raises(IsADirectoryError, match="folder where mimscale writes a file"),
        atomic_output(tmp_path / "folder"),
    ):
        pass
