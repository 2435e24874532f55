"""ext2/ext3/ext4 on-disk structures, declared once, with the kernel's field names.

Every parser in :mod:`cdp.ext4` reads through the precompiled :class:`struct.Struct`
objects below (little-endian, ``unpack_from`` on a buffer and an offset). The comments
give each structure's field order; offsets are relative to the structure start. The
layouts are those of ``fs/ext4/ext4.h`` as documented in the kernel's
``Documentation/filesystems/ext4``; they are fixed by the format and must never change.
Checksums (crc32c, and crc16 for the older ``gdt_csum``) are in :mod:`cdp.ext4.checksum`.
"""

from __future__ import annotations

import struct

# ---------------------------------------------------------------- ext4_super_block
#: the primary superblock lives at byte 1024 of the file system, whatever the block size
SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT4_SUPER_MAGIC = 0xEF53
# 0x000 s_inodes_count s_blocks_count_lo s_r_blocks_count_lo s_free_blocks_count_lo
# 0x010 s_free_inodes_count s_first_data_block s_log_block_size s_log_cluster_size
# 0x020 s_blocks_per_group s_clusters_per_group s_inodes_per_group s_mtime
# 0x030 s_wtime s_mnt_count s_max_mnt_count s_magic s_state s_errors s_minor_rev_level
# 0x040 s_lastcheck s_checkinterval s_creator_os s_rev_level
# 0x050 s_def_resuid s_def_resgid s_first_ino s_inode_size s_block_group_nr
# 0x05C s_feature_compat s_feature_incompat s_feature_ro_compat s_uuid[16]
# 0x078 s_volume_name[16] s_last_mounted[64] s_algorithm_usage_bitmap
# 0x0CC s_prealloc_blocks s_prealloc_dir_blocks s_reserved_gdt_blocks s_journal_uuid[16]
# 0x0E0 s_journal_inum s_journal_dev s_last_orphan s_hash_seed[4]
# 0x0FC s_def_hash_version s_jnl_backup_type s_desc_size
# 0x100 s_default_mount_opts s_first_meta_bg s_mkfs_time s_jnl_blocks[17]
# 0x150 s_blocks_count_hi s_r_blocks_count_hi s_free_blocks_count_hi
# 0x15C s_min_extra_isize s_want_extra_isize s_flags s_raid_stride s_mmp_interval
# 0x168 s_mmp_block s_raid_stripe_width s_log_groups_per_flex s_checksum_type
EXT4_SUPER_BLOCK = struct.Struct(
    "<IIIIIIIIIIIIIHhHHHHIIIIHHIHHIII16s16s64sIBBH16sIII16sBBHIII68sIIIHHIHHQIBB")
EXT4_SUPER_BLOCK_FIELDS = (
    "s_inodes_count", "s_blocks_count_lo", "s_r_blocks_count_lo", "s_free_blocks_count_lo",
    "s_free_inodes_count", "s_first_data_block", "s_log_block_size", "s_log_cluster_size",
    "s_blocks_per_group", "s_clusters_per_group", "s_inodes_per_group", "s_mtime",
    "s_wtime", "s_mnt_count", "s_max_mnt_count", "s_magic", "s_state", "s_errors",
    "s_minor_rev_level", "s_lastcheck", "s_checkinterval", "s_creator_os", "s_rev_level",
    "s_def_resuid", "s_def_resgid", "s_first_ino", "s_inode_size", "s_block_group_nr",
    "s_feature_compat", "s_feature_incompat", "s_feature_ro_compat", "s_uuid",
    "s_volume_name", "s_last_mounted", "s_algorithm_usage_bitmap", "s_prealloc_blocks",
    "s_prealloc_dir_blocks", "s_reserved_gdt_blocks", "s_journal_uuid", "s_journal_inum",
    "s_journal_dev", "s_last_orphan", "s_hash_seed", "s_def_hash_version",
    "s_jnl_backup_type", "s_desc_size", "s_default_mount_opts", "s_first_meta_bg",
    "s_mkfs_time", "s_jnl_blocks", "s_blocks_count_hi", "s_r_blocks_count_hi",
    "s_free_blocks_count_hi", "s_min_extra_isize", "s_want_extra_isize", "s_flags",
    "s_raid_stride", "s_mmp_interval", "s_mmp_block", "s_raid_stripe_width",
    "s_log_groups_per_flex", "s_checksum_type",
)
# 0x24C s_backup_bgs[2] (sparse_super2)
S_BACKUP_BGS = struct.Struct("<II")
S_BACKUP_BGS_OFFSET = 0x24C
# 0x270 s_checksum_seed (with INCOMPAT_CSUM_SEED)
S_CHECKSUM_SEED_OFFSET = 0x270
# 0x3FC s_checksum: crc32c of the 1020 bytes before it
S_CHECKSUM_OFFSET = 0x3FC

