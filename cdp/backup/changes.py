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

Design notes
------------
A whole-history diff (``changed --from origin``) is one or a few candidate ranges holding
hundreds of thousands of extents (524k over the 2 GiB hot region of the scale bench at
10M writes). Walking them as Python objects cost ~10 s there: two resolves building an
``Extent`` per entry, a walk building a ``Piece`` per cell, then joins. So a candidate
range of at least ``_COLUMNS_FROM`` bytes is resolved in numpy columns
(``Volume.extent_columns``), compared cell by cell in columns (``mapengine.differing``),
and the pieces are classified and joined in columns (:class:`PieceColumns`); totals and
merged ranges come from the columns, and ``Piece`` objects are only built for callers
that want them. Small ranges (a diff between two nearby markers: many 4 KiB ranges) keep
the per-extent walk, whose resolves use the volume's fast paths and view cache: per
range, numpy's fixed cost (~1 µs per call, dozens of calls) would exceed the walk's.
So does a range under ``_WALK_BELOW`` (16 MiB) that holds few extents at the target
point (at most ``_WALK_EXTENTS``: one resolve tells): the range of a 1 MiB write.
Both give the same cells; the output is the same as the reference walk
(``tests/property/test_changed_columns.py`` keeps it and compares).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mapengine import Columns, differing

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


_COLUMNS_FROM = 1 << 20  # candidate ranges at least this long may be diffed in columns
#: ...unless shorter than this and the target point has at most _WALK_EXTENTS extents
#: there: a 1 MiB write's range is one or two extents, and two numpy resolves (~40 µs
#: each) cost ten times the walk (export of 100 random 1 MiB changes: 8 -> 1 ms)
_WALK_BELOW = 16 << 20
_WALK_EXTENTS = 32

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class PieceColumns:
    """Pieces as parallel int64 arrays (offset order, non-overlapping, joined as
    :func:`append_piece` joins): what :func:`diff_pieces` returns as objects."""

    start: I64
    end: I64
    kind: I64
    seq: I64
    loc: I64
    poff: I64

    @property
    def n(self) -> int:
        return int(self.start.shape[0])

    def pieces(self) -> list[Piece]:
        """The pieces as :class:`Piece` objects. O(n) objects."""
        return [
            Piece(*t)
            for t in zip(self.start.tolist(), self.end.tolist(), self.kind.tolist(),
                         self.seq.tolist(), self.loc.tolist(), self.poff.tolist(), strict=True)
        ]

    def totals(self) -> dict[str, int]:
        """:func:`totals` of the pieces, in numpy. O(n)."""
        n = self.end - self.start
        d = self.kind == DATA
        data = int(n[d].sum())
        zero = int(n[~d].sum())
        nd = int(d.sum())
        return {
            "changed_bytes": data + zero,
            "data_bytes": data,
            "zero_bytes": zero,
            "data_pieces": nd,
            "zero_pieces": self.n - nd,
        }

    def ranges(self) -> list[tuple[int, int]]:
        """:func:`merged_ranges` of the pieces, in numpy. O(n)."""
        s, e = self.start, self.end
        if not s.shape[0]:
            return []
        new = np.ones(s.shape[0], dtype=bool)
        new[1:] = s[1:] != e[:-1]
        last = np.ones(s.shape[0], dtype=bool)
        last[:-1] = new[1:]
        return list(zip(s[new].tolist(), e[last].tolist(), strict=True))

    @staticmethod
    def of_cells(parts: Iterable[Columns]) -> PieceColumns:
        """Pieces from differing cells in offset order (each with the target point's
        source): zero and hole cells become ZERO, the rest DATA; then joined as
        :func:`append_piece` would join them one by one. O(n)."""
        c = Columns.concat(list(parts))
        z = c.loc < 0
        kind = np.where(z, ZERO, DATA).astype(np.int64)
        seq = np.where(z, 0, c.seq)
        loc = np.where(z, -1, c.loc)
        poff = np.where(z, 0, c.poff)
        s, e = c.start, c.end
        n = s.shape[0]
        if n < 2:
            return PieceColumns(s, e, kind, seq, loc, poff)
        join = (
            (s[1:] == e[:-1])
            & (kind[1:] == kind[:-1])
            & (
                z[1:]
                | ((seq[1:] == seq[:-1]) & (loc[1:] == loc[:-1])
                   & (poff[1:] == poff[:-1] + (e[:-1] - s[:-1])))
            )
        )
        first = np.ones(n, dtype=bool)
        first[1:] = ~join
        last = np.ones(n, dtype=bool)
        last[:-1] = ~join
        return PieceColumns(s[first], e[last], kind[first], seq[first], loc[first], poff[first])


