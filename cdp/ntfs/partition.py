"""Finding NTFS on a volume: a raw NTFS file system, or NTFS partitions in an MBR
(primary and logical) or GPT partition table (a whole VM disk)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from cdp.ntfs.boot import BootSector
from cdp.ntfs.defs import (
    BOOT_SIGNATURE,
    GPT_ENTRY,
    GPT_HEADER,
    GPT_SIGNATURE,
    MBR_EXTENDED_TYPES,
    MBR_GPT_PROTECTIVE,
    MBR_PARTITION_ENTRY,
)

Reader = Callable[[int, int], bytes]


class Partition(NamedTuple):
    """An NTFS file system at byte *offset* of the volume. *name* is "" for a raw NTFS
    volume, else ``p1``, ``p2``... (the partition's number, as Linux numbers them)."""

    name: str
    offset: int
    size: int


def find_ntfs(read: Reader, size: int) -> list[Partition]:
    """Every NTFS file system on a volume of *size* bytes. Cost: a few sector reads
    (one per partition table entry, and a 16 KiB read for GPT)."""
    if size < 512:
        return []
    s0 = read(0, 512)
    if BootSector.is_ntfs(s0):
        return [Partition("", 0, size)]
    if s0[510:512] != BOOT_SIGNATURE:
        return []
    entries = [MBR_PARTITION_ENTRY.unpack_from(s0, 446 + 16 * i) for i in range(4)]
    if any(e[2] == MBR_GPT_PROTECTIVE for e in entries):
        return _gpt(read, size)
    out: list[Partition] = []
    for i, (_boot, _c1, typ, _c2, lba, count) in enumerate(entries):
        if typ == 0 or count == 0:
            continue
        if typ in MBR_EXTENDED_TYPES:
            out.extend(_logical(read, size, lba * 512))
            continue
        _check(read, size, f"p{i + 1}", lba * 512, count * 512, out)
    return out


def _check(read: Reader, size: int, name: str, off: int, length: int, out: list[Partition]) -> None:
    if off + 512 > size or length < 512:
        return
    if BootSector.is_ntfs(read(off, 512)):
        out.append(Partition(name, off, min(length, size - off)))


def _logical(read: Reader, size: int, ext_off: int) -> list[Partition]:
    """Follow the chain of extended boot records (at most 128 links)."""
    out: list[Partition] = []
    ebr = ext_off
    for n in range(128):
        if ebr + 512 > size:
            break
        s = read(ebr, 512)
        if s[510:512] != BOOT_SIGNATURE:
            break
        _b, _c, typ, _c2, lba, count = MBR_PARTITION_ENTRY.unpack_from(s, 446)
        if typ and count:
            _check(read, size, f"p{5 + n}", ebr + lba * 512, count * 512, out)
        _b, _c, typ2, _c2, lba2, _count2 = MBR_PARTITION_ENTRY.unpack_from(s, 462)
        if not typ2 or not lba2:
            break
        ebr = ext_off + lba2 * 512
    return out


def _gpt(read: Reader, size: int) -> list[Partition]:
    for sector in (512, 4096):
        if 2 * sector > size:
            continue
        h = read(sector, sector)
        if h[:8] != GPT_SIGNATURE:
            continue
        f = GPT_HEADER.unpack_from(h, 0)
        entry_lba, count, esize = f[10], f[11], f[12]
        if esize < GPT_ENTRY.size or count > 1024:
            return []
        table = read(entry_lba * sector, min(count * esize, size - entry_lba * sector))
        out: list[Partition] = []
        for i in range(len(table) // esize):
            typ, _uid, first, last, _attrs, _name = GPT_ENTRY.unpack_from(table, i * esize)
            if typ == bytes(16) or last < first:
                continue
            _check(read, size, f"p{i + 1}", first * sector, (last - first + 1) * sector, out)
        return out
    return []
