"""What differs between two points of a volume, and what it holds at the target point.

``Volume.changed(a, b)`` is a superset: every range some record between the points
touched. :func:`diff_pieces` refines it by resolving both points over each candidate
range and dropping the bytes whose source is the same at both points (same record and
payload offset, or zeroes/holes at both). What remains is what this module promises:

* every byte outside the pieces is identical at both points;
* every byte inside them has a different *source* at the two points — a write (or
  trim) between them reached it and was not undone. Its content usually differs; it
  can be the same when a write stored the bytes that were there already (the journal
  does not compare payloads; doing so would cost reading both versions).

Cost: the map engine's ``changed`` (follows the records between the points, not the
volume size) plus two resolves per candidate range; no payload is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

DATA = 1
ZERO = 2
KIND_NAMES = {DATA: "data", ZERO: "zero"}


@dataclass(frozen=True, slots=True)
class Piece:
    """``[start, end)`` differs; at the target point it is ``kind``: DATA (payload
    ``[poff, poff + end - start)`` of record ``seq`` at ``loc``) or ZERO."""

    start: int
    end: int
    kind: int
    seq: int = 0
    loc: int = -1
    poff: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


def _same(x: Any, y: Any) -> bool:
    if x.loc < 0 and y.loc < 0:
        return True
    return bool(x.seq == y.seq and x.loc == y.loc and x.poff - x.start == y.poff - y.start)


def diff_pieces(
    vol: Any, seq_a: int, seq_b: int, start: int = 0, end: int | None = None
) -> list[Piece]:
    """The pieces of ``[start, end)`` that differ between ``seq_a`` and ``seq_b``, in
    offset order, non-overlapping, with what they hold at ``seq_b``. Adjacent pieces of
    the same source are joined. Either order of the points works (``seq_b < seq_a``
    describes how to go back). Cost: see the module docstring."""
    end = vol.size if end is None else end
    out: list[Piece] = []
    for s, e in vol.changed(seq_a, seq_b, start, end):
        _refine(vol, seq_a, seq_b, s, e, out)
    return out


def _refine(vol: Any, seq_a: int, seq_b: int, s: int, e: int, out: list[Piece]) -> None:
    ea = vol.extents(s, e, seq_a)
    eb = vol.extents(s, e, seq_b)
    i = j = 0
    pos = s
    while pos < e:
        x, y = ea[i], eb[j]
        stop = min(x.end, y.end, e)
        if not _same(x, y):
            if y.loc < 0:
                p = Piece(pos, stop, ZERO)
            else:
                p = Piece(pos, stop, DATA, y.seq, y.loc, y.poff + (pos - y.start))
            append_piece(out, p)
        pos = stop
        if x.end <= stop:
            i += 1
        if y.end <= stop:
            j += 1


def append_piece(out: list[Piece], p: Piece) -> None:
    """Append ``p`` to ``out``, joined with the last piece when it continues it (same kind,
    adjacent, and for DATA the same record with contiguous payload). O(1)."""
    if out:
        q = out[-1]
        if q.end == p.start and q.kind == p.kind and (
            p.kind == ZERO
            or (q.seq == p.seq and q.loc == p.loc and q.poff + q.length == p.poff)
        ):
            out[-1] = Piece(q.start, p.end, q.kind, q.seq, q.loc, q.poff)
            return
    out.append(p)


def merged_ranges(pieces: Iterable[Piece]) -> list[tuple[int, int]]:
    """``(start, end)`` of the pieces with adjacent ones joined, whatever their kind."""
    out: list[tuple[int, int]] = []
    for p in pieces:
        if out and out[-1][1] == p.start:
            out[-1] = (out[-1][0], p.end)
        else:
            out.append((p.start, p.end))
    return out


def totals(pieces: Iterable[Piece]) -> dict[str, int]:
    """Counts and bytes of the pieces by kind."""
    data = zero = nd = nz = 0
    for p in pieces:
        if p.kind == DATA:
            data += p.length
            nd += 1
        else:
            zero += p.length
            nz += 1
    return {
        "changed_bytes": data + zero,
        "data_bytes": data,
        "zero_bytes": zero,
        "data_pieces": nd,
        "zero_pieces": nz,
    }


def align_ranges(
    ranges: Iterable[tuple[int, int]], grain: int, size: int
) -> Iterator[tuple[int, int]]:
    """Ranges widened to multiples of ``grain`` (clipped to ``size``), overlaps joined."""
    cur: tuple[int, int] | None = None
    for s, e in ranges:
        a = s - s % grain
        b = min(size, -(-e // grain) * grain)
        if cur is not None and a <= cur[1]:
            cur = (cur[0], max(cur[1], b))
            continue
        if cur is not None:
            yield cur
        cur = (a, b)
    if cur is not None:
        yield cur


def status_runs(
    vol: Any, seq_from: int, seq_to: int, offset: int, length: int, grain: int = 512
) -> list[tuple[int, int]]:
    """NBD block-status runs ``(length, flags)`` for ``[offset, offset + length)``: flag 1
    where the bytes changed between the points (widened to ``grain``), 0 elsewhere.
    Always at least one run for a non-empty range. Cost: as :func:`diff_pieces` over the
    range."""
    end = min(vol.size, offset + length)
    if end <= offset:
        return [(max(length, 1), 0)]
    if seq_from == seq_to:
        return [(end - offset, 0)]
    lo = offset - offset % grain
    changed = merged_ranges(diff_pieces(vol, seq_from, seq_to, lo, min(vol.size, -(-end // grain) * grain)))
    runs: list[tuple[int, int]] = []
    pos = offset
    for s, e in align_ranges(changed, grain, vol.size):
        s, e = max(s, offset), min(e, end)
        if e <= s:
            continue
        if s > pos:
            runs.append((s - pos, 0))
        runs.append((e - s, 1))
        pos = e
    if pos < end:
        runs.append((end - pos, 0))
    return runs
