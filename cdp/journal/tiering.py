"""What the S3 tier (``cdp.tier``) needs from the journal: a sealed segment's bytes as
stored, and a segment put back into a journal directory by disaster recovery.

Only ``cdp.journal`` touches segment files; the tier reaches them through these two
calls (and :meth:`cdp.journal.Journal.sealed_segments` / :meth:`~cdp.journal.Journal.open_sealed`).

Design notes
------------
- **A descriptor, not a path.** :class:`SealedFile` holds its own read descriptor, opened
  while the segment is sealed and durable. A compaction that later renames a rewritten
  segment over the name does not change what the descriptor reads, so an upload in a
  worker thread always sends one consistent file (the old one); the tier notices the new
  file by its size/compacted flag and uploads it under a new key.
- **Install checks the header.** :func:`install_segment` refuses a file whose 32-byte
  segment header is damaged or names another first seq, syncs it and renames it into
  place (then syncs the directory), so a recovered journal never holds a half download
  under a segment's name. Recovery at open (``Journal.open``) then scans it as any other
  segment and rebuilds its index sidecar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cdp.errors import Corruption
from cdp.journal.format import SEGMENT_HEADER_SIZE, check_segment_header, segment_name
from cdp.journal.fs import FileLayer


@dataclass
class SealedFile:
    """A sealed, durable segment as stored, open for reading from any thread.

    ``size`` is the file's size when opened (a sealed segment never grows). Close it
    (or use it as a context manager) when done."""

    name: str
    first_seq: int
    last_seq: int
    records: int
    size: int
    compacted: bool
    fd: int
    fs: FileLayer

    def pread(self, offset: int, n: int) -> bytes:
        """Bytes ``[offset, offset + n)`` of the file (short only at its end). Blocking."""
        return self.fs.pread(self.fd, n, offset)

    def read_all(self) -> bytearray:
        """The whole file in one new buffer, read straight into it (no second copy: the
        buffer goes to an upload as it is). Blocking; memory: ``size``. Corruption if the
        file is shorter than ``size``."""
        return self.read_range(0, self.size)

    def read_range(self, offset: int, n: int) -> bytearray:
        """Bytes ``[offset, offset + n)`` in one new buffer, read straight into it.
        Blocking. Corruption if the file ends before."""
        buf = bytearray(n)
        if self.read_into(buf, offset) != n:
            raise Corruption(f"sealed segment {self.name}: shorter than {offset + n} bytes "
                             f"(expected {self.size})")
        return buf

    def read_into(self, buf: bytearray, offset: int) -> int:
        """Fill ``buf`` from ``offset`` (a buffer reused for hashing: no new memory per
        read); the bytes read, fewer only at the file's end. Blocking."""
        return self.fs.pread_into(self.fd, buf, offset)

    def close(self) -> None:
        if self.fd >= 0:
            self.fs.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SealedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def install_segment(directory: str | Path, first_seq: int, src: Path) -> str:
    """Move the downloaded segment file *src* into journal *directory* as the segment
    whose first seq is *first_seq* (its header must say so: Corruption otherwise). The
    file is fsynced before the rename and the directory after. Returns the segment name.
    Blocking; *src* must be on the same file system as *directory*."""
    with open(src, "rb") as f:
        head = f.read(SEGMENT_HEADER_SIZE)
        bad = check_segment_header(head, first_seq)
        if bad is not None:
            raise Corruption(f"{src}: not segment {first_seq}: {bad}")
        os.fsync(f.fileno())
    name = segment_name(first_seq)
    os.makedirs(directory, exist_ok=True)
    os.rename(src, os.path.join(directory, name))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return name
