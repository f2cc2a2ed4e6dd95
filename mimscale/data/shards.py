"""Shard files on disk: pattern expansion, tar member index, atomic shard writing and the manifest.

A shard set is a folder of WebDataset tar files (``<key>.jpg|png|webp``, ``<key>.cls``, optional ``<key>.json``;
keys have no dots) plus an optional ``manifest.json``. The manifest records, per shard, its sample count, bytes,
sha256 and a compact member index (image offsets and labels), so the training stream can read any sample by
seeking instead of streaming whole tars. Shards written by other tools (img2dataset) work without a manifest:
they are indexed on first use by reading tar headers only.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mimscale-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
LABEL_EXTS = ("cls", "label")
TAR_END_SLACK = 20 * 512 + 1024  # end-of-archive blocks and record padding a complete tar may end with


class ShardError(ValueError):
    """A shard set or pattern is unusable; the message names the shard or config key and what to do."""


# ----------------------------------------------------------------------------------------------- patterns


def _brace_expand(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero padding kept) and ``{a,b}`` lists, left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(value).zfill(width) for value in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in _brace_expand(head + choice + tail)]


def expand_shards(pattern: str, key: str = "data.shards") -> list[Path]:
    """Resolve a path, folder, glob or brace pattern (or several joined by ``::``) to existing tar files.

    ``key`` names the config key in errors so the user knows what to change.
    """
    if not pattern or not pattern.strip():
        raise ShardError(f"{key} is empty; set it to a shard path, glob or brace pattern (e.g. shards/sample/*.tar)")
    if "::" in pattern:  # several sets, WebDataset style: a/*.tar::b/{000..009}.tar
        parts = [expand_shards(part, key) for part in pattern.split("::") if part.strip()]
        return list(dict.fromkeys(path for part in parts for path in part))
    if re.match(r"^[a-z][a-z0-9+]*://|^pipe:", pattern):
        raise ShardError(f"{key}={pattern!r}: remote URLs are not supported; copy or mount the shards locally")
    paths: list[Path] = []
    missing: list[str] = []
    for candidate in _brace_expand(pattern):
        if os.path.isdir(candidate):
            found = sorted(glob.glob(os.path.join(candidate, "*.tar")))
        elif glob.has_magic(candidate):
            found = sorted(glob.glob(candidate))
        else:
            found = [candidate] if os.path.isfile(candidate) else []
            if not found:
                missing.append(candidate)
        paths.extend(Path(p) for p in found if p.endswith(".tar"))
    if missing and paths:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ShardError(f"{key}={pattern!r}: {len(missing)} shard file(s) do not exist: {shown}")
    if not paths:
        raise ShardError(
            f"{key}={pattern!r} matches no .tar shard files (cwd {os.getcwd()}); "
            "check the path, or build shards with `mimscale shards create SRC OUT`"
        )
    return sorted(set(paths), key=lambda p: (str(p.parent), p.name))


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
    """Where each sample's image lives inside one tar file, and its label (-1 when the shard has none)."""

    name: str
    keys: list[str] = field(default_factory=list)
    exts: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    bytes: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> dict:
        return {
            "keys": self.keys,
            "exts": self.exts,
            "offsets": self.offsets,
            "sizes": self.sizes,
            "labels": self.labels,
        }

    @classmethod
    def from_json(cls, name: str, nbytes: int, data: dict) -> ShardIndex:
        return cls(
            name=name, bytes=nbytes, **{k: list(data[k]) for k in ("keys", "exts", "offsets", "sizes", "labels")}
        )


def _parse_label(raw: bytes) -> int:
    text = raw.decode("utf-8", "replace").strip()
    try:
        return int(text)
    except ValueError:
        return -1


def _warn(message: str, path: Path) -> None:
    print(f"mimscale data: {message} (check with `mimscale shards verify {path.parent}`)", file=sys.stderr)


def _scan_members(raw, tar, groups: dict[str, dict], order: list[str]) -> None:
    for member in tar:
        if not member.isfile():
            continue
        key, ext = split_key(member.name)
        if key not in groups:
            groups[key] = {}
            order.append(key)
        if ext in IMAGE_EXTS and "image" not in groups[key]:
            groups[key]["image"] = (ext, member.offset_data, member.size)
        elif ext in LABEL_EXTS and "label" not in groups[key]:
            here = raw.tell()
            raw.seek(member.offset_data)
            groups[key]["label"] = _parse_label(raw.read(member.size))
            raw.seek(here)


