"""Extent trees: which blocks hold an ``EXTENTS_FL`` inode's data.

The root is the 60-byte ``i_block`` (a 12-byte header and up to 4 entries). At depth 0
the entries are extents (logical block, length, physical block; a length above 32768
marks an *uninitialised* extent — allocated, reads as zeros); above it they are index
entries naming the tree block of the next level down, each a header and entries with a
crc32c tail under ``metadata_csum``.

Design notes
------------
* A hostile tree cannot make the walk hang or explode: the depth is at most 5 and
  strictly decreases per level, ``eh_entries <= eh_max <=`` what fits in the node, every
  block named must lie inside the file system and may be visited once (a loop is
  damage), and the blocks mapped may not exceed the file system's. Everything raises
  :class:`~cdp.errors.Corruption`.
* Extents come back sorted by logical block and must not overlap (damage otherwise).
  Gaps between them are holes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from crc32c import crc32c

from cdp.errors import Corruption
from cdp.ext4.defs import (
    EXT4_EXT_MAGIC,
    EXT4_EXTENT,
    EXT4_EXTENT_HEADER,
    EXT4_EXTENT_IDX,
    EXT4_MAX_EXTENT_DEPTH,
    EXT_INIT_MAX_LEN,
)

_MASK = 0xFFFFFFFF
_hdr = EXT4_EXTENT_HEADER.unpack_from
_idx = EXT4_EXTENT_IDX.unpack_from
_ext = EXT4_EXTENT.unpack_from


class Extent(NamedTuple):
    """*length* blocks of the file from logical block *lblk* at physical block *pblk*;
    *uninit*: allocated but unwritten (reads as zeros)."""

    lblk: int
    pblk: int
    length: int
    uninit: bool


def _header(buf: bytes, what: str, room: int) -> tuple[int, int]:
    """(entries, depth) of the node header at ``buf[0:12]`` whose node has space for
    *room* entries. Raises Corruption."""
    magic, entries, emax, depth, _gen = _hdr(buf, 0)
    if magic != EXT4_EXT_MAGIC:
        raise Corruption(f"{what}: bad extent header magic {magic:#06x}")
    if emax > room or entries > emax or depth > EXT4_MAX_EXTENT_DEPTH:
        raise Corruption(f"{what}: bad extent header ({entries}/{emax} entries, depth {depth})")
    return entries, depth


def extent_tree(
    i_block: bytes, read_block: Callable[[int], bytes], blocks_count: int, *,
    inode_seed: int | None = None, what: str = "inode",
) -> list[Extent]:
    """Every extent of the tree rooted in *i_block*, in logical order. *read_block(n)*
    returns block *n* of the file system; *inode_seed* (``metadata_csum``) checks each
    tree block's tail. Raises Corruption. Cost: one read per tree block."""
    entries, depth = _header(i_block, what, (len(i_block) - 12) // 12)
    out: list[Extent] = []
    visited: set[int] = set()
    mapped = 0
    # (node bytes, entries, depth) to expand, deepest-first keeps the order logical
    stack: list[tuple[bytes, int, int, str]] = [(i_block, entries, depth, what)]
    while stack:
        node, n, d, where = stack.pop()
        if d == 0:
            for i in range(n):
                lblk, ln, start_hi, start_lo = _ext(node, 12 + 12 * i)
                uninit = ln > EXT_INIT_MAX_LEN
                if uninit:
                    ln -= EXT_INIT_MAX_LEN
                pblk = start_hi << 32 | start_lo
                if ln == 0 or pblk == 0 or pblk + ln > blocks_count:
                    raise Corruption(f"{where}: bad extent (logical {lblk}, {ln} blocks at {pblk})")
                mapped += ln
                if mapped > blocks_count:
                    raise Corruption(f"{where}: extents map more blocks than the file system has")
                if out and lblk < out[-1].lblk + out[-1].length:
                    raise Corruption(f"{where}: extents overlap at logical block {lblk}")
                out.append(Extent(lblk, pblk, ln, uninit))
            continue
        children = []
        prev = -1
        for i in range(n):
            first, leaf_lo, leaf_hi, _unused = _idx(node, 12 + 12 * i)
            leaf = leaf_hi << 32 | leaf_lo
            if first <= prev and i:
                raise Corruption(f"{where}: extent index out of order at logical block {first}")
            prev = first
            if leaf == 0 or leaf >= blocks_count or leaf in visited:
                raise Corruption(f"{where}: extent index names block {leaf} "
                                 f"({'a loop' if leaf in visited else 'outside the file system'})")
            visited.add(leaf)
            children.append(leaf)
        for leaf in reversed(children):  # popped in logical order
            buf = read_block(leaf)
            cwhere = f"{what} extent block {leaf}"
            room = (len(buf) - 12) // 12
            cn, cd = _header(buf, cwhere, room)
            if cd != d - 1:
                raise Corruption(f"{cwhere}: depth {cd} under depth {d}")
            if inode_seed is not None:
                emax = _hdr(buf, 0)[2]
                tail = 12 + 12 * emax
                if tail + 4 > len(buf):
                    raise Corruption(f"{cwhere}: no room for the checksum tail")
                want = int.from_bytes(buf[tail : tail + 4], "little")
                if crc32c(buf[:tail], inode_seed ^ _MASK) ^ _MASK != want:
                    raise Corruption(f"{cwhere}: checksum mismatch")
            stack.append((buf, cn, cd, cwhere))
    return out
