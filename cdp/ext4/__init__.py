"""Read-only ext2/ext3/ext4 parsing for the file catalog (hand-written, ``struct`` based).

Modules, one per concept: :mod:`~cdp.ext4.defs` (on-disk structures with the kernel's
field names), :mod:`~cdp.ext4.checksum` (crc32c and crc16), :mod:`~cdp.ext4.superblock`
(and its backups), :mod:`~cdp.ext4.group` (group descriptors, 32/64-bit, ``meta_bg``),
:mod:`~cdp.ext4.inode` (inodes and inline data), :mod:`~cdp.ext4.extent` (extent trees),
:mod:`~cdp.ext4.blockmap` (the old indirect block maps), :mod:`~cdp.ext4.directory`
(linear, htree and inline directories), :mod:`~cdp.ext4.fs` (the file system over a read
callable) and :mod:`~cdp.ext4.partition` (finding ext4 on a disk). Damaged structures
raise :class:`cdp.errors.Corruption`; inodes report theirs in ``Inode.damaged``.
"""

from cdp.ext4.directory import DirEntry
from cdp.ext4.extent import Extent
from cdp.ext4.fs import Ext4, Run, WalkEntry
from cdp.ext4.group import GroupDesc
from cdp.ext4.inode import Inode
from cdp.ext4.partition import Partition, find_ext4
from cdp.ext4.superblock import Superblock

__all__ = [
    "DirEntry",
    "Ext4",
    "Extent",
    "GroupDesc",
    "Inode",
    "Partition",
    "Run",
    "Superblock",
    "WalkEntry",
    "find_ext4",
]
