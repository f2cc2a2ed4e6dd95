"""Per-shard sample counts from what a published WebDataset set already has beside its shards: enough to start.

The epoch order (pipeline/order.py) needs only the number of samples in each shard, so a set with counts starts
without scanning; each shard's offsets are built when a rank first reads it (shards/index.py, LazySetIndex).
Sources, in order of preference (the first that covers every shard of a folder wins):

1. our ``manifest.json`` (``samples`` and ``bytes`` per shard);
2. WebDataset's shard index, the JSON its ``widsindex create`` writes (default name ``shardindex.json``):
   ``{"wids_version": 1, "shardlist": [{"url": ..., "nsamples": N, "filesize": B}, ...]}``;
3. img2dataset's per-shard ``NNNNN_stats.json`` beside ``NNNNN.tar`` (its ``successes``);
4. img2dataset's per-shard ``NNNNN.parquet`` beside ``NNNNN.tar``: one row per attempted sample, its ``status``
   column "success" for the samples the tar holds (read with pyarrow, the optional ``parquet`` extra; only that
   column is read);
5. a counts file the user names (``data.counts``): ``{shard name: count}`` or the widsindex form.

Every file is hostile input: read bounded (storage/remote.py), types and ranges checked, and an entry is matched to
a shard by its plain file name only (a URL entry by the last part of its path: nothing is ever fetched from it, and
no entry names a path). Errors name the file and the entry.
"""

from __future__ import annotations

import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

from mimscale.shards.format import MANIFEST_FORMAT, MANIFEST_NAME, ShardError, load_manifest, load_remote_manifest
from mimscale.storage import remote

WIDS_INDEX_NAME = "shardindex.json"  # widsindex create's default --output
MAX_COUNTS_BYTES = 64 << 20  # a widsindex entry is ~150 B: 400k shards
MAX_STATS_BYTES = 1 << 20  # an img2dataset stats file is ~2 KB
MAX_SHARD_COUNT = 1 << 40  # as samples.idx's bound
STATS_THREADS = 16  # stats files read at once from a remote folder (one small request each)
MAX_PARQUET_BYTES = 64 << 20  # img2dataset's per-shard parquet: ~10k rows of url, caption, sizes, exif (~10 MB)
MAX_PARQUET_ROWS = 1 << 24  # rows (attempted samples) of one shard's parquet
MAX_STATUS_BYTES = 1 << 30  # the status column, decompressed, as its metadata states it
PARQUET_THREADS = 4  # parquet files read at once (each held in memory when remote)
SUCCESS = "success"  # img2dataset's status of a sample written to the tar
_TAR_SUFFIX = re.compile(r"\.tar$")


@dataclass(frozen=True)
class ShardCounts:
    """Counts (and sizes, where the source records them; -1 unknown) of the shards of one folder, and their source."""

    counts: list[int]
    sizes: list[int]
    source: str


def _fail(shown: str, problem: str) -> ShardError:
    return ShardError(f"counts file {shown}: {problem}; fix or remove it (or unset data.counts)")


