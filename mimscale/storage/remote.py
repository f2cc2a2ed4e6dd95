"""Shard locations that may be remote: expanding their patterns, and reading them with bounds and retries.

A location is a local path, ``file://``, ``http(s)://``, ``s3://``, ``gs://`` (``gcs://``), ``hf://datasets/ORG/NAME``
(a Hugging Face Hub dataset, storage/hub.py) or ``pipe:COMMAND`` (a shell command whose stdout is the shard, as in
WebDataset). Brace patterns (``{000..099}``, ``{a,b}``) expand everywhere; globs and folders are listed for local
paths, object stores and the Hub (a plain HTTP server cannot be listed). Each scheme is one entry of ``SCHEME_TABLE``
(how it is listed and opened, and the optional package it needs).

Libraries, chosen for what each does best: HTTP(S) uses the standard library (a whole-shard GET needs no async
stack, and fsspec's HTTP backend would add aiohttp); ``s3://`` and ``gs://`` go through fsspec with s3fs / gcsfs
(the optional extra ``mimscale[remote]``) for their credential chains and listing; ``pipe:`` uses webdataset's
gopen, so commands behave exactly as in WebDataset pipelines; ``hf://`` resolves to the Hub's file URLs and reads them
with the same standard-library client as https (storage/hub.py says why not huggingface_hub's HfFileSystem).

The node-local cache that makes these locations local files lives in ``storage/shard_cache.py``.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import importlib
import io
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from braceexpand import braceexpand

from mimscale.storage import hub
from mimscale.storage.http_client import (  # the re-exported names keep remote.X working for every caller
    CHUNK,  # noqa: F401 - re-exported
    MAX_BACKOFF_S,  # noqa: F401 - re-exported
    HttpErrorHook,  # noqa: F401 - re-exported
    RemoteError,
    RemoteNotFound,
    SinkError,  # noqa: F401 - re-exported
    TransientError,
    copy_bounded,
    open_http,
    with_retries,
)

DEFAULT_MIN_RATE = 100e3  # bytes/s: data.download_min_rate's default; a 1 GB shard may take 10^4 s
PART_MARK = ".part-"  # a download in progress: .<name>.part-<pid>-<thread>, renamed when complete
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class NotRegularFile(RemoteError):
    """A local path is a FIFO, device, socket or directory (or a symlink to one): never read."""


# ----------------------------------------------------------------------------------------------- locations


def scheme_of(location: str) -> str:
    """'' for a local path, else the lower-case scheme ('pipe' for ``pipe:`` commands)."""
    if location.startswith("pipe:"):
        return "pipe"
    match = _URL.match(location)
    return match.group(1).lower() if match else ""


def is_url(spec: str) -> bool:
    """True for anything with a scheme (including ``file://`` and ``pipe:``); False for plain paths."""
    return bool(scheme_of(spec.strip()))


def is_local(location: str) -> bool:
    return scheme_of(location) in ("", "file")


def check_scheme(location: str, key: str = "data.shards") -> str:
    kind = scheme_of(location)
    if kind and kind != "file" and kind not in SCHEME_TABLE:
        known = ", ".join("pipe:COMMAND" if name == "pipe" else f"{name}://" for name in SCHEME_TABLE)
        raise RemoteError(
            f"{key}={location!r}: unknown scheme '{kind}://'; use a local path or one of file://, {known}"
        )
    return kind


def file_url_path(url: str) -> str:
    """The local path of a ``file://`` URL (``file:///data/x.tar`` -> ``/data/x.tar``)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise RemoteError(f"{url!r}: file:// URLs must name a local path (file:///path), not host {parts.netloc!r}")
    return unquote(parts.path)


def brace_expand(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero padding kept) and ``{a,b}`` lists, as WebDataset does (braceexpand)."""
    return list(braceexpand(pattern))


def expand(spec: str, key: str = "data.shards") -> list[str]:
    """Shard locations of a spec: paths, folders, globs and brace patterns, local or URLs, several joined by ``::``.

    Local entries come back as plain paths (``file://`` included), remote ones as URLs. ``key`` names the config
    key in errors.
    """
    if not spec or not spec.strip():
        raise RemoteError(
            f"{key} is empty; set it to a shard path, glob, brace pattern or URL (e.g. shards/sample/*.tar)"
        )
    found: list[str] = []
    for part in (part.strip() for part in spec.split("::")):
        if part:
            found.extend(_expand_one(part, key))
    return list(dict.fromkeys(found))


def _expand_one(part: str, key: str) -> list[str]:
    kind = check_scheme(part, key)
    if kind == "":
        return _expand_local(part, part, key)
    if kind == "file":
        return _expand_local(file_url_path(part), part, key)
    return SCHEME_TABLE[kind].expand(kind, brace_expand(part), part, key)


def _expand_pipe(kind: str, candidates: list[str], shown: str, key: str) -> list[str]:
    return candidates


def _expand_http(kind: str, candidates: list[str], shown: str, key: str) -> list[str]:
    if any("*" in c or "[" in c or c.endswith("/") for c in candidates):
        raise RemoteError(
            f"{key}={shown!r}: an HTTP server cannot be listed; name the shards with a brace pattern "
            "(https://host/train-{000000..000099}.tar)"
        )
    return candidates


def _expand_local(pattern: str, shown: str, key: str) -> list[str]:
    """Local .tar files of one pattern: a file, a folder (its *.tar), a glob, each after brace expansion."""
    paths: list[str] = []
    missing: list[str] = []
    for candidate in brace_expand(pattern):
        if os.path.isdir(candidate):
            found = glob.glob(os.path.join(glob.escape(candidate), "*.tar"))
        elif glob.has_magic(candidate):
            found = [path for path in glob.glob(candidate) if path.endswith(".tar")]
        elif os.path.lexists(candidate):  # a broken link is named below, not reported as missing
            found = [candidate] if candidate.endswith(".tar") else []
        else:
            missing.append(candidate)
            continue
        irregular = [path for path in found if not os.path.isfile(path)]  # a FIFO or device would hang or never end
        if irregular:
            raise RemoteError(
                f"{key}={shown!r}: {irregular[0]} is not a regular file (a FIFO, device or broken "
                "link); remove it or point the pattern at real shard files"
            )
        paths.extend(found)
    if missing and paths:
        listed = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise RemoteError(f"{key}={shown!r}: {len(missing)} shard file(s) do not exist: {listed}")
    if not paths:
        raise RemoteError(
            f"{key}={shown!r} matches no .tar shard files (cwd {os.getcwd()}); "
            "check the path, or build shards with `mimscale shards create SRC OUT`"
        )
    return sorted(set(paths), key=lambda p: (os.path.dirname(p), os.path.basename(p)))


def object_store(kind: str, location: str = ""):
    """The fsspec filesystem for s3/gs, with a clear error naming the package to install when it is missing."""
    package = SCHEME_TABLE[kind].package
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise RemoteError(
            f"{location or kind + '://'}: reading {kind}:// shards needs the {package} package, which is not "
            f"installed; pip install 'mimscale[remote]' (or pip install {package})"
        ) from err
    import fsspec

    return fsspec.filesystem(kind)


def _store_error(location: str, err: Exception) -> Exception:
    """Map an object-store exception to a clear permanent error or a retryable one."""
    name = type(err).__name__
    if isinstance(err, FileNotFoundError):
        return RemoteNotFound(f"{location} does not exist ({err}); check the bucket and key")
    if isinstance(err, PermissionError) or "Credentials" in name or "Auth" in name:
        return RemoteError(
            f"{location}: access denied or no credentials ({name}: {err}); set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://"
        )
    return TransientError(f"{name}: {err}")


def _expand_object_store(kind: str, candidates: list[str], shown: str, key: str) -> list[str]:
    fs = object_store(kind, shown)
    found: list[str] = []
    for candidate in candidates:
        if candidate.endswith(".tar") and not glob.has_magic(candidate):
            found.append(candidate)
            continue
        pattern = candidate if glob.has_magic(candidate) else candidate.rstrip("/") + "/*.tar"
        try:
            listed = sorted(fs.glob(pattern))
        except Exception as err:  # noqa: BLE001 - any backend error becomes a message naming the location
            mapped = _store_error(candidate, err)
            raise (
                mapped if isinstance(mapped, RemoteError) else RemoteError(f"{key}: listing {candidate}: {err}")
            ) from err
        found.extend(fs.unstrip_protocol(path) for path in listed if path.endswith(".tar"))
    if not found:
        raise RemoteError(f"{key}={shown!r} matches no .tar shards; check the bucket, prefix and pattern")
    return found


# ----------------------------------------------------------------------------------------------- reading


def open_regular(path: str | os.PathLike) -> io.BufferedReader:
    """Open a local file for reading, refusing anything but a regular file (a FIFO would block, /dev/zero never
    end). Opening with O_NONBLOCK means even a FIFO's open returns at once so it can be refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise RemoteNotFound(f"{path} does not exist") from err
    except OSError as err:
        raise RemoteError(f"cannot open {path}: {err.strerror or err}") from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(f"{path} is not a regular file (a FIFO, device or socket); only regular files are read")
    return os.fdopen(fd, "rb")


@contextlib.contextmanager
def _open_http(location: str, kind: str, timeout: float) -> Iterator[tuple[object, int | None]]:
    with open_http(location, timeout) as opened:
        yield opened


@contextlib.contextmanager
def _open_pipe(location: str, kind: str, timeout: float) -> Iterator[tuple[object, None]]:
    try:
        from webdataset.gopen import gopen
    except ImportError as err:
        raise RemoteError(f"{location}: pipe: shards need the webdataset package (pip install webdataset)") from err
    try:
        stream = gopen(location, "rb")
    except ValueError as err:  # WDS_SECURE=1 forbids pipes
        raise RemoteError(f"{location}: {err}") from err
    try:
        yield stream.stream, None  # the raw stdout: the exit status is checked once, here, with a clear message
        stream.stream.close()
        status = stream.proc.wait()
        if status != 0:
            raise TransientError(f"command exited with status {status}")
    finally:
        if stream.proc.poll() is None:
            stream.proc.kill()
            stream.proc.wait()
        stream.status = 0  # checked above; keeps gopen's own close() from raising a second time


@contextlib.contextmanager
def _open_object(location: str, kind: str, timeout: float) -> Iterator[tuple[object, int | None]]:
    fs = object_store(kind, location)
    try:
        handle = fs.open(location, "rb", block_size=16 << 20)
    except Exception as err:  # noqa: BLE001 - backend errors are mapped to clear messages
        raise _store_error(location, err) from None
    with handle:
        yield handle, getattr(handle, "size", None)


@contextlib.contextmanager
def open_location(location: str, timeout: float = 60.0) -> Iterator[tuple[object, int | None]]:
    """(reader, declared size or None) for any supported location; failures worth retrying raise TransientError."""
    kind = check_scheme(location, "location")
    try:
        if kind in ("", "file"):
            with open_regular(file_url_path(location) if kind else location) as handle:
                yield handle, os.fstat(handle.fileno()).st_size
        else:
            with SCHEME_TABLE[kind].open(location, kind, timeout) as opened:
                yield opened
    except (RemoteError, TransientError):
        raise
    except (OSError, http.client.HTTPException) as err:  # reset, timeout, broken pipe while reading
        raise TransientError(f"{type(err).__name__}: {err}") from None


def _copy_bounded_from(location: str, sink, max_bytes: int, timeout_s: float, min_rate: float) -> None:
    """One attempt of read_small and download: open ``location``, refuse a declared size over ``max_bytes``, copy
    at most that many bytes into ``sink`` within the rate and time limits."""
    with open_location(location, timeout_s) as (reader, declared):
        if declared is not None and declared > max_bytes:
            raise RemoteError(f"{location} is {declared} bytes, more than the {max_bytes} allowed for it")
        copy_bounded(
            reader,
            sink,
            location=location,
            declared=declared,
            bound=max_bytes,
            min_rate=min_rate,
            timeout_s=timeout_s,
        )


def read_small(
    location: str,
    max_bytes: int,
    *,
    retries: int = 3,
    backoff_s: float = 0.5,
    timeout_s: float = 60.0,
    min_rate: float = DEFAULT_MIN_RATE,
) -> bytes:
    """The whole content of a small file (manifest, index), at most ``max_bytes``; more is a RemoteError.

    A missing file raises RemoteNotFound (a FileNotFoundError), so callers can treat "no manifest" as optional.
    """

    def attempt() -> bytes:
        buffer = io.BytesIO()
        _copy_bounded_from(location, buffer, max_bytes, timeout_s, min_rate)
        return buffer.getvalue()

    return with_retries(location, attempt, retries=retries, backoff_s=backoff_s)


def _split_query(location: str) -> tuple[str, str]:
    """(a URL without its ``?query`` or ``#fragment``, that rest); paths and pipe: commands come back whole."""
    if scheme_of(location) in ("", "file", "pipe"):
        return location, ""
    cut = min((at for at in (location.find("?"), location.find("#")) if at >= 0), default=len(location))
    return location[:cut], location[cut:]


def folder_of(location: str) -> tuple[str, str]:
    """(folder or URL prefix, the rest) of a shard location, with ``folder + "/" + rest == location``; a URL's folder
    ends at its path's last '/', so a query string holding slashes (a signature) stays in the rest."""
    path, _ = _split_query(location)
    head = path.rpartition("/")[0]
    return (head, location[len(head) + 1 :]) if head else ("", location)


def shard_name(location: str) -> str:
    """A shard's name in its set's index and in the data fingerprint: its file name without a URL's query string,
    so a re-signed URL (or a local copy) is the same shard."""
    return _split_query(location)[0].rpartition("/")[2]


def sibling_folder(location: str) -> str | None:
    """The folder in which files beside a shard (manifest.json, samples.idx) are looked up by name, or None where
    no location may be derived from the shard's: a ``pipe:`` location is one command for one shard and nothing else
    (cutting it at a '/' would run another command), and a URL with a query string (a pre-signed URL) is valid only
    as given. Such sets are indexed from their shards unless the user names the index (data.index)."""
    if scheme_of(location) == "pipe" or _split_query(location)[1]:
        return None
    return folder_of(location)[0]


def sibling(location: str, name: str) -> str:
    """The location of file ``name`` in the same folder/prefix as ``location`` (e.g. its manifest.json)."""
    folder = sibling_folder(location)
    if folder is None:
        raise RemoteError(
            f"{location}: a pipe: command or a signed URL has no folder to look for {name} in; name its "
            "location instead"
        )
    return f"{folder}/{name}" if folder else name


# ----------------------------------------------------------------------------------------------- the scheme table


@dataclass(frozen=True)
class Scheme:
    """How one kind of location is listed and read: ``expand(kind, brace-expanded candidates, shown, key)`` gives
    its shard locations, ``open(location, kind, timeout)`` a context manager of (reader, declared size or None)
    that raises RemoteError / RemoteNotFound for permanent failures and TransientError for ones worth retrying."""

    expand: Callable[[str, list[str], str, str], list[str]]
    open: Callable[[str, str, float], contextlib.AbstractContextManager]
    package: str = ""  # the optional package it needs (named in the error when missing), "" when none


def _expand_hub(kind: str, candidates: list[str], shown: str, key: str) -> list[str]:
    return hub.expand(candidates, shown, key)


def _open_hub(location: str, kind: str, timeout: float) -> contextlib.AbstractContextManager:
    return hub.open_file(location, timeout)


SCHEME_TABLE: dict[str, Scheme] = {
    "http": Scheme(_expand_http, _open_http),
    "https": Scheme(_expand_http, _open_http),
    "s3": Scheme(_expand_object_store, _open_object, "s3fs"),
    "gs": Scheme(_expand_object_store, _open_object, "gcsfs"),
    "gcs": Scheme(_expand_object_store, _open_object, "gcsfs"),
    "hf": Scheme(_expand_hub, _open_hub),
    "pipe": Scheme(_expand_pipe, _open_pipe),
}
SCHEMES = ("file", *SCHEME_TABLE)
