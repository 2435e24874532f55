"""Inodes: the fixed-size records of the inode tables, and the data kept inline in them.

Design notes
------------
* An inode holds no name (names are in directories); it holds the type and
  permissions, size, link count, four times with nanoseconds (``*_extra``), the flags
  and the 60-byte ``i_block``: an extent tree root, the old direct/indirect block map,
  a fast symlink's target, or the first 60 bytes of inline data.
* "In use" is judged from the inode itself: a non-zero mode and link count. The inode
  bitmap is not read (a deleted inode has ``i_links_count`` 0; an unlinked inode still
  open when the point was taken, on the orphan list, has 0 too and has no name). Group
  descriptors say which part of a table was never initialised (``bg_flags``,
  ``bg_itable_unused``): those inodes are free without being read.
* Hot path: a full index parses every used inode, so :func:`table_chunk` finds the
  candidates of a chunk of table with two numpy compares (mode, links) and
  :func:`inode_parser` returns a closure with the file system's constants bound that
  unpacks an inode in one ``unpack_from`` (+ one for the large-inode fields) and checks
  its crc32c in one C call. About 3-4 us per used inode.
* A damaged inode (checksum mismatch under ``metadata_csum``, a bad ``i_extra_isize``)
  comes back with :attr:`Inode.damaged` set; parsing never raises. An all-zero inode is
  free, checksum or not (as e2fsprogs judges it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
from crc32c import crc32c

from cdp.errors import Corruption
from cdp.ext4.defs import (
    EXT2_GOOD_OLD_INODE_SIZE,
    EXT4_EXTENTS_FL,
    EXT4_HUGE_FILE_FL,
    EXT4_INDEX_FL,
    EXT4_INLINE_DATA_FL,
    EXT4_INLINE_DATA_NAME,
    EXT4_INODE,
    EXT4_INODE_EXTRA,
    EXT4_XATTR_ENTRY,
    EXT4_XATTR_INDEX_SYSTEM,
    EXT4_XATTR_MAGIC,
    EXTRA_ATIME_END,
    EXTRA_CHECKSUM_HI_END,
    EXTRA_CRTIME_END,
    EXTRA_CRTIME_EXTRA_END,
    EXTRA_CTIME_END,
    EXTRA_MTIME_END,
    I_CHECKSUM_HI_OFFSET,
    L_I_CHECKSUM_LO_OFFSET,
    MODE_KIND,
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
)
from cdp.ext4.superblock import Superblock

Buffer = bytes | bytearray | memoryview

_MASK = 0xFFFFFFFF
_NS = 1_000_000_000
_u32 = struct.Struct("<I").unpack_from
_u32x2 = struct.Struct("<II").pack
_xattr_unpack = EXT4_XATTR_ENTRY.unpack_from


class Inode:
    """One parsed inode. Times are ns since the Unix epoch (``crtime`` 0 when the inode
    is too small to hold it); ``blocks`` counts 512-byte sectors (``i_blocks``, in
    file-system blocks for ``HUGE_FILE`` inodes already converted); ``ibody`` holds the
    in-inode extended attribute area of an inline-data inode (else None)."""

    __slots__ = ("atime", "blocks", "crtime", "ctime", "damaged", "dtime", "file_acl", "flags",
                 "generation", "gid", "i_block", "ibody", "links", "mode", "mtime", "number",
                 "size", "uid")

    number: int
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    flags: int
    atime: int
    ctime: int
    mtime: int
    crtime: int
    dtime: int
    generation: int
    blocks: int
    file_acl: int
    i_block: bytes
    ibody: bytes | None
    damaged: str | None

    def __init__(self, number: int) -> None:
        """A free (all-zero) inode."""
        self.number = number
        self.mode = self.uid = self.gid = self.size = self.links = self.flags = 0
        self.atime = self.ctime = self.mtime = self.crtime = self.dtime = 0
        self.generation = self.blocks = self.file_acl = 0
        self.i_block = bytes(60)
        self.ibody = None
        self.damaged = None

    @property
    def in_use(self) -> bool:
        return self.mode != 0 and self.links != 0

    @property
    def kind(self) -> str:
        """"file", "dir", "symlink", "chr", "blk", "fifo", "sock" (or "unknown")."""
        return MODE_KIND.get(self.mode & S_IFMT, "unknown")

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.mode & S_IFMT == S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.mode & S_IFMT == S_IFLNK

    @property
    def has_extents(self) -> bool:
        return bool(self.flags & EXT4_EXTENTS_FL)

    @property
    def has_inline_data(self) -> bool:
        return bool(self.flags & EXT4_INLINE_DATA_FL)

    @property
    def is_htree(self) -> bool:
        """A directory with a hashed index (its first block is the dx root)."""
        return bool(self.flags & EXT4_INDEX_FL)

    @property
    def times(self) -> tuple[int, int, int, int]:
        """(created, modified, changed, accessed) in ns, the catalog's order."""
        return (self.crtime, self.mtime, self.ctime, self.atime)

    def inline_data(self) -> bytes:
        """The bytes of an inline-data inode: ``i_block`` then the ``system.data``
        extended attribute, cut to the size. Raises Corruption."""
        if not self.has_inline_data:
            raise Corruption(f"inode {self.number} has no inline data")
        extra = ibody_xattr(self.ibody or b"", EXT4_XATTR_INDEX_SYSTEM, EXT4_INLINE_DATA_NAME)
        data = self.i_block + (extra or b"")
        if self.size > len(data):
            raise Corruption(f"inode {self.number}: inline data of {len(data)} bytes, size {self.size}")
        return data[: self.size]

    def __repr__(self) -> str:
        dmg = f" damaged: {self.damaged}" if self.damaged else ""
        return (f"Inode({self.number} {self.kind} mode={self.mode:o} size={self.size} "
                f"links={self.links} flags={self.flags:#x}{dmg})")


