"""The per-sample index of a shard set: one compact binary file, memory-mapped by every rank and worker.

manifest.json keeps per-shard facts only; where each sample's image lies inside its tar, and its label, live in
``samples.idx`` beside the shards (or in a cache folder when the shard folder is read-only or remote):

    header    64 bytes: magic b"MIMSIDX\\0", version u32, 0 u32, shards u64, samples u64, names bytes u64, 0...
    shards    per shard: tar bytes u64, samples u64, unusable samples u64 (24 B)
    names     shard file names, utf-8, joined by "\\n"
    samples   (16-byte aligned) per sample: image data offset in 512-byte tar blocks u32, image bytes u32,
              label i32 (-1 = none): 12 B per sample, in tar order, shard after shard

Start-up reads the header and the shard table (O(shards)); the sample rows stay on disk and are paged in through
the shared page cache only where a reader looks. The file is treated as hostile: sizes are checked against the
header before anything is read, every count and name is validated, and each shard's rows are bounds-checked
against the shard's size when the shard is first used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import stat
import struct
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mimscale.shards.format import (
    BLOCK,
    IMAGE_EXTS,
    LABEL_EXTS,
    ShardError,
    TarMember,
    TarWalk,
    read_label,
    split_key,
)
from mimscale.storage import remote
from mimscale.storage.atomic import AtomicFile
from mimscale.storage.shard_cache import cache_dir_for

INDEX_NAME = "samples.idx"
MAGIC = b"MIMSIDX\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ24x")  # 64 bytes
SHARD_DTYPE = np.dtype([("bytes", "<u8"), ("samples", "<u8"), ("unusable", "<u8")])
SAMPLE_DTYPE = np.dtype([("block", "<u4"), ("size", "<u4"), ("label", "<i4")])
MAX_INDEX_SHARDS = 1 << 22  # 4M shards (a 96 MiB table): larger sets are several sets joined with ::
MAX_TABLE_BYTES = 256 << 20  # shard table + names read into memory: checked against the header before reading
MAX_SHARD_NAME_BYTES = 255  # a file name
MAX_SHARD_SAMPLES = 1 << 40
LISTED_UNUSABLE = 3
REMOTE_SCAN_THREADS = 8  # shards downloaded and scanned at once when a remote set has no index (network-bound)


class IndexFileError(ShardError):
    """An index file is damaged, foreign or stale; the message names it and how to rebuild it."""


def _rebuild_hint(path: Path) -> str:
    return f"delete {path} and rebuild it with `mimscale shards index <shard folder>`"


# ----------------------------------------------------------------------------------------------- scanning tars


@dataclass
class ShardScan:
    """What one pass over a tar's headers finds: usable samples (rows, keys), unusable ones, and damage."""

    name: str
    bytes: int
    rows: np.ndarray
    keys: list[str] = field(default_factory=list)
    unusable: int = 0
    unusable_examples: list[str] = field(default_factory=list)
    damage: str = ""
    not_regular: list[TarMember] = field(default_factory=list)  # links, devices, FIFOs named like samples


