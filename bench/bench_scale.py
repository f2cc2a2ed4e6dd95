"""The data layer at scale: index size, rank start-up and memory on a synthetic N-sample shard set, and the
shuffle quality of windowed streams on a class-sorted set.

    nice -n 10 python bench/bench_scale.py scale --samples 10000000 --dir /tmp/scale [--keep] [--skip-index]
    nice -n 10 python bench/bench_scale.py counts --samples 1000000 --dir /tmp/scale
    python bench/bench_scale.py quality [--classes 100 --shards 1000 --per-shard 100 --global-batch 256]

scale    writes N samples (a tiny real JPEG each, one of 16 encoded once, reused; 1000 per tar, no manifest: a
         "foreign" folder as img2dataset leaves it), then measures
           index     one-time `mimscale shards index DIR --workers 2` (a fresh process), and the index's bytes/sample
           start-up  a fresh process (one rank) builds its stream table with the index present: wall time, and the
                     private memory (USS from /proc/self/smaps_rollup) it adds; also after the epoch plan of C=64
                     streams and after reading index rows for one window of every stream
         The shard set is deleted afterwards unless --keep.
counts   the same synthetic set published with counts only (a widsindex ``shardindex.json``, issue 23): time to the
         first batch of a fresh process (one rank, C=8, windows of 8 shards) with counts only, then with a full
         samples.idx; and the bytes a remote counted set (tests/http_serve.py on 127.0.0.1) downloads before its
         first batch, from the server's request log, against the whole set and the two windows per stream
quality  class mix per global batch when every shard holds one class (the worst case, a class-sorted set),
         for several (streams, window) settings against a full shuffle: mean distinct classes per batch and the
         total-variation distance between a batch's class histogram and the set's.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

BLOCK = 512
PER_SHARD = 1000


# ----------------------------------------------------------------------------------------------- generator


def tiny_jpegs(count: int = 16) -> list[bytes]:
    """A few distinct real 8x8 JPEGs (under 512 bytes each: one tar block of data)."""
    payloads = []
    for number in range(count):
        out = io.BytesIO()
        pixels = np.random.default_rng(number).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(out, format="JPEG", quality=50, optimize=True)
        payloads.append(out.getvalue())
    assert all(len(p) <= BLOCK for p in payloads)
    return payloads


def _header(name: str, size: int) -> bytes:
    block = bytearray(BLOCK)
    block[0 : len(name)] = name.encode()
    block[100:108] = b"0000444\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = f"{size:011o}\0".encode()
    block[136:148] = b"00000000000\0"
    block[148:156] = b" " * 8
    block[156:157] = b"0"
    block[257:265] = b"ustar\x0000"
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def write_tar(job: tuple[str, int, int]) -> int:
    """One shard of ``count`` samples numbered from ``first``: ``<key>.jpg``, a 512-byte header + one data block."""
    path, first, count = job
    payloads = [p + bytes(BLOCK - len(p)) for p in tiny_jpegs()]
    sizes = [len(p) for p in tiny_jpegs()]
    parts = []
    for number in range(first, first + count):
        choice = number % len(payloads)
        parts.append(_header(f"{number:010d}.jpg", sizes[choice]))
        parts.append(payloads[choice])
    parts.append(bytes(2 * BLOCK))
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(b"".join(parts))
    os.replace(tmp, path)
    return count


def generate(folder: Path, samples: int, workers: int = 2) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(folder / f"{n:06d}.tar"), n * PER_SHARD, min(PER_SHARD, samples - n * PER_SHARD))
        for n in range(-(-samples // PER_SHARD))
    ]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(write_tar, jobs, chunksize=16):
            pass
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- measuring


PROBE = r"""
import json, sys, time
def uss():
    fields = {}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Rss"], fields["Anonymous"]
import numpy as np
from mimscale.pipeline.order import EpochPlan
from mimscale.shards.sets import open_shard_set as load_table
base = uss()
start = time.perf_counter()
table = load_table(sys.argv[1], "data.shards")
loaded = time.perf_counter() - start
after_load = uss()
plan = EpochPlan(table.counts, seed=0, epoch=0, streams=64, window=8)
planned = time.perf_counter() - start
after_plan = uss()
for s in range(64):  # index rows of one whole window per stream: what readers touch first
    for k in range(min(8 * 1000, plan.stream_length)):
        table.label(plan.sample(s, k))
after_window = uss()
delta = lambda at, field: at[field] - base[field]  # noqa: E731
print(json.dumps({"samples": len(table), "load_s": loaded, "plan_s": planned,
                  "uss": [delta(after_load, 0), delta(after_plan, 0), delta(after_window, 0)],
                  "rss": [delta(after_load, 1), delta(after_plan, 1), delta(after_window, 1)],
                  "anon": [delta(after_load, 2), delta(after_plan, 2), delta(after_window, 2)]}))