def ibody_xattr(area: Buffer, index: int, name: bytes) -> bytes | None:
    """The value of extended attribute (*index*, *name*) in an inode's in-inode area
    (after ``i_extra_isize``), or None. Raises Corruption on an entry that runs past
    the area. Cost: O(entries)."""
    n = len(area)
    if n < 4 or _u32(area, 0)[0] != EXT4_XATTR_MAGIC:
        return None
    base = 4  # value offsets count from the first entry
    pos = base
    while pos + 4 <= n and _u32(area, pos)[0] != 0:
        if pos + EXT4_XATTR_ENTRY.size > n:
            raise Corruption("in-inode xattr entry runs past the inode")
        name_len, name_index, value_offs, value_inum, value_size, _hash = _xattr_unpack(area, pos)
        npos = pos + EXT4_XATTR_ENTRY.size
        if npos + name_len > n:
            raise Corruption("in-inode xattr name runs past the inode")
        if name_index == index and bytes(area[npos : npos + name_len]) == name:
            if value_inum:
                raise Corruption("in-inode xattr value stored in an EA inode")
            if base + value_offs + value_size > n:
                raise Corruption("in-inode xattr value runs past the inode")
            return bytes(area[base + value_offs : base + value_offs + value_size])
        pos = npos + ((name_len + 3) & ~3)
    return None