EXT2_GOOD_OLD_REV = 0
EXT2_GOOD_OLD_INODE_SIZE = 128
EXT2_GOOD_OLD_FIRST_INO = 11
EXT4_CRC32C_CHKSUM = 1  # s_checksum_type

# s_feature_compat
COMPAT_DIR_PREALLOC = 0x1
COMPAT_HAS_JOURNAL = 0x4
COMPAT_EXT_ATTR = 0x8
COMPAT_RESIZE_INODE = 0x10
COMPAT_DIR_INDEX = 0x20
COMPAT_SPARSE_SUPER2 = 0x200
# s_feature_incompat
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4  # the journal holds transactions not yet replayed
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000
# s_feature_ro_compat
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_DIR_NLINK = 0x20
RO_COMPAT_EXTRA_ISIZE = 0x40
RO_COMPAT_QUOTA = 0x100
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
RO_COMPAT_READONLY = 0x1000
RO_COMPAT_PROJECT = 0x2000
RO_COMPAT_VERITY = 0x8000
RO_COMPAT_ORPHAN_PRESENT = 0x10000

#: incompat features whose data this reader cannot follow (the file system is refused)
INCOMPAT_UNSUPPORTED = INCOMPAT_COMPRESSION | INCOMPAT_JOURNAL_DEV | INCOMPAT_DIRDATA

# ---------------------------------------------------------------- ext4_group_desc
# 0x00 bg_block_bitmap_lo bg_inode_bitmap_lo bg_inode_table_lo bg_free_blocks_count_lo
# 0x0E bg_free_inodes_count_lo bg_used_dirs_count_lo bg_flags bg_exclude_bitmap_lo
# 0x18 bg_block_bitmap_csum_lo bg_inode_bitmap_csum_lo bg_itable_unused_lo bg_checksum
EXT4_GROUP_DESC_32 = struct.Struct("<IIIHHHHIHHHH")
# 64-bit descriptors (s_desc_size >= 64) continue:
# 0x20 bg_block_bitmap_hi bg_inode_bitmap_hi bg_inode_table_hi bg_free_blocks_count_hi
# 0x2E bg_free_inodes_count_hi bg_used_dirs_count_hi bg_itable_unused_hi
# 0x34 bg_exclude_bitmap_hi bg_block_bitmap_csum_hi bg_inode_bitmap_csum_hi bg_reserved
EXT4_GROUP_DESC_64 = struct.Struct("<IIIHHHHIHHHHIIIHHHHIHHI")
EXT2_DESC_SIZE = 32
EXT4_MIN_DESC_SIZE_64BIT = 64
EXT4_MAX_DESC_SIZE = 1024
BG_CHECKSUM_OFFSET = 0x1E

# bg_flags
EXT4_BG_INODE_UNINIT = 0x1  # inode table and bitmap not initialised: every inode is free
EXT4_BG_BLOCK_UNINIT = 0x2
EXT4_BG_INODE_ZEROED = 0x4

