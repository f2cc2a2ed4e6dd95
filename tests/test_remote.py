"""Remote shard locations and the node-local cache, through a real HTTP server on 127.0.0.1 and real processes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from http_serve import ShardServer

from mimscale.storage import remote, shard_cache
from mimscale.storage.remote import RemoteError, RemoteNotFound
from mimscale.storage.shard_cache import ShardCache

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "shards/sample"
NAMES = [f"sample-00{n}.tar" for n in range(4)]
SHARD_BYTES = (SAMPLE / NAMES[0]).stat().st_size


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_in(tmp_path: Path, limit: int = 10**9, **options) -> ShardCache:
    options = {"backoff_s": 0.01, "timeout_s": 20.0, **options}
    return ShardCache(tmp_path / "cache", limit, **options)


def run_python(code: str, **kwargs) -> subprocess.Popen:
    """A fresh interpreter on this tree (PYTHONPATH kept, so subprocesses test this checkout, not main)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def test_expand_urls_local_paths_and_errors(tmp_path, server):
    assert remote.expand(server.url("sample-{000..001}.tar") + "::" + server.url("sample-003.tar")) == [
        server.url(NAMES[0]),
        server.url(NAMES[1]),
        server.url(NAMES[3]),
    ]
    assert remote.expand("pipe:cat /d/x-{0..1}.tar") == ["pipe:cat /d/x-0.tar", "pipe:cat /d/x-1.tar"]
    assert remote.expand(f"file://{SAMPLE}/sample-{{000..001}}.tar") == [str(SAMPLE / n) for n in NAMES[:2]]
    assert remote.expand(str(SAMPLE)) == [str(SAMPLE / n) for n in NAMES]
    assert remote.is_url("s3://b/k.tar") and remote.is_url("pipe:cat x") and not remote.is_url("/data/x.tar")
    with pytest.raises(RemoteError, match=r"data.shards='ftp://h/x.tar': unknown scheme 'ftp://'"):
        remote.expand("ftp://h/x.tar")
    with pytest.raises(RemoteError, match="HTTP server cannot be listed; name the shards with a brace pattern"):
        remote.expand(server.url("*.tar"))
    with pytest.raises(RemoteError, match="eval.val_shards is empty"):
        remote.expand(" ", key="eval.val_shards")
    (tmp_path / "a.tar").write_bytes(b"")
    os.mkfifo(tmp_path / "b.tar")
    with pytest.raises(RemoteError, match="b.tar is not a regular file"):
        remote.expand(str(tmp_path))
    with pytest.raises(RemoteError, match="1 shard file.s. do not exist"):
        remote.expand(str(tmp_path / "{a,c}.tar"))


def test_http_shards_through_the_cache_match_the_files(tmp_path, server):
    cache = cache_in(tmp_path)
    urls = [server.url(name) for name in NAMES]
    cache.prefetch(urls)
    for url, name in zip(urls, NAMES, strict=True):
        path = cache.local_path(url)
        assert path.parent == cache.dir and sha(path) == sha(SAMPLE / name)
        cache.release(url)
    assert cache.local_path(str(SAMPLE / NAMES[0])) == SAMPLE / NAMES[0]  # local paths pass through
    assert all(server.requests[name] == 1 for name in NAMES)  # prefetch and local_path share one download
    assert cache.usage() == sum((SAMPLE / n).stat().st_size for n in NAMES)
    assert not [p for p in cache.dir.iterdir() if ".part-" in p.name]
    assert remote.read_small(server.url("manifest.json"), 1 << 20) == (SAMPLE / "manifest.json").read_bytes()
    with pytest.raises(RemoteError, match=r"manifest.json is \d+ bytes, more than the 100 allowed"):
        remote.read_small(server.url("manifest.json"), 100)
    with pytest.raises(RemoteNotFound, match="HTTP 404"):
        remote.read_small(server.url("nothing.json"), 100)
    assert server.requests["nothing.json"] == 1  # a 404 is not retried
    cache.close()


