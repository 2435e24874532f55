"""Segment scanning and the per-segment index sidecar.

:func:`scan_segment` walks every record of one segment file, checking magic, structure
and CRC, and tells a torn tail (nothing valid after the first bad byte) from damage in
the middle (a valid record with a plausible seq follows). Recovery, index rebuilds and
:func:`cdp.journal.verify.verify_journal` all use it. The index sidecar (``.idx``)
stores the timestamp and offset of every record of a sealed segment so opening a journal
reads one 64-byte header per sealed segment instead of the segment itself.
:class:`SegmentState` is what the journal keeps in memory per segment.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from dataclasses import asdict, dataclass, field

from crc32c import crc32c

from cdp.errors import Corruption
from cdp.journal.format import (
    CLOSED_SUFFIX,
    CRC_START,
    DATA_KINDS,
    INDEX_SUFFIX,
    MAX_PAYLOAD,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    RECORD_MAGIC_BYTES,
    SEGMENT_HEADER_SIZE,
    Compression,
    check_segment_header,
    closed_name,
    covered_size,
    decode_chunks,
    decode_payload,
    first_bad_chunk,
    header_problem,
    index_name,
    parse_chunk_table,
    segment_name,
)
from cdp.journal.fs import FileLayer

#: bytes read per pread while scanning
SCAN_CHUNK = 4 << 20

_unpack_header = RECORD_HEADER.unpack_from
_CHUNKED = int(Compression.CHUNKED)
_ELIDED = int(Compression.ELIDED)

#: on disk, never change: first 8 bytes of every index sidecar
INDEX_MAGIC = b"CDPJIDX\x00"
#: on disk, never change
INDEX_VERSION = 1
#: magic(8s) version(H) reserved(H) count(I) first_seq(Q) data_end(Q) first_ts(Q)
#: last_ts(Q) raw_bytes(Q) entries_crc(I) header_crc(I)
INDEX_HEADER = struct.Struct("<8sHHIQQQQQII")
INDEX_HEADER_SIZE = INDEX_HEADER.size  # 64

_BIG_ENDIAN = sys.byteorder == "big"


@dataclass
class Problem:
    """One damaged place in a journal: segment file, byte offset, seq (if known), why."""

    segment: str
    offset: int
    seq: int | None
    reason: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        return f"segment {self.segment} offset {self.offset} seq {self.seq}: {self.reason}"


@dataclass
class SegmentScan:
    """What a scan of one segment found. Seq ``first_seq + i`` is at ``offs[i]``.

    Damaged seqs keep a slot (offset of the damage, timestamp of the record before) so
    the seq arithmetic holds; they are listed in ``damaged`` and in ``problems``.
    """

    first_seq: int
    name: str
    size: int
    header_error: str | None = None
    count: int = 0
    ts: array[int] = field(default_factory=lambda: array("q"))
    offs: array[int] = field(default_factory=lambda: array("q"))
    raw_bytes: int = 0
    valid_end: int = SEGMENT_HEADER_SIZE
    torn_at: int | None = None
    torn_bytes: int = 0
    torn_records: int = 0
    #: the torn tail begins with zeros or with a record of the file's earlier life (a seq
    #: below ``first_seq``): space written ahead of the records, not a record begun
    slack: bool = False
    problems: list[Problem] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)
    last_ts: int = 0
    #: segment header flags (SEGMENT_COMPACTED: rewritten by compaction)
    flags: int = 0


#: lifecycle of a segment (SegmentState.state): appended to; sealed, its sync pending;
#: sealed and durable (never modified again, except replaced whole by a compaction)
OPEN, SEALING, SEALED = 0, 1, 2
#: first_ts of an empty segment: after every real timestamp
NO_TS = 1 << 63


class SegmentState:
    """The journal's in-memory state of one segment: seq range, size, times, and its
    (timestamp, offset) arrays when loaded (``ts``/``offs`` None while not in memory).
    Record ``first_seq + i`` is at ``offs[i]``."""

    __slots__ = ("compacted", "count", "first_seq", "first_ts", "last_ts", "name", "offs",
                 "raw_bytes", "size", "state", "ts")

    def __init__(self, first_seq: int) -> None:
        self.first_seq = first_seq
        self.name = segment_name(first_seq)
        self.count = 0
        self.size = SEGMENT_HEADER_SIZE
        self.first_ts = NO_TS
        self.last_ts = 0
        self.raw_bytes = 0
        self.ts: array[int] | None = None
        self.offs: array[int] | None = None
        self.state = OPEN
        self.compacted = False


class ReadWindow:
    """Sequential reads of one file through large preads (``SCAN_CHUNK``): :meth:`get`
    serves a range from the last pread when it lies inside it, else preads again there.
    Used by scans, compaction and :meth:`Journal.scan`."""

    __slots__ = ("fd", "fs", "w", "ws")

    def __init__(self, fs: FileLayer, fd: int) -> None:
        self.fs = fs
        self.fd = fd
        self.w = b""
        self.ws = 0

    @classmethod
    def over(cls, data: bytes | memoryview) -> ReadWindow:
        """A window already holding ``data`` (offset 0) and no file: for checks of
        records held in memory, which never ask for bytes outside it. Over a memoryview,
        :meth:`get` returns views (no copy)."""
        win = cls(None, -1)  # type: ignore[arg-type]
        win.w = data  # type: ignore[assignment]
        return win

    def get(self, off: int, n: int) -> bytes:
        ws = self.ws
        if off >= ws and off + n <= ws + len(self.w):
            return self.w[off - ws : off - ws + n]
        self.w = self.fs.pread(self.fd, max(n, SCAN_CHUNK), off)
        self.ws = off
        return self.w[:n]


def _check_at(
    win: ReadWindow, pos: int, size: int, deep: bool, where: str, chunks: bool = True
) -> tuple[str | None, bool, int, int, int, int]:
    """Validate the record at ``pos``: (reason, crc_ok, stored, seq, ts, raw).

    ``reason`` None means valid. ``crc_ok`` True with a reason means the bytes are as
    written but structurally wrong (a writer bug, not a torn write). Every byte is
    checked: the record CRC and, for a chunked record, every chunk's CRC (not those
    with ``chunks`` False: see :func:`check_record`).
    """
    if size - pos < RECORD_HEADER_SIZE:
        return "truncated record header", False, 0, 0, 0, 0
    hdr = win.get(pos, RECORD_HEADER_SIZE)
    magic, crc, ver, kind, comp, _flags, slen, seq, ts, _off, length = RECORD_HEADER.unpack(hdr)
    if magic != RECORD_MAGIC:
        return "bad record magic", False, 0, 0, 0, 0
    if slen > MAX_PAYLOAD:
        return "bad stored length", False, 0, 0, 0, 0
    if pos + RECORD_HEADER_SIZE + slen > size:
        return "truncated record", False, slen, seq, ts, 0
    cov = covered_size(comp, length, slen, ver)
    if cov > slen:
        return "bad checksum (chunk table larger than the record)", False, slen, seq, ts, 0
    body = win.get(pos + CRC_START, RECORD_HEADER_SIZE - CRC_START + slen)
    head_end = RECORD_HEADER_SIZE - CRC_START + cov
    if crc32c(memoryview(body)[:head_end] if cov != slen else body) != crc:
        return "bad checksum", False, slen, seq, ts, 0
    bad = header_problem(ver, kind, comp, slen, length)
    if bad is None and comp == Compression.CHUNKED:
        stored = memoryview(body)[RECORD_HEADER_SIZE - CRC_START :]
        table = parse_chunk_table(stored[:cov], length, slen, ver)
        if isinstance(table, str):
            bad = table
        else:
            if chunks and (i := first_bad_chunk(stored, table)) is not None:
                return f"bad checksum in chunk {i}", False, slen, seq, ts, 0
            if deep:
                try:
                    decode_chunks(stored, length, where, ver)
                except Corruption as exc:
                    bad = str(exc).rsplit(": ", 1)[-1]
    elif bad is None and deep:
        try:
            decode_payload(kind, comp, length, body[RECORD_HEADER_SIZE - CRC_START :], where)
        except Corruption as exc:
            bad = str(exc).rsplit(": ", 1)[-1]
    raw = length if kind in DATA_KINDS else slen
    if comp == Compression.ELIDED:
        raw = 0
    return bad, True, slen, seq, ts, raw


def check_record(data: bytes | memoryview, chunks: bool = True
                 ) -> tuple[str | None, int, int, int]:
    """Check one whole stored record (header + stored payload, nothing after it) held in
    memory, as recovery checks records on disk: every byte under its CRC (the record CRC,
    every chunk's or granule's), the header's structure, and for MARKER, REWIND and ERROR
    the payload layout. Returns (reason or None, seq, timestamp, raw bytes for stats).
    Cost: O(len(data)) CRC, no decompression.

    ``chunks`` False leaves out the chunks' and granules' own CRCs of a chunked record
    (the record CRC still covers its header and tables, and the whole payload of any
    other record): for a record only passed on to a journal whose
    :meth:`~cdp.journal.Journal.append_stored` checks them. Cost then: O(tables)."""
    kind = data[9] if len(data) >= RECORD_HEADER_SIZE else 0
    deep = kind not in DATA_KINDS  # their payloads are tiny; data is not decoded
    # data records are only CRC-checked: through a view, their payload is never copied
    win = ReadWindow.over(data if deep else memoryview(data))
    reason, _ok, slen, seq, ts, raw = _check_at(win, 0, len(data), deep, "shipped record",
                                                chunks)
    if reason is None and RECORD_HEADER_SIZE + slen != len(data):
        reason = f"{len(data) - RECORD_HEADER_SIZE - slen} bytes after the record"
    return reason, seq, ts, raw


def _resync(
    fs: FileLayer, fd: int, win: ReadWindow, bad_pos: int, size: int, expected: int
) -> tuple[int, int] | None:
    """First valid record after ``bad_pos`` whose seq fits, as (offset, seq), or None."""
    p = bad_pos + 1
    while p < size:
        chunk = fs.pread(fd, SCAN_CHUNK + 3, p)
        i = chunk.find(RECORD_MAGIC_BYTES)
        while i >= 0:
            q = p + i
            reason, _ok, _slen, seq, _ts, _raw = _check_at(win, q, size, False, "")
            if reason is None and expected <= seq <= expected + (q - bad_pos) // RECORD_HEADER_SIZE:
                return q, seq
            i = chunk.find(RECORD_MAGIC_BYTES, i + 1)
        p += SCAN_CHUNK
    return None


def _is_slack(win: ReadWindow, pos: int, size: int, first_seq: int) -> bool:
    """Whether the bytes at ``pos`` (where the records end) begin with zeros or with an
    intact record of a seq below ``first_seq``: space the writer wrote ahead of its
    records (docs/FORMATS.md, "Recovery rules"), not a record it began."""
    head = win.get(pos, min(RECORD_HEADER_SIZE, size - pos))
    if not any(head):
        return True
    reason, _ok, _slen, seq, _ts, _raw = _check_at(win, pos, size, False, "")
    return reason is None and seq < first_seq


def _count_torn(win: ReadWindow, pos: int, size: int, first_seq: int) -> int:
    """How many (partial) records the bytes ``[pos, size)`` seem to hold, up to the first
    space written ahead (:func:`_is_slack`)."""
    n = 0
    while pos < size:
        if n and _is_slack(win, pos, size, first_seq):
            break
        n += 1
        if size - pos < RECORD_HEADER_SIZE:
            break
        magic, _crc, *_rest = RECORD_HEADER.unpack(win.get(pos, RECORD_HEADER_SIZE))
        slen = _rest[4]
        if magic != RECORD_MAGIC or slen > MAX_PAYLOAD:
            break
        pos += RECORD_HEADER_SIZE + slen
    return n


def scan_segment(
    fs: FileLayer, directory: str, first_seq: int, deep: bool = False
) -> SegmentScan:
    """Check every record of segment ``first_seq``. Reads the whole file once.

    ``deep`` also decompresses payloads and checks MARKER/REWIND/ERROR layouts.
    Damage followed by a valid record is reported in ``problems``; damage with nothing
    valid after it is a torn tail (``torn_at``/``torn_bytes``/``torn_records``).
    Cost: O(segment bytes).
    """
    name = segment_name(first_seq)
    path = os.path.join(directory, name)
    size = fs.size(path)
    scan = SegmentScan(first_seq, name, size)
    fd = fs.open_read(path)
    try:
        win = ReadWindow(fs, fd)
        # a bad header is reported by the caller; the records after it are still scanned
        head = win.get(0, SEGMENT_HEADER_SIZE)
        scan.header_error = check_segment_header(head, first_seq)
        if scan.header_error is None:
            scan.flags = struct.unpack_from("<I", head, 12)[0]
        ts_a, offs_a, damaged = scan.ts, scan.offs, scan.damaged
        ts_add, offs_add = ts_a.append, offs_a.append
        pos = SEGMENT_HEADER_SIZE
        expected = first_seq
        last_ts = 0
        raw_total = 0
        w: bytes = b""
        mv = memoryview(w)
        while pos < size:
            if not deep:
                # fast path (the records open scans, ~3x fewer µs each): a record lying
                # whole in the window, not chunked, checked as _check_at checks it
                if win.w is not w:
                    w = win.w
                    mv = memoryview(w)
                i = pos - win.ws
                if i >= 0 and i + RECORD_HEADER_SIZE <= len(w):
                    magic, crc, ver, kind, comp, _fl, slen, seq, ts, _off, length = (
                        _unpack_header(w, i))
                    end = i + RECORD_HEADER_SIZE + slen
                    if (magic == RECORD_MAGIC and seq == expected and comp != _CHUNKED
                            and slen <= MAX_PAYLOAD and end <= len(w)
                            and pos + RECORD_HEADER_SIZE + slen <= size
                            and crc32c(mv[i + CRC_START : end]) == crc
                            and header_problem(ver, kind, comp, slen, length) is None):
                        ts_add(ts)
                        offs_add(pos)
                        if ts > last_ts:
                            last_ts = ts
                        if comp != _ELIDED:
                            raw_total += length if kind in DATA_KINDS else slen
                        pos += RECORD_HEADER_SIZE + slen
                        expected += 1
                        continue
            where = f"segment {name} offset {pos} seq {expected}"
            reason, crc_ok, slen, seq, ts, raw = _check_at(win, pos, size, deep, where)
            if reason is None and seq == expected:
                ts_a.append(ts)
                offs_a.append(pos)
                if ts > last_ts:
                    last_ts = ts
                raw_total += raw
                pos += RECORD_HEADER_SIZE + slen
                expected += 1
                continue
            if reason is None and seq > expected:
                # a valid record after missing seqs: keep slots for the missing ones
                scan.problems.append(
                    Problem(name, pos, expected, f"seq gap: seqs {expected}..{seq - 1} missing")
                )
                for s in range(expected, seq):
                    ts_a.append(last_ts)
                    offs_a.append(pos)
                    damaged.append(s)
                expected = seq
                continue
            if reason is None:
                reason = f"record holds seq {seq}, expected {expected}"
            elif crc_ok and seq == expected:
                # intact bytes with a wrong structure (a writer bug): skip the record
                scan.problems.append(Problem(name, pos, expected, reason))
                ts_a.append(last_ts)
                offs_a.append(pos)
                damaged.append(expected)
                pos += RECORD_HEADER_SIZE + slen
                expected += 1
                continue
            nxt = _resync(fs, fd, win, pos, size, expected)
            if nxt is None:
                scan.torn_at = pos
                scan.torn_bytes = size - pos
                scan.slack = _is_slack(win, pos, size, first_seq)
                scan.torn_records = 0 if scan.slack else _count_torn(win, pos, size, first_seq)
                break
            npos, nseq = nxt
            scan.problems.append(Problem(name, pos, expected, reason))
            for s in range(expected, nseq):
                ts_a.append(last_ts)
                offs_a.append(pos)
                damaged.append(s)
            pos, expected = npos, nseq
        scan.count = len(offs_a)
        scan.valid_end = pos if scan.torn_at is None else scan.torn_at
        scan.raw_bytes = raw_total
        scan.last_ts = last_ts
        return scan
    finally:
        fs.close(fd)


# ---------------------------------------------------------------------------------------
# Index sidecar
# ---------------------------------------------------------------------------------------


@dataclass
class IndexHeader:
    """The fixed part of an index sidecar."""

    first_seq: int
    count: int
    data_end: int
    first_ts: int
    last_ts: int
    raw_bytes: int
    entries_crc: int
    #: the segment's header flags (SEGMENT_COMPACTED), kept in the former reserved u16
    flags: int = 0


def _to_le(a: array[int]) -> bytes:
    if _BIG_ENDIAN:
        a = array("q", a)
        a.byteswap()
    return a.tobytes()


def encode_index(
    first_seq: int, ts: array[int], offs: array[int], data_end: int, raw_bytes: int,
    flags: int = 0,
) -> bytes:
    """Bytes of the index sidecar for a segment (header + timestamps + offsets)."""
    entries = _to_le(ts) + _to_le(offs)
    first_ts = ts[0] if len(ts) else 0
    last_ts = max(ts) if len(ts) else 0
    head = INDEX_HEADER.pack(
        INDEX_MAGIC, INDEX_VERSION, flags, len(ts), first_seq, data_end, first_ts, last_ts,
        raw_bytes, crc32c(entries), 0,
    )
    head = head[:-4] + struct.pack("<I", crc32c(head[:-4]))
    return head + entries


def write_index(
    fs: FileLayer, directory: str, first_seq: int, ts: array[int], offs: array[int],
    data_end: int, raw_bytes: int, flags: int = 0, final_name: str | None = None,
) -> None:
    """Write the sidecar durably under a temp name and rename it into place.

    The caller fsyncs the directory (the sidecar is derived data: losing it only costs a
    rescan). Cost: one write + one fdatasync.
    """
    final = os.path.join(directory, final_name or index_name(first_seq))
    _write_sidecar(fs, final, encode_index(first_seq, ts, offs, data_end, raw_bytes, flags))


def _write_sidecar(fs: FileLayer, final: str, data: bytes) -> None:
    """``final`` written under a temp name, fdatasynced and renamed into place (no
    directory fsync: a sidecar is derived data)."""
    tmp = final + ".tmp"
    try:
        fs.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = fs.open_append(tmp)
    try:
        fs.write(fd, data)
        fs.fdatasync(fd)
    finally:
        fs.close(fd)
    fs.rename(tmp, final)


def read_index_header(fs: FileLayer, directory: str, first_seq: int) -> IndexHeader | None:
    """The sidecar header of segment ``first_seq`` if present and valid, else None."""
    path = os.path.join(directory, index_name(first_seq))
    try:
        fd = fs.open_read(path)
    except FileNotFoundError:
        return None
    try:
        data = fs.pread(fd, INDEX_HEADER_SIZE, 0)
    finally:
        fs.close(fd)
    if len(data) < INDEX_HEADER_SIZE:
        return None
    magic, ver, iflags, count, fseq, data_end, first_ts, last_ts, raw, ecrc, hcrc = (
        INDEX_HEADER.unpack(data)
    )
    if magic != INDEX_MAGIC or ver != INDEX_VERSION or fseq != first_seq:
        return None
    if hcrc != crc32c(data[:-4]):
        return None
    return IndexHeader(fseq, count, data_end, first_ts, last_ts, raw, ecrc, iflags)


def load_index_entries(
    fs: FileLayer, directory: str, hdr: IndexHeader
) -> tuple[array[int], array[int]] | None:
    """(timestamps, offsets) of every record, or None if the sidecar is damaged."""
    path = os.path.join(directory, index_name(hdr.first_seq))
    n = hdr.count
    try:
        fd = fs.open_read(path)
    except FileNotFoundError:
        return None
    try:
        data = fs.pread(fd, 16 * n, INDEX_HEADER_SIZE)
    finally:
        fs.close(fd)
    if len(data) != 16 * n or crc32c(data) != hdr.entries_crc:
        return None
    ts = array("q")
    ts.frombytes(data[: 8 * n])
    offs = array("q")
    offs.frombytes(data[8 * n :])
    if _BIG_ENDIAN:
        ts.byteswap()
        offs.byteswap()
    return ts, offs


# ---------------------------------------------------------------------------------------
# Clean-close sidecar (docs/FORMATS.md, "Clean close")
# ---------------------------------------------------------------------------------------

#: on disk, never change: first 8 bytes of every clean-close sidecar
CLOSED_MAGIC = b"CDPJCLS\x00"
#: on disk, never change
CLOSED_VERSION = 1
_U32 = struct.Struct("<I")


def segment_crc(fs: FileLayer, fd: int, end: int) -> int:
    """CRC32C of bytes ``[0, end)`` of an open file, read ``SCAN_CHUNK`` at a time.
    Cost: O(end) at the CRC's speed (GB/s); no per-record work."""
    crc, pos = 0, 0
    while pos < end:
        data = fs.pread(fd, min(SCAN_CHUNK, end - pos), pos)
        if not data:
            break
        crc = crc32c(data, crc)
        pos += len(data)
    return crc


