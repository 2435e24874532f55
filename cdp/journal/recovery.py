"""Recovery on open: from the files in a journal directory to the journal's segment table.

:func:`recover` deletes unfinished ``*.tmp`` files, then:

- each sealed segment (all but the last) costs one index-header read when its sidecar
  matches the file; otherwise it is scanned and the sidecar rebuilt (derived data);
- the last segment is scanned (O(its bytes); the writer seals a segment at
  ``segment_records`` records, so at most that many) and a torn tail cut off: records that never
  became durable, counted in ``dropped_bytes``/``dropped_records``, not damage; so is
  the space the writer wrote ahead of its records (zeros, or records of the file's
  earlier life: seqs below the segment's first; never replayed). After a clean close it
  is not scanned: the close left its index (``.closed``), taken when it still matches
  the file (:func:`~cdp.journal.segment.clean_tail`); every ``.closed`` file is then
  removed, so none outlives the open that read it;
- a sealed segment whose records are followed by such space (a crash before its sealing
  sync cut it off) and then by the next segment's first seq is cut to its records;
- damage inside the durable part (a bad record between good ones, a seq gap between
  segments) is left in place and reported in :class:`RecoveryReport` ``problems``.

The caller (:meth:`cdp.journal.Journal.open`) takes over the segments and the append
handle of the last one.
"""

from __future__ import annotations

import itertools
import os
from array import array
from dataclasses import asdict, dataclass, field

from cdp.journal.format import (
    SEGMENT_COMPACTED,
    SEGMENT_HEADER_SIZE,
    index_name,
    pack_segment_header,
    parse_segment_name,
    segment_name,
)
from cdp.journal.fs import FileLayer
from cdp.journal.segment import (
    NO_TS,
    SEALED,
    Problem,
    SegmentScan,
    SegmentState,
    clean_tail,
    is_closed_file,
    read_index_header,
    scan_segment,
    write_index,
)


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
class Recovered:
    """The result of :func:`recover`: the segments oldest first (the last one is the
    open one, its ``ts``/``offs`` in memory), their first timestamps as the time index
    bisects them, and the append handle and valid size of the last one."""

    segs: list[SegmentState]
    first_ts: list[int]
    fd: int
    size: int
    report: RecoveryReport


def recover(fs: FileLayer, directory: str) -> Recovered:
    """Open (creating if needed) the journal directory and recover its segments.

    Cost: one index-header read per sealed segment (a scan where the sidecar is missing
    or stale) and a scan of the last segment (after a clean close: its ``.closed``
    sidecar and last record); a torn tail is truncated and synced.
    """
    rep = RecoveryReport()
    fs.makedirs(directory)
    names = fs.listdir(directory)
    for n in names:
        if n.endswith(".tmp"):
            fs.unlink(_path(directory, n))
    firsts = sorted(f for f in (parse_segment_name(n) for n in names) if f is not None)
    if not firsts:
        return _create_first_segment(fs, directory, 1, rep)
    segs: list[SegmentState] = []
    scans: dict[int, SegmentScan] = {}
    for f, nxt in itertools.pairwise(firsts):
        segs.append(_open_sealed(fs, directory, f, scans, rep, nxt))
    last = firsts[-1]
    scan = clean_tail(fs, directory, last) or scan_segment(fs, directory, last)
    for n in names:  # read or not, stale or not: a clean close writes a new one
        if is_closed_file(n):
            fs.unlink(_path(directory, n))
    if segs and scan.count == 0 and not scan.problems:
        prev = scans.get(segs[-1].first_seq)
        if prev is not None and prev.first_seq + prev.count != last:
            # the previous segment never became durable up to its end (no sidecar,
            # records missing), so nothing in this one did either: drop this file,
            # the short one becomes the tail
            fs.unlink(_path(directory, segment_name(last)))
            fs.fsync_dir(directory)
            rep.removed_segments.append(segment_name(last))
            rep.dropped_bytes += scan.size
            segs.pop()
            scan = prev
            last = prev.first_seq
    for s in segs:
        sc = scans.get(s.first_seq)
        if sc is not None:
            _note_scan_problems(rep, sc, tail=False)
    # the tail segment
    cur = SegmentState(last)
    fd = fs.open_write(_path(directory, cur.name))
    if scan.header_error is not None and scan.count == 0:
        fs.truncate(fd, 0)
        fs.pwrite(fd, pack_segment_header(last), 0)
        fs.fdatasync(fd)
        rep.dropped_bytes += scan.size
        rep.dropped_records += scan.torn_records
        if scan.size:
            rep.truncated_segment, rep.truncated_at = cur.name, 0
        size = SEGMENT_HEADER_SIZE
    else:
        _note_scan_problems(rep, scan, tail=True)
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
    first_ts = [s.first_ts if s.count else _prev_first_ts(i, segs) for i, s in enumerate(segs)]
    rep.last_seq = cur.first_seq + cur.count - 1
    return Recovered(segs, first_ts, fd, size, rep)


