"""Directories: linear entry blocks, hashed-index (htree) blocks, and inline directories.

A directory's data is a chain of ``ext4_dir_entry_2`` records per block (inode, record
length, name length, file type, name). A deleted entry is absorbed into the record
before it, or has inode 0. Under ``metadata_csum`` each leaf block ends in a 12-byte
fake entry holding the block's crc32c.

Design notes
------------
* An htree directory (``EXT4_INDEX_FL``) keeps its entries in ordinary leaf blocks;
  its first block (the dx root) starts with "." and a ".." whose record length covers
  the rest of the block, and its interior dx node blocks start with an empty entry
  spanning the whole block. So listing reads every block linearly: the index blocks
  contribute "." and ".." (root) or nothing (nodes). The index is never followed (no
  name hashing), but its blocks' ``dx_tail`` checksums are verified.
* An inline directory (``INLINE_DATA_FL``) stores its parent's inode number in the
  first 4 bytes of ``i_block``, then entries in the remaining 56 bytes and in the
  ``system.data`` extended attribute; it has no "." or ".." entries of its own.
* Every record is checked as the kernel checks it (length at least 12, a multiple of 4,
  room for the name, inside the block, inode number in range); a bad one raises
  :class:`~cdp.errors.Corruption` for its directory. Names are bytes on disk; they are
  decoded as UTF-8 with ``surrogateescape`` and given in the catalog's *stored* form
  (:func:`cdp.ntfs.names.stored`: SQLite cannot hold the lone surrogates that bytes
  which are not UTF-8 decode to). Lossless: ``os.fsencode(exact(name))`` gives the
  bytes back; a UTF-8 name is unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

from crc32c import crc32c

from cdp.errors import Corruption
from cdp.ext4.defs import (
    DX_COUNTLIMIT,
    DX_TAIL,
    EXT4_DIR_ENTRY_2,
    EXT4_DIR_ENTRY_TAIL,
    EXT4_DIR_REC_LEN_MIN,
    EXT4_FT_DIR,
    EXT4_FT_DIR_CSUM,
    EXT4_INLINE_DOTDOT_SIZE,
    EXT4_MAX_REC_LEN,
    FT_KIND,
    I_BLOCK_SIZE,
)
from cdp.ntfs.names import stored

_MASK = 0xFFFFFFFF
_de = EXT4_DIR_ENTRY_2.unpack_from
_tail = EXT4_DIR_ENTRY_TAIL.unpack_from
_countlimit = DX_COUNTLIMIT.unpack_from
_dxtail = DX_TAIL.unpack_from
_TAIL_SIZE = EXT4_DIR_ENTRY_TAIL.size


class DirEntry(NamedTuple):
    """One name in a directory: *file_type* is the entry's ``EXT4_FT_*`` (0 when the file
    system does not record types)."""

    name: str
    ino: int
    file_type: int

    @property
    def kind(self) -> str:
        return FT_KIND.get(self.file_type, "unknown")


#: a directory entry as the parsers produce it: (name, inode, file type)
RawEntry = tuple[str, int, int]


class DirFormat:
    """How this file system's directory blocks are laid out (block size, whether
    entries carry a file type and blocks a checksum)."""

    __slots__ = ("block_size", "filetype", "inodes_count", "metadata_csum")

    def __init__(self, block_size: int, filetype: bool, inodes_count: int, metadata_csum: bool) -> None:
        self.block_size = block_size
        self.filetype = filetype
        self.inodes_count = inodes_count
        self.metadata_csum = metadata_csum

    def entries(self, buf: bytes, start: int, end: int, out: list[RawEntry], where: str) -> None:
        """Append the live entries of the record chain ``buf[start:end]`` to *out* as
        plain ``(name, inode, file type)`` tuples. Raises Corruption on a bad record.
        Cost: one unpack and one decode per record."""
        pos = start
        max_ino = self.inodes_count
        append = out.append
        if self.filetype and self.block_size < 65536:  # the usual layout: the tight loop
            while pos < end:
                if pos + 8 > end:
                    raise self._bad(where, pos - start, 0, 0, 0)
                ino, rec_len, name_len, ftype = _de(buf, pos)
                nxt = pos + rec_len
                if (rec_len & 3 or rec_len < EXT4_DIR_REC_LEN_MIN or nxt > end
                        or (name_len + 11) & ~3 > rec_len or ino > max_ino):
                    raise self._bad(where, pos - start, ino, rec_len, name_len)
                if ino:
                    if not name_len:
                        raise self._bad(where, pos - start, ino, rec_len, name_len)
                    name = buf[pos + 8 : pos + 8 + name_len].decode("utf-8", "surrogateescape")
                    append((name if name.isascii() else stored(name), ino, ftype))
                pos = nxt
            return
        filetype = self.filetype
        big = self.block_size >= 65536
        while pos < end:
            if pos + 8 > end:
                raise self._bad(where, pos - start, 0, 0, 0)
            ino, rec_len, name_len, ftype = _de(buf, pos)
            if big:  # 64 KiB blocks: the length's two low bits are bits 16-17
                rec_len = self.block_size if rec_len in (0, EXT4_MAX_REC_LEN) else (
                    (rec_len & 0xFFFC) | (rec_len & 3) << 16)
            if not filetype:  # ext4_dir_entry: a 16-bit name length, no type
                name_len |= ftype << 8
                ftype = 0
            if (rec_len < EXT4_DIR_REC_LEN_MIN or rec_len & 3 or rec_len < (name_len + 11) & ~3
                    or pos + rec_len > end or ino > max_ino or (ino and not name_len)):
                raise self._bad(where, pos - start, ino, rec_len, name_len)
            if ino:
                name = buf[pos + 8 : pos + 8 + name_len].decode("utf-8", "surrogateescape")
                append((name if name.isascii() else stored(name), ino, ftype))
            pos += rec_len

    @staticmethod
    def _bad(where: str, at: int, ino: int, rec_len: int, name_len: int) -> Corruption:
        return Corruption(f"{where}: bad directory record at byte {at} "
                          f"(inode {ino}, length {rec_len}, name length {name_len})")

    def block(self, buf: bytes, out: list[RawEntry], where: str, inode_seed: int | None,
              htree: bool) -> None:
        """Append the entries of one directory block (a leaf, or an htree index block:
        "." and ".." of the root, nothing from a node). *inode_seed* (``metadata_csum``)
        verifies the block's checksum. Raises Corruption."""
        bs = len(buf)
        end = bs
        if self.metadata_csum:
            t_ino, t_len, t_nlen, t_ft, t_csum = _tail(buf, bs - _TAIL_SIZE)
            if t_ino == 0 and t_len == _TAIL_SIZE and t_nlen == 0 and t_ft == EXT4_FT_DIR_CSUM:
                end = bs - _TAIL_SIZE
                if inode_seed is not None and crc32c(buf[:end], inode_seed ^ _MASK) ^ _MASK != t_csum:
                    raise Corruption(f"{where}: directory block checksum mismatch")
            elif htree and (off := self._dx_count_offset(buf)):
                if inode_seed is not None:
                    self._verify_dx(buf, off, inode_seed, where)
            else:
                raise Corruption(f"{where}: directory block has no checksum tail")
        self.entries(buf, 0, end, out, where)

    def _dx_count_offset(self, buf: bytes) -> int:
        """Where ``dx_countlimit`` is when *buf* is an htree index block (else 0)."""
        bs = len(buf)
        rlen = _de(buf, 0)[1]
        if rlen == bs or (rlen == 0 and bs == 65536):
            return 8  # a node: one empty record spanning the block
        # the root: ".", "..", then dx_root_info {reserved_zero, hash, info_length(8)...}
        if rlen == 12 and _de(buf, 12)[1] == bs - 12 and buf[24:28] == b"\0\0\0\0" and buf[29] == 8:
            return 32
        return 0

    def _verify_dx(self, buf: bytes, off: int, inode_seed: int, where: str) -> None:
        limit, count = _countlimit(buf, off)
        tail = off + 8 * limit
        if count > limit or tail + DX_TAIL.size > len(buf):
            raise Corruption(f"{where}: htree index counts {count}/{limit} do not fit the block")
        _reserved, want = _dxtail(buf, tail)
        c = crc32c(buf[:off + 8 * count], inode_seed ^ _MASK)
        c = crc32c(buf[tail : tail + 4] + b"\0\0\0\0", c)  # dt_reserved, a zeroed dt_checksum
        if c ^ _MASK != want:
            raise Corruption(f"{where}: htree index block checksum mismatch")

    def inline(self, ino: int, i_block: bytes, extra: bytes, out: list[RawEntry], where: str,
               dots: bool) -> None:
        """Append the entries of an inline directory (*i_block* and the ``system.data``
        value *extra*); with *dots*, "." and ".." first. Raises Corruption."""
        parent = int.from_bytes(i_block[:EXT4_INLINE_DOTDOT_SIZE], "little")
        if parent > self.inodes_count:
            raise Corruption(f"{where}: inline directory parent {parent} is out of range")
        if dots:
            out.append((".", ino, EXT4_FT_DIR))
            out.append(("..", parent, EXT4_FT_DIR))
        self.entries(i_block, EXT4_INLINE_DOTDOT_SIZE, I_BLOCK_SIZE, out, where)
        if extra:
            self.entries(extra, 0, len(extra), out, where + " (inline xattr)")
