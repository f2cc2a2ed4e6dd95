"""Found by using main as a new user and an attacker would (acceptance pass): hostile shard folders, indexes and
configs, each with the real components (real tars, real index files, the real stream)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mimscale.config import DataConfig
from mimscale.shards.format import ShardError
from mimscale.shards.sets import open_shard_set

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "shards/sample"


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    folder = tmp_path / "sample"
    shutil.copytree(SAMPLE, folder)
    return folder


@pytest.mark.parametrize("make", ["fifo", "device_link", "broken_link"])
def test_a_shard_that_is_not_a_regular_file_is_named(sample_copy, make):
    shard = sample_copy / "sample-002.tar"
    shard.unlink()
    targets = {"device_link": "/dev/zero", "broken_link": str(sample_copy / "moved-away.tar")}
    os.mkfifo(shard) if make == "fifo" else shard.symlink_to(targets[make])
    problem = r"sample-002\.tar is not a regular file \(a FIFO, device or broken link\)"
    for pattern in (f"{sample_copy}/*.tar", str(sample_copy), f"{sample_copy}/sample-{{000..003}}.tar"):
        with pytest.raises(ShardError, match=rf"data\.shards.*{problem}"):
            open_shard_set(pattern, "data.shards", data_cfg=DataConfig(cache_dir=str(sample_copy.parent / "cache")))


@pytest.mark.parametrize("make", ["folder", "fifo"])
def test_an_index_path_that_is_not_a_regular_file_is_left_alone(sample_copy, make, capsys):
    """A folder or FIFO named samples.idx is neither read (a FIFO would block) nor replaced: the index is built in
    the cache instead, and the stream reads every sample."""
    index = sample_copy / "samples.idx"
    index.unlink()
    index.mkdir() if make == "folder" else os.mkfifo(index)
    table = open_shard_set(
        f"{sample_copy}/*.tar", "data.shards", data_cfg=DataConfig(cache_dir=str(sample_copy.parent / "cache"))
    )
    assert sum(table.counts) == sum(open_shard_set(f"{SAMPLE}/*.tar", "data.shards").counts)
    assert (index.is_dir() if make == "folder" else index.is_fifo()) and not list(sample_copy.glob("samples.idx.*"))
    assert "samples.idx is not a regular file" in capsys.readouterr().err
    assert list((sample_copy.parent / "cache" / "index").glob("*.idx"))


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\xd1\x80\xff garbage", "is not valid JSON"),
        (b'{"shards": [{"name": 1}, {"x": 2}], "totals": 5}', "lists a shard without a name"),
        (b'{"shards": [], "totals": [1]}', "'totals' is not an object"),
    ],
)
def test_a_hostile_manifest_is_named_by_verify_and_inspect(sample_copy, content, problem, capsys):
    from mimscale.cli import main

    (sample_copy / "manifest.json").write_bytes(content)
    for command in ("verify", "inspect"):
        assert main(["shards", command, str(sample_copy)]) == 2
        assert re.search(rf"error: .*manifest\.json.*{problem}", capsys.readouterr().err)


def test_a_worker_error_ends_the_process_although_workers_block_sigterm(sample_copy):
    """Workers inherit blocked SIGTERM (engine/preempt.py); if they are still alive at exit, multiprocessing's
    terminate() + join() waits on them forever: a run stopped by a data error (e.g. a shard server gone) hung."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/acceptance_worker_error.py"), str(sample_copy)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=180)  # ~4 s when it works; a hang is forever
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the process hung at exit after a DataLoader worker error")
    assert process.returncode == 2, output
    assert "error: IndexFileError" in output and "point outside" in output
