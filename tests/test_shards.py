"""Shard tools on real tar files: create (folder, CSV, re-shard), verify, inspect, resume after a kill."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimscale.cli import main as cli_main
from mimscale.config import load_config
from mimscale.pipeline.masking import build_mask_generator
from mimscale.pipeline.stream import build_train_loader, iter_eval_batches
from mimscale.shards.create import CRASH_ENV, CreateOptions, create_shards
from mimscale.shards.format import ShardError, split_key
from mimscale.shards.images import decode_rgb, to_rgb
from mimscale.shards.index import IndexFileError, SetIndex, index_shards, scan_tar
from mimscale.shards.sets import expand_shards
from mimscale.shards.writer import write_manifest, write_shard

ROOT = Path(__file__).resolve().parents[1]
MASK = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def gradient(size=(48, 40)) -> np.ndarray:
    x = np.linspace(0, 255, size[0])[None, :, None]
    y = np.linspace(0, 255, size[1])[:, None, None]
    return np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)


def make_image_folder(root: Path) -> dict[str, int]:
    """Two classes in every awkward mode, plus four inputs that must be rejected. Returns expected rejects."""
    rgb = Image.fromarray(gradient())
    save(rgb, root / "cat/rgb.jpg")
    save(rgb.convert("L"), root / "cat/gray.png")
    save(rgb.convert("CMYK"), root / "cat/cmyk.jpg")
    save(rgb.convert("P"), root / "cat/nested/palette.png")
    save(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), root / "dog/deep16.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)
    save(rgba, root / "dog/transparent.png")
    save(rgb.convert("LA"), root / "dog/gray_alpha.png")
    save(rgb.convert("1"), root / "dog/bilevel.png")
    save(rgb, root / "dog/photo.webp")
    save(rgb, root / "dog/name.with.dots.jpg")
    (root / "dog/garbage.jpg").write_bytes(b"this is not a jpeg")
    (root / "dog/empty.png").write_bytes(b"")
    truncated = io.BytesIO()
    rgb.save(truncated, format="PNG")
    (root / "cat/truncated.png").write_bytes(truncated.getvalue()[:200])
    save(Image.new("RGB", (4, 4)), root / "cat/tiny.png")
    (root / "cat/notes.txt").write_text("ignored: not an image")
    return {"undecodable": 2, "empty_file": 1, "too_small": 1}


def read_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_to_rgb_handles_every_mode():
    white = to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert white.mode == "RGB" and np.asarray(white).min() == 255  # transparent -> white, not black
    deep = to_rgb(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)))
    assert np.asarray(deep).min() == 255
    cmyk = to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    assert tuple(np.asarray(cmyk)[0, 0]) == (255, 0, 0)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert tuple(np.asarray(to_rgb(palette))[0, 0]) == (0, 255, 0)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("F", (4, 4), 0.5)).mode == "RGB"


def test_folder_round_trip_to_stream(tmp_path):
    expected_rejects = make_image_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert cli_main(["shards", "create", str(tmp_path / "src"), str(out), "--samples-per-shard", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 10 and manifest["totals"]["shards"] == 4  # 14 inputs in chunks of 4
    assert manifest["rejects"]["by_reason"] == expected_rejects
    assert {Path(item["source"]).name for item in manifest["rejects"]["items"]} == {
        "garbage.jpg",
        "empty.png",
        "truncated.png",
        "tiny.png",
    }
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    labels = Counter()
    for path in expand_shards(str(out)):
        for name, payload in read_members(path).items():
            key, ext = split_key(name)
            assert "." not in key and ext in ("jpg", "cls", "json")
            if ext == "jpg":
                assert Image.open(io.BytesIO(payload)).mode == "RGB"
            if ext == "cls":
                labels[int(payload)] += 1
    assert labels == {0: 4, 1: 6}
    assert cli_main(["shards", "verify", str(out)]) == 0
    cfg = load_config(
        None, [f"data.shards={out}/*.tar", "data.batch_size=5", "data.image_size=32", "data.num_workers=0"]
    )
    stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK)
    batches = [batch for _, batch in zip(range(2), stream, strict=False)]
    assert sorted(np.concatenate([b["sample_id"].numpy() for b in batches]).tolist()) == list(range(10))
    assert sorted(np.concatenate([b["label"].numpy() for b in batches]).tolist()) == [0] * 4 + [1] * 6


def copy_set(tmp_path: Path) -> Path:
    dest = tmp_path / "set"
    shutil.copytree(ROOT / "shards/sample-val", dest)
    return dest


def test_verify_detects_flipped_byte(tmp_path, capsys):
    folder = copy_set(tmp_path)
    assert cli_main(["shards", "verify", str(folder)]) == 0
    shard = folder / "val-001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli_main(["shards", "verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "val-001.tar: sha256" in out and "val-000.tar" not in out


def test_verify_detects_truncated_tar(tmp_path, capsys):
    folder = copy_set(tmp_path)
    shard = folder / "val-000.tar"
    shard.write_bytes(shard.read_bytes()[:150_000])
    assert cli_main(["shards", "verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "val-000.tar: size 150000 bytes" in out and "truncated or corrupt tar" in out


def write_img2dataset_shard(path: Path, count: int) -> None:
    """What img2dataset writes: 00000.tar with key.jpg/.txt/.json, numeric keys, no labels, no manifest."""
    with tarfile.open(path, "w") as tar:
        for number in range(count):
            out = io.BytesIO()
            Image.fromarray(np.roll(gradient((64, 48)), number, axis=1)).save(out, format="JPEG")
            key = f"{number:09d}"
            members = {
                "jpg": out.getvalue(),
                "txt": f"caption {number}".encode(),
                "json": json.dumps({"key": key, "url": f"http://x/{number}"}).encode(),
            }
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_foreign_img2dataset_shards_read_verify_inspect_and_reshard(tmp_path, capsys):
    foreign = tmp_path / "laion"
    foreign.mkdir()
    write_img2dataset_shard(foreign / "00000.tar", 7)
    write_img2dataset_shard(foreign / "00001.tar", 5)
    (foreign / "00000_stats.json").write_text("{}")
    assert [len(ix) for ix in index_shards(expand_shards(str(foreign / "{00000..00001}.tar")))] == [7, 5]
    cfg = load_config(None, [f"data.shards={foreign}", "data.batch_size=4", "data.image_size=32"])
    stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK)
    assert stream.num_samples == 12 and stream.steps_per_epoch == 3
    batch = next(iter(stream))
    assert batch["label"].tolist() == [-1] * 4 and batch["image"].shape == (4, 3, 32, 32)
    assert cli_main(["shards", "verify", str(foreign)]) == 0
    assert "no manifest" in capsys.readouterr().out
    sheet = tmp_path / "sheet.png"
    assert cli_main(["shards", "inspect", str(foreign), "--sheet", str(sheet), "--count", "6"]) == 0
    assert "12 samples" in capsys.readouterr().out and Image.open(sheet).size[0] > 0
    out = tmp_path / "resharded"
    assert cli_main(["shards", "create", str(foreign), str(out), "--samples-per-shard", "5", "--format", "png"]) == 0
    assert [entry["samples"] for entry in json.loads((out / "manifest.json").read_text())["shards"]] == [5, 5, 2]
    images = [img for img, _ in iter_eval_batches(str(out), image_size=32, batch_size=12, mean=[0] * 3, std=[1] * 3)]
    assert images[0].shape == (12, 3, 32, 32)


def test_reshard_keeps_labels_and_csv_list_with_names_and_byte_limit(tmp_path):
    out = tmp_path / "reshard"
    create_shards(str(ROOT / "shards/sample-val"), out, CreateOptions(samples_per_shard=50))
    source_labels = Counter(
        label for ix in index_shards(expand_shards(str(ROOT / "shards/sample-val"))) for label in ix.labels
    )
    assert Counter(label for ix in index_shards(expand_shards(str(out))) for label in ix.labels) == source_labels
    assert json.loads((out / "classes.json").read_text())[0] == "astronaut"
    folder = tmp_path / "imgs"
    rows = ["path,label"]
    for number in range(6):
        save(Image.fromarray(np.roll(gradient(), number * 5, axis=0)), folder / f"{number}.png")
        rows.append(f"imgs/{number}.png,{'zebra' if number % 2 else 'ant'}")
    rows.append("imgs/missing.png,ant")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    listed = tmp_path / "listed"
    manifest = create_shards(
        str(tmp_path / "list.csv"), listed, CreateOptions(samples_per_shard=4, max_bytes_per_shard=5000, format="png")
    )
    names = [entry["name"] for entry in manifest["shards"]]
    assert len(names) > 2 and names == sorted(names) and names[0] == "shard-00000.tar"
    assert all(entry["bytes"] <= 5000 + 10240 for entry in manifest["shards"])
    assert manifest["classes"] == ["ant", "zebra"] and manifest["rejects"]["by_reason"] == {"unreadable": 1}
    labels = [label for ix in index_shards(expand_shards(str(listed))) for label in ix.labels]
    assert labels == [0, 1, 0, 1, 0, 1]


def test_killed_create_resumes_and_matches_an_uninterrupted_parallel_run(tmp_path):
    make_image_folder(tmp_path / "src")
    args = [
        sys.executable,
        "-m",
        "mimscale.cli",
        "shards",
        "create",
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        "--samples-per-shard",
        "2",
        "--max-side",
        "32",
    ]
    killed = subprocess.run(args, env={**os.environ, CRASH_ENV: "3"}, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 137, killed.stderr
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    (out / "shard-00004.tar.tmp").write_bytes(b"half a shard from the killed process")
    (out / "shard-00005.tar").write_bytes(b"a shard whose chunk marker was never written")
    with pytest.raises(ShardError, match="unfinished create job with other inputs or options"):
        create_shards(str(tmp_path / "src"), out, CreateOptions(samples_per_shard=3, max_side=32))
    finished = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "resuming: 3 of 7 chunks already complete" in finished.stderr
    clean = tmp_path / "clean"
    create_shards(str(tmp_path / "src"), clean, CreateOptions(samples_per_shard=2, max_side=32), workers=2)
    resumed_files = sorted(p.name for p in out.iterdir())
    assert resumed_files == sorted(p.name for p in clean.iterdir())
    for name in resumed_files:
        if name.endswith(".tar"):
            assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert cli_main(["shards", "verify", str(out)]) == 0
    with pytest.raises(ShardError, match="already holds a finished shard set"):
        create_shards(str(tmp_path / "src"), out, CreateOptions(samples_per_shard=2, max_side=32))


def test_max_side_resizes_and_keeps_aspect(tmp_path):
    save(Image.fromarray(gradient((300, 200))), tmp_path / "src/a/big.jpg")
    manifest = create_shards(str(tmp_path / "src"), tmp_path / "out", CreateOptions(max_side=50, format="webp"))
    assert manifest["image_stats"]["width"]["max"] == 75 and manifest["image_stats"]["height"]["max"] == 50
    payload = read_members(tmp_path / "out/shard-00000.tar")["000000000.webp"]
    assert decode_rgb(payload).size == (75, 50)


def test_shuffle_seed_reorders_inputs_deterministically(tmp_path):
    for number in range(12):
        save(Image.fromarray(np.roll(gradient(), number * 3, axis=1)), tmp_path / f"src/c{number % 3}/{number:02d}.png")

    def sources(out: Path, seed: int) -> list[str]:
        create_shards(str(tmp_path / "src"), out, CreateOptions(samples_per_shard=5, shuffle_seed=seed, format="png"))
        found = []
        for path in expand_shards(str(out)):
            found += [json.loads(v)["source"] for k, v in read_members(path).items() if k.endswith(".json")]
        return found

    plain, shuffled, again = sources(tmp_path / "a", -1), sources(tmp_path / "b", 7), sources(tmp_path / "c", 7)
    assert plain == sorted(plain) and shuffled != plain and sorted(shuffled) == plain and shuffled == again


def test_create_refuses_a_folder_with_foreign_tars(tmp_path):
    save(Image.fromarray(gradient()), tmp_path / "src/a/x.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/shard-00000.tar").write_bytes(b"someone else's data")
    with pytest.raises(ShardError, match="already contains .tar files"):
        create_shards(str(tmp_path / "src"), tmp_path / "out", CreateOptions())
    assert (tmp_path / "out/shard-00000.tar").read_bytes() == b"someone else's data"


# ----------------------------------------------------------------------------------------------- the binary index


def small_set(folder: Path, shards: int = 2, per_shard: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for number in range(shards):
        samples = []
        for item in range(per_shard):
            out = io.BytesIO()
            Image.fromarray(np.roll(gradient(), item * 3 + number, axis=1)).save(out, format="JPEG")
            samples.append((f"s{number}x{item:03d}", {"jpg": out.getvalue(), "cls": str(item).encode()}))
        entries.append(write_shard(folder / f"part-{number:03d}.tar", samples))
    write_manifest(folder, entries)
    return folder


def test_index_is_compact_matches_the_tars_and_manifest_keeps_per_shard_facts(tmp_path):
    folder = small_set(tmp_path / "set", shards=3, per_shard=7)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "mimscale-shards/2" and manifest["index"] == "samples.idx"
    assert all(set(entry) == {"name", "samples", "bytes", "sha256"} for entry in manifest["shards"])
    index = SetIndex(folder / "samples.idx")
    assert index.names == ["part-000.tar", "part-001.tar", "part-002.tar"] and index.counts.tolist() == [7, 7, 7]
    assert (folder / "samples.idx").stat().st_size == 64 + 3 * 24 + 38 + 2 + 21 * 12  # header, table, names, rows
    for number, path in enumerate(expand_shards(str(folder))):
        legacy = index_shards([path])[0]
        rows = index.shard_rows(number)
        assert (rows["block"] * 512).tolist() == legacy.offsets and rows["label"].tolist() == list(range(7))
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar}
            assert [members[f"{key}.jpg"].offset_data for key in legacy.keys] == legacy.offsets


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:-5], "truncated or padded"),
        (lambda b: b"NOTANIDX" + b[8:], "wrong magic"),
        (lambda b: b[:8] + (99).to_bytes(4, "little") + b[12:], "format version 99"),
        (lambda b: b[:16] + (10**12).to_bytes(8, "little") + b[24:], "more than the file's"),
        (lambda b: b[: 64 + 8] + (3).to_bytes(8, "little") + b[64 + 16 :], "add up to"),
        (lambda b: b[: 64 + 48] + b"part-000.tar\npart-000.tar" + b[64 + 48 + 25 :], "distinct shard names"),
        (lambda b: b[:-12] + (2**31).to_bytes(4, "little") + b[-8:], "point outside"),
        (lambda b: b[:-4] + (-7).to_bytes(4, "little", signed=True), "labels below -1"),
    ],
)
def test_hostile_index_files_are_refused_by_name(tmp_path, damage, message):
    folder = small_set(tmp_path / "set")
    path = folder / "samples.idx"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(IndexFileError, match=message) as caught:
        index = SetIndex(path)
        [index.shard_rows(n) for n in range(len(index.names))]  # per-shard bounds are checked on first use
    assert str(path) in str(caught.value) and "mimscale shards index" in str(caught.value)


def test_damaged_or_foreign_index_is_rebuilt_and_training_reads_the_right_samples(tmp_path, capsys):
    folder = small_set(tmp_path / "set", shards=2, per_shard=6)
    os.mkfifo(tmp_path / "fifo.idx")
    with pytest.raises(IndexFileError, match="not a regular file"):  # a FIFO must not block the reader
        SetIndex(tmp_path / "fifo.idx")
    (folder / "samples.idx").write_bytes(b"MIMSIDX\0" + bytes(100))
    cfg = load_config(None, [f"data.shards={folder}", "data.batch_size=4", "data.image_size=32", "data.num_workers=0"])
    stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK)
    assert "is unusable" in capsys.readouterr().err and SetIndex(folder / "samples.idx").counts.tolist() == [6, 6]
    labels = [int(v) for _, batch in zip(range(3), stream, strict=False) for v in batch["label"].tolist()]
    assert sorted(labels) == sorted(list(range(6)) * 2)


def test_shards_index_cli_builds_a_foreign_folder_once_in_parallel_into_a_cache(tmp_path, capsys):
    foreign = tmp_path / "laion"
    foreign.mkdir()
    for number in range(3):
        write_img2dataset_shard(foreign / f"{number:05d}.tar", 4 + number)
    cache = tmp_path / "cache"
    assert cli_main(["shards", "index", str(foreign), "--cache", str(cache), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 shards, 15 samples" in out and "B/sample" in out and not (foreign / "samples.idx").exists()
    built = list((cache / "index").glob("laion-*.idx"))
    assert len(built) == 1 and SetIndex(built[0]).counts.tolist() == [4, 5, 6]
    stamp = built[0].stat().st_mtime_ns
    cfg = load_config(None, [f"data.shards={foreign}", "data.batch_size=5", "data.image_size=32"])
    cfg.data.__dict__["cache_dir"] = str(cache)  # data.cache_dir (remote shards) also holds indexes
    stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=MASK)
    assert stream.num_samples == 15 and built[0].stat().st_mtime_ns == stamp  # found, not rebuilt
    (foreign / "00001.tar").write_bytes((foreign / "00001.tar").read_bytes()[:4096])  # a shard re-written
    assert cli_main(["shards", "index", str(foreign), "--cache", str(cache)]) == 0
    assert "changed since" in capsys.readouterr().err and SetIndex(built[0]).counts.tolist()[0::2] == [4, 6]


def test_shards_index_cli_downloads_a_url_set_several_at_a_time(tmp_path, capsys):
    """`mimscale shards index URL` on a set with no published index: each shard downloaded once, 4 at a time (the
    server holds each request 0.3 s, so they overlap), and the index equals the one built from the files."""
    from http_serve import ShardServer

    folder = tmp_path / "bare"
    shutil.copytree(ROOT / "shards/sample", folder)
    (folder / "samples.idx").unlink()
    with ShardServer(folder, latency_s=0.3) as server:
        spec = server.url("sample-{000..003}.tar")
        assert cli_main(["shards", "index", spec, "--cache", str(tmp_path / "cache"), "--workers", "4"]) == 0
        assert server.peak_active >= 2 and all(server.requests[f"sample-00{n}.tar"] == 1 for n in range(4))
    assert "4 at a time" in capsys.readouterr().err
    built = SetIndex(next((tmp_path / "cache" / "index").glob("*.idx")))
    local = SetIndex(ROOT / "shards/sample" / "samples.idx")
    assert built.names == local.names and built.counts.tolist() == local.counts.tolist()
    assert all(np.array_equal(built.shard_rows(n), local.shard_rows(n)) for n in range(4))


def test_verify_and_inspect_read_shards_behind_urls(tmp_path, capsys):
    """`shards verify` and `shards inspect` on a URL pattern: each shard downloaded once into the node cache (as it
    is, so that damage is reported, not refused), checked against the served manifest and samples.idx; a flipped
    byte in one served shard fails verify naming that shard."""
    from http_serve import ShardServer

    damaged = tmp_path / "damaged"
    shutil.copytree(ROOT / "shards/sample", damaged)
    raw = bytearray((damaged / "sample-001.tar").read_bytes())
    raw[5000] ^= 0xFF
    (damaged / "sample-001.tar").write_bytes(bytes(raw))
    cache = ["--cache", str(tmp_path / "cache")]
    with ShardServer(ROOT / "shards/sample") as good, ShardServer(damaged) as bad:
        assert cli_main(["shards", "verify", good.url("sample-{000..003}.tar"), *cache]) == 0
        out = capsys.readouterr().out
        assert "OK: http://127.0.0.1" in out and "4 shards, 384 samples; checked size, sha256" in out
        assert cli_main(["shards", "verify", bad.url("sample-{000..003}.tar"), *cache]) == 1
        out = capsys.readouterr().out
        assert "FAILED: 1 problem(s)" in out and "sample-001.tar: sha256" in out and "differs from manifest" in out
        assert all(good.requests[f"sample-00{n}.tar"] == 1 for n in range(4))
        sheet = tmp_path / "sheet.png"
        assert cli_main(["shards", "inspect", good.url("sample-{000..003}.tar"), *cache, "--sheet", str(sheet)]) == 0
        out = capsys.readouterr().out
        assert "4 shards, 384 samples" in out and "0=astronaut: 21" in out and sheet.stat().st_size > 0
        with ShardServer(tmp_path / "nothing-here", latency_s=0.0) as empty:
            (tmp_path / "nothing-here").mkdir()
            assert cli_main(["shards", "verify", empty.url("x-{0..1}.tar"), *cache]) == 1
            assert "x-0.tar: " in capsys.readouterr().out


def test_dotted_keys_follow_webdataset_and_are_reported_not_dropped_silently(tmp_path, capsys):
    folder = small_set(tmp_path / "set", shards=1, per_shard=3)
    out = io.BytesIO()
    Image.fromarray(gradient()).save(out, format="JPEG")
    with tarfile.open(folder / "dotted.tar", "w") as tar:
        for name in ("img.0001.jpg", "img.0002.jpg", "other.v2.png"):
            info = tarfile.TarInfo(name)
            info.size = len(out.getvalue())
            tar.addfile(info, io.BytesIO(out.getvalue()))
    assert split_key("img.0001.jpg") == ("img", "0001.jpg")  # the key ends at the first dot of the file name
    (folder / "manifest.json").unlink()
    (folder / "samples.idx").unlink()
    assert cli_main(["shards", "verify", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "dotted.tar: no usable sample" in captured.out
    assert "img.0001.jpg" in captured.err and "first dot" in captured.err
    assert cli_main(["shards", "inspect", str(folder), "--sheet", ""]) == 1
    captured = capsys.readouterr()
    assert "2 unusable" in captured.out and "FAILED: 1 shard(s) hold no usable sample: dotted.tar" in captured.out
    assert "img.0001.jpg" in captured.err


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_scanner_agrees_with_tarfile_on_long_names_links_and_folders(tmp_path, fmt):
    out = io.BytesIO()
    Image.fromarray(gradient()).save(out, format="JPEG")
    long_folder = "a" * 60 + "/" + "b" * 70 if fmt == tarfile.USTAR_FORMAT else "d" * 150
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for number in range(4):
            key = f"{long_folder}/k{number}" if number % 2 else f"k{number}"
            for ext, payload in (("jpg", out.getvalue()), ("cls", str(number).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                if fmt == tarfile.PAX_FORMAT:
                    info.pax_headers = {"comment": "x" * 700}  # a bigger extended header block
                tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("k9.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "k0.jpg"
        tar.addfile(link)
    scan = scan_tar(path)
    with tarfile.open(path) as tar:
        expected = [m.offset_data for m in tar if m.name.endswith(".jpg") and m.isfile()]
    assert (scan.rows["block"] * 512).tolist() == expected and scan.rows["label"].tolist() == [0, 1, 2, 3]
    assert scan.keys[1] == f"{long_folder}/k1" and not scan.damage and scan.unusable == 0


def test_ranks_starting_together_build_a_foreign_index_once(tmp_path):
    foreign = tmp_path / "laion"
    foreign.mkdir()
    for number in range(6):
        write_img2dataset_shard(foreign / f"{number:05d}.tar", 5)
    code = (
        "import sys; from mimscale.shards.sets import open_shard_set as load_table; "
        f"t = load_table({str(foreign)!r}, 'data.shards'); print(len(t), t.fingerprint)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), results
    assert len({out for out, _ in results}) == 1 and results[0][0].startswith("30 ")
    assert sum(err.count(f"indexing {foreign} (6 shards)") for _, err in results) == 1  # one builder, two waited
    assert sorted(p.name for p in foreign.iterdir() if not p.name.endswith(".tar")) == ["samples.idx"]