def scan_tar(path: str | Path) -> ShardScan:
    """Index one tar by reading its headers (and the tiny label members); image bytes are skipped by seeking.

    Members group into samples by key (WebDataset: the key ends at the first dot of the file name). A sample
    without an image member is unusable (e.g. ``img.0001.jpg``, whose key is ``img`` and extension
    ``0001.jpg``): counted, with a few names kept for the report. A tar damaged in the middle keeps the samples
    before the damage. A file that is not a tar at all is a ShardError naming it.
    """
    path = Path(path)
    groups: dict[str, list] = {}
    try:
        with remote.open_regular(path) as handle:
            nbytes = os.fstat(handle.fileno()).st_size
            scan = ShardScan(name=path.name, bytes=nbytes, rows=np.empty(0, SAMPLE_DTYPE))
            walk = TarWalk(handle, nbytes)
            for member in walk:
                key, ext = split_key(member.name)
                if not member.is_regular:
                    if ext in IMAGE_EXTS or ext in LABEL_EXTS:
                        scan.not_regular.append(member)
                    continue
                group = groups.setdefault(key, [-1, 0, -1, member.name])  # block, size, label, first member name
                if ext in IMAGE_EXTS and group[0] < 0:
                    group[0], group[1] = member.data // BLOCK, member.size
                elif ext in LABEL_EXTS:
                    group[2] = read_label(handle, member)
            scan.damage = walk.damage
    except remote.NotRegularFile as err:
        raise ShardError(f"shard {path}: {err}; remove it or fix the pattern") from err
    except (OSError, remote.RemoteError) as err:
        raise ShardError(f"shard {path} is not readable ({err}); check the path and permissions") from err
    if not groups and scan.damage:
        raise ShardError(f"shard {path} is not a readable tar file ({scan.damage}); re-create or remove it")
    usable = [(key, group) for key, group in groups.items() if group[0] >= 0 and group[1] > 0]
    scan.unusable = len(groups) - len(usable)
    scan.unusable_examples = [g[3] for g in groups.values() if g[0] < 0 or g[1] <= 0][:LISTED_UNUSABLE]
    if any(group[0] >= 2**32 for _, group in usable):
        raise ShardError(f"shard {path} is larger than 2 TiB; split it into smaller shards")
    scan.keys = [key for key, _ in usable]
    scan.rows = np.array([tuple(group[:3]) for _, group in usable], dtype=SAMPLE_DTYPE).reshape(-1)
    return scan


def report_scan(scan: ShardScan, where: str | Path) -> None:
    """Warn (stderr) about damage and unusable samples in a freshly scanned shard."""
    if scan.damage:
        print(
            f"mimscale data: shard {where} is damaged after {len(scan.rows)} samples ({scan.damage}); "
            f"the rest is skipped (check with `mimscale shards verify`)",
            file=sys.stderr,
        )
    if scan.unusable:
        print(
            f"mimscale data: shard {where}: {scan.unusable} sample(s) without an image member are skipped, "
            f"e.g. {', '.join(scan.unusable_examples)} (a WebDataset key ends at the first dot of the file "
            "name: rename img.0001.jpg to img_0001.jpg)",
            file=sys.stderr,
        )


@dataclass
class ShardIndex:
    """One shard's samples as lists (for tools: inspect, benches); training memory-maps samples.idx instead."""

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


def index_shards(paths: list[Path]) -> list[ShardIndex]:
    """Index every shard by scanning its headers (tools; the training stream memory-maps samples.idx instead)."""
    return [index_tar(path) for path in paths]


# ----------------------------------------------------------------------------------------------- the file


