"""Partition tables: where the file systems of a whole disk start.

A volume may hold one file system on the whole disk, or partitions in an MBR (primary,
and logical ones in the chain of extended boot records) or a GPT. :func:`find_filesystems`
walks the table and asks a *probe* of each file-system kind (NTFS, ext4...) whether a
partition holds it; the partition table code knows no file system. Cost: a few sector
reads (one per table entry and per probe, and a 16 KiB read for GPT).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import NamedTuple

Reader = Callable[[int, int], bytes]
#: probe(read, offset, length) -> True when a file system of its kind starts at *offset*
Probe = Callable[[Reader, int, int], bool]

# ---------------------------------------------------------------- MBR
MBR_SIGNATURE = b"\x55\xaa"  # at offset 510 of an MBR or an extended boot record
MBR_PARTITION_ENTRY = struct.Struct("<B3sB3sII")  # BootIndicator CHS Type CHS StartLba Sectors
MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
MBR_GPT_PROTECTIVE = 0xEE
# ---------------------------------------------------------------- GPT
# GPT header: Signature Revision HeaderSize HeaderCRC32 Reserved MyLBA AlternateLBA
# FirstUsableLBA LastUsableLBA DiskGUID PartitionEntryLBA NumberOfPartitionEntries
# SizeOfPartitionEntry PartitionEntryArrayCRC32
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_SIGNATURE = b"EFI PART"
# GPT entry: PartitionTypeGUID UniquePartitionGUID StartingLBA EndingLBA Attributes Name
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")


class Partition(NamedTuple):
    """A file system at byte *offset* of the volume. *name* is "" for a file system on
    the whole volume, else ``p1``, ``p2``... (the partition's number, as Linux numbers
    them)."""

    name: str
    offset: int
    size: int


def find_filesystems(read: Reader, size: int, probe: Probe) -> list[Partition]:
    """Every file system *probe* recognises on a volume of *size* bytes: the whole
    volume first, else the partitions of its MBR or GPT."""
    if size < 512:
        return []
    if probe(read, 0, size):
        return [Partition("", 0, size)]
    s0 = read(0, 512)
    if s0[510:512] != MBR_SIGNATURE:
        return []
    entries = [MBR_PARTITION_ENTRY.unpack_from(s0, 446 + 16 * i) for i in range(4)]
    if any(e[2] == MBR_GPT_PROTECTIVE for e in entries):
        return _gpt(read, size, probe)
    out: list[Partition] = []
    for i, (_boot, _c1, typ, _c2, lba, count) in enumerate(entries):
        if typ == 0 or count == 0:
            continue
        if typ in MBR_EXTENDED_TYPES:
            out.extend(_logical(read, size, lba * 512, probe))
            continue
        _check(read, size, f"p{i + 1}", lba * 512, count * 512, probe, out)
    return out


def find_kinds(read: Reader, size: int, probes: Mapping[str, Probe]) -> list[tuple[str, Partition]]:
    """Every file system one of *probes* (by kind: ``{"ntfs": probe, "ext": probe}``)
    recognises, as ``(kind, partition)`` in table order; the first probe that answers
    names the kind. Cost: as :func:`find_filesystems`, times the probes asked."""
    kinds: dict[int, str] = {}

    def probe(r: Reader, offset: int, length: int) -> bool:
        for kind, p in probes.items():
            if p(r, offset, length):
                kinds[offset] = kind
                return True
        return False

    return [(kinds[p.offset], p) for p in find_filesystems(read, size, probe)]


def _check(read: Reader, size: int, name: str, off: int, length: int, probe: Probe,
           out: list[Partition]) -> None:
    if off + 512 > size or length < 512:
        return
    length = min(length, size - off)
    if probe(read, off, length):
        out.append(Partition(name, off, length))


def _logical(read: Reader, size: int, ext_off: int, probe: Probe) -> list[Partition]:
    """Follow the chain of extended boot records (at most 128 links)."""
    out: list[Partition] = []
    ebr = ext_off
    for n in range(128):
        if ebr + 512 > size:
            break
        s = read(ebr, 512)
        if s[510:512] != MBR_SIGNATURE:
            break
        _b, _c, typ, _c2, lba, count = MBR_PARTITION_ENTRY.unpack_from(s, 446)
        if typ and count:
            _check(read, size, f"p{5 + n}", ebr + lba * 512, count * 512, probe, out)
        _b, _c, typ2, _c2, lba2, _count2 = MBR_PARTITION_ENTRY.unpack_from(s, 462)
        if not typ2 or not lba2:
            break
        ebr = ext_off + lba2 * 512
    return out


def _gpt(read: Reader, size: int, probe: Probe) -> list[Partition]:
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
        table = read(entry_lba * sector, min(count * esize, max(size - entry_lba * sector, 0)))
        out: list[Partition] = []
        for i in range(len(table) // esize):
            typ, _uid, first, last, _attrs, _name = GPT_ENTRY.unpack_from(table, i * esize)
            if typ == bytes(16) or last < first:
                continue
            _check(read, size, f"p{i + 1}", first * sector, (last - first + 1) * sector, probe, out)
        return out
    return []
