"""The dirty region log (DRL) of a proxy-mode volume: one bit per region of the primary.

A region is *dirty* while the primary and the journal may disagree about it: the bit is
set (and made durable) before the first write into a clean region is started on either
side, and cleared lazily once both sides are durable and nothing is in flight there.
After a crash only dirty regions need to be compared (see docs/PROXY.md).

File ``STORE/volumes/NAME/drl`` (format in docs/FORMATS.md ("Store layout"), "drl")::

    0     8  magic  b"CDPDRL\\x00\\x01"
    8     4  version (u32, little endian) = 1
    12    4  CRC32C of the 4096-byte header with this field zeroed
    16    8  region_bytes (a power of two)
    24    8  volume_bytes
    32    8  regions = ceil(volume_bytes / region_bytes)
    40    8  copy_next: regions below it hold their initial copy (== regions: done)
    48    8  rewind_from: 0, or the head seq before a rewind whose primary rewrite
             has not finished yet
    56 .. 4096  zero
    4096 ..  bitmap: bit i (byte i // 8, bit i % 8, LSB first) = region i dirty,
             padded with zero bytes to a multiple of 4096

The bitmap has no checksum on purpose: it is written in whole 4 KiB pages, a bit is only
set by a write that is fdatasync'd before any data moves, and a torn page can at worst
leave bits set (more regions compared after a crash), never cleared ones that matter.
A header with a bad CRC is treated as "everything dirty, initial copy from the start".

Blocking file I/O: callers run :meth:`DirtyRegionLog.write` in a worker thread.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

from crc32c import crc32c

from cdp.errors import Corruption, UsageError
from cdp.fsutil import write_file_atomic

MAGIC = b"CDPDRL\x00\x01"
VERSION = 1
PAGE = 4096
HEADER = struct.Struct("<8sII QQQQQ")  # magic, version, crc, region, volume, regions, copy_next, rewind_from
DEFAULT_REGION = 1 << 20
MIN_REGION = 4096
MAX_REGION = 1 << 30


def check_region_bytes(n: int) -> int:
    if not MIN_REGION <= n <= MAX_REGION or n & (n - 1):
        raise UsageError(
            f"DRL region must be a power of two from 4KiB to 1GiB, got {n} bytes"
        )
    return n


class DirtyRegionLog:
    """In-memory bitmap + its file. Not thread-safe: mutate on one thread; hand the
    result of :meth:`pending_pages` to :meth:`write` (which may run in a worker)."""

    def __init__(self, path: Path, fd: int, region_bytes: int, volume_bytes: int,
                 copy_next: int, rewind_from: int, bitmap: bytearray) -> None:
        self.path = path
        self._fd = fd
        self.region_bytes = region_bytes
        self.shift = region_bytes.bit_length() - 1
        self.volume_bytes = volume_bytes
        self.regions = -(-volume_bytes // region_bytes)
        self.copy_next = copy_next
        self.rewind_from = rewind_from
        self._bits = bitmap
        self._dirty: set[int] = {
            i for i in range(self.regions) if bitmap[i >> 3] >> (i & 7) & 1
        } if any(bitmap) else set()
        self._changed_pages: set[int] = set()
        self._header_changed = False
        #: True when the header was unreadable at open (everything was marked dirty)
        self.header_damaged = False

    # ------------------------------------------------------------------ files

    @classmethod
    def create(cls, path: Path, volume_bytes: int, region_bytes: int = DEFAULT_REGION,
               *, copy_next: int = 0) -> DirtyRegionLog:
        """Write a new all-clean DRL (fsync'd, directory fsync'd)."""
        check_region_bytes(region_bytes)
        if volume_bytes <= 0:
            raise UsageError("volume size must be positive")
        regions = -(-volume_bytes // region_bytes)
        header = _pack_header(region_bytes, volume_bytes, regions, min(copy_next, regions), 0)
        write_file_atomic(path, header, size=PAGE + _bitmap_bytes(regions))  # bitmap: a hole
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> DirtyRegionLog:
        fd = os.open(path, os.O_RDWR)
        try:
            head = os.pread(fd, PAGE, 0)
            if len(head) < HEADER.size or head[:8] != MAGIC:
                raise Corruption(f"{path}: not a dirty region log")
            _magic, version, crc, region, volume, regions, copy_next, rewind_from = \
                HEADER.unpack_from(head)
            if version != VERSION:
                raise Corruption(f"{path}: unsupported DRL version {version}")
            damaged = len(head) < PAGE or crc != _header_crc(head)
            if damaged:
                # sizes are needed to go on: take them only if they are self-consistent
                if region < MIN_REGION or region & (region - 1) or regions != -(-volume // region):
                    raise Corruption(f"{path}: DRL header damaged beyond repair")
                copy_next, rewind_from = 0, 0
            nbytes = _bitmap_bytes(regions)
            bitmap = bytearray(os.pread(fd, nbytes, PAGE))
            if len(bitmap) < nbytes:
                bitmap += bytes(nbytes - len(bitmap))
        except BaseException:
            os.close(fd)
            raise
        drl = cls(path, fd, region, volume, min(copy_next, regions), rewind_from, bitmap)
        if damaged:
            drl.header_damaged = True
            drl.mark(range(drl.regions))
            drl._header_changed = True
        return drl

    def pending_pages(self) -> list[tuple[int, bytes]]:
        """Snapshot (file offset, bytes) of every page changed since the last call."""
        out: list[tuple[int, bytes]] = []
        if self._header_changed:
            self._header_changed = False
            out.append((0, _pack_header(self.region_bytes, self.volume_bytes, self.regions,
                                        self.copy_next, self.rewind_from)))
        for p in sorted(self._changed_pages):
            out.append((PAGE + p * PAGE, bytes(self._bits[p * PAGE : (p + 1) * PAGE])))
        self._changed_pages.clear()
        return out

    def write(self, pages: list[tuple[int, bytes]]) -> None:
        """pwrite the pages and fdatasync (blocking; fine in a worker thread)."""
        if not pages:
            return
        for off, data in pages:
            os.pwrite(self._fd, data, off)
        os.fdatasync(self._fd)

    def sync(self) -> None:
        """Write every pending change and fdatasync (blocking)."""
        self.write(self.pending_pages())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------ bits

    def regions_of(self, offset: int, length: int) -> range:
        """Indices of the regions [offset, offset+length) touches (empty for length 0)."""
        if length <= 0:
            return range(0)
        return range(offset >> self.shift, ((offset + length - 1) >> self.shift) + 1)

    def region_range(self, i: int) -> tuple[int, int]:
        start = i << self.shift
        return start, min(start + self.region_bytes, self.volume_bytes)

    def is_dirty(self, i: int) -> bool:
        return i in self._dirty

    def all_dirty(self, indices: range) -> bool:
        """True when every region of *indices* is dirty (in memory). O(len)."""
        return self._dirty.issuperset(indices)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def dirty(self) -> list[int]:
        return sorted(self._dirty)

    def mark(self, indices: Iterable[int]) -> list[int]:
        """Set bits; returns the indices that were clean."""
        new = []
        for i in indices:
            if i not in self._dirty:
                self._dirty.add(i)
                self._bits[i >> 3] |= 1 << (i & 7)
                self._changed_pages.add(i >> 15)
                new.append(i)
        return new

    def clear(self, indices: Iterable[int]) -> int:
        n = 0
        for i in indices:
            if i in self._dirty:
                self._dirty.discard(i)
                self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                self._changed_pages.add(i >> 15)
                n += 1
        return n

    def set_copy_next(self, n: int) -> None:
        n = min(n, self.regions)
        if n != self.copy_next:
            self.copy_next = n
            self._header_changed = True

    def set_rewind_from(self, seq: int) -> None:
        if seq != self.rewind_from:
            self.rewind_from = seq
            self._header_changed = True

    def to_dict(self) -> dict[str, int | bool]:
        return {
            "region_bytes": self.region_bytes,
            "regions": self.regions,
            "dirty_regions": self.dirty_count,
            "copy_next": self.copy_next,
            "rewind_from": self.rewind_from,
        }


def read_drl(path: Path) -> dict[str, object]:
    """An offline look at a DRL file: header fields and the dirty region indices."""
    drl = DirtyRegionLog.open(path)
    try:
        d: dict[str, object] = dict(drl.to_dict())
        d["dirty"] = drl.dirty()
        d["header_damaged"] = drl.header_damaged
        return d
    finally:
        drl.close()


def _bitmap_bytes(regions: int) -> int:
    n = (regions + 7) // 8
    return -(-n // PAGE) * PAGE


def _pack_header(region: int, volume: int, regions: int, copy_next: int, rewind_from: int) -> bytes:
    buf = bytearray(PAGE)
    HEADER.pack_into(buf, 0, MAGIC, VERSION, 0, region, volume, regions, copy_next, rewind_from)
    struct.pack_into("<I", buf, 12, crc32c(bytes(buf)))
    return bytes(buf)


def _header_crc(head: bytes) -> int:
    b = bytearray(head[:PAGE])
    b[12:16] = b"\0\0\0\0"
    return crc32c(bytes(b))