"""


def run_probe(folder: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def drop_page_cache_of(folder: Path) -> None:
    """Evict the set's files from the page cache where the OS lets us (posix_fadvise), so reads hit the disk."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def bench_index(folder: Path, samples: int) -> float:
    """One-time `shards index --workers 2` of the foreign folder, in a fresh process, from a cold page cache."""
    (folder / "samples.idx").unlink(missing_ok=True)
    drop_page_cache_of(folder)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mimscale.cli", "shards", "index", str(folder), "--workers", "2"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    index_s = time.perf_counter() - start
    print(f"shards index --workers 2 (cold page cache): {index_s:.1f} s ({samples / index_s:,.0f} samples/s)")
    return index_s


def bench_scale(args) -> None:
    folder = Path(args.dir) / f"synthetic-{args.samples}"
    if not folder.exists():
        print(f"generating {args.samples:,} samples in {folder} ...", flush=True)
        print(f"  generated in {generate(folder, args.samples):.0f} s", flush=True)
    size = sum(p.stat().st_size for p in folder.glob("*.tar"))
    print(f"set: {args.samples:,} samples, {len(list(folder.glob('*.tar'))):,} tars, {size / 1e9:.2f} GB", flush=True)
    if not (args.skip_index and (folder / "samples.idx").is_file()):
        bench_index(folder, args.samples)
    index_bytes = (folder / "samples.idx").stat().st_size
    print(f"index on disk: {index_bytes / 1e6:.1f} MB = {index_bytes / args.samples:.2f} B/sample")
    for attempt in range(2):
        probe = run_probe(folder)
        uss, anon = probe["uss"], probe["anon"]
        print(
            f"rank start-up #{attempt + 1}: table {probe['load_s']:.2f} s, + plan (C=64) {probe['plan_s']:.2f} s; "
            f"private memory (USS) added: {uss[0] / 1e6:.1f} MB after load ({uss[0] / args.samples:.2f} B/sample), "
            f"{uss[1] / 1e6:.1f} MB after plan ({uss[1] / args.samples:.2f} B/sample); after one window per "
            f"stream: USS +{uss[2] / 1e6:.1f} MB of which anonymous (heap) +{anon[2] / 1e6:.1f} MB, the rest "
            "index pages mapped from the page cache (clean, reclaimable, shared with ranks reading them)"
        )
    if not args.keep:
        shutil.rmtree(folder)
        print(f"deleted {folder}")


FIRST_BATCH = r"""
import json, sys, time
start = time.perf_counter()
from mimscale.config import load_config
from mimscale.pipeline.masking import build_mask_generator
from mimscale.pipeline.stream import build_train_loader
cfg = load_config(None, [f"data.shards={sys.argv[1]}", "data.batch_size=64", "data.image_size=16", "data.streams=8",
                         "data.shuffle_window=8", "data.num_workers=0", "mask.patch_size=16", f"data.cache_dir={sys.argv[2]}"])
mask = build_mask_generator("random_tokens", image_size=16, token_stride=8, ratio=0.5, cell_size=16)
imported = time.perf_counter()
stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=mask)
opened = time.perf_counter()
batch = next(iter(stream))
done = time.perf_counter()
index = type(stream.table.indexes[0]).__name__
print(json.dumps({"open_s": opened - imported, "first_batch_s": done - imported, "index": index,
                  "ids": [int(i) for i in batch["sample_id"]]}))
"""


