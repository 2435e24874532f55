"""Finding NTFS on a volume: a raw NTFS file system, or NTFS partitions in an MBR
(primary and logical) or GPT partition table (a whole VM disk). The tables are walked by
:mod:`cdp.partition`; this module only recognises NTFS."""

from __future__ import annotations

from cdp.ntfs.boot import BootSector
from cdp.partition import Partition, Reader, find_filesystems


def _is_ntfs(read: Reader, offset: int, length: int) -> bool:
    return BootSector.is_ntfs(read(offset, 512))


def find_ntfs(read: Reader, size: int) -> list[Partition]:
    """Every NTFS file system on a volume of *size* bytes. Cost: a few sector reads
    (one per partition table entry, and a 16 KiB read for GPT)."""
    return find_filesystems(read, size, _is_ntfs)


__all__ = ["Partition", "find_ntfs"]
