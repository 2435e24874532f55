"""Read-only NTFS parsing for the file catalog (hand-written, ``struct`` based).

Modules, one per concept: :mod:`~cdp.ntfs.defs` (on-disk structures with Microsoft's
field names), :mod:`~cdp.ntfs.boot`, :mod:`~cdp.ntfs.record` (file records and fixups),
:mod:`~cdp.ntfs.attribute` (attribute values), :mod:`~cdp.ntfs.runlist`,
:mod:`~cdp.ntfs.mft` (the file system over a read callable) and
:mod:`~cdp.ntfs.partition` (finding NTFS on a disk). Damaged structures raise
:class:`cdp.errors.Corruption`; the record scan reports them per record instead.
"""

from cdp.ntfs.attribute import DataStream, FileName
from cdp.ntfs.boot import BootSector
from cdp.ntfs.mft import NtfsVolume, merge_extensions
from cdp.ntfs.partition import Partition, find_ntfs
from cdp.ntfs.record import FileRecord, parse_chunk

__all__ = [
    "BootSector",
    "DataStream",
    "FileName",
    "FileRecord",
    "NtfsVolume",
    "Partition",
    "find_ntfs",
    "merge_extensions",
    "parse_chunk",
]
