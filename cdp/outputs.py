"""Files cdpd writes for cdpctl (point-in-time images, restored files, exports).

A regular file is written under a temporary name beside it (``.NAME.partial``) and
renamed over it once complete and synced, so nobody sees half of one; a failure removes
the temporary file. Every error names the path (no "internal error: [Errno 2]").
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from cdp.errors import CannotWrite, CdpError, NotFound


def output_error(path: str | os.PathLike[str], exc: OSError) -> CdpError:
    """The CdpError for ``exc`` raised while creating or writing output ``path``: a
    missing directory is NotFound (exit 3); a directory that exists but refuses the file
    (no permission, read-only or pseudo filesystem such as /proc) is CannotWrite (exit 4)
    with the OS's reason; anything else (disk full, I/O error) names the OS's reason."""
    p = Path(path)
    if isinstance(exc, FileNotFoundError) and not p.parent.is_dir():
        return NotFound(f"{p}: directory {p.parent} does not exist")
    if isinstance(exc, FileNotFoundError):  # the directory is there: it takes no new files
        return CannotWrite(f"{p}: cannot create a file in {p.parent} ({exc.strerror}: "
                           "the filesystem there does not take new files)")
    if isinstance(exc, PermissionError) or exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CannotWrite(f"{p}: cannot write in {p.parent}: {exc.strerror or exc}")
    return CdpError(f"{p}: {exc.strerror or exc}")


def open_partial(path: str | os.PathLike[str]) -> tuple[int, Path]:
    """Open the temporary file for regular output ``path``: (fd, its path). Rename it
    over ``path`` with :func:`commit_partial` once written; on failure call
    :func:`discard_partial`. Raises a CdpError naming ``path`` when it cannot."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), tmp
    except OSError as exc:
        raise output_error(out, exc) from None


def write_at(fd: int, data: bytes | memoryview, offset: int,
             path: str | os.PathLike[str]) -> None:
    """``pwrite`` of all of ``data`` to output ``path`` (its errors name the path)."""
    try:
        mv = memoryview(data)
        while mv:
            n = os.pwrite(fd, mv, offset)
            mv, offset = mv[n:], offset + n
    except OSError as exc:
        raise output_error(path, exc) from None


def set_size(fd: int, size: int, path: str | os.PathLike[str]) -> None:
    """``ftruncate`` output ``path`` to ``size`` (sparse; errors name the path)."""
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise output_error(path, exc) from None


def commit_partial(fd: int, tmp: Path, path: str | os.PathLike[str]) -> None:
    """fsync and close ``fd``, then rename ``tmp`` over ``path``. Owns ``fd``: it is
    closed and ``tmp`` removed also when this fails (CdpError naming ``path``)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        discard_partial(fd, tmp)
        raise output_error(path, exc) from None
    try:
        os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise output_error(path, exc) from None


def discard_partial(fd: int, tmp: Path) -> None:
    """Close ``fd`` and remove ``tmp`` (after a failure; never raises)."""
    try:
        os.close(fd)
    except OSError:
        pass
    tmp.unlink(missing_ok=True)
