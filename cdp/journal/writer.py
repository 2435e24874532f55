"""The journal: append, group commit, roll, close, compaction commit.

:class:`Journal` is the package's facade: it is a :class:`~cdp.journal.reader.SegmentReader`
(``read_*``, ``scan``, the time index: :mod:`cdp.journal.reader`) and is opened by
:func:`~cdp.journal.recovery.recover` (:mod:`cdp.journal.recovery`); this module holds the
write side and the segment table both sides share. LevelDB keeps the same three rooms
(log_writer, log_reader, repair).

Design notes
------------
- **One writer, the event loop.** ``append_*`` packs a record (precompiled structs, one
  incremental CRC32C over header tail + payload) into a ``bytearray`` and returns
  ``(seq, loc)`` at once. The buffer goes to the OS in large ``write`` calls when it
  passes ``buffer_bytes``; payloads of 256 KiB and more skip the copy and go out with
  ``writev``. No append ever waits for a disk sync. Under an event loop a timer hands
  the buffer to the OS within 50 ms, so only a power loss (not a process crash) can
  lose records that were never committed.
- **Group commit, pipelined.** ``await commit()`` flushes the buffer, then one
  ``fdatasync`` in one of the journal's sync threads makes everything appended so far
  durable. Callers share syncs: a caller joins a sync that is not started yet or that
  already covers its records; otherwise it starts a new one at once, while up to
  SYNCS_IN_FLIGHT (4) run, else it waits for the oldest. So a batch of concurrent
  committers costs one fdatasync, and a batch arriving during a sync does not wait for
  that sync to end before its own starts: devices run concurrent flushes side by side
  (here 1 thread: ~200, 4 threads: ~3300-5600 4 KiB write+fdatasync/s, measured), and a
  commit waits one sync, not one and a half on average. A sync ends (and its commits
  return) only after the syncs started before it, so commits return in the order they
  were made (replication acks rely on it). Each sync uses a handle of its own on the open
  segment, opened with the segment: Linux reports a write-back error once to each open
  file, so two syncs on one handle could see one fail and the other succeed over the
  same lost page; a failure marks the journal failed (under the sync lock) before its
  handle is reused, and every sync checks that mark after its fdatasync. Sealing a
  segment and the directory fsync run under the sync lock, in the sync that finds them
  queued. Appends keep flowing meanwhile.
- **Rollover.** When a record does not fit, or the segment already holds
  ``segment_records`` records, the segment is *sealed*: its bytes go to the OS and it is
  queued; the next sync fdatasyncs it, writes its index sidecar and fsyncs
  the directory (the new segment's name) before it syncs the open segment. So no commit
  returns before the earlier segment and the directory entry are durable.
- **Records bound the open segment too.** Recovery scans the open segment record by
  record (every CRC: 13.7 µs a record at load 8 on 2 cores, 340-byte records) while a
  sealed one opens from one 64-byte index-header read (14 µs), so open after a clean
  stop or a crash costs what the open segment holds. Bytes alone do not bound that:
  256 MiB of small compressed records is hundreds of thousands of them (the scale
  bench's lz4-friendly 4 KiB writes: ~340 bytes stored, 780k per segment, a 3-9 s
  scan). So a segment is also sealed at ``segment_records`` records (SEGMENT_RECORDS,
  65,536: what 256 MiB of incompressible 4 KiB writes holds anyway), which bounds the
  scan at ~0.9 s loaded (after a crash, at most two: a segment whose sealing sync never
  wrote its sidecar is scanned too). After a clean close nothing is scanned: the close
  leaves the open segment's index and the CRC32C of its bytes (``.closed``), which open
  takes when the file still matches. Cost: more, smaller segments when records are
  small (100M such writes: 1,526 segments instead of 128), each ~280 bytes in memory
  (SegmentState, its name, the seq and time index entries) and 14 µs at open: 0.4 MiB
  and ~21 ms at 100M writes.
- **Written before it is needed.** An fdatasync of a file that grew, or of blocks written
  for the first time, also commits the file system's journal (ext4: about 195 µs per 4 KiB
  + fdatasync appending, 150 µs into ``fallocate``d space, 88 µs over written blocks,
  measured). So a worker thread keeps ``prefill_bytes`` (32 MiB) of zeros written and
  synced ahead of the open segment's end, in steps, and appends are positional writes
  over them: a commit then costs what an overwrite costs. The zeros are written once per
  segment (not ``fallocate``: its unwritten extents still cost a journal commit each).
  The slack after the last record is cut off when the segment is sealed (before its
  fdatasync) and at close, so sealed and closed segments end at their last record; after
  a crash, recovery tells zeros and records of the file's earlier life (their seqs are
  below the segment's first) from a torn record (docs/FORMATS.md, "Recovery rules").
  Appends and the filler meet under one lock only when an append reaches the range being
  filled (the filler then skips what the append wrote). It runs only while commits are
  small (a moving average of the bytes each sync covers under PREFILL_MAX_COMMIT): for
  large commits the journal commit is noise beside the data, and writing zeros first
  would double the bytes written. Off on a simulated file system (tests turn it on with
  ``prefill_bytes``).
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
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import lz4.block
from crc32c import crc32c

from cdp.errors import CdpError, ConfigError, Corruption, NotFound, StoreFull, UsageError
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
    DATA_KINDS,
    ERROR_PAYLOAD,
    GRANULE_SIZE,
    GRANULE_TABLE_SIZE,
    GRANULES,
    LZ4_MIN,
    MARKER_PAYLOAD,
    MAX_DATA,
    MAX_TEXT,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    RECORD_PREFIX,
    RECORD_TAIL,
    RECORD_VERSION,
    REWIND_PAYLOAD,
    SEGMENT_HEADER_SIZE,
    Compression,
    RecordKind,
    index_name,
    pack_granule_crcs,
    pack_segment_header,
)
from cdp.journal.fs import Buffer, Clock, FileLayer, OsFileLayer
from cdp.journal.reader import SegmentReader
from cdp.journal.recovery import Recovered, RecoveryReport, recover
from cdp.journal.segment import (
    NO_TS,
    OPEN,
    SEALED,
    SEALING,
    SegmentState,
    check_record,
    read_index_header,
    write_closed,
    write_index,
)
from cdp.journal.tiered import Range, TieredFS, read_tiered
from cdp.journal.tiering import SealedFile

#: payloads at least this large bypass the buffer (written with writev, no copy)
DIRECT_WRITE = 256 << 10
#: after a failed lz4 attempt skip up to this many attempts (records or chunks) before
#: trying again
LZ4_MAX_SKIP = 64
#: syncs (fdatasyncs) of the journal that may run at once, see "Group commit" above
SYNCS_IN_FLIGHT = 4
#: records after which the open segment is sealed (with ``segment_bytes``; design notes)
SEGMENT_RECORDS = 65536
#: seconds after which buffered records are handed to the OS without a commit
FLUSH_DELAY = 0.05
#: after this many bytes handed to the OS, ask it to start writing them to the device
#: (sync_file_range WRITE, no wait): a FLUSH then waits for the rest only
WRITEBACK_BYTES = 8 << 20
#: default bound of the read cache of tiered (dropped) segments, see set_cache_bytes
DEFAULT_CACHE_BYTES = 1 << 30
#: zeros kept written ahead of the open segment's end on a real file system (see the
#: design notes); a new step starts when less than half of it is left
PREFILL_BYTES = 32 << 20
#: prefill only while the bytes a sync covers average less than this (design notes)
PREFILL_MAX_COMMIT = 512 << 10
#: bytes per pwrite of the filler (it takes the fence lock for each)
_FILL_PIECE = 1 << 20
_ZEROS = bytes(_FILL_PIECE)
_NEVER = 1 << 63

_W = int(RecordKind.WRITE)
_I = int(RecordKind.INIT)
_Z = int(RecordKind.ZERO)
_M = int(RecordKind.MARKER)
_R = int(RecordKind.REWIND)
_E = int(RecordKind.ERROR)


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
    #: False once the tier's copy is the only one (:meth:`Journal.drop_segment`)
    local: bool = True


@dataclass
class JournalStats:
    """Totals over all segments: ``raw_bytes`` before, ``stored_bytes`` after compression."""

    records: int
    raw_bytes: int
    stored_bytes: int
    file_bytes: int
    segments: int


def _translate(exc: OSError, what: str) -> CdpError | OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"journal: no space left while {what}")
    return exc


class Journal(SegmentReader):
    """An append-only, segmented, checksummed write journal. Create with :meth:`open`.

    Not thread-safe: call it from one thread (the event loop's); only the sync work of
    :meth:`commit` runs in the journal's own worker thread. The read methods come from
    :class:`~cdp.journal.reader.SegmentReader`.
    """

    # ----------------------------------------------------------------------- opening

    def __init__(self, directory: str, segment_bytes: int, sync: str, fs: FileLayer,
                 clock: Clock, buffer_bytes: int, prefill_bytes: int = 0,
                 segment_records: int = SEGMENT_RECORDS) -> None:
        super().__init__(directory, fs)
        self._segment_bytes = segment_bytes
        self._segment_records = segment_records
        self._sync_mode = sync
        self._clock = clock
        self._time_ns = time.time_ns if type(clock) is Clock else clock.time_ns
        self._buffer_bytes = buffer_bytes
        # fixed-size buffer: records are packed in place, never reallocated
        self._buf = bytearray(buffer_bytes + DIRECT_WRITE + RECORD_HEADER_SIZE)
        self._mv = memoryview(self._buf)
        self._w = 0  # bytes of the buffer in use
        # the segment table (SegmentReader reads it): filled by _install
        self._segs = []
        self._firsts = []
        self._first_ts = []
        self._cur = SegmentState(1)
        self._fd = -1
        self._file_size = 0
        self._wb_from = 0  # start of the current segment's bytes not yet handed to writeback
        self._last_seq = 0
        #: raw payload bytes appended since open (a counter other threads may read)
        self._appended_raw = 0
        self._last_ts = 0
        self._durable_seq = 0
        self._sealing: deque[tuple[SegmentState, int, bool]] = deque()
        self._to_close: list[int] = []
        self._dir_dirty = False
        self._sync_lock = threading.Lock()
        # pipelined group commit: syncs started, oldest first; the open segment's free
        # sync handles (and all of them, to tell a retired one); plain syncs running
        self._syncs: list[_Sync] = []
        self._sync_fds: list[int] = []
        self._cur_sync_fds: frozenset[int] = frozenset()
        self._plain = 0
        self._sync_idle = threading.Condition(self._sync_lock)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._wb_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._wb_future: concurrent.futures.Future[None] | None = None
        # prefill (design notes): the file's size as far as we know (>= _file_size), the
        # filler's job, the start of its range (appends below it never take the lock),
        # and the fence: the filler writes nothing below it
        self._prefill = prefill_bytes
        self._alloc_end = 0
        self._fill_future: concurrent.futures.Future[int] | None = None
        self._fill_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._fill_from = _NEVER
        self._fill_lock = threading.Lock()
        self._fill_fence = 0
        self._cur_filled = False  # a step ran on the open segment: cut its slack at seal
        #: recovery found no damage in the open segment: a clean close may index it
        self._cur_sound = True
        # bytes per sync, moving average (starts at "large": no prefill before commits)
        self._commit_bytes = float(PREFILL_MAX_COMMIT)
        self._sync_mark: tuple[SegmentState, int] | None = None
        self._failed: BaseException | None = None
        self._closed = False
        self._lz_skip = 0
        self._lz_backoff = 0
        #: the lz4 probe of the last WRITE/INIT appended: packed/raw bytes of the part
        #: lz4 was tried on (< 0.875: kept compressed), -1.0 when no probe ran (short
        #: payload, back-off); a free compressibility signal for services (the sentinel)
        self.last_lz4 = -1.0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._cur_ts_append = array("q").append
        self._cur_offs_append = array("q").append
        self.recovery = RecoveryReport()
        #: fetches tiered records (``[(first_seq, offset, length)]``) and cache_puts them;
        #: injected by the tier service (None: reads of dropped segments raise NotLocal)
        self.remote: Callable[[list[Range]], Awaitable[None]] | None = None
        self._cache_bytes = DEFAULT_CACHE_BYTES
        #: called with (seq, the record's bytes exactly as stored, as the pieces they
        #: join: views valid only during the call) after each append that succeeded
        #: (``last_seq`` is its seq), in seq order; the record is not durable yet. Set by
        #: the replication source (its window of recent records,
        #: :mod:`cdp.replication.window`); None, the default: one test per append
        self.on_stored: Callable[[int, Sequence[Buffer]], None] | None = None

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
        prefill_bytes: int | None = None,
        segment_records: int = SEGMENT_RECORDS,
    ) -> Journal:
        """Open (creating if needed) the journal in ``directory`` and recover it.

        Sealed segments cost one index-header read each; the last segment is scanned
        (O(its records), at most ``segment_records`` as this journal writes them: a
        segment is sealed at ``segment_bytes`` or ``segment_records``, whichever comes
        first), a torn tail truncated, damage reported in ``journal.recovery``.
        ``sync`` is ``"flush"`` or ``"always"`` (see docs/ARCHITECTURE.md).
        ``prefill_bytes``: zeros kept written ahead of the open segment's end (design
        notes); default PREFILL_BYTES on the real file system, 0 (off) on any other.
        """
        if sync not in ("flush", "always"):
            raise ConfigError(f"journal sync must be 'flush' or 'always', not {sync!r}")
        if segment_bytes < 4096:
            raise ConfigError(f"journal segment_bytes must be at least 4096, not {segment_bytes}")
        if segment_records < 1:
            raise ConfigError(f"journal segment_records must be at least 1, not {segment_records}")
        if buffer_bytes < 0:
            raise ConfigError("journal buffer_bytes must not be negative")
        fs = fs or OsFileLayer()
        if prefill_bytes is None:
            prefill_bytes = PREFILL_BYTES if type(fs) is OsFileLayer else 0
        if prefill_bytes < 0:
            raise ConfigError("journal prefill_bytes must not be negative")
        j = cls(os.fspath(directory), segment_bytes, sync, fs, clock or Clock(), buffer_bytes,
                prefill_bytes, segment_records)
        dropped = read_tiered(j._fs, j._dir)
        if dropped is not None:
            j._fs = TieredFS(j._fs, j._dir, dropped, j._cache_bytes)
        j._install(recover(j._fs, j._dir))
        return j

    def _install(self, rec: Recovered) -> None:
        """Take over the segments recovery found; appends go to the last one."""
        segs = rec.segs
        cur = segs[-1]
        self._segs = segs
        self._firsts = [s.first_seq for s in segs]
        self._first_ts = rec.first_ts
        self._set_current(cur, rec.fd, rec.size)
        self._last_seq = self._durable_seq = cur.first_seq + cur.count - 1
        self._last_ts = max((s.last_ts for s in segs), default=0)
        self.recovery = rec.report
        self._cur_sound = not any(p.segment == cur.name for p in rec.report.problems)

    def _set_current(self, seg: SegmentState, fd: int, size: int) -> None:
        if seg.ts is None or seg.offs is None:
            seg.ts, seg.offs = array("q"), array("q")
        seg.state = OPEN
        self._cur = seg
        self._fd = fd
        self._to_close.extend(self._sync_fds)  # the free handles of the sealed one
        fds = self._sync_fds = [self._fs.open_read(self._path(seg.name))
                                for _ in range(SYNCS_IN_FLIGHT)]
        self._cur_sync_fds = frozenset(fds)
        self._file_size = size
        self._alloc_end = size
        self._cur_filled = False
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
        self.last_lz4 = -1.0
        if n > CHUNK_SIZE:
            return self._append_chunked(_I if init else _W, offset, data)
        if n >= LZ4_MIN:
            if self._lz_skip:
                self._lz_skip -= 1
            else:
                packed = lz4.block.compress(data, store_size=False)
                self.last_lz4 = len(packed) / n
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
        out = self._appended(seq, ts, pos, raw)
        if self.on_stored is not None:  # the record just placed, as stored
            self.on_stored(seq, (head, payload) if stored >= DIRECT_WRITE
                           else (self._mv[w:end],))
        return out

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
        tried = packed_n = 0
        for i in range(count):
            c: Buffer = mv[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
            comp = 0
            if len(c) >= LZ4_MIN:
                if skip:
                    skip -= 1
                else:
                    packed = compress(c, store_size=False)
                    tried += len(c)
                    packed_n += len(packed)
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
        if tried:
            self.last_lz4 = packed_n / tried

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
        out = self._appended(seq, ts, pos, n)
        if self.on_stored is not None:  # the record just placed, as stored
            self.on_stored(seq, (head, *parts) if stored >= DIRECT_WRITE
                           else (self._mv[w:p],))
        return out

    def append_stored(self, data: Buffer) -> tuple[int, int]:
        """Append a record another journal stored (:meth:`read_stored` there), verbatim:
        same bytes, seq and timestamp (replication). Buffered like every append.

        Checks every byte as recovery would (Corruption, nothing appended), that its seq
        is ``last_seq + 1`` and its timestamp not older than the last record's
        (UsageError: the journal has no seq gaps and its times never decrease).
        A record of 256 KiB or more given as a view (the target's records are views of
        the frame they came in) is written from it, not copied first: the caller must
        not change it before this returns (it is written by then).
        Cost: O(len(data)) CRC and one copy below 256 KiB (none above).
        """
        if self._failed is not None:
            raise self._failed
        raw: bytes | memoryview
        if type(data) is bytes or len(data) - RECORD_HEADER_SIZE < DIRECT_WRITE or \
                data[9] not in DATA_KINDS:
            raw = bytes(data)  # (bytes of bytes is the same object)
        else:  # a large data record: check_record (CRCs only) and pwritev take views
            raw = memoryview(data).cast("B")
        reason, seq, ts, nraw = check_record(raw)
        if reason is not None:
            raise Corruption(f"record to append (seq {seq}): {reason}")
        if seq != self._last_seq + 1:
            raise UsageError(f"record seq {seq} does not follow the journal's last seq "
                             f"{self._last_seq}")
        if ts < self._last_ts:
            raise UsageError(f"record seq {seq} is older ({ts}) than the last one "
                             f"({self._last_ts})")
        n = len(raw)
        w, pos = self._room(n)
        if n - RECORD_HEADER_SIZE >= DIRECT_WRITE:
            mv = memoryview(raw)
            self._write_direct(w, pos + n, bytes(mv[:RECORD_HEADER_SIZE]),
                               [mv[RECORD_HEADER_SIZE:]])
        else:
            if not w:
                self._arm_flush_timer()
            self._mv[w : w + n] = raw
            self._w = w + n
        out = self._appended(seq, ts, pos, nraw)
        if self.on_stored is not None:
            self.on_stored(seq, (raw,))
        return out

    def _room(self, size: int) -> tuple[int, int]:
        """Make room for a record of ``size`` bytes (header included): start a new
        segment when it would not fit in this one or this one holds ``segment_records``,
        hand the buffer to the OS when it would not fit there. Returns (bytes now
        buffered, file position of the record)."""
        w = self._w
        n = self._cur.count
        if n and (self._file_size + w + size > self._segment_bytes
                  or n >= self._segment_records):
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
        if new_size > self._fill_from:
            self._fence(new_size)
        try:
            self._fs.pwritev(self._fd, [self._mv[:w], head, *parts] if w else [head, *parts],
                             self._file_size)
        except OSError as exc:
            raise self._undo_write(exc) from exc
        self._file_size = new_size
        self._w = 0
        self._start_writeback()
        self._maybe_prefill()

    def _appended(self, seq: int, ts: int, pos: int, raw: int) -> tuple[int, int]:
        """Bookkeeping of a record just placed at ``pos`` of the current segment."""
        cur = self._cur
        if not cur.count:
            cur.first_ts = ts
            self._first_ts[-1] = ts
        cur.count += 1
        cur.raw_bytes += raw
        self._appended_raw += raw
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
            self._stop_prefill()
            self._alloc_end = self._file_size
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
        if self._file_size + w > self._fill_from:
            self._fence(self._file_size + w)
        try:
            self._fs.pwrite(self._fd, self._mv[:w], self._file_size)
        except OSError as exc:
            raise self._undo_write(exc) from exc
        self._file_size += w
        self._w = 0
        self._start_writeback()
        self._maybe_prefill()

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

    def _maybe_prefill(self) -> None:
        """Start the filler's next step when less than half of ``prefill_bytes`` of
        written zeros is left after the open segment's end (no-op while one runs)."""
        if not self._prefill or self._commit_bytes >= PREFILL_MAX_COMMIT:
            return
        f = self._fill_future
        if f is not None:
            if not f.done():
                return
            self._fill_done(f)
        end = self._file_size
        if self._alloc_end - end >= self._prefill >> 1:
            return
        start = max(self._alloc_end, end)
        stop = min(end + self._prefill, self._segment_bytes)
        n = self._cur.count
        if n:  # nor past where segment_records will seal it (at the mean record size)
            stop = min(stop, end + (self._segment_records - n) * (end - SEGMENT_HEADER_SIZE) // n
                       + _FILL_PIECE)
        if stop - start < _FILL_PIECE:
            return  # the segment is (nearly) full: it is sealed soon
        try:
            fd = self._fs.open_write(self._path(self._cur.name))
        except OSError:
            self._prefill = 0
            return
        ex = self._fill_executor  # not the writeback thread: _reap waits for that one
        if ex is None:
            ex = self._fill_executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="journal-prefill")
        self._fill_fence = start
        self._fill_from = start
        self._cur_filled = True
        self._fill_future = ex.submit(self._fill, fd, start, stop)

    def _fill(self, fd: int, start: int, stop: int) -> int:
        """Worker thread: write zeros over ``[start, stop)`` of the open segment (never
        below the fence: appends own those bytes), then fdatasync so the file's new size
        is durable before a commit needs it. Returns how far it got. Through a handle of
        its own (opened by the caller), so a write-back error its fdatasync sees is still reported to the
        journal's next fdatasync (Linux reports one to each open file). Advice only: on
        an error the appends simply grow the file, and no later step starts. Cost:
        ``stop - start`` bytes written, one fdatasync. Closes ``fd``."""
        fs, lock, pos = self._fs, self._fill_lock, start
        try:
            while pos < stop:
                with lock:
                    pos = max(pos, self._fill_fence)
                    n = min(_FILL_PIECE, stop - pos)
                    if n <= 0:
                        break
                    fs.pwrite(fd, _ZEROS[:n] if n < _FILL_PIECE else _ZEROS, pos)
                pos += n
            fs.fdatasync(fd)
        except OSError:
            self._prefill = 0
            return min(pos, stop)
        finally:
            fs.close(fd)
        return stop

    def _fence(self, end: int) -> None:
        """Before an append writes below ``end`` in the range the filler works on: the
        filler writes nothing below ``end`` from now on (one lock, held at most for one
        1 MiB pwrite of the filler)."""
        with self._fill_lock:
            if end > self._fill_fence:
                self._fill_fence = end

    def _fill_done(self, f: concurrent.futures.Future[int]) -> None:
        self._fill_future = None
        self._fill_from = _NEVER
        self._alloc_end = max(self._alloc_end, f.result())

    def _stop_prefill(self) -> None:
        """Stop the filler (it finishes its current pwrite) and wait for it: before the
        open segment's handle is sealed, truncated or closed. Cost: up to one 1 MiB pwrite
        and the filler's fdatasync."""
        f = self._fill_future
        if f is None:
            return
        self._fence(_NEVER)
        f.result()
        self._fill_done(f)

    def _roll(self) -> None:
        """Seal the open segment and start the next one (durable at the next sync)."""
        self._flush()
        self._stop_prefill()
        fs = self._fs
        first = self._last_seq + 1
        self._cur.size = self._file_size
        self._cur.last_ts = self._last_ts
        seg = SegmentState(first)
        path = self._path(seg.name)
        try:
            fd = fs.open_write(path)
        except OSError as exc:
            raise _translate(exc, "creating a segment") from exc
        try:
            fs.truncate(fd, 0)
            fs.pwrite(fd, pack_segment_header(first), 0)
        except OSError as exc:
            fs.close(fd)
            try:
                fs.unlink(path)
            except OSError:
                pass
            raise _translate(exc, "creating a segment") from exc
        old = self._cur
        old.state = SEALING
        # prefilled slack after the last record is cut off by the sealing sync
        self._sealing.append((old, self._fd, self._cur_filled))
        self._segs.append(seg)
        self._firsts.append(first)
        self._first_ts.append(NO_TS)
        self._dir_dirty = True
        self._set_current(seg, fd, SEGMENT_HEADER_SIZE)
        self._cur_sound = True
        self._remember(old)

    # ----------------------------------------------------------------------- durability

    @property
    def sync_mode(self) -> str:
        """``"flush"`` or ``"always"`` as opened."""
        return self._sync_mode

    def _do_sync(self, fd: int, exclusive: bool = False) -> None:
        """Worker-thread part of a sync through handle ``fd`` of the open segment: seal
        queued segments, fdatasync, fsync dir, under the sync lock when there is sealing
        or directory work (or ``exclusive``), else a plain fdatasync beside other syncs."""
        fs = self._fs
        with self._sync_lock:
            if self._closed:
                raise CdpError("journal is closed")
            locked = exclusive or bool(self._sealing) or self._dir_dirty
            if locked:
                self._locked_sync(fd)
            else:
                self._plain += 1
        if not locked:
            try:
                fs.fdatasync(fd)
            except OSError as exc:
                err = _translate(exc, "syncing the journal")
                with self._sync_lock:
                    self._failed = err
                raise err from exc
            finally:
                with self._sync_lock:
                    self._plain -= 1
                    if not self._plain:
                        self._sync_idle.notify_all()
        failed = self._failed  # another sync saw a write-back error this one may share
        if failed is not None:
            raise failed

    def _locked_sync(self, fd: int) -> None:
        """The sync with sealing and directory work (the caller holds the sync lock)."""
        fs = self._fs
        try:
            while self._sealing:
                seg, sfd, slack = self._sealing[0]
                if slack:
                    fs.truncate(sfd, seg.size)
                fs.fdatasync(sfd)
                if seg.ts is not None and seg.offs is not None:
                    try:
                        write_index(fs, self._dir, seg.first_seq, seg.ts, seg.offs,
                                    seg.size, seg.raw_bytes)
                    except OSError:
                        pass  # derived data: rebuilt by a scan when missing
                self._sealing.popleft()
                seg.state = SEALED
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
        self._note_sync()
        self._do_sync(self._fd, exclusive=True)
        if covered > self._durable_seq:
            self._durable_seq = covered
        if not self._syncs:
            self._reap()

    async def commit(self) -> None:
        """Return once every record appended before the call is durable.

        Concurrent callers share syncs: one fdatasync (in a sync thread) covers all
        records appended before it started. A caller joins a sync not started yet or
        one that covers its records, else starts one (up to SYNCS_IN_FLIGHT run at once;
        beyond, it waits for the oldest and looks again).
        """
        target = self._last_seq
        while self._durable_seq < target:
            if self._failed is not None:
                raise self._failed
            for s in self._syncs:
                if s.covered < 0 or s.covered >= target:
                    break
            else:
                if len(self._syncs) < SYNCS_IN_FLIGHT:
                    s = _Sync()
                    s.task = asyncio.get_running_loop().create_task(self._run_sync(s))
                    self._syncs.append(s)
                else:
                    s = self._syncs[0]
            await asyncio.shield(s.task)

    async def _run_sync(self, s: _Sync) -> None:
        fd = -1
        try:
            self._flush()
            covered = s.covered = self._last_seq
            self._note_sync()
            fd = self._sync_fds.pop()  # one of SYNCS_IN_FLIGHT: never empty here
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    SYNCS_IN_FLIGHT, thread_name_prefix="journal-sync")
            await asyncio.get_running_loop().run_in_executor(self._executor, self._do_sync, fd)
            older = [o.task for o in itertools.takewhile(lambda o: o is not s, self._syncs)]
            if older:  # syncs end in the order they started: commits return in order
                await asyncio.wait(older)
                if self._failed is not None:
                    raise self._failed
            if covered > self._durable_seq:
                self._durable_seq = covered
        finally:
            self._syncs.remove(s)
            if fd >= 0:
                if self._closed:
                    self._fs.close(fd)
                elif fd in self._cur_sync_fds:
                    self._sync_fds.append(fd)
                else:
                    self._to_close.append(fd)
        if not self._syncs:
            self._reap()

    def _note_sync(self) -> None:
        """Account the bytes a sync starting now covers (PREFILL_MAX_COMMIT). O(1)."""
        cur, pos = self._cur, self._file_size
        mark = self._sync_mark
        n = pos - mark[1] if mark is not None and mark[0] is cur else pos
        self._commit_bytes += (n - self._commit_bytes) / 8
        self._sync_mark = (cur, pos)
        if self._fill_future is None:
            self._maybe_prefill()

    def close(self) -> None:
        """Make everything durable and release all handles. Idempotent. A clean close
        also leaves the open segment's index and CRC (``.closed``), so the next open
        need not scan it (:func:`~cdp.journal.segment.clean_tail`). Cost: the final
        sync, a read of the open segment for its CRC, one small write + fdatasync."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self._prefill = 0  # no new step from here on
                self._flush()
                self._stop_prefill()
                if self._cur_filled:  # a closed segment ends at its last record
                    self._fs.truncate(self._fd, self._file_size)
                    self._alloc_end = self._file_size
                self.sync()
                self._write_closed()
        finally:
            with self._sync_lock:
                self._closed = True
                while self._plain:  # syncs of other threads still use their handles
                    self._sync_idle.wait()
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            fs = self._fs
            self._stop_prefill()
            if self._fill_executor is not None:
                self._fill_executor.shutdown(wait=True)
            self._writeback_wait()
            if self._wb_executor is not None:
                self._wb_executor.shutdown(wait=True)
            for _seg, fd, _slack in self._sealing:
                fs.close(fd)
            self._sealing.clear()
            self._reap()
            self._close_reads()
            if isinstance(fs, TieredFS):
                fs.close_cached()
            while self._sync_fds:
                fs.close(self._sync_fds.pop())
            fs.close(self._fd)
            if self._executor is not None:
                self._executor.shutdown(wait=False)

    def _write_closed(self) -> None:
        """The open segment's index and CRC as a ``.closed`` sidecar, after the final
        sync (so it describes durable bytes only). Not for a segment recovery found
        damaged (its next open must report the damage again). Derived data: no
        directory fsync (a lost one costs a scan) and a failure is ignored."""
        cur = self._cur
        if not self._cur_sound or cur.ts is None or cur.offs is None:
            return
        try:
            write_closed(self._fs, self._dir, cur.first_seq, cur.ts, cur.offs,
                         self._file_size, cur.raw_bytes)
        except OSError:
            pass

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
    def appended_bytes(self) -> int:
        """Raw payload bytes appended since this journal was opened: a monotonic
        counter any thread may read (one int) to tell how busy ingest is."""
        return self._appended_raw

    @property
    def durable_seq(self) -> int:
        """Every record with a seq up to this one survives a power loss."""
        return self._durable_seq

    @property
    def first_seq(self) -> int:
        """Seq of the oldest record kept (1 unless old segments were removed)."""
        return self._firsts[0]

    # ----------------------------------------------------------------------- compaction

    def compact_source(self, first_seq: int) -> CompactSource:
        """Snapshot of sealed segment ``first_seq`` for :func:`build_compacted` (which
        may then run in a worker thread). UsageError for the open or a sealing segment."""
        i = bisect.bisect_left(self._firsts, first_seq)
        if i == len(self._firsts) or self._firsts[i] != first_seq:
            raise NotFound(f"no journal segment starts at seq {first_seq}")
        seg = self._segs[i]
        if seg.state != SEALED:
            raise UsageError(f"segment {seg.name} is not sealed yet")
        ts, offs = self._load(seg)
        return CompactSource(self._dir, first_seq, seg.count, seg.size, array("q", offs),
                             self._fs, tiered=self.is_dropped(first_seq), ts=array("q", ts))

    def compact_commit(self, prep: PreparedCompaction) -> bool:
        """Put a prepared compaction in place (see :mod:`cdp.journal.compact` for the
        crash argument). False (temp files removed) if the segment changed meanwhile or
        nothing was saved. Cost: two renames and two directory fsyncs, in the calling
        thread (:meth:`compact_commit_async` does them in a worker thread)."""
        seg = self._compact_target(prep)
        if seg is None:
            discard(self._fs, prep)
            return False
        fd = self._drop_fd(seg.first_seq)
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
        self._pin(seg)  # reads use the old file, its offsets in memory, until the switch
        try:
            renamed, err = await loop.run_in_executor(None, self._compact_files, prep,
                                                      seg.name)
        finally:
            old = [self._unpin(first)]
        if not self._closed:  # (close() released the cached descriptors)
            fd = self._drop_fd(first)
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

    def _compact_target(self, prep: PreparedCompaction) -> SegmentState | None:
        """The sealed segment ``prep`` replaces, or None if it changed or nothing is saved."""
        i = bisect.bisect_left(self._firsts, prep.first_seq)
        seg = self._segs[i] if i < len(self._segs) else None
        if (seg is None or seg.first_seq != prep.first_seq or seg.state != SEALED
                or seg.size != prep.old_size or prep.new_size >= prep.old_size
                or self._pinned(seg.first_seq) or self.is_dropped(seg.first_seq)):
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

    def _compact_switch(self, seg: SegmentState, prep: PreparedCompaction) -> None:
        """Reads of ``seg`` go to the compacted file from now on (owner thread)."""
        seg.size = prep.new_size
        seg.raw_bytes = prep.raw_bytes
        seg.compacted = True
        seg.ts, seg.offs = prep.ts, prep.offs
        self._file_replaced(seg)

    def compact_segment(self, first_seq: int, live: Live, *, rate: float = 0.0) -> PreparedCompaction | None:
        """Compact one sealed segment in the calling thread: prepare + commit. Returns
        the result, or None if nothing was committed."""
        prep = build_compacted(self.compact_source(first_seq), live, rate=rate)
        return prep if self.compact_commit(prep) else None

    # ----------------------------------------------------------------------- listing

    def segments(self) -> list[SegmentInfo]:
        """One entry per segment file, oldest first. O(segments)."""
        return [
            SegmentInfo(s.name, s.first_seq, s.first_seq + s.count - 1, s.count, self._size(s),
                        s.first_ts if s.count else None, s.state != OPEN, s.compacted,
                        s.raw_bytes, not self.is_dropped(s.first_seq))
            for s in self._segs
        ]

    def sealed_segments(self) -> list[SegmentInfo]:
        """The sealed *and durable* segments (never modified again, except replaced
        whole by a compaction), oldest first: what the S3 tier may upload. O(segments)."""
        return [i for s, i in zip(self._segs, self.segments(), strict=True) if s.state == SEALED]

    def open_sealed(self, first_seq: int) -> SealedFile:
        """Segment *first_seq* as stored, open for reading from any thread (its own
        descriptor: a later compaction does not change what it reads). NotFound unless
        that segment exists and is sealed and durable. One open() and fstat."""
        for s in self._segs:
            if s.first_seq == first_seq and s.state == SEALED and not self.is_dropped(first_seq):
                fd = self._fs.open_read(self._path(s.name))
                return SealedFile(s.name, s.first_seq, s.first_seq + s.count - 1, s.count, s.size,
                                  s.compacted, fd, self._fs)
        raise NotFound(f"journal {self._dir}: no sealed segment starting at seq {first_seq}")

    # ----------------------------------------------------------------------- tiered segments

    def drop_segment(self, first_seq: int) -> int:
        """Remove the local copy of sealed segment ``first_seq``, which the S3 tier holds:
        its index sidecar, size and counters stay, it is listed in ``tiered.json``
        (durably, before the unlink), and its reads go through the read cache
        (:class:`~cdp.journal.tiered.NotLocal` on a miss). Returns the bytes freed.
        UsageError for the open or a sealing segment, a segment a compaction is
        replacing, or one whose sidecar is not intact; NotFound for no such segment.
        Cost: a sidecar header read, a small file write, an unlink, two directory fsyncs."""
        seg = self._droppable(first_seq)
        if seg is None:
            return 0
        tfs = self._switch_dropped(seg)
        tfs.persist(*tfs.snapshot(), [self._path(seg.name)])
        return seg.size

    async def drop_segments(self, firsts: Sequence[int]) -> int:
        """:meth:`drop_segment` of several segments with the file work off the loop: they
        switch to the read cache at once (in memory), then ``tiered.json`` is written and
        their files unlinked in a worker thread (one state write, one directory fsync for
        all; see :mod:`cdp.journal.tiered` for the crash argument). Segments that cannot
        be dropped now are skipped. Returns the bytes freed. Cost on the loop: a sidecar
        header read per segment."""
        paths: list[str] = []
        freed = 0
        tfs: TieredFS | None = None
        for first in firsts:
            try:
                seg = self._droppable(first)
            except (UsageError, NotFound):
                continue
            if seg is None:
                continue
            tfs = self._switch_dropped(seg)
            paths.append(self._path(seg.name))
            freed += seg.size
        if tfs is not None:
            await asyncio.to_thread(tfs.persist, *tfs.snapshot(), paths)
        return freed

    def _droppable(self, first_seq: int) -> SegmentState | None:
        """Segment ``first_seq`` if its local copy may be dropped, None if it already
        is; UsageError / NotFound as :meth:`drop_segment` says."""
        i = bisect.bisect_left(self._firsts, first_seq)
        if i == len(self._firsts) or self._firsts[i] != first_seq:
            raise NotFound(f"no journal segment starts at seq {first_seq}")
        seg = self._segs[i]
        if self.is_dropped(first_seq):
            return None
        if seg.state != SEALED or self._pinned(first_seq):
            raise UsageError(f"segment {seg.name} is not sealed or is being compacted")
        hdr = read_index_header(self._fs, self._dir, first_seq)
        if hdr is None or hdr.data_end != seg.size or hdr.count != seg.count:
            raise UsageError(f"segment {seg.name}: its index sidecar is not intact; "
                             "not dropping its local copy")
        return seg

    def _switch_dropped(self, seg: SegmentState) -> TieredFS:
        """Serve ``seg`` from the read cache from now on (in memory; the caller persists)."""
        tfs = self._fs
        if not isinstance(tfs, TieredFS):
            tfs = TieredFS(tfs, self._dir, {}, self._cache_bytes)
            self._fs = tfs
        tfs.switch(seg.first_seq, seg.size)
        fd = self._drop_fd(seg.first_seq)
        if fd is not None:
            tfs.close(fd)
        return tfs

    def is_dropped(self, first_seq: int) -> bool:
        """True if segment ``first_seq``'s local copy was dropped (the tier holds it)."""
        fs = self._fs
        return isinstance(fs, TieredFS) and first_seq in fs.dropped

    def dropped_segments(self) -> list[int]:
        """First seqs of the dropped segments, oldest first."""
        fs = self._fs
        return sorted(fs.dropped) if isinstance(fs, TieredFS) else []

    def set_cache_bytes(self, n: int) -> None:
        """Bound the read cache of dropped segments to ``n`` bytes (evicting now)."""
        self._cache_bytes = n
        fs = self._fs
        if isinstance(fs, TieredFS):
            fs.cache_bytes = n
            fs._trim()

    def cache_put(self, first_seq: int, offset: int, data: bytes) -> None:
        """Store bytes ``[offset, offset + len(data))`` fetched from the tier's copy of
        dropped segment ``first_seq`` in the read cache (whole records only; checked by
        CRC when read, like any record). Blocking file writes."""
        fs = self._fs
        if isinstance(fs, TieredFS):
            fs.cache_put(first_seq, offset, data)

    def local_bytes(self) -> int:
        """Journal bytes on local disk: segments not dropped, plus the read cache."""
        fs = self._fs
        if not isinstance(fs, TieredFS):
            return sum(self._size(s) for s in self._segs)
        return sum(self._size(s) for s in self._segs if s.first_seq not in fs.dropped) + fs.cached

    def cache_stats(self) -> tuple[int, int, int]:
        """(hits, misses, cached bytes) of the read cache since open."""
        fs = self._fs
        return (fs.hits, fs.misses, fs.cached) if isinstance(fs, TieredFS) else (0, 0, 0)

    def stats(self) -> JournalStats:
        """Record and byte totals. O(segments)."""
        records = sum(s.count for s in self._segs)
        file_bytes = sum(self._size(s) for s in self._segs)
        stored = file_bytes - SEGMENT_HEADER_SIZE * len(self._segs) - RECORD_HEADER_SIZE * records
        return JournalStats(records, sum(s.raw_bytes for s in self._segs), stored, file_bytes,
                            len(self._segs))


class _Sync:
    """One sync of the pipelined group commit: the last seq it covers (-1 until it has
    started: it then covers everything appended before that) and its task."""

    __slots__ = ("covered", "task")

    def __init__(self) -> None:
        self.covered = -1
        self.task: asyncio.Task[None]


_TAIL_PACK = RECORD_TAIL.pack
_HEADER_PACK_INTO = RECORD_HEADER.pack_into
_U32_PACK_INTO = struct.Struct("<I").pack_into
_PREFIX_PACK = RECORD_PREFIX.pack
_CRC = crc32c
_LZ4 = lz4.block.compress
_ENTRY_PACK_INTO = CHUNK_ENTRY.pack_into
_GRANULES_PACK_INTO = struct.Struct(f"<{GRANULES}I").pack_into
_GRANULE_OFFSETS = range(0, CHUNK_SIZE, GRANULE_SIZE)
_CHUNKED = int(Compression.CHUNKED)
assert RECORD_PREFIX.size == CRC_START