def _layout(num_shards: int, names_bytes: int) -> tuple[int, int]:
    """(names offset, sample rows offset) for a file with these counts."""
    names_at = HEADER.size + num_shards * SHARD_DTYPE.itemsize
    return names_at, -(-(names_at + names_bytes) // 16) * 16


class IndexWriter:
    """Writes an index file shard by shard (O(shards) memory), atomically (storage.atomic.AtomicFile)."""

    def __init__(self, path: str | Path, names: list[str]):
        for name in names:
            if not name or "\n" in name or "/" in name or "\0" in name:
                raise ShardError(f"shard name {name!r} cannot be indexed (empty, or holds a newline or slash)")
        self.path, self.names = Path(path), names
        self.blob = "\n".join(names).encode()
        self.table = np.zeros(len(names), SHARD_DTYPE)
        self.output = AtomicFile(self.path)  # a private temporary name, never written through a planted link
        self.handle = self.output.handle
        self.handle.seek(_layout(len(names), len(self.blob))[1])
        self.count = 0

    def add(self, number: int, nbytes: int, rows: np.ndarray, unusable: int = 0) -> None:
        """Append shard ``number``'s rows; shards must be added in order."""
        if number != self.count:
            raise ValueError(f"shard {number} added out of order (expected {self.count})")
        self.table[number] = (nbytes, len(rows), unusable)
        self.handle.write(np.ascontiguousarray(rows, dtype=SAMPLE_DTYPE).tobytes())
        self.count += 1

    def close(self) -> Path:
        if self.count != len(self.names):
            raise ValueError(f"index closed after {self.count} of {len(self.names)} shards")
        names_at, _ = _layout(len(self.names), len(self.blob))
        total = int(self.table["samples"].sum())
        self.handle.seek(0)
        self.handle.write(HEADER.pack(MAGIC, VERSION, 0, len(self.names), total, len(self.blob)))
        self.handle.write(self.table.tobytes())
        self.handle.write(self.blob)
        return self.output.commit()

    def abort(self) -> None:
        self.output.discard()


class SetIndex:
    """An open, validated index file: shard names, sizes and counts in memory; sample rows memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._rows = None
        self._checked: set[int] = set()
        self._load_table()

    def _fail(self, problem: str) -> IndexFileError:
        return IndexFileError(f"index file {self.path} is unusable: {problem}; {_rebuild_hint(self.path)}")

    def _load_table(self) -> None:
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):  # before open: a FIFO would block it
                raise self._fail("not a regular file")
            with open(self.path, "rb") as handle:
                info = os.fstat(handle.fileno())
                header = handle.read(HEADER.size)
                if len(header) < HEADER.size:
                    raise self._fail(f"{info.st_size} bytes, shorter than its header")
                magic, version, _, num_shards, num_samples, names_bytes = HEADER.unpack(header)
                if magic != MAGIC:
                    raise self._fail("not a mimscale index (wrong magic bytes)")
                if version != VERSION:
                    raise self._fail(f"format version {version}, this mimscale reads version {VERSION}")
                self._check_header(num_shards, names_bytes, info.st_size)
                names_at, self.rows_at = _layout(num_shards, names_bytes)
                if self.rows_at + num_samples * SAMPLE_DTYPE.itemsize != info.st_size:
                    raise self._fail(
                        f"{info.st_size} bytes, but its header describes {num_shards} shards and "
                        f"{num_samples} samples (truncated or padded?)"
                    )
                table = np.frombuffer(handle.read(num_shards * SHARD_DTYPE.itemsize), SHARD_DTYPE)
                blob = handle.read(names_bytes)
        except OSError as err:
            raise IndexFileError(f"index file {self.path} is not readable ({err})") from err
        self.names = self._check_names(blob, num_shards)
        if (
            (table["bytes"] >= 2**62).any()
            or (table["samples"] >= MAX_SHARD_SAMPLES).any()
            or (table["unusable"] >= MAX_SHARD_SAMPLES).any()
        ):
            raise self._fail("a shard's size or sample count is out of range (a wrapped 64-bit value?)")
        if (table["samples"] > table["bytes"] // (BLOCK * 2)).any():  # unsigned: checked before any conversion
            raise self._fail("a shard claims more samples than its size can hold")
        self.shard_bytes = table["bytes"].astype(np.int64)
        self.counts = table["samples"].astype(np.int64)
        self.unusable = table["unusable"].astype(np.int64)
        if int(self.counts.sum()) != num_samples:
            raise self._fail(f"shard counts add up to {int(self.counts.sum())}, the header says {num_samples}")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.position = {name: number for number, name in enumerate(self.names)}
        self.num_samples = num_samples

    def _check_header(self, num_shards: int, names_bytes: int, file_bytes: int) -> None:
        """Refuse counts that cannot be true before anything is read or allocated: a 4 KB sparse file declaring a
        billion shards must cost nothing."""
        table_bytes = num_shards * SHARD_DTYPE.itemsize
        if table_bytes + names_bytes > file_bytes:
            raise self._fail(
                f"header claims {num_shards} shards and {names_bytes} name bytes, more than "
                f"the file's {file_bytes} bytes"
            )
        if num_shards > MAX_INDEX_SHARDS or table_bytes + names_bytes > MAX_TABLE_BYTES:  # a sparse file's size lies
            raise self._fail(
                f"header claims {num_shards} shards and {names_bytes} name bytes, beyond the "
                f"{MAX_INDEX_SHARDS} shards and {MAX_TABLE_BYTES >> 20} MiB an index may hold"
            )
        if num_shards and not 2 * num_shards - 1 <= names_bytes <= num_shards * (MAX_SHARD_NAME_BYTES + 1):
            raise self._fail(f"{names_bytes} name bytes cannot hold {num_shards} shard file names")

    def _check_names(self, blob: bytes, num_shards: int) -> list[str]:
        """Shard names are plain file names, each once: never a path (``/``, ``..``, NUL) that could be opened."""
        try:
            names = blob.decode("utf-8").split("\n") if num_shards else []
        except UnicodeDecodeError as err:
            raise self._fail("shard names are not utf-8") from err
        if len(names) != num_shards or len(set(names)) != num_shards or not all(names):
            raise self._fail(f"{len(names)} distinct shard names for {num_shards} shards")
        for name in names:
            if "/" in name or "\0" in name or name in (".", "..") or len(name.encode()) > MAX_SHARD_NAME_BYTES:
                raise self._fail(f"shard name {name[:80]!r} is not a plain file name (a path, '..' or NUL)")
        return names

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rows"] = None  # each process maps the file itself: the pages stay shared, nothing is copied
        state["position"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.position = {name: number for number, name in enumerate(self.names)}

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            if self.num_samples == 0:
                self._rows = np.empty(0, SAMPLE_DTYPE)
            else:
                mapped = np.memmap(self.path, SAMPLE_DTYPE, mode="r", offset=self.rows_at, shape=(self.num_samples,))
                self._rows = mapped.view(np.ndarray)  # same mapped pages; plain slices are much cheaper
        return self._rows

    def shard_rows(self, number: int, local_path=None) -> np.ndarray:
        """Shard ``number``'s rows, bounds-checked against its size the first time they are used (``local_path``:
        LazySetIndex's signature; this index has every shard's rows already)."""
        rows = self.rows[self.starts[number] : self.starts[number + 1]]
        if number not in self._checked:
            problem = rows_problem(rows, int(self.shard_bytes[number]))
            if problem:
                raise self._fail(f"shard {self.names[number]}: {problem}")
            self._checked.add(number)
        return rows


def rows_problem(rows: np.ndarray, nbytes: int) -> str:
    """Why a shard's sample rows cannot be true of a tar of ``nbytes`` bytes ('' when they can)."""
    if not len(rows):
        return ""
    ends = rows["block"].astype(np.int64) * BLOCK + rows["size"]
    if rows["block"].min() < 1 or rows["size"].min() < 1 or ends.max() > nbytes:
        return f"its sample offsets point outside its {nbytes} bytes"
    if rows["label"].min() < -1:
        return "labels below -1"
    return ""


