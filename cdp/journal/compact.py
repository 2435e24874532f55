"""Compaction of sealed journal segments (retention reclaims dead bytes here).

A segment is rewritten as a new file with the **same first seq and every seq** it held:
live records are copied byte for byte, a data record nobody references becomes a
48-byte header with compression ELIDED and no payload, and a chunked record whose
chunks are only partly referenced keeps the referenced chunks (the others become table
entries with compression ELIDED and no bytes). Seqs, timestamps and the seq → record
lookup therefore survive, so the map engine's ``(seq, loc)`` pairs need no rewrite: the
segment header carries the SEGMENT_COMPACTED flag and readers find a record of such a
segment through its index sidecar by seq, ignoring the old ``loc``.

Crash safety: the new segment and its sidecar are written under ``*.tmp`` names and
fdatasync'd (:func:`build_compacted`, any thread); then :meth:`Journal.compact_commit`
renames the segment over the old one (atomic), fsyncs the directory, renames the sidecar
and fsyncs again. A crash before the first rename leaves the old segment (the temp files
are deleted at open); after it, the new one — a stale sidecar (its ``data_end`` no longer
matches the smaller file) is rebuilt by a scan. Either file holds every retained record.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from crc32c import crc32c

from cdp.errors import Corruption, Interrupted
from cdp.journal.format import (
    CHUNK_ENTRY,
    CHUNK_ENTRY_SIZE,
    CHUNK_SIZE,
    CRC_START,
    DATA_KINDS,
    GRANULE_TABLE_SIZE,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    RECORD_PREFIX,
    RECORD_TAIL,
    SEGMENT_COMPACTED,
    SEGMENT_HEADER_SIZE,
    Compression,
    RecordKind,
    check_segment_header,
    covered_size,
    index_name,
    pack_segment_header,
    parse_chunk_table,
    segment_name,
)
from cdp.journal.fs import Buffer, FileLayer
from cdp.journal.segment import encode_index

_ELIDED = int(Compression.ELIDED)
_CHUNKED = int(Compression.CHUNKED)

#: live payload ranges per seq: ``(poff, length)`` pairs; a data record whose seq is
#: missing is dead (its payload is elided)
Live = Mapping[int, Sequence[tuple[int, int]]]


@dataclass
class CompactSource:
    """A sealed segment as the journal sees it (snapshotted on the journal's thread)."""

    directory: str
    first_seq: int
    count: int
    size: int
    offs: array[int]
    fs: FileLayer
    #: its local copy was dropped (the S3 tier holds it): never rewritten
    tiered: bool = False
    #: the index's timestamps (when given, a dead record's header is checked against them)
    ts: array[int] = field(default_factory=lambda: array("q"))


@dataclass
class PreparedCompaction:
    """A compacted segment written and synced under temp names, not yet in place."""

    first_seq: int
    old_size: int
    new_size: int
    tmp_seg: str
    tmp_idx: str
    ts: array[int]
    offs: array[int]
    raw_bytes: int
    records_elided: int
    chunks_elided: int
    bytes_elided: int


def _stub(kind: int, flags: int, seq: int, ts: int, offset: int, length: int) -> bytes:
    tail = RECORD_TAIL.pack(2, kind, _ELIDED, flags, 0, seq, ts, offset, length)
    return RECORD_PREFIX.pack(RECORD_MAGIC, crc32c(tail)) + tail


def _live_chunks(ranges: Sequence[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for poff, n in ranges:
        if n > 0:
            out.update(range(poff // CHUNK_SIZE, (poff + n - 1) // CHUNK_SIZE + 1))
    return out


class Pacer:
    """Paces compaction: :meth:`step` sleeps until the bytes so far fit the budget.

    The budget is ``rate`` bytes/s, or what ``rate_fn()`` returns at each step (so a
    caller can change it while a segment is compacted: the retention service gives full
    speed while the volume's ingest is light); 0 means no sleep. Setting ``stop`` ends
    a wait at once with Interrupted. One pacer may span several segments."""

    def __init__(self, rate: float = 0.0, rate_fn: Callable[[], float] | None = None,
                 stop: threading.Event | None = None) -> None:
        self.rate = rate
        self.rate_fn = rate_fn
        self.stop = stop
        self._next = time.monotonic()

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Interrupted("compaction stopped: cdpd is stopping")

    def step(self, nbytes: int) -> None:
        """Account ``nbytes`` of segment passed over; sleep while ahead of the budget."""
        self.check()
        rate = self.rate_fn() if self.rate_fn is not None else self.rate
        now = time.monotonic()
        if rate <= 0:
            self._next = now
            return
        self._next = max(self._next, now) + nbytes / rate
        ahead = self._next - now
        if ahead > 0:
            if self.stop is None:
                time.sleep(ahead)
            elif self.stop.wait(ahead):
                raise Interrupted("compaction stopped: cdpd is stopping")


#: a record header as numpy reads it (RECORD_HEADER, little endian)
_HDR = np.dtype({
    "names": ["magic", "crc", "ver", "kind", "comp", "flags", "slen", "seq", "ts", "voff",
              "length"],
    "formats": ["<u4", "<u4", "u1", "u1", "u1", "u1", "<u4", "<u8", "<u8", "<u8", "<u8"],
    "offsets": [0, 4, 8, 9, 10, 11, 12, 16, 24, 32, 40],
    "itemsize": RECORD_HEADER_SIZE,
})
_WRITE, _INIT = int(RecordKind.WRITE), int(RecordKind.INIT)
_SLICE = 4 << 20  # segment bytes handled per step (a bounded stretch of Python)
_SMALL = 512  # a record nobody references is read whole when at most this big
_GAP = 1 << 20  # holes up to this size between needed bytes are read through


_TAIL = RECORD_HEADER_SIZE - CRC_START
_tail_table: tuple[np.ndarray, int] | None = None


def tail_crcs(tails: np.ndarray) -> np.ndarray:
    """CRC32C of each row of ``tails`` (k x 40 bytes: record headers after the CRC), as
    ``crc32c(row)`` gives it, without a Python call per row. CRC is affine over GF(2):
    for a fixed length, crc(m) = crc(zeros) XOR the XOR over positions i of
    T[i][m[i]], T[i][b] = crc(b at i, zeros elsewhere) XOR crc(zeros). The table (40 x
    256) is built once (10,240 calls, a few ms). Cost: 40 table lookups per row, done
    a column at a time (~0.1 µs a row)."""
    global _tail_table
    if _tail_table is None:
        zero = crc32c(bytes(_TAIL))
        t = np.empty((_TAIL, 256), np.uint32)
        buf = bytearray(_TAIL)
        for i in range(_TAIL):
            for b in range(256):
                buf[i] = b
                t[i, b] = crc32c(buf) ^ zero
            buf[i] = 0
        _tail_table = (t, zero)
    t, zero = _tail_table
    cols = tails.T
    out = np.full(len(tails), zero, np.uint32)
    for i in range(_TAIL):  # one gather of k table entries per byte position
        out ^= t[i][cols[i]]
    return out


class _Compactor:
    """The fast path of :func:`build_compacted` (one segment, any thread)."""

    def __init__(self, src: CompactSource, live: Live, rfd: int, name: str) -> None:
        self.src, self.live, self.fs, self.rfd, self.name = src, live, src.fs, rfd, name
        n = src.count
        self.offs = np.frombuffer(memoryview(src.offs), np.int64)[:n].copy() if n else (
            np.empty(0, np.int64))
        ends = np.empty(n, np.int64)
        ends[:-1] = self.offs[1:]
        if n:
            ends[-1] = src.size
        self.rsz = ends - self.offs
        self.seqs = src.first_seq + np.arange(n, dtype=np.int64)
        keys = np.fromiter(live.keys(), np.int64, len(live)) if len(live) else (
            np.empty(0, np.int64))
        self.is_live = np.isin(self.seqs, keys)
        self.ts_idx = (np.frombuffer(memoryview(src.ts), np.int64)[:n]
                       if len(src.ts) == n else None)
        full = self.is_live | (self.rsz <= _SMALL)
        self.full = full
        self.need_end = self.offs + np.where(full, self.rsz, RECORD_HEADER_SIZE)
        self.ts_a: array[int] = array("q")
        self.offs_a: array[int] = array("q")
        self.raw = self.rec_el = self.ch_el = self.by_el = 0
        self.buf = bytearray()

    def where(self, i: int) -> str:
        seq = self.src.first_seq + i
        return f"segment {self.name} offset {int(self.offs[i])} seq {seq}"

    def check_index(self) -> None:
        if len(self.offs) and (self.offs[0] != SEGMENT_HEADER_SIZE or
                               bool((self.rsz < RECORD_HEADER_SIZE).any())):
            i = 0 if self.offs[0] != SEGMENT_HEADER_SIZE else int(
                np.argmax(self.rsz < RECORD_HEADER_SIZE))
            raise Corruption(f"{self.where(i)}: the index's offsets do not fit the segment")

    def slices(self) -> list[tuple[int, int]]:
        """Record index ranges of about ``_SLICE`` segment bytes each (a record larger
        than that is a slice of its own)."""
        n = len(self.offs)
        if not n:
            return []
        cuts = np.searchsorted(self.offs, np.arange(int(self.offs[0]), self.src.size, _SLICE))
        cuts = np.unique(np.append(cuts, n))
        cuts = cuts[cuts > 0]
        out, a = [], 0
        for b in cuts.tolist():
            out.append((a, b))
            a = b
        return out

    def run(self, i0: int, i1: int, pos: int) -> tuple[list[Buffer], int]:
        """Records ``i0 .. i1-1``: (pieces of the new file in order, bytes in them).
        Reads only the bytes it needs (live and small records whole, the header of a
        big record nobody references) with one pread per stretch of them."""
        fs, rfd = self.fs, self.rfd
        o = self.offs[i0:i1]
        ne = self.need_end[i0:i1]
        rsz = self.rsz[i0:i1]
        base = int(o[0])
        end = int(o[-1] + rsz[-1])  # where the next step reads on: read up to it when
        span = (end if end - int(ne[-1]) <= _GAP else int(ne[-1])) - base  # close (the
        # kernel's readahead keeps up only with reads that follow each other)
        if not span <= len(self.buf) <= 4 * _SLICE:  # one read buffer, reused (its
            # pieces are written before the next step); not kept at a huge record's size
            self.buf = bytearray(max(span, _SLICE + (1 << 20)))
        buf = self.buf
        mv = memoryview(buf)[:span]
        brk = (np.flatnonzero(o[1:] - ne[:-1] > _GAP) + 1).tolist()
        for a, b in zip([0, *brk], [*brk, len(o)], strict=True):
            lo, hi = int(o[a]) - base, (int(ne[b - 1]) - base if b < len(o) else span)
            if fs.pread_into(rfd, mv[lo:hi], base + lo) < hi - lo:
                raise Corruption(f"{self.where(i0 + a)}: segment ends inside its records")
        rel = o - base
        # each record's header: a row of a sliding 48-byte window over the read (one
        # contiguous copy per record, no index array per byte)
        win = np.lib.stride_tricks.sliding_window_view(np.frombuffer(buf, np.uint8, span),
                                                       RECORD_HEADER_SIZE)
        h = win[rel].view(_HDR).reshape(-1)
        sq = self.seqs[i0:i1]
        bad = (h["magic"] != RECORD_MAGIC) | (h["seq"] != sq.astype(np.uint64))
        if bad.any():
            k = int(np.argmax(bad))
            raise Corruption(f"{self.where(i0 + k)}: no record for seq {int(sq[k])} there")
        bad = h["slen"].astype(np.int64) + RECORD_HEADER_SIZE != rsz
        if bad.any():
            k = int(np.argmax(bad))
            raise Corruption(f"{self.where(i0 + k)}: record length does not match the "
                             "segment's index")
        kind, comp = h["kind"], h["comp"]
        data = (kind == _WRITE) | (kind == _INIT)
        elided = comp == _ELIDED
        lv = self.is_live[i0:i1]
        full = self.full[i0:i1]
        stub = data & ~elided & ~lv
        slow = (lv & data & (comp == _CHUNKED)) | (~full & ~stub)
        copy = ~stub & ~slow
        # a dead record's payload is not read: its header is checked (above: magic, seq,
        # length against the index; here: version, compression, timestamp)
        bad = stub & ((h["ver"] < 1) | (h["ver"] > 3) | (comp > _CHUNKED))
        if self.ts_idx is not None:
            bad |= stub & (h["ts"] != self.ts_idx[i0:i1].astype(np.uint64))
        if bad.any():
            k = int(np.argmax(bad))
            raise Corruption(f"{self.where(i0 + k)}: damaged header (not referenced)")
        # every copied record is checked: one CRC over its bytes in memory
        ci = np.flatnonzero(copy)
        if len(ci):
            lo_l = (rel[ci] + CRC_START).tolist()
            hi_l = (rel[ci] + rsz[ci]).tolist()
            for a, b, c, k in zip(lo_l, hi_l, h["crc"][ci].tolist(), ci.tolist(), strict=True):
                if crc32c(mv[a:b]) != c:
                    raise Corruption(f"{self.where(i0 + k)}: bad checksum")
            cd = copy & data & ~elided
            self.raw += int(h["length"][cd].sum())
        si = np.flatnonzero(stub)
        smv = memoryview(b"")
        if len(si):
            st = np.zeros(len(si), _HDR)
            st["magic"] = RECORD_MAGIC
            st["ver"] = 2
            st["comp"] = _ELIDED
            for f in ("kind", "flags", "seq", "ts", "voff", "length"):
                st[f] = h[f][si]
            st["crc"] = tail_crcs(st.view(np.uint8).reshape(-1, RECORD_HEADER_SIZE)[:, CRC_START:])
            smv = memoryview(st.tobytes())
            self.rec_el += len(si)
            self.by_el += int(h["slen"][si].astype(np.int64).sum())
        nsz = np.where(stub, RECORD_HEADER_SIZE, rsz)
        slow_out: dict[int, bytes] = {}
        for k in np.flatnonzero(slow).tolist():
            i = i0 + k
            if full[k]:
                rec: Buffer = mv[int(rel[k]) : int(rel[k] + rsz[k])]
            else:
                rec = fs.pread(rfd, int(rsz[k]), int(o[k]))
                if len(rec) < int(rsz[k]):
                    raise Corruption(f"{self.where(i)}: segment ends inside its records")
            slow_out[k] = self._one(i, rec)
            nsz[k] = len(slow_out[k])
        self.ts_a.frombytes(h["ts"].astype(np.int64).tobytes())
        self.offs_a.frombytes((pos + np.cumsum(nsz) - nsz).astype(np.int64).tobytes())
        cls = np.where(stub, 1, np.where(slow, 2, 0))
        b_ = (np.flatnonzero(cls[1:] != cls[:-1]) + 1).tolist()
        pieces: list[Buffer] = []
        rel_l = rel.tolist()
        sbefore = (np.cumsum(stub) - stub).tolist()  # stubs before each record
        for a, e in zip([0, *b_], [*b_, len(o)], strict=True):
            c = int(cls[a])
            if c == 0:  # a run of records copied as they are: one slice of the read
                pieces.append(mv[rel_l[a] : rel_l[e - 1] + int(rsz[e - 1])])
            elif c == 1:  # a run of stubs
                p = sbefore[a] * RECORD_HEADER_SIZE
                pieces.append(smv[p : p + (e - a) * RECORD_HEADER_SIZE])
            else:
                pieces.extend(slow_out[k] for k in range(a, e))
        return pieces, int(nsz.sum())

    def _one(self, i: int, rec: Buffer) -> bytes:
        """One record the fast path does not handle (a referenced chunked record, or a
        big record nobody references that is not a data record), checked as before."""
        seq = self.src.first_seq + i
        where = self.where(i)
        mv = memoryview(rec)
        head = bytes(mv[:RECORD_HEADER_SIZE])
        _m, crc, ver, kind, comp, flags, slen, _s, ts, voff, length = RECORD_HEADER.unpack(head)
        stored = mv[RECORD_HEADER_SIZE:]
        cov = covered_size(comp, length, slen, ver)
        if len(stored) != slen or cov > slen or crc32c(
                stored[:cov], crc32c(head[CRC_START:])) != crc:
            raise Corruption(f"{where}: bad checksum")
        ranges = self.live.get(seq)
        if kind not in DATA_KINDS or comp == _ELIDED:
            return bytes(mv)
        if not ranges:  # (not reached: dead data records are stubbed by the fast path)
            self.rec_el += 1
            self.by_el += slen
            return _stub(kind, flags, seq, ts, voff, length)
        if comp != _CHUNKED:
            self.raw += length
            return bytes(mv)
        table = parse_chunk_table(stored[:cov], length, slen, ver)
        if isinstance(table, str):
            raise Corruption(f"{where}: {table}")
        want = _live_chunks(ranges)
        for c in want:
            if c < table.count and table.comps[c] == _ELIDED:
                raise Corruption(f"{where}: live chunk {c} was already elided")
        drop = [c for c in range(table.count) if c not in want and table.comps[c] != _ELIDED]
        self.raw += sum(table.raw_size(c) for c in want if c < table.count)
        if not drop:
            return bytes(mv)
        # tables as before (the granule table of version 3 kept), dropped chunks as
        # elided entries with zero granule slots
        ents = bytearray(stored[:cov])
        gbase = CHUNK_ENTRY_SIZE * table.count
        body = bytearray()
        st = table.starts
        for c in range(table.count):
            if c in want:
                body += stored[st[c] : st[c + 1]]
            else:
                CHUNK_ENTRY.pack_into(ents, c * CHUNK_ENTRY_SIZE, 0, _ELIDED, 0)
                if ver >= 3:
                    g = gbase + GRANULE_TABLE_SIZE * c
                    ents[g : g + GRANULE_TABLE_SIZE] = bytes(GRANULE_TABLE_SIZE)
        tail = RECORD_TAIL.pack(ver, kind, _CHUNKED, flags, len(ents) + len(body), seq, ts,
                                voff, length)
        self.ch_el += len(drop)
        self.by_el += slen - len(ents) - len(body)
        return b"".join((RECORD_PREFIX.pack(RECORD_MAGIC, crc32c(ents, crc32c(tail))), tail,
                         ents, body))


def build_compacted(
    src: CompactSource, live: Live, *, rate: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None, pacer: Pacer | None = None,
) -> PreparedCompaction:
    """Write the compacted form of ``src`` under temp names (segment + sidecar), synced.

    ``rate`` limits the segment bytes passed over per second (0: unlimited; read or
    skipped, dead or live) so that ingest keeps its disk bandwidth; ``pacer`` (which
    then replaces ``rate`` and ``stop``) can change the budget as it goes. Pacing is
    per step of about 4 MiB, so a small segment is paced as a whole. Setting ``stop``
    ends a paced wait at once with Interrupted. Safe to run in a worker thread: it
    only reads the sealed (immutable) segment through its own descriptor and writes
    new files, 4 MiB of segment per step (one pread, one writev; numpy and a CRC
    call per copied record in between, so the GIL is released at least that often).

    What is read and checked: every record copied (referenced data, every non-data
    record, stubs already elided) is read whole and its record CRC checked (a chunked
    record's header and tables, as readers do); a data record nobody references is not
    read past its 48-byte header, which is checked against the index (magic, seq,
    length, timestamp) and turned into a stub. Raises Corruption if a record is damaged
    or a live chunk is already gone (nothing is put in place then; temp files are
    removed). Cost: one sequential pread per 4 MiB step (holes of up to 1 MiB are read
    through: a separate read costs a cold disk more than the bytes), one 48-byte pread
    per dead record larger than that.
    """
    fs = src.fs
    name = segment_name(src.first_seq)
    path = os.path.join(src.directory, name)
    tmp_seg = path + ".compact.tmp"
    tmp_idx = os.path.join(src.directory, index_name(src.first_seq)) + ".compact.tmp"
    if src.tiered:  # a dropped segment is never rewritten: nothing saved, nothing written
        return PreparedCompaction(src.first_seq, src.size, src.size, tmp_seg, tmp_idx,
                                  array("q"), array("q"), 0, 0, 0, 0)
    pace = pacer if pacer is not None else Pacer(rate, stop=stop)
    for t in (tmp_seg, tmp_idx):
        try:
            fs.unlink(t)
        except FileNotFoundError:
            pass
    rfd = fs.open_read(path)
    wfd = fs.open_append(tmp_seg)
    ok = False
    try:
        err = check_segment_header(fs.pread(rfd, SEGMENT_HEADER_SIZE, 0), src.first_seq)
        if err:
            raise Corruption(f"segment {name}: {err}")
        job = _Compactor(src, live, rfd, name)
        job.check_index()
        head = pack_segment_header(src.first_seq, SEGMENT_COMPACTED)
        fs.write(wfd, head)
        pos = len(head)  # bytes written to the temp file
        for i0, i1 in job.slices():
            pieces, n = job.run(i0, i1, pos)
            pace.check()  # also when unpaced or behind
            fs.writev(wfd, pieces)  # (the read buffer is reused by the next step)
            pos += n
            if progress is not None:
                progress(int(job.offs[i1 - 1] + job.rsz[i1 - 1]), src.size)
            end = src.size if i1 == len(job.offs) else int(job.offs[i1])
            pace.step(end - (int(job.offs[i0]) if i0 else 0))
        if not src.count:
            pace.step(src.size)
        fs.fdatasync(wfd)
        new_size = pos
        ifd = fs.open_append(tmp_idx)
        try:
            fs.write(ifd, encode_index(src.first_seq, job.ts_a, job.offs_a, new_size, job.raw,
                                       SEGMENT_COMPACTED))
            fs.fdatasync(ifd)
        finally:
            fs.close(ifd)
        if progress is not None:
            progress(src.size, src.size)
        ok = True
        return PreparedCompaction(src.first_seq, src.size, new_size, tmp_seg, tmp_idx,
                                  job.ts_a, job.offs_a, job.raw, job.rec_el, job.ch_el,
                                  job.by_el)
    finally:
        fs.close(rfd)
        fs.close(wfd)
        if not ok:
            for t in (tmp_seg, tmp_idx):
                try:
                    fs.unlink(t)
                except OSError:
                    pass


def discard(fs: FileLayer, prep: PreparedCompaction) -> None:
    """Remove the temp files of a compaction that will not be committed."""
    for t in (prep.tmp_seg, prep.tmp_idx):
        try:
            fs.unlink(t)
        except OSError:
            pass