def inode_parser(sb: Superblock) -> Callable[[Buffer, int, int], Inode]:
    """A function ``parse(buf, pos, number) -> Inode`` for the inodes of this file
    system (the inode's ``inode_size`` bytes start at ``buf[pos]``). Never raises for bad
    content: see :attr:`Inode.damaged`."""
    isz = sb.inode_size
    large = isz > EXT2_GOOD_OLD_INODE_SIZE
    csum = sb.csum()
    seed_inv = (csum.seed ^ _MASK) if csum is not None else None
    huge = sb.huge_file
    wide_acl = sb.is_64bit
    sectors_per_block = sb.block_size // 512
    unpack = EXT4_INODE.unpack_from
    unpack_extra = EXT4_INODE_EXTRA.unpack_from
    zero = bytes(isz)
    new = Inode.__new__
    inline_fl = EXT4_INLINE_DATA_FL

    def parse(buf: Buffer, pos: int, number: int) -> Inode:
        (mode, uid, size_lo, atime, ctime, mtime, dtime, gid, links, blocks_lo, flags, _ver,
         i_block, gen, acl_lo, size_hi, _faddr, blocks_hi, acl_hi, uid_hi, gid_hi, csum_lo,
         _res) = unpack(buf, pos)
        ino = new(Inode)
        ino.number = number
        ino.mode = mode
        ino.uid = uid | uid_hi << 16
        ino.gid = gid | gid_hi << 16
        ino.size = size_lo | size_hi << 32
        ino.links = links
        ino.flags = flags
        ino.dtime = dtime
        ino.generation = gen
        ino.i_block = i_block
        ino.ibody = None
        ino.damaged = None
        ino.file_acl = acl_lo | (acl_hi << 32 if wide_acl else 0)
        if huge:
            blocks = blocks_lo | blocks_hi << 32
            ino.blocks = blocks * sectors_per_block if flags & EXT4_HUGE_FILE_FL else blocks
        else:
            ino.blocks = blocks_lo
        eis = 0
        if large:
            (eis, csum_hi, ctime_x, mtime_x, atime_x, crtime, crtime_x, _vh, _proj) = unpack_extra(buf, pos + 128)
            if 128 + eis > isz or eis & 3:
                ino.damaged = f"i_extra_isize {eis} does not fit the inode"
                eis = 0
        # times: signed 32-bit seconds, + two epoch bits and the ns from the *_extra field
        if eis >= EXTRA_CTIME_END:
            ino.ctime = ((ctime - ((ctime & 0x80000000) << 1) + ((ctime_x & 3) << 32)) * _NS
                         + (ctime_x >> 2))
        else:
            ino.ctime = (ctime - ((ctime & 0x80000000) << 1)) * _NS
        if eis >= EXTRA_MTIME_END:
            ino.mtime = ((mtime - ((mtime & 0x80000000) << 1) + ((mtime_x & 3) << 32)) * _NS
                         + (mtime_x >> 2))
        else:
            ino.mtime = (mtime - ((mtime & 0x80000000) << 1)) * _NS
        if eis >= EXTRA_ATIME_END:
            ino.atime = ((atime - ((atime & 0x80000000) << 1) + ((atime_x & 3) << 32)) * _NS
                         + (atime_x >> 2))
        else:
            ino.atime = (atime - ((atime & 0x80000000) << 1)) * _NS
        if eis >= EXTRA_CRTIME_EXTRA_END:
            ino.crtime = ((crtime - ((crtime & 0x80000000) << 1) + ((crtime_x & 3) << 32)) * _NS
                          + (crtime_x >> 2))
        elif eis >= EXTRA_CRTIME_END:
            ino.crtime = (crtime - ((crtime & 0x80000000) << 1)) * _NS
        else:
            ino.crtime = 0
        if flags & inline_fl and large:
            ino.ibody = bytes(buf[pos + 128 + eis : pos + isz])
        if seed_inv is not None:
            raw = buf[pos : pos + isz]
            if raw != zero:
                data = bytearray(raw)
                data[L_I_CHECKSUM_LO_OFFSET : L_I_CHECKSUM_LO_OFFSET + 2] = b"\0\0"
                if eis >= EXTRA_CHECKSUM_HI_END:
                    data[I_CHECKSUM_HI_OFFSET : I_CHECKSUM_HI_OFFSET + 2] = b"\0\0"
                    want = csum_lo | csum_hi << 16
                    got = crc32c(data, crc32c(_u32x2(number, gen), seed_inv)) ^ _MASK
                else:
                    want = csum_lo
                    got = (crc32c(data, crc32c(_u32x2(number, gen), seed_inv)) ^ _MASK) & 0xFFFF
                if got != want and ino.damaged is None:
                    ino.damaged = "inode checksum mismatch"
        return ino

    return parse


def table_chunk(buf: bytes, first: int, inode_size: int,
                parse: Callable[[Buffer, int, int], Inode]) -> list[Inode]:
    """The inodes of a chunk of inode table (``len(buf)`` a multiple of the inode size,
    the first numbered *first*) that look used (non-zero mode and link count). Cost:
    O(len(buf)) numpy work + one :func:`inode_parser` call per candidate."""
    n = len(buf) // inode_size
    if n == 0:
        return []
    u16 = np.frombuffer(buf, dtype="<u2", count=n * inode_size // 2).reshape(n, inode_size // 2)
    idx = np.nonzero((u16[:, 0] != 0) & (u16[:, 13] != 0))[0].tolist()  # i_mode, i_links_count
    return [parse(buf, i * inode_size, first + i) for i in idx]
