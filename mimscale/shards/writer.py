"""Writing shards: one tar atomically, its manifest entry (with its sample rows), then samples.idx and manifest.json.

Every file goes through a temporary name, fsync and rename (storage/atomic.py), so a reader sees the old file or
the new one; tars are byte-for-byte deterministic, so re-running a job re-creates identical files.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from mimscale.shards.format import MANIFEST_FORMAT, MANIFEST_NAME, ShardError, file_sha256
from mimscale.shards.index import INDEX_NAME, SAMPLE_DTYPE, ShardScan, report_scan, scan_tar, write_index
from mimscale.storage.atomic import atomic_output, atomic_write


def write_shard(path: str | Path, samples: list[tuple[str, dict[str, bytes]]]) -> dict:
    """Write samples to ``path`` atomically (``path.tmp``, the name create cleans up after a killed job, fsync,
    rename). Returns the shard's manifest entry, computed from the finished file before it takes ``path``.

    Each sample is ``(key, {ext: payload})``; keys may not contain dots (WebDataset would split them). The tar
    is byte-for-byte deterministic (fixed mtime, owner and mode), so re-running a job re-creates identical files.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with atomic_output(path, temp=tmp) as handle:
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
        entry = shard_entry(tmp, name=path.name)
    return entry


def shard_entry(path: str | Path, name: str | None = None) -> dict:
    """Manifest entry for one tar: name, samples, bytes, sha256, plus its sample rows under "index".

    The rows travel with the entry (JSON lists, e.g. through create's chunk markers) until write_manifest
    moves them into the binary samples.idx; the manifest itself keeps per-shard facts only.
    """
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


def write_set_index(folder: Path, entries: list[dict]) -> None:
    """samples.idx from the entries' rows; entries without rows (old create markers) are scanned from the tar."""

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
    folder = Path(folder)
    entries = sorted(entries, key=lambda e: e["name"])
    write_set_index(folder, entries)
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
    atomic_write(folder / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
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
