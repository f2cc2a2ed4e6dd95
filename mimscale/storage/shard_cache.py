"""The node-local, size-bounded cache of whole shards that makes remote locations (storage/remote.py) local files.

The cache (:class:`ShardCache`) keeps whole shards in a node-local folder under a byte limit. Coordination between
the processes of a node (ranks, DataLoader workers) is done with ``flock`` on one small lock file per shard:
whoever holds it exclusively downloads (everyone else waits, so a shard is fetched once per node), readers hold
it shared while they use the file (so it is never evicted under them), and eviction takes it exclusively without
waiting. The kernel drops a dead process's locks, so a killed downloader never blocks anyone. Downloads go to a
hidden ``.part`` file whose space is allocated first, fsynced, checked against the manifest's size and sha256 when
known, and renamed; a partial file is never served and leftovers are removed by the next downloader.

What the cache trusts: it only ever counts, evicts or serves files it wrote itself (names ``<16 hex>-<name>``);
anything else in the folder is left alone and named once. Each download's sha256 is computed as the bytes stream
in and recorded in ``.records/<entry>`` with the file's size, mtime, ctime and inode; a cached file that no longer
matches its record (rewritten, replaced, planted without one, or not the manifest's sha256) is dropped and fetched
again with a message. Recency for eviction is the record's mtime, so using a shard never touches the shard itself.
Lock files and records are opened without following links.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import random
import re
import stat
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mimscale.storage.atomic import atomic_write, fsync_dir
from mimscale.storage.remote import (
    DEFAULT_MIN_RATE,
    PART_MARK,
    RemoteError,
    SinkError,
    check_scheme,
    copy_bounded,
    file_url_path,
    is_local,
    open_location,
    with_retries,
)

LOCK_DIR = ".locks"
MANIFEST_DIR = ".manifests"  # the last manifest.json read from each remote folder
RECORD_DIR = ".records"  # per entry: size, mtime, ctime, inode and sha256 of the file as downloaded
OWN_DIRS = (LOCK_DIR, MANIFEST_DIR, RECORD_DIR)
ENTRY_NAME = re.compile(r"[0-9a-f]{16}-[A-Za-z0-9_.-]{1,80}")  # what _name() makes: the only files ever evicted
MAX_RECORD_BYTES = 4096
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
ORPHAN_WAIT_S = 120.0  # a shard missing this long while others hold it shared was deleted by hand

_CACHES: weakref.WeakSet = weakref.WeakSet()
_LOCK_FDS: set[int] = set()  # every lock file this process has open, whichever thread opened it
_LOCK_FDS_GUARD = threading.Lock()
_FOREIGN_NAMED: set[str] = set()  # cache folders whose foreign files this process has named


def ranks_on_this_node(environ=None, default: int = 1) -> int:
    """How many ranks of the job run on this node (they share its cache): LOCAL_SIZE as DeepSpeed's launcher (and
    ``mimscale launch``) sets it, LOCAL_WORLD_SIZE as torchrun sets it; ``default`` when neither is set."""
    environ = os.environ if environ is None else environ
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        value = environ.get(name, "")
        if value:
            try:
                count = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a number of ranks; the launcher sets it: unset it") from None
            if count < 1:
                raise ValueError(
                    f"{name}={value} is not a number of ranks (at least 1); the launcher sets it: unset it"
                )
            return count
    return default


def _open_lock(path: Path) -> int:
    """Open (creating) a lock file without following a link planted at its name: a symlink in ``.locks/`` must never
    make us create or open a file elsewhere; anything but a regular file there is refused, named."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | _NOFOLLOW
    with _LOCK_FDS_GUARD:
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as err:
            raise _lock_error(path, err) from err
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RemoteError(
                f"{path} is not a regular file (a FIFO, device or folder); remove it (the cache "
                "makes its lock files itself)"
            )
        _LOCK_FDS.add(fd)
    return fd


def _lock_error(path: Path, err: OSError) -> RemoteError:
    if err.errno == errno.ELOOP or os.path.islink(path):
        return RemoteError(
            f"{path} is a symbolic link; the shard cache never follows links in its lock folder: "
            "remove it (and check who planted it)"
        )
    return cache_write_error(path.parent.parent, err, f"creating the lock file {path.name}")