def test_bounded_reads_and_manifest_checks(tmp_path, server):
    cache = cache_in(tmp_path, retries=1)
    url, size = server.url(NAMES[1]), (SAMPLE / NAMES[1]).stat().st_size
    cache.expect(url, size, "0" * 64)
    with pytest.raises(RemoteError, match=rf"could not read {url}: sha256 .* differs from the manifest's 000000"):
        cache.local_path(url)
    cache.expect(url, size, sha(SAMPLE / NAMES[1]))
    server.faults[NAMES[1]] = ["long"]
    with pytest.raises(RemoteError, match=rf"{url}: the source reports {size + 100} bytes but the manifest"):
        cache.local_path(url)
    server.faults[NAMES[1]] = ["extra"]  # no Content-Length, 100 bytes more than the manifest says
    with pytest.raises(RemoteError, match=rf"{url}: the source sent more than the {size} bytes expected"):
        cache.local_path(url)
    assert not list(cache.dir.glob("*sample-001.tar")) and not list(cache.dir.glob(".*part*"))
    assert sha(cache.local_path(url)) == sha(SAMPLE / NAMES[1])
    for hostile in (Path("/dev/zero"), tmp_path / "fifo"):
        if hostile.name == "fifo":
            os.mkfifo(hostile)
        with pytest.raises(RemoteError, match="is not a regular file"):
            remote.read_small(str(hostile), 100)
    os.symlink("/dev/zero", tmp_path / "zero.json")
    with pytest.raises(RemoteError, match="is not a regular file"):
        remote.read_small(f"file://{tmp_path}/zero.json", 100)
    cache.close()


def test_network_errors_are_retried_then_stop_with_the_url(tmp_path, server):
    cache = cache_in(tmp_path, retries=3)
    url = server.url(NAMES[2])
    server.faults[NAMES[2]] = ["500", "close", "500"]
    assert sha(cache.local_path(url)) == sha(SAMPLE / NAMES[2]) and server.requests[NAMES[2]] == 4
    server.faults[NAMES[3]] = ["500"] * 2 + ["close"] * 2
    with pytest.raises(RemoteError, match=rf"could not read {server.url(NAMES[3])}: the transfer ended after \d+ of"):
        cache.local_path(server.url(NAMES[3]))
    assert server.requests[NAMES[3]] == 4  # 1 + 3 retries
    server.faults[NAMES[3]] = ["500"] * 4
    with pytest.raises(RemoteError, match=r"HTTP 500 injected failure \(4 attempts"):
        cache.local_path(server.url(NAMES[3]))
    with pytest.raises(RemoteNotFound, match="missing.tar: HTTP 404"):
        cache.local_path(server.url("missing.tar"))
    dead = ShardServer(SAMPLE)  # bound, never started: connection refused
    dead._httpd.server_close()
    with pytest.raises(RemoteError, match=rf"could not read {dead.url(NAMES[0])}: .*(refused|Errno)"):
        cache.local_path(dead.url(NAMES[0]))
    cache.close()


def test_killed_download_leaves_no_partial_file_and_no_stuck_lock(tmp_path, server):
    """A downloader is killed mid-body while a second process waits for the same shard: the waiter takes over,
    nobody ever sees the half file, and its leftover is cleaned."""
    url = server.url(NAMES[0])
    server.faults[NAMES[0]] = ["hang"]
    code = (
        f"from mimscale.storage.shard_cache import ShardCache; import hashlib; "
        f"p = ShardCache({str(tmp_path / 'cache')!r}, 10**9, backoff_s=0.01).local_path({url!r}); "
        f"print(hashlib.sha256(p.read_bytes()).hexdigest())"
    )
    first = run_python(code)
    assert server.hanging.wait(60), first.communicate()
    parts = list((tmp_path / "cache").glob(".*.part-*"))
    assert len(parts) == 1 and not list((tmp_path / "cache").glob("*sample-000.tar"))
    waiter = run_python(code)
    time.sleep(1.0)
    assert waiter.poll() is None  # blocked on the downloader's lock, not downloading too
    assert server.requests[NAMES[0]] == 1
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert out.strip() == sha(SAMPLE / NAMES[0]) and server.requests[NAMES[0]] == 2
    assert not list((tmp_path / "cache").glob(".*.part-*"))  # the killed download's half file is gone


