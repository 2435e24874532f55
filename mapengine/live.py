"""The live window: the entries fed since the last seal, in memory, with a bucket index.

Design notes
------------
This is LevelDB's memtable for the map history. The entries sit in four preallocated
int64 numpy columns (``start``, ``end``, ``seq``, ``loc``; the first ``n`` slots are in
use, in seq order; the capacity doubles when full). Appending is four array stores
(:meth:`~mapengine.history.MapHistory.add_write` inlines them, ~0.5 µs a write), and a
seal sorts the window once (``build_l0``) instead of keeping it sorted per write.

A read at the head must find the live entries touching a small range without scanning
the whole window (up to ``l0_max_writes`` entries). Slots are positions in the live
arrays. Level L of the index maps ``offset >> (16 + 4·L)`` (64 KiB, 1 MiB, 16 MiB, ...
buckets) to the slots of the entries touching that bucket; an entry goes to the lowest
level where it touches at most two buckets (the top level takes anything), so a small
range visits one or two buckets per used level. The index is brought up to date lazily
(at query time) for the slots appended since, and restarted whenever the live arrays
shift (partial seal) or empty (seal). A range spanning more than ``_INDEX_SCAN``
buckets is answered by one vectorised scan of the window instead.

Hot loops bind attributes to locals; the short locals (``s``, ``e``, ``sh``) are the
entry's start, last byte and the bucket shift.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .core import Columns

__all__ = ["LiveWindow"]

# Index levels: level L buckets volume offsets by ``>> (16 + 4·L)``.
_INDEX_LEVELS = 12
_INDEX_SCAN = 48  # buckets a query may visit before a plain vectorised scan is cheaper


class LiveWindow:
    """The unsealed entries of a history: ``start``/``end``/``seq``/``loc`` columns, the
    first ``n`` slots in use (seq strictly increasing), plus their bucket index.

    The caller (the history) checks every entry before it is added.

    >>> w = LiveWindow(16)
    >>> w.append(1, 0, 8192, 100), w.append(2, 4096, 6144, 200)
    (1, 2)
    >>> w.slots(5000, 5001)
    [0, 1]
    >>> w.query(0, 2)(5000, 5001).seq.tolist()
    [1, 2]
    """

    __slots__ = ("_buckets", "_indexed", "_indexed_first", "_levels_used",
                 "end", "loc", "n", "seq", "start")

    def __init__(self, capacity: int) -> None:
        self.start = np.empty(capacity, np.int64)
        self.end = np.empty(capacity, np.int64)
        self.seq = np.empty(capacity, np.int64)
        self.loc = np.empty(capacity, np.int64)
        self.n = 0
        # bucket index (see slots): slots [0, _indexed) are indexed
        self._buckets: list[dict[int, list[int]]] = [{} for _ in range(_INDEX_LEVELS)]
        self._levels_used = 0  # bit L set: level L holds slots
        self._indexed = 0
        self._indexed_first = 0  # seq of slot 0 when the index was (re)started

    def append(self, seq: int, start: int, end: int, loc: int) -> int:
        """Add an entry (already checked by the caller); return the entry count.

        Runtime complexity: O(1) amortised.
        """
        n = self.n
        if n == self.start.shape[0]:
            self._grow()
        self.start[n] = start
        self.end[n] = end
        self.seq[n] = seq
        self.loc[n] = loc
        self.n = n + 1
        return n + 1

    def _grow(self) -> None:
        cap = self.start.shape[0] * 2
        for name in ("start", "end", "seq", "loc"):
            old = getattr(self, name)
            new = np.empty(cap, np.int64)
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def columns(self) -> Columns:
        """The entries as columns (views of the live arrays; ``poff`` 0). O(n)."""
        n = self.n
        return Columns(
            self.start[:n], self.end[:n], self.seq[:n], self.loc[:n], np.zeros(n, np.int64)
        )

    def count_upto(self, seq: int) -> int:
        """How many entries have a seq at or below ``seq``. Runtime complexity: O(log n)."""
        return int(np.searchsorted(self.seq[: self.n], seq, side="right"))

    def drop_first(self, k: int) -> None:
        """Remove the first ``k`` entries (just sealed); the rest move to the front and
        are re-indexed lazily. Runtime complexity: O(n - k)."""
        n = self.n
        if k < n:
            for a in (self.start, self.end, self.seq, self.loc):
                a[: n - k] = a[k:n].copy()
        self.n = n - k
        if k:
            self._reset_index()

    # ------------------------------------------------------------------ index

    def _reset_index(self) -> None:
        used = self._levels_used
        for lvl in range(_INDEX_LEVELS):
            if used >> lvl & 1:
                self._buckets[lvl].clear()
        self._levels_used = 0
        self._indexed = 0

    def _sync_index(self) -> None:
        """Index slots ``[_indexed, n)``. Amortised O(1) per live entry."""
        n = self.n
        k = self._indexed
        if k and (k > n or self.seq.item(0) != self._indexed_first):
            self._reset_index()  # the live arrays shifted under the index
            k = 0
        if k >= n:
            return
        if k == 0:
            self._indexed_first = self.seq.item(0)
        buckets = self._buckets
        used = self._levels_used
        top = _INDEX_LEVELS - 1
        for i, s, e in zip(
            range(k, n), self.start[k:n].tolist(), self.end[k:n].tolist(), strict=True
        ):
            e -= 1
            sh = 16
            lvl = 0
            while (e >> sh) - (s >> sh) > 1 and lvl < top:
                sh += 4
                lvl += 1
            d = buckets[lvl]
            used |= 1 << lvl
            b0 = s >> sh
            lst = d.get(b0)
            if lst is None:
                d[b0] = [i]
            else:
                lst.append(i)
            b1 = e >> sh
            if b1 != b0:
                for bk in range(b0 + 1, b1 + 1):
                    lst = d.get(bk)
                    if lst is None:
                        d[bk] = [i]
                    else:
                        lst.append(i)
        self._levels_used = used
        self._indexed = n

    def slots(self, a: int, b: int) -> list[int] | None:
        """Sorted live slots whose buckets touch ``[a, b)`` (a superset of the entries
        intersecting it); None when the range spans so many buckets that a vectorised
        scan of the whole live window is cheaper.

        Runtime complexity: O(levels used + k) for k slots returned.
        """
        if b - a > _INDEX_SCAN << 16:
            return None  # wide: scan (and leave indexing to the next small read)
        self._sync_index()
        used = self._levels_used
        out: list[int] = []
        b -= 1
        budget = _INDEX_SCAN
        lvl = 0
        sh = 16
        buckets = self._buckets
        while used:
            if used & 1:
                lo = a >> sh
                hi = b >> sh
                budget -= hi - lo + 1
                if budget < 0:
                    return None
                d = buckets[lvl]
                for bk in range(lo, hi + 1):
                    lst = d.get(bk)
                    if lst is not None:
                        out.extend(lst)
            used >>= 1
            lvl += 1
            sh += 4
        if len(out) > 1:
            out = sorted(set(out))
        return out

    def query(self, lo: int, hi: int) -> Callable[[int, int], Columns]:
        """A query ``(a, b) -> entries`` with seq in ``(lo, hi]`` intersecting ``[a, b)``
        (not clipped; ``poff`` 0), in slot order. Runtime complexity: as :meth:`slots`
        plus O(k) for k candidates, or O(n) for a wide range."""

        def q(a: int, b: int) -> Columns:
            n = self.n
            cand = self.slots(a, b) if n else None
            if cand is None:
                s, e, sq, ll = self.start[:n], self.end[:n], self.seq[:n], self.loc[:n]
            else:
                ci = np.array(cand, np.int64)
                s, e, sq, ll = self.start[ci], self.end[ci], self.seq[ci], self.loc[ci]
            m = (s < b) & (e > a)
            if lo > 0:
                m &= sq > lo
            if n and hi < self.seq.item(n - 1):
                m &= sq <= hi
            idx = np.flatnonzero(m)
            return Columns(s[idx], e[idx], sq[idx], ll[idx], np.zeros(idx.shape[0], np.int64))

        return q

    # ------------------------------------------------------------------ checking

    def check(self, after: int, upto: int) -> list[str]:
        """Broken invariants, as readable strings (empty: all hold): every seq is in
        ``(after, upto]`` and strictly increasing, every entry non-empty, and after a
        sync every slot sits exactly in the buckets it touches at its level, nothing else
        is indexed, and the index answers like a scan.

        Runtime complexity: O(n) (plus syncing the index).
        """
        out: list[str] = []
        n = self.n
        if not 0 <= n <= self.start.shape[0]:
            return [f"live window: {n} entries in a capacity of {self.start.shape[0]}"]
        if n:
            sq = self.seq[:n]
            if not (np.diff(sq) > 0).all():
                out.append("live window: seqs not strictly increasing")
            if not (sq[0] > after and sq[-1] <= upto):
                out.append(
                    f"live window: seqs {int(sq[0])}..{int(sq[-1])} outside ({after}, {upto}]"
                )
        self._sync_index()
        if self._indexed != n:
            out.append(f"live index: {self._indexed} slots indexed of {n}")
        want: dict[tuple[int, int], list[int]] = {}
        for i, s, e in zip(range(n), self.start[:n].tolist(), self.end[:n].tolist(), strict=True):
            if e <= s:
                out.append(f"live window: slot {i} is empty or reversed [{s}, {e})")
                continue
            sh, lvl = 16, 0
            while ((e - 1) >> sh) - (s >> sh) > 1 and lvl < _INDEX_LEVELS - 1:
                sh += 4
                lvl += 1
            for bk in range(s >> sh, ((e - 1) >> sh) + 1):
                want.setdefault((lvl, bk), []).append(i)
        have = {
            (lvl, bk): lst for lvl, d in enumerate(self._buckets) for bk, lst in d.items()
        }
        if have != want:
            out.append("live index out of step with the live window")
        for lvl, d in enumerate(self._buckets):
            if bool(d) != bool(self._levels_used >> lvl & 1):
                out.append(f"live index: level {lvl} used bit disagrees with its buckets")
        if n and self._indexed_first != int(self.seq[0]):
            out.append("live index: started at another first seq")
        # the index answers like a scan
        for i in range(0, n, max(1, n // 16)):
            a, b = int(self.start[i]), int(self.end[i])
            slots = self.slots(a, b)
            if slots is not None:
                hit = set(np.flatnonzero((self.start[:n] < b) & (self.end[:n] > a)).tolist())
                if not hit <= set(slots):
                    out.append(f"live index misses entries touching [{a}, {b})")
        return out
