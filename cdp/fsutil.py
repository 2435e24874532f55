"""Small file-system helpers shared by the store's metadata writers.

``write_file_atomic`` is the one "temp file, fsync, rename, directory fsync" of cdp
(volume.json, markers.json, store.json, retention.json, cdpd.json, the DRL).
``mapengine`` keeps its own (``FileOps.write_atomic``, with fault-injection hooks):
it may not import cdp.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_file_atomic(path: Path, data: bytes, *, size: int | None = None) -> None:
    """Write *path* all or nothing: ``.NAME.tmp`` beside it, fsync, rename over *path*,
    fsync of the directory. *size*: extend the file to that many bytes with a hole
    (``ftruncate``) after *data* (the DRL's zero bitmap). Cost: two fsyncs."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv):]
        if size is not None and size > len(data):
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync directory *path* (makes a rename or unlink in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
