"""Shard files on disk: pattern expansion, atomic shard writing and the manifest.

A shard set is a folder of WebDataset tar files (``<key>.jpg|png|webp``, ``<key>.cls``, optional ``<key>.json``;
a key ends at the first dot of the file name) plus ``manifest.json`` (per shard: name, samples, bytes, sha256)
and ``samples.idx``, the binary per-sample index the training stream memory-maps (see data/index.py). Shards
written by other tools (img2dataset) work without either: they are indexed once by `mimscale shards index` or
on first use, by reading tar headers only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from mimscale.storage import remote
from mimscale.storage.atomic import fsync_dir

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mimscale-shards/2"  # /1 kept per-sample lists in the JSON
MAX_MANIFEST_BYTES = 256 << 20  # per-shard facts only: ~150 B per shard
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
LABEL_EXTS = ("cls", "label")


class ShardError(ValueError):
    """A shard set or pattern is unusable; the message names the shard or config key and what to do."""


# ----------------------------------------------------------------------------------------------- patterns


def expand_shards(pattern: str, key: str = "data.shards") -> list[Path]:
    """Local tar files of a path, folder, glob or brace pattern (or several joined by ``::``), for callers that read
    only local files. The expansion is ``remote.expand``'s, the one that also takes URLs, so both agree on every
    pattern and every refusal. ``key`` names the config key in errors so the user knows what to change.
    """
    if pattern and any(remote.is_url(part) for part in pattern.split("::") if part.strip()):
        raise ShardError(f"{key}={pattern!r}: remote URLs are not supported here; copy or mount the shards locally")
    try:
        return [Path(path) for path in remote.expand(pattern, key)]
    except remote.RemoteError as err:
        raise ShardError(str(err)) from err


# ----------------------------------------------------------------------------------------------- index


def split_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename, the rest the extension."""
    folder, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return member_name, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass
class ShardIndex:
    """One shard's samples as lists (for tools: create's re-sharding, inspect); training uses data/index.py."""

    name: str
    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    bytes: int = 0
    unusable: int = 0

    def __len__(self) -> int:
        return len(self.keys)


def index_tar(path: str | Path) -> ShardIndex:
    """Read one shard's tar headers (image data is skipped by seeking); damage and unusable samples are warned.

    A file that is not a tar is a ShardError naming it; a tar cut short or corrupt in the middle keeps the
    samples before the damage.
    """
    from mimscale.shards.index import BLOCK, report_scan, scan_tar

    scan = scan_tar(path)
    report_scan(scan, path)
    return ShardIndex(
        name=scan.name,
        keys=scan.keys,
        offsets=(scan.rows["block"].astype("int64") * BLOCK).tolist(),
        sizes=scan.rows["size"].tolist(),
        labels=scan.rows["label"].tolist(),
        bytes=scan.bytes,
        unusable=scan.unusable,
    )


def load_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest.json, or None when there is none (foreign shard sets)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:  # bounded: a hostile or runaway file is refused, not read whole
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as err:
        raise ShardError(f"{path} cannot be read ({err})") from err
    return parse_manifest(raw, str(path))


def load_remote_manifest(folder: str) -> dict | None:
    """The manifest.json beside remote shards (a bounded, retried read), or None when the folder has none."""
    try:
        raw = remote.read_small(f"{folder}/{MANIFEST_NAME}", MAX_MANIFEST_BYTES)
    except remote.RemoteNotFound:
        return None
    return parse_manifest(raw, f"{folder}/{MANIFEST_NAME}")


def parse_manifest(raw: bytes, shown: str) -> dict:
    """A manifest's bytes, checked as hostile input: JSON within the size bound, a 'shards' list of named entries."""
    try:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ShardError(f"{shown} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; it was not written by mimscale")
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{shown} is not valid JSON ({err}); delete it or re-run `mimscale shards create`") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"{shown} has no 'shards' list; it was not written by mimscale (delete it to re-index)")
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ShardError(f"{shown} lists a shard without a name ({str(entry)[:80]}); delete it to re-index")
    if not isinstance(manifest.get("totals", {}), dict):
        raise ShardError(f"{shown}: 'totals' is not an object; delete it to re-index")
    return manifest


