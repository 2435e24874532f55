"""Delta maps as numpy column arrays, and the vectorised algorithms on them.

An *entry* is ``[start, end) -> (seq, loc, poff)``: volume bytes ``[start, end)`` are the
payload bytes ``[poff, poff + end - start)`` of record ``seq`` stored at journal location
``loc`` (opaque here). Zero extents use ``loc == ZERO_LOC``; holes (never written) come
out of resolution as ``seq == 0, loc == HOLE_LOC``.

Two shapes of map exist:

* **overlapping** (an L0 map): every write of a window, sorted by ``(start, seq)``;
  entries may overlap, the newest ``seq`` wins per byte.
* **flat** (merged, full and head maps): sorted by ``start``, non-overlapping, adjacent
  entries of the same source coalesced.

Design notes
------------
"Newest wins" over many overlapping entries is computed without a Python loop per
entry: all entry boundaries cut the address space into elementary intervals; each entry
covers a contiguous run of them, and the winner of every elementary interval is the
maximum *rank* (position in seq order) over the entries that cover it. That is a
"range-chmax, point query" problem solved offline with a reversed sparse table: an entry
covering ``L`` intervals is written into the two power-of-two blocks of size
``2**floor(log2 L)`` that cover it, then the table is pushed down one level at a time.
Cost: ``O(m log m)`` numpy work for ``m`` elementary intervals. Merging ``k`` flat maps
(already newest-wins inside) is simpler: each layer answers "which of my entries covers
this interval" with one ``searchsorted``, newest layer first.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "HOLE_LOC",
    "ZERO_LOC",
    "Columns",
    "DeltaMap",
    "Extent",
    "MergeResult",
    "build_l0",
    "coalesce",
    "flatten",
    "merge",
    "overlay",
]

ZERO_LOC = -1  #: loc of a zero extent (trim / write-zeroes). Never changes.
HOLE_LOC = -2  #: loc of a hole (never written; seq 0). Never changes.

I64 = npt.NDArray[np.int64]
K = TypeVar("K", bound=Hashable)


class Extent(NamedTuple):
    """``[start, end)`` of volume bytes are payload ``[poff, poff+end-start)`` of ``seq``."""

    start: int
    end: int
    seq: int
    loc: int
    poff: int


class Columns(NamedTuple):
    """Five parallel int64 arrays: one entry per index."""

    start: I64
    end: I64
    seq: I64
    loc: I64
    poff: I64

    @property
    def n(self) -> int:
        """Number of entries."""
        return int(self.start.shape[0])

    def take(self, idx: npt.NDArray[np.int64] | npt.NDArray[np.bool_] | slice) -> Columns:
        """The entries at ``idx`` (fancy index, mask or slice)."""
        return Columns(self.start[idx], self.end[idx], self.seq[idx], self.loc[idx], self.poff[idx])

    def extents(self) -> list[Extent]:
        """The entries as a list of :class:`Extent`. Runtime complexity: O(n)."""
        return [
            Extent(*t)
            for t in zip(
                self.start.tolist(),
                self.end.tolist(),
                self.seq.tolist(),
                self.loc.tolist(),
                self.poff.tolist(),
                strict=True,
            )
        ]

    @property
    def nbytes(self) -> int:
        """Memory held by the five arrays."""
        return int(sum(a.nbytes for a in self))

    @staticmethod
    def empty() -> Columns:
        z = np.zeros(0, np.int64)
        return Columns(z, z, z, z, z)

    @staticmethod
    def concat(parts: Sequence[Columns]) -> Columns:
        """Concatenate columns (no sorting)."""
        parts = [p for p in parts if p.n]
        if not parts:
            return Columns.empty()
        if len(parts) == 1:
            return parts[0]
        return Columns(*(np.concatenate([p[i] for p in parts]) for i in range(5)))

    @staticmethod
    def from_lists(
        start: Sequence[int],
        end: Sequence[int],
        seq: Sequence[int],
        loc: Sequence[int],
        poff: Sequence[int],
    ) -> Columns:
        return Columns(
            np.asarray(start, np.int64).reshape(-1),
            np.asarray(end, np.int64).reshape(-1),
            np.asarray(seq, np.int64).reshape(-1),
            np.asarray(loc, np.int64).reshape(-1),
            np.asarray(poff, np.int64).reshape(-1),
        )


def _i64(a: npt.ArrayLike) -> I64:
    return np.asarray(a, dtype=np.int64)


def sorted_unique(a: I64) -> I64:
    """The distinct values of ``a``, sorted; ``a`` is sorted in place (pass a temporary).

    Not ``np.unique``: since numpy 2.3 it hashes integers, and volume offsets (multiples
    of 4 KiB) make it 10-100x slower than this sort. Runtime complexity: O(n log n).
    """
    a.sort()
    if a.shape[0] < 2:
        return a
    keep = np.empty(a.shape[0], dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def shifted(poff: I64, start: I64, new_start: I64) -> I64:
    """Payload offsets after cutting entries to begin at ``new_start``."""
    return (poff + (new_start - start)).astype(np.int64, copy=False)


def coalesce(c: Columns, *, holes_join: bool = False) -> Columns:
    """Join neighbours that are contiguous pieces of the same source.

    Input must be sorted by ``start`` and non-overlapping. Two neighbours join when the
    first ends where the second starts, ``seq`` and ``loc`` agree and the payload offset
    continues (``poff2 == poff1 + len1``). With ``holes_join``, holes (``loc ==
    HOLE_LOC``) join whatever their ``poff``: resolves use it, since a hole has no
    payload; merges keep the default, because it decides the bytes a merge writes.

    Runtime complexity: O(n).
    """
    n = c.n
    if n < 2:
        return c
    s, e, q, lc, p = c
    cont = p[1:] == p[:-1] + (e[:-1] - s[:-1])
    if holes_join:
        cont |= lc[1:] == HOLE_LOC
    join = (s[1:] == e[:-1]) & (q[1:] == q[:-1]) & (lc[1:] == lc[:-1]) & cont
    if not join.any():
        return c
    first = np.ones(n, dtype=bool)
    first[1:] = ~join
    last = np.ones(n, dtype=bool)
    last[:-1] = ~join
    return Columns(s[first], e[last], q[first], lc[first], p[first])


def _range_max(m: int, lo: I64, hi: I64, rank: I64) -> I64:
    """For each of ``m`` cells the maximum ``rank`` over the ranges ``[lo, hi)`` covering it.

    -1 where no range covers. Reversed sparse table; ranges must be non-empty.
    """
    length = hi - lo
    lev = (np.frexp(length.astype(np.float64))[1] - 1).astype(np.int64)  # floor(log2)
    top = int(np.max(lev))
    cur: I64 | None = None
    for k in range(top, -1, -1):
        size = 1 << k
        nxt = np.full(m, -1, np.int64)
        if cur is not None:
            valid = m - 2 * size + 1
            if valid > 0:
                np.maximum(nxt[:valid], cur[:valid], out=nxt[:valid])
                np.maximum(nxt[size : size + valid], cur[:valid], out=nxt[size : size + valid])
        sel = lev == k
        if sel.any():
            r = rank[sel]
            np.maximum.at(nxt, lo[sel], r)
            np.maximum.at(nxt, hi[sel] - size, r)
        cur = nxt
    assert cur is not None
    return cur


def _dropped_of(c: Columns, ke: I64, ks: I64, kend: I64) -> Columns:
    """Pieces of entries ``c`` not covered by their kept pieces ``(ke, ks, kend)``.

    ``ke`` is the entry index of each kept piece; pieces of one entry are disjoint and
    inside the entry. Zero extents are not reported (they hold no journal bytes).
    """
    n = c.n
    order = np.lexsort((ks, ke))
    ke, ks, kend = ke[order], ks[order], kend[order]
    gaps_e: list[I64] = []
    gaps_s: list[I64] = []
    gaps_t: list[I64] = []
    if ke.shape[0]:
        first = np.ones(ke.shape[0], dtype=bool)
        first[1:] = ke[1:] != ke[:-1]
        prev_end = np.empty_like(ks)
        prev_end[0] = 0
        prev_end[1:] = kend[:-1]
        prev = np.where(first, c.start[ke], prev_end)
        g = prev < ks
        gaps_e.append(ke[g])
        gaps_s.append(prev[g])
        gaps_t.append(ks[g])
        lastm = np.ones(ke.shape[0], dtype=bool)
        lastm[:-1] = ke[:-1] != ke[1:]
        tail = c.start.copy()
        tail[ke[lastm]] = kend[lastm]
    else:
        tail = c.start.copy()
    g = tail < c.end
    idx = np.arange(n, dtype=np.int64)
    gaps_e.append(idx[g])
    gaps_s.append(tail[g])
    gaps_t.append(c.end[g])
    e = np.concatenate(gaps_e)
    s = np.concatenate(gaps_s)
    t = np.concatenate(gaps_t)
    keep = c.loc[e] != ZERO_LOC
    e, s, t = e[keep], s[keep], t[keep]
    return Columns(s, t, c.seq[e], c.loc[e], shifted(c.poff[e], c.start[e], s))


def flatten(c: Columns, want_dropped: bool = True) -> tuple[Columns, Columns]:
    """Newest-wins flattening of possibly overlapping entries.

    Returns ``(flat, dropped)``: ``flat`` is sorted, non-overlapping and coalesced;
    ``dropped`` lists the overwritten pieces (zero extents excluded). Two entries with
    the same ``seq`` must not overlap (they are pieces of one record).

    Runtime complexity: O(n log n) numpy work, no Python loop per entry.
    """
    keep = c.end > c.start
    if not keep.all():
        c = c.take(keep)
    n = c.n
    if n == 0:
        return Columns.empty(), Columns.empty()
    if n == 1:
        return c, Columns.empty()
    pts = sorted_unique(np.concatenate([c.start, c.end]))
    m = int(pts.shape[0]) - 1
    lo = np.searchsorted(pts, c.start).astype(np.int64)
    hi = np.searchsorted(pts, c.end).astype(np.int64)
    order = np.argsort(c.seq, kind="stable").astype(np.int64)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    win = _range_max(m, lo, hi, rank)
    ivs = np.flatnonzero(win >= 0)
    e = order[win[ivs]]
    ps = pts[ivs]
    pe = pts[ivs + 1]
    pieces = Columns(ps, pe, c.seq[e], c.loc[e], shifted(c.poff[e], c.start[e], ps))
    flat = coalesce(pieces)
    if not want_dropped:
        return flat, Columns.empty()
    return flat, _dropped_of(c, e, ps, pe)


def overlay(layers: Sequence[Columns], want_dropped: bool = True) -> tuple[Columns, Columns]:
    """Overlay flat maps, ``layers[0]`` newest: the first layer covering a byte wins.

    Returns ``(flat, dropped)`` like :func:`flatten`.

    Runtime complexity: O(k · m log m) for k layers and m boundaries.
    """
    layers = [x for x in layers if x.n]
    if not layers:
        return Columns.empty(), Columns.empty()
    if len(layers) == 1:
        return layers[0], Columns.empty()
    allc = Columns.concat(layers)
    pts = sorted_unique(np.concatenate([allc.start, allc.end]))
    cut = pts[:-1]
    m = int(cut.shape[0])
    gidx = np.full(m, -1, np.int64)
    drops: list[Columns] = []
    off = 0
    for lay in layers:
        i = np.searchsorted(lay.start, cut, side="right").astype(np.int64) - 1
        ic = np.maximum(i, 0)
        cov = (i >= 0) & (lay.end[ic] > cut)
        free = gidx < 0
        take = cov & free
        gidx[take] = i[take] + off
        if want_dropped:
            d = cov & ~free
            if d.any():
                di = i[d]
                ds = cut[d]
                de = pts[1:][d]
                pc = Columns(
                    ds, de, lay.seq[di], lay.loc[di], shifted(lay.poff[di], lay.start[di], ds)
                )
                pc = pc.take(pc.loc != ZERO_LOC)
                drops.append(coalesce(pc))
        off += lay.n
    ivs = np.flatnonzero(gidx >= 0)
    g = gidx[ivs]
    ps = pts[ivs]
    pe = pts[ivs + 1]
    flat = coalesce(
        Columns(ps, pe, allc.seq[g], allc.loc[g], shifted(allc.poff[g], allc.start[g], ps))
    )
    return flat, Columns.concat(drops)


@dataclass(frozen=True, eq=False)
class DeltaMap:
    """An immutable delta map of the seq window ``(lo, hi]``.

    ``flat`` maps are sorted and non-overlapping; overlapping (L0) maps are sorted by
    ``(start, seq)`` and keep every write of the window.
    """

    lo: int
    hi: int
    cols: Columns
    flat: bool

    def __post_init__(self) -> None:
        if self.flat:
            ce = self.cols.end
        else:
            ce = np.maximum.accumulate(self.cols.end) if self.cols.n else self.cols.end
        object.__setattr__(self, "_cummax_end", ce)

    def __len__(self) -> int:
        return self.cols.n

    @property
    def nbytes(self) -> int:
        return self.cols.nbytes

    def query(self, start: int, end: int) -> Columns:
        """Entries intersecting ``[start, end)`` (not clipped).

        Runtime complexity: O(log n + k) for k entries returned (plus, for an
        overlapping map, those entries that start before ``start`` and end inside
        the reach of the longest entry).
        """
        ce: I64 = self._cummax_end  # type: ignore[attr-defined]
        i0 = int(ce.searchsorted(start, "right"))
        i1 = int(self.cols.start.searchsorted(end, "left"))
        if i1 <= i0:
            return Columns.empty()
        out = self.cols.take(slice(i0, i1))
        if not self.flat:
            out = out.take(out.end > start)
        return out

    def check(self) -> list[str]:
        """Broken invariants of this map as readable strings (empty: all hold): int64
        columns of one length, ``lo <= hi``, every entry non-empty with its seq in
        ``(lo, hi]``, a journal or zero loc and ``poff >= 0``, sorted by start, and no
        overlap in a flat map. Runtime complexity: O(n)."""
        c = self.cols
        if not all(a.dtype == np.int64 for a in c):
            return ["columns are not int64"]
        if not all(a.shape == c.start.shape for a in c):
            return ["columns differ in length"]
        out: list[str] = []
        if self.lo > self.hi:
            out.append(f"window ({self.lo}, {self.hi}] is reversed")
        if c.n:
            if not (c.end > c.start).all():
                out.append("an entry is empty or reversed")
            if not ((c.seq > self.lo).all() and (c.seq <= self.hi).all()):
                out.append(f"seqs {int(np.min(c.seq))}..{int(np.max(c.seq))} outside the "
                           f"window ({self.lo}, {self.hi}]")
            if not (c.start[1:] >= c.start[:-1]).all():
                out.append("entries not sorted by start")
            if self.flat and not (c.start[1:] >= c.end[:-1]).all():
                out.append("flat map overlaps")
            if not ((c.loc >= 0) | (c.loc == ZERO_LOC)).all():
                out.append("a loc is neither a journal location nor ZERO_LOC")
            if not (c.poff >= 0).all():
                out.append("a payload offset is negative")
        return out

    def _check(self) -> None:
        """Assert :meth:`check` finds nothing."""
        problems = self.check()
        assert problems == [], problems


def build_l0(lo: int, hi: int, cols: Columns) -> DeltaMap:
    """An L0 map of window ``(lo, hi]`` keeping every write, sorted by ``(start, seq)``.

    Runtime complexity: O(n log n).
    """
    keep = cols.end > cols.start
    if not keep.all():
        cols = cols.take(keep)
    order = np.lexsort((cols.seq, cols.start))
    return DeltaMap(lo, hi, cols.take(order), flat=False)


@dataclass(frozen=True, eq=False)
class MergeResult:
    """A merged map plus the journal bytes its inputs referenced and it no longer does.

    ``dropped`` holds fragments ``(seq, loc, poff, length)`` as arrays (zero extents,
    which hold no journal bytes, are not listed).
    """

    map: DeltaMap
    dropped_seq: I64
    dropped_loc: I64
    dropped_poff: I64
    dropped_len: I64

    @property
    def dropped_bytes(self) -> int:
        return int(self.dropped_len.sum())

    def dropped_bytes_by(self, key: Callable[[int, int], K]) -> dict[K, int]:
        """Sum dropped bytes grouped by ``key(seq, loc)`` (e.g. the journal segment).

        Runtime complexity: O(d) calls of ``key`` over the distinct ``(seq, loc)``.
        """
        out: dict[K, int] = {}
        if not self.dropped_len.shape[0]:
            return out
        pairs = np.stack([self.dropped_seq, self.dropped_loc], axis=1)
        uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
        sums = np.bincount(inv.reshape(-1), weights=self.dropped_len, minlength=len(uniq))
        for (s, lc), b in zip(uniq.tolist(), sums.tolist(), strict=True):
            k = key(int(s), int(lc))
            out[k] = out.get(k, 0) + int(b)
        return out


def flat_of(m: DeltaMap) -> tuple[Columns, Columns]:
    """``(flat, dropped)`` of one map (identity for a flat map)."""
    if m.flat:
        return m.cols, Columns.empty()
    return flatten(m.cols)


def merge(maps: Sequence[DeltaMap]) -> MergeResult:
    """Merge maps of adjacent windows (oldest first) into one flat map of the union window.

    Newest wins per byte; every overwritten fragment is accounted in the result.

    Runtime complexity: O(N log N) numpy work for N input entries.
    """
    if not maps:
        raise ValueError("merge of no maps")
    for a, b in pairwise(maps):
        if a.hi != b.lo:
            raise ValueError(f"windows not adjacent: ({a.lo}, {a.hi}] then ({b.lo}, {b.hi}]")
    flats: list[Columns] = []
    drops: list[Columns] = []
    for m in maps:
        f, d = flat_of(m)
        flats.append(f)
        drops.append(d)
    res, d2 = overlay(flats[::-1])
    drops.append(d2)
    d = Columns.concat(drops)
    return MergeResult(
        DeltaMap(maps[0].lo, maps[-1].hi, res, flat=True),
        d.seq,
        d.loc,
        d.poff,
        d.end - d.start,
    )


def union_ranges(starts: I64, ends: I64) -> list[tuple[int, int]]:
    """Sorted, merged union of ranges (touching ranges join). Runtime complexity: O(n log n)."""
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if not starts.shape[0]:
        return []
    o = np.argsort(starts, kind="stable")
    s, e = starts[o], ends[o]
    ce = np.maximum.accumulate(e)
    new = np.ones(s.shape[0], dtype=bool)
    new[1:] = s[1:] > ce[:-1]
    last = np.ones(s.shape[0], dtype=bool)
    last[:-1] = new[1:]
    return list(zip(s[new].tolist(), ce[last].tolist(), strict=True))


def differing(a: Columns, b: Columns) -> Columns:
    """The cells where ``b``'s source differs from ``a``'s, with ``b``'s source.

    ``a`` and ``b`` are two resolves of the same range (sorted, non-overlapping, covering
    it exactly: :meth:`MapHistory.resolve_columns`). Both are cut at every boundary of
    either; a cell has the same source at both when both are zero or hole (``loc < 0``),
    or when seq and loc agree and the payload is at the same shift (``poff - start``).
    The differing cells come back in offset order, not joined, each carrying ``b``'s seq,
    loc and payload offset at the cell's start.

    Runtime complexity: O((n_a + n_b) log(n_a + n_b)).
    """
    if a.n == 0 or b.n == 0:
        return Columns.empty()
    pts = sorted_unique(np.concatenate([a.start, b.start, b.end[-1:]]))
    cut, nxt = pts[:-1], pts[1:]
    ia = np.searchsorted(a.start, cut, side="right") - 1
    ib = np.searchsorted(b.start, cut, side="right") - 1
    la, lb = a.loc[ia], b.loc[ib]
    same = ((la < 0) & (lb < 0)) | (
        (a.seq[ia] == b.seq[ib])
        & (la == lb)
        & (a.poff[ia] - a.start[ia] == b.poff[ib] - b.start[ib])
    )
    d = ~same
    ib = ib[d]
    cs = cut[d]
    return Columns(cs, nxt[d], b.seq[ib], b.loc[ib], shifted(b.poff[ib], b.start[ib], cs))