def diff_pieces(
    vol: Any, seq_a: int, seq_b: int, start: int = 0, end: int | None = None
) -> list[Piece]:
    """The pieces of ``[start, end)`` that differ between ``seq_a`` and ``seq_b``, in
    offset order, non-overlapping, with what they hold at ``seq_b``. Adjacent pieces of
    the same source are joined. Either order of the points works (``seq_b < seq_a``
    describes how to go back). Cost: see the module docstring."""
    return diff_columns(vol, seq_a, seq_b, start, end).pieces()


def diff_columns(
    vol: Any, seq_a: int, seq_b: int, start: int = 0, end: int | None = None
) -> PieceColumns:
    """:func:`diff_pieces` as columns, without building an object per piece. Cost: see
    the module docstring."""
    end = vol.size if end is None else end
    return PieceColumns.of_cells(diff_cells(vol, seq_a, seq_b, start, end))


def diff_cells(vol: Any, seq_a: int, seq_b: int, start: int, end: int) -> Iterator[Columns]:
    """The differing cells of ``[start, end)`` (see :func:`mapengine.differing`), in
    offset order, a few column blocks at a time, not yet joined."""
    return range_cells(vol, seq_a, seq_b, vol.changed(seq_a, seq_b, start, end))


def range_cells(vol: Any, seq_a: int, seq_b: int,
                ranges: Iterable[tuple[int, int]]) -> Iterator[Columns]:
    """:func:`diff_cells` of candidate ranges (sorted, disjoint) already known."""
    small: list[list[int]] = [[], [], [], [], []]
    for s, e in ranges:
        if e - s < _COLUMNS_FROM:
            _walk_cells(vol, seq_a, seq_b, s, e, small)
            continue
        if e - s < _WALK_BELOW and _COLUMNS_FROM:
            eb = vol.extents(s, e, seq_b)
            if len(eb) <= _WALK_EXTENTS:
                _walk_cells(vol, seq_a, seq_b, s, e, small, eb)
                continue
        if small[0]:
            yield Columns.from_lists(*small)
            small = [[], [], [], [], []]
        yield differing(vol.extent_columns(s, e, seq_a), vol.extent_columns(s, e, seq_b))
    if small[0]:
        yield Columns.from_lists(*small)


def _walk_cells(vol: Any, seq_a: int, seq_b: int, s: int, e: int, out: list[list[int]],
                eb: list[Any] | None = None) -> None:
    """:func:`mapengine.differing` of ``[s, e)`` by walking the two points' extents in
    Python (cheaper than numpy for a small range); cells appended to the five lists.
    ``eb``: the extents at ``seq_b`` when already resolved."""
    ea = vol.extents(s, e, seq_a)
    if eb is None:
        eb = vol.extents(s, e, seq_b)
    os_, oe, oq, ol, op = out
    i = j = 0
    pos = s
    while pos < e:
        x, y = ea[i], eb[j]
        stop = min(x.end, y.end, e)
        if not ((x.loc < 0 and y.loc < 0) or (
            x.seq == y.seq and x.loc == y.loc and x.poff - x.start == y.poff - y.start
        )):
            os_.append(pos)
            oe.append(stop)
            oq.append(y.seq)
            ol.append(y.loc)
            op.append(y.poff + (pos - y.start))
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