def test_one_download_per_node_with_racing_processes(tmp_path):
    go = tmp_path / "go"
    with ShardServer(SAMPLE, latency_s=0.3) as server:
        urls = [server.url(NAMES[0]), server.url(NAMES[1])]
        code = (
            f"import os, time, hashlib; from mimscale.storage.shard_cache import ShardCache\n"
            f"c = ShardCache({str(tmp_path / 'cache')!r}, 10**9)\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            f"c.prefetch({urls!r})\n"
            f"print(' '.join(hashlib.sha256(c.local_path(u).read_bytes()).hexdigest() for u in {urls!r}))"
        )
        racers = [run_python(code) for _ in range(3)]
        time.sleep(2.0)  # let every interpreter start and wait at the line
        go.touch()
        results = [racer.communicate(timeout=120) for racer in racers]
        assert all(racer.returncode == 0 for racer in racers), [err for _out, err in results]
        expected = f"{sha(SAMPLE / NAMES[0])} {sha(SAMPLE / NAMES[1])}"
        assert [out.strip() for out, _err in results] == [expected] * 3
        assert server.requests[NAMES[0]] == 1 and server.requests[NAMES[1]] == 1


def test_a_reader_pinning_the_file_never_blocks_a_process_that_found_it_missing(tmp_path, server, monkeypatch):
    """Two ranks start together: one sees no file, the other downloads it and pins it for its whole life (the
    published index). The first must then find the file, not wait for an exclusive lock behind that pin (the old
    code hung the 2-rank remote resume there). The other process is played by this test's own lock file handle."""
    import fcntl

    cache = cache_in(tmp_path)
    url = server.url(NAMES[0])
    final = cache.path_for(url)
    other = os.open(cache.dir / shard_cache.LOCK_DIR / final.name, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_SH)  # the other process checks too: the file is missing
    outcome: list = []
    finder = threading.Thread(target=lambda: outcome.append(cache.local_path(url)), daemon=True)
    finder.start()
    time.sleep(1.0)  # the finder has seen no file and now wants the exclusive lock, which the pin keeps from it
    assert finder.is_alive() and not outcome
    tmp = final.with_name(".placed")
    tmp.write_bytes((SAMPLE / NAMES[0]).read_bytes())
    os.replace(tmp, final)  # the other process's download lands, with its record; it keeps its shared lock (its pin)
    cache._write_record(final, url, sha(final))
    finder.join(30)
    assert outcome == [final] and not finder.is_alive(), "local_path waited behind a reader's pin"
    assert server.requests[NAMES[0]] == 0 and sha(final) == sha(SAMPLE / NAMES[0])
    cache.release(url)

    monkeypatch.setattr(shard_cache, "ORPHAN_WAIT_S", 0.5)
    lost = cache.path_for(server.url(NAMES[1]))  # pinned elsewhere, then deleted from the cache by hand
    orphan = os.open(cache.dir / shard_cache.LOCK_DIR / lost.name, os.O_RDWR | os.O_CREAT)
    fcntl.flock(orphan, fcntl.LOCK_SH)
    started = time.monotonic()
    with pytest.raises(RemoteError, match=r"deleted from the shard cache while another process .* still uses it"):
        cache.local_path(server.url(NAMES[1]))
    assert time.monotonic() - started < 30 and server.requests[NAMES[1]] == 0
    os.close(orphan)
    os.close(other)
    cache.close()


