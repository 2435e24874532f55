"""Metadata checksums: crc32c (``metadata_csum``) and crc16 (the older ``gdt_csum``).

The kernel's ``ext4_chksum(seed, data)`` is the raw crc32c register update: no
inversion of the seed nor of the result. The ``crc32c`` package computes the standard
CRC-32C, which inverts both, so ``raw(seed, data) == crc32c(data, ~seed) ^ 0xFFFFFFFF``;
:class:`Csum` keeps the inverted seed so every check is one C call. Cost: about 1 us per
256-byte inode.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

_MASK = 0xFFFFFFFF
_u32 = struct.Struct("<I").pack
_u32x2 = struct.Struct("<II").pack


def crc32c_raw(seed: int, data: bytes | bytearray | memoryview) -> int:
    """The kernel's ``ext4_chksum(seed, data)``."""
    return crc32c(data, seed ^ _MASK) ^ _MASK


class Csum:
    """The checksums of one file system, from its seed (``crc32c(~0, uuid)`` or the
    superblock's ``s_checksum_seed``)."""

    __slots__ = ("seed",)

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @classmethod
    def from_uuid(cls, uuid: bytes) -> Csum:
        return cls(crc32c_raw(_MASK, uuid))

    def inode_seed(self, ino: int, generation: int) -> int:
        """The per-inode seed that inode, extent block and directory block checksums
        start from: ``ext4_chksum(ext4_chksum(seed, inum), generation)``."""
        return crc32c_raw(self.seed, _u32x2(ino, generation))

    def group_desc(self, group: int, desc: bytes | bytearray | memoryview) -> int:
        """``bg_checksum`` of a descriptor (its ``bg_checksum`` bytes already zeroed)."""
        return crc32c_raw(crc32c_raw(self.seed, _u32(group)), desc) & 0xFFFF


def superblock_csum(sb: bytes | bytearray | memoryview) -> int:
    """``s_checksum``: ``ext4_chksum(~0, superblock[0:0x3FC])``."""
    return crc32c(sb[:0x3FC]) ^ _MASK


def _crc16_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC16 = _crc16_table()


def crc16(crc: int, data: bytes | bytearray | memoryview) -> int:
    """CRC-16/ANSI (reflected polynomial 0xA001), as e2fsprogs' ``ext2fs_crc16``.
    Pure Python: only group descriptors use it (a few per group)."""
    t = _CRC16
    for b in bytes(data):
        crc = (crc >> 8) ^ t[(crc ^ b) & 0xFF]
    return crc


def gdt_csum(uuid: bytes, group: int, desc: bytes | bytearray | memoryview) -> int:
    """``bg_checksum`` under ``gdt_csum`` (no ``metadata_csum``): crc16 of the uuid, the
    group number and the descriptor's bytes around its checksum field (*desc* holds
    them without it)."""
    return crc16(crc16(crc16(0xFFFF, uuid), _u32(group)), desc)
