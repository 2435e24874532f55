"""The journal's read side: records by (seq, loc), payload slices, scans, the time index.

Design notes
------------
- **Locations.** Reads use ``loc`` = byte offset of the record in its segment; the
  segment comes from bisecting first seqs, so a compaction that rewrites a segment with
  the same seq range keeps seqs valid (a compacted segment's records are found through
  its index). Records still in the writer's buffer are read from the buffer.
- **One class, two rooms.** :class:`SegmentReader` is the base class of
  :class:`cdp.journal.Journal`, not an object it delegates to: a read of the live
  volume is one pread and one CRC (a few µs), so the read methods are called on the
  journal itself, with no forwarding call and no extra attribute hop. The reader reads
  the segment table and the open segment's tail, which the writer keeps (listed below
  the class docstring), and owns its caches: the read descriptors (LRU), the checked
  tables of chunked records (``_layouts``), decoded fill patterns (``_patterns``) and
  the segments whose index arrays are in memory (``_loaded``). The writer and the
  compaction commit change those caches only through the methods of the last section.
- **Fast paths.** A slice of a raw chunk of a version 3 record whose tables are
  remembered reads only its 4 KiB granules (one pread, one CRC per granule; inline at
  the top of :meth:`read_slice_view`, of which :meth:`read_slice` is the bytes form, so
  the live small read makes no call but ``_rfd`` and the pread; a slice smaller than
  its granules keeps them as the one-entry ``_memo``, so a client reading 1 KiB at a
  time costs one pread and one CRC per 4 KiB, not per request); a chunk of such a
  record is one pread + CRC + maybe lz4 (:meth:`_chunk_fast`); a one-block record is
  one pread of header + payload (:meth:`_block_fast`). Each gives way on anything
  unusual, damage included, and the general path (:meth:`_chunks`) then reads again
  and raises what it must.
- **Time index.** Timestamps never decrease (a clock stepping back repeats the last
  value). Sealed segments keep (timestamp, offset) per record in a sidecar loaded on
  demand (LRU); the open segment keeps them in memory. ``seq_at_time`` bisects the
  segments' first timestamps, then the segment's timestamps: O(log n).
"""

from __future__ import annotations

import bisect
import os
import struct
from array import array
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from typing import Protocol, TypeVar

import lz4.block
from crc32c import crc32c

from cdp.errors import Corruption, NotFound, PointError, UsageError
from cdp.journal.format import (
    CHUNK_SIZE,
    CRC_START,
    GRANULE_SIZE,
    GRANULES,
    MAX_PAYLOAD,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    RECORD_VERSIONS,
    SEGMENT_HEADER_SIZE,
    ChunkTable,
    Compression,
    Record,
    RecordKind,
    chunk_ok,
    covered_size,
    decode_chunk,
    decode_record,
    granules_ok,
    header_problem,
    index_name,
    parse_chunk_table,
)
from cdp.journal.fs import FileLayer
from cdp.journal.segment import (
    SEALED,
    ReadWindow,
    SegmentState,
    check_record,
    load_index_entries,
    read_index_header,
    scan_segment,
    write_index,
)
from cdp.journal.tiered import NotLocal

_T = TypeVar("_T")

#: chunk tables of chunked records kept in memory for slice reads
LAYOUT_CACHE = 4096
#: an lz4 chunk of 64 KiB stored in at most this many bytes (a 64:1 ratio: zeros, a fill
#: pattern) is decoded once and shared by every chunk with the same stored bytes
PATTERN_STORED = 1024
#: such decoded chunks kept (64 KiB each)
PATTERN_CACHE = 64
#: sealed segments whose index arrays stay in memory, at most
INDEX_CACHE = 16
#: ... and at most this many bytes of them (16 bytes a record: a timestamp and an offset;
#: a 256 MiB segment of small compressible records holds millions). The open segment's
#: arrays are not counted: they are the one per-record cost that must stay in memory.
INDEX_CACHE_BYTES = 32 << 20
#: read handles kept open
READ_FDS = 32

_W = int(RecordKind.WRITE)
_I = int(RecordKind.INIT)


class ChunkCache(Protocol):
    """A cache of decoded payload chunks that :meth:`SegmentReader.read_slice` consults.

    Key ``(seq, i)`` holds raw payload bytes ``[i*CHUNK_SIZE, (i+1)*CHUNK_SIZE)`` of record
    ``seq`` (fewer for its last chunk), whatever the record's stored layout.
    """

    def get(self, key: tuple[int, int]) -> bytes | None: ...

    def put(self, key: tuple[int, int], data: bytes) -> None: ...