def test_eviction_respects_the_limit_and_never_evicts_a_shard_in_use(tmp_path, server):
    sizes = {name: (SAMPLE / name).stat().st_size for name in NAMES}
    limit = sizes[NAMES[0]] + sizes[NAMES[1]] + 1  # room for two shards, never three
    cache = cache_in(tmp_path, limit, space_wait_s=0.5)
    urls = [server.url(name) for name in NAMES]
    for url in urls:
        cache.expect(url, sizes[url.rsplit("/", 1)[1]])
    pinned = cache.local_path(urls[0])
    for url in urls[1:]:
        cache.local_path(url)
        assert cache.usage() <= limit and pinned.exists()
        cache.release(url)
    assert sorted(p.name.split("-", 1)[1] for p in cache.dir.iterdir() if p.is_file()) == [NAMES[0], NAMES[3]]
    cache.local_path(urls[3])
    with pytest.raises(RemoteError, match="data.cache_limit_gb=.* is too small: .*sample-001.tar needs"):
        cache.local_path(urls[1])  # two pinned shards leave no room for a third
    assert pinned.exists() and cache.usage() <= limit
    cache.release(urls[3], drop=True)
    assert not cache.path_for(urls[3]).exists()
    with pytest.raises(RemoteError, match=r"data.cache_limit_gb=.* is smaller than one window of shards"):
        cache.check_window(limit + 1)
    cache.prefetch(urls[1:3])  # best effort: evicts only unpinned shards
    cache.close()
    assert pinned.exists() and cache.usage() <= limit
    cache = ShardCache(tmp_path / "lru", limit)  # recency follows what is wanted: prefetching a cached shard keeps it
    for url in urls[:3]:
        cache.expect(url, sizes[url.rsplit("/", 1)[1]])
    for url in urls[:2]:
        cache.local_path(url)
        cache.release(url)
    os.utime(cache.dir / ".records" / cache.path_for(urls[0]).name, (1, 1))  # recency lives in the records
    os.utime(cache.dir / ".records" / cache.path_for(urls[1]).name, (2, 2))  # both stale, shard 0 the stalest
    cache.prefetch([urls[0]])  # the order wants shard 0 next
    cache.local_path(urls[2])  # room for it: shard 1 goes, not shard 0
    assert cache.path_for(urls[0]).exists() and not cache.path_for(urls[1]).exists()
    cache.close()


def test_forked_worker_keeps_none_of_the_parents_locks(tmp_path, server):
    """flock locks live while any copy of the fd is open: a DataLoader worker forked while the parent pins one
    shard and a parent thread is mid-download of another must not keep either locked."""
    cache = cache_in(tmp_path)
    pinned_url, fetched_url = server.url(NAMES[0]), server.url(NAMES[1])
    pinned = cache.local_path(pinned_url)
    server.faults[NAMES[1]] = ["hang"]
    cache.prefetch([fetched_url])
    assert server.hanging.wait(30)  # a prefetch thread holds that shard's lock now
    done = tmp_path / "done"
    child = os.fork()
    if child == 0:  # the worker: alive until the parent has checked, then gone without cleanup
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os._exit(0 if not cache._pins else 1)
    try:
        server.release.set()
        deadline = time.monotonic() + 60
        while cache._pending and time.monotonic() < deadline:
            time.sleep(0.02)
        fetched = cache.path_for(fetched_url)
        assert fetched.exists() and cache._try_evict(fetched)  # the worker holds no copy of the download's lock
        assert not cache._try_evict(pinned)  # our own pin still protects it
        cache.release(pinned_url)
        assert cache._try_evict(pinned)  # and the worker holds no copy of the pin
    finally:
        done.touch()
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0


def test_pipe_commands_unknown_schemes_and_missing_packages(tmp_path, monkeypatch):
    cache = cache_in(tmp_path, retries=1)
    path = cache.local_path(f"pipe:cat {SAMPLE / NAMES[2]}")
    assert sha(path) == sha(SAMPLE / NAMES[2])
    with pytest.raises(RemoteError, match=r"could not read pipe:exit 3: command exited with status 3 \(2 attempts"):
        cache.local_path("pipe:exit 3")
    with pytest.raises(RemoteError, match="unknown scheme 'ftp://'"):
        cache.local_path("ftp://host/x.tar")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(
        RemoteError, match=r"s3://bucket/x.tar: reading s3:// shards needs the s3fs package.*mimscale\[remote\]"
    ):
        cache.local_path("s3://bucket/x.tar")
    with pytest.raises(RemoteError, match="needs the gcsfs package"):
        remote.expand("gs://bucket/train-{0..3}.tar")
    cache.close()


