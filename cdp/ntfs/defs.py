"""NTFS on-disk structures, declared once, with Microsoft's field names.

Every parser in :mod:`cdp.ntfs` reads through the precompiled :class:`struct.Struct`
objects below (little-endian, ``unpack_from`` on a buffer and an offset, no copies). The
comments give each structure's field order; offsets are relative to the structure start.
These layouts are fixed by the NTFS format (version 3.1) and must never change.
"""

from __future__ import annotations

import struct

# ---------------------------------------------------------------- PACKED_BOOT_SECTOR
# Jump[3] Oem[8] BytesPerSector SectorsPerCluster ReservedSectors Fats RootEntries
# Sectors Media SectorsPerFat SectorsPerTrack Heads HiddenSectors LargeSectors Unused[4]
# NumberSectors MftStartLcn Mft2StartLcn ClustersPerFileRecordSegment Reserved0[3]
# DefaultClustersPerIndexAllocationBuffer Reserved1[3] SerialNumber Checksum
PACKED_BOOT_SECTOR = struct.Struct("<3s8sHBHBHHBHHHII4sQQQb3sb3sQI")
NTFS_OEM_ID = b"NTFS    "
BOOT_SIGNATURE = b"\x55\xaa"  # at offset 510

# ---------------------------------------------------------------- FILE_RECORD_SEGMENT_HEADER
# MultiSectorHeader{Signature[4] UpdateSequenceArrayOffset UpdateSequenceArraySize}
# Lsn SequenceNumber ReferenceCount FirstAttributeOffset Flags FirstFreeByte
# BytesAvailable BaseFileRecordSegment NextAttributeInstance Reserved SegmentNumberLowPart
FILE_RECORD_SEGMENT_HEADER = struct.Struct("<4sHHQHHHHIIQHHI")
FILE_SIGNATURE = b"FILE"
BAAD_SIGNATURE = b"BAAD"

# FILE_RECORD_SEGMENT_HEADER.Flags
FILE_RECORD_SEGMENT_IN_USE = 0x0001
FILE_FILE_NAME_INDEX_PRESENT = 0x0002  # a directory

# a file reference: SegmentNumber in the low 48 bits, SequenceNumber in the high 16
MFT_SEGMENT_MASK = (1 << 48) - 1

# well-known file record numbers
MFT_RECORD = 0
ROOT_DIRECTORY_RECORD = 5
FIRST_USER_RECORD = 16

# ---------------------------------------------------------------- ATTRIBUTE_RECORD_HEADER
# TypeCode RecordLength FormCode NameLength NameOffset Flags Instance
ATTRIBUTE_RECORD_HEADER = struct.Struct("<IIBBHHH")
# Form.Resident: ValueLength ValueOffset ResidentFlags Reserved
RESIDENT_FORM = struct.Struct("<IHBB")
# Form.Nonresident: LowestVcn HighestVcn MappingPairsOffset CompressionUnit Reserved[5]
# AllocatedLength FileSize ValidDataLength
NONRESIDENT_FORM = struct.Struct("<qqHB5sqqq")
RESIDENT_FORM_CODE = 0
NONRESIDENT_FORM_CODE = 1

# ATTRIBUTE_RECORD_HEADER.Flags
ATTRIBUTE_FLAG_COMPRESSION_MASK = 0x00FF
ATTRIBUTE_FLAG_ENCRYPTED = 0x4000
ATTRIBUTE_FLAG_SPARSE = 0x8000

# ATTRIBUTE_TYPE_CODE
STANDARD_INFORMATION = 0x10
ATTRIBUTE_LIST = 0x20
FILE_NAME = 0x30
OBJECT_ID = 0x40
SECURITY_DESCRIPTOR = 0x50
VOLUME_NAME = 0x60
VOLUME_INFORMATION = 0x70
DATA = 0x80
INDEX_ROOT = 0x90
INDEX_ALLOCATION = 0xA0
BITMAP = 0xB0
REPARSE_POINT = 0xC0
END = 0xFFFFFFFF

# ---------------------------------------------------------------- STANDARD_INFORMATION
# CreationTime LastModificationTime LastChangeTime LastAccessTime FileAttributes
STANDARD_INFORMATION_V1 = struct.Struct("<QQQQI")

# ---------------------------------------------------------------- FILE_NAME
# ParentDirectory Info{CreationTime LastModificationTime LastChangeTime LastAccessTime
# AllocatedLength FileSize FileAttributes PackedEaSize} FileNameLength Flags FileName[]
FILE_NAME_HEADER = struct.Struct("<QQQQQqqIIBB")
# FILE_NAME.Flags: the name space of the name
FILE_NAME_POSIX = 0x00
FILE_NAME_NTFS = 0x01  # Win32
FILE_NAME_DOS = 0x02  # 8.3 only
FILE_NAME_NTFS_AND_DOS = 0x03  # a Win32 name that is also a valid 8.3 name

# ---------------------------------------------------------------- ATTRIBUTE_LIST_ENTRY
# AttributeTypeCode RecordLength AttributeNameLength AttributeNameOffset LowestVcn
# SegmentReference Instance AttributeName[]
ATTRIBUTE_LIST_ENTRY = struct.Struct("<IHBBqQH")

# ---------------------------------------------------------------- FileAttributes
FILE_ATTRIBUTE_READONLY = 0x0001
FILE_ATTRIBUTE_HIDDEN = 0x0002
FILE_ATTRIBUTE_SYSTEM = 0x0004
FILE_ATTRIBUTE_DIRECTORY = 0x0010
FILE_ATTRIBUTE_ARCHIVE = 0x0020
FILE_ATTRIBUTE_SPARSE_FILE = 0x0200
FILE_ATTRIBUTE_REPARSE_POINT = 0x0400
FILE_ATTRIBUTE_COMPRESSED = 0x0800
FILE_ATTRIBUTE_ENCRYPTED = 0x4000
DUP_FILE_NAME_INDEX_PRESENT = 0x10000000  # FILE_NAME.FileAttributes: a directory

# ---------------------------------------------------------------- time
#: FILETIME counts 100 ns ticks since 1601-01-01 UTC; this many ticks to 1970-01-01
FILETIME_UNIX_EPOCH = 116444736000000000


def filetime_to_ns(ft: int) -> int:
    """A FILETIME as nanoseconds since the Unix epoch (may be negative)."""
    return (ft - FILETIME_UNIX_EPOCH) * 100


# ---------------------------------------------------------------- partition types
# (the partition tables themselves are read by cdp.partition)
MBR_NTFS_TYPES = frozenset({0x07, 0x17, 0x27})
#: Microsoft basic data partition type GUID (EBD0A0A2-B9E5-4433-87C0-68B6B72699C7), on disk
GPT_BASIC_DATA = bytes.fromhex("a2a0d0ebe5b9334487c068b6b72699c7")
