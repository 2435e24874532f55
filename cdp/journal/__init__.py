"""The append-only write journal: segments, records, group commit, recovery, verify.

Only this package opens segment files. Formats: docs/FORMATS.md ("Journal"). Rooms:
``writer`` (:class:`Journal`: append, group commit, roll, close, compaction commit),
``reader`` (its base :class:`~cdp.journal.reader.SegmentReader`: reads, scan, time
index), ``recovery`` (open), ``segment`` (scans, index sidecars), ``format``,
``compact``, ``verify``, ``fs``.
"""

from cdp.journal.compact import Pacer, PreparedCompaction, build_compacted
from cdp.journal.format import Compression, Record, RecordKind
from cdp.journal.fs import Clock, CrashSimFS, FileLayer, ManualClock, OsFileLayer
from cdp.journal.recovery import RecoveryReport
from cdp.journal.segment import Problem
from cdp.journal.tiered import NotLocal
from cdp.journal.tiering import SealedFile, install_segment
from cdp.journal.verify import VerifyReport, verify_journal
from cdp.journal.writer import Journal, JournalStats, SegmentInfo

__all__ = [
    "Clock",
    "Compression",
    "CrashSimFS",
    "FileLayer",
    "Journal",
    "JournalStats",
    "ManualClock",
    "NotLocal",
    "OsFileLayer",
    "Pacer",
    "PreparedCompaction",
    "Problem",
    "Record",
    "RecordKind",
    "RecoveryReport",
    "SealedFile",
    "SegmentInfo",
    "VerifyReport",
    "build_compacted",
    "install_segment",
    "verify_journal",
]
