"""The shard format, read in one place: sample keys, member extensions, labels, tar headers and the manifest.

A shard set is a folder of WebDataset tar files (``<key>.jpg|png|webp``, ``<key>.cls``, optional ``<key>.json``;
a key ends at the first dot of the file name) plus ``manifest.json`` (per shard: name, samples, bytes, sha256)
and ``samples.idx``, the binary per-sample index the training stream memory-maps (see shards/index.py). Shards
written by other tools (img2dataset) work without either: they are indexed once by `mimscale shards index` or
on first use, by reading tar headers only.

Everything here reads hostile bytes: :class:`TarWalk` is the one tar reader (headers only, data skipped by
seeking, damage recorded instead of raised), :func:`parse_label` the one label rule and :func:`parse_manifest`
the one manifest parser; index building, create's re-sharding, verify and training all go through them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mimscale.storage import remote

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mimscale-shards/2"  # /1 kept per-sample lists in the JSON
MAX_MANIFEST_BYTES = 256 << 20  # per-shard facts only: ~150 B per shard
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
LABEL_EXTS = ("cls", "label")
BLOCK = 512  # tar block: headers and member data start on multiples of it
MAX_NAME_BYTES = 4096
MAX_LABEL_BYTES = 64
REGULAR_KINDS = (b"0", b"\0", b"7")  # tar type flags of regular files (7: contiguous file)
_NEXT_MEMBER_KINDS = (b"L", b"K", b"x")  # GNU long name, GNU long link name, pax header: describe the next member
_SKIPPED_KINDS = (b"g",)  # pax global header: no member of its own


class ShardError(ValueError):
    """A shard set or pattern is unusable; the message names the shard or config key and what to do."""


# ----------------------------------------------------------------------------------------------- samples


def split_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename, the rest the extension."""
    folder, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return member_name, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def parse_label(raw: bytes) -> int:
    """The one label rule: a label member (``.cls``/``.label``) holds a decimal integer, surrounding whitespace
    allowed, in [-1, 2**31); anything else, or a member over MAX_LABEL_BYTES bytes, means "no label" (-1).

    Training (samples.idx), create's re-sharding and verify all read labels through this function; callers read
    at most MAX_LABEL_BYTES + 1 bytes of a member (see :func:`read_label`)."""
    if len(raw) > MAX_LABEL_BYTES:
        return -1
    try:
        value = int(raw.decode("utf-8", "replace").strip())
    except ValueError:
        return -1
    return value if -1 <= value < 2**31 else -1


def read_label(handle, member: TarMember) -> int:
    """A label member's value (bounded read; see parse_label); the handle's position is not kept."""
    handle.seek(member.data)
    return parse_label(handle.read(min(member.size, MAX_LABEL_BYTES + 1)))


# ----------------------------------------------------------------------------------------------- tar headers


@dataclass(frozen=True)
class TarMember:
    """One member as its header describes it: name (long names resolved), data offset and size, type flag."""

    name: str
    data: int
    size: int
    kind: bytes
    linkname: str = ""

    @property
    def is_regular(self) -> bool:
        return self.kind in REGULAR_KINDS

    @property
    def is_link(self) -> bool:
        return self.kind in (b"1", b"2")