def encode_closed(
    first_seq: int, ts: array[int], offs: array[int], data_end: int, raw_bytes: int,
    data_crc: int,
) -> bytes:
    """Bytes of a clean-close sidecar: the index sidecar's layout under its own magic,
    with the CRC32C of the segment's bytes ``[0, data_end)`` after the entries (and
    under ``entries_crc``)."""
    entries = _to_le(ts) + _to_le(offs) + _U32.pack(data_crc)
    head = INDEX_HEADER.pack(
        CLOSED_MAGIC, CLOSED_VERSION, 0, len(ts), first_seq, data_end,
        ts[0] if len(ts) else 0, max(ts) if len(ts) else 0, raw_bytes, crc32c(entries), 0,
    )
    return head[:-4] + _U32.pack(crc32c(head[:-4])) + entries


def write_closed(
    fs: FileLayer, directory: str, first_seq: int, ts: array[int], offs: array[int],
    data_end: int, raw_bytes: int,
) -> None:
    """Write the clean-close sidecar of segment ``first_seq``, whose records are durable
    up to ``data_end`` (the file's size): temp name, fdatasync, rename; no directory
    fsync (derived data: losing it costs a scan). Cost: one read of the segment for its
    CRC, one small write and fdatasync."""
    fd = fs.open_read(os.path.join(directory, segment_name(first_seq)))
    try:
        crc = segment_crc(fs, fd, data_end)
    finally:
        fs.close(fd)
    final = os.path.join(directory, closed_name(first_seq))
    _write_sidecar(fs, final, encode_closed(first_seq, ts, offs, data_end, raw_bytes, crc))


