"""Offline check of a whole journal: the code behind ``cdpctl verify`` and the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cdp.errors import NotFound
from cdp.journal.format import closed_name, index_name, parse_segment_name
from cdp.journal.fs import FileLayer, OsFileLayer
from cdp.journal.segment import (
    Problem,
    clean_tail,
    load_index_entries,
    read_index_header,
    scan_segment,
)
from cdp.journal.tiered import read_tiered


@dataclass
class VerifyReport:
    """Result of :func:`verify_journal`.

    ``ok`` is False when any record is damaged (``problems``). A torn tail in the last
    segment (cut off at the next open) and stale or missing index sidecars (derived,
    rebuilt at open) are ``notes``, not problems.
    """

    ok: bool = True
    records: int = 0
    bytes: int = 0
    segments: int = 0
    first_seq: int = 0
    last_seq: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """Plain data for ``--json``."""
        return {
            "ok": self.ok,
            "records": self.records,
            "bytes": self.bytes,
            "segments": self.segments,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "problems": [p.to_dict() for p in self.problems],
            "notes": list(self.notes),
        }


def verify_journal(directory: str | os.PathLike[str], fs: FileLayer | None = None) -> VerifyReport:
    """Check every record of the journal in ``directory`` without changing anything.

    Checks segment headers, every record's magic, structure, CRC and seq order,
    decompresses every payload, checks MARKER/REWIND/ERROR layouts, seq continuity
    between segments and that index sidecars agree with their segments.
    Cost: reads every byte of the journal once.
    """
    d = os.fspath(directory)
    fs = fs or OsFileLayer()
    rep = VerifyReport()
    try:
        names = fs.listdir(d)
    except FileNotFoundError:
        raise NotFound(f"journal directory {d} does not exist") from None
    dropped = read_tiered(fs, d) or {}
    firsts = sorted({f for f in (parse_segment_name(n) for n in names) if f is not None}
                    | set(dropped))
    rep.segments = len(firsts)
    expected: int | None = None
    if dropped:
        rep.notes.append(f"{len(dropped)} segment(s) tiered (local copy dropped, see "
                         "docs/TIER.md): checked by `cdpctl verify --tier`")
    for i, first in enumerate(firsts):
        last = i == len(firsts) - 1
        if first in dropped:  # only its sidecar is local: it keeps the seq chain
            thdr = read_index_header(fs, d, first)
            if thdr is None or thdr.data_end != dropped[first]:
                rep.problems.append(Problem(index_name(first), 0, first,
                                            "tiered segment: index sidecar missing or damaged"))
                expected = None
                continue
            if expected is not None and first != expected:
                rep.problems.append(Problem(index_name(first), 0, expected,
                                            f"seq gap: segment starts at {first}"))
            if thdr.count and not rep.first_seq:
                rep.first_seq = first
            rep.records += thdr.count
            expected = first + thdr.count
            continue
        scan = scan_segment(fs, d, first, deep=True)
        rep.bytes += scan.size
        if scan.header_error is not None:
            if last and scan.count == 0:
                rep.notes.append(f"segment {scan.name}: unfinished header "
                                 f"({scan.size} bytes, dropped at next open)")
                continue
            rep.problems.append(Problem(scan.name, 0, first, scan.header_error))
        if expected is not None and first != expected:
            rep.problems.append(Problem(scan.name, 0, expected,
                                        f"seq gap: segment starts at {first}"))
        rep.problems.extend(scan.problems)
        rep.records += scan.count - len(scan.damaged)
        if scan.torn_at is not None:
            if last:
                rep.notes.append(f"segment {scan.name}: torn tail of {scan.torn_bytes} bytes "
                                 f"at offset {scan.torn_at} (cut off at next open)")
            elif scan.slack:  # a gap to the next segment is reported by the seq check
                rep.notes.append(f"segment {scan.name}: {scan.torn_bytes} bytes written ahead "
                                 f"after its last record at offset {scan.torn_at} "
                                 "(cut off at next open)")
            else:
                rep.problems.append(Problem(
                    scan.name, scan.torn_at, first + scan.count,
                    f"{scan.torn_bytes} damaged bytes at the end of a sealed segment"))
        if scan.count:
            if not rep.first_seq:
                rep.first_seq = first
            rep.last_seq = first + scan.count - 1
        expected = first + scan.count
        if closed_name(first) in names and (not last or clean_tail(fs, d, first) is None):
            rep.notes.append(f"{closed_name(first)}: does not match its segment "
                             "(not used, removed at next open)")
        hdr = read_index_header(fs, d, first)
        if hdr is None:
            if not last:
                rep.notes.append(f"{index_name(first)}: missing or damaged (rebuilt at open)")
            continue
        got = load_index_entries(fs, d, hdr)
        if (got is None or hdr.data_end != scan.size or list(got[0]) != list(scan.ts)
                or list(got[1]) != list(scan.offs)):
            rep.notes.append(f"{index_name(first)}: disagrees with its segment (rebuilt at open)")
    rep.ok = not rep.problems
    return rep