def _octal(field_bytes: bytes) -> int:
    if field_bytes[:1] and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _text(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_header(block: bytes, offset: int) -> tuple[str, int, bytes, str]:
    """(name, size, type flag, link name) of a tar header block; ValueError on a bad checksum or garbage fields."""
    stored = _octal(block[148:156])
    if stored != sum(block[:148]) + 256 + sum(block[156:]):
        raise ValueError(f"bad header checksum at byte {offset}")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and block[345]:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace"), _octal(block[124:136]), block[156:157], _text(block[157:257])


def _pax_value(payload: bytes, key: bytes) -> str | None:
    for record in payload.split(b"\n"):
        _, _, item = record.partition(b" ")
        if item.startswith(key + b"="):
            return item[len(key) + 1 :].decode("utf-8", "replace")
    return None


class TarWalk:
    """The members of a tar, read from their headers only (data is skipped by seeking): the one tar reader.

    Iterating yields every member except the headers that describe the next one (GNU long names, pax); damage
    (a bad header checksum, a member cut short, no end-of-archive) ends the walk and is kept in ``damage``, so a
    tar damaged in the middle still gives the members before the damage.
    """

    def __init__(self, handle, nbytes: int):
        self.handle, self.nbytes = handle, nbytes
        self.damage = ""
        self.end = 0  # where the end-of-archive blocks start, once the walk got there

    def __iter__(self) -> Iterator[TarMember]:
        handle, nbytes = self.handle, self.nbytes
        offset, long_name, long_link = 0, None, None
        while offset + BLOCK <= nbytes:
            handle.seek(offset)
            block = handle.read(BLOCK)
            if len(block) < BLOCK or block == bytes(BLOCK):
                self.end = offset
                return
            try:
                name, size, kind, linkname = parse_header(block, offset)
            except ValueError as err:
                self.damage = str(err)
                return
            data = offset + BLOCK
            offset = data + -(-size // BLOCK) * BLOCK
            if data + size > nbytes:
                self.damage = f"member {name!r} is cut short at byte {nbytes}"
                return
            if kind in _NEXT_MEMBER_KINDS:
                handle.seek(data)
                payload = handle.read(min(size, MAX_NAME_BYTES * 4))
                if kind == b"x":
                    long_name = _pax_value(payload, b"path") or long_name
                    long_link = _pax_value(payload, b"linkpath") or long_link
                elif kind == b"L":
                    long_name = _text(payload)
                else:
                    long_link = _text(payload)
                continue
            if kind not in _SKIPPED_KINDS:
                yield TarMember(long_name or name, data, size, kind, long_link or linkname)
            long_name = long_link = None
        self.end = offset
        if offset != nbytes:  # no end-of-archive blocks, and the last member or header is incomplete
            self.damage = f"the file ends inside a member at byte {nbytes} (cut short?)"


def member_name_before(handle, data_offset: int) -> str:
    """The name in the header block right before a member's data (for messages; '' when it is not a header)."""
    handle.seek(data_offset - BLOCK)
    try:
        return parse_header(handle.read(BLOCK), data_offset - BLOCK)[0]
    except ValueError:
        return ""


# ----------------------------------------------------------------------------------------------- manifest


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


def load_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest.json, or None when there is none (foreign shard sets)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        with remote.open_regular(path) as handle:  # bounded: a hostile or runaway file is refused, not read whole
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except (OSError, remote.RemoteError) as err:
        raise ShardError(f"{path} cannot be read ({err})") from err
    return parse_manifest(raw, str(path))


def load_remote_manifest(folder: str, keep_in: Path | None = None) -> dict | None:
    """The manifest.json beside remote shards (a bounded, retried read), or None when the folder has none.

    Training's leniency, and only it: a ``pipe:`` command or a signed URL has no folder (None); with ``keep_in``
    (the node's shard cache) each read is saved there, and the saved copy stands in when the store cannot be
    reached, so a run whose shards are all cached resumes while the store is down. The bytes are parsed as
    strictly either way.
    """
    location = f"{folder}/{MANIFEST_NAME}"
    if remote.sibling_folder(location) is None:
        return None  # never a command or an edited signed URL (remote.sibling_folder)
    saved = keep_in / f"{hashlib.sha256(folder.encode()).hexdigest()[:16]}-manifest.json" if keep_in else None
    try:
        raw = remote.read_small(location, MAX_MANIFEST_BYTES)
    except remote.RemoteNotFound:
        return None
    except remote.RemoteError as err:
        if saved is None or not saved.is_file():
            raise
        print(f"mimscale data: {err}; using the copy of {location} this node saved at {saved}", file=sys.stderr)
        with remote.open_regular(saved) as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
        return parse_manifest(raw, str(saved))
    manifest = parse_manifest(raw, location)
    if saved is not None:
        _save_copy(saved, raw)
    return manifest


def _save_copy(path: Path, data: bytes) -> None:
    """Best effort (a read-only cache only loses the fallback): the one atomic writer, without fsync."""
    from mimscale.storage.atomic import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, durable=False)
    except OSError:
        pass


def manifest_checksums(manifest: dict | None) -> dict[str, str]:
    """{shard name: sha256} of a parsed manifest; shards it lists without a sha256 are simply not checked."""
    if manifest is None:
        return {}
    return {entry["name"]: entry["sha256"] for entry in manifest["shards"] if isinstance(entry.get("sha256"), str)}


# ----------------------------------------------------------------------------------------------- identity


def dataset_fingerprint(names: list[str], counts) -> str:
    """Identity of a shard set for resume checks: shard names and sample counts (not folder, so sets can move)."""
    digest = hashlib.sha256()
    for name, count in zip(names, counts, strict=True):
        digest.update(f"{name}:{int(count)}\n".encode())
    return digest.hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with remote.open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