def cache_write_error(folder: str | os.PathLike, err: OSError, doing: str) -> RemoteError:
    """The message for a write into the cache folder that failed: a full disk, a read-only folder, or another cause."""
    if err.errno in NO_SPACE:
        return RemoteError(
            f"no space left on {folder} while {doing} ({err.strerror}); free space there, lower "
            "data.cache_limit_gb below the free space, or set data.cache_dir to a larger node-local "
            "folder"
        )
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return RemoteError(
            f"the shard cache folder {folder} is not writable ({err.strerror}) while {doing}; set "
            "data.cache_dir to a writable node-local folder"
        )
    return RemoteError(f"the shard cache folder {folder} failed while {doing}: {err.strerror or err}")


def _close_lock(fd: int) -> None:
    with _LOCK_FDS_GUARD:
        _LOCK_FDS.discard(fd)
        os.close(fd)


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker) shares its parent's open lock files, and flock locks live as long as
    any copy is open: close (never unlock) every inherited one, or a parent thread's finished download or released
    pin would stay locked for the child's lifetime. Then start with no pins or threads of its own."""
    for fd in _LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()
    _LOCK_FDS_GUARD.release()  # taken before the fork, so no lock file was half-registered
    for cache in list(_CACHES):
        cache._reset_process_state()


os.register_at_fork(
    before=_LOCK_FDS_GUARD.acquire, after_in_parent=_LOCK_FDS_GUARD.release, after_in_child=_after_fork_in_child
)


