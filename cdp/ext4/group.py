"""Block group descriptors: where each group's inode table is, and how much of it is used.

Design notes
------------
* Without ``meta_bg`` the descriptor table follows the superblock (block
  ``first_data_block + 1``) and is copied after every superblock backup. With
  ``meta_bg``, from meta group ``s_first_meta_bg`` on, the descriptors of the
  ``descs_per_block`` groups of meta group *m* fill one block at the start of its first
  group (after that group's superblock backup, if any), copied into its second and last
  groups. :func:`descriptor_blocks` gives the primary and backup blocks of a group.
* Descriptors are 32 bytes, or ``s_desc_size`` (64+) with ``64bit`` (the ``_hi`` halves).
  With ``flex_bg`` the inode tables of a flex group are packed together in its first
  group; nothing here depends on that: every descriptor names its own table.
* A descriptor that fails its checksum (crc32c under ``metadata_csum``, crc16 under
  ``gdt_csum``) or names blocks outside the file system is replaced by its first valid
  backup. The kernel does not keep the backups' ``bg_flags`` and ``bg_itable_unused``
  current, so a group read from a backup is treated as fully initialised (every inode of
  its table is read and judged by itself). When no copy is valid the group is
  ``damaged``: its inodes read as damaged.
"""

from __future__ import annotations

from collections.abc import Callable

from cdp.errors import Corruption
from cdp.ext4.checksum import gdt_csum
from cdp.ext4.defs import (
    BG_CHECKSUM_OFFSET,
    EXT4_BG_INODE_UNINIT,
    EXT4_GROUP_DESC_32,
    EXT4_GROUP_DESC_64,
)
from cdp.ext4.superblock import Superblock

#: read_blocks(first block, count) -> bytes (file-system relative, exactly count blocks)
BlockReader = Callable[[int, int], bytes]


class GroupDesc:
    """One block group's descriptor (the fields this reader uses)."""

    __slots__ = ("block_bitmap", "damaged", "flags", "group", "inode_bitmap", "inode_table",
                 "itable_unused", "source")

    def __init__(self, group: int, block_bitmap: int = 0, inode_bitmap: int = 0,
                 inode_table: int = 0, flags: int = 0, itable_unused: int = 0) -> None:
        self.group = group
        self.block_bitmap = block_bitmap
        self.inode_bitmap = inode_bitmap
        self.inode_table = inode_table
        self.flags = flags
        self.itable_unused = itable_unused
        self.damaged: str | None = None
        self.source = "primary"  # or "backup in group N"

    def used_inodes(self, sb: Superblock) -> int:
        """How many inodes at the start of the table may be in use: none when the
        group's inodes are uninitialised, all but ``bg_itable_unused`` otherwise (only
        meaningful with group descriptor checksums, and not for a backup copy)."""
        if self.damaged:
            return 0
        if not sb.group_desc_csum or self.source != "primary":
            return sb.inodes_per_group
        if self.flags & EXT4_BG_INODE_UNINIT:
            return 0
        return sb.inodes_per_group - min(self.itable_unused, sb.inodes_per_group)

    def __repr__(self) -> str:
        state = f" damaged: {self.damaged}" if self.damaged else (
            "" if self.source == "primary" else f" ({self.source})")
        return (f"GroupDesc({self.group} itable={self.inode_table} flags={self.flags:#x} "
                f"unused={self.itable_unused}{state})")


def descriptor_blocks(sb: Superblock, group: int) -> tuple[int, list[int]]:
    """(primary block, backup blocks) of the descriptor table block holding *group*'s
    descriptor. Cost: O(1)."""
    dpb = sb.descs_per_block
    meta = group // dpb
    if not sb.meta_bg or meta < sb.first_meta_bg:
        backups = [sb.group_first_block(g) + 1 + meta for g in _backup_groups(sb)]
        return sb.first_data_block + 1 + meta, backups

    def at(g: int) -> int:
        b = sb.group_first_block(g) + (1 if sb.has_super(g) else 0)
        if sb.block_size == 1024 and g == 0 and sb.first_data_block == 0:
            b += 1  # the superblock occupies block 1 of a 1 KiB-block file system
        return b

    first = meta * dpb
    backups = [at(g) for g in (first + 1, first + dpb - 1) if g < sb.group_count]
    return at(first), backups


