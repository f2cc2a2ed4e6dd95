"""The node-local, size-bounded cache of whole shards that makes remote locations (storage/remote.py) local files.

The cache (:class:`ShardCache`) keeps whole shards in a node-local folder under a byte limit. Coordination between
the processes of a node (ranks, DataLoader workers) is done with ``flock`` on one small lock file per shard:
whoever holds it exclusively downloads (everyone else waits, so a shard is fetched once per node), readers hold
it shared while they use the file (so it is never evicted under them), and eviction takes it exclusively without
waiting. The kernel drops a dead process's locks, so a killed downloader never blocks anyone. Downloads go to a
hidden ``.part`` file that is fsynced, checked against the manifest's size and sha256 when known, and renamed;
a partial file is never served and leftovers are removed by the next downloader.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mimscale.storage.atomic import fsync_dir
from mimscale.storage.remote import (
    PART_MARK,
    RemoteError,
    check_scheme,
    copy_bounded,
    file_url_path,
    is_local,
    open_location,
    with_retries,
)

LOCK_DIR = ".locks"
MANIFEST_DIR = ".manifests"  # the last manifest.json read from each remote folder
ORPHAN_WAIT_S = 120.0  # a shard missing this long while others hold it shared was deleted by hand

_CACHES: weakref.WeakSet = weakref.WeakSet()
_LOCK_FDS: set[int] = set()  # every lock file this process has open, whichever thread opened it
_LOCK_FDS_GUARD = threading.Lock()


def _open_lock(path: Path) -> int:
    with _LOCK_FDS_GUARD:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        _LOCK_FDS.add(fd)
    return fd


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
    ):
        if not limit_bytes > 0:
            raise RemoteError(f"data.cache_limit_gb must be positive, got {limit_bytes / 1e9:g} GB")
        self._args = (str(cache_dir), int(limit_bytes))
        self._options = {
            "retries": retries,
            "backoff_s": backoff_s,
            "timeout_s": timeout_s,
            "prefetch_threads": prefetch_threads,
            "space_wait_s": space_wait_s,
        }
        self.dir = Path(cache_dir).expanduser()
        self.limit = int(limit_bytes)
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.prefetch_threads, self.space_wait_s = prefetch_threads, space_wait_s
        try:
            (self.dir / LOCK_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RemoteError(
                f"data.cache_dir={cache_dir} cannot be created ({err}); use a writable node-local folder"
            ) from err
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
                if final.exists():
                    os.utime(final)  # recency for eviction
                    return fd
                fcntl.flock(fd, fcntl.LOCK_UN)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process checks too, or just started the download: look again
                    if spun > ORPHAN_WAIT_S:
                        raise self._orphaned(final) from None
                    pause = random.uniform(0.01, 0.05)
                    time.sleep(pause)
                    spun += pause
                    continue
                if not final.exists():  # nobody fetched it meanwhile: our turn
                    self._download(location, wait_for_space=True)
                fcntl.flock(fd, fcntl.LOCK_UN)  # then pin it shared (the loop re-checks it is still there)
        except BaseException:
            _close_lock(fd)
            raise

    @staticmethod
    def _orphaned(final: Path) -> RemoteError:
        """Readers pin only a file they see, so it stays missing under their shared locks for moments only, unless
        someone deleted it from the cache by hand while a process of this node still had it pinned."""
        return RemoteError(
            f"{final} was deleted from the shard cache while another process of this node still uses it; stop the "
            f"processes using {final.parent} (or choose another data.cache_dir) and start again"
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

    @staticmethod
    def _touch(path: Path) -> bool:
        try:
            os.utime(path)
            return True
        except OSError:  # not cached (or evicted just now)
            return False

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
            if not final.exists():
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
            stale.unlink(missing_ok=True)  # left by a killed downloader: nobody else can be writing it
        size, sha256 = self._facts.get(location, (None, None))
        if size is not None and size > self.limit:
            self.check_window(size, f"the shard {location}")
        part = self.dir / f".{final.name}{PART_MARK}{os.getpid()}-{threading.get_ident()}"
        if not self._reserve(part, size or 0, location, wait=wait_for_space):
            return False
        try:
            with_retries(
                location,
                lambda: self._fetch_once(location, part, size, sha256),
                retries=self.retries,
                backoff_s=self.backoff_s,
            )
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        fsync_dir(self.dir)
        self.downloads += 1
        if size is None:  # its size was unknown when space was reserved: trim the cache back under the limit now
            self._reserve(None, 0, location, wait=False)
        return True

    def _fetch_once(self, location: str, part: Path, size: int | None, sha256: str | None) -> int:
        with open(part, "r+b") as sink, open_location(location, self.timeout_s) as (reader, declared):
            if size is None and declared is not None and declared > self.limit:
                self.check_window(declared, f"the shard {location}")
            total = copy_bounded(
                reader, sink, location=location, declared=declared, expected=size, sha256=sha256, bound=self.limit
            )
            sink.truncate(total)
            sink.flush()
            os.fsync(sink.fileno())
        return total

    @contextlib.contextmanager
    def _cache_lock(self) -> Iterator[None]:
        fd = self._lock_fd(".cache")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            _close_lock(fd)

    def _entries(self) -> tuple[int, list[tuple[float, int, Path]]]:
        """(bytes used by finished and in-progress files, finished shards as (mtime, size, path))."""
        used, finished = 0, []
        with os.scandir(self.dir) as entries:
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # a download renamed its part file, or an eviction, since the listing
                    continue
                used += info.st_size
                if not entry.name.startswith("."):
                    finished.append((info.st_mtime, info.st_size, Path(entry.path)))
        return used, sorted(finished)

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
            path.unlink(missing_ok=True)
            return True
        finally:
            _close_lock(fd)

    def _reserve(self, part: Path | None, needed: int, location: str, *, wait: bool) -> bool:
        """Evict least recently used unpinned shards until ``needed`` bytes fit, then create ``part`` at that size
        (a sparse reservation other processes count). Waits up to space_wait_s for pins to go, then a RemoteError."""
        deadline = time.monotonic() + (self.space_wait_s if wait else 0.0)
        while True:
            with self._cache_lock():
                used, finished = self._entries()
                for _mtime, size, path in finished:
                    if used + needed <= self.limit:
                        break
                    if self._try_evict(path):
                        used -= size
                if used + needed <= self.limit:
                    if part is not None:
                        with open(part, "wb") as handle:
                            handle.truncate(needed)
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


def cache_dir_for(configured: str) -> str:
    """data.cache_dir, or a per-user folder in the node's temporary directory when it is empty."""
    if configured:
        return configured
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"mimscale-shards-{os.getuid()}")