def _path(directory: str, name: str) -> str:
    return os.path.join(directory, name)


def _prev_first_ts(i: int, segs: list[SegmentState]) -> int:
    if i == len(segs) - 1:
        return NO_TS
    for s in reversed(segs[:i]):
        if s.count:
            return s.first_ts
    return 0


def _note_scan_problems(rep: RecoveryReport, scan: SegmentScan, tail: bool) -> None:
    if scan.header_error is not None:
        rep.problems.append(Problem(scan.name, 0, scan.first_seq, scan.header_error))
    rep.problems.extend(scan.problems)
    if not tail and scan.torn_at is not None:
        rep.problems.append(Problem(
            scan.name, scan.torn_at, scan.first_seq + scan.count,
            f"{scan.torn_bytes} damaged bytes at the end of a sealed segment"))


def _open_sealed(fs: FileLayer, directory: str, first: int, scans: dict[int, SegmentScan],
                 rep: RecoveryReport, next_first: int) -> SegmentState:
    seg = SegmentState(first)
    seg.state = SEALED
    size = fs.size(_path(directory, seg.name))
    hdr = read_index_header(fs, directory, first)
    if hdr is not None and hdr.data_end == size:
        seg.count, seg.size, seg.raw_bytes = hdr.count, size, hdr.raw_bytes
        seg.first_ts, seg.last_ts = hdr.first_ts, hdr.last_ts
        seg.compacted = bool(hdr.flags & SEGMENT_COMPACTED)
        return seg
    scan = scan_segment(fs, directory, first)
    if (scan.torn_at is not None and scan.slack and not scan.problems
            and scan.header_error is None and first + scan.count == next_first):
        # written-ahead space the sealing sync never cut off: every record is there
        fd = fs.open_write(_path(directory, seg.name))
        try:
            fs.truncate(fd, scan.torn_at)
            fs.fdatasync(fd)
        finally:
            fs.close(fd)
        rep.dropped_bytes += scan.torn_bytes
        size = scan.size = scan.torn_at
        scan.torn_at, scan.torn_bytes, scan.slack = None, 0, False
    scans[first] = scan
    _fill_from_scan(seg, scan)
    if scan.header_error is None and not scan.problems and scan.torn_at is None:
        try:
            write_index(fs, directory, first, scan.ts, scan.offs, size, scan.raw_bytes,
                        scan.flags)
            fs.fsync_dir(directory)
            rep.rebuilt_indexes.append(index_name(first))
        except OSError:
            pass  # derived data; rebuilt again next time
    return seg


def _fill_from_scan(seg: SegmentState, scan: SegmentScan) -> None:
    seg.count, seg.size, seg.raw_bytes = scan.count, scan.size, scan.raw_bytes
    seg.ts, seg.offs = scan.ts, scan.offs
    seg.compacted = bool(scan.flags & SEGMENT_COMPACTED)
    if scan.count:
        seg.first_ts, seg.last_ts = scan.ts[0], scan.last_ts


def _create_first_segment(fs: FileLayer, directory: str, first: int,
                          rep: RecoveryReport) -> Recovered:
    seg = SegmentState(first)
    seg.ts, seg.offs = array("q"), array("q")
    fd = fs.open_write(_path(directory, seg.name))
    fs.truncate(fd, 0)
    fs.pwrite(fd, pack_segment_header(first), 0)
    fs.fdatasync(fd)
    fs.fsync_dir(directory)
    rep.last_seq = first - 1
    return Recovered([seg], [NO_TS], fd, SEGMENT_HEADER_SIZE, rep)
