"""The superblock: geometry, features, the checksum seed, and where the backups are.

Design notes
------------
* The primary superblock is at byte 1024 whatever the block size. When it fails its
  checks (magic, sanity, ``s_checksum`` under ``metadata_csum``), :func:`find_superblock`
  reads the backup in group 1 (at block ``blocks_per_group + first_data_block`` for each
  possible block size with the default ``8 * block_size`` blocks per group), as e2fsck
  does without ``-b``.
* Every count that later sizes a loop or a read is bounded here ("absurd counts" raise
  :class:`~cdp.errors.Corruption`): block size 1..64 KiB, at most ``8 * block_size``
  blocks (clusters) and inodes per group, inode size a power of two between 128 and the
  block size, descriptor size a power of two between 64 and 1024 (``64bit``), at most
  2**32 groups, ``s_inodes_count`` within ``groups * inodes_per_group``.
"""

from __future__ import annotations

from collections.abc import Callable

from cdp.errors import Corruption
from cdp.ext4.checksum import Csum, superblock_csum
from cdp.ext4.defs import (
    COMPAT_HAS_JOURNAL,
    COMPAT_SPARSE_SUPER2,
    EXT2_DESC_SIZE,
    EXT2_GOOD_OLD_FIRST_INO,
    EXT2_GOOD_OLD_INODE_SIZE,
    EXT2_GOOD_OLD_REV,
    EXT4_CRC32C_CHKSUM,
    EXT4_MAX_DESC_SIZE,
    EXT4_MIN_DESC_SIZE_64BIT,
    EXT4_SUPER_BLOCK,
    EXT4_SUPER_BLOCK_FIELDS,
    EXT4_SUPER_MAGIC,
    INCOMPAT_64BIT,
    INCOMPAT_CSUM_SEED,
    INCOMPAT_FILETYPE,
    INCOMPAT_META_BG,
    INCOMPAT_RECOVER,
    INCOMPAT_UNSUPPORTED,
    RO_COMPAT_BIGALLOC,
    RO_COMPAT_GDT_CSUM,
    RO_COMPAT_HUGE_FILE,
    RO_COMPAT_LARGE_FILE,
    RO_COMPAT_METADATA_CSUM,
    RO_COMPAT_SPARSE_SUPER,
    S_BACKUP_BGS,
    S_BACKUP_BGS_OFFSET,
    S_CHECKSUM_OFFSET,
    S_CHECKSUM_SEED_OFFSET,
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
)

Reader = Callable[[int, int], bytes]

#: incompat / ro_compat features an ext3 file system may have; anything else is ext4
_EXT3_INCOMPAT = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG
_EXT3_RO_COMPAT = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | 0x4  # BTREE_DIR
_MAX_GROUPS = 1 << 32