# ---------------------------------------------------------------- ext4_inode
# 0x00 i_mode i_uid i_size_lo i_atime i_ctime i_mtime i_dtime i_gid i_links_count
# 0x1C i_blocks_lo i_flags osd1.l_i_version i_block[15] (60 bytes)
# 0x64 i_generation i_file_acl_lo i_size_high i_obso_faddr
# 0x74 osd2: l_i_blocks_high l_i_file_acl_high l_i_uid_high l_i_gid_high
#            l_i_checksum_lo l_i_reserved
EXT4_INODE = struct.Struct("<HHIIIIIHHIII60sIIIIHHHHHH")
# large inodes (s_inode_size > 128) continue at 0x80 (i_extra_isize says how far):
# i_extra_isize i_checksum_hi i_ctime_extra i_mtime_extra i_atime_extra i_crtime
# i_crtime_extra i_version_hi i_projid
EXT4_INODE_EXTRA = struct.Struct("<HHIIIIIII")
I_BLOCK_OFFSET = 0x28
I_BLOCK_SIZE = 60
EXT4_N_BLOCKS = 15
EXT4_NDIR_BLOCKS = 12  # i_block[0..11] direct; 12 indirect, 13 double, 14 triple
L_I_CHECKSUM_LO_OFFSET = 0x7C
I_CHECKSUM_HI_OFFSET = 0x82
# i_extra_isize needed for each extra field to be present (its end minus 128)
EXTRA_CHECKSUM_HI_END = 4
EXTRA_CTIME_END = 8
EXTRA_MTIME_END = 12
EXTRA_ATIME_END = 16
EXTRA_CRTIME_END = 20
EXTRA_CRTIME_EXTRA_END = 24

# i_mode: the file type in the top four bits
S_IFMT = 0xF000
S_IFSOCK = 0xC000
S_IFLNK = 0xA000
S_IFREG = 0x8000
S_IFBLK = 0x6000
S_IFDIR = 0x4000
S_IFCHR = 0x2000
S_IFIFO = 0x1000

# i_flags
EXT4_SECRM_FL = 0x1
EXT4_COMPR_FL = 0x4
EXT4_ENCRYPT_FL = 0x800
EXT4_INDEX_FL = 0x1000  # a hashed-index (htree) directory
EXT4_HUGE_FILE_FL = 0x40000  # i_blocks counts file-system blocks, not 512-byte sectors
EXT4_EXTENTS_FL = 0x80000
EXT4_VERITY_FL = 0x100000
EXT4_EA_INODE_FL = 0x200000
EXT4_INLINE_DATA_FL = 0x10000000
EXT4_CASEFOLD_FL = 0x40000000

# the *_extra time fields: two epoch bits, then nanoseconds << 2
EXT4_EPOCH_BITS = 2
EXT4_EPOCH_MASK = (1 << EXT4_EPOCH_BITS) - 1

# special inodes
EXT4_BAD_INO = 1
EXT4_ROOT_INO = 2
EXT4_USR_QUOTA_INO = 3
EXT4_GRP_QUOTA_INO = 4
EXT4_BOOT_LOADER_INO = 5
EXT4_UNDEL_DIR_INO = 6
EXT4_RESIZE_INO = 7
EXT4_JOURNAL_INO = 8

# ---------------------------------------------------------------- extent tree
# ext4_extent_header: eh_magic eh_entries eh_max eh_depth eh_generation
EXT4_EXTENT_HEADER = struct.Struct("<HHHHI")
EXT4_EXT_MAGIC = 0xF30A
# ext4_extent_idx: ei_block ei_leaf_lo ei_leaf_hi ei_unused
EXT4_EXTENT_IDX = struct.Struct("<IIHH")
# ext4_extent: ee_block ee_len ee_start_hi ee_start_lo
EXT4_EXTENT = struct.Struct("<IHHI")
EXT_INIT_MAX_LEN = 1 << 15  # ee_len above this: an uninitialised extent of ee_len - 32768
EXT4_MAX_EXTENT_DEPTH = 5
# ext4_extent_tail (after eh_max entries of a tree block): et_checksum
EXT4_EXTENT_TAIL = struct.Struct("<I")