def test_object_store_download_path_with_fsspec(tmp_path):
    """The s3/gs code path is fsspec's; exercised here with fsspec's local filesystem standing in for a bucket."""
    import fsspec

    handle = fsspec.filesystem("file").open(str(SAMPLE / NAMES[1]), "rb")
    out = tmp_path / "copy.tar"
    with handle, open(out, "wb") as sink:
        remote.copy_bounded(handle, sink, location="s3://b/x.tar", declared=handle.size, bound=10**9)
    assert sha(out) == sha(SAMPLE / NAMES[1])
    assert isinstance(remote._store_error("s3://b/x", PermissionError("denied")), RemoteError)
    assert "AWS_ACCESS_KEY_ID" in str(remote._store_error("s3://b/x", type("NoCredentialsError", (Exception,), {})()))
    assert isinstance(remote._store_error("s3://b/x", FileNotFoundError("x")), RemoteNotFound)


def test_waiting_for_space_ends_when_a_pin_is_released(tmp_path, server):
    limit = int(SHARD_BYTES * 1.5)
    cache = cache_in(tmp_path, limit, space_wait_s=60)
    first, second = server.url(NAMES[0]), server.url(NAMES[0] + "?copy")
    cache.expect(first, SHARD_BYTES)
    cache.expect(second, SHARD_BYTES)
    cache.local_path(first)
    threading.Timer(0.5, cache.release, args=(first,)).start()
    assert sha(cache.local_path(second)) == sha(SAMPLE / NAMES[0]) and not cache.path_for(first).exists()
    cache.close()


# ----------------------------------------------------------------------------------------------- the stream


def stream_cfg(shards: str, cache_dir: Path, workers: int = 2, *extra: str):
    from mimscale.config import load_config

    return load_config(
        None,
        [
            f"data.shards={shards}",
            "data.batch_size=8",
            "data.image_size=32",
            f"data.num_workers={workers}",
            f"data.cache_dir={cache_dir}",
            "data.shuffle_window=2",
            *extra,
        ],
    )


def test_training_and_eval_streams_over_http_are_the_local_streams(tmp_path, server):
    import itertools

    import torch

    from mimscale.pipeline.masking import build_mask_generator
    from mimscale.pipeline.stream import build_train_loader, iter_eval_batches

    mask = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)
    local = build_train_loader(
        stream_cfg(str(SAMPLE / "*.tar"), tmp_path / "unused"), rank=1, world_size=2, mask_generator=mask
    )
    expected = list(itertools.islice(iter(local), 14))
    bare = tmp_path / "bare"  # a foreign folder: no manifest.json, no samples.idx
    bare.mkdir()
    for name in NAMES:
        (bare / name).write_bytes((SAMPLE / name).read_bytes())
    with ShardServer(bare) as bare_server:
        for url, cache_dir in (
            (server.url("sample-{000..003}.tar"), "published"),
            (bare_server.url("sample-{000..003}.tar"), "bare"),
        ):
            remote_stream = build_train_loader(
                stream_cfg(url, tmp_path / cache_dir), rank=1, world_size=2, mask_generator=mask
            )
            assert remote_stream.table.fingerprint == local.table.fingerprint
            got = list(itertools.islice(iter(remote_stream), 14))
            for a, b in zip(expected, got, strict=True):
                assert all(torch.equal(a[key], b[key]) for key in ("image", "mask", "label", "sample_id"))
        assert all(bare_server.requests[name] == 1 for name in NAMES)  # downloaded once to index, then cached
    fetched = [server.requests[name] for name in NAMES]  # rank 1 of 2 reads only its own stream's shards
    assert max(fetched) == 1 and 0 < sum(fetched) < len(NAMES) and server.requests["samples.idx"] == 1
    kwargs = {"image_size": 32, "batch_size": 50, "mean": [0.5] * 3, "std": [0.25] * 3, "num_workers": 2}
    here = list(iter_eval_batches(str(SAMPLE), **kwargs))
    there = list(
        iter_eval_batches(server.url("sample-{000..003}.tar"), data_cfg=stream_cfg("x", tmp_path / "ev").data, **kwargs)
    )
    assert len(here) == len(there) and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(here, there, strict=True)
    )
    failing = stream_cfg(server.url("sample-{000..003}.tar"), tmp_path / "fail", 0, "data.download_retries=1")
    stream = build_train_loader(failing, rank=0, world_size=1, mask_generator=mask)
    for name in NAMES:
        server.faults[name] = ["500"] * 4
    with pytest.raises(RemoteError, match=r"could not read http://127.0.0.1:\d+/sample-00\d.tar: HTTP 500"):
        next(iter(stream))
    too_small = stream_cfg(server.url("sample-{000..003}.tar"), tmp_path / "small", 0, "data.cache_limit_gb=0.002")
    with pytest.raises(
        RemoteError, match=r"data.cache_limit_gb=0.002 is smaller than 2 windows of data.shuffle_window=2"
    ):
        build_train_loader(too_small, rank=0, world_size=1, mask_generator=mask)


