"""The old block map (ext2/ext3, and ext4 inodes without ``EXTENTS_FL``).

``i_block`` holds 15 block numbers: 12 direct blocks, then the roots of a single,
double and triple indirect tree whose blocks are arrays of ``block_size / 4`` block
numbers. A 0 anywhere is a hole (of one block, or of the whole subtree).

Design notes
------------
* Only the part of the map below the file's size is walked, a pointer block may be
  named once, and every block number must lie inside the file system; the blocks mapped
  may not exceed the file system's (a hostile map raises
  :class:`~cdp.errors.Corruption` instead of reading for ever).
* Consecutive blocks are merged into one :class:`~cdp.ext4.extent.Extent`, so a
  contiguous ext2 file has one run like an ext4 one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from cdp.errors import Corruption
from cdp.ext4.defs import EXT4_NDIR_BLOCKS
from cdp.ext4.extent import Extent


def block_map(i_block: bytes, read_block: Callable[[int], bytes], nblocks: int,
              blocks_count: int, block_size: int) -> list[Extent]:
    """The runs of the first *nblocks* logical blocks mapped by *i_block*, in logical
    order (holes left out). Raises Corruption. Cost: one read per pointer block."""
    per = block_size // 4
    ptrs = struct.unpack_from("<15I", i_block, 0)
    out: list[Extent] = []
    mapped = 0
    seen: set[int] = set()  # pointer blocks: a legitimate map never shares one

    def add(lblk: int, pblk: int) -> None:
        nonlocal mapped
        if pblk >= blocks_count:
            raise Corruption(f"block map names block {pblk}, outside the file system")
        mapped += 1
        if mapped > blocks_count:
            raise Corruption("block map maps more blocks than the file system has")
        if out:
            last = out[-1]
            if last.lblk + last.length == lblk and last.pblk + last.length == pblk:
                out[-1] = Extent(last.lblk, last.pblk, last.length + 1, False)
                return
        out.append(Extent(lblk, pblk, 1, False))

    for i in range(min(EXT4_NDIR_BLOCKS, nblocks)):
        if ptrs[i]:
            add(i, ptrs[i])
    first = EXT4_NDIR_BLOCKS
    unpack = struct.Struct(f"<{per}I").unpack_from
    for level in (1, 2, 3):
        span = per**level  # logical blocks under one root of this level
        if first >= nblocks:
            break
        root = ptrs[EXT4_NDIR_BLOCKS + level - 1]
        if root:
            # iterative walk of the tree: (block number, level, first logical block)
            stack = [(root, level, first)]
            while stack:
                blk, lv, base = stack.pop()
                if blk >= blocks_count or blk in seen:
                    raise Corruption(f"block map names pointer block {blk} "
                                     f"({'twice' if blk in seen else 'outside the file system'})")
                seen.add(blk)
                entries = unpack(read_block(blk), 0)
                child_span = per ** (lv - 1)
                todo = []
                for j, p in enumerate(entries):
                    lb = base + j * child_span
                    if lb >= nblocks:
                        break
                    if not p:
                        continue
                    if lv == 1:
                        add(lb, p)
                    else:
                        todo.append((p, lv - 1, lb))
                stack.extend(reversed(todo))
        first += span
    return out