def write_index(path: str | Path, scans: Iterable[ShardScan], names: list[str]) -> Path:
    """Write an index file from shard scans given in ``names`` order."""
    writer = IndexWriter(path, names)
    try:
        for number, scan in enumerate(scans):
            writer.add(number, scan.bytes, scan.rows, scan.unusable)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


# ----------------------------------------------------------------------------------------------- finding


def cache_path(folder: str, cache_dir: str | Path | None) -> Path:
    """Where the index of a shard folder lives when it cannot live beside the shards."""
    digest = hashlib.sha256(os.path.abspath(folder).encode() if "://" not in folder else folder.encode())
    base = Path(cache_dir_for(str(cache_dir or ""))) / "index"  # the node cache's root, as for remote sets
    return base / f"{Path(folder).name or 'root'}-{digest.hexdigest()[:16]}.idx"


@contextmanager
def _locked(target: Path):
    """One index builder per folder on this node; the others wait, then find it built (a killed holder unlocks)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(target.parent, os.O_RDONLY)  # the folder itself is the lock: no lock files left behind
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)


def _scan_many(paths: list[Path], workers: int) -> Iterable[ShardScan]:
    if workers > 1 and len(paths) > 1:
        import multiprocessing

        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with context.Pool(workers) as pool:
            yield from pool.imap(scan_tar, paths, chunksize=max(1, min(64, len(paths) // (workers * 8))))
    else:
        yield from map(scan_tar, paths)


def _progress(scans: Iterable[ShardScan], total: int, folder: str, paths: list[Path]) -> Iterable[ShardScan]:
    from tqdm import tqdm

    with tqdm(total=total, unit="shard", desc=f"index {folder}", disable=None, file=sys.stderr) as bar:
        for scan, path in zip(scans, paths, strict=True):
            report_scan(scan, path)
            bar.update(1)
            yield scan


def build_folder_index(
    folder: str, names: list[str], target: Path, workers: int = 1, reuse: SetIndex | None = None
) -> SetIndex:
    """Scan the named shards of a local folder (reusing ``reuse``'s rows for shards whose size still matches)."""
    paths = [Path(folder) / name for name in names]
    if reuse is None:
        scans = _progress(_scan_many(paths, workers), len(paths), folder, paths)
        return SetIndex(write_index(target, scans, names))
    fresh = [p for p in paths if not _matches(reuse, p)]
    rescanned = {scan.name: scan for scan in _progress(_scan_many(fresh, workers), len(fresh), folder, fresh)}

    def merged():
        for path in paths:
            if path.name in rescanned:
                yield rescanned[path.name]
            else:
                yield from _kept_scans(reuse, [path.name])

    return SetIndex(write_index(target, merged(), names))


def _matches(index: SetIndex, path: Path) -> bool:
    number = index.position.get(path.name)
    if number is None:
        return False
    try:
        return path.stat().st_size == index.shard_bytes[number]
    except OSError:
        return False


def _open_if_valid(path: Path) -> SetIndex | None:
    if not path.is_file():
        return None
    try:
        return SetIndex(path)
    except IndexFileError as err:
        print(f"mimscale data: {err}; rebuilding it", file=sys.stderr)
        return None


def folder_index(
    folder: str,
    names: list[str],
    *,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    build: bool = True,
    prefer_cache: bool = False,
) -> SetIndex:
    """The index covering ``names`` in a local shard folder: beside the shards, else in the cache, else built.

    An index that lacks some of the names, or whose recorded size of a shard differs from the file (a shard
    re-written or cut short), is brought up to date by scanning only those shards. Built indexes go beside the
    shards when the folder is writable (and ``prefer_cache`` is not set), else into the cache folder.
    """
    beside, cached = Path(folder) / INDEX_NAME, cache_path(folder, cache_dir)
    for candidate in (beside, cached):
        index = _open_if_valid(candidate)
        if index is not None and all(name in index.position for name in names):
            stale = [n for n in names if not _matches(index, Path(folder) / n)]
            if not stale:
                return index
            print(
                f"mimscale data: {len(stale)} shard(s) of {folder} changed since {candidate} was written "
                f"(e.g. {stale[0]}); re-indexing them",
                file=sys.stderr,
            )
            break
    if not build:
        raise ShardError(f"{folder} has no index; run `mimscale shards index {folder}`")
    in_folder = os.access(folder, os.W_OK) and not prefer_cache
    if in_folder and os.path.lexists(beside) and not beside.is_file():
        print(
            f"mimscale data: {beside} is not a regular file (a folder, FIFO or broken link), so it is neither "
            f"read nor replaced; the index goes to {cached}",
            file=sys.stderr,
        )
        in_folder = False
    target = beside if in_folder else cached
    with _locked(target):
        index = _open_if_valid(target)  # another rank may have built it while this one waited
        if index is not None and all(n in index.position and _matches(index, Path(folder) / n) for n in names):
            return index
        known = sorted(set(names) | set(index.names if index else []))
        known = [n for n in known if (Path(folder) / n).is_file()]
        print(
            f"mimscale data: indexing {folder} ({len(known)} shards) into {target}, once; "
            "`mimscale shards index` does this ahead of training",
            file=sys.stderr,
        )
        return build_folder_index(folder, known, target, workers, reuse=index)


def has_local_index(folder: str, cache_dir: str | Path | None) -> bool:
    """Whether a local folder has an index file, beside it or cached (current or not: folder_index brings it up to
    date), so the index path is taken exactly as before counts existed."""
    return any(path.is_file() for path in (Path(folder) / INDEX_NAME, cache_path(folder, cache_dir)))


def published_index(location: str) -> str | None:
    """Where the samples.idx published beside a remote shard would be, or None where no location may be derived
    from the shard's: a ``pipe:`` command or a pre-signed URL (remote.sibling_folder)."""
    return None if remote.sibling_folder(location) is None else remote.sibling(location, INDEX_NAME)


def remote_folder_index(
    folder: str,
    names: list[str],
    cache,
    *,
    cache_dir: str | Path | None = None,
    workers: int = REMOTE_SCAN_THREADS,
    locations: dict[str, str] | None = None,
    named_index: str = "",
    build_missing: bool = True,
) -> SetIndex | None:
    """The index of shards under a URL prefix: ``named_index`` when the user names one (data.index), else a
    samples.idx published beside them (never for pipe: commands or signed URLs: published_index), either one
    downloaded once per node through the shard cache; else one in the index cache, else built by downloading and
    scanning each shard once, ``workers`` at a time (``mimscale shards index URL --cache DIR`` does that ahead of
    training). When the index found lacks some shards, only those are downloaded to complete it; its rows for the
    others are kept (``build_missing=False``: None where no index covers any shard). ``locations`` maps each name to its shard's location (default:
    ``folder/name``)."""
    locations = locations or {name: f"{folder}/{name}" for name in names}
    candidates: list[Path] = [cache_path(folder, cache_dir)]
    published = named_index or (published_index(locations[names[0]]) if names else None)
    fetched = None
    if published:
        with contextlib.suppress(remote.RemoteNotFound):
            fetched = cache.local_path(published)  # pinned for the process's life (a local path passes through)
        if named_index and (fetched is None or not Path(fetched).is_file()):
            raise ShardError(
                f"data.index={named_index!r} does not exist; fix the location or unset data.index "
                "(the set is then indexed from its shards)"
            )
    if fetched is not None:
        candidates.insert(0, Path(fetched))
    partial = None
    for candidate in candidates:
        index = _open_if_valid(candidate)
        if index is not None and all(name in index.position for name in names):
            return index
        partial = partial or index
    if partial is None and not build_missing:
        return None  # no index at all: the caller looks for counts (shards/counts.py) before building one
    target = cache_path(folder, cache_dir)
    with _locked(target):
        index = _open_if_valid(target) or partial  # another rank may have completed it while this one waited
        missing = [name for name in names if index is None or name not in index.position]
        if not missing:
            return index
        found = f"{index.path} covers {len(names) - len(missing)} of the {len(names)} shards" if index else "no index"
        print(
            f"mimscale data: {found} under {folder}; downloading the {len(missing)} others once ({workers} at a "
            f"time) to index them into {target} (`mimscale shards index` does this ahead of training)",
            file=sys.stderr,
        )
        fresh = _remote_scans([locations[name] for name in missing], missing, cache, workers)
        absent = set(missing)

        def scans():
            for name in names:
                yield next(fresh) if name in absent else next(_kept_scans(index, [name]))

        try:
            return SetIndex(write_index(target, scans(), names))
        finally:
            fresh.close()  # stops the downloads still queued if writing failed


def _remote_scans(locations: list[str], names: list[str], cache, workers: int) -> Iterator[ShardScan]:
    """Scans of remote shards (``names[i]`` at ``locations[i]``) in that order; up to ``workers`` download and scan
    at once (network-bound), with at most twice that many finished scans waiting for their turn."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    where = dict(zip(names, locations, strict=True))

    def scan_one(name: str) -> ShardScan:
        location = where[name]
        try:
            scan = scan_tar(cache.local_path(location))
        finally:
            cache.release(location)
        scan.name = name
        return scan

    queue = iter(names)
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="mimscale-index")
    try:
        pending = deque(pool.submit(scan_one, name) for name in islice(queue, 2 * max(1, workers)))
        while pending:
            scan = pending.popleft().result()
            upcoming = next(queue, None)
            if upcoming is not None:
                pending.append(pool.submit(scan_one, upcoming))
            report_scan(scan, where[scan.name])
            yield scan
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _kept_scans(index: SetIndex, names: list[str]) -> Iterator[ShardScan]:
    """An index's rows for some of its shards, as scans to write into another index."""
    for name in names:
        number = index.position[name]
        rows = np.array(index.shard_rows(number))
        yield ShardScan(name, int(index.shard_bytes[number]), rows, unusable=int(index.unusable[number]))


# ----------------------------------------------------------------------------------------------- lazy


ROWS_MAGIC = b"MIMSROW\0"
ROWS_HEADER = struct.Struct("<8sQQQ")  # magic, shard bytes, samples, unusable samples
MAX_LAZY_SHARDS_HELD = 256  # shards whose rows a process keeps in memory (the rest stay in the index cache)


def rows_folder(folder: str, cache_dir: str | Path | None) -> Path:
    """Where a counted (not indexed) set's per-shard rows are kept on this node: beside its cached index."""
    return cache_path(folder, cache_dir).with_suffix(".rows")


class LazySetIndex:
    """A shard folder known by its per-shard counts only (shards/counts.py): the order needs nothing more, and each
    shard's rows are built when this node first reads the shard, from its tar headers (scan_tar: TarWalk over the
    copy the node reads anyway), then kept in ``rows_dir`` so no other process of the node scans it again.

    A shard whose tar holds another number of samples than its count is a ShardError naming both numbers (the
    order of every later sample would shift); with ``on_mismatch="skip"`` its samples are served as corrupt
    instead (rows of size 0: the stream replaces and counts them). Same interface as SetIndex for ShardTable."""

    def __init__(
        self, names: list[str], counts, sizes, *, source: str, rows_dir: Path, on_mismatch: str = "error"
    ) -> None:
        self.names, self.source, self.rows_dir, self.on_mismatch = list(names), source, Path(rows_dir), on_mismatch
        self.path = Path(source)  # for messages, as SetIndex.path
        self.counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        self.shard_bytes = np.asarray(sizes, dtype=np.int64).reshape(-1)  # -1: not known until the shard is read
        self.unusable = np.zeros(len(self.names), np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_samples = int(self.starts[-1])
        self.position = {name: number for number, name in enumerate(self.names)}
        self._held: dict[int, np.ndarray] = {}
        self.scanned = 0  # shards this process scanned (tests, benches)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_held"] = {}  # each process loads the rows it reads
        return state

    def shard_rows(self, number: int, local_path=None) -> np.ndarray:
        """Shard ``number``'s rows: held, else kept on this node, else scanned from ``local_path()`` (its local copy)."""
        rows = self._held.get(number)
        if rows is None:
            if local_path is None:
                raise ShardError(f"shard {self.names[number]} has not been read yet; its rows come from its tar")
            rows = self._load(number, str(local_path()))
            if len(self._held) >= MAX_LAZY_SHARDS_HELD:
                self._held.pop(next(iter(self._held)))
            self._held[number] = rows
        return rows

    def _load(self, number: int, path: str) -> np.ndarray:
        name, count = self.names[number], int(self.counts[number])
        try:
            nbytes = os.stat(path).st_size
        except OSError as err:
            raise ShardError(f"shard {path} is not readable ({err})") from err
        kept = self._kept(name, nbytes)
        scan = None
        if kept is None:
            scan = scan_tar(path)
            scan.name = name
            report_scan(scan, path)
            self.scanned += 1
            kept = scan.rows, scan.unusable
        rows, unusable = kept
        known = int(self.shard_bytes[number])
        if known >= 0 and known != nbytes:
            raise ShardError(
                f"shard {name} is {nbytes} bytes but {self.source} says {known}: fix or remove {self.source}, "
                "or index the set with `mimscale shards index`"
            )
        if len(rows) != count:
            return self._mismatch(number, len(rows), unusable)
        self.shard_bytes[number], self.unusable[number] = nbytes, unusable
        if scan is not None:
            self._keep(name, nbytes, rows, unusable)
        return rows

    def _mismatch(self, number: int, found: int, unusable: int) -> np.ndarray:
        name, count = self.names[number], int(self.counts[number])
        message = (
            f"shard {name}: {self.source} says {count} samples, its tar holds {found} usable ones "
            f"({unusable} without an image)"
        )
        if self.on_mismatch != "skip":
            raise ShardError(
                f"{message}; the order would shift: fix or remove {self.source} (then `mimscale shards index` "
                "indexes the set), or set data.count_mismatch=skip to serve its samples as corrupt"
            )
        print(f"mimscale data: {message}; its {count} samples are skipped as corrupt", file=sys.stderr)
        return np.zeros(count, SAMPLE_DTYPE)  # size 0: ShardTable serves them as corrupt

    def _kept_path(self, name: str) -> Path:
        return self.rows_dir / f"{name}.rows"

    def _kept(self, name: str, nbytes: int) -> tuple[np.ndarray, int] | None:
        """The rows another process of this node kept for the shard, if they fit its ``nbytes`` (hostile: checked)."""
        path = self._kept_path(name)
        try:
            with remote.open_regular(path) as handle:
                header = handle.read(ROWS_HEADER.size)
                if len(header) != ROWS_HEADER.size:
                    return None
                magic, kept_bytes, samples, unusable = ROWS_HEADER.unpack(header)
                size = os.fstat(handle.fileno()).st_size
                if magic != ROWS_MAGIC or kept_bytes != nbytes or samples > nbytes // (2 * BLOCK):
                    return None
                if size != ROWS_HEADER.size + samples * SAMPLE_DTYPE.itemsize or unusable >= MAX_SHARD_SAMPLES:
                    return None
                rows = np.frombuffer(handle.read(samples * SAMPLE_DTYPE.itemsize), SAMPLE_DTYPE)
        except (OSError, remote.RemoteError):
            return None
        return (rows, int(unusable)) if not rows_problem(rows, nbytes) else None

    def _keep(self, name: str, nbytes: int, rows: np.ndarray, unusable: int) -> None:
        """Best effort (a read-only cache only costs a rescan elsewhere): the one atomic writer, without fsync."""
        from mimscale.storage.atomic import atomic_write

        payload = ROWS_HEADER.pack(ROWS_MAGIC, nbytes, len(rows), unusable) + rows.astype(SAMPLE_DTYPE).tobytes()
        try:
            self.rows_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self._kept_path(name), payload, durable=False)
        except OSError as err:
            print(f"mimscale data: the rows of shard {name} cannot be kept in {self.rows_dir} ({err})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- split across nodes


PART_NAME = re.compile(r"samples\.idx\.part-(\d{1,6})-of-(\d{1,6})")


def part_range(total: int, part: int, parts: int) -> range:
    """The shard numbers node ``part`` of ``parts`` indexes: a contiguous, near-equal share."""
    if not 0 <= part < parts:
        raise ShardError(f"--part {part}/{parts}: K must be in [0, N)")
    return range(part * total // parts, (part + 1) * total // parts)


def write_part(
    folder: str, names: list[str], part: int, parts: int, out_dir: Path, *, cache=None, locations=None, workers=1
) -> Path:
    """Index one node's share of a folder's shards into ``out_dir/samples.idx.part-K-of-N`` (an index file of its
    own, same format): local tars are scanned ``workers`` at a time, remote ones downloaded through ``cache``."""
    chosen = [names[number] for number in part_range(len(names), part, parts)]
    if remote.is_local(folder):
        paths = [Path(folder) / name for name in chosen]
        scans = _progress(_scan_many(paths, workers), len(paths), folder, paths)
    else:
        locations = locations or {name: f"{folder}/{name}" for name in names}
        scans = _remote_scans([locations[name] for name in chosen], chosen, cache, max(1, workers))
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_index(out_dir / f"{INDEX_NAME}.part-{part}-of-{parts}", scans, chosen)


def join_parts(names: list[str], parts_dir: Path, target: Path) -> SetIndex:
    """One samples.idx at ``target`` from the pieces in ``parts_dir`` (all N of them, each shard in exactly one):
    byte for byte the index one node would have built. The pieces are index files, checked as such."""
    found = {}
    for path in sorted(parts_dir.iterdir()) if parts_dir.is_dir() else []:
        match = PART_NAME.fullmatch(path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = path
    totals = {parts for _, parts in found}
    if len(totals) != 1:
        raise ShardError(f"{parts_dir} holds no pieces, or pieces of different splits ({sorted(found)[:6]})")
    parts = totals.pop()
    missing = [part for part in range(parts) if (part, parts) not in found]
    if missing:
        raise ShardError(f"{parts_dir}: pieces {missing[:8]} of {parts} are missing; run `--part K/{parts}` for them")
    owner: dict[str, SetIndex] = {}
    for part in range(parts):
        piece = SetIndex(found[(part, parts)])
        for name in piece.names:
            if owner.setdefault(name, piece) is not piece:
                raise ShardError(f"shard {name} is in two pieces ({owner[name].path} and {piece.path})")
    absent = [name for name in names if name not in owner]
    if absent:
        raise ShardError(f"the pieces in {parts_dir} lack {len(absent)} shard(s), e.g. {absent[0]}")
    with _locked(target):
        return SetIndex(write_index(target, (next(_kept_scans(owner[n], [n])) for n in names), names))