class ShardCache:
    """Node-local, size-bounded cache of whole shards, shared by every process of a node (see the module doc).

    ``local_path`` pins a shard (it cannot be evicted) until ``release``; ``prefetch`` downloads ahead in background
    threads, best effort (skipped when the cache is full of pinned shards). Local locations pass straight through.
    ``expect`` tells the cache a shard's size and sha256 from the manifest, so downloads are checked and space is
    reserved before they start.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        limit_bytes: int,
        *,
        retries: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        prefetch_threads: int = 8,
        space_wait_s: float = 300.0,
        min_rate: float = DEFAULT_MIN_RATE,
    ):
        if not limit_bytes > 0:
            raise RemoteError(f"data.cache_limit_gb must be positive, got {limit_bytes / 1e9:g} GB")
        self._args = (str(cache_dir), int(limit_bytes))
        self._options = {
            "retries": retries,
            "backoff_s": backoff_s,
            "timeout_s": timeout_s,
            "min_rate": min_rate,
            "prefetch_threads": prefetch_threads,
            "space_wait_s": space_wait_s,
        }
        self.dir = Path(cache_dir).expanduser()
        self.limit = int(limit_bytes)
        self.retries, self.backoff_s, self.timeout_s, self.min_rate = retries, backoff_s, timeout_s, min_rate
        self.prefetch_threads, self.space_wait_s = prefetch_threads, space_wait_s
        for folder in (self.dir / LOCK_DIR, self.dir / RECORD_DIR):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise RemoteError(
                    f"data.cache_dir={cache_dir} cannot be created ({err}); use a writable node-local folder"
                ) from err
            if folder.is_symlink() or not folder.is_dir():
                raise RemoteError(
                    f"{folder} is a link or not a folder; the shard cache makes it itself and never "
                    "follows links there: remove it (and check who planted it)"
                )
        _close_lock(self._lock_fd(".cache"))  # a read-only or full cache folder is named now, not mid-download
        self._facts: dict[str, tuple[int | None, str | None]] = {}
        self._reset_process_state()
        _CACHES.add(self)

    @classmethod
    def from_config(cls, data_cfg) -> ShardCache:
        """The cache a DataConfig asks for: <data.cache_dir>/shards, data.cache_limit_gb, data.download_*."""
        return cls(
            os.path.join(cache_dir_for(data_cfg.cache_dir), "shards"),
            int(data_cfg.cache_limit_gb * 1e9),
            retries=data_cfg.download_retries,
            timeout_s=data_cfg.download_timeout_s,
            min_rate=data_cfg.download_min_rate,
        )

    def _reset_process_state(self) -> None:
        self._mutex = threading.RLock()
        self._pins: dict[str, list[int]] = {}  # location -> [lock fd held shared, use count]
        self._location_locks: dict[str, threading.Lock] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self.downloads = 0  # shards this process downloaded (statistics, tests)

    def __getstate__(self) -> dict:
        return {"args": self._args, "options": self._options, "facts": dict(self._facts)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["args"], **state["options"])
        self._facts.update(state["facts"])

    # ------------------------------------------------------------------------------------------- paths

    def _name(self, location: str) -> str:
        digest = hashlib.sha256(location.encode()).hexdigest()[:16]  # distinct URLs with one basename stay apart
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", location.rstrip("/").rsplit("/", 1)[-1])[-80:].lstrip(".")
        return f"{digest}-{base or 'shard'}"

    def path_for(self, location: str) -> Path:
        """Where the cached copy of a remote location lives (whether or not it is there now)."""
        return self.dir / self._name(location)

    def _lock_fd(self, name: str) -> int:
        return _open_lock(self.dir / LOCK_DIR / name)

    def expect(self, location: str, nbytes: int | None = None, sha256: str | None = None) -> None:
        """Record a shard's size and sha256 (index, manifest); downloads are then checked against what is known."""
        known_bytes, known_sha = self._facts.get(location, (None, None))
        self._facts[location] = (known_bytes if nbytes is None else nbytes, sha256 or known_sha)

    def check_window(self, nbytes: int, what: str = "one window of shards") -> None:
        """Refuse, up front, a limit that cannot hold what must be resident at once."""
        if nbytes > self.limit:
            raise RemoteError(
                f"data.cache_limit_gb={self.limit / 1e9:g} is smaller than {what} ({nbytes / 1e9:.3f} GB); "
                f"raise it to at least {nbytes / 1e9:.3f}"
            )

    # ------------------------------------------------------------------------------------------- use

    def local_path(self, location: str) -> Path:
        """A local path with the whole shard, downloading it once per node if needed; pinned until release()."""
        kind = check_scheme(location, "shard location")
        if kind in ("", "file"):
            return Path(file_url_path(location) if kind else location)
        with self._mutex:
            lock = self._location_locks.setdefault(location, threading.Lock())
        with lock:
            with self._mutex:
                pin = self._pins.get(location)
                if pin:
                    pin[1] += 1
                    return self.path_for(location)
            fd = self._pin(location)
            with self._mutex:
                self._pins[location] = [fd, 1]
        return self.path_for(location)

    def _pin(self, location: str) -> int:
        """Hold the shard's lock shared with the file present, downloading it first if nobody has.

        Only the shared lock is ever waited for. The exclusive one is tried without waiting: a process that waited
        for it after seeing no file would wait behind every reader that pins the file meanwhile (a rank pins the
        published index for its whole life), which deadlocked two ranks starting together."""
        final = self.path_for(location)
        fd = self._lock_fd(final.name)
        spun = 0.0  # seconds spent looking again while others held the lock shared and the file was missing
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # another process downloads or evicts it: wait for that
                    spun = 0.0
                    fcntl.flock(fd, fcntl.LOCK_SH)
                if self._trusted(final, location):
                    self._touch(final)  # recency for eviction
                    return fd
                fcntl.flock(fd, fcntl.LOCK_UN)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process checks too, or just started the download: look again
                    if spun > ORPHAN_WAIT_S:
                        raise self._orphaned(final, self._distrust(final, location)) from None
                    pause = random.uniform(0.01, 0.05)
                    time.sleep(pause)
                    spun += pause
                    continue
                if not self._trusted(final, location, drop=True):  # nobody fetched it meanwhile: our turn
                    self._download(location, wait_for_space=True)
                fcntl.flock(fd, fcntl.LOCK_UN)  # then pin it shared (the loop re-checks it is still there)
        except BaseException:
            _close_lock(fd)
            raise

    @staticmethod
    def _orphaned(final: Path, problem: str) -> RemoteError:
        """Readers pin only a file they trust, so it stays missing (or untrusted) under their shared locks for moments
        only, unless someone deleted or changed it in the cache while a process of this node still had it pinned."""
        what = "was deleted from the shard cache" if problem == "missing" else f"{problem} (in the shard cache)"
        return RemoteError(
            f"{final} {what} while another process of this node still uses it; stop the processes using "
            f"{final.parent} (or choose another data.cache_dir) and start again"
        )

    def release(self, location: str, *, drop: bool = False) -> None:
        """Done with a shard for now: unpin it (it may be evicted); ``drop`` evicts it at once if nobody uses it."""
        if is_local(location):
            return
        with self._mutex:
            pin = self._pins.get(location)
            if pin is None:
                return
            pin[1] -= 1
            if pin[1] > 0:
                return
            del self._pins[location]
        _close_lock(pin[0])
        if drop:
            self._try_evict(self.path_for(location))

    def prefetch(self, locations: Iterable[str]) -> None:
        """Start background downloads of shards needed soon (best effort; errors surface in local_path).

        Shards already cached are touched instead: least recently *wanted* shards are evicted first, so a shard
        the order will read next is not evicted between now and the moment a reader pins it."""
        for location in locations:
            if is_local(location):
                continue
            check_scheme(location, "shard location")
            if self._touch(self.path_for(location)):
                continue  # cached: now marked as wanted soon, so eviction takes staler shards first
            with self._mutex:
                if location in self._pins or location in self._pending:
                    continue
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="mimscale-prefetch")
                future = self._executor.submit(self._prefetch_one, location)
                self._pending[location] = future
            future.add_done_callback(lambda _f, loc=location: self._forget_pending(loc))

    def _touch(self, path: Path) -> bool:
        """Mark a cached shard as wanted now: the mtime of its record, never the shard (whose times are recorded)."""
        if not path.is_file():
            return False
        try:
            fd = os.open(self._record_path(path.name), os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW)
        except OSError:  # no record (yet, or planted without one): nothing to mark
            return False
        try:
            os.utime(fd)
            return True
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------------- records

    def _record_path(self, name: str) -> Path:
        return self.dir / RECORD_DIR / name

    def _write_record(self, final: Path, location: str, sha256: str) -> None:
        info = os.lstat(final)
        record = {
            "location": location,
            "bytes": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "ctime_ns": info.st_ctime_ns,
            "inode": info.st_ino,
            "sha256": sha256,
        }
        try:
            atomic_write(self._record_path(final.name), json.dumps(record), mode=0o644)
        except OSError as err:
            raise cache_write_error(self.dir, err, f"recording {final.name}") from err

    def _read_record(self, name: str) -> dict | None:
        """The entry's record, or None when it is missing, a link, not a regular file or not a JSON object."""
        try:
            fd = os.open(self._record_path(name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | _NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            try:
                record = json.loads(handle.read(MAX_RECORD_BYTES + 1))
            except (OSError, ValueError):
                return None
        return record if isinstance(record, dict) else None

    def _distrust(self, final: Path, location: str) -> str:
        """Why the cached file at ``final`` may not be served for ``location`` ('' when it matches its record)."""
        try:
            info = os.lstat(final)
        except FileNotFoundError:
            return "missing"
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        record = self._read_record(final.name)
        if record is None:
            return "has no record of its download (planted, or left by a killed process)"
        found = {
            "location": location,
            "bytes": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "ctime_ns": info.st_ctime_ns,
            "inode": info.st_ino,
        }
        if any(record.get(key) != value for key, value in found.items()):
            return "changed since it was downloaded (size, times or inode differ from its record)"
        size, sha256 = self._facts.get(location, (None, None))
        if sha256 and record.get("sha256") != sha256:
            return f"has sha256 {str(record.get('sha256'))[:12]}..., the manifest says {sha256[:12]}..."
        if size is not None and size != info.st_size:
            return f"is {info.st_size} bytes, the index says {size}"
        return ""

    def _trusted(self, final: Path, location: str, *, drop: bool = False) -> bool:
        """Whether the cached copy may be served; with ``drop`` (the exclusive lock held) an untrusted one is
        deleted, with a message, so that it is fetched again."""
        problem = self._distrust(final, location)
        if not problem:
            return True
        if drop and problem != "missing":
            print(
                f"mimscale data: the cached copy of {location} ({final}) {problem}; dropping it and downloading "
                "it again",
                file=sys.stderr,
            )
            self._delete_entry(final)
        return False

    def _delete_entry(self, final: Path) -> None:
        """Remove a cache entry and its record; only names the cache makes, never following a link."""
        if not ENTRY_NAME.fullmatch(final.name):
            raise RemoteError(f"{final} is not a name the shard cache makes; refusing to delete it")
        for path in (final, self._record_path(final.name)):
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(path) and not os.path.islink(path):
                    raise RemoteError(f"{path} is a folder where the shard cache keeps a file; move it away")
                os.unlink(path)  # a link is removed, never what it points to

    def _forget_pending(self, location: str) -> None:
        with self._mutex:
            self._pending.pop(location, None)

    def _prefetch_one(self, location: str) -> None:
        final = self.path_for(location)
        fd = self._lock_fd(final.name)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process downloads it (or reads it): this thread moves on to the next shard
            if not self._trusted(final, location, drop=True):
                self._download(location, wait_for_space=False)
        except RemoteError:
            pass  # the consumer's local_path retries and reports it with the URL
        finally:
            _close_lock(fd)

    def close(self) -> None:
        """Stop prefetching and drop this process's pins."""
        with self._mutex:
            executor, self._executor = self._executor, None
            pins, self._pins = self._pins, {}
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        for fd, _count in pins.values():
            _close_lock(fd)

    # ------------------------------------------------------------------------------------------- download

    def _download(self, location: str, *, wait_for_space: bool) -> bool:
        """Fetch into the cache; the caller holds the shard's exclusive lock. False if prefetch found no room."""
        final = self.path_for(location)
        for stale in self.dir.glob(f".{glob.escape(final.name)}{PART_MARK}*"):
            with contextlib.suppress(OSError):  # left by a killed downloader: nobody else can be writing it
                os.unlink(stale)
        size, sha256 = self._facts.get(location, (None, None))
        if size is not None and size > self.limit:
            self.check_window(size, f"the shard {location}")
        part = self.dir / f".{final.name}{PART_MARK}{os.getpid()}-{threading.get_ident()}"
        if not self._reserve(part, size or 0, location, wait=wait_for_space):
            return False
        try:
            digest = with_retries(
                location,
                lambda: self._fetch_once(location, part, size, sha256),
                retries=self.retries,
                backoff_s=self.backoff_s,
            )
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        self._write_record(final, location, digest)
        fsync_dir(self.dir)
        self.downloads += 1
        if size is None:  # its size was unknown when space was reserved: trim the cache back under the limit now
            self._reserve(None, 0, location, wait=False)
        return True

    def _fetch_once(self, location: str, part: Path, size: int | None, sha256: str | None) -> str:
        """One attempt; returns the sha256 of what was written, hashed as the bytes streamed in (no second read)."""
        digest = hashlib.sha256()
        try:
            sink = os.fdopen(os.open(part, os.O_RDWR | os.O_CLOEXEC | _NOFOLLOW), "r+b")
        except OSError as err:
            raise cache_write_error(self.dir, err, f"opening {part.name}") from err
        with sink:
            try:
                with open_location(location, self.timeout_s) as (reader, declared):
                    if size is None and declared is not None and declared > self.limit:
                        self.check_window(declared, f"the shard {location}")
                    total = copy_bounded(
                        reader,
                        sink,
                        location=location,
                        declared=declared,
                        expected=size,
                        sha256=sha256,
                        bound=self.limit,
                        digest=digest,
                        min_rate=self.min_rate,
                        timeout_s=self.timeout_s,
                    )
            except SinkError as err:
                raise cache_write_error(self.dir, err.error, f"downloading {location}") from err
            try:
                sink.truncate(total)
                sink.flush()
                os.fsync(sink.fileno())
            except OSError as err:
                raise cache_write_error(self.dir, err, f"writing {location}") from err
        return digest.hexdigest()

    @contextlib.contextmanager
    def _cache_lock(self) -> Iterator[None]:
        fd = self._lock_fd(".cache")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            _close_lock(fd)

    def _entries(self) -> tuple[int, list[tuple[float, int, Path]]]:
        """(bytes used by finished and in-progress files, finished shards as (recency, size, path)).

        Only files the cache wrote count: ``<16 hex>-<name>`` entries and their ``.part-`` files. Anything else is
        the user's, neither counted nor ever evicted, and named once per process."""
        used, finished, foreign = 0, [], []
        with os.scandir(self.dir) as entries:
            for entry in entries:
                name = entry.name
                own = ENTRY_NAME.fullmatch(name)
                part = name.startswith(".") and PART_MARK in name and ENTRY_NAME.fullmatch(name[1:].split(PART_MARK)[0])
                if not own and not part:
                    if name not in OWN_DIRS:
                        foreign.append(name)
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # a download renamed its part file, or an eviction, since the listing
                    continue
                used += info.st_size
                if own:
                    finished.append((self._recency(name), info.st_size, Path(entry.path)))
        self._name_foreign(foreign)
        return used, sorted(finished)

    def _recency(self, name: str) -> float:
        try:
            return os.lstat(self._record_path(name)).st_mtime
        except OSError:
            return 0.0  # no record: it will be dropped when next used, so it goes first

    def _name_foreign(self, names: list[str]) -> None:
        """Say once per process (forked workers inherit that it was said) which files are not the cache's."""
        if names and str(self.dir) not in _FOREIGN_NAMED:
            _FOREIGN_NAMED.add(str(self.dir))
            shown = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            print(
                f"mimscale data: the shard cache folder {self.dir} holds {len(names)} file(s) it did not write "
                f"({shown}); they are left untouched (never evicted, not counted against data.cache_limit_gb): "
                "move them out of the cache folder",
                file=sys.stderr,
            )

    def usage(self) -> int:
        """Bytes in the cache now (finished shards plus reservations of downloads in progress)."""
        return self._entries()[0]

    def _try_evict(self, path: Path) -> bool:
        """Delete a cached shard unless some process uses or downloads it (its lock is then held)."""
        fd = self._lock_fd(path.name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _close_lock(fd)
            return False
        try:
            self._delete_entry(path)
            return True
        finally:
            _close_lock(fd)

    def _reserve(self, part: Path | None, needed: int, location: str, *, wait: bool) -> bool:
        """Evict least recently used unpinned shards until ``needed`` bytes fit, then create ``part`` with that
        space allocated (other processes count it). Waits up to space_wait_s for pins to go, then a RemoteError."""
        deadline = time.monotonic() + (self.space_wait_s if wait else 0.0)
        while True:
            with self._cache_lock():
                used, finished = self._entries()
                for _recency, size, path in finished:
                    if used + needed <= self.limit:
                        break
                    if self._try_evict(path):
                        used -= size
                if used + needed <= self.limit:
                    if part is not None:
                        self._allocate(part, needed)
                    return True
            if not wait or time.monotonic() > deadline:
                if not wait:
                    return False
                raise RemoteError(
                    f"data.cache_limit_gb={self.limit / 1e9:g} is too small: {location} needs {needed} bytes but "
                    f"{len(finished)} shards in use on this node (by its ranks and DataLoader workers) fill "
                    f"{used} of {self.limit} bytes; raise data.cache_limit_gb above {(used + needed) / 1e9:.3f}"
                )
            time.sleep(0.2)

    def _allocate(self, part: Path, needed: int) -> None:
        """Create ``part`` (never through a link) with ``needed`` bytes really allocated, so a full disk is found
        now, named; filesystems that cannot allocate ahead (posix_fallocate unsupported) get a sized file instead."""
        try:
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _NOFOLLOW, 0o644)
        except OSError as err:
            raise cache_write_error(self.dir, err, f"creating {part.name}") from err
        try:
            if needed:
                try:
                    os.posix_fallocate(fd, 0, needed)
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    os.ftruncate(fd, needed)
        except OSError as err:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise cache_write_error(self.dir, err, f"reserving {needed} bytes for {part.name}") from err
        os.close(fd)


def cache_dir_for(configured: str) -> str:
    """data.cache_dir, or a private per-user folder in the node's temporary directory when it is empty.

    That default has a predictable name in a folder everyone can write, so another user could create it first and
    plant shards: it is created 0700, and an existing one is used only if it is a real folder owned by this user
    that nobody else can write into (else a RemoteError says why and what to do)."""
    if configured:
        return configured
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"mimscale-shards-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise cache_write_error(os.path.dirname(path), err, f"creating the default cache folder {path}") from err
    info = os.lstat(path)
    problem = ""
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        problem = "is a link or not a folder"
    elif info.st_uid != os.getuid():
        problem = f"is owned by uid {info.st_uid}, not by you (uid {os.getuid()})"
    elif info.st_mode & 0o022:
        problem = (
            f"is writable by {'group and others' if info.st_mode & 0o022 == 0o022 else 'group or others'} "
            f"(mode {stat.S_IMODE(info.st_mode):o})"
        )
    if problem:
        raise RemoteError(
            f"the default shard cache folder {path} {problem}: another user could plant or replace shards there. "
            f"Remove it (or chmod 700 it if it is yours), or set data.cache_dir to a folder of your own"
        )
    return path