def index_shards(paths: list[Path]) -> list[ShardIndex]:
    """Index every shard by scanning its headers (tools; the training stream memory-maps samples.idx instead)."""
    return [index_tar(path) for path in paths]


def dataset_fingerprint(names: list[str], counts) -> str:
    """Identity of a shard set for resume checks: shard names and sample counts (not folder, so sets can move)."""
    digest = hashlib.sha256()
    for name, count in zip(names, counts, strict=True):
        digest.update(f"{name}:{int(count)}\n".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- writing


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str | Path, samples: list[tuple[str, dict[str, bytes]]]) -> dict:
    """Write samples to ``path`` atomically: ``path.tmp``, fsync, rename. Returns the shard's manifest entry.

    Each sample is ``(key, {ext: payload})``; keys may not contain dots (WebDataset would split them). The tar
    is byte-for-byte deterministic (fixed mtime, owner and mode), so re-running a job re-creates identical files.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                if "." in key or "/" in key or not key:
                    raise ShardError(f"sample key {key!r} must be non-empty without dots or slashes")
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o444
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(payload))
        handle.flush()
        os.fsync(handle.fileno())
    entry = shard_entry(tmp, name=path.name)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return entry


def shard_entry(path: str | Path, name: str | None = None) -> dict:
    """Manifest entry for one tar: name, samples, bytes, sha256, plus its sample rows under "index".

    The rows travel with the entry (JSON lists, e.g. through create's chunk markers) until write_manifest
    moves them into the binary samples.idx; the manifest itself keeps per-shard facts only.
    """
    from mimscale.shards.index import report_scan, scan_tar

    scan = scan_tar(path)
    report_scan(scan, path)
    return {
        "name": name or Path(path).name,
        "samples": len(scan.rows),
        "bytes": scan.bytes,
        "sha256": file_sha256(path),
        "index": {
            "blocks": scan.rows["block"].tolist(),
            "sizes": scan.rows["size"].tolist(),
            "labels": scan.rows["label"].tolist(),
            "unusable": scan.unusable,
        },
    }


def _write_set_index(folder: Path, entries: list[dict]) -> None:
    """samples.idx from the entries' rows; entries without rows (old create markers) are scanned from the tar."""
    import numpy as np

    from mimscale.shards.index import INDEX_NAME, SAMPLE_DTYPE, ShardScan, scan_tar, write_index

    def scans():
        for entry in entries:
            rows = entry.get("index")
            if not isinstance(rows, dict):
                yield scan_tar(folder / entry["name"])
                continue
            table = np.zeros(len(rows["blocks"]), SAMPLE_DTYPE)
            table["block"], table["size"], table["label"] = rows["blocks"], rows["sizes"], rows["labels"]
            yield ShardScan(entry["name"], entry["bytes"], table, unusable=int(rows.get("unusable", 0)))

    write_index(folder / INDEX_NAME, scans(), [entry["name"] for entry in entries])


def write_manifest(folder: str | Path, entries: list[dict], **extra) -> dict:
    """Write samples.idx, then ``manifest.json`` (per-shard facts and totals), both atomically."""
    from mimscale.shards.index import INDEX_NAME

    folder = Path(folder)
    entries = sorted(entries, key=lambda e: e["name"])
    _write_set_index(folder, entries)
    shards = [{key: value for key, value in entry.items() if key != "index"} for entry in entries]
    manifest = {
        "format": MANIFEST_FORMAT,
        "totals": {
            "shards": len(shards),
            "samples": sum(e["samples"] for e in shards),
            "bytes": sum(e["bytes"] for e in shards),
        },
        "index": INDEX_NAME,
        **extra,
        "shards": shards,
    }
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST_NAME)
    return manifest


def image_size_stats(sizes: list[tuple[int, int]]) -> dict:
    """Min/mean/max of widths and heights, for the manifest."""
    if not sizes:
        return {}
    stats = {}
    for axis, name in ((0, "width"), (1, "height")):
        values = [size[axis] for size in sizes]
        stats[name] = {"min": min(values), "mean": round(sum(values) / len(values), 1), "max": max(values)}
    return stats
