"""Retention of a map history: rewriting epochs so that only chosen points stay resolvable.

Design notes
------------
This is the history's compaction (LevelDB's ``Compaction`` plus ``DoCompactionWork``).
:meth:`~mapengine.history.MapHistory.retain_prepare` plans a :class:`RetainJob` on the
owner thread (seal, check the points, add the rewind targets they depend on);
:meth:`RetainJob.build` does the work and may run in another thread; and
:meth:`~mapengine.history.MapHistory.retain_finish` installs the result on the owner
thread by one manifest switch.

The job reads only the immutable maps of the epochs as planned and writes new map files
under fresh names (tagged ``-r<n>``: never a name the current manifest holds, so a
crash leaves only files the next open deletes). It touches no shared state of the
history or the store (``put(..., register=False)``): the history keeps feeding writes
and resolving meanwhile, and refuses seals and rewinds until the job is finished.

Per epoch, the windows ending at or before the cutoff ``keep_after`` are replaced by one
window per retained point (the newest write per byte between consecutive retained
points; the versions in between are dropped and reported), and the epoch's merged
levels and full maps are rebuilt from the new windows. Windows after the cutoff are
kept as they are.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

import numpy as np

from .core import ZERO_LOC, Columns, DeltaMap, flatten, merge
from .epoch import Epoch, MergePolicy, flat_upto
from .storage import MapStore

__all__ = ["RetainJob", "RetainResult"]


@dataclass(frozen=True, eq=False)
class RetainResult:
    """What :meth:`~mapengine.history.MapHistory.retain` kept and gave up.

    ``retained``: the points below ``keep_after`` that stay resolvable (the requested
    ones plus the rewind targets they depend on), sorted. ``dropped_*``: the journal
    fragments ``(seq, loc, poff, length)`` no retained point references any more (zero
    extents, which hold no journal bytes, are not listed).
    """

    retained: list[int]
    keep_after: int
    dropped_seq: np.ndarray[Any, np.dtype[np.int64]]
    dropped_loc: np.ndarray[Any, np.dtype[np.int64]]
    dropped_poff: np.ndarray[Any, np.dtype[np.int64]]
    dropped_len: np.ndarray[Any, np.dtype[np.int64]]
    windows_before: int
    windows_after: int
    epochs_rewritten: int

    @property
    def dropped_bytes(self) -> int:
        return int(self.dropped_len.sum())


class RetainJob:
    """A planned :meth:`~mapengine.history.MapHistory.retain` (made by
    :meth:`~mapengine.history.MapHistory.retain_prepare`).

    :meth:`build` reads only the immutable maps of the history as it was planned and
    writes new map files under fresh names (not yet named by the manifest: a crash
    leaves files the next open deletes); it may run in any thread.
    """

    def __init__(self, store: MapStore, policy: MergePolicy, ka: int, need: set[int],
                 tag: str, epochs: list[tuple[Epoch, int, bool]], sealed_seq: int) -> None:
        self._store = store
        self._f = policy.fanout
        self._maxk = policy.max_level()
        self._full_every = policy.full_every
        self.ka = ka
        self.need = need
        self.tag = tag
        self.epochs = epochs  # (epoch as planned, next rewind seq, is the last epoch)
        self.sealed_seq = sealed_seq
        self.new_epochs: dict[int, Epoch] = {}
        self.drops: list[Columns] = []
        self.head: Columns | None = None
        self.built = False
        self.stale: list[str] = []

    def remove_stale(self) -> None:
        """Delete the map files the finished retain replaced (any thread)."""
        paths, self.stale = self.stale, []
        self._store.remove(paths)

    def build(self) -> None:
        """Compute and write the rewritten epochs.

        Runtime complexity: O(N log N) numpy work for the N entries of the rewritten
        epochs, plus writing their maps.
        """
        for ei, (ep, nxt, last) in enumerate(self.epochs):
            self._rewrite_epoch(ei, ep, nxt, last)
        self.built = True

    def _rewrite_epoch(self, ei: int, ep: Epoch, nxt: int, last_epoch: bool) -> None:
        """Build the rewrite of epoch ``ei``'s windows ending at or before ``ka`` into a
        new epoch object (``new_epochs``); the installed one is not touched. ``nxt``:
        the seq of the next rewind (or last seq + 1)."""
        ka, need, tag = self.ka, self.need, self.tag
        k_cut = bisect_right(ep.his, ka)  # windows [0, k_cut) end at or before ka
        if k_cut == 0:
            return
        end = ep.his[k_cut - 1]
        bounds = sorted(p for p in need if ep.rewind_seq < p <= end)
        # points at or after ka in this epoch, and retained points after the last window
        # (records that change no data), build on the state at ``end``
        if (ka < nxt or any(end < p < nxt for p in need)) and (not bounds or bounds[-1] != end):
            bounds.append(end)
        cols = Columns.concat([r.load().cols for r in ep.windows[:k_cut]])
        lo = ep.rewind_seq
        new_maps: list[DeltaMap] = []
        ep_drops: list[Columns] = []
        for b in bounds:
            sel = cols.take((cols.seq > lo) & (cols.seq <= b))
            flat, drop = flatten(sel)
            if drop.n:
                ep_drops.append(drop)
            new_maps.append(DeltaMap(lo, b, flat, flat=False))
            lo = b
        rest = cols.take(cols.seq > lo)
        if rest.n:
            ep_drops.append(rest.take(rest.loc != ZERO_LOC))
        if bounds == ep.his[:k_cut] and not any(c.n for c in ep_drops):
            return
        self.drops.extend(ep_drops)
        put = self._store.put
        windows = [put("L", 0, m, tag, False) for m in new_maps] + ep.windows[k_cut:]
        new = Epoch(ep.rewind_seq, ep.target, windows, [r.hi for r in windows])
        f = self._f
        maxk = self._maxk
        n = len(windows)
        for k in range(1, maxk + 1):
            size = f**k
            if n < size:
                break
            below = windows if k == 1 else new.levels[k - 1]
            lst = new.levels.setdefault(k, [])
            for j in range(n // size):
                res = merge([r.load() for r in below[j * f : (j + 1) * f]])
                lst.append(put("L", k, res.map, tag, False))
        fe = self._full_every
        if fe:
            for b in range(fe, n + 1, fe):
                full = DeltaMap(new.rewind_seq, new.his[b - 1], flat_upto(new, b, f, maxk),
                                flat=True)
                new.fulls[b] = put("F", 0, full, tag, False)
                new.full_keys.append(b)
        if last_epoch:
            self.head = flat_upto(new, n, f, maxk)
        self.new_epochs[ei] = new