def test_a_run_whose_shards_are_cached_resumes_while_the_server_is_down(tmp_path, capsys):
    """Every shard (and the published index) in the node cache: a resume needs the server for nothing, its
    manifest.json included (the copy saved at the last read stands in, with a message), and continues exactly.
    A cold cache still fails, naming the URL."""
    import itertools

    import torch

    from mimscale.pipeline.masking import build_mask_generator
    from mimscale.pipeline.stream import build_train_loader

    mask = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)
    with ShardServer(SAMPLE) as gone:
        cfg = stream_cfg(gone.url("sample-{000..003}.tar"), tmp_path / "cache", 0, "data.download_retries=1")
        stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=mask)
        batches = iter(stream)
        assert len(list(itertools.islice(batches, 48))) == 48  # one epoch: every shard read, so every shard cached
        state = stream.state_dict()
        expected = list(itertools.islice(batches, 3))
    resumed = build_train_loader(cfg, rank=0, world_size=1, mask_generator=mask, state=state)
    assert "using the copy of http://127.0.0.1" in capsys.readouterr().err
    got = list(itertools.islice(iter(resumed), 3))
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in ("image", "mask", "label", "sample_id"))
    cold = stream_cfg(cfg.data.shards, tmp_path / "cold", 0, "data.download_retries=1")
    with pytest.raises(RemoteError, match=r"could not read http://127.0.0.1:\d+/"):
        build_train_loader(cold, rank=0, world_size=1, mask_generator=mask)


def test_cache_accounting_survives_files_renamed_and_deleted_while_it_lists_them(tmp_path):
    """Other threads and processes rename part files and evict shards at any moment: the space accounting (run
    before every download) must not fail on a file that vanished between listing and stat (it raised
    FileNotFoundError under 4 concurrent S3 downloads)."""
    cache = cache_in(tmp_path)
    stop = threading.Event()

    def churn(tag: str):
        number = 0
        while not stop.is_set():
            part = cache.dir / f".{tag}-{number % 8}.tar{remote.PART_MARK}churn"
            part.write_bytes(b"x" * 512)
            os.replace(part, cache.dir / f"{tag}-{number % 8}.tar")
            (cache.dir / f"{tag}-{(number + 4) % 8}.tar").unlink(missing_ok=True)
            number += 1

    churners = [threading.Thread(target=churn, args=(tag,), daemon=True) for tag in ("a", "b")]
    for thread in churners:
        thread.start()
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert 0 <= cache.usage() <= 2 * 10 * 512
    finally:
        stop.set()
        for thread in churners:
            thread.join(10)
