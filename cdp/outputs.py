"""Files cdpd writes for cdpctl (point-in-time images, restored files, exports).

A regular file is written under a temporary name beside it (``.NAME.partial``) and
renamed over it once complete and synced, so nobody sees half of one; a failure removes
the temporary file. Every error names the path (no "internal error: [Errno 2]").
Reads that meet damaged journal records can be salvaged (:func:`salvage_read`) and
their damage recorded in a :class:`DamageMap` (``--on-error zero``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cdp.errors import CannotWrite, CdpError, Corruption, NotFound, UsageError


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


# ---------------------------------------------------------------------------- damage

#: ``--on-error`` choices of image and restore: ``stop`` (the default) ends the command
#: at the first damaged piece; ``zero`` writes zeros for it and goes on; ``skip-file``
#: (restore) leaves the file unwritten. Every damaged range is reported either way.
ON_ERROR = ("stop", "zero", "skip-file")

#: the unit a damaged read is retried in to find exactly what is lost: the journal's
#: 4 KiB granule (a version 3 record checks each granule of a raw chunk on its own)
SALVAGE_GRAIN = 4096


def on_error_arg(args: dict[str, Any], allowed: tuple[str, ...]) -> str:
    """The ``on_error`` argument of an operation (default ``stop``), one of *allowed*
    (UsageError otherwise)."""
    v = str(args.get("on_error") or "stop")
    if v not in allowed:
        raise UsageError(f"--on-error {v}: choose one of {', '.join(allowed)}"
                         + (" (skip-file is for restore)" if v == "skip-file" else ""))
    return v


class DamageMap:
    """Damaged byte ranges of one output, kept merged in order (as ddrescue's map):
    ``[{"offset", "length", "source_offset", "reason"}]`` where ``offset`` is in the
    output and ``source_offset`` in the volume. Cost: O(1) per range added in order."""

    def __init__(self) -> None:
        self.ranges: list[dict[str, Any]] = []

    def add(self, offset: int, length: int, source_offset: int, reason: str) -> None:
        last = self.ranges[-1] if self.ranges else None
        if (last is not None and last["offset"] + last["length"] == offset
                and last["source_offset"] + last["length"] == source_offset
                and last["reason"] == reason):
            last["length"] += length
        else:
            self.ranges.append({"offset": offset, "length": length,
                                "source_offset": source_offset, "reason": reason})

    @property
    def bytes(self) -> int:
        return sum(r["length"] for r in self.ranges)


def salvage_read(read: Callable[[int, int], bytes], offset: int, length: int, out_offset: int,
                 damage: DamageMap, grain: int = SALVAGE_GRAIN) -> bytes:
    """``read(offset, length)``, or when it raises Corruption, the same bytes read again
    a *grain* at a time with each piece that still fails zeroed and added to *damage*
    (at output offset ``out_offset`` + its place). Cost: one read when nothing is
    damaged; else one per grain of the range."""
    try:
        return read(offset, length)
    except Corruption:
        pass
    buf = bytearray(length)
    pos = offset
    end = offset + length
    while pos < end:
        step = min(grain - pos % grain, end - pos)
        try:
            buf[pos - offset : pos - offset + step] = read(pos, step)
        except Corruption as e:
            damage.add(out_offset + pos - offset, step, pos, str(e))
        pos += step
    return bytes(buf)