class SegmentReader:
    """Reads of a journal's segments; the base of :class:`cdp.journal.Journal`.

    Not thread-safe, like the journal: one thread (the event loop's) calls it.
    """

    # The segment table and the open segment's tail: kept by the writer, read here.
    #: every segment, oldest first; the last one is open
    _segs: list[SegmentState]
    #: their first seqs (bisected to find a seq's segment)
    _firsts: list[int]
    #: their first timestamps (bisected by seq_at_time; NO_TS for an empty open segment)
    _first_ts: list[int]
    #: the open segment
    _cur: SegmentState
    #: seq of the newest record appended
    _last_seq: int
    #: bytes of the open segment handed to the OS; records past it are in the buffer
    _file_size: int
    #: bytes of the writer's buffer in use, and the buffer
    _w: int
    _mv: memoryview

    def __init__(self, directory: str, fs: FileLayer) -> None:
        self._dir = directory
        self._fs = fs
        self._read_fds: OrderedDict[int, int] = OrderedDict()
        #: segments being replaced by a compaction: first seq -> descriptor of the old file
        self._pins: dict[int, int] = {}
        self._loaded: OrderedDict[int, SegmentState] = OrderedDict()
        #: seq -> (loc, checked tables, segment) of chunked records read lately
        self._layouts: OrderedDict[int, tuple[int, ChunkTable, SegmentState]] = OrderedDict()
        #: decoded fill-pattern chunks keyed by their stored (lz4) bytes, see _chunk_fast
        self._patterns: OrderedDict[bytes, bytes] = OrderedDict()
        #: sidecars rebuilt after open (damaged or missing when first needed)
        self.repairs: list[str] = []
        #: the last granule span read for a slice smaller than it, checked: (seq, file
        #: offset, bytes). The next small slice of the same granules (a client reading
        #: 1 KiB at a time) is served from it without a pread or a CRC.
        self._memo: tuple[int, int, bytes] = (0, -1, b"")

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def _size(self, seg: SegmentState) -> int:
        """Bytes of a segment (the open one's size includes its buffered records)."""
        return self._file_size + self._w if seg is self._cur else seg.size

    # ----------------------------------------------------------------------- reading

    def _seg_for(self, seq: int) -> SegmentState:
        if not self._firsts[0] <= seq <= self._last_seq:
            raise NotFound(f"seq {seq} is not in the journal "
                           f"({self._firsts[0]}..{self._last_seq})")
        seg = self._segs[bisect.bisect_right(self._firsts, seq) - 1]
        if seq >= seg.first_seq + seg.count:
            raise NotFound(f"seq {seq} is not in segment {seg.name}")
        return seg

    def _rfd(self, seg: SegmentState) -> int:
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

    def _raw(self, seg: SegmentState, seq: int, loc: int) -> tuple[bytes, bytes, str]:
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

    def _where(self, seg: SegmentState, seq: int, loc: int) -> int:
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
        chunks decoded; without a cache, a slice over several raw chunks of a version 3
        record is one pread of its granules (:meth:`_raw_span`). Raises Corruption
        (segment, offset, seq, chunk) if a needed
        chunk or the header is damaged: other chunks of the record stay readable;
        NotFound for a seq outside the journal; UsageError for a slice outside the
        payload. Cost: O(chunks touched), one pread per run of adjacent chunks.
        """
        lay = self._layouts.get(seq)
        if lay is not None and lay[0] == loc and poff >= 0 and length > 0:
            # The granule fast path, inline (it serves the hottest read, a small read of
            # the live volume): a slice inside one raw chunk of a version 3 record whose
            # checked tables are remembered and which lies in the segment file is one
            # pread of the 4 KiB granules it overlaps, each granule's CRC checked (no
            # decode, no cache: the page cache holds the file). Anything else, a damaged
            # granule included, goes on below: the general path then reads the whole
            # chunk and raises what it must.
            table = lay[1]
            seg = lay[2]
            gr = table.granules
            i = poff >> _CHUNK_SHIFT
            o = poff - (i << _CHUNK_SHIFT)
            end = o + length
            raw = table.length - (i << _CHUNK_SHIFT)  # the raw size of chunk i if the last
            if (gr is not None and end <= CHUNK_SIZE and end <= raw and i < table.count
                    and table.comps[i] == _NONE_COMP and not seg.compacted
                    and (seg is not self._cur or loc < self._file_size)):
                a = o & _GRANULE_MASK
                b = ((end - 1) | (GRANULE_SIZE - 1)) + 1
                if b > raw:
                    b = raw
                n = b - a
                pos = loc + RECORD_HEADER_SIZE + table.starts[i] + a
                memo = self._memo
                if memo[1] == pos and memo[0] == seq and len(memo[2]) == n:
                    return memoryview(memo[2])[o - a : end - a]
                try:
                    blob = self._fs.pread(self._rfd(seg), n, pos)
                except NotLocal:
                    # a segment only the tier holds: the general path below serves the
                    # slice from the chunk cache when an earlier read decoded it, and
                    # raises NotLocal itself when it must fetch
                    blob = b""
                if len(blob) == n:
                    k = GRANULES * i + (a >> _GRANULE_SHIFT)
                    if n <= GRANULE_SIZE:
                        ok = _CRC(blob) == gr[k]
                    else:
                        ok = True
                        mv = memoryview(blob)
                        for g in range(0, n, GRANULE_SIZE):
                            if _CRC(mv[g : g + GRANULE_SIZE]) != gr[k]:
                                ok = False
                                break
                            k += 1
                    if ok:
                        self._layouts.move_to_end(seq)
                        if o == a and n == length:
                            return blob
                        self._memo = (seq, pos, blob)
                        return memoryview(blob)[o - a : end - a]
        if poff < 0 or length < 0:
            raise UsageError(f"slice [{poff}, {poff + length}) of seq {seq} out of range")
        if length == 0:
            return b""
        first = poff // CHUNK_SIZE
        last = (poff + length - 1) // CHUNK_SIZE
        if first != last and cache is None:
            # a slice over several chunks read without a cache (the one-pass readers:
            # export, image): raw chunks are read as one span of granules, no decode, no
            # copy. With a cache the chunks are decoded and cached as before.
            if lay is None or lay[0] != loc:
                lay, whole = self._learn_layout(seq, loc)
                if whole is not None:  # a one-block record, read and checked whole
                    if poff + length > len(whole):
                        raise UsageError(f"slice [{poff}, {poff + length}) is past the end of "
                                         f"seq {seq}'s payload")
                    return (whole if poff == 0 and length == len(whole)
                            else memoryview(whole)[poff : poff + length])
            if lay is not None:
                span = self._raw_span(seq, lay, poff, length)
                if span is not None:
                    return span
        o = poff - first * CHUNK_SIZE
        if first == last:
            p: bytes | memoryview | None = cache.get((seq, first)) if cache is not None else None
            if p is None:
                if lay is not None:  # a chunked record (a one-block one has no table)
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

    def read_slice_into(self, seq: int, loc: int, poff: int, out: memoryview) -> bool:
        """Fill ``out`` with payload bytes ``[poff, poff + len(out))`` of record ``seq``
        at ``loc`` when that is one read of stored raw granules (or of a one-block
        record, read and checked as :meth:`read_slice` does, then copied): a version 3 record in
        its segment file (not compacted, not buffered), every chunk the slice touches
        stored raw, the slice granule-aligned (its end may be the payload's). The bytes
        are checked against their granule CRCs (:func:`granules_ok`) before True is
        returned. False for anything else, damage included, with ``out`` in an
        unspecified state: :meth:`read_slice` then reads the slice and raises what it
        must. For one-pass readers (export, image) that reuse their buffers: no
        allocation, no decode, no copy beyond the kernel's. Cost: one pread into
        ``out`` + one CRC pass; the record's tables read once (remembered)."""
        length = len(out)
        if length <= 0 or poff < 0:
            return False
        lay = self._layouts.get(seq)
        if lay is None:
            # a one-block record (no table remembered): read_slice's own one-pread path
            # (its size from the segment's offsets, else a 4 KiB guess), then one copy
            try:
                p = self._block_fast(seq, loc, None)
            except NotLocal:
                return False
            if p is not None:
                if poff + length > len(p):
                    return False
                out[:] = memoryview(p)[poff : poff + length]
                return True
        if poff & (GRANULE_SIZE - 1):
            return False
        if lay is None or lay[0] != loc:
            try:
                lay, _whole = self._learn_layout(seq, loc)
            except (Corruption, NotLocal, NotFound, PointError):
                return False
            if lay is None:
                return False
        loc, table, seg = lay
        gr = table.granules
        end = poff + length
        total = table.length
        if (gr is None or seg.compacted or (seg is self._cur and loc >= self._file_size)
                or end > total or (end & (GRANULE_SIZE - 1) and end != total)):
            return False
        i = poff >> _CHUNK_SHIFT
        if not _stored_raw(table, i, end):
            return False
        pos = loc + RECORD_HEADER_SIZE + table.starts[i] + poff - (i << _CHUNK_SHIFT)
        try:
            n = self._fs.pread_into(self._rfd(seg), out, pos)
        except NotLocal:
            return False
        if n != length or not granules_ok(out, gr, poff >> _GRANULE_SHIFT):
            return False
        self._layouts.move_to_end(seq)
        return True

    def _learn_layout(self, seq: int, loc: int) -> tuple[
            tuple[int, ChunkTable, SegmentState] | None, bytes | None]:
        """Read record ``seq``'s header and chunk table (remembered, as the general path
        does): ``(layout, None)`` for a chunked record in a segment that is not
        compacted, ``(None, payload)`` for a one-block record (read and checked whole),
        ``(None, None)`` when compacted (the general path relocates it). Raises what
        :meth:`_read_layout` raises (damage, expired data)."""
        seg = self._seg_for(seq)
        if seg.compacted:
            return None, None
        got = self._read_layout(seg, seq, loc, f"segment {seg.name} offset {loc} seq {seq}")
        if isinstance(got, bytes):
            return None, got
        return self._layouts[seq], None

    def _raw_span(self, seq: int, lay: tuple[int, ChunkTable, SegmentState], poff: int,
                  length: int) -> bytes | memoryview | None:
        """Payload bytes ``[poff, poff+length)`` of a version 3 record whose checked
        tables are remembered (*lay*), when every chunk they touch is stored raw and the
        record lies in the segment file: stored raw chunks are contiguous, so this is one
        pread of the 4 KiB granules the slice overlaps, each granule's CRC checked, and
        the slice comes back without a decode or a copy (the read itself when it is
        granule-aligned, else a view of it). None for anything else, a damaged granule
        included: the general path then reads again and raises what it must.
        Cost: one pread + one CRC pass (:func:`granules_ok`: one call per chunk for a
        long span, per granule for a short one); O(chunks) checks of the table."""
        loc, table, seg = lay
        gr = table.granules
        end = poff + length
        if (gr is None or seg.compacted or (seg is self._cur and loc >= self._file_size)
                or poff < 0 or length <= 0 or end > table.length):
            return None
        i = poff >> _CHUNK_SHIFT
        if not _stored_raw(table, i, end):
            return None
        st = table.starts
        total = table.length
        a = poff & _GRANULE_MASK
        b = ((end - 1) | (GRANULE_SIZE - 1)) + 1
        if b > total:
            b = total
        n = b - a
        blob = self._fs.pread(self._rfd(seg), n,
                              loc + RECORD_HEADER_SIZE + st[i] + a - (i << _CHUNK_SHIFT))
        if len(blob) != n:
            return None
        # a = GRANULES * chunk + granule in the chunk, in bytes (raw chunks are contiguous)
        if not granules_ok(blob, gr, a >> _GRANULE_SHIFT):
            return None
        self._layouts.move_to_end(seq)
        if a == poff and n == length:
            return blob
        return memoryview(blob)[poff - a : end - a]

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

    def _record_span(self, seg: SegmentState, seq: int, loc: int) -> int | None:
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

    def _read_chunks(self, seg: SegmentState, loc: int, table: ChunkTable, missing: list[int],
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

    def _get(self, seg: SegmentState, loc: int, rel: int, n: int) -> bytes:
        """``n`` bytes at ``loc + rel`` of a segment, from the buffer or the file."""
        if seg is self._cur and loc >= self._file_size:
            i = loc - self._file_size + rel
            return bytes(self._mv[i : min(i + n, self._w)])
        return self._fs.pread(self._rfd(seg), n, loc + rel)

    def _read_layout(self, seg: SegmentState, seq: int, loc: int,
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
        return self._walk(from_seq, self.read_record, decode_record)

    def scan_meta(self, from_seq: int = 1) -> Iterator[Record]:
        """:meth:`scan` without the data of WRITE/INIT records (``payload`` b""): each is
        checked as recovery checks records (every byte under its CRCs, the header's
        structure) but not decompressed; the other kinds are decoded whole. For replay
        into the maps at open, which needs where the data is, not what it is.

        Raises Corruption at the first damaged record. Cost: one CRC pass per record.
        """
        return self._walk(from_seq, self.read_record, _decode_meta)

    def _walk(self, from_seq: int, buffered: Callable[[int, int], _T],
              decode: Callable[[bytes, bytes, int, str, int], _T]) -> Generator[_T, None, None]:
        """The one segment walk of :meth:`scan` and :meth:`scan_stored`: for each seq from
        ``from_seq`` to ``last_seq`` (as of the call) ``decode(head, stored, loc, where,
        seq)`` of its bytes read through a large-chunk window, or ``buffered(seq, loc)``
        for a record still in the writer's buffer."""
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
                        yield buffered(s, loc)
                        continue
                    where = f"segment {seg.name} offset {loc} seq {s}"
                    head = win.get(loc, RECORD_HEADER_SIZE)
                    slen = 0
                    if len(head) == RECORD_HEADER_SIZE:
                        slen = min(RECORD_HEADER.unpack_from(head)[6], MAX_PAYLOAD)
                    yield decode(head, win.get(loc + RECORD_HEADER_SIZE, slen), loc, where, s)
            finally:
                fs.close(fd)
            seq = end + 1

    # ----------------------------------------------------------------------- stored bytes

    def read_stored(self, seq: int, *, chunks: bool = True) -> bytes:
        """Record ``seq`` exactly as the journal stores it (header + stored payload:
        compressed, chunked or elided as it is now), every byte checked; for shipping it
        to another journal (:meth:`cdp.journal.Journal.append_stored`). Corruption if
        damaged, NotFound outside ``first_seq..last_seq``. Cost: one or two preads + CRC.

        ``chunks=False`` (replication's source, for records it only ships): the record
        CRC is checked (header, chunk and granule tables, and the whole payload of a
        record that is not chunked), the CRCs of a chunked record's chunks and granules
        are not: ``append_stored`` on the receiving side checks every byte anyway, after
        the bytes crossed the wire. That halves the cost of a 1 MiB record (its ~256
        granule CRCs were half of it). Damage there then shows on the receiving side.
        """
        seg = self._seg_for(seq)
        _ts, offs = self._load(seg)
        loc = offs[seq - seg.first_seq]
        data, where = self._raw_whole(seg, seq, loc)
        return _checked(data, seq, where, chunks)

    def read_stored_run(self, first: int, last: int, budget: int, *,
                        check: bool = True) -> list[bytes]:
        """Records ``first ..`` (at most ``last``, and only of ``first``'s segment) as
        :meth:`read_stored` with ``chunks=False`` gives each, read in one pread: at
        least one, then those that end within ``budget`` bytes of the first's start. For
        a stream far behind the head (records read back one after another). Cost: one
        pread of the run plus the record CRC of each record, against one or two preads,
        a segment look-up and the check per record one by one (~15-20 µs per 4 KiB
        record); a run of one record is :meth:`read_stored`.

        ``check=False`` (replication's source: the target's ``append_stored`` checks
        every byte of what it receives): of a run of several, only each record's magic
        and seq are checked, not its CRC; damage on this disk then shows as the target
        refusing the record."""
        seg = self._seg_for(first)
        _ts, offs = self._load(seg)
        base = seg.first_seq
        i0 = first - base
        # records whose end we know from the offsets (the next record's start), within
        # the file (not the open segment's buffer) and the budget
        hi = min(last, base + seg.count - 2) - base
        loc0 = offs[i0]
        limit = min(loc0 + max(budget, 0),
                    self._file_size if seg is self._cur else self._size(seg))
        j = i0
        while j <= hi and offs[j + 1] <= limit:
            j += 1
        if j - i0 < 2:
            return [self.read_stored(first, chunks=False)]
        fd = self._rfd(seg)
        end = offs[j]
        data = self._fs.pread(fd, end - loc0, loc0)  # NotLocal: the first is not here
        got = len(data)  # short (tiered history cached in part): the records it holds
        out = []
        for i in range(i0, j):
            a, b = offs[i] - loc0, offs[i + 1] - loc0
            if b > got:
                break
            rec = data[a:b]
            if check:
                rec = _checked(rec, base + i, f"segment {seg.name} offset {offs[i]} "
                               f"seq {base + i}", False)
            elif _MAGIC_SEQ.unpack_from(rec, 0) != (RECORD_MAGIC, base + i):
                raise Corruption(f"segment {seg.name} offset {offs[i]} seq {base + i}: "
                                 f"not the record of that seq")
            out.append(rec)
        return out or [self.read_stored(first, chunks=False)]

    def _raw_whole(self, seg: SegmentState, seq: int, loc: int) -> tuple[bytes, str]:
        """:meth:`_raw` as one ``bytes`` (header + stored payload) without joining the
        two: a record larger than the first pread is read again whole from ``loc``
        (one copy less of a large payload than ``head + stored``)."""
        if seg is self._cur and loc >= self._file_size:
            head, stored, where = self._raw(seg, seq, loc)
            return head + stored, where
        where = f"segment {seg.name} offset {loc} seq {seq}"
        if not SEGMENT_HEADER_SIZE <= loc < self._size(seg):
            raise Corruption(f"{where}: location outside the segment")
        fd = self._rfd(seg)
        data = self._fs.pread(fd, RECORD_HEADER_SIZE + 8192, loc)
        if len(data) < RECORD_HEADER_SIZE:
            return data, where
        n = RECORD_HEADER_SIZE + min(RECORD_HEADER.unpack_from(data)[6], MAX_PAYLOAD)
        if n <= len(data):
            return data[:n], where
        return self._fs.pread(fd, n, loc), where

    def scan_stored(self, from_seq: int = 1) -> Generator[bytes, None, None]:
        """:meth:`read_stored` of every record from ``from_seq`` up to ``last_seq`` as of
        the call, in seq order, reading segments in large chunks (catch-up reads the
        journal sequentially). Corruption at the first damaged record."""
        return self._walk(from_seq, lambda s, _loc: self.read_stored(s),
                          lambda head, stored, _loc, where, s: _checked(head + stored, s, where))

    def raw_bytes_between(self, a: int, b: int) -> int:
        """Written (uncompressed) bytes of records ``a+1 .. b``: whole segments from their
        counters, a partly covered segment estimated by its stored-byte offsets. Cost:
        O(log n + segments spanned)."""
        if b <= a:
            return 0
        segs = self._segs
        total = 0.0
        i = max(0, bisect.bisect_right(self._firsts, a + 1) - 1)
        while i < len(segs):
            seg = segs[i]
            i += 1
            if seg.first_seq > b:
                break
            if seg.count == 0:
                continue
            lo = max(a + 1, seg.first_seq)
            hi = min(b, seg.first_seq + seg.count - 1)
            if hi < lo:
                continue
            if lo == seg.first_seq and hi == seg.first_seq + seg.count - 1:
                total += seg.raw_bytes
                continue
            _ts, offs = self._load(seg)
            stored = seg.size - offs[0]
            if stored <= 0:
                continue
            end = offs[hi - seg.first_seq + 1] if hi - seg.first_seq + 1 < len(offs) else seg.size
            total += seg.raw_bytes * (end - offs[lo - seg.first_seq]) / stored
        return int(total)

    # ----------------------------------------------------------------------- time index

    def _load(self, seg: SegmentState) -> tuple[array[int], array[int]]:
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
        """Drop the arrays of least recently used sealed, unpinned segments while more
        than INDEX_CACHE are loaded or they hold more than INDEX_CACHE_BYTES (the one
        used last always stays). O(loaded segments)."""
        loaded = self._loaded

        def held() -> int:
            return sum(16 * len(s.offs) for s in loaded.values()
                       if s.state == SEALED and s.offs is not None)

        while len(loaded) > INDEX_CACHE or (len(loaded) > 1 and held() > INDEX_CACHE_BYTES):
            last = next(reversed(loaded))
            for k, s in loaded.items():
                if s.state == SEALED and k not in self._pins and k != last:
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

    # ----------------------------------------------------------------------- the caches
    # (what the writer and the compaction commit may change, and how)

    def _remember(self, seg: SegmentState) -> None:
        """Count ``seg`` among the segments whose arrays are in memory (an LRU); beyond
        INDEX_CACHE segments or INDEX_CACHE_BYTES the least recently used sealed,
        unpinned ones drop theirs."""
        self._loaded[seg.first_seq] = seg
        self._evict()

    def _file_replaced(self, seg: SegmentState) -> None:
        """A compaction replaced ``seg``'s file, and the caller set its new size and
        arrays: forget the chunk tables read from the old file (they name its offsets)."""
        self._layouts.clear()
        self._memo = (0, -1, b"")
        self._remember(seg)

    def _pin(self, seg: SegmentState) -> None:
        """Keep reading ``seg``'s current file, through a descriptor of its own, with its
        offsets in memory, while a compaction renames another file over it."""
        self._load(seg)
        self._pins[seg.first_seq] = self._fs.open_read(self._path(seg.name))

    def _unpin(self, first_seq: int) -> int:
        """End a pin; the pin's descriptor, for the caller to close."""
        return self._pins.pop(first_seq)

    def _pinned(self, first_seq: int) -> bool:
        return first_seq in self._pins

    def _drop_fd(self, first_seq: int) -> int | None:
        """Forget the cached read descriptor of a segment (and the granule memo, which may
        hold its bytes); it, for the caller to close."""
        self._memo = (0, -1, b"")
        return self._read_fds.pop(first_seq, None)

    def _close_reads(self) -> None:
        """Close every cached read descriptor (the journal closes)."""
        for fd in self._read_fds.values():
            self._fs.close(fd)
        self._read_fds.clear()


def _decode_meta(head: bytes, stored: bytes, loc: int, where: str, seq: int) -> Record:
    """:func:`decode_record` for :meth:`SegmentReader.scan_meta`: a WRITE/INIT record is
    checked as decode_record checks it (a chunked one as :func:`_checked` does: its
    chunks' CRCs) and returned without its payload; anything amiss goes to decode_record,
    which names the damage."""
    if len(head) < RECORD_HEADER_SIZE or head[9] not in _DATA_KINDS:
        return decode_record(head, stored, loc, where, seq)
    magic, crc, ver, kind, comp, flags, slen, rseq, ts, off, length = (
        RECORD_HEADER.unpack_from(head))
    if comp == _CHUNKED:
        _checked(head + stored, seq, where)
    elif (magic != RECORD_MAGIC or len(stored) != slen or rseq != seq
            or crc != _CRC(stored, _CRC(head[CRC_START:RECORD_HEADER_SIZE]))
            or header_problem(ver, kind, comp, slen, length) is not None):
        return decode_record(head, stored, loc, where, seq)
    return Record(RecordKind(kind), rseq, ts, off, length, flags, b"", loc, comp, slen,
                  elided=comp == _ELIDED)


#: a record header's magic and seq (offsets 0 and 16): ``read_stored_run``'s check
_MAGIC_SEQ = struct.Struct("<I12xQ")


def _checked(data: bytes, seq: int, where: str, chunks: bool = True) -> bytes:
    """``data`` if it is one intact record holding ``seq``, else Corruption (``chunks``:
    as :func:`~cdp.journal.segment.check_record`)."""
    reason, got, _ts, _raw = check_record(data, chunks)
    if reason is None and got != seq:
        reason = f"record holds seq {got}"
    if reason is not None:
        raise Corruption(f"{where}: {reason}")
    return data


_CRC = crc32c
_CHUNK_SHIFT = CHUNK_SIZE.bit_length() - 1
_GRANULE_SHIFT = GRANULE_SIZE.bit_length() - 1
_GRANULE_MASK = -GRANULE_SIZE
assert 1 << _CHUNK_SHIFT == CHUNK_SIZE and 1 << _GRANULE_SHIFT == GRANULE_SIZE
_CHUNKED = int(Compression.CHUNKED)
_ELIDED = int(Compression.ELIDED)
_DATA_KINDS = frozenset((int(RecordKind.WRITE), int(RecordKind.INIT)))
_NONE_COMP = int(Compression.NONE)


def _stored_raw(table: ChunkTable, first: int, end: int) -> bool:
    """Whether every chunk from *first* to the one holding payload byte ``end - 1`` is
    stored raw (no compression, stored length = its raw length), so those chunks lie
    contiguous in the file. O(chunks)."""
    st = table.starts
    comps = table.comps
    total = table.length
    for c in range(first, ((end - 1) >> _CHUNK_SHIFT) + 1):
        raw = total - (c << _CHUNK_SHIFT)
        if comps[c] != _NONE_COMP or st[c + 1] - st[c] != (raw if raw < CHUNK_SIZE else CHUNK_SIZE):
            return False
    return True
_LZ4_COMP = int(Compression.LZ4)