def _count(value, shown: str, entry: str, field: str, limit: int = MAX_SHARD_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise _fail(shown, f"entry {entry[:120]!r}: {field}={json.dumps(value)[:40]} is not an integer in [0, {limit})")
    return value


def _plain_name(name: str, shown: str) -> str:
    """An entry's shard name: a plain file name (a URL's last path part), never a path that could be opened."""
    if not isinstance(name, str) or not name:
        raise _fail(shown, f"a shard entry has no name ({str(name)[:80]!r})")
    base = urlparse(name).path.rpartition("/")[2] if remote.is_url(name) else name.rpartition("/")[2]
    if not base or base in (".", "..") or "\0" in base or "\\" in base or len(base.encode()) > 255:
        raise _fail(shown, f"entry {name[:120]!r} does not name a shard file")
    if not remote.is_url(name) and ("/" in name and ".." in name.split("/")):
        raise _fail(shown, f"entry {name[:120]!r} escapes its folder ('..')")
    return base


def _load_json(raw: bytes, shown: str, bound: int):
    if len(raw) > bound:
        raise _fail(shown, f"larger than {bound} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _fail(shown, f"not valid JSON ({str(err)[:120]})") from err


def parse_counts(raw: bytes, shown: str) -> dict[str, tuple[int, int]]:
    """{shard file name: (count, bytes or -1)} of a widsindex JSON or a plain ``{name: count}`` object."""
    data = _load_json(raw, shown, MAX_COUNTS_BYTES)
    if not isinstance(data, dict):
        raise _fail(shown, "not a JSON object (expected {name: count} or a widsindex shardlist)")
    if "shardlist" in data or "wids_version" in data:
        return _parse_wids(data, shown)
    found: dict[str, tuple[int, int]] = {}
    for name, value in data.items():
        _add(found, _plain_name(name, shown), _count(value, shown, name, "count"), -1, shown, name)
    return found


def _parse_wids(data: dict, shown: str) -> dict[str, tuple[int, int]]:
    if data.get("wids_version") != 1:
        raise _fail(shown, f"wids_version={str(data.get('wids_version'))[:20]!r}; only version 1 is understood")
    if data.get("datasets"):
        raise _fail(shown, "it refers to other dataset descriptions ('datasets'); give the shardlist itself")
    shardlist = data.get("shardlist")
    if not isinstance(shardlist, list):
        raise _fail(shown, "'shardlist' is not a list")
    found: dict[str, tuple[int, int]] = {}
    for number, entry in enumerate(shardlist):
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise _fail(shown, f"shardlist entry #{number} is not an object with a 'url' string")
        url = entry["url"]
        count = _count(entry.get("nsamples"), shown, url, "nsamples")
        size = _count(entry["filesize"], shown, url, "filesize", 1 << 62) if "filesize" in entry else -1
        _add(found, _plain_name(url, shown), count, size, shown, url)
    return found


def _add(found: dict, name: str, count: int, size: int, shown: str, entry: str) -> None:
    if name in found and found[name] != (count, size):
        raise _fail(shown, f"shard {name!r} is listed twice with different counts (entry {entry[:120]!r})")
    found[name] = (count, size)


def parse_stats(raw: bytes, shown: str) -> int:
    """The ``successes`` of an img2dataset per-shard stats file: the samples its tar holds."""
    data = _load_json(raw, shown, MAX_STATS_BYTES)
    if not isinstance(data, dict) or "successes" not in data:
        raise _fail(shown, "no 'successes' field (not an img2dataset stats file)")
    return _count(data["successes"], shown, "successes", "successes")


def manifest_counts(manifest: dict, shown: str) -> dict[str, tuple[int, int]]:
    """{name: (samples, bytes)} of a manifest parsed by format.parse_manifest (entries lacking either are left out).
    Only this format's: an older manifest (per-sample lists) counts nothing, and its set is indexed again as ever."""
    found: dict[str, tuple[int, int]] = {}
    if manifest.get("format") != MANIFEST_FORMAT:
        return found
    for entry in manifest["shards"]:
        if "samples" not in entry:
            continue
        name = _plain_name(entry["name"], shown)
        size = _count(entry["bytes"], shown, name, "bytes", 1 << 62) if "bytes" in entry else -1
        _add(found, name, _count(entry["samples"], shown, name, "samples"), size, shown, name)
    return found


# ----------------------------------------------------------------------------------------------- finding


def _read(location: str, bound: int) -> bytes | None:
    """A small file's bytes, bounded; None when it does not exist."""
    try:
        if remote.is_local(location):
            with remote.open_regular(location) as handle:
                return handle.read(bound + 1)
        return remote.read_small(location, bound)
    except (FileNotFoundError, remote.RemoteNotFound):
        return None
    except (OSError, remote.RemoteError) as err:
        raise ShardError(f"counts file {location} cannot be read ({err})") from err


def _covering(found: dict[str, tuple[int, int]], names: list[str], source: str) -> ShardCounts | None:
    if not all(name in found for name in names):
        return None
    return ShardCounts([found[n][0] for n in names], [found[n][1] for n in names], source)


def _stats_location(location: str, suffix: str = "_stats.json") -> str | None:
    """The file img2dataset writes beside shard ``NNNNN.tar``: ``NNNNN`` + suffix (``_stats.json``, ``.parquet``)."""
    name = remote.shard_name(location) if not remote.is_local(location) else location.rpartition("/")[2]
    if not _TAR_SUFFIX.search(name):
        return None
    stats = _TAR_SUFFIX.sub(suffix, name)
    if remote.is_local(location):
        head = location.rpartition("/")[0]
        return f"{head}/{stats}" if head else stats
    return remote.sibling(location, stats)


def _stats_count(where: str) -> int | None:
    raw = _read(where, MAX_STATS_BYTES)
    return None if raw is None else parse_stats(raw, where)


def _beside_counts(names, locations, suffix: str, count_one, threads: int, label: str) -> ShardCounts | None:
    """Counts from img2dataset's per-shard files (``NNNNN`` + suffix beside each ``NNNNN.tar``, read by
    ``count_one``: None when missing); looked for only when the first shard has one, used when all have. A bad
    file is an error only then: a set these files do not cover is indexed whatever they hold."""

    def attempt(where: str) -> tuple[int | None, ShardError | None]:
        try:
            return count_one(where), None
        except ShardError as err:
            return None, err

    wanted = [_stats_location(locations[name], suffix) for name in names]
    if not wanted or any(w is None for w in wanted):
        return None
    first = attempt(wanted[0])
    if first == (None, None):
        return None
    with ThreadPoolExecutor(threads) as pool:
        results = [first, *pool.map(attempt, wanted[1:])]
    if any(result == (None, None) for result in results):
        return None
    errors = [err for _, err in results if err is not None]
    if errors:
        raise errors[0]
    return ShardCounts([count for count, _ in results], [-1] * len(names), f"{label} ({wanted[0]}, ...)")


class _NoPyarrow(Exception):
    """A parquet file is there but pyarrow (the ``parquet`` extra) is not installed."""


def _status_column(parquet, shown: str) -> None:
    """Refuse, from the file's metadata alone, a parquet file that is not one shard's img2dataset status list."""
    import pyarrow as pa

    metadata = parquet.metadata
    if not 0 <= metadata.num_rows <= MAX_PARQUET_ROWS:
        raise _fail(shown, f"{metadata.num_rows} rows; a shard's parquet has at most {MAX_PARQUET_ROWS}")
    schema = parquet.schema_arrow
    if schema.get_field_index("status") < 0:
        raise _fail(shown, f"no 'status' column (not an img2dataset shard parquet; columns {schema.names[:8]})")
    kind = schema.field("status").type
    text = (pa.string(), pa.large_string())
    if kind not in text and not (pa.types.is_dictionary(kind) and kind.value_type in text):
        raise _fail(shown, f"its 'status' column holds {kind}, not text")
    column = [metadata.schema.column(k).path for k in range(metadata.num_columns)].index("status")
    size = sum(metadata.row_group(g).column(column).total_uncompressed_size for g in range(metadata.num_row_groups))
    if not 0 <= size <= MAX_STATUS_BYTES:
        raise _fail(shown, f"its 'status' column is {size} bytes decompressed; at most {MAX_STATUS_BYTES} are read")


def parse_parquet_status(source, shown: str) -> int:
    """The samples an img2dataset shard's tar holds: the rows of its ``NNNNN.parquet`` whose ``status`` is
    "success" (img2dataset writes one row per attempted sample). ``source``: the file's bytes or an open regular
    file. The row count and the column's size are checked in the metadata first; only ``status`` is read."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as err:
        raise _NoPyarrow() from err
    try:
        parquet = pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes) else source)
        _status_column(parquet, shown)
        successes = 0
        for group in range(parquet.metadata.num_row_groups):
            status = parquet.read_row_group(group, columns=["status"]).column(0)
            if pa.types.is_dictionary(status.type):  # a pandas category column
                status = status.cast(status.type.value_type)
            successes += int(pc.sum(pc.equal(status, SUCCESS)).as_py() or 0)  # a null status is no success
    except ShardError:
        raise
    except (pa.ArrowException, OSError, ValueError, IndexError) as err:
        raise _fail(shown, f"not a readable parquet file ({' '.join(str(err).split())[:160]})") from err
    return successes


def _parquet_count(where: str) -> int | None:
    """One shard's successes from its img2dataset parquet; None when there is none. A local file is read in place
    (footer and status column only), a remote one whole, bounded."""
    if not remote.is_local(where):
        raw = _read(where, MAX_PARQUET_BYTES)  # read_small refuses a file over the bound
        return None if raw is None else parse_parquet_status(raw, where)
    try:
        handle = remote.open_regular(where)
    except (FileNotFoundError, remote.RemoteNotFound):
        return None
    except (OSError, remote.RemoteError) as err:
        raise ShardError(f"counts file {where} cannot be read ({err})") from err
    with handle:
        if os.fstat(handle.fileno()).st_size > MAX_PARQUET_BYTES:
            raise _fail(where, f"larger than {MAX_PARQUET_BYTES} bytes")
        return parse_parquet_status(handle, where)


def _parquet_counts(names: list[str], locations: dict[str, str]) -> ShardCounts | None:
    try:
        return _beside_counts(names, locations, ".parquet", _parquet_count, PARQUET_THREADS, "img2dataset parquet")
    except _NoPyarrow:
        print(
            "mimscale data: img2dataset's parquet files beside the shards hold their counts, but pyarrow is not "
            "installed (pip install 'mimscale[parquet]'); the set is indexed instead",
            file=sys.stderr,
        )
        return None


def find_counts(
    folder: str, names: list[str], locations: dict[str, str], *, user_counts: str = "", keep_in=None
) -> ShardCounts | None:
    """The counts of ``names`` (shards of one folder, ``locations[name]`` each) from the first source that has them
    all, or None (the folder must then be indexed). pipe: commands and signed URLs have no folder to look in:
    only ``user_counts`` (data.counts) serves them."""
    first = locations[names[0]] if names else ""
    has_folder = remote.is_local(folder) or remote.sibling_folder(first) is not None
    if has_folder:
        if remote.is_local(folder):
            manifest, shown = load_manifest(folder), f"{folder}/{MANIFEST_NAME}"
        else:
            manifest, shown = load_remote_manifest(folder, keep_in=keep_in), f"{folder}/{MANIFEST_NAME}"
        if manifest is not None and (found := _covering(manifest_counts(manifest, shown), names, shown)):
            return found
        wids = f"{folder}/{WIDS_INDEX_NAME}" if folder != "." else WIDS_INDEX_NAME
        raw = _read(wids, MAX_COUNTS_BYTES)
        if raw is not None and (found := _covering(parse_counts(raw, wids), names, wids)):
            return found
        if found := _beside_counts(names, locations, "_stats.json", _stats_count, STATS_THREADS, "img2dataset stats"):
            return found
        if found := _parquet_counts(names, locations):
            return found
    if user_counts:
        raw = _read(user_counts, MAX_COUNTS_BYTES)
        if raw is None:
            raise ShardError(f"data.counts={user_counts!r} does not exist; fix the location or unset data.counts")
        parsed = parse_counts(raw, user_counts)
        return _covering(parsed, names, user_counts)
    return None
