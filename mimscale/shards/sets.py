"""A shard set opened for reading: its locations, their samples.idx, and the node cache for remote ones.

:func:`open_shard_set` is the one way a pattern becomes readable shards, for training (pipeline/stream.py), eval,
`mimscale shards index` and `inspect` alike: expand the pattern (storage/remote.py), group the shards by folder,
find or build each folder's samples.idx (shards/index.py; with ``counts``, a folder without one that publishes
per-shard counts is not scanned: shards/counts.py, LazySetIndex), and, for remote sets, make the node's ShardCache under
``<data.cache_dir>/shards`` (its index cache is ``<data.cache_dir>/index``) with the manifests' sha256s.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mimscale.config import DataConfig
from mimscale.shards.counts import find_counts
from mimscale.shards.format import (
    BLOCK,
    ShardError,
    dataset_fingerprint,
    load_remote_manifest,
    manifest_checksums,
    member_name_before,
)
from mimscale.shards.images import BadImage
from mimscale.shards.index import (
    INDEX_NAME,
    REMOTE_SCAN_THREADS,
    LazySetIndex,
    SetIndex,
    cache_path,
    folder_index,
    has_local_index,
    join_parts,
    remote_folder_index,
    rows_folder,
    write_part,
)
from mimscale.storage import remote, shard_cache

MAX_OPEN_SHARDS = 64


# ----------------------------------------------------------------------------------------------- locations


def expand_shards(pattern: str, key: str = "data.shards") -> list[Path]:
    """Local tar files of a path, folder, glob or brace pattern (or several joined by ``::``), for callers that read
    only local files. The expansion is ``remote.expand``'s, the one that also takes URLs, so both agree on every
    pattern and every refusal. ``key`` names the config key in errors so the user knows what to change.
    """
    if pattern and any(remote.is_url(part) for part in pattern.split("::") if part.strip()):
        raise ShardError(f"{key}={pattern!r}: remote URLs are not supported here; copy or mount the shards locally")
    return [Path(path) for path in expand_locations(pattern, key)]


def expand_locations(pattern: str, key: str = "data.shards") -> list[str]:
    """Shard locations of a pattern: local paths, or URLs (file://, http(s), s3, gs, pipe:) through storage/remote.py."""
    try:
        return remote.expand(pattern, key)
    except remote.RemoteError as err:
        raise ShardError(str(err)) from err


def folder_of_shard(location: str) -> str:
    """The folder (or URL prefix) whose samples.idx indexes a shard; '.' for a bare file name. A URL's folder ends at
    its path's last '/', so a query string holding slashes (a signature) is never cut (remote.folder_of)."""
    return (os.path.dirname(location) or ".") if remote.is_local(location) else remote.folder_of(location)[0]


def shard_name(location: str) -> str:
    """A shard's name in its set's index and in the data fingerprint (a URL's without its query string, so a
    re-signed URL is the same shard: remote.shard_name)."""
    return os.path.basename(location) if remote.is_local(location) else remote.shard_name(location)


def shard_folders(locations: list[str], shown: str = "the shard set") -> dict[str, dict[str, str]]:
    """{folder or URL prefix: {shard name: its location}}, in the order the locations come. Locations are kept as
    given (a signed URL or a pipe: command is never rebuilt from folder + name); two locations with one name in one
    folder are a ShardError (``shown`` names the pattern), since the index tells shards apart by name."""
    folders: dict[str, dict[str, str]] = {}
    for location in locations:
        members, name = folders.setdefault(folder_of_shard(location), {}), shard_name(location)
        if members.setdefault(name, location) != location:
            raise ShardError(
                f"{shown}: {members[name]} and {location} are both shard {name!r} of one folder; name each shard once"
            )
    return folders


# ----------------------------------------------------------------------------------------------- checksums


def expect_checksums(cache: shard_cache.ShardCache, locations: list[str]) -> None:
    """Have the cache check every remote shard against the sha256 its folder's manifest records, when it does.

    The manifest is parsed by shards/format.py's strict parser and handed to the cache as plain data (location ->
    sha256). pipe: commands and signed URLs have no manifest to look up (remote.sibling_folder): nothing is edited
    into another command or URL."""
    listed = [loc for loc in locations if not remote.is_local(loc) and remote.sibling_folder(loc) is not None]
    for folder, members in shard_folders(listed).items():
        manifest = load_remote_manifest(folder, keep_in=cache.dir / shard_cache.MANIFEST_DIR)
        checksums = manifest_checksums(manifest)
        for name, location in members.items():
            if name in checksums:
                cache.expect(location, sha256=checksums[name])


# ----------------------------------------------------------------------------------------------- the table


class ShardTable:
    """A shard set as per-shard arrays (O(shards) memory); each shard's sample rows come from its index file.

    Remote shards are read through the node's ShardCache (storage/shard_cache.py): a shard is pinned while this process
    reads it, ``prefetch`` fetches the next window's shards ahead, and ``release`` unpins the ones left behind.
    """

    def __init__(
        self,
        locations: list[str],
        folders: list[str],
        indexes: list[SetIndex | LazySetIndex],
        numbers: list[tuple[int, int]],
        cache=None,
    ):
        self.locations = locations  # shard i's path or URL; its rows are indexes[set_of[i]]'s shard number_in_set[i]
        self.folders, self.indexes = folders, indexes  # indexes[j] is the samples.idx of folders[j]
        self.set_of = np.asarray([id_ for id_, _ in numbers], dtype=np.int32)
        self.number_in_set = np.asarray([n for _, n in numbers], dtype=np.int64)
        self.counts = np.asarray([indexes[i].counts[n] for i, n in numbers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.fingerprint = dataset_fingerprint([shard_name(loc) for loc in locations], self.counts)
        self.cache = cache
        self._handles: dict[int, object] = {}
        self._pinned: dict[int, str] = {}
        if cache is not None:  # downloads are checked against the indexed size (a counted set's where it is known)
            for shard, location in enumerate(locations):
                if not remote.is_local(location) and self.shard_bytes(shard) >= 0:
                    cache.expect(location, int(self.shard_bytes(shard)))

    def shard_bytes(self, shard: int) -> int:
        """The shard's size in bytes; -1 for a counted set's shard that no process here has read yet."""
        return int(self.indexes[self.set_of[shard]].shard_bytes[self.number_in_set[shard]])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_pinned"] = {}, {}  # open files and pins do not travel to workers
        return state

    def _local_path(self, shard: int) -> str:
        """The one place shard access goes through: local paths as they are, remote ones via the node cache."""
        location = self.locations[shard]
        if self.cache is None or remote.is_local(location):
            return location
        if shard not in self._pinned:
            self._pinned[shard] = str(self.cache.local_path(location))
        return self._pinned[shard]

    def prefetch(self, shards) -> None:
        if self.cache is not None:
            self.cache.prefetch(self.locations[int(shard)] for shard in shards)

    def release_except(self, keep: set[int]) -> None:
        """Close and unpin every shard this process holds except ``keep`` (the windows being read and the next)."""
        for shard in [shard for shard in self._handles if shard not in keep]:
            self._handles.pop(shard).close()
        for shard in [shard for shard in self._pinned if shard not in keep]:
            del self._pinned[shard]
            self.cache.release(self.locations[shard])

    def locate(self, sample_id: int) -> tuple[int, np.void]:
        """(shard number, the sample's index row: block, size, label)."""
        shard = int(np.searchsorted(self.starts, sample_id, "right")) - 1
        index = self.indexes[self.set_of[shard]]
        rows = index.shard_rows(int(self.number_in_set[shard]), lambda: self._local_path(shard))
        return shard, rows[sample_id - int(self.starts[shard])]

    def label(self, sample_id: int) -> int:
        return int(self.locate(sample_id)[1]["label"])

    def describe(self, sample_id: int) -> str:
        shard, row = self.locate(sample_id)
        where = f"shard {self.locations[shard]} sample #{sample_id - int(self.starts[shard])}"
        try:  # the member's own tar header sits right before its data
            name = member_name_before(self._handle(shard), int(row["block"]) * BLOCK)
            return f"{where} ({name})" if name else where
        except (BadImage, OSError):
            return where

    def _handle(self, shard: int):
        handle = self._handles.get(shard)
        if handle is None:
            if len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.pop(next(iter(self._handles))).close()
            path = self._local_path(shard)  # a remote shard that cannot be fetched stops the run, named: not "corrupt"
            try:
                handle = open(path, "rb")
            except OSError as err:
                raise BadImage("unreadable_shard", str(err)) from err
            size = os.fstat(handle.fileno()).st_size
            if size != self.shard_bytes(shard) and self.shard_bytes(shard) >= 0:
                handle.close()
                raise ShardError(
                    f"shard {self.locations[shard]} is {size} bytes but its index says {self.shard_bytes(shard)}: it "
                    "changed after it was indexed; run `mimscale shards index` on its folder (or restore the shard)"
                )
            self._handles[shard] = handle
        return handle

    def read(self, sample_id: int) -> bytes:
        """The encoded image bytes of one sample (BadImage if the shard is shorter than its index says)."""
        return self.read_labelled(sample_id)[0]

    def read_labelled(self, sample_id: int) -> tuple[bytes, int]:
        """(encoded image bytes, label) of one sample, with one index lookup."""
        shard, row = self.locate(sample_id)
        block, size, label = row.item()
        if size == 0:  # a counted shard whose content disagrees with its count, skipped by data.count_mismatch=skip
            raise BadImage("count_mismatch", f"shard {self.locations[shard]} does not hold the samples counted for it")
        handle = self._handle(shard)
        handle.seek(block * BLOCK)
        payload = handle.read(size)
        if len(payload) != size:
            raise BadImage("truncated", f"{len(payload)} of {size} bytes")
        return payload, label


def open_shard_set(
    pattern: str,
    key: str = "data.shards",
    *,
    data_cfg: DataConfig | None = None,
    index_workers: int = 0,
    prefer_cache: bool = False,
    require_samples: bool = True,
    counts: bool = False,
) -> ShardTable:
    """The shard set of a pattern with its index: samples.idx beside the shards or cached, else built once.

    ``data_cfg`` (the defaults when None) names the cache folder, for the indexes of read-only or remote sets and
    for the node cache that remote shards are read through. ``index_workers`` scans (local) or downloads (remote)
    that many shards at once when an index must be built; ``prefer_cache`` puts a new local index in the cache
    folder instead of beside the shards (`mimscale shards index --cache`). For ``data.shards``, data.index names the
    index of a remote set (the way to index a pipe: set or pre-signed URLs without building it from the shards).
    With ``counts`` (training, eval), a folder without an index but with per-shard counts (shards/counts.py) is
    not scanned: its shards are indexed as they are first read (LazySetIndex).
    """
    data_cfg = data_cfg or DataConfig()
    locations = expand_locations(pattern, key)
    folders = shard_folders(locations, f"{key}={pattern!r}")
    cache, named_index = None, data_cfg.index if key == "data.shards" else ""
    if not all(remote.is_local(location) for location in locations):
        cache = shard_cache.ShardCache.from_config(data_cfg)
        expect_checksums(cache, locations)  # the manifest's sha256s, before any download (index builds' included)
        remote_folders = [folder for folder in folders if not remote.is_local(folder)]
        if named_index and len(remote_folders) > 1:
            raise ShardError(
                f"data.index={named_index!r} names one index but data.shards spans {len(remote_folders)} remote "
                "folders; index them as one set or unset it"
            )
    sets = [
        _folder_set(
            folder,
            members,
            cache,
            data_cfg,
            workers=index_workers,
            prefer_cache=prefer_cache,
            named_index=named_index,
            counts=counts,
        )
        for folder, members in folders.items()
    ]
    set_number = {folder: number for number, folder in enumerate(folders)}
    numbers = []
    for location in locations:
        number = set_number[folder_of_shard(location)]
        numbers.append((number, sets[number].position[shard_name(location)]))
    table = ShardTable(locations, list(folders), sets, numbers, cache=cache)
    if require_samples and len(table) == 0:
        raise ShardError(f"{key}={pattern!r}: the {len(locations)} shard(s) hold no image samples (.jpg/.png/.webp)")
    return table


def _folder_set(
    folder: str,
    members: dict[str, str],
    cache,
    data_cfg: DataConfig,
    *,
    workers: int,
    prefer_cache: bool,
    named_index: str,
    counts: bool,
) -> SetIndex | LazySetIndex:
    """One folder's index: samples.idx as ever where one exists (brought up to date as ever); else, with ``counts``,
    its per-shard counts (LazySetIndex); else samples.idx built from the shards."""
    cache_dir, names, local = data_cfg.cache_dir or None, list(members), remote.is_local(folder)
    if counts and not (local and has_local_index(folder, cache_dir)):
        if not local:
            kwargs = {"cache_dir": cache_dir, "locations": members, "named_index": named_index}
            found_index = remote_folder_index(folder, names, cache, build_missing=False, **kwargs)
            if found_index is not None:
                return found_index
        keep_in = cache.dir / shard_cache.MANIFEST_DIR if cache is not None else None
        found = find_counts(folder, names, members, user_counts=data_cfg.counts, keep_in=keep_in)
        if found is not None:
            return LazySetIndex(
                names,
                found.counts,
                found.sizes,
                source=found.source,
                rows_dir=rows_folder(folder, cache_dir),
                on_mismatch=data_cfg.count_mismatch,
            )
    if local:
        return folder_index(folder, names, cache_dir=cache_dir, workers=workers or 1, prefer_cache=prefer_cache)
    return remote_folder_index(
        folder,
        names,
        cache,
        cache_dir=cache_dir,
        workers=workers or REMOTE_SCAN_THREADS,
        locations=members,
        named_index=named_index,
    )


def index_split(
    pattern: str, data_cfg: DataConfig, *, part: str = "", out: str = "", join: str = "", workers=0
) -> Path:
    """`mimscale shards index SRC --part K/N --out DIR` (this node's share into DIR/samples.idx.part-K-of-N) or
    `--join DIR` (the pieces into the samples.idx training finds: beside a writable local folder, else the cache).
    One folder at a time: the pieces name shards by file name."""
    locations = expand_locations(pattern, "SRC")
    folders = shard_folders(locations, f"SRC={pattern!r}")
    if len(folders) != 1:
        raise ShardError(f"SRC={pattern!r} spans {len(folders)} folders; split and join the index one folder at a time")
    [(folder, members)] = folders.items()
    local = remote.is_local(folder)
    if part:
        try:
            number, parts = (int(value) for value in part.split("/"))
        except ValueError as err:
            raise ShardError(f"--part {part!r}: give K/N, e.g. --part 0/8 on the first of 8 nodes") from err
        if not out:
            raise ShardError("--part needs --out DIR, a folder every node and the joining one can reach")
        cache = None if local else shard_cache.ShardCache.from_config(data_cfg)
        if cache is not None:
            expect_checksums(cache, locations)
        return write_part(
            folder,
            list(members),
            number,
            parts,
            Path(out),
            cache=cache,
            locations=members,
            workers=workers or (1 if local else REMOTE_SCAN_THREADS),
        )
    beside = local and os.access(folder, os.W_OK) and not data_cfg.cache_dir
    target = Path(folder) / INDEX_NAME if beside else cache_path(folder, data_cfg.cache_dir or None)
    return join_parts(list(members), Path(join), target).path