class Superblock:
    """A parsed and sanity-checked ``ext4_super_block``. Cost: one 1 KiB unpack."""

    __slots__ = (
        "backup_bgs",
        "block_group_nr",
        "block_size",
        "blocks_count",
        "blocks_per_group",
        "checksum_seed",
        "cluster_bits",
        "desc_size",
        "feature_compat",
        "feature_incompat",
        "feature_ro_compat",
        "first_data_block",
        "first_ino",
        "first_meta_bg",
        "group_count",
        "inode_size",
        "inodes_count",
        "inodes_per_group",
        "journal_inum",
        "log_block_size",
        "log_groups_per_flex",
        "mkfs_time",
        "rev_level",
        "state",
        "uuid",
        "volume_name",
        "wtime",
    )

    backup_bgs: tuple[int, int]
    block_group_nr: int
    block_size: int
    blocks_count: int
    blocks_per_group: int
    checksum_seed: int
    cluster_bits: int
    desc_size: int
    feature_compat: int
    feature_incompat: int
    feature_ro_compat: int
    first_data_block: int
    first_ino: int
    first_meta_bg: int
    group_count: int
    inode_size: int
    inodes_count: int
    inodes_per_group: int
    journal_inum: int
    log_block_size: int
    log_groups_per_flex: int
    mkfs_time: int
    rev_level: int
    state: int
    uuid: bytes
    volume_name: str
    wtime: int

    # ------------------------------------------------------------------ features

    @property
    def metadata_csum(self) -> bool:
        return bool(self.feature_ro_compat & RO_COMPAT_METADATA_CSUM)

    @property
    def gdt_csum(self) -> bool:
        """Group descriptors carry a crc16 (the pre-``metadata_csum`` scheme)."""
        return bool(self.feature_ro_compat & RO_COMPAT_GDT_CSUM) and not self.metadata_csum

    @property
    def group_desc_csum(self) -> bool:
        """``bg_flags`` and ``bg_itable_unused`` are meaningful (either checksum scheme)."""
        return bool(self.feature_ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM))

    @property
    def is_64bit(self) -> bool:
        return bool(self.feature_incompat & INCOMPAT_64BIT)

    @property
    def huge_file(self) -> bool:
        return bool(self.feature_ro_compat & RO_COMPAT_HUGE_FILE)

    @property
    def filetype(self) -> bool:
        """Directory entries carry a file type (``ext4_dir_entry_2``)."""
        return bool(self.feature_incompat & INCOMPAT_FILETYPE)

    @property
    def meta_bg(self) -> bool:
        return bool(self.feature_incompat & INCOMPAT_META_BG)

    @property
    def needs_recovery(self) -> bool:
        """The journal holds transactions not replayed yet (read as the disk holds it)."""
        return bool(self.feature_incompat & INCOMPAT_RECOVER)

    @property
    def kind(self) -> str:
        """"ext4", "ext3" (a journal, no ext4 feature) or "ext2"."""
        if self.feature_incompat & ~_EXT3_INCOMPAT or self.feature_ro_compat & ~_EXT3_RO_COMPAT:
            return "ext4"
        return "ext3" if self.feature_compat & COMPAT_HAS_JOURNAL else "ext2"

    @property
    def size(self) -> int:
        """Bytes the file system covers."""
        return self.blocks_count * self.block_size

    @property
    def descs_per_block(self) -> int:
        return self.block_size // self.desc_size

    @property
    def inode_table_blocks(self) -> int:
        """Blocks of one group's inode table."""
        return -(-self.inodes_per_group * self.inode_size // self.block_size)

    def csum(self) -> Csum | None:
        """The crc32c seed holder under ``metadata_csum`` (else None)."""
        if not self.metadata_csum:
            return None
        if self.feature_incompat & INCOMPAT_CSUM_SEED:
            return Csum(self.checksum_seed)
        return Csum.from_uuid(self.uuid)

    def group_first_block(self, group: int) -> int:
        return self.first_data_block + group * self.blocks_per_group

    def has_super(self, group: int) -> bool:
        """Whether *group* holds a superblock backup (and, without ``meta_bg``, a copy
        of the group descriptor table)."""
        if group == 0:
            return True
        if self.feature_compat & COMPAT_SPARSE_SUPER2:
            return group in self.backup_bgs
        if group == 1 or not self.feature_ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        if not group & 1:
            return False
        return _is_power_of(group, 3) or _is_power_of(group, 5) or _is_power_of(group, 7)

    # ------------------------------------------------------------------ parsing

    @staticmethod
    def has_magic(data: bytes) -> bool:
        return len(data) >= SUPERBLOCK_SIZE and data[0x38:0x3A] == b"\x53\xef"

    @classmethod
    def from_bytes(cls, data: bytes, *, verify: bool = True) -> Superblock:
        """Parse and sanity-check 1024 superblock bytes; with *verify*, check
        ``s_checksum`` under ``metadata_csum``. Raises Corruption."""
        if len(data) < SUPERBLOCK_SIZE:
            raise Corruption(f"ext4 superblock: {len(data)} bytes read, 1024 needed")
        f = dict(zip(EXT4_SUPER_BLOCK_FIELDS, EXT4_SUPER_BLOCK.unpack_from(data, 0), strict=True))
        if f["s_magic"] != EXT4_SUPER_MAGIC:
            raise Corruption(f"not an ext2/3/4 superblock (magic {f['s_magic']:#06x})")
        sb = cls.__new__(cls)
        sb.inodes_count = f["s_inodes_count"]
        first_data_block = f["s_first_data_block"]
        log_block, log_cluster = f["s_log_block_size"], f["s_log_cluster_size"]
        blocks_per_group = f["s_blocks_per_group"]
        clusters_per_group = f["s_clusters_per_group"]
        inodes_per_group = f["s_inodes_per_group"]
        sb.wtime = f["s_wtime"]
        sb.state = f["s_state"]
        sb.rev_level = f["s_rev_level"]
        sb.feature_compat = f["s_feature_compat"]
        sb.feature_incompat = f["s_feature_incompat"]
        sb.feature_ro_compat = f["s_feature_ro_compat"]
        sb.uuid = f["s_uuid"]
        sb.volume_name = f["s_volume_name"].split(b"\0", 1)[0].decode("utf-8", "replace")
        sb.journal_inum = f["s_journal_inum"]
        desc_size = f["s_desc_size"]
        sb.first_meta_bg = f["s_first_meta_bg"]
        sb.mkfs_time = f["s_mkfs_time"]
        sb.log_groups_per_flex = f["s_log_groups_per_flex"]
        checksum_type = f["s_checksum_type"]
        if sb.rev_level == EXT2_GOOD_OLD_REV:
            sb.first_ino, sb.inode_size = EXT2_GOOD_OLD_FIRST_INO, EXT2_GOOD_OLD_INODE_SIZE
            sb.feature_compat = sb.feature_incompat = sb.feature_ro_compat = 0
        else:
            sb.first_ino, sb.inode_size = f["s_first_ino"], f["s_inode_size"]
        sb.block_group_nr = f["s_block_group_nr"]
        sb.backup_bgs = S_BACKUP_BGS.unpack_from(data, S_BACKUP_BGS_OFFSET)
        sb.checksum_seed = int.from_bytes(data[S_CHECKSUM_SEED_OFFSET : S_CHECKSUM_SEED_OFFSET + 4], "little")

        def bad(what: str) -> Corruption:
            return Corruption(f"ext4 superblock: {what}")

        if sb.feature_incompat & INCOMPAT_UNSUPPORTED:
            raise bad(f"unsupported incompat features {sb.feature_incompat & INCOMPAT_UNSUPPORTED:#x}")
        if log_block > 6:
            raise bad(f"block size 2**(10+{log_block})")
        bs = 1024 << log_block
        sb.log_block_size = log_block
        sb.block_size = bs
        if sb.feature_ro_compat & RO_COMPAT_BIGALLOC:
            if not log_block <= log_cluster <= log_block + 16:
                raise bad(f"cluster size 2**(10+{log_cluster})")
            sb.cluster_bits = log_cluster - log_block
            if not 1 <= clusters_per_group <= 8 * bs or blocks_per_group != clusters_per_group << sb.cluster_bits:
                raise bad(f"{clusters_per_group} clusters per group")
        else:
            sb.cluster_bits = 0
            if not 8 <= blocks_per_group <= 8 * bs:
                raise bad(f"{blocks_per_group} blocks per group")
        sb.blocks_per_group = blocks_per_group
        sb.blocks_count = f["s_blocks_count_lo"] | (
            f["s_blocks_count_hi"] << 32 if sb.feature_incompat & INCOMPAT_64BIT else 0)
        if first_data_block > 1 or first_data_block >= sb.blocks_count:
            raise bad(f"first data block {first_data_block} of {sb.blocks_count}")
        sb.first_data_block = first_data_block
        isz = sb.inode_size
        if isz < EXT2_GOOD_OLD_INODE_SIZE or isz > bs or isz & (isz - 1):
            raise bad(f"inode size {isz}")
        if not 1 <= inodes_per_group <= 8 * bs:
            raise bad(f"{inodes_per_group} inodes per group")
        sb.inodes_per_group = inodes_per_group
        if sb.first_ino < EXT2_GOOD_OLD_FIRST_INO:
            raise bad(f"first inode {sb.first_ino}")
        if sb.feature_incompat & INCOMPAT_64BIT:
            if desc_size < EXT4_MIN_DESC_SIZE_64BIT or desc_size > min(EXT4_MAX_DESC_SIZE, bs) or desc_size & (desc_size - 1):
                raise bad(f"group descriptor size {desc_size}")
            sb.desc_size = desc_size
        else:
            sb.desc_size = EXT2_DESC_SIZE
        groups = -(-(sb.blocks_count - first_data_block) // blocks_per_group)
        if groups > _MAX_GROUPS:
            raise bad(f"{groups} block groups")
        sb.group_count = groups
        if not 0 < sb.inodes_count <= groups * inodes_per_group:
            raise bad(f"{sb.inodes_count} inodes in {groups} groups of {inodes_per_group}")
        if sb.metadata_csum:
            if checksum_type != EXT4_CRC32C_CHKSUM:
                raise bad(f"checksum type {checksum_type}")
            if verify:
                want = int.from_bytes(data[S_CHECKSUM_OFFSET : S_CHECKSUM_OFFSET + 4], "little")
                if superblock_csum(data) != want:
                    raise bad("checksum mismatch")
        return sb

    def __repr__(self) -> str:
        return (f"Superblock({self.kind}, block={self.block_size}, blocks={self.blocks_count}, "
                f"groups={self.group_count}, inodes={self.inodes_count}, inode_size={self.inode_size}, "
                f"features={self.feature_compat:#x}/{self.feature_incompat:#x}/{self.feature_ro_compat:#x})")


def _is_power_of(n: int, base: int) -> bool:
    while n % base == 0:
        n //= base
    return n == 1


def backup_offsets(size: int | None) -> list[int]:
    """File-system byte offsets of the group 1 superblock backup, one per possible block
    size (with the default ``8 * block_size`` blocks per group), nearest first."""
    out = []
    for log in range(7):
        bs = 1024 << log
        off = (8 * bs + (1 if bs == 1024 else 0)) * bs
        if size is None or off + SUPERBLOCK_SIZE <= size:
            out.append(off)
    return out


def find_superblock(read: Reader, size: int | None = None) -> tuple[Superblock, str]:
    """The primary superblock, or the first valid group 1 backup when the primary fails
    its checks. Returns (superblock, note: "" or what was wrong with the primary).
    Raises Corruption when neither is readable. *read* is file-system relative."""
    try:
        return Superblock.from_bytes(read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE)), ""
    except Corruption as e:
        first = e
    for off in backup_offsets(size):
        try:
            data = read(off, SUPERBLOCK_SIZE)
        except Corruption:
            continue
        if not Superblock.has_magic(data):
            continue
        try:
            sb = Superblock.from_bytes(data)
        except Corruption:
            continue
        if sb.block_group_nr == 1 and (sb.first_data_block + sb.blocks_per_group) * sb.block_size == off:
            return sb, f"primary superblock unreadable ({first}); using the backup in group 1"
    raise first