def index_tar(path: str | Path) -> ShardIndex:
    """Read tar headers (and the tiny label members) of one shard; image data is skipped by seeking.

    Samples without an image member are ignored. A file that is not a tar is a ShardError naming it; a tar cut
    short or corrupt in the middle keeps the samples before the damage, with a warning to run verify.
    """
    path = Path(path)
    groups: dict[str, dict] = {}
    order: list[str] = []
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            nbytes = os.fstat(raw.fileno()).st_size
            try:
                _scan_members(raw, tar, groups, order)
            except (tarfile.ReadError, EOFError) as err:
                if not order:
                    raise
                _warn(f"shard {path} is damaged after {len(order)} samples ({err}); the rest is skipped", path)
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"shard {path} is not a readable tar file ({err}); re-create or remove it") from err
    if nbytes - end > TAR_END_SLACK:  # tarfile stops quietly at a corrupt header in the middle of a file
        _warn(f"shard {path}: unreadable data after byte {end} of {nbytes}; the samples there are skipped", path)
    index = ShardIndex(name=path.name, bytes=nbytes)
    for key in order:
        group = groups[key]
        if "image" not in group or group["image"][1] + group["image"][2] > nbytes:
            continue
        ext, offset, size = group["image"]
        index.keys.append(key)
        index.exts.append(ext)
        index.offsets.append(offset)
        index.sizes.append(size)
        index.labels.append(group.get("label", -1))
    return index


def load_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest.json, or None when there is none (foreign shard sets)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ShardError(f"{path} is not valid JSON ({err}); delete it or re-run `mimscale shards create`") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"{path} has no 'shards' list; it was not written by mimscale (delete it to re-index)")
    return manifest


def index_shards(paths: list[Path]) -> list[ShardIndex]:
    """Index every shard, using the manifest's cached index when it matches the file's size."""
    manifests: dict[Path, dict] = {}
    indexes = []
    for path in paths:
        folder = path.parent
        if folder not in manifests:
            manifest = load_manifest(folder) or {"shards": []}
            manifests[folder] = {entry["name"]: entry for entry in manifest["shards"] if "name" in entry}
        entry = manifests[folder].get(path.name)
        size = path.stat().st_size
        if entry and entry.get("bytes") == size and isinstance(entry.get("index"), dict):
            indexes.append(ShardIndex.from_json(path.name, size, entry["index"]))
        else:
            indexes.append(index_tar(path))
    return indexes


def dataset_fingerprint(indexes: list[ShardIndex]) -> str:
    """Identity of a shard set for resume checks: shard names and sample counts (not folder, so sets can move)."""
    digest = hashlib.sha256()
    for index in indexes:
        digest.update(f"{index.name}:{len(index)}\n".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- writing


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    _fsync_dir(path.parent)
    return entry


def shard_entry(path: str | Path, name: str | None = None) -> dict:
    """Manifest entry for one tar: name, samples, bytes, sha256 and the member index."""
    index = index_tar(path)
    return {
        "name": name or Path(path).name,
        "samples": len(index),
        "bytes": index.bytes,
        "sha256": file_sha256(path),
        "index": index.to_json(),
    }


def write_manifest(folder: str | Path, entries: list[dict], **extra) -> dict:
    """Write ``manifest.json`` atomically with totals computed from the shard entries."""
    folder = Path(folder)
    entries = sorted(entries, key=lambda e: e["name"])
    manifest = {
        "format": MANIFEST_FORMAT,
        "totals": {
            "shards": len(entries),
            "samples": sum(e["samples"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
        },
        **extra,
        "shards": entries,
    }
    readable = {
        **manifest,
        "shards": [{**e, "index": f"\0index{n}"} if "index" in e else e for n, e in enumerate(entries)],
    }
    text = re.sub(  # one line per shard index keeps the manifest readable; one pass keeps it linear in size
        r'"\\u0000index(\d+)"',  # a NUL cannot occur in real data, so the token cannot collide
        lambda match: json.dumps(entries[int(match.group(1))]["index"], separators=(",", ":")),
        json.dumps(readable, indent=1),
    )
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(text + "\n")
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
