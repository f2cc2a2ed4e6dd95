"""One run per output folder: rank 0 holds a lock on ``<output_dir>/.mimscale.lock`` for the run's lifetime.

The lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when the holding process ends however it
ends (``kill -9`` included), so a dead run never leaves the folder stuck; forked children (DataLoader workers)
do not inherit it, so a worker outliving a killed rank cannot hold it either; and NFS/Lustre implement it. The
file's text names the holder (host, pid, start time) for the refusal message; the text of a dead holder is
simply overwritten.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path

LOCK_NAME = ".mimscale.lock"


class OutputDirBusyError(ValueError):
    """Another live run writes into the same run.output_dir."""


class UnsafeLockFileError(ValueError):
    """The lock file's place holds a link, a folder or a device: never opened, written or removed by mimscale."""


_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK


class RunLock:
    """Held by rank 0 from start-up to exit. Never open the lock file a second time in the holding process:
    closing any descriptor of it releases a POSIX lock."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def _open(self) -> int:
        """The lock file, opened without following a link (O_NOFOLLOW) or blocking on a FIFO (O_NONBLOCK); anything
        but a regular file there is refused by name, so a planted link never makes us truncate its target."""
        try:
            fd = os.open(self.path, _LOCK_FLAGS, 0o644)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
                raise
            raise UnsafeLockFileError(self._refusal()) from err
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafeLockFileError(self._refusal())
        return fd

    def _refusal(self) -> str:
        try:
            kind = _describe_kind(os.lstat(self.path).st_mode)
        except OSError:
            kind = "not a regular file"
        return (
            f"{self.path} is {kind}, not the regular lock file mimscale keeps there; mimscale never writes through "
            f"it. Remove it (rm {self.path}) if you did not put it there on purpose, or set run.output_dir to "
            "another folder"
        )

    def acquire(self) -> None:
        fd = self._open()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            if err.errno == errno.ENOLCK:  # a filesystem without locks: run unprotected rather than not at all
                print(f"mimscale: warning: {self.path.parent} does not support file locks; not guarding it")
                return
            raise OutputDirBusyError(
                f"run.output_dir={self.path.parent} is in use by another run ({describe_holder(holder)}); wait "
                "for it to end or stop it, or set run.output_dir to another folder"
            ) from err
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the stale text stays and is harmless
            self.fd = None


_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def _describe_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def describe_holder(text: str) -> str:
    try:
        record = json.loads(text)
        return f"host {record['host']}, pid {record['pid']}, started {record['started']}"
    except (ValueError, KeyError, TypeError):
        return f"holder unknown: {LOCK_NAME} reads {text[:100]!r}"


def lock_output_dir(output_dir: Path, rank: int) -> RunLock:
    """Collective: rank 0 takes the folder's lock; if another run holds it, every rank raises the same error."""
    from mimscale.engine import distributed

    lock = RunLock(output_dir)
    error: tuple[str, str] | None = None
    if rank == 0:
        try:
            lock.acquire()
        except (OutputDirBusyError, UnsafeLockFileError) as err:
            error = (type(err).__name__, str(err))
    error = distributed.broadcast_object(error)
    if error:
        raise {cls.__name__: cls for cls in (OutputDirBusyError, UnsafeLockFileError)}[error[0]](error[1])
    return lock
