"""`mimscale shards create`: image folder, CSV/TSV list or existing tar shards -> validated WebDataset shards.

Inputs are listed in a fixed order (sorted paths, or the list's order, optionally shuffled by a seed) and cut
into chunks of ``samples_per_shard``; chunk k always becomes ``<prefix>k.tar`` (plus ``<prefix>k_1.tar``... when
``max_bytes_per_shard`` splits it). Each shard is written to ``.tmp``, fsynced and renamed, and a chunk's
completion marker is written only after all its shards, so a killed job re-run redoes only unfinished chunks
and produces byte-identical files. Every input is decoded and validated first; rejects are counted by reason.

Inputs are hostile until read: only regular files are opened (a FIFO named x.jpg, /dev/zero or a symlink to it is
rejected as ``not_regular_file``, never read), at most ``max_bytes`` are read per input (``too_large``), tar
members are read by seeking to just their bytes, and tar link or device members are counted
(``link_member``, ``not_regular_member``) instead of vanishing.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageOps

from mimscale.shards.format import BLOCK, MANIFEST_NAME, ShardError
from mimscale.shards.images import FORMAT_NAMES, BadImage, encode, open_image, to_rgb
from mimscale.shards.index import scan_tar
from mimscale.shards.writer import image_size_stats, write_manifest, write_shard
from mimscale.storage.atomic import atomic_write
from mimscale.storage.remote import NotRegularFile, RemoteError, RemoteNotFound, expand, is_url, open_regular

SOURCE_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
PROGRESS_DIR = ".create"
LISTED_REJECTS = 1000
CRASH_ENV = "MIMSCALE_CREATE_EXIT_AFTER_CHUNKS"  # fault injection for tests: os._exit after N chunks


@dataclass(frozen=True)
class CreateOptions:
    samples_per_shard: int = 1000
    max_bytes_per_shard: int = 0
    max_side: int = 0
    format: str = "jpg"
    quality: int = 90
    shuffle_seed: int = -1
    min_side: int = 8
    max_pixels: int = 100_000_000
    max_bytes: int = 256 << 20  # per input file or tar member; more is rejected as too_large, never read
    prefix: str = "shard-"

    def check(self) -> None:
        if self.samples_per_shard <= 0:
            raise ShardError(f"--samples-per-shard must be positive, got {self.samples_per_shard}")
        if self.format not in ("jpg", "png", "webp"):
            raise ShardError(f"--format {self.format!r} is not supported; use jpg, png or webp")
        if not 1 <= self.quality <= 100:
            raise ShardError(f"--quality must be in 1..100, got {self.quality}")
        if self.max_bytes <= 0:
            raise ShardError(f"--max-bytes must be positive, got {self.max_bytes}")
        if "." in self.prefix or "/" in self.prefix:
            raise ShardError(f"--prefix {self.prefix!r} may not contain dots or slashes")


@dataclass(frozen=True)
class Input:
    """One source sample: a file path, or (tar path, offset, size) for re-sharding; label -1 when none."""

    source: str
    label: int = -1
    path: str = ""
    offset: int = -1
    size: int = 0

    def read(self, max_bytes: int) -> bytes:
        """The input's bytes: regular files only, at most max_bytes (BadImage otherwise, nothing more read)."""
        if self.offset >= 0 and self.size > max_bytes:
            raise BadImage("too_large", f"tar member of {self.size} bytes > --max-bytes {max_bytes}")
        try:
            with open_regular(self.path) as handle:
                if self.offset >= 0:
                    handle.seek(self.offset)
                    payload = handle.read(self.size)
                    if len(payload) != self.size:
                        raise BadImage("truncated", f"{len(payload)} of {self.size} bytes in the tar")
                    return payload
                size = os.fstat(handle.fileno()).st_size
                payload = handle.read(max_bytes + 1) if size <= max_bytes else b""
                if size > max_bytes or len(payload) > max_bytes:  # the second: it grew while we read
                    raise BadImage("too_large", f"{max(size, len(payload))} bytes > --max-bytes {max_bytes}")
                return payload
        except NotRegularFile as err:
            raise BadImage("not_regular_file", str(err)) from err
        except (RemoteNotFound, RemoteError, OSError) as err:
            raise BadImage("unreadable", f"{type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------------------------- listing


def _is_image_file(path: str) -> bool:
    return path.lower().endswith(SOURCE_IMAGE_EXTS)


def list_folder(src: Path) -> tuple[list[Input], list[str]]:
    """Images under src; each top-level sub-folder is a class (sorted names -> 0, 1, ...), loose images get -1.

    Every non-folder entry with an image name is an input, FIFOs and devices included: reading rejects them by
    reason, so nothing is dropped silently (symlinked folders are not followed).
    """
    classes = sorted(entry.name for entry in src.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    items = [Input(str(p), -1, str(p)) for p in sorted(src.iterdir()) if not p.is_dir() and _is_image_file(p.name)]
    for label, name in enumerate(classes):
        for folder, dirs, files in sorted(os.walk(src / name)):
            dirs.sort()
            for file in sorted(files):
                if _is_image_file(file):
                    path = os.path.join(folder, file)
                    items.append(Input(path, label, path))
    return items, classes


def list_table(src: Path) -> tuple[list[Input], list[str]]:
    """A CSV/TSV of ``path[,label]`` (header optional; relative paths are relative to the list file)."""
    delimiter = "\t" if src.suffix.lower() == ".tsv" else ","
    with open(src, newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter=delimiter) if row and row[0].strip()]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filepath", "image", "filename"):
        rows = rows[1:]
    raw_labels = [row[1].strip() if len(row) > 1 else "" for row in rows]
    named = sorted({label for label in raw_labels if label and not label.lstrip("-").isdigit()})
    mapping = {name: number for number, name in enumerate(named)}
    items = []
    for row, raw in zip(rows, raw_labels, strict=True):
        path = Path(row[0].strip())
        path = path if path.is_absolute() else src.parent / path
        label = mapping[raw] if raw in mapping else (int(raw) if raw else -1)
        items.append(Input(str(path), label, str(path)))
    return items, named


def tar_inputs(path: str) -> tuple[list[Input], list[dict]]:
    """Image samples of one tar from its headers (shards/index.py's scan: data skipped by seeking, labels read
    bounded), and the members that cannot be inputs, by reason: links, devices/FIFOs, damage after some samples."""
    try:
        scan = scan_tar(path)
    except ShardError as err:
        raise ShardError(f"SRC {err}") from err
    items = [
        Input(f"{path}:{key}", int(label), path, int(block) * BLOCK, int(size))
        for key, (block, size, label) in zip(scan.keys, scan.rows.tolist(), strict=True)
    ]
    skipped = []
    for member in scan.not_regular:
        detail = f"tar member type {member.kind!r}" + (f" -> {member.linkname}" if member.linkname else "")
        reason = "link_member" if member.is_link else "not_regular_member"
        skipped.append({"source": f"{path}:{member.name}", "reason": reason, "detail": detail})
    if scan.damage:
        skipped.append({"source": path, "reason": "damaged_tar", "detail": scan.damage})
    return items, skipped


def list_tars(pattern: str) -> tuple[list[Input], list[str], list[dict]]:
    """Samples of existing shards (ours or any WebDataset set), read by seeking, labels kept."""
    if is_url(pattern):
        raise ShardError(f"SRC {pattern!r}: create reads local shards only; download them first")
    try:
        paths = expand(pattern, key="SRC")
    except RemoteError as err:
        raise ShardError(str(err)) from err
    items, skipped = [], []
    for path in paths:
        found, bad = tar_inputs(path)
        items += found
        skipped += bad
    classes_file = Path(paths[0]).parent / "classes.json"
    classes = json.loads(classes_file.read_text()) if classes_file.is_file() else []
    return items, classes, skipped


def list_inputs(src: str) -> tuple[list[Input], list[str], list[dict]]:
    """Dispatch on the kind of SRC: list file, image folder, or tar shards (file, folder of tars, pattern).

    Returns (inputs, class names, inputs skipped while listing as reject records)."""
    path = Path(src)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return (*list_table(path), [])
    if path.is_dir() and not glob.glob(str(path / "*.tar")):
        return (*list_folder(path), [])
    if path.is_dir() or path.suffix == ".tar" or glob.has_magic(src) or "{" in src:
        return list_tars(src)
    raise ShardError(f"SRC {src!r} is not an image folder, a .csv/.tsv list or tar shards; check the path")


# ----------------------------------------------------------------------------------------------- per sample


def convert_sample(item: Input, opts: CreateOptions) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Validate and (re-)encode one input; returns (payload, stored size, original size). BadImage on reject."""
    payload = item.read(opts.max_bytes)
    if not payload:
        raise BadImage("empty_file")
    image = open_image(payload)
    width, height = image.size
    if width * height > opts.max_pixels:
        raise BadImage("too_many_pixels", f"{width}x{height} > {opts.max_pixels}")
    if min(width, height) < opts.min_side:
        raise BadImage("too_small", f"{width}x{height} < {opts.min_side}")
    needs_resize = opts.max_side > 0 and min(width, height) > opts.max_side
    try:
        rotated = image.getexif().get(0x0112, 1) != 1  # may read (and fail on) the file
        same_format = image.format == FORMAT_NAMES[opts.format]
        keep_bytes = same_format and image.mode == "RGB" and not needs_resize and not rotated
        if needs_resize and image.format == "JPEG":
            factor = opts.max_side / min(width, height)
            image.draft("RGB", (int(width * factor) + 1, int(height * factor) + 1))
        image.load()  # full decode: validation even when the original bytes are kept
        if keep_bytes:
            return payload, (width, height), (width, height)
        image = to_rgb(ImageOps.exif_transpose(image))
    except BadImage:
        raise
    except Exception as err:
        raise BadImage("undecodable", f"{type(err).__name__}: {err}") from err
    if needs_resize:
        factor = opts.max_side / min(width, height)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)
    return encode(image, opts.format, opts.quality), image.size, (width, height)


def _split_parts(samples: list, sizes: list[int], max_bytes: int) -> list[list]:
    if max_bytes <= 0:
        return [samples]
    parts, current, used = [], [], 0
    for sample, size in zip(samples, sizes, strict=True):
        if current and used + size > max_bytes:
            parts.append(current)
            current, used = [], 0
        current.append(sample)
        used += size
    return parts + [current] if current else parts


def _shard_name(opts: CreateOptions, chunk: int, part: int) -> str:
    return f"{opts.prefix}{chunk:05d}.tar" if part == 0 else f"{opts.prefix}{chunk:05d}_{part}.tar"


def process_chunk(job: tuple[str, int, int, list[Input], CreateOptions]) -> dict:
    """Convert one chunk of inputs into its shard(s) and write the completion marker last."""
    out_dir, chunk, first_key, items, opts = job
    out = Path(out_dir)
    Image.MAX_IMAGE_PIXELS = None  # limits are checked explicitly, as reject reasons
    samples, payload_sizes, rejects, sizes = [], [], [], []
    for number, item in enumerate(items):
        try:
            payload, size, original = convert_sample(item, opts)
        except BadImage as err:
            rejects.append({"source": item.source, "reason": err.reason, "detail": str(err)[:200]})
            continue
        members = {opts.format: payload}
        if item.label >= 0:
            members["cls"] = str(item.label).encode()
        meta = {"source": item.source, "width": size[0], "height": size[1], "original_size": list(original)}
        members["json"] = json.dumps(meta).encode()
        samples.append((f"{first_key + number:09d}", members))
        payload_sizes.append(len(payload) + 3 * 1024)  # tar headers and padding of ~3 members
        sizes.append(size)
    parts = _split_parts(samples, payload_sizes, opts.max_bytes_per_shard) if samples else []
    entries = [write_shard(out / _shard_name(opts, chunk, part), rows) for part, rows in enumerate(parts)]
    marker = {"chunk": chunk, "inputs": len(items), "shards": entries, "rejects": rejects, "sizes": sizes}
    marker_path = out / PROGRESS_DIR / f"chunk-{chunk:05d}.json"
    atomic_write(marker_path, json.dumps(marker))
    return marker


# ----------------------------------------------------------------------------------------------- the job


def _job_fingerprint(items: list[Input], opts: CreateOptions) -> str:
    digest = hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode())
    for item in items:
        digest.update(f"{item.source}\t{item.label}\n".encode())
    return digest.hexdigest()[:16]


def _finished_marker(out: Path, chunk: int) -> dict | None:
    """The chunk's marker if it and all its shards are intact (same sizes as recorded), else None."""
    path = out / PROGRESS_DIR / f"chunk-{chunk:05d}.json"
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for entry in marker["shards"]:
        shard = out / entry["name"]
        if not shard.is_file() or shard.stat().st_size != entry["bytes"]:
            return None
    return marker


def _remove_chunk_leftovers(out: Path, opts: CreateOptions, chunk: int) -> None:
    stem = f"{opts.prefix}{chunk:05d}"
    for leftover in glob.glob(str(out / f"{stem}.tar*")) + glob.glob(str(out / f"{stem}_*.tar*")):
        os.remove(leftover)


def _prepare_out(out: Path, fingerprint: str) -> None:
    """Create OUT, or check that an unfinished job there is the same job (same inputs and options)."""
    progress = out / PROGRESS_DIR
    if (out / MANIFEST_NAME).is_file() and not progress.is_dir():
        raise ShardError(f"{out} already holds a finished shard set ({MANIFEST_NAME}); choose an empty OUT folder")
    job_file = progress / "job.json"
    if not job_file.is_file() and glob.glob(str(out / "*.tar")):
        raise ShardError(f"{out} already contains .tar files that this job did not write; choose an empty OUT folder")
    progress.mkdir(parents=True, exist_ok=True)
    if job_file.is_file():
        previous = json.loads(job_file.read_text()).get("fingerprint")
        if previous != fingerprint:
            raise ShardError(
                f"{out} holds an unfinished create job with other inputs or options; re-run the original "
                f"command to finish it, or delete {out} to start over"
            )
    else:
        job_file.write_text(json.dumps({"fingerprint": fingerprint}))


def _run_chunks(jobs: list, workers: int, total_inputs: int) -> None:
    """Run chunk jobs (in a process pool when workers > 1) with a progress bar over inputs."""
    from tqdm import tqdm

    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    bar = tqdm(total=total_inputs, unit="img", desc="shards create", disable=None, file=sys.stderr)
    done = 0
    with bar:
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
                for marker in pool.imap_unordered(process_chunk, jobs):
                    bar.update(marker["inputs"])
        else:
            for job in jobs:
                bar.update(process_chunk(job)["inputs"])
                done += 1
                if crash_after and done >= crash_after:
                    os._exit(137)  # simulated kill: no cleanup, no manifest


def _summarise(markers: list[dict], skipped: list[dict]) -> tuple[list[dict], dict, dict]:
    entries = [entry for marker in markers for entry in marker["shards"]]
    rejects = skipped + [reject for marker in markers for reject in marker["rejects"]]
    by_reason: dict[str, int] = {}
    for reject in rejects:
        by_reason[reject["reason"]] = by_reason.get(reject["reason"], 0) + 1
    reject_info = {"count": len(rejects), "by_reason": by_reason, "items": rejects[:LISTED_REJECTS]}
    stats = image_size_stats([tuple(size) for marker in markers for size in marker["sizes"]])
    return entries, reject_info, stats


def create_shards(src: str, out: str | Path, opts: CreateOptions, *, workers: int = 1, command: str = "") -> dict:
    """Build (or finish building) a shard set in ``out``; returns the manifest."""
    opts.check()
    out = Path(out)
    items, classes, skipped = list_inputs(src)
    if not items:
        raise ShardError(f"SRC {src!r} holds no images ({', '.join(SOURCE_IMAGE_EXTS)})")
    if opts.shuffle_seed >= 0:
        import numpy as np

        items = [items[i] for i in np.random.default_rng(opts.shuffle_seed).permutation(len(items))]
    _prepare_out(out, _job_fingerprint(items, opts))
    size = opts.samples_per_shard
    chunks = [(k, items[start : start + size]) for k, start in enumerate(range(0, len(items), size))]
    pending = [(str(out), k, k * size, rows, opts) for k, rows in chunks if _finished_marker(out, k) is None]
    for job in pending:
        _remove_chunk_leftovers(out, opts, job[1])
    if len(pending) < len(chunks):
        print(f"resuming: {len(chunks) - len(pending)} of {len(chunks)} chunks already complete", file=sys.stderr)
    _run_chunks(pending, workers, sum(len(job[3]) for job in pending))
    markers = [_finished_marker(out, k) for k, _ in chunks]
    if any(marker is None for marker in markers):
        raise ShardError(f"some chunks of {out} did not complete; re-run the same command to finish them")
    entries, rejects, stats = _summarise(markers, skipped)
    if classes:
        (out / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    manifest = write_manifest(
        out,
        entries,
        command=command,
        source=str(src),
        options=asdict(opts),
        classes=classes,
        image_stats=stats,
        rejects=rejects,
    )
    shutil.rmtree(out / PROGRESS_DIR)
    return manifest