# ---------------------------------------------------------------- directories
# ext4_dir_entry_2: inode rec_len name_len file_type name[name_len]
EXT4_DIR_ENTRY_2 = struct.Struct("<IHBB")
# ext4_dir_entry (no INCOMPAT_FILETYPE): inode rec_len name_len(16 bits) name
EXT4_DIR_ENTRY = struct.Struct("<IHH")
EXT4_NAME_LEN = 255
EXT4_DIR_REC_LEN_MIN = 12  # an entry with a name of up to 4 bytes
EXT4_MAX_REC_LEN = (1 << 16) - 1  # rec_len of a whole 64 KiB block
# ext4_dir_entry_tail (last 12 bytes of a leaf block with metadata_csum):
# det_reserved_zero1 det_rec_len det_reserved_zero2 det_reserved_ft det_checksum
EXT4_DIR_ENTRY_TAIL = struct.Struct("<IHBBI")
EXT4_FT_DIR_CSUM = 0xDE
# dx_root_info (after the fake "." and ".." entries of an htree root block):
# reserved_zero hash_version info_length indirect_levels unused_flags
DX_ROOT_INFO = struct.Struct("<IBBBB")
# dx_countlimit: limit count (the first dx_entry's hash field), then dx_entry: hash block
DX_COUNTLIMIT = struct.Struct("<HH")
DX_ENTRY = struct.Struct("<II")
# dx_tail (after `limit` dx entries with metadata_csum): dt_reserved dt_checksum
DX_TAIL = struct.Struct("<II")

# ext4_dir_entry_2.file_type
EXT4_FT_UNKNOWN = 0
EXT4_FT_REG_FILE = 1
EXT4_FT_DIR = 2
EXT4_FT_CHRDEV = 3
EXT4_FT_BLKDEV = 4
EXT4_FT_FIFO = 5
EXT4_FT_SOCK = 6
EXT4_FT_SYMLINK = 7

#: the kind names used throughout cdp.ext4, by dirent file type and by i_mode type
FT_KIND = {
    EXT4_FT_UNKNOWN: "unknown", EXT4_FT_REG_FILE: "file", EXT4_FT_DIR: "dir",
    EXT4_FT_CHRDEV: "chr", EXT4_FT_BLKDEV: "blk", EXT4_FT_FIFO: "fifo",
    EXT4_FT_SOCK: "sock", EXT4_FT_SYMLINK: "symlink",
}
MODE_KIND = {
    S_IFREG: "file", S_IFDIR: "dir", S_IFCHR: "chr", S_IFBLK: "blk", S_IFIFO: "fifo",
    S_IFSOCK: "sock", S_IFLNK: "symlink",
}

# ---------------------------------------------------------------- extended attributes
# in-inode xattrs follow i_extra_isize: ext4_xattr_ibody_header { h_magic }, then
# ext4_xattr_entry: e_name_len e_name_index e_value_offs e_value_inum e_value_size
# e_hash e_name[e_name_len] (padded to 4 bytes); values are placed relative to the
# first entry; a 4-byte zero ends the entries
EXT4_XATTR_MAGIC = 0xEA020000
EXT4_XATTR_ENTRY = struct.Struct("<BBHIII")
EXT4_XATTR_INDEX_SYSTEM = 7
#: the inline data beyond i_block is the value of "system.data"
EXT4_INLINE_DATA_NAME = b"data"
EXT4_MIN_INLINE_DATA_SIZE = I_BLOCK_SIZE
EXT4_INLINE_DOTDOT_SIZE = 4  # an inline directory starts with its parent's inode number

# ---------------------------------------------------------------- time
EXT4_SYMLINK_MAX = 4096  # PATH_MAX: a longer "symlink" is damage
