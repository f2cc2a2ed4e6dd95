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
import time
from pathlib import Path

LOCK_NAME = ".mimscale.lock"


class OutputDirBusyError(ValueError):
    """Another live run writes into the same run.output_dir."""


class RunLock:
    """Held by rank 0 from start-up to exit. Never open the lock file a second time in the holding process:
    closing any descriptor of it releases a POSIX lock."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
    error = ""
    if rank == 0:
        try:
            lock.acquire()
        except OutputDirBusyError as err:
            error = str(err)
    error = distributed.broadcast_object(error)
    if error:
        raise OutputDirBusyError(error)
    return lock
