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
* Hot path: a full index parses every used inode, so :func:`table_parser` finds the
  candidates of a chunk of table with two numpy compares (mode, links), decodes their
  fields column-wise with numpy and checks each crc32c with one C call: about 1.5 us per
  used inode. :func:`inode_parser` (one inode at a time: ``unpack_from`` and a closure
  with the file system's constants bound) serves single reads and the marker diff.
* A damaged inode (checksum mismatch under ``metadata_csum``, a bad ``i_extra_isize``)
  comes back with :attr:`Inode.damaged` set; parsing never raises. An all-zero inode is
  free, checksum or not (as e2fsprogs judges it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

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
    I_BLOCK_OFFSET,
    I_BLOCK_SIZE,
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
#: Inode.damaged of an inode whose crc32c does not match (metadata_csum)
CHECKSUM_MISMATCH = "inode checksum mismatch"


class Inode(NamedTuple):
    """One parsed inode (immutable). Times are ns since the Unix epoch (``crtime`` 0
    when the inode is too small to hold it); ``blocks`` counts 512-byte sectors
    (``i_blocks``; for ``HUGE_FILE`` inodes converted from file-system blocks); ``ibody``
    holds the in-inode extended attribute area of an inline-data inode (else None).
    ``Inode(number)`` is a free (all-zero) inode. A tuple, so that the full scan builds
    each one with a single C call."""

    number: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    links: int = 0
    flags: int = 0
    atime: int = 0
    ctime: int = 0
    mtime: int = 0
    crtime: int = 0
    dtime: int = 0
    generation: int = 0
    blocks: int = 0
    file_acl: int = 0
    i_block: bytes = bytes(I_BLOCK_SIZE)
    ibody: bytes | None = None
    damaged: str | None = None

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
    tnew = tuple.__new__
    inline_fl = EXT4_INLINE_DATA_FL

    def parse(buf: Buffer, pos: int, number: int) -> Inode:
        (mode, uid, size_lo, atime, ctime, mtime, dtime, gid, links, blocks_lo, flags, _ver,
         i_block, gen, acl_lo, size_hi, _faddr, blocks_hi, acl_hi, uid_hi, gid_hi, csum_lo,
         _res) = unpack(buf, pos)
        damaged = None
        if huge:
            blocks = blocks_lo | blocks_hi << 32
            if flags & EXT4_HUGE_FILE_FL:
                blocks *= sectors_per_block
        else:
            blocks = blocks_lo
        eis = 0
        if large:
            (eis, csum_hi, ctime_x, mtime_x, atime_x, crtime, crtime_x, _vh, _proj) = unpack_extra(buf, pos + 128)
            if 128 + eis > isz or eis & 3:
                damaged = f"i_extra_isize {eis} does not fit the inode"
                eis = 0
        # times: signed 32-bit seconds, + two epoch bits and the ns from the *_extra field
        ctime = ctime - ((ctime & 0x80000000) << 1)
        mtime = mtime - ((mtime & 0x80000000) << 1)
        atime = atime - ((atime & 0x80000000) << 1)
        if eis >= EXTRA_CTIME_END:
            ctime = (ctime + ((ctime_x & 3) << 32)) * _NS + (ctime_x >> 2)
        else:
            ctime *= _NS
        if eis >= EXTRA_MTIME_END:
            mtime = (mtime + ((mtime_x & 3) << 32)) * _NS + (mtime_x >> 2)
        else:
            mtime *= _NS
        if eis >= EXTRA_ATIME_END:
            atime = (atime + ((atime_x & 3) << 32)) * _NS + (atime_x >> 2)
        else:
            atime *= _NS
        if eis >= EXTRA_CRTIME_END:
            crtime = crtime - ((crtime & 0x80000000) << 1)
            if eis >= EXTRA_CRTIME_EXTRA_END:
                crtime = (crtime + ((crtime_x & 3) << 32)) * _NS + (crtime_x >> 2)
            else:
                crtime *= _NS
        else:
            crtime = 0
        ibody = bytes(buf[pos + 128 + eis : pos + isz]) if flags & inline_fl and large else None
        if seed_inv is not None and damaged is None:
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
                if got != want:
                    damaged = CHECKSUM_MISMATCH
        return tnew(Inode, (
            number, mode, uid | uid_hi << 16, gid | gid_hi << 16, size_lo | size_hi << 32, links,
            flags, atime, ctime, mtime, crtime, dtime, gen, blocks,
            acl_lo | (acl_hi << 32 if wide_acl else 0), i_block, ibody, damaged))

    return parse


#: the numpy columns of a chunk of used inodes (:func:`table_parser`'s *columns*): one
#: int64 array per :class:`Inode` field from ``number`` to ``file_acl`` (``size``:
#: uint64), index-aligned with the chunk's inodes
InodeColumns = tuple[np.ndarray, ...]


def table_parser(sb: Superblock) -> Callable[[bytes, int, list[InodeColumns | None] | None], list[Inode]]:
    """A function ``parse_table(buf, first, columns=None) -> [Inode]`` for chunks of
    inode table (``len(buf)`` a multiple of the inode size, the first inode numbered
    *first*): the inodes that look used (non-zero mode and link count), decoded
    column-wise with numpy and built as tuples in one pass; the rare inode numpy cannot
    decode exactly (a bad ``i_extra_isize``, times past 2174) goes through
    :func:`inode_parser`. Same results as :func:`inode_parser`. With a *columns* list,
    the chunk's numpy columns (:data:`InodeColumns`, every used inode; the slow inodes'
    values set from their tuples) are appended to it, or None when a slow inode's value
    does not fit its column, and only the inodes a reader of the columns needs whole are
    returned as tuples: directories, symlinks, inline-data inodes, damaged ones and the
    slow ones (a None in *columns*: its chunk's other inodes are in neither). Cost:
    O(len(buf)) numpy work + ~1 us of Python per used inode (mostly its crc32c call; with
    columns, ~0.5 us less per inode not returned)."""
    one = inode_parser(sb)
    isz = sb.inode_size
    large = isz > EXT2_GOOD_OLD_INODE_SIZE
    csum = sb.csum()
    seed_inv = (csum.seed ^ _MASK) if csum is not None else None
    huge = sb.huge_file
    wide_acl = sb.is_64bit
    sectors_per_block = sb.block_size // 512
    tnew = tuple.__new__

    def parse_table(buf: bytes, first: int, columns: list[InodeColumns | None] | None = None) -> list[Inode]:
        n = len(buf) // isz
        if n == 0:
            return []
        u8 = np.frombuffer(buf, dtype=np.uint8, count=n * isz).reshape(n, isz)
        all16 = u8.view("<u2")
        cand = np.nonzero((all16[:, 0] != 0) & (all16[:, 13] != 0))[0]  # i_mode, i_links_count
        k = len(cand)
        if k == 0:
            return []
        rows = u8[cand]
        r16 = rows.view("<u2")
        r32 = rows.view("<u4")

        def c16(i: int) -> np.ndarray:
            return r16[:, i].astype(np.int64)

        def c32(i: int) -> np.ndarray:
            return r32[:, i].astype(np.int64)

        numbers = cand.astype(np.int64) + first
        slow = np.zeros(k, dtype=bool)
        if large:
            eis = c16(64)  # i_extra_isize
            bad = (eis > isz - 128) | (eis & 3 != 0)
            slow |= bad
            eis[bad] = 0
        else:
            eis = np.zeros(k, dtype=np.int64)

        def ns(lo: int, hi: int, end: int) -> np.ndarray:
            sec = c32(lo)
            sec -= (sec & 0x80000000) << 1
            if not large:
                return sec * _NS
            x = c32(hi)
            has = eis >= end
            epoch = np.where(has, x & 3, 0)
            slow[epoch >= 2] = True  # past 2174: beyond int64 nanoseconds
            out: np.ndarray = (sec + (epoch << 32)) * _NS + np.where(has, x >> 2, 0)
            return out

        atime = ns(2, 35, EXTRA_ATIME_END)  # i_atime, i_atime_extra (in 32-bit words)
        ctime = ns(3, 33, EXTRA_CTIME_END)
        mtime = ns(4, 34, EXTRA_MTIME_END)
        if large:
            crtime = np.where(eis >= EXTRA_CRTIME_END, ns(36, 37, EXTRA_CRTIME_EXTRA_END), 0)
        else:
            crtime = np.zeros(k, dtype=np.int64)
        flags = c32(8)
        blocks = c32(7)  # i_blocks_lo
        if huge:
            blocks |= c16(58) << 32  # l_i_blocks_high
            blocks = np.where(flags & EXT4_HUGE_FILE_FL != 0, blocks * sectors_per_block, blocks)
        acl = c32(26)
        if wide_acl:
            acl |= c16(59) << 32
        generation = c32(25)
        if seed_inv is not None:
            # crc32c over (inode number, generation, the inode with its checksum zeroed)
            ng = np.empty((k, 2), dtype="<u4")
            ng[:, 0] = numbers
            ng[:, 1] = generation
            data = np.concatenate([ng.view(np.uint8), rows], axis=1)
            data[:, 8 + L_I_CHECKSUM_LO_OFFSET : 8 + L_I_CHECKSUM_LO_OFFSET + 2] = 0
            hi = eis >= EXTRA_CHECKSUM_HI_END
            data[hi, 8 + I_CHECKSUM_HI_OFFSET : 8 + I_CHECKSUM_HI_OFFSET + 2] = 0
            want = c16(62) | (np.where(hi, c16(65) << 16, 0) if large else 0)  # lo | hi << 16
            mv = memoryview(data.tobytes())
            width = 8 + isz
            got = np.array([crc32c(mv[o : o + width], seed_inv) for o in range(0, k * width, width)],
                           dtype=np.int64)
            bad_csum = ((got ^ _MASK) & np.where(hi, _MASK, 0xFFFF)) != want
        else:
            bad_csum = np.zeros(k, dtype=bool)
        # i_size_lo | i_size_high << 32 needs all 64 bits: unsigned
        size = r32[:, 1].astype(np.uint64) | r32[:, 27].astype(np.uint64) << np.uint64(32)
        mode = c16(0)
        cols = (numbers, mode, c16(1) | c16(60) << 16, c16(12) | c16(61) << 16, size, c16(13),
                flags, atime, ctime, mtime, crtime, c32(5), generation, blocks, acl)
        sel = None  # the rows built as tuples: all, or (with columns) the located and odd ones
        if columns is not None:
            kind = mode & S_IFMT
            sel = np.nonzero(slow | bad_csum | (kind == S_IFDIR) | (kind == S_IFLNK)
                             | (flags & EXT4_INLINE_DATA_FL != 0))[0]
            rows = rows[sel]
        m = k if sel is None else len(sel)
        blob = rows[:, I_BLOCK_OFFSET : I_BLOCK_OFFSET + I_BLOCK_SIZE].tobytes()
        i_blocks = [blob[o : o + I_BLOCK_SIZE] for o in range(0, m * I_BLOCK_SIZE, I_BLOCK_SIZE)]
        damaged: list[str | None] = [CHECKSUM_MISMATCH if b else None for b in (
            bad_csum if sel is None else bad_csum[sel]).tolist()]
        ibody: list[bytes | None] = [None] * m
        if large:
            for j in np.nonzero((flags if sel is None else flags[sel]) & EXT4_INLINE_DATA_FL)[0].tolist():
                r = j if sel is None else int(sel[j])
                pos = int(cand[r]) * isz
                ibody[j] = bytes(buf[pos + 128 + int(eis[r]) : pos + isz])
        out = [tnew(Inode, t) for t in zip(*[(c if sel is None else c[sel]).tolist() for c in cols],
                                           i_blocks, ibody, damaged, strict=True)]
        slow_rows = np.nonzero(slow if sel is None else slow[sel])[0].tolist()  # in out
        for j in slow_rows:
            number = out[j].number
            out[j] = one(buf, (number - first) * isz, number)
        if columns is not None:
            try:
                for j in slow_rows:
                    r = j if sel is None else int(sel[j])
                    for c, v in zip(cols, out[j][: len(cols)], strict=True):
                        c[r] = v
            except OverflowError:  # a value beyond its column (times past 2262)
                columns.append(None)
            else:
                columns.append(cols)
        return out

    return parse_table
