"""A naive model of the map history: one (seq, loc, poff) triple per byte, per point.

Replays the same records one at a time; shared by the map engine's property and crash
tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mapengine import HOLE_LOC, ZERO_LOC, Extent, MapHistory

Record = tuple[str, int, int, int, int]  # (kind, seq, a, b, c)


@dataclass
class Model:
    size: int
    records: list[Record] = field(default_factory=list)
    # states[i] = (seq, loc, poff) arrays after the record with seq == seqs[i]
    seqs: list[int] = field(default_factory=lambda: [0])
    states: list[np.ndarray] = field(default_factory=list)
    last: int = 0
    rewinds: list[tuple[int, int]] = field(default_factory=list)  # (R, S)

    def __post_init__(self) -> None:
        st = np.zeros((3, self.size), np.int64)
        st[1, :] = HOLE_LOC
        self.states.append(st)

    def state(self, seq: int) -> np.ndarray:
        import bisect

        i = bisect.bisect_right(self.seqs, seq) - 1
        return self.states[i]

    def _push(self, seq: int, st: np.ndarray) -> None:
        self.seqs.append(seq)
        self.states.append(st)
        self.last = seq

    def write(self, seq: int, a: int, b: int, loc: int) -> None:
        self.records.append(("W", seq, a, b, loc))
        st = self.states[-1].copy()
        st[0, a:b] = seq
        st[1, a:b] = loc
        st[2, a:b] = np.arange(b - a)
        self._push(seq, st)

    def zero(self, seq: int, a: int, b: int) -> None:
        self.records.append(("Z", seq, a, b, 0))
        st = self.states[-1].copy()
        st[0, a:b] = seq
        st[1, a:b] = ZERO_LOC
        st[2, a:b] = np.arange(b - a)
        self._push(seq, st)

    def note(self, seq: int) -> None:
        self.records.append(("N", seq, 0, 0, 0))
        self._push(seq, self.states[-1])

    def rewind(self, seq: int, target: int) -> None:
        self.records.append(("R", seq, target, 0, 0))
        self.rewinds.append((seq, target))
        self._push(seq, self.state(target))

    def written(self, lo: int, hi: int) -> np.ndarray:
        """Bytes written by records with seq in (lo, hi] (a bool mask)."""
        m = np.zeros(self.size, bool)
        for kind, seq, a, b, _ in self.records:
            if lo < seq <= hi and kind in "WZ":
                m[a:b] = True
        return m

    def change_bound(self, x: int, y: int) -> np.ndarray:
        """Bytes ``changed(x, y)`` may report: writes since the epoch start, recursively."""
        lo, hi = sorted((x, y))
        m = np.zeros(self.size, bool)
        while lo < hi:
            r, s = 0, -1
            for rr, ss in self.rewinds:
                if rr <= hi:
                    r, s = rr, ss
            if r <= lo:
                m |= self.written(lo, hi)
                break
            m |= self.written(r, hi)
            lo, hi = sorted((lo, s))
        return m


def feed(h: MapHistory, rec: Record) -> None:
    kind, seq, a, b, c = rec
    if kind == "W":
        h.add_write(seq, a, b, c)
    elif kind == "Z":
        h.add_zero(seq, a, b)
    elif kind == "N":
        h.note_seq(seq)
    else:
        h.add_rewind(seq, a)


def check_resolve(h: MapHistory, m: Model, seq: int, a: int, b: int) -> None:
    got = h.resolve(seq, a, b)
    want = m.state(seq)
    assert_extents(got, want, a, b)


def assert_extents(got: list[Extent], want: np.ndarray, a: int, b: int) -> None:
    """*got* tiles [a, b) exactly, is coalesced, and names per byte the (seq, loc, poff)
    of *want*. The per-byte comparison is one vectorised pass; on a mismatch the first
    wrong extent is named. Cost: O(extents + (b - a))."""
    pos = a
    for i, x in enumerate(got):
        assert x.start == pos and x.end > x.start, (got, a, b)
        pos = x.end
        if i:
            p = got[i - 1]
            assert not (
                p.seq == x.seq
                and p.loc == x.loc
                and (x.loc == HOLE_LOC or x.poff == p.poff + p.end - p.start)
            ), f"not coalesced: {p} {x}"
        if x.loc == HOLE_LOC:
            assert x.seq == 0 and x.poff == 0
    assert pos == b, (got, a, b)
    if not got:
        return
    lens = np.fromiter((x.end - x.start for x in got), np.int64, len(got))
    seq = np.repeat(np.fromiter((x.seq for x in got), np.int64, len(got)), lens)
    loc = np.repeat(np.fromiter((x.loc for x in got), np.int64, len(got)), lens)
    poff = np.repeat(np.fromiter((x.poff - x.start for x in got), np.int64, len(got)),
                     lens) + np.arange(a, b)
    data = loc >= 0
    w = want[:, a:b]
    bad = (w[0] != seq) | (w[1] != loc) | (data & (w[2] != poff))
    if bad.any():
        at = a + int(np.flatnonzero(bad)[0])
        x = next(x for x in got if x.start <= at < x.end)
        raise AssertionError((x, want[:, x.start : x.end]))


def check_changed(h: MapHistory, m: Model, x: int, y: int, a: int, b: int) -> None:
    got = h.changed(x, y, a, b)
    sx, sy = m.state(x), m.state(y)
    diff = (sx != sy).any(axis=0)
    cov = np.zeros(m.size, bool)
    prev_end = -1
    for s, e in got:
        assert a <= s < e <= b, (got, a, b)
        assert s > prev_end, f"not sorted/merged: {got}"
        prev_end = e
        cov[s:e] = True
    inside = np.zeros(m.size, bool)
    inside[a:b] = True
    missing = diff & inside & ~cov
    assert not missing.any(), (x, y, a, b, got, np.flatnonzero(missing))
    bound = m.change_bound(x, y) & inside
    extra = cov & ~bound
    assert not extra.any(), (x, y, got, np.flatnonzero(extra))
    assert got == h.changed(y, x, a, b)
