"""The journal: append, group commit, read, time index, recovery on open.

Design notes
------------
- **One writer, the event loop.** ``append_*`` packs a record (precompiled structs, one
  incremental CRC32C over header tail + payload) into a ``bytearray`` and returns
  ``(seq, loc)`` at once. The buffer goes to the OS in large ``write`` calls when it
  passes ``buffer_bytes``; payloads of 256 KiB and more skip the copy and go out with
  ``writev``. No append ever waits for a disk sync. Under an event loop a timer hands
  the buffer to the OS within 50 ms, so only a power loss (not a process crash) can
  lose records that were never committed.
- **Group commit.** ``await commit()`` flushes the buffer, then one ``fdatasync`` in the
  journal's own worker thread makes everything appended so far durable. Callers that
  arrive while a sync is in flight wait for it and then share the *next* one, so N
  concurrent committers cost about two syncs, not N. Appends keep flowing meanwhile.
- **Rollover.** When a record does not fit, the segment is *sealed*: its bytes go to the
  OS and it is queued; the next sync fdatasyncs it, writes its index sidecar and fsyncs
  the directory (the new segment's name) before it syncs the open segment. So no commit
  returns before the earlier segment and the directory entry are durable.
- **Reads** use ``loc`` = byte offset of the record in its segment; the segment comes
  from bisecting first seqs, so a compaction that rewrites a segment with the same seq
  range keeps seqs valid. Records still in the buffer are read from the buffer.
- **Time index.** Timestamps never decrease (a clock stepping back repeats the last
  value). Sealed segments keep (timestamp, offset) per record in a sidecar loaded on
  demand (LRU); the open segment keeps them in memory. ``seq_at_time`` bisects the
  segments' first timestamps, then the segment's timestamps: O(log n).
- **Failure.** ENOSPC while writing truncates the file back to the last whole record and
  raises StoreFull: a record is appended entirely or not at all. A failed fdatasync
  leaves the kernel's dirty pages in an unknown state, so the journal refuses further
  work (``fsyncgate``); reopening recovers from what is on disk.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import errno
import itertools
import os
import struct
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import lz4.block
from crc32c import crc32c

from cdp.errors import (
    CdpError,
    ConfigError,
    Corruption,
    NotFound,
    PointError,
    StoreFull,
    UsageError,
)
from cdp.journal.compact import (
    CompactSource,
    Live,
    PreparedCompaction,
    build_compacted,
    discard,
)
from cdp.journal.format import (
    CHUNK_ENTRY,
    CHUNK_ENTRY_SIZE,
    CHUNK_SIZE,
    CHUNKED_VERSION,
    CRC_START,
    ERROR_PAYLOAD,
    GRANULE_SIZE,
    GRANULE_TABLE_SIZE,
    GRANULES,
    LZ4_MIN,
    MARKER_PAYLOAD,
    MAX_DATA,
    MAX_PAYLOAD,
    MAX_TEXT,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    RECORD_PREFIX,
    RECORD_TAIL,
    RECORD_VERSION,
    RECORD_VERSIONS,
    REWIND_PAYLOAD,
    SEGMENT_COMPACTED,
    SEGMENT_HEADER_SIZE,
    ChunkTable,
    Compression,
    Record,
    RecordKind,
    chunk_ok,
    covered_size,
    decode_chunk,
    decode_record,
    header_problem,
    index_name,
    pack_granule_crcs,
    pack_segment_header,
    parse_chunk_table,
    parse_segment_name,
    segment_name,
)
from cdp.journal.fs import Buffer, Clock, FileLayer, OsFileLayer
from cdp.journal.segment import (
    Problem,
    ReadWindow,
    SegmentScan,
    load_index_entries,
    read_index_header,
    scan_segment,
    write_index,
)

#: payloads at least this large bypass the buffer (written with writev, no copy)
DIRECT_WRITE = 256 << 10
#: after a failed lz4 attempt skip up to this many attempts (records or chunks) before
#: trying again
LZ4_MAX_SKIP = 64
#: chunk tables of chunked records kept in memory for slice reads
LAYOUT_CACHE = 4096
#: an lz4 chunk of 64 KiB stored in at most this many bytes (a 64:1 ratio: zeros, a fill
#: pattern) is decoded once and shared by every chunk with the same stored bytes
PATTERN_STORED = 1024
#: such decoded chunks kept (64 KiB each)
PATTERN_CACHE = 64
#: sealed segments whose index arrays stay in memory
INDEX_CACHE = 16
#: read handles kept open
READ_FDS = 32
#: seconds after which buffered records are handed to the OS without a commit
FLUSH_DELAY = 0.05
#: after this many bytes handed to the OS, ask it to start writing them to the device
#: (sync_file_range WRITE, no wait): a FLUSH then waits for the rest only
WRITEBACK_BYTES = 8 << 20

_OPEN, _SEALING, _SEALED = 0, 1, 2
_NO_TS = 1 << 63  # first_ts of an empty segment: after every real timestamp

_W = int(RecordKind.WRITE)
_I = int(RecordKind.INIT)
_Z = int(RecordKind.ZERO)
_M = int(RecordKind.MARKER)
_R = int(RecordKind.REWIND)
_E = int(RecordKind.ERROR)


@dataclass
class RecoveryReport:
    """What :meth:`Journal.open` found and did.

    ``dropped_bytes``/``dropped_records``: torn tail cut off (never durable data).
    ``problems``: damage inside the durable part, left in place and reported.
    """

    dropped_bytes: int = 0
    dropped_records: int = 0
    last_seq: int = 0
    truncated_segment: str | None = None
    truncated_at: int | None = None
    removed_segments: list[str] = field(default_factory=list)
    rebuilt_indexes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no damage was found (a torn tail is not damage)."""
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


@dataclass
class SegmentInfo:
    """One segment as :meth:`Journal.segments` lists it."""

    name: str
    first_seq: int
    last_seq: int
    records: int
    bytes: int
    first_ts: int | None
    sealed: bool
    compacted: bool = False
    raw_bytes: int = 0


@dataclass
class JournalStats:
    """Totals over all segments: ``raw_bytes`` before, ``stored_bytes`` after compression."""

    records: int
    raw_bytes: int
    stored_bytes: int
    file_bytes: int
    segments: int


class _Seg:
    """In-memory state of one segment."""

    __slots__ = ("compacted", "count", "first_seq", "first_ts", "last_ts", "name", "offs",
                 "raw_bytes", "size", "state", "ts")

    def __init__(self, first_seq: int) -> None:
        self.first_seq = first_seq
        self.name = segment_name(first_seq)
        self.count = 0
        self.size = SEGMENT_HEADER_SIZE
        self.first_ts = _NO_TS
        self.last_ts = 0
        self.raw_bytes = 0
        self.ts: array[int] | None = None
        self.offs: array[int] | None = None
        self.state = _OPEN
        self.compacted = False


class ChunkCache(Protocol):
    """A cache of decoded payload chunks that :meth:`Journal.read_slice` consults.

    Key ``(seq, i)`` holds raw payload bytes ``[i*CHUNK_SIZE, (i+1)*CHUNK_SIZE)`` of record
    ``seq`` (fewer for its last chunk), whatever the record's stored layout.
    """

    def get(self, key: tuple[int, int]) -> bytes | None: ...

    def put(self, key: tuple[int, int], data: bytes) -> None: ...


def _translate(exc: OSError, what: str) -> CdpError | OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"journal: no space left while {what}")
    return exc