def clean_tail(fs: FileLayer, directory: str, first_seq: int) -> SegmentScan | None:
    """What :func:`scan_segment` finds in the open segment ``first_seq`` after a clean
    close, taken from the sidecar that close left (``.closed``), or None (scan it) unless
    the sidecar is whole (magic, version, both CRCs, the same first seq) and the segment
    file is exactly what it describes: ``data_end`` bytes whose CRC32C is the one
    recorded. Any other byte (appended, cut off or changed) fails the match. Cost: one
    read of the segment at the CRC's speed and of the sidecar (16 bytes a record), no
    per-record work."""
    try:
        fd = fs.open_read(os.path.join(directory, closed_name(first_seq)))
    except FileNotFoundError:
        return None
    try:
        data = fs.pread(fd, fs.size(os.path.join(directory, closed_name(first_seq))), 0)
    finally:
        fs.close(fd)
    if len(data) < INDEX_HEADER_SIZE + _U32.size:
        return None
    magic, ver, _fl, count, fseq, data_end, _first_ts, last_ts, raw, ecrc, hcrc = (
        INDEX_HEADER.unpack_from(data))
    entries = memoryview(data)[INDEX_HEADER_SIZE:]
    if (magic != CLOSED_MAGIC or ver != CLOSED_VERSION or fseq != first_seq
            or hcrc != crc32c(data[: INDEX_HEADER_SIZE - 4])
            or len(entries) != 16 * count + _U32.size or crc32c(entries) != ecrc):
        return None
    path = os.path.join(directory, segment_name(first_seq))
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return None
    if size != data_end:
        return None
    fd = fs.open_read(path)
    try:
        if segment_crc(fs, fd, size) != _U32.unpack_from(entries, 16 * count)[0]:
            return None
        head = fs.pread(fd, SEGMENT_HEADER_SIZE, 0)
    finally:
        fs.close(fd)
    if check_segment_header(head, first_seq) is not None:
        return None  # as written: a close never indexes a segment recovery found damaged
    ts, offs = array("q"), array("q")
    ts.frombytes(entries[: 8 * count])
    offs.frombytes(entries[8 * count : 16 * count])
    if _BIG_ENDIAN:
        ts.byteswap()
        offs.byteswap()
    scan = SegmentScan(first_seq, segment_name(first_seq), size)
    scan.flags = struct.unpack_from("<I", head, 12)[0]
    scan.ts, scan.offs, scan.count = ts, offs, count
    scan.raw_bytes, scan.valid_end, scan.last_ts = raw, size, last_ts
    return scan


def is_closed_file(name: str) -> bool:
    """Whether ``name`` is a clean-close sidecar (final name)."""
    return name.endswith(CLOSED_SUFFIX) and len(name) == 20 + len(CLOSED_SUFFIX)


def is_index_file(name: str) -> bool:
    """Whether ``name`` is an index sidecar (final name)."""
    return name.endswith(INDEX_SUFFIX) and len(name) == 20 + len(INDEX_SUFFIX)
