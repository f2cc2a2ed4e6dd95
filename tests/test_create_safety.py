"""`shards create` reads only what it should (issue 12.5): FIFOs, devices, symlinks to them, huge files and tar
members, and tar link members are rejected and counted by reason, never read (or hung on)."""

from __future__ import annotations

import io
import json
import os
import resource
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimscale.cli import main as cli_main
from mimscale.shards.create import CreateOptions, create_shards
from mimscale.shards.format import ShardError

GiB = 1 << 30


def png_bytes(shift: int = 0) -> bytes:
    pixels = np.roll(np.arange(48 * 40 * 3, dtype=np.uint8).reshape(40, 48, 3), shift, axis=1)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def within(seconds: float, function, *args, **kwargs):
    """Run function in a daemon thread; a hang fails the test instead of stalling the suite."""
    result: dict = {}

    def target():
        try:
            result["value"] = function(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} still running after {seconds} s (blocked on a FIFO?)"
    if "error" in result:
        raise result["error"]
    return result["value"]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_folder_and_csv_with_fifo_devices_and_huge_files(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "cat/good.png").write_bytes(png_bytes())
    os.mkfifo(src / "cat/x.jpg")  # nobody ever writes to it: reading it would block forever
    os.symlink("/dev/zero", src / "cat/zero.jpg")
    with open(src / "cat/huge.png", "wb") as handle:  # sparse: 1 GiB on paper, no disk used
        handle.truncate(GiB)
    rss = peak_rss_bytes()
    out = tmp_path / "out"
    assert within(120, cli_main, ["shards", "create", str(src), str(out), "--max-bytes", str(1 << 20)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 1
    assert manifest["rejects"]["by_reason"] == {"not_regular_file": 2, "too_large": 1}
    printed = capsys.readouterr().out
    assert "rejected 3 inputs (not_regular_file: 2, too_large: 1)" in printed
    listed = tmp_path / "list.csv"
    listed.write_text(
        f"path,label\n/dev/zero,a\n{src}/cat/zero.jpg,a\n{src}/cat/x.jpg,a\ncat/huge.png,b\ncat/good.png,b\n"
    )
    (tmp_path / "cat").symlink_to(src / "cat")
    manifest = within(120, create_shards, str(listed), tmp_path / "from_csv", CreateOptions(max_bytes=1 << 20))
    assert manifest["rejects"]["by_reason"] == {"not_regular_file": 3, "too_large": 1}
    assert {item["reason"] for item in manifest["rejects"]["items"] if "zero" in item["source"]} == {"not_regular_file"}
    assert peak_rss_bytes() - rss < 256 << 20  # nothing near 1 GiB was ever read into memory
    small = within(
        120,
        create_shards,
        str(src / "cat/good.png").rsplit("/", 1)[0],
        tmp_path / "small",
        CreateOptions(max_bytes=100),
    )
    assert small["totals"]["samples"] == 0 and small["rejects"]["by_reason"]["too_large"] == 2
    with pytest.raises(ShardError, match="--max-bytes must be positive"):
        create_shards(str(src), tmp_path / "bad", CreateOptions(max_bytes=0))


def write_hostile_tar(path: Path) -> None:
    """A tar with a good sample, a 1 GiB member (sparse, never written), a symlink, a hard link and a FIFO member."""
    with open(path, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, payload in (("good.png", png_bytes()), ("good.cls", b"3")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            for name, kind, target in (
                ("sym.png", tarfile.SYMTYPE, "good.png"),
                ("hard.png", tarfile.LNKTYPE, "good.png"),
                ("pipe.png", tarfile.FIFOTYPE, ""),
            ):
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                tar.addfile(info)
            huge = tarfile.TarInfo("huge.png")
            huge.size = GiB
            raw.write(huge.tobuf(format=tarfile.USTAR_FORMAT))
            raw.seek(GiB, os.SEEK_CUR)  # the member's data: a hole
            tar.offset = raw.tell()
            after = tarfile.TarInfo("after.png")
            payload = png_bytes(7)
            after.size = len(payload)
            tar.addfile(after, io.BytesIO(payload))


def test_tar_source_counts_link_members_and_never_reads_a_huge_member(tmp_path):
    src = tmp_path / "tars"
    src.mkdir()
    write_hostile_tar(src / "00000.tar")
    rss = peak_rss_bytes()
    manifest = within(120, create_shards, str(src), tmp_path / "out", CreateOptions(max_bytes=1 << 20, format="png"))
    assert peak_rss_bytes() - rss < 256 << 20
    assert manifest["totals"]["samples"] == 2  # good and after
    assert manifest["rejects"]["by_reason"] == {"link_member": 2, "not_regular_member": 1, "too_large": 1}
    sources = {item["source"].rsplit(":", 1)[1]: item["reason"] for item in manifest["rejects"]["items"]}
    assert sources == {
        "sym.png": "link_member",
        "hard.png": "link_member",
        "pipe.png": "not_regular_member",
        "huge": "too_large",
    }
    os.mkfifo(src / "00001.tar")
    with pytest.raises(ShardError, match="00001.tar is not a regular file"):
        within(60, create_shards, str(src), tmp_path / "out2", CreateOptions())
