"""The one way mimscale replaces a file: a private temporary name, fsync, rename, fsync the folder.

Readers see the old file or the new one, never half of one, and nothing planted at the destination or at a
temporary name is followed: the temporary file is created with ``O_EXCL | O_NOFOLLOW`` and the rename replaces
a symlink at the destination instead of writing through it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

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


def atomic_write(path: str | Path, data: bytes | str, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically; ``durable`` fsyncs the file and its folder (a crash after the
    call returns keeps the new content). A folder at ``path`` is refused with a message, never removed."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(f"{path} is a folder where mimscale writes a file; move it away and run again")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def is_inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path``, with every link resolved, lies inside ``root`` (also resolved): the check for any path
    named by a file we read, or reached through a folder someone else could have replaced by a link."""
    resolved, top = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return resolved == top or top in resolved.parents
