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
from dataclasses import dataclass

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
    check_segment_header,
    covered_size,
    index_name,
    pack_segment_header,
    parse_chunk_table,
    segment_name,
)
from cdp.journal.fs import FileLayer
from cdp.journal.segment import ReadWindow, encode_index

_ELIDED = int(Compression.ELIDED)
_CHUNKED = int(Compression.CHUNKED)
_FLUSH = 4 << 20
_PACE = 1 << 20  # bytes read between two checks of the rate budget

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


def _pace(done: int, rate: float, t0: float, stop: threading.Event | None) -> None:
    """Sleep until ``done`` bytes since ``t0`` fit ``rate`` bytes/s; Interrupted when
    ``stop`` is set before that."""
    if stop is not None and stop.is_set():
        raise Interrupted("compaction stopped: cdpd is stopping")
    ahead = done / rate - (time.monotonic() - t0)
    if ahead > 0:
        if stop is None:
            time.sleep(ahead)
        elif stop.wait(ahead):
            raise Interrupted("compaction stopped: cdpd is stopping")


def build_compacted(
    src: CompactSource, live: Live, *, rate: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> PreparedCompaction:
    """Write the compacted form of ``src`` under temp names (segment + sidecar), synced.

    ``rate`` limits the bytes read per second (0: unlimited) so that ingest keeps its
    disk bandwidth; a segment smaller than the pacing step is paced as a whole. Setting
    ``stop`` ends a paced wait at once with Interrupted. Safe to run in a worker thread:
    it only reads the sealed (immutable) segment through its own descriptor and writes
    new files. Raises Corruption if a record is damaged or a live chunk is already gone
    (nothing is put in place then; temp files are removed).
    """
    fs = src.fs
    name = segment_name(src.first_seq)
    path = os.path.join(src.directory, name)
    tmp_seg = path + ".compact.tmp"
    tmp_idx = os.path.join(src.directory, index_name(src.first_seq)) + ".compact.tmp"
    if src.tiered:  # a dropped segment is never rewritten: nothing saved, nothing written
        return PreparedCompaction(src.first_seq, src.size, src.size, tmp_seg, tmp_idx,
                                  array("q"), array("q"), 0, 0, 0, 0)
    for t in (tmp_seg, tmp_idx):
        try:
            fs.unlink(t)
        except FileNotFoundError:
            pass
    rfd = fs.open_read(path)
    wfd = fs.open_append(tmp_seg)
    ok = False
    try:
        win = ReadWindow(fs, rfd)
        err = check_segment_header(win.get(0, SEGMENT_HEADER_SIZE), src.first_seq)
        if err:
            raise Corruption(f"segment {name}: {err}")
        out = bytearray(pack_segment_header(src.first_seq, SEGMENT_COMPACTED))
        pos = 0  # bytes already written to the temp file
        ts_a: array[int] = array("q")
        offs_a: array[int] = array("q")
        raw_total = rec_el = ch_el = by_el = 0
        t0 = time.monotonic()
        done = paced = 0
        for i in range(src.count):
            seq = src.first_seq + i
            off = src.offs[i]
            where = f"segment {name} offset {off} seq {seq}"
            head = win.get(off, RECORD_HEADER_SIZE)
            if len(head) < RECORD_HEADER_SIZE:
                raise Corruption(f"{where}: record header truncated")
            magic, crc, ver, kind, comp, flags, slen, rseq, ts, voff, length = (
                RECORD_HEADER.unpack(head))
            if magic != RECORD_MAGIC or rseq != seq:
                raise Corruption(f"{where}: no record for seq {seq} there")
            stored = win.get(off + RECORD_HEADER_SIZE, slen)
            cov = covered_size(comp, length, slen, ver)
            if len(stored) != slen or cov > slen or crc32c(
                    memoryview(stored)[:cov], crc32c(head[CRC_START:])) != crc:
                raise Corruption(f"{where}: bad checksum")
            ts_a.append(ts)
            offs_a.append(pos + len(out))
            done += RECORD_HEADER_SIZE + slen
            if kind not in DATA_KINDS or comp == _ELIDED:
                out += head
                out += stored
                if kind in DATA_KINDS and comp != _ELIDED:
                    raw_total += length
            else:
                ranges = live.get(seq)
                if not ranges:
                    out += _stub(kind, flags, seq, ts, voff, length)
                    rec_el += 1
                    by_el += slen
                elif comp != _CHUNKED:
                    out += head
                    out += stored
                    raw_total += length
                else:
                    table = parse_chunk_table(memoryview(stored)[:cov], length, slen, ver)
                    if isinstance(table, str):
                        raise Corruption(f"{where}: {table}")
                    want = _live_chunks(ranges)
                    for c in want:
                        if c < table.count and table.comps[c] == _ELIDED:
                            raise Corruption(f"{where}: live chunk {c} was already elided")
                    drop = [c for c in range(table.count)
                            if c not in want and table.comps[c] != _ELIDED]
                    if not drop:
                        out += head
                        out += stored
                    else:
                        # tables as before (the granule table of version 3 kept),
                        # dropped chunks as elided entries with zero granule slots
                        ents = bytearray(stored[:cov])
                        gbase = CHUNK_ENTRY_SIZE * table.count
                        body = bytearray()
                        st = table.starts
                        for c in range(table.count):
                            if c in want:
                                body += stored[st[c]:st[c + 1]]
                            else:
                                CHUNK_ENTRY.pack_into(ents, c * CHUNK_ENTRY_SIZE, 0, _ELIDED, 0)
                                if ver >= 3:
                                    g = gbase + GRANULE_TABLE_SIZE * c
                                    ents[g : g + GRANULE_TABLE_SIZE] = bytes(GRANULE_TABLE_SIZE)
                        tail = RECORD_TAIL.pack(ver, kind, _CHUNKED, flags,
                                                len(ents) + len(body), seq, ts, voff, length)
                        out += RECORD_PREFIX.pack(RECORD_MAGIC, crc32c(ents, crc32c(tail)))
                        out += tail
                        out += ents
                        out += body
                        ch_el += len(drop)
                        by_el += slen - len(ents) - len(body)
                    raw_total += sum(table.raw_size(c) for c in want if c < table.count)
            if len(out) >= _FLUSH:
                if stop is not None and stop.is_set():  # also when unpaced or behind
                    raise Interrupted("compaction stopped: cdpd is stopping")
                fs.write(wfd, out)
                pos += len(out)
                out = bytearray()
                if progress is not None:
                    progress(done, src.size)
            if rate > 0 and done >= paced + _PACE:  # the budget is bytes read, dead or live
                paced = done
                _pace(done, rate, t0, stop)
        if rate > 0:
            _pace(done, rate, t0, stop)  # the last stretch (all of a small segment) too
        fs.write(wfd, out)
        pos += len(out)
        fs.fdatasync(wfd)
        new_size = pos
        ifd = fs.open_append(tmp_idx)
        try:
            fs.write(ifd, encode_index(src.first_seq, ts_a, offs_a, new_size, raw_total,
                                       SEGMENT_COMPACTED))
            fs.fdatasync(ifd)
        finally:
            fs.close(ifd)
        if progress is not None:
            progress(src.size, src.size)
        ok = True
        return PreparedCompaction(src.first_seq, src.size, new_size, tmp_seg, tmp_idx, ts_a,
                                  offs_a, raw_total, rec_el, ch_el, by_el)
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