def _backup_groups(sb: Superblock, limit: int = 3) -> list[int]:
    """The first few groups after group 0 that hold a descriptor table copy."""
    candidates = sorted({1, 3, 5, 7, 9, 25, 27, *sb.backup_bgs} - {0})
    return [g for g in candidates if g < sb.group_count and sb.has_super(g)][:limit]


def parse_desc(sb: Superblock, group: int, raw: bytes | bytearray, *, verify: bool = True) -> GroupDesc:
    """One descriptor from its ``desc_size`` bytes; raises Corruption when its checksum
    fails or its bitmaps or inode table lie outside the file system."""
    if sb.desc_size >= 64:
        f = EXT4_GROUP_DESC_64.unpack_from(raw, 0)
        d = GroupDesc(group, f[0] | f[12] << 32, f[1] | f[13] << 32, f[2] | f[14] << 32, f[6],
                      f[10] | f[18] << 16)
    else:
        f = EXT4_GROUP_DESC_32.unpack_from(raw, 0)
        d = GroupDesc(group, f[0], f[1], f[2], f[6], f[10])
    if verify:
        want = f[11]
        csum = sb.csum()
        end = sb.desc_size
        if csum is not None:
            zeroed = bytearray(raw[:end])
            zeroed[BG_CHECKSUM_OFFSET : BG_CHECKSUM_OFFSET + 2] = b"\0\0"
            if csum.group_desc(group, zeroed) != want:
                raise Corruption(f"group {group} descriptor: checksum mismatch")
        elif sb.gdt_csum:
            body = bytes(raw[:BG_CHECKSUM_OFFSET]) + bytes(raw[BG_CHECKSUM_OFFSET + 2 : end])
            if gdt_csum(sb.uuid, group, body) != want:
                raise Corruption(f"group {group} descriptor: checksum mismatch")
    n = sb.blocks_count
    if not (sb.first_data_block <= d.inode_table and d.inode_table + sb.inode_table_blocks <= n):
        raise Corruption(f"group {group} descriptor: inode table at block {d.inode_table} "
                         f"is outside the file system")
    if not (d.block_bitmap < n and d.inode_bitmap < n):
        raise Corruption(f"group {group} descriptor: bitmaps outside the file system")
    return d


def load_groups(sb: Superblock, read_blocks: BlockReader) -> tuple[list[GroupDesc], list[str]]:
    """Every group's descriptor (primary, else a valid backup, else damaged) and notes on
    what was wrong. Cost: one read for the whole table without ``meta_bg`` (one per
    meta group with it), plus one per backup consulted."""
    dpb = sb.descs_per_block
    ds = sb.desc_size
    bs = sb.block_size
    out: list[GroupDesc] = []
    notes: list[str] = []
    cache: dict[int, bytes] = {}

    def block(b: int) -> bytes:
        if b not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[b] = read_blocks(b, 1)
        return cache[b]

    if not sb.meta_bg:
        nblocks = -(-sb.group_count // dpb)
        table = read_blocks(sb.first_data_block + 1, nblocks)
        for i in range(nblocks):
            cache[sb.first_data_block + 1 + i] = table[i * bs : (i + 1) * bs]
    for g in range(sb.group_count):
        primary, backups = descriptor_blocks(sb, g)
        pos = (g % dpb) * ds
        try:
            out.append(parse_desc(sb, g, block(primary)[pos : pos + ds]))
            continue
        except Corruption as e:
            why = str(e)
        for b in backups:
            try:
                d = parse_desc(sb, g, block(b)[pos : pos + ds])
            except Corruption:
                continue
            d.source = f"backup at block {b}"
            out.append(d)
            notes.append(f"{why}; using the backup at block {b}")
            break
        else:
            d = GroupDesc(g)
            d.damaged = why
            out.append(d)
            notes.append(f"{why}; no valid backup: its inodes are unreadable")
    return out, notes