def first_batch(spec: str, cache: Path) -> dict:
    """A fresh process's first batch: its timings, plus ``process_s`` from launch to exit (what a user waits)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", FIRST_BATCH, spec, str(cache)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}


def best(runs: list[dict], key: str) -> float:
    return min(run[key] for run in runs)


def write_wids_index(folder: Path) -> None:
    """What `widsindex create` writes beside the shards: url, nsamples, filesize per shard."""
    shards = []
    for path in sorted(folder.glob("*.tar")):
        size = path.stat().st_size
        shards.append({"url": path.name, "nsamples": (size - 2 * BLOCK) // (2 * BLOCK), "filesize": size})
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": shards}
    (folder / "shardindex.json").write_text(json.dumps(index))


def bench_counts(args) -> None:
    folder = Path(args.dir) / f"synthetic-{args.samples}"
    if not folder.exists():
        print(f"generating {args.samples:,} samples in {folder} ...", flush=True)
        print(f"  generated in {generate(folder, args.samples):.0f} s", flush=True)
    tars = sorted(folder.glob("*.tar"))
    size = sum(p.stat().st_size for p in tars)
    print(f"set: {args.samples:,} samples, {len(tars):,} tars, {size / 1e9:.2f} GB", flush=True)
    (folder / "samples.idx").unlink(missing_ok=True)
    write_wids_index(folder)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from http_serve import ShardServer

    cache = Path(args.dir) / "bench-cache"
    shutil.rmtree(cache, ignore_errors=True)
    with ShardServer(folder) as server:
        spec = server.url(f"{{000000..{len(tars) - 1:06d}}}.tar")
        remote = first_batch(spec, cache / "remote")
        requests = dict(server.requests)
    fetched = [name for name in requests if name.endswith(".tar")]
    fetched_bytes = sum((folder / name).stat().st_size * requests[name] for name in fetched)
    other = {name: n for name, n in requests.items() if not name.endswith(".tar")}
    print(
        f"remote, counts only: first batch {remote['process_s']:.2f} s after launch; downloaded {len(fetched)} of "
        f"{len(tars)} shards ({fetched_bytes / 1e6:.1f} MB of {size / 1e9:.2f} GB; 8 streams x 2 windows x 8 "
        f"shards = 128 shards at most), plus {len(other)} small files {sorted(other)}",
        flush=True,
    )
    counted = [first_batch(str(folder), cache / f"counted{n}") for n in range(args.repeat)]
    index_s = bench_index(folder, args.samples)
    indexed = [first_batch(str(folder), cache / f"indexed{n}") for n in range(args.repeat)]
    for name, runs in (("counts only", counted), ("samples.idx", indexed)):
        print(
            f"local, {name} ({runs[0]['index']}), best of {args.repeat}: launch to first batch "
            f"{best(runs, 'process_s'):.2f} s; after imports: table {best(runs, 'open_s'):.2f} s, first batch "
            f"{best(runs, 'first_batch_s'):.2f} s"
        )
    same = counted[0]["ids"] == indexed[0]["ids"] == remote["ids"]
    print(
        f"counts only / samples.idx: launch to first batch {best(counted, 'process_s') / best(indexed, 'process_s'):.2f}x, "
        f"after imports {best(counted, 'first_batch_s') / best(indexed, 'first_batch_s'):.2f}x; without counts the "
        f"set must first be indexed ({index_s:.1f} s); the same sample ids in all three runs: {same}"
    )
    shutil.rmtree(cache, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(folder)
        print(f"deleted {folder}")


# ----------------------------------------------------------------------------------------------- quality


def class_mix(ids: np.ndarray, labels: np.ndarray, global_batch: int, classes: int) -> tuple[float, float]:
    """(mean distinct classes per batch, mean total-variation distance to the uniform class mix)."""
    batches = labels[ids[: len(ids) // global_batch * global_batch]].reshape(-1, global_batch)
    distinct, distance = [], []
    for batch in batches:
        histogram = np.bincount(batch, minlength=classes) / global_batch
        distinct.append(np.count_nonzero(histogram))
        distance.append(0.5 * np.abs(histogram - 1.0 / classes).sum())
    return float(np.mean(distinct)), float(np.mean(distance))


def bench_quality(args) -> None:
    from mimscale.pipeline.order import KeyedPermutation, epoch_sequence

    counts = np.full(args.shards, args.per_shard)
    labels = np.repeat(np.arange(args.shards) * args.classes // args.shards, args.per_shard)  # class-sorted shards
    total, batch = len(labels), args.global_batch
    print(
        f"{args.shards} shards x {args.per_shard} samples, {args.classes} classes, each shard one class "
        f"(class-sorted); global batch {batch}; means over one epoch"
    )
    print(f"{'order':<34} {'classes/batch':>14} {'TV to uniform':>14}")
    full = KeyedPermutation(total, (0, 0))
    ids = np.fromiter((full[p] for p in range(total)), dtype=np.int64, count=total)
    print(
        f"{'full shuffle (global permutation)':<34} {class_mix(ids, labels, batch, args.classes)[0]:>14.1f} "
        f"{class_mix(ids, labels, batch, args.classes)[1]:>14.3f}"
    )
    for streams in args.streams:
        for window in args.windows:
            ids = epoch_sequence(counts, seed=0, epoch=0, streams=streams, window=window, global_batch=batch)
            distinct, distance = class_mix(ids, labels, batch, args.classes)
            print(f"{f'streams C={streams}, window {window} shards':<34} {distinct:>14.1f} {distance:>14.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    scale = commands.add_parser("scale")
    scale.add_argument("--samples", type=int, default=2_000_000)
    scale.add_argument("--dir", default="/tmp/mimscale-scale")
    scale.add_argument("--keep", action="store_true")
    scale.add_argument("--skip-index", action="store_true", help="reuse the set's samples.idx (kept set)")
    counts = commands.add_parser("counts")
    counts.add_argument("--samples", type=int, default=1_000_000)
    counts.add_argument("--dir", default="/tmp/mimscale-scale")
    counts.add_argument("--keep", action="store_true")
    counts.add_argument("--repeat", type=int, default=2, help="fresh processes per measurement (best is kept)")
    quality = commands.add_parser("quality")
    quality.add_argument("--classes", type=int, default=100)
    quality.add_argument("--shards", type=int, default=1000)
    quality.add_argument("--per-shard", type=int, default=100)
    quality.add_argument("--global-batch", type=int, default=256)
    quality.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64])
    quality.add_argument("--windows", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args(argv)
    {"scale": bench_scale, "counts": bench_counts, "quality": bench_quality}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
