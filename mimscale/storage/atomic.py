"""The one way mimscale replaces a file: a private temporary name, fsync, rename, fsync the folder.

Readers see the old file or the new one, never half of one, and nothing planted at the destination or at a
temporary name is followed: the temporary file is created with ``O_EXCL | O_NOFOLLOW`` and the rename replaces
a symlink at the destination instead of writing through it. ``atomic_write`` writes bytes in one call;
``atomic_output`` (a block) and ``AtomicFile`` (several calls) stream a large file the same way.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (best effort: some filesystems refuse a folder fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicFile:
    """A file written under a temporary name next to ``path``: ``commit`` makes it ``path`` (fsync, rename, folder
    fsync), ``discard`` removes it. For writers whose output spans several calls (the index writer); a block of
    code writing a whole file uses ``atomic_output``.

    ``temp`` names a known temporary file instead of a private one, for writers whose killed runs are cleaned up
    by that name (shard creation's ``NAME.tmp``, downloads' ``.NAME.part-*``); whatever sits there is unlinked
    first (a link removes only the link), and the new file is created with ``O_EXCL | O_NOFOLLOW`` either way.
    """

    def __init__(self, path: str | Path, *, mode: int = 0o644, durable: bool = True, temp: str | Path | None = None):
        self.path, self.durable = Path(path), durable
        if self.path.is_dir() and not self.path.is_symlink():
            raise IsADirectoryError(f"{self.path} is a folder where mimscale writes a file; move it away and run again")
        if temp is None:
            self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        else:
            self.tmp = Path(temp)
            self.tmp.unlink(missing_ok=True)  # a killed writer's leftover, or a planted link: never written through
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
        self.handle: BinaryIO = os.fdopen(fd, "wb")

    def commit(self) -> Path:
        """Flush (and with ``durable`` fsync) the file and rename it to ``path``; on any failure it is removed."""
        try:
            self.handle.flush()
            if self.durable:
                os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        if self.durable:
            fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary file; ``path`` keeps its old content (or stays absent)."""
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


@contextlib.contextmanager
def atomic_output(
    path: str | Path, *, mode: int = 0o644, durable: bool = True, temp: str | Path | None = None
) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into: renamed into place when the block ends normally,
    removed when it raises. Readers see the old file or the whole new one (see AtomicFile for the arguments)."""
    output = AtomicFile(path, mode=mode, durable=durable, temp=temp)
    try:
        yield output.handle
    except BaseException:
        output.discard()
        raise
    output.commit()


def atomic_write(path: str | Path, data: bytes | str, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically; ``durable`` fsyncs the file and its folder (a crash after the
    call returns keeps the new content). A folder at ``path`` is refused with a message, never removed."""
    with atomic_output(path, mode=mode, durable=durable) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def is_inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path``, with every link resolved, lies inside ``root`` (also resolved): the check for any path
    named by a file we read, or reached through a folder someone else could have replaced by a link."""
    resolved, top = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return resolved == top or top in resolved.parents
