"""Finding ext2/3/4 on a volume: a file system on the whole disk, or in the partitions
of an MBR (primary and logical) or GPT (the tables are walked by :mod:`cdp.partition`)."""

from __future__ import annotations

from cdp.ext4.fs import is_ext
from cdp.partition import Partition, Reader, find_filesystems


def find_ext4(read: Reader, size: int) -> list[Partition]:
    """Every ext2/3/4 file system on a volume of *size* bytes (``name`` "" for the whole
    volume, else ``p1``, ``p2``...). Cost: a few sector reads."""
    return find_filesystems(read, size, is_ext)


__all__ = ["Partition", "find_ext4"]