class Journal:
    """An append-only, segmented, checksummed write journal. Create with :meth:`open`.

    Not thread-safe: call it from one thread (the event loop's); only the sync work of
    :meth:`commit` runs in the journal's own worker thread.
    """

    # ----------------------------------------------------------------------- opening

    def __init__(self, directory: str, segment_bytes: int, sync: str, fs: FileLayer,
                 clock: Clock, buffer_bytes: int) -> None:
        self._dir = directory
        self._segment_bytes = segment_bytes
        self._sync_mode = sync
        self._fs = fs
        self._clock = clock
        self._time_ns = time.time_ns if type(clock) is Clock else clock.time_ns
        self._buffer_bytes = buffer_bytes
        # fixed-size buffer: records are packed in place, never reallocated
        self._buf = bytearray(buffer_bytes + DIRECT_WRITE + RECORD_HEADER_SIZE)
        self._mv = memoryview(self._buf)
        self._w = 0  # bytes of the buffer in use
        self._segs: list[_Seg] = []
        self._firsts: list[int] = []
        self._first_ts: list[int] = []
        self._cur = _Seg(1)
        self._fd = -1
        self._file_size = 0
        self._wb_from = 0  # start of the current segment's bytes not yet handed to writeback
        self._last_seq = 0
        self._last_ts = 0
        self._durable_seq = 0
        self._sealing: deque[tuple[_Seg, int]] = deque()
        self._to_close: list[int] = []
        self._dir_dirty = False
        self._read_fds: OrderedDict[int, int] = OrderedDict()
        #: segments being replaced by a compaction: first seq -> descriptor of the old file
        self._pins: dict[int, int] = {}
        self._loaded: OrderedDict[int, _Seg] = OrderedDict()
        self._sync_lock = threading.Lock()
        self._sync_task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._wb_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._wb_future: concurrent.futures.Future[None] | None = None
        self._failed: BaseException | None = None
        self._closed = False
        self._lz_skip = 0
        self._lz_backoff = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._cur_ts_append = array("q").append
        self._cur_offs_append = array("q").append
        #: seq -> (loc, checked tables, segment) of chunked records read lately
        self._layouts: OrderedDict[int, tuple[int, ChunkTable, _Seg]] = OrderedDict()
        #: decoded fill-pattern chunks keyed by their stored (lz4) bytes, see _chunk_fast
        self._patterns: OrderedDict[bytes, bytes] = OrderedDict()
        self.recovery = RecoveryReport()
        #: sidecars rebuilt after open (damaged or missing when first needed)
        self.repairs: list[str] = []

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        segment_bytes: int = 256 << 20,
        sync: str = "flush",
        fs: FileLayer | None = None,
        clock: Clock | None = None,
        *,
        buffer_bytes: int = 1 << 20,
    ) -> Journal:
        """Open (creating if needed) the journal in ``directory`` and recover it.

        Sealed segments cost one index-header read each; the last segment is scanned
        (O(its bytes)), a torn tail truncated, damage reported in ``journal.recovery``.
        ``sync`` is ``"flush"`` or ``"always"`` (see docs/ARCHITECTURE.md).
        """
        if sync not in ("flush", "always"):
            raise ConfigError(f"journal sync must be 'flush' or 'always', not {sync!r}")
        if segment_bytes < 4096:
            raise ConfigError(f"journal segment_bytes must be at least 4096, not {segment_bytes}")
        if buffer_bytes < 0:
            raise ConfigError("journal buffer_bytes must not be negative")
        j = cls(os.fspath(directory), segment_bytes, sync, fs or OsFileLayer(),
                clock or Clock(), buffer_bytes)
        j._recover()
        return j

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def _recover(self) -> None:
        fs, rep = self._fs, self.recovery
        fs.makedirs(self._dir)
        names = fs.listdir(self._dir)
        for n in names:
            if n.endswith(".tmp"):
                fs.unlink(self._path(n))
        firsts = sorted(f for f in (parse_segment_name(n) for n in names) if f is not None)
        if not firsts:
            self._create_first_segment(1)
            return
        segs: list[_Seg] = []
        scans: dict[int, SegmentScan] = {}
        for f in firsts[:-1]:
            segs.append(self._open_sealed(f, scans))
        last = firsts[-1]
        scan = scan_segment(fs, self._dir, last)
        if segs and scan.count == 0 and not scan.problems:
            prev = scans.get(segs[-1].first_seq)
            if prev is not None and prev.first_seq + prev.count != last:
                # the previous segment never became durable up to its end (no sidecar,
                # records missing), so nothing in this one did either: drop this file,
                # the short one becomes the tail
                fs.unlink(self._path(segment_name(last)))
                fs.fsync_dir(self._dir)
                rep.removed_segments.append(segment_name(last))
                rep.dropped_bytes += scan.size
                segs.pop()
                scan = prev
                last = prev.first_seq
        for s in segs:
            sc = scans.get(s.first_seq)
            if sc is not None:
                self._note_scan_problems(sc, tail=False)
        # the tail segment
        cur = _Seg(last)
        fd = fs.open_append(self._path(cur.name))
        if scan.header_error is not None and scan.count == 0:
            fs.truncate(fd, 0)
            fs.write(fd, pack_segment_header(last))
            fs.fdatasync(fd)
            rep.dropped_bytes += scan.size
            rep.dropped_records += scan.torn_records
            if scan.size:
                rep.truncated_segment, rep.truncated_at = cur.name, 0
            size = SEGMENT_HEADER_SIZE
        else:
            self._note_scan_problems(scan, tail=True)
            size = scan.valid_end
            if scan.torn_at is not None:
                fs.truncate(fd, scan.torn_at)
                fs.fdatasync(fd)
                rep.dropped_bytes += scan.torn_bytes
                rep.dropped_records += scan.torn_records
                rep.truncated_segment, rep.truncated_at = cur.name, scan.torn_at
        cur.ts, cur.offs = scan.ts, scan.offs
        cur.count, cur.size, cur.raw_bytes = scan.count, size, scan.raw_bytes
        if scan.count:
            cur.first_ts, cur.last_ts = scan.ts[0], scan.last_ts
        segs.append(cur)
        for a, b in itertools.pairwise(segs):
            if a.count and b.first_seq != a.first_seq + a.count:
                rep.problems.append(Problem(b.name, 0, a.first_seq + a.count,
                                            f"seq gap: segment starts at {b.first_seq}"))
        self._segs = segs
        self._firsts = [s.first_seq for s in segs]
        self._first_ts = [s.first_ts if s.count else self._prev_first_ts(i, segs)
                          for i, s in enumerate(segs)]
        self._set_current(cur, fd, size)
        self._last_seq = cur.first_seq + cur.count - 1
        self._last_ts = max((s.last_ts for s in segs), default=0)
        self._durable_seq = self._last_seq
        rep.last_seq = self._last_seq

    @staticmethod
    def _prev_first_ts(i: int, segs: list[_Seg]) -> int:
        if i == len(segs) - 1:
            return _NO_TS
        for s in reversed(segs[:i]):
            if s.count:
                return s.first_ts
        return 0

    def _note_scan_problems(self, scan: SegmentScan, tail: bool) -> None:
        rep = self.recovery
        if scan.header_error is not None:
            rep.problems.append(Problem(scan.name, 0, scan.first_seq, scan.header_error))
        rep.problems.extend(scan.problems)
        if not tail and scan.torn_at is not None:
            rep.problems.append(Problem(
                scan.name, scan.torn_at, scan.first_seq + scan.count,
                f"{scan.torn_bytes} damaged bytes at the end of a sealed segment"))

    def _open_sealed(self, first: int, scans: dict[int, SegmentScan]) -> _Seg:
        fs = self._fs
        seg = _Seg(first)
        seg.state = _SEALED
        size = fs.size(self._path(seg.name))
        hdr = read_index_header(fs, self._dir, first)
        if hdr is not None and hdr.data_end == size:
            seg.count, seg.size, seg.raw_bytes = hdr.count, size, hdr.raw_bytes
            seg.first_ts, seg.last_ts = hdr.first_ts, hdr.last_ts
            seg.compacted = bool(hdr.flags & SEGMENT_COMPACTED)
            return seg
        scan = scan_segment(fs, self._dir, first)
        scans[first] = scan
        self._fill_from_scan(seg, scan)
        if scan.header_error is None and not scan.problems and scan.torn_at is None:
            try:
                write_index(fs, self._dir, first, scan.ts, scan.offs, size, scan.raw_bytes,
                            scan.flags)
                fs.fsync_dir(self._dir)
                self.recovery.rebuilt_indexes.append(index_name(first))
            except OSError:
                pass  # derived data; rebuilt again next time
        return seg

    @staticmethod
    def _fill_from_scan(seg: _Seg, scan: SegmentScan) -> None:
        seg.count, seg.size, seg.raw_bytes = scan.count, scan.size, scan.raw_bytes
        seg.ts, seg.offs = scan.ts, scan.offs
        seg.compacted = bool(scan.flags & SEGMENT_COMPACTED)
        if scan.count:
            seg.first_ts, seg.last_ts = scan.ts[0], scan.last_ts

    def _create_first_segment(self, first: int) -> None:
        fs = self._fs
        seg = _Seg(first)
        seg.ts, seg.offs = array("q"), array("q")
        fd = fs.open_append(self._path(seg.name))
        fs.truncate(fd, 0)
        fs.write(fd, pack_segment_header(first))
        fs.fdatasync(fd)
        fs.fsync_dir(self._dir)
        self._segs, self._firsts, self._first_ts = [seg], [first], [_NO_TS]
        self._set_current(seg, fd, SEGMENT_HEADER_SIZE)
        self._last_seq = self._durable_seq = first - 1
        self.recovery.last_seq = self._last_seq

    def _set_current(self, seg: _Seg, fd: int, size: int) -> None:
        if seg.ts is None or seg.offs is None:
            seg.ts, seg.offs = array("q"), array("q")
        seg.state = _OPEN
        self._cur = seg
        self._fd = fd
        self._file_size = size
        self._wb_from = size
        self._cur_ts_append = seg.ts.append
        self._cur_offs_append = seg.offs.append

    # ----------------------------------------------------------------------- appending

    def append_write(self, offset: int, data: Buffer, init: bool = False) -> tuple[int, int]:
        """Append a WRITE (or INIT) record of ``data`` at volume ``offset``; (seq, loc).

        Buffered, never syncs. Payloads over CHUNK_SIZE are stored chunked (each chunk
        with its own CRC, lz4-compressed only when that makes it smaller); smaller ones
        as one block, compressed by the same rule. Cost: O(len(data)) (CRC, maybe lz4,
        one copy below 256 KiB stored).
        """
        n = len(data)
        if offset < 0 or n > MAX_DATA:
            raise UsageError(f"journal write at {offset} of {n} bytes out of range")
        if n > CHUNK_SIZE:
            return self._append_chunked(_I if init else _W, offset, data)
        if n >= LZ4_MIN:
            if self._lz_skip:
                self._lz_skip -= 1
            else:
                packed = lz4.block.compress(data, store_size=False)
                if len(packed) <= n - (n >> 3):  # keep only a saving of 1/8 or more
                    self._lz_backoff = 0
                    return self._append(_I if init else _W, offset, n, packed, 1, n)
                b = self._lz_backoff = min(LZ4_MAX_SKIP, self._lz_backoff * 2 or 1)
                self._lz_skip = b
        return self._append(_I if init else _W, offset, n, data, 0, n)

    def append_zero(self, offset: int, length: int) -> tuple[int, int]:
        """Append a ZERO record (trim / write-zeroes of ``length`` bytes); (seq, loc)."""
        if offset < 0 or length < 0:
            raise UsageError(f"journal zero at {offset} of {length} bytes out of range")
        return self._append(_Z, offset, length, b"", 0, 0)

    def append_marker(self, marker_id: int, label: str) -> tuple[int, int]:
        """Append a MARKER record (snapshot ``marker_id`` named ``label``); (seq, loc)."""
        raw = label.encode("utf-8")
        if len(raw) > MAX_TEXT or not 0 <= marker_id < 1 << 64:
            raise UsageError("marker id must be a u64 and label at most 65535 UTF-8 bytes")
        p = MARKER_PAYLOAD.pack(marker_id, len(raw)) + raw
        return self._append(_M, 0, 0, p, 0, len(p))

    def append_rewind(self, target_seq: int) -> tuple[int, int]:
        """Append a REWIND record ("from here on the volume is as at target_seq")."""
        if not 0 <= target_seq <= self._last_seq:
            raise UsageError(f"rewind target {target_seq} is not an existing point")
        p = REWIND_PAYLOAD.pack(target_seq)
        return self._append(_R, 0, 0, p, 0, len(p))

    def append_error(self, code: int, offset: int, length: int, message: str) -> tuple[int, int]:
        """Append an ERROR record: ``code`` failed on ``[offset, offset+length)``."""
        if not 0 <= code < 1 << 32 or offset < 0 or length < 0:
            raise UsageError("error code must be a u32 and the range non-negative")
        raw = message.encode("utf-8")[:MAX_TEXT]
        p = ERROR_PAYLOAD.pack(code, len(raw)) + raw
        return self._append(_E, offset, length, p, 0, len(p))

    def _append(self, kind: int, offset: int, length: int, payload: Buffer, comp: int,
                raw: int) -> tuple[int, int]:
        if self._failed is not None:
            raise self._failed
        stored = len(payload)
        w, pos = self._room(RECORD_HEADER_SIZE + stored)
        seq, ts = self._stamp()
        if stored >= DIRECT_WRITE:
            tail = _TAIL_PACK(RECORD_VERSION, kind, comp, 0, stored, seq, ts, offset, length)
            head = _PREFIX_PACK(RECORD_MAGIC, _CRC(payload, _CRC(tail))) + tail
            self._write_direct(w, pos + RECORD_HEADER_SIZE + stored, head, [payload])
        else:
            if not w:
                self._arm_flush_timer()
            mv = self._mv
            end = w + RECORD_HEADER_SIZE + stored
            _HEADER_PACK_INTO(self._buf, w, RECORD_MAGIC, 0, RECORD_VERSION, kind, comp, 0,
                              stored, seq, ts, offset, length)
            mv[w + RECORD_HEADER_SIZE : end] = payload
            _U32_PACK_INTO(self._buf, w + 4, _CRC(mv[w + CRC_START : end]))
            self._w = end
        return self._appended(seq, ts, pos, raw)

    def _append_chunked(self, kind: int, offset: int, data: Buffer) -> tuple[int, int]:
        """Append a data record of more than one chunk: chunk table + chunks."""
        if self._failed is not None:
            raise self._failed
        mv = data if isinstance(data, memoryview) else memoryview(data)
        if mv.itemsize != 1 or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        count = (n + CHUNK_SIZE - 1) // CHUNK_SIZE
        gbase = CHUNK_ENTRY_SIZE * count
        stored = (CHUNK_ENTRY_SIZE + GRANULE_TABLE_SIZE) * count
        table = bytearray(stored)
        parts: list[Buffer] = [table]
        skip, backoff = self._lz_skip, self._lz_backoff
        compress, pack_entry, crc = _LZ4, _ENTRY_PACK_INTO, _CRC
        for i in range(count):
            c: Buffer = mv[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
            comp = 0
            if len(c) >= LZ4_MIN:
                if skip:
                    skip -= 1
                else:
                    packed = compress(c, store_size=False)
                    if len(packed) <= len(c) - (len(c) >> 3):
                        c, comp, backoff = packed, 1, 0
                    else:
                        backoff = skip = min(LZ4_MAX_SKIP, backoff * 2 or 1)
            if comp:
                pack_entry(table, CHUNK_ENTRY_SIZE * i, len(c), comp, crc(c))
            else:  # raw: a CRC per 4 KiB granule (version 3), none for the chunk
                pack_entry(table, CHUNK_ENTRY_SIZE * i, len(c), 0, 0)
                if len(c) == CHUNK_SIZE:
                    _GRANULES_PACK_INTO(
                        table, gbase + GRANULE_TABLE_SIZE * i,
                        *map(crc, [c[g : g + GRANULE_SIZE] for g in _GRANULE_OFFSETS]))
                else:
                    pack_granule_crcs(c, table, gbase + GRANULE_TABLE_SIZE * i)
            parts.append(c)
            stored += len(c)
        self._lz_skip, self._lz_backoff = skip, backoff

        w, pos = self._room(RECORD_HEADER_SIZE + stored)
        seq, ts = self._stamp()
        tail = _TAIL_PACK(CHUNKED_VERSION, kind, _CHUNKED, 0, stored, seq, ts, offset, n)
        head = _PREFIX_PACK(RECORD_MAGIC, crc(table, crc(tail))) + tail
        if stored >= DIRECT_WRITE:
            self._write_direct(w, pos + RECORD_HEADER_SIZE + stored, head, parts)
        else:
            if not w:
                self._arm_flush_timer()
            mv_buf = self._mv
            mv_buf[w : w + RECORD_HEADER_SIZE] = head
            p = w + RECORD_HEADER_SIZE
            for c in parts:
                k = len(c)
                mv_buf[p : p + k] = c
                p += k
            self._w = p
        return self._appended(seq, ts, pos, n)

    def _room(self, size: int) -> tuple[int, int]:
        """Make room for a record of ``size`` bytes (header included): start a new
        segment when it would not fit in this one, hand the buffer to the OS when it
        would not fit there. Returns (bytes now buffered, file position of the record)."""
        w = self._w
        if self._file_size + w + size > self._segment_bytes and self._cur.count:
            self._roll()
            w = 0
        elif w + size > self._buffer_bytes and w:
            self._flush()
            w = 0
        return w, self._file_size + w

    def _stamp(self) -> tuple[int, int]:
        """The next record's seq and timestamp (never before the last one's)."""
        ts = self._time_ns()
        return self._last_seq + 1, ts if ts >= self._last_ts else self._last_ts

    def _write_direct(self, w: int, new_size: int, head: bytes, parts: list[Buffer]) -> None:
        """Write the buffered ``w`` bytes, then a large record (header + parts), in one
        writev, bypassing the user-space buffer; on failure nothing counts as written."""
        try:
            self._fs.writev(self._fd, [self._mv[:w], head, *parts] if w else [head, *parts])
        except OSError as exc:
            raise self._undo_write(exc) from exc
        self._file_size = new_size
        self._w = 0
        self._start_writeback()

    def _appended(self, seq: int, ts: int, pos: int, raw: int) -> tuple[int, int]:
        """Bookkeeping of a record just placed at ``pos`` of the current segment."""
        cur = self._cur
        if not cur.count:
            cur.first_ts = ts
            self._first_ts[-1] = ts
        cur.count += 1
        cur.raw_bytes += raw
        self._cur_ts_append(ts)
        self._cur_offs_append(pos)
        self._last_seq = seq
        self._last_ts = ts
        return seq, pos

    def _arm_flush_timer(self) -> None:
        """Hand buffered records to the OS within FLUSH_DELAY even if nobody commits,
        so a crash of the process alone (not the machine) loses nothing appended."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop: the buffer goes out when full, on commit or close
        t = self._flush_timer
        if t is not None and not t.cancelled() and t.when() > loop.time() - 1.0:
            return  # one is pending (a timer long overdue belongs to a finished loop)
        self._flush_timer = loop.call_later(FLUSH_DELAY, self._timer_flush)

    def _timer_flush(self) -> None:
        self._flush_timer = None
        if self._closed or self._failed is not None:
            return
        try:
            self._flush()
        except (CdpError, OSError):
            pass  # the next append or commit raises it to a caller

    def _undo_write(self, exc: OSError) -> BaseException:
        """After a failed write: cut the file back to its last whole record."""
        try:
            self._fs.truncate(self._fd, self._file_size)
        except OSError as exc2:
            self._failed = exc2
            return exc2
        return _translate(exc, "appending to the journal")

    def _flush(self) -> None:
        """Hand the buffer to the OS (no sync). StoreFull leaves the buffer as it was."""
        w = self._w
        if not w:
            return
        try:
            self._fs.write(self._fd, self._mv[:w])
        except OSError as exc:
            raise self._undo_write(exc) from exc
        self._file_size += w
        self._w = 0
        self._start_writeback()

    def _start_writeback(self) -> None:
        """Once WRITEBACK_BYTES were handed to the OS since the last call, have it start
        writing them to the device: it works while ingest goes on, so a later fdatasync
        finds little left to write (RocksDB's bytes_per_sync). The call runs on a worker thread (it can
        block while the device queue is full); handles are closed only after it ran
        (:meth:`_writeback_wait`). Advice only; errors ignored."""
        if self._file_size - self._wb_from < WRITEBACK_BYTES:
            return
        ex = self._wb_executor
        if ex is None:
            ex = self._wb_executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="journal-writeback")
        self._wb_future = ex.submit(self._writeback, self._fd, self._wb_from,
                                    self._file_size - self._wb_from)
        self._wb_from = self._file_size

    def _writeback(self, fd: int, offset: int, length: int) -> None:
        try:
            self._fs.start_writeback(fd, offset, length)
        except OSError:
            pass

    def _writeback_wait(self) -> None:
        """Wait for the writeback calls queued so far (before closing a handle)."""
        f, self._wb_future = self._wb_future, None
        if f is not None:
            f.result()

    def _roll(self) -> None:
        """Seal the open segment and start the next one (durable at the next sync)."""
        self._flush()
        fs = self._fs
        first = self._last_seq + 1
        self._cur.size = self._file_size
        self._cur.last_ts = self._last_ts
        seg = _Seg(first)
        path = self._path(seg.name)
        try:
            fd = fs.open_append(path)
        except OSError as exc:
            raise _translate(exc, "creating a segment") from exc
        try:
            fs.truncate(fd, 0)
            fs.write(fd, pack_segment_header(first))
        except OSError as exc:
            fs.close(fd)
            try:
                fs.unlink(path)
            except OSError:
                pass
            raise _translate(exc, "creating a segment") from exc
        old = self._cur
        old.state = _SEALING
        self._sealing.append((old, self._fd))
        self._loaded[old.first_seq] = old
        self._segs.append(seg)
        self._firsts.append(first)
        self._first_ts.append(_NO_TS)
        self._dir_dirty = True
        self._set_current(seg, fd, SEGMENT_HEADER_SIZE)
        self._evict()

    # ----------------------------------------------------------------------- durability

    @property
    def sync_mode(self) -> str:
        """``"flush"`` or ``"always"`` as opened."""
        return self._sync_mode

    def _do_sync(self, fd: int) -> None:
        """Worker-thread part of a sync: seal queued segments, fdatasync, fsync dir."""
        fs = self._fs
        with self._sync_lock:
            if self._closed:
                raise CdpError("journal is closed")
            try:
                while self._sealing:
                    seg, sfd = self._sealing[0]
                    fs.fdatasync(sfd)
                    if seg.ts is not None and seg.offs is not None:
                        try:
                            write_index(fs, self._dir, seg.first_seq, seg.ts, seg.offs,
                                        seg.size, seg.raw_bytes)
                        except OSError:
                            pass  # derived data: rebuilt by a scan when missing
                    self._sealing.popleft()
                    seg.state = _SEALED
                    self._to_close.append(sfd)
                    self._dir_dirty = True
                fs.fdatasync(fd)
                if self._dir_dirty:
                    self._dir_dirty = False
                    fs.fsync_dir(self._dir)
            except OSError as exc:
                err = _translate(exc, "syncing the journal")
                self._failed = err
                raise err from exc

    def _reap(self) -> None:
        """Close handles of segments whose sealing finished (no sync may be in flight)."""
        if self._to_close:
            self._writeback_wait()
        while self._to_close:
            self._fs.close(self._to_close.pop())

    def sync(self) -> None:
        """Block until everything appended is durable. Cost: fdatasync(s) on this thread."""
        if self._failed is not None:
            raise self._failed
        self._flush()
        covered = self._last_seq
        self._do_sync(self._fd)
        if covered > self._durable_seq:
            self._durable_seq = covered
        if self._sync_task is None:
            self._reap()

    async def commit(self) -> None:
        """Return once every record appended before the call is durable.

        Concurrent callers share syncs: one fdatasync (in a worker thread) covers all
        records appended before it started; later callers join the next one.
        """
        target = self._last_seq
        while self._durable_seq < target:
            if self._failed is not None:
                raise self._failed
            task = self._sync_task
            if task is None:
                task = self._sync_task = asyncio.get_running_loop().create_task(self._run_sync())
            await asyncio.shield(task)

    async def _run_sync(self) -> None:
        try:
            self._flush()
            covered = self._last_seq
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="journal-sync")
            await asyncio.get_running_loop().run_in_executor(self._executor, self._do_sync,
                                                             self._fd)
            if covered > self._durable_seq:
                self._durable_seq = covered
        finally:
            self._sync_task = None
        self._reap()

    def close(self) -> None:
        """Make everything durable and release all handles. Idempotent."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self.sync()
        finally:
            with self._sync_lock:
                self._closed = True
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            fs = self._fs
            self._writeback_wait()
            if self._wb_executor is not None:
                self._wb_executor.shutdown(wait=True)
            for _seg, fd in self._sealing:
                fs.close(fd)
            self._sealing.clear()
            self._reap()
            for fd in self._read_fds.values():
                fs.close(fd)
            self._read_fds.clear()
            fs.close(self._fd)
            if self._executor is not None:
                self._executor.shutdown(wait=False)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------- positions

    @property
    def last_seq(self) -> int:
        """Seq of the newest record (0 when empty)."""
        return self._last_seq

    @property
    def durable_seq(self) -> int:
        """Every record with a seq up to this one survives a power loss."""
        return self._durable_seq

    @property
    def first_seq(self) -> int:
        """Seq of the oldest record kept (1 unless old segments were removed)."""
        return self._firsts[0]

    # ----------------------------------------------------------------------- reading

    def _seg_for(self, seq: int) -> _Seg:
        if not self._firsts[0] <= seq <= self._last_seq:
            raise NotFound(f"seq {seq} is not in the journal "
                           f"({self._firsts[0]}..{self._last_seq})")
        seg = self._segs[bisect.bisect_right(self._firsts, seq) - 1]
        if seq >= seg.first_seq + seg.count:
            raise NotFound(f"seq {seq} is not in segment {seg.name}")
        return seg

    def _rfd(self, seg: _Seg) -> int:
        fds = self._read_fds
        fd = fds.get(seg.first_seq)
        if fd is not None:
            fds.move_to_end(seg.first_seq)
            return fd
        fd = self._pins.get(seg.first_seq)
        if fd is not None:  # a compaction renames the file meanwhile: read the old one
            return fd
        fd = self._fs.open_read(self._path(seg.name))
        fds[seg.first_seq] = fd
        if len(fds) > READ_FDS:
            self._fs.close(fds.popitem(last=False)[1])
        return fd

    def _raw(self, seg: _Seg, seq: int, loc: int) -> tuple[bytes, bytes, str]:
        where = f"segment {seg.name} offset {loc} seq {seq}"
        if not SEGMENT_HEADER_SIZE <= loc < self._size(seg):
            raise Corruption(f"{where}: location outside the segment")
        if seg is self._cur and loc >= self._file_size:
            b = self._mv[: self._w]
            i = loc - self._file_size
            head = bytes(b[i : i + RECORD_HEADER_SIZE])
            slen = RECORD_HEADER.unpack_from(head)[6] if len(head) == RECORD_HEADER_SIZE else 0
            j = i + RECORD_HEADER_SIZE
            return head, bytes(b[j : j + min(slen, MAX_PAYLOAD)]), where
        fd = self._rfd(seg)
        data = self._fs.pread(fd, RECORD_HEADER_SIZE + 8192, loc)
        if len(data) < RECORD_HEADER_SIZE:
            return data, b"", where
        slen = min(RECORD_HEADER.unpack_from(data)[6], MAX_PAYLOAD)
        if RECORD_HEADER_SIZE + slen <= len(data):
            return data[:RECORD_HEADER_SIZE], data[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + slen], where
        return data[:RECORD_HEADER_SIZE], self._fs.pread(fd, slen, loc + RECORD_HEADER_SIZE), where

    def read_record(self, seq: int, loc: int) -> Record:
        """Record ``seq`` stored at ``loc``, CRC-checked and decoded.

        Raises Corruption (segment, offset, seq in the message) if the bytes there are
        damaged or hold another seq; NotFound for a seq outside the journal.
        Cost: one or two preads (none for buffered records) + CRC + decompression.
        """
        seg = self._seg_for(seq)
        loc = self._where(seg, seq, loc)
        head, stored, where = self._raw(seg, seq, loc)
        return decode_record(head, stored, loc, where, seq)

    def read_payload(self, seq: int, loc: int) -> bytes:
        """Decoded payload of record ``seq`` at ``loc`` (CRC checked, as read_record);
        PointError if compaction removed (part of) it."""
        rec = self.read_record(seq, loc)
        if rec.elided:
            raise PointError(f"seq {seq}: its data was expired by retention")
        return rec.payload

    def _where(self, seg: _Seg, seq: int, loc: int) -> int:
        """Where record ``seq`` really is: ``loc``, or for a compacted segment the
        offset its index gives (compaction moved it)."""
        if not seg.compacted:
            return loc
        _ts, offs = self._load(seg)
        return offs[seq - seg.first_seq]

    def read_slice(self, seq: int, loc: int, poff: int, length: int, *,
                   cache: ChunkCache | None = None) -> bytes:
        """Payload bytes ``[poff, poff+length)`` of record ``seq`` at ``loc``
        (:meth:`read_slice_view` as bytes)."""
        lay = self._layouts.get(seq)
        if lay is not None and lay[0] == loc and poff >= 0:
            # a raw chunk of a version 3 record whose tables are remembered: its granules
            table = lay[1]
            i = poff >> _CHUNK_SHIFT
            if (table.granules is not None and i == (poff + length - 1) >> _CHUNK_SHIFT
                    and i < table.count and table.comps[i] == _NONE_COMP and length > 0):
                v = self._granules_fast(lay[2], seq, loc, table, i, poff - (i << _CHUNK_SHIFT),
                                        length)
                if v is not None:
                    return v if type(v) is bytes else bytes(v)
        v = self.read_slice_view(seq, loc, poff, length, cache=cache)
        return v if type(v) is bytes else bytes(v)

    def read_slice_view(self, seq: int, loc: int, poff: int, length: int, *,
                        cache: ChunkCache | None = None) -> bytes | memoryview:
        """Payload bytes ``[poff, poff+length)`` of record ``seq`` at ``loc``; a slice
        of one decoded chunk comes as a read-only memoryview of it (no copy).

        Of a chunked record only the chunks overlapping the slice are read, CRC-checked
        and decompressed (the record header and chunk table are checked when first
        read, then kept in a small LRU); a one-block record is read and checked whole.
        ``cache`` (keys ``(seq, chunk index)``) is consulted first and filled with the
        chunks decoded. Raises Corruption (segment, offset, seq, chunk) if a needed
        chunk or the header is damaged: other chunks of the record stay readable;
        NotFound for a seq outside the journal; UsageError for a slice outside the
        payload. Cost: O(chunks touched), one pread per run of adjacent chunks.
        """
        if poff < 0 or length < 0:
            raise UsageError(f"slice [{poff}, {poff + length}) of seq {seq} out of range")
        if length == 0:
            return b""
        first = poff // CHUNK_SIZE
        last = (poff + length - 1) // CHUNK_SIZE
        o = poff - first * CHUNK_SIZE
        if first == last:
            lay = self._layouts.get(seq)
            if lay is not None and lay[0] == loc:
                table = lay[1]
                if table.granules is not None and table.comps[first] == _NONE_COMP:
                    v = self._granules_fast(lay[2], seq, loc, table, first, o, length)
                    if v is not None:
                        return v
            p: bytes | memoryview | None = cache.get((seq, first)) if cache is not None else None
            if p is None:
                p = self._chunk_fast(seq, loc, first, cache)
                if p is None and first == 0:
                    p = self._block_fast(seq, loc, cache)
                if p is None:
                    p = self._chunks(seq, loc, first, last, cache, [first])[0]
            if o + length > len(p):
                raise UsageError(f"slice [{poff}, {poff + length}) is past the end of "
                                 f"seq {seq}'s payload")
            return memoryview(p)[o : o + length] if o or length != len(p) else p
        got = b"".join(self._chunks(seq, loc, first, last, cache, None))
        if o + length > len(got):
            raise UsageError(f"slice [{poff}, {poff + length}) is past the end of "
                             f"seq {seq}'s payload")
        return memoryview(got)[o : o + length] if o or length != len(got) else got

    def _granules_fast(self, seg: _Seg, seq: int, loc: int, table: ChunkTable, i: int, o: int,
                       length: int) -> bytes | memoryview | None:
        """Bytes ``[o, o+length)`` of raw chunk ``i`` of a version 3 record whose checked
        tables are remembered and which lies in the segment file: one pread of the 4 KiB
        granules they overlap, each granule's CRC checked (no decode, no cache: the page
        cache holds the file). None for anything else, a damaged granule included: the
        general path then reads the whole chunk and raises what it must."""
        if seg.compacted or (seg is self._cur and loc >= self._file_size):
            return None
        end = o + length
        raw = table.length - (i << _CHUNK_SHIFT)  # the raw size of chunk i
        if end > raw:
            return None
        a = o & _GRANULE_MASK
        b = ((end - 1) | (GRANULE_SIZE - 1)) + 1
        if b > raw:
            b = raw
        n = b - a
        fd = self._rfd(seg)
        blob = self._fs.pread(fd, n, loc + RECORD_HEADER_SIZE + table.starts[i] + a)
        if len(blob) != n:
            return None
        gr = table.granules
        assert gr is not None
        k = GRANULES * i + (a >> _GRANULE_SHIFT)
        if n <= GRANULE_SIZE:
            if _CRC(blob) != gr[k]:
                return None
        else:
            mv = memoryview(blob)
            for g in range(0, n, GRANULE_SIZE):
                if _CRC(mv[g : g + GRANULE_SIZE]) != gr[k]:
                    return None
                k += 1
        self._layouts.move_to_end(seq)
        if o == a and n == length:
            return blob
        return memoryview(blob)[o - a : end - a]

    def _chunk_fast(self, seq: int, loc: int, i: int, cache: ChunkCache | None) -> bytes | None:
        """Chunk ``i`` of a chunked record whose checked table is remembered and which
        lies in the segment file (not compacted, not buffered): one pread of the chunk,
        its CRC checked, then decoded. None for anything else, a damaged chunk included:
        the general path (:meth:`_chunks`) then reads it again and raises what it must."""
        lay = self._layouts.get(seq)
        if lay is None or lay[0] != loc:
            return None
        seg = self._seg_for(seq)
        table = lay[1]
        if seg.compacted or i >= table.count or (seg is self._cur and loc >= self._file_size):
            return None
        st = table.starts
        base = st[i]
        n = st[i + 1] - base
        comp = table.comps[i]
        raw = min(CHUNK_SIZE, table.length - i * CHUNK_SIZE)
        if comp > _LZ4_COMP or (comp == _NONE_COMP and n != raw):
            return None
        blob = self._fs.pread(self._rfd(seg), n, loc + RECORD_HEADER_SIZE + base)
        if len(blob) != n or not chunk_ok(blob, table, i):
            return None
        p: bytes = blob
        if comp == _LZ4_COMP:
            memo = self._patterns
            if n <= PATTERN_STORED and raw == CHUNK_SIZE:
                # a chunk that compresses this well is a fill pattern (zeros, a repeated
                # block): identical stored bytes decode identically, so one decoded copy
                # serves them all; keyed by the checked stored bytes, so a hit is exact
                q = memo.get(blob)
                if q is not None:
                    memo.move_to_end(blob)
                    self._layouts.move_to_end(seq)
                    return q
            try:
                p = lz4.block.decompress(blob, uncompressed_size=raw)
            except Exception:
                return None
            if len(p) != raw:
                return None
            if n <= PATTERN_STORED and raw == CHUNK_SIZE:
                memo[blob] = p
                if len(memo) > PATTERN_CACHE:
                    memo.popitem(last=False)
                self._layouts.move_to_end(seq)
                return p
        self._layouts.move_to_end(seq)
        if cache is not None:
            cache.put((seq, i), p)
        return p

    def _record_span(self, seg: _Seg, seq: int, loc: int) -> int | None:
        """Bytes from ``loc`` (record ``seq``) to the next record or the segment's end,
        when the segment's offsets are in memory and it is not compacted; else None."""
        offs = seg.offs
        j = seq - seg.first_seq + 1
        if offs is None or seg.compacted or j > len(offs):
            return None
        return (offs[j] if j < len(offs) else self._size(seg)) - loc

    def _block_fast(self, seq: int, loc: int,
                    cache: ChunkCache | None) -> bytes | memoryview | None:
        """The payload of a one-block WRITE/INIT record (at most one chunk) that lies in
        the segment file, not compacted: one pread of header + payload (its size from
        the segment's offsets when in memory, else a 4 KiB guess and a second pread
        when the header says more), the record CRC checked, lz4 decoded (and cached)
        if compressed; a raw payload comes as a view of the read (no copy, not cached:
        the page cache holds the file). None for anything else, damage included: the
        general path then raises what it must."""
        try:
            seg = self._seg_for(seq)
        except NotFound:
            return None
        if seg.compacted or (seg is self._cur and loc >= self._file_size):
            return None
        n = self._record_span(seg, seq, loc) or RECORD_HEADER_SIZE + GRANULE_SIZE
        if not RECORD_HEADER_SIZE < n <= RECORD_HEADER_SIZE + CHUNK_SIZE:
            return None
        fd = self._rfd(seg)
        blob = self._fs.pread(fd, n, loc)
        if len(blob) < RECORD_HEADER_SIZE:
            return None
        magic, crc, ver, kind, comp, _fl, slen, rseq, _ts, _off, length = (
            RECORD_HEADER.unpack_from(blob))
        if (magic != RECORD_MAGIC or rseq != seq or slen > CHUNK_SIZE
                or (kind != _W and kind != _I) or ver not in RECORD_VERSIONS
                or length > CHUNK_SIZE):
            return None
        n = RECORD_HEADER_SIZE + slen
        if len(blob) > n:
            blob = blob[:n]  # the guess was longer than the record
        elif len(blob) < n:
            blob += self._fs.pread(fd, n - len(blob), loc + len(blob))
            if len(blob) != n:
                return None
        mv = memoryview(blob)
        if _CRC(mv[CRC_START:]) != crc:
            return None
        if comp == _NONE_COMP:
            return mv[RECORD_HEADER_SIZE:] if slen == length else None
        if comp != _LZ4_COMP:
            return None
        try:
            p: bytes = lz4.block.decompress(mv[RECORD_HEADER_SIZE:], uncompressed_size=length)
        except Exception:
            return None
        if len(p) != length:
            return None
        if cache is not None:
            cache.put((seq, 0), p)
        return p

    def _chunks(self, seq: int, loc: int, first: int, last: int,
                cache: ChunkCache | None, missing: list[int] | None) -> list[bytes]:
        """Decoded chunks ``first..last`` of record ``seq`` (from ``cache`` when there;
        ``missing``: the ones known not to be cached, None to look)."""
        out: list[bytes | None] = [None] * (last - first + 1)
        if missing is None:
            missing = []
            for i in range(first, last + 1):
                p = cache.get((seq, i)) if cache is not None else None
                if p is None:
                    missing.append(i)
                else:
                    out[i - first] = p
        if missing:
            seg = self._seg_for(seq)
            loc = self._where(seg, seq, loc)
            where = f"segment {seg.name} offset {loc} seq {seq}"
            lay = self._layouts.get(seq)
            got: ChunkTable | bytes
            if lay is not None and lay[0] == loc:
                self._layouts.move_to_end(seq)
                got = lay[1]
            else:
                got = self._read_layout(seg, seq, loc, where)
            if isinstance(got, bytes):
                # one-block record: split its payload as a chunked one would be
                for i in missing:
                    p = got if i == 0 and len(got) <= CHUNK_SIZE else got[
                        i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
                    if not p and i:
                        raise UsageError(f"chunk {i} is past the end of seq {seq}'s payload")
                    out[i - first] = p
                    if cache is not None:
                        cache.put((seq, i), p)
            else:
                self._read_chunks(seg, loc, got, missing, first, out, where, seq, cache)
        return out  # type: ignore[return-value]

    def _read_chunks(self, seg: _Seg, loc: int, table: ChunkTable, missing: list[int],
                     first: int, out: list[bytes | None], where: str, seq: int,
                     cache: ChunkCache | None) -> None:
        if missing[-1] >= table.count:
            raise UsageError(f"chunk {missing[-1]} is past the end of seq {seq}'s payload")
        st = table.starts
        k = 0
        while k < len(missing):
            a = b = missing[k]
            k += 1
            while k < len(missing) and missing[k] == b + 1:
                b = missing[k]
                k += 1
            base = st[a]
            blob = self._get(seg, loc, RECORD_HEADER_SIZE + base, st[b + 1] - base)
            if len(blob) != st[b + 1] - base:
                raise Corruption(f"{where}: record truncated")
            for i in range(a, b + 1):
                data: bytes | memoryview = (
                    blob if a == b else memoryview(blob)[st[i] - base : st[i + 1] - base])
                p = decode_chunk(data, table, i, where)
                out[i - first] = p
                if cache is not None:
                    cache.put((seq, i), p)

    def _get(self, seg: _Seg, loc: int, rel: int, n: int) -> bytes:
        """``n`` bytes at ``loc + rel`` of a segment, from the buffer or the file."""
        if seg is self._cur and loc >= self._file_size:
            i = loc - self._file_size + rel
            return bytes(self._mv[i : min(i + n, self._w)])
        return self._fs.pread(self._rfd(seg), n, loc + rel)

    def _read_layout(self, seg: _Seg, seq: int, loc: int,
                     where: str) -> ChunkTable | bytes:
        """The checked chunk table of a chunked record (remembered), or the decoded
        payload of a one-block record."""
        if not SEGMENT_HEADER_SIZE <= loc < self._size(seg):
            raise Corruption(f"{where}: location outside the segment")
        # a record of up to one chunk is read whole in one go when the segment's
        # offsets (in memory) give its size; a wrong guess costs only a second read
        want = RECORD_HEADER_SIZE + GRANULE_SIZE
        span = self._record_span(seg, seq, loc)
        if span is not None and want < span <= RECORD_HEADER_SIZE + CHUNK_SIZE:
            want = span
        data = self._get(seg, loc, 0, want)
        if len(data) < RECORD_HEADER_SIZE:
            raise Corruption(f"{where}: record header truncated")
        magic, crc, ver, kind, comp, _fl, slen, rseq, _ts, _off, length = (
            RECORD_HEADER.unpack_from(data))
        if comp != _CHUNKED or magic != RECORD_MAGIC:
            slen = min(slen, MAX_PAYLOAD)
            if RECORD_HEADER_SIZE + slen <= len(data):
                stored = data[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + slen]
            else:
                stored = self._get(seg, loc, RECORD_HEADER_SIZE, slen)
            rec = decode_record(data[:RECORD_HEADER_SIZE], stored, loc, where, seq)
            if rec.elided:
                raise PointError(f"{where}: data expired by retention")
            return rec.payload
        cov = covered_size(comp, length, slen, ver)
        if cov > slen or slen > MAX_PAYLOAD:
            raise Corruption(f"{where}: bad checksum (chunk table larger than the record)")
        if loc + RECORD_HEADER_SIZE + slen > self._size(seg):
            raise Corruption(f"{where}: record truncated")
        if RECORD_HEADER_SIZE + cov > len(data):
            data = self._get(seg, loc, 0, RECORD_HEADER_SIZE + cov)
            if len(data) < RECORD_HEADER_SIZE + cov:
                raise Corruption(f"{where}: record truncated")
        mv = memoryview(data)
        if _CRC(mv[CRC_START : RECORD_HEADER_SIZE + cov]) != crc:
            raise Corruption(f"{where}: bad checksum")
        bad = header_problem(ver, kind, comp, slen, length)
        if bad:
            raise Corruption(f"{where}: {bad}")
        if rseq != seq:
            raise Corruption(f"{where}: record holds seq {rseq}, expected {seq}")
        table = parse_chunk_table(mv[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + cov], length,
                                  slen, ver)
        if isinstance(table, str):
            raise Corruption(f"{where}: {table}")
        layouts = self._layouts
        layouts[seq] = (loc, table, seg)
        if len(layouts) > LAYOUT_CACHE:
            layouts.popitem(last=False)
        return table

    def scan(self, from_seq: int = 1) -> Iterator[Record]:
        """Every record from ``from_seq`` up to ``last_seq`` as of the call, in seq order.

        Raises Corruption at the first damaged record. Reads segments in large chunks.
        """
        last = self._last_seq
        seq = max(from_seq, self._firsts[0])
        fs = self._fs
        while seq <= last:
            seg = self._seg_for(seq)
            _ts, offs = self._load(seg)
            end = min(last, seg.first_seq + seg.count - 1)
            fd = fs.open_read(self._path(seg.name))
            try:
                win = ReadWindow(fs, fd)
                for s in range(seq, end + 1):
                    loc = offs[s - seg.first_seq]
                    if seg is self._cur and loc >= self._file_size:
                        yield self.read_record(s, loc)
                        continue
                    where = f"segment {seg.name} offset {loc} seq {s}"
                    head = win.get(loc, RECORD_HEADER_SIZE)
                    slen = 0
                    if len(head) == RECORD_HEADER_SIZE:
                        slen = min(RECORD_HEADER.unpack_from(head)[6], MAX_PAYLOAD)
                    stored = win.get(loc + RECORD_HEADER_SIZE, slen)
                    yield decode_record(head, stored, loc, where, s)
            finally:
                fs.close(fd)
            seq = end + 1

    # ----------------------------------------------------------------------- time index

    def _load(self, seg: _Seg) -> tuple[array[int], array[int]]:
        """(timestamps, offsets) of a segment, from memory, its sidecar, or a rescan."""
        if seg.ts is not None and seg.offs is not None:
            if seg.first_seq in self._loaded:
                self._loaded.move_to_end(seg.first_seq)
            return seg.ts, seg.offs
        hdr = read_index_header(self._fs, self._dir, seg.first_seq)
        got = None
        if hdr is not None and hdr.data_end == seg.size and hdr.count == seg.count:
            got = load_index_entries(self._fs, self._dir, hdr)
        if got is None:
            scan = scan_segment(self._fs, self._dir, seg.first_seq)
            got = scan.ts, scan.offs
            if not scan.problems and scan.torn_at is None and scan.header_error is None:
                try:
                    write_index(self._fs, self._dir, seg.first_seq, scan.ts, scan.offs,
                                scan.size, scan.raw_bytes, scan.flags)
                    self._fs.fsync_dir(self._dir)
                    self.repairs.append(index_name(seg.first_seq))
                except OSError:
                    pass
        seg.ts, seg.offs = got
        self._loaded[seg.first_seq] = seg
        self._evict()
        return got

    def _evict(self) -> None:
        loaded = self._loaded
        while len(loaded) > INDEX_CACHE:
            for k, s in loaded.items():
                if s.state == _SEALED and k not in self._pins:
                    del loaded[k]
                    s.ts = s.offs = None
                    break
            else:
                return

    def seq_at_time(self, ns: int) -> int:
        """Last seq whose timestamp is <= ``ns``; 0 if none. O(log n)."""
        i = bisect.bisect_right(self._first_ts, ns) - 1
        segs = self._segs
        while i >= 0 and segs[i].count == 0:
            i -= 1
        if i < 0:
            return 0
        seg = segs[i]
        ts, _offs = self._load(seg)
        j = bisect.bisect_right(ts, ns) - 1
        return seg.first_seq + j if j >= 0 else 0

    def time_of_seq(self, seq: int) -> int:
        """Timestamp (ns) of record ``seq``; PointError if the journal lacks it. O(log n)."""
        try:
            seg = self._seg_for(seq)
        except NotFound as exc:
            raise PointError(str(exc)) from None
        ts, _offs = self._load(seg)
        return ts[seq - seg.first_seq]

    # ----------------------------------------------------------------------- compaction

    def compact_source(self, first_seq: int) -> CompactSource:
        """Snapshot of sealed segment ``first_seq`` for :func:`build_compacted` (which
        may then run in a worker thread). UsageError for the open or a sealing segment."""
        i = bisect.bisect_left(self._firsts, first_seq)
        if i == len(self._firsts) or self._firsts[i] != first_seq:
            raise NotFound(f"no journal segment starts at seq {first_seq}")
        seg = self._segs[i]
        if seg.state != _SEALED:
            raise UsageError(f"segment {seg.name} is not sealed yet")
        _ts, offs = self._load(seg)
        return CompactSource(self._dir, first_seq, seg.count, seg.size, array("q", offs),
                             self._fs)

    def compact_commit(self, prep: PreparedCompaction) -> bool:
        """Put a prepared compaction in place (see :mod:`cdp.journal.compact` for the
        crash argument). False (temp files removed) if the segment changed meanwhile or
        nothing was saved. Cost: two renames and two directory fsyncs, in the calling
        thread (:meth:`compact_commit_async` does them in a worker thread)."""
        seg = self._compact_target(prep)
        if seg is None:
            discard(self._fs, prep)
            return False
        fd = self._read_fds.pop(seg.first_seq, None)
        if fd is not None:
            self._fs.close(fd)
        renamed, err = self._compact_files(prep, seg.name)
        if renamed:
            self._compact_switch(seg, prep)
        if err is not None:
            raise err
        return True

    async def compact_commit_async(self, prep: PreparedCompaction) -> bool:
        """:meth:`compact_commit` without blocking the event loop: the renames and
        directory fsyncs (slow while ingest keeps the disk busy) and the close that frees
        the old file run in a worker thread; only the switch of the in-memory segment
        state happens on the loop.

        Until that switch, reads keep using the old file through a descriptor opened
        before the rename (and its offsets stay in memory), so they never see the new
        file with the old layout."""
        seg = self._compact_target(prep)
        loop = asyncio.get_running_loop()
        if seg is None:
            await loop.run_in_executor(None, discard, self._fs, prep)
            return False
        first = seg.first_seq
        self._load(seg)  # offsets of the old layout stay in memory while pinned
        self._pins[first] = self._fs.open_read(self._path(seg.name))
        try:
            renamed, err = await loop.run_in_executor(None, self._compact_files, prep,
                                                      seg.name)
        finally:
            old = [self._pins.pop(first)]
        if not self._closed:  # (close() released the cached descriptors)
            fd = self._read_fds.pop(first, None)
            if fd is not None:
                old.append(fd)
            if renamed:
                self._compact_switch(seg, prep)
        # the last descriptors of the replaced file: freeing its blocks is slow
        await loop.run_in_executor(None, self._close_all, old)
        if err is not None:
            raise err
        return renamed

    def _close_all(self, fds: list[int]) -> None:
        for fd in fds:
            self._fs.close(fd)

    def _compact_target(self, prep: PreparedCompaction) -> _Seg | None:
        """The sealed segment ``prep`` replaces, or None if it changed or nothing is saved."""
        i = bisect.bisect_left(self._firsts, prep.first_seq)
        seg = self._segs[i] if i < len(self._segs) else None
        if (seg is None or seg.first_seq != prep.first_seq or seg.state != _SEALED
                or seg.size != prep.old_size or prep.new_size >= prep.old_size
                or seg.first_seq in self._pins):
            return None
        return seg

    def _compact_files(self, prep: PreparedCompaction, name: str) -> tuple[bool, BaseException | None]:
        """Rename the compacted segment, then its sidecar, over the old files (directory
        fsync after each); any thread. (segment renamed, error to raise after the switch)."""
        fs = self._fs
        try:
            fs.rename(prep.tmp_seg, self._path(name))
        except BaseException as e:  # re-raised by the caller
            return False, e
        try:
            fs.fsync_dir(self._dir)
        except BaseException as e:
            return True, e
        try:
            fs.rename(prep.tmp_idx, self._path(index_name(prep.first_seq)))
            fs.fsync_dir(self._dir)
        except OSError:
            self.repairs.append(index_name(prep.first_seq))  # rebuilt by a scan at open
        return True, None

    def _compact_switch(self, seg: _Seg, prep: PreparedCompaction) -> None:
        """Reads of ``seg`` go to the compacted file from now on (owner thread)."""
        seg.size = prep.new_size
        seg.raw_bytes = prep.raw_bytes
        seg.compacted = True
        seg.ts, seg.offs = prep.ts, prep.offs
        self._loaded[seg.first_seq] = seg
        self._layouts.clear()
        self._evict()

    def compact_segment(self, first_seq: int, live: Live, *, rate: float = 0.0) -> PreparedCompaction | None:
        """Compact one sealed segment in the calling thread: prepare + commit. Returns
        the result, or None if nothing was committed."""
        prep = build_compacted(self.compact_source(first_seq), live, rate=rate)
        return prep if self.compact_commit(prep) else None

    # ----------------------------------------------------------------------- listing

    def _size(self, seg: _Seg) -> int:
        """Bytes of a segment (the open one's size includes its buffered records)."""
        return self._file_size + self._w if seg is self._cur else seg.size

    def segments(self) -> list[SegmentInfo]:
        """One entry per segment file, oldest first. O(segments)."""
        return [
            SegmentInfo(s.name, s.first_seq, s.first_seq + s.count - 1, s.count, self._size(s),
                        s.first_ts if s.count else None, s.state != _OPEN, s.compacted,
                        s.raw_bytes)
            for s in self._segs
        ]

    def stats(self) -> JournalStats:
        """Record and byte totals. O(segments)."""
        records = sum(s.count for s in self._segs)
        file_bytes = sum(self._size(s) for s in self._segs)
        stored = file_bytes - SEGMENT_HEADER_SIZE * len(self._segs) - RECORD_HEADER_SIZE * records
        return JournalStats(records, sum(s.raw_bytes for s in self._segs), stored, file_bytes,
                            len(self._segs))


_TAIL_PACK = RECORD_TAIL.pack
_HEADER_PACK_INTO = RECORD_HEADER.pack_into
_U32_PACK_INTO = struct.Struct("<I").pack_into
_PREFIX_PACK = RECORD_PREFIX.pack
_CRC = crc32c
_LZ4 = lz4.block.compress
_ENTRY_PACK_INTO = CHUNK_ENTRY.pack_into
_GRANULES_PACK_INTO = struct.Struct(f"<{GRANULES}I").pack_into
_GRANULE_OFFSETS = range(0, CHUNK_SIZE, GRANULE_SIZE)
_CHUNK_SHIFT = CHUNK_SIZE.bit_length() - 1
_GRANULE_SHIFT = GRANULE_SIZE.bit_length() - 1
_GRANULE_MASK = -GRANULE_SIZE
assert 1 << _CHUNK_SHIFT == CHUNK_SIZE and 1 << _GRANULE_SHIFT == GRANULE_SIZE
_CHUNKED = int(Compression.CHUNKED)
_NONE_COMP = int(Compression.NONE)
_LZ4_COMP = int(Compression.LZ4)
assert RECORD_PREFIX.size == CRC_START
