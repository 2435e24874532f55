"""The map history: L0 windows, merged levels, full maps, rewind epochs and the head.

Design notes
------------
Three shapes were on the table (docs/ARCHITECTURE.md, DESIGN-NOTES "Map engine: the
design space"):

* a **time-partitioned hierarchy** of immutable delta maps (chosen);
* a copy-on-write B+tree of extents with a root per checkpoint;
* an MVCC LSM keyed by offset whose compaction keeps versions visible to snapshots.

We chose the hierarchy because the three questions we must answer all fall out of it
with plain sorted arrays and no in-place update of any file:

* ``resolve(S)`` reads the nearest *full map* at or before ``S``, a Fenwick-style
  decomposition of the windows after it into at most ``(f-1)·log_f(full_every)`` merged
  maps, and the one L0 window holding ``S`` filtered by seq — newest first, stopping as
  soon as the range is covered. Every one of those maps is a sorted column array, so a
  lookup is a binary search in a block.
* ``changed(A, B)`` is the union of the window maps between A and B, so its cost follows
  the amount of change, not the size of the volume. An LSM answers this badly (versions
  of unrelated keys are interleaved); a CoW tree answers it by a tree diff that needs
  generation numbers in every node.
* retention (:meth:`MapHistory.retain`, :mod:`mapengine.retain`) replaces the windows
  below a cutoff by one window per retained point, and reports, like every merge,
  exactly which journal bytes stopped being referenced.

Writes are append-only: an L0 file per window, a merged file per ``f`` maps of the level
below, a full map every ``full_every`` windows, and an atomically replaced manifest — the
file-level story of LevelDB, which makes crash safety a matter of "which files does the
manifest name". The CoW tree would give a full map at *every* checkpoint for
``O(changes · log n)`` space, but needs node allocation, reference counting and a free
list on disk; the hierarchy bounds its space instead by building levels only below the
full-map interval (``f**k < full_every``), so an entry is copied at most
``log_f(full_every)`` times plus once per full map.

Rewind is an *epoch boundary*: ``add_rewind(R, S)`` seals, then starts a new epoch whose
maps hold only the writes after R. Maps never span epochs. Resolving ``x`` in an epoch
overlays that epoch's maps and, for the bytes still uncovered, continues with ``S`` (the
target) — iteratively, so chains of rewinds cost one walk per epoch on the chain and no
data is ever copied. Full maps and the head are *epoch-relative* for the same reason.

The **head** (state at the newest seq) is two flat maps of the current epoch in memory
as numpy columns — ``_recent`` (the windows sealed since the last big splice, at most 64)
over ``_head`` (everything before) — plus the live window (:mod:`mapengine.live`:
preallocated numpy columns with a bucket index). A seal splices the new window into
``_recent`` only (vectorised: only entries that intersect the window are re-overlaid;
O(recent) copies); ``_recent`` goes into ``_head`` (O(H) copies: the one step whose cost
follows the volume's extent count) every 64 windows and at each full map, which needs
the whole state anyway. A 4 KiB read at the head is one binary search per tier (two,
not three: each tier costs ~0.7 µs of numpy call, so the tier count is what the head
latency follows).

Merges happen inside :meth:`MapHistory.seal` (synchronously): when the number of windows
of the epoch becomes a multiple of ``f**k`` the level-``k`` map is built from the ``f``
maps below it. Level 1 is built from the f windows' flat deltas kept in memory since
they were sealed (one overlay; no re-read, decode and re-flatten of the L0 files; the
bytes a merge would drop are counted as input bytes minus output bytes, and a real merge
runs when ``on_merge`` wants the fragments). Each entry takes part in at most
``log_f(full_every)`` merges, so the cost is amortised ``O(log)`` per write; the worst
single seal does one merge per level plus the big head splice and the full map.

Seal cost at 10M writes (10 GiB volume, 2.6M head entries; profiles of issue 3): what
grew with history was the head splice every f windows (now every 64), re-reading the f
L0 files for each L1 merge (gone), ``np.unique`` — hash-based since numpy 2.3 and 10-100x
slower than a sort on 4 KiB-aligned offsets (replaced by ``core.sorted_unique``) — and
re-packing every manifest row at every commit (rows are cached). What remains O(H) is
the full map every ``full_every`` windows: its encoding (vectorised, ~0.5 s for 2.6M
entries) and its write + fsync. Random writes over the whole volume change every block
of it between two full maps, so reusing encoded blocks of the previous one would not pay
for this workload. Each seal also waits for four fsyncs (map file, directory, manifest,
directory); on a busy disk those dominate the wall-clock rate.

Thread safety: none. The caller serialises every call (the volume holds one lock);
only :meth:`RetainJob.build <mapengine.retain.RetainJob.build>` may run in another thread.

Rooms: :mod:`~mapengine.live` (the live window and its index), :mod:`~mapengine.epoch`
(policy, epochs and the Fenwick walks), :mod:`~mapengine.retain` (retention jobs),
:mod:`~mapengine.storage` (map files, manifest, file names, the store protocols).
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np

from .core import (
    HOLE_LOC,
    I64,
    ZERO_LOC,
    Columns,
    DeltaMap,
    Extent,
    MergeResult,
    build_l0,
    coalesce,
    flatten,
    merge,
    overlay,
    shifted,
    sorted_unique,
    union_ranges,
)
from .epoch import Epoch, MergePolicy, decompose_down, decompose_up, flat_upto
from .errors import MapExpired, MapUsageError
from .live import LiveWindow
from .retain import RetainJob, RetainResult
from .storage import DirStore, MapRef, MapStore, MemoryStore

__all__ = ["MapHistory"]

END_OF_VOLUME = 1 << 62  #: ``end=None`` in :meth:`MapHistory.changed` means this.
_BIG = 64  # candidate·gap count above which painting switches to the vectorised path
_FAST_SPAN = 1 << 20  # resolve's single-entry fast path is tried up to this range size
# Windows the small head tier collects before it is spliced into the big one (O(head)),
# and at every full map. Head reads check both tiers; a seal splices into the small one.
_RECENT_WINDOWS = 64


_Layer = tuple[Callable[[int, int], Columns], bool]  # (query, flat)


class MapHistory:
    """Block-ordered delta maps over time; resolves any point, diffs any two points.

    Example::

        >>> h = MapHistory.open(None)
        >>> h.add_write(1, 0, 8192, loc=100)
        False
        >>> h.add_write(2, 4096, 6144, loc=200)
        False
        >>> h.seal()
        >>> [tuple(e) for e in h.resolve(2, 0, 8192)]
        [(0, 4096, 1, 100, 0), (4096, 6144, 2, 200, 0), (6144, 8192, 1, 100, 6144)]
        >>> h.changed(1, 2)
        [(4096, 6144)]
    """

    def __init__(self, store: MapStore, policy: MergePolicy, state: dict[str, Any] | None) -> None:
        self.policy = policy
        self._store = store
        self._epochs: list[Epoch] = [Epoch(0, -1)]
        self._rewinds: list[int] = [0]
        self._last_seq = 0
        self._sealed_seq = 0
        self._broken = False
        self.on_merge: Callable[[str, MergeResult], None] | None = None
        self.dropped_bytes_total = 0
        self._f = policy.fanout
        self._lmax = policy.l0_max_writes
        self._maxk = policy.max_level()
        self._live = LiveWindow(max(16, policy.l0_max_writes))
        # The head in two flat tiers (newest wins): ``_recent`` holds the windows
        # ``[_recent_from, nw)`` sealed since the last big splice (fewer than 64),
        # ``_head`` everything before. ``_pend`` keeps the flat deltas of windows
        # ``[_pend_from, nw)`` (fewer than f) for the next level-1 map. See _seal_window.
        self._head = Columns.empty()
        self._recent = Columns.empty()
        self._recent_from = 0
        self._pend: list[Columns] = []
        self._pend_from = 0
        self._pend_in = 0  # data bytes (zero extents excluded) of those windows' L0 maps
        # retention (see retain()): points below keep_after resolve only if retained
        self._retained: list[int] = []
        self._retained_set: set[int] = set()
        self._keep_after = 0
        self._retain_gen = 0
        self._job: RetainJob | None = None
        if isinstance(store, DirStore):
            store.on_failure = self._deferred_failed
        if state is not None:
            self._restore(state)

    def _deferred_failed(self, exc: BaseException) -> None:
        """A deferred commit failed in the store's writer thread: refuse feeding from
        now on, as after a failed write in this thread (one attribute: any thread)."""
        self._broken = True

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str] | None,
        policy: MergePolicy | None = None,
        cache_bytes: int = 256 << 20,
        fs: Any = None,
        readonly: bool = False,
    ) -> MapHistory:
        """Open (or create) the history kept in ``directory``.

        ``None`` keeps everything in memory. Map files the manifest does not name are
        crash leftovers and are deleted. ``fs`` is the file-operation hook
        (:class:`mapengine.storage.FileOps`) tests use to interrupt writes. The
        manifest's ``fanout`` and ``full_every`` win over ``policy`` for an existing
        history (they shape the files); ``l0_max_writes`` always comes from ``policy``.
        ``cache_bytes`` bounds what lookups keep of the map files in memory (cdp's
        ``maps.cache_bytes``, same default): decoded blocks, and each map's block index
        and offset filter, in one LRU (:class:`mapengine.storage.BlockCache`).
        ``readonly``: create and delete no file and refuse every write (seal, rewind,
        retain raise :class:`MapUsageError`): to inspect a history, e.g. for
        :meth:`check`.

        Runtime complexity: O(M + H) for M map files and a head of H entries.
        """
        policy = policy or MergePolicy()
        if directory is None:
            return cls(MemoryStore(), policy, None)
        store, state = DirStore.open(os.fspath(directory), cache_bytes=cache_bytes, fs=fs,
                                     readonly=readonly)
        if state is not None:
            policy = MergePolicy(
                fanout=int(state["fanout"]),
                l0_max_writes=policy.l0_max_writes,
                full_every=int(state["full_every"]),
            )
        return cls(store, policy, state)

    def _restore(self, state: dict[str, Any]) -> None:
        self._epochs = [Epoch(int(r), int(t)) for r, t in state["epochs"]]
        self._rewinds = [e.rewind_seq for e in self._epochs]
        refs: dict[str, MapRef] = state["refs"]
        for name, kind, level, ei, idx in state["maps"]:
            ep = self._epochs[ei]
            ref = refs[name]
            if kind == "F":
                ep.fulls[idx] = ref
            elif level == 0:
                assert idx == len(ep.windows), "manifest windows out of order"
                ep.windows.append(ref)
                ep.his.append(ref.hi)
            else:
                lst = ep.levels.setdefault(level, [])
                assert idx == len(lst), "manifest levels out of order"
                lst.append(ref)
        for ep in self._epochs:
            ep.full_keys = sorted(ep.fulls)
        self._sealed_seq = self._last_seq = int(state["sealed_seq"])
        self._retained = sorted(int(x) for x in state.get("retained", ()))
        self._retained_set = set(self._retained)
        self._keep_after = int(state.get("keep_after", 0))
        self._retain_gen = int(state.get("retain_gen", 0))
        # the head a clean close kept for exactly these maps, else rebuilt from them
        self._reset_head(self._epochs[-1], self._store.take_head(self._sealed_seq))

    def _state(self) -> dict[str, Any]:
        maps: list[tuple[str, str, int, int, int]] = []
        for ei, ep in enumerate(self._epochs):
            maps += [(r.name, "L", 0, ei, w) for w, r in enumerate(ep.windows)]
            for k in sorted(ep.levels):
                maps += [(r.name, "L", k, ei, j) for j, r in enumerate(ep.levels[k])]
            maps += [(ep.fulls[b].name, "F", 0, ei, b) for b in ep.full_keys]
        st: dict[str, Any] = {
            "sealed_seq": self._sealed_seq,
            "fanout": self.policy.fanout,
            "full_every": self.policy.full_every,
            "epochs": [(e.rewind_seq, e.target) for e in self._epochs],
            "maps": maps,
        }
        if self._retain_gen:
            st["retained"] = list(self._retained)
            st["keep_after"] = self._keep_after
            st["retain_gen"] = self._retain_gen
        return st

    # ------------------------------------------------------------------ feeding

    @property
    def last_seq(self) -> int:
        """The newest seq fed (0 when empty).

        Runtime complexity: O(1).
        """
        return self._last_seq

    @property
    def sealed_seq(self) -> int:
        """Every seq at or below it is in map files; replay the journal after it.

        Runtime complexity: O(1).
        """
        return self._sealed_seq

    @property
    def rewinds(self) -> list[tuple[int, int]]:
        """``(rewind_seq, target_seq)`` of every rewind, oldest first.

        Runtime complexity: O(rewinds).
        """
        return [(e.rewind_seq, e.target) for e in self._epochs[1:]]

    @property
    def seal_due(self) -> bool:
        """True once the live window holds ``policy.l0_max_writes`` entries.

        Runtime complexity: O(1).
        """
        return self._live.n >= self.policy.l0_max_writes

    def _next(self, seq: int) -> None:
        if self._broken:
            raise MapUsageError("history is unusable after a failed write; reopen it")
        if seq <= self._last_seq:
            raise MapUsageError(f"seq {seq} not after last seq {self._last_seq}")

    def _add(self, seq: int, start: int, end: int, loc: int) -> bool:
        """Check and feed one entry (the general path of ``add_*``)."""
        if start < 0 or end < start:
            raise MapUsageError(f"bad range [{start}, {end})")
        self._next(seq)
        self._last_seq = seq
        if start == end:
            return self._live.n >= self.policy.l0_max_writes
        return self._live.append(seq, start, end, loc) >= self.policy.l0_max_writes

    def add_write(self, seq: int, start: int, end: int, loc: int) -> bool:
        """Record ``seq`` wrote volume bytes ``[start, end)``; payload at journal ``loc``.

        Returns True when a seal is due (``policy.l0_max_writes`` reached).

        Runtime complexity: O(1) amortised.
        """
        lw = self._live
        n = lw.n
        if loc >= 0 and 0 <= start < end and seq > self._last_seq and not self._broken:
            if n < lw.start.shape[0]:  # the common case, LiveWindow.append inline (~0.5 us)
                self._last_seq = seq
                lw.start[n] = start
                lw.end[n] = end
                lw.seq[n] = seq
                lw.loc[n] = loc
                lw.n = n + 1
                return n + 1 >= self._lmax
        elif loc < 0:
            raise MapUsageError(f"bad loc {loc}")
        return self._add(seq, start, end, loc)

    def add_zero(self, seq: int, start: int, end: int) -> bool:
        """Record ``seq`` zeroed (trim / write-zeroes) ``[start, end)``.

        Runtime complexity: O(1) amortised.
        """
        return self._add(seq, start, end, ZERO_LOC)

    def note_seq(self, seq: int) -> None:
        """Record a seq that changes no data (marker, error).

        Runtime complexity: O(1).
        """
        self._next(seq)
        self._last_seq = seq

    def add_rewind(self, seq: int, target_seq: int) -> None:
        """Record a REWIND at ``seq``: ``state(seq) == state(target_seq)``.

        Seals the live window, starts a new epoch and persists the manifest. Nothing is
        copied: later resolution falls through to ``target_seq`` for uncovered bytes.

        Runtime complexity: O(cost of seal) — metadata only.
        """
        self._next(seq)
        if self._job is not None:
            raise MapUsageError("cannot rewind while a retain is in progress")
        if not 0 <= target_seq < seq or target_seq > self._last_seq:
            raise MapUsageError(f"bad rewind target {target_seq} at seq {seq}")
        self.seal()
        self._epochs.append(Epoch(seq, target_seq))
        self._rewinds.append(seq)
        self._last_seq = seq
        self._reset_head(self._epochs[-1])
        self._sealed_seq = seq
        self._commit()

    # ------------------------------------------------------------------ sealing

    def _commit(self) -> None:
        try:
            self._store.commit(self._state())
        except BaseException:
            self._broken = True
            raise

    def seal(self, upto: int | None = None, *, defer: bool = False) -> None:
        """Turn the live window — or its part with seqs ``<= upto`` — into an L0 map
        (+ due merges and full map); persist.

        ``upto`` lets the caller seal only what its journal has made durable while newer
        entries keep arriving (they stay live). Default: everything fed so far.

        ``defer``: the maps are written (readable at once) and the manifest packed here,
        but their fsyncs and the manifest write run in the store's writer thread, in
        order (:attr:`pending`; mapengine.storage "Deferred durability"): the state is
        sealed in memory now and on disk once that job ended (a crash before replays
        the journal from the previous ``sealed_seq``). Without ``defer`` every fsync runs
        here, after the pending jobs.

        Runtime complexity: O(w log w + H) for a window of w entries and a head of H
        entries (the head splice copies arrays); merges add amortised O(log) per entry.
        """
        if self._broken:
            raise MapUsageError("history is unusable after a failed write; reopen it")
        if self._job is not None:
            raise MapUsageError("cannot seal while a retain is in progress")
        if upto is None:
            upto = self._last_seq
        if not self._sealed_seq <= upto <= self._last_seq:
            raise MapUsageError(
                f"seal upto {upto} outside [{self._sealed_seq}, {self._last_seq}]"
            )
        if upto == self._sealed_seq:
            return
        try:
            lw = self._live
            k = lw.n if upto == self._last_seq else lw.count_upto(upto)
            if k:
                self._seal_window(k, upto, defer)
            lw.drop_first(k)  # the rest shift: re-indexed lazily at the next read
            self._sealed_seq = upto
            self._store.commit(self._state(), defer=defer)
        except BaseException:
            self._broken = True
            raise

    def _reset_head(self, ep: Epoch, head: Columns | None = None) -> None:
        """Rebuild the head tiers from the epoch's maps (or install *head*, already built
        from them by a retain job). Runtime complexity: O(H log H) when it builds."""
        nw = len(ep.windows)
        if head is None:
            head = flat_upto(ep, nw, self._f, self._maxk) if nw else Columns.empty()
        self._head = head
        self._recent = Columns.empty()
        self._recent_from = nw
        self._pend = []
        self._pend_from = nw
        self._pend_in = 0

    @property
    def pending(self) -> Future[None] | None:
        """The job making the newest ``seal(defer=True)`` durable, while it has not
        ended (a :class:`concurrent.futures.Future`: await it with
        ``asyncio.wrap_future``); None when the disk holds everything sealed."""
        return self._store.pending

    @property
    def pending_jobs(self) -> int:
        """Deferred seals whose job (fsyncs, manifest) has not ended yet."""
        return self._store.pending_jobs

    def flush(self) -> None:
        """Block until every deferred seal is durable; raise what failed."""
        self._store.flush()

    def _seal_window(self, k: int, hi: int, defer: bool = False) -> None:
        """Seal the first ``k`` live entries as the window ``(lo, hi]``.

        The new window's flat deltas are spliced into ``_recent`` (O(recent) copies, the
        windows since the last big splice); every ``_RECENT_WINDOWS`` windows and at each
        full map ``_recent`` moves into ``_head`` — the only O(H) step. Every f windows the
        level-1 map is the overlay of the f windows' flat deltas kept since (no re-read
        and re-merge of the L0 files).
        """
        ep = self._epochs[-1]
        lo = ep.his[-1] if ep.his else ep.rewind_seq
        live = self._live.columns()
        l0 = build_l0(lo, hi, Columns(*(a[:k].copy() for a in live)))
        put = self._store.put
        ref = put("L", 0, l0, defer=defer)
        ep.windows.append(ref)
        ep.his.append(l0.hi)
        flat, _ = flatten(l0.cols, want_dropped=False)
        self._recent = _splice(self._recent, flat)
        self._pend.append(flat)
        self._pend_in += _data_bytes(l0.cols)
        nw = len(ep.windows)
        f = self._f
        fe = self.policy.full_every
        full_due = bool(fe) and nw % fe == 0
        l1: MergeResult | None = None
        if nw % f == 0:
            if self._pend_from == nw - f and self.on_merge is None:
                # what a merge would have dropped is what the windows held and the L1
                # map does not (byte accounting only: on_merge callers get the fragments
                # from a real merge below)
                m1 = overlay(self._pend[::-1], want_dropped=False)[0]
                l1 = MergeResult(
                    DeltaMap(ep.lo_of(nw - f), l0.hi, m1, flat=True),
                    _NO_FRAG, _NO_FRAG, _NO_FRAG, _NO_FRAG,
                )
                self.dropped_bytes_total += self._pend_in - _data_bytes(m1)
            self._pend = []
            self._pend_from = nw
            self._pend_in = 0
        if full_due or nw - self._recent_from >= _RECENT_WINDOWS:
            self._head = _splice(self._head, self._recent)
            self._recent = Columns.empty()
            self._recent_from = nw
        for k in range(1, self._maxk + 1):
            size = f**k
            if nw % size:
                break
            j = nw // size - 1
            lst = ep.levels.setdefault(k, [])
            assert len(lst) == j
            if k == 1 and l1 is not None:
                lst.append(put("L", 1, l1.map, defer=defer))
                continue
            below = ep.windows if k == 1 else ep.levels[k - 1]
            res = merge([r.load() for r in below[j * f : (j + 1) * f]])
            self.dropped_bytes_total += res.dropped_bytes
            lst.append(put("L", k, res.map, defer=defer))
            if self.on_merge is not None:
                self.on_merge(f"L{k}", res)
        if full_due:
            full = DeltaMap(ep.rewind_seq, l0.hi, self._head, flat=True)
            ep.fulls[nw] = put("F", 0, full, defer=defer)
            ep.full_keys.append(nw)

    # ------------------------------------------------------------------ resolving

    def _check_point(self, seq: int) -> None:
        if not 0 <= seq <= self._last_seq:
            raise MapUsageError(f"seq {seq} outside [0, {self._last_seq}]")

    @staticmethod
    def _check_range(start: int, end: int) -> None:
        if start < 0 or end < start:
            raise MapUsageError(f"bad range [{start}, {end})")

    def _epoch_of(self, seq: int) -> int:
        return bisect_right(self._rewinds, seq) - 1

    def resolve_head(self, start: int, end: int) -> Extent | None:
        """``resolve(last_seq, start, end)`` as its one extent when a single entry of the
        newest layer touching the range covers it whole (or nothing touches it and the
        epoch has no base): the common small read of the live volume, without building
        lists. None when the general path is needed. The caller guarantees
        ``0 <= start < end``. Runtime complexity: as the fast path of resolve.
        """
        if end - start > _FAST_SPAN:
            return None
        return self._head_extent(start, end)

    def _resolve_head_fast(self, a: int, b: int) -> list[Extent] | None:
        e = self._head_extent(a, b)
        return None if e is None else [e]

    def _head_extent(self, a: int, b: int) -> Extent | None:
        """``resolve(last_seq, a, b)`` when one entry of the newest layer touching the
        range covers it whole (or nothing touches it and the epoch has no base); None
        when the general path is needed. Same result as the general path.
        """
        lw = self._live
        if lw.n:
            cand = lw.slots(a, b)
            if cand is None:
                return None
            if cand:
                ls, le = lw.start.item, lw.end.item
                for i in reversed(cand):  # newest first
                    s = ls(i)
                    e = le(i)
                    if s < b and e > a:
                        if s <= a and e >= b:
                            return Extent(a, b, lw.seq.item(i), lw.loc.item(i), a - s)
                        return None
        for c in (self._recent, self._head):
            st = c.start
            if st.shape[0]:
                i = int(c.end.searchsorted(a, "right"))
                if i < st.shape[0]:
                    s = st.item(i)
                    if s < b:
                        if s <= a and c.end.item(i) >= b:
                            return Extent(a, b, c.seq.item(i), c.loc.item(i),
                                          c.poff.item(i) + a - s)
                        return None
        if self._epochs[-1].target < 0:
            return Extent(a, b, 0, HOLE_LOC, 0)
        return None

    @staticmethod
    def _filtered(ref: MapRef, lo: int, hi: int) -> Callable[[int, int], Columns]:
        def q(a: int, b: int) -> Columns:
            c = ref.query(a, b)
            if c.n:
                c = c.take((c.seq > lo) & (c.seq <= hi))
            return c

        return q

    def _layers(self, ei: int, x: int) -> Iterator[_Layer]:
        """Layers (newest first) of epoch ``ei``'s deltas visible at ``x``."""
        ep = self._epochs[ei]
        sealed_hi = ep.his[-1] if ep.his else ep.rewind_seq
        if ei == len(self._epochs) - 1 and x >= sealed_hi:
            if self._live.n and x > self._sealed_seq:
                yield self._live.query(0, x), False
            recent, head = self._recent, self._head
            if recent.n:
                yield (lambda a, b: _flat_query(recent, a, b)), True
            yield (lambda a, b: _flat_query(head, a, b)), True
            return
        wc = bisect_right(ep.his, x)
        if wc < len(ep.his) and ep.lo_of(wc) < x:
            yield self._filtered(ep.windows[wc], -1, x), False
        for r in decompose_down(ep, wc, self._f, self._maxk):
            yield r.query, r.flat

    def resolve(self, seq: int, start: int, end: int) -> list[Extent]:
        """Extents covering ``[start, end)`` exactly at point ``seq``, in offset order.

        Newest write at or before ``seq`` wins per byte; holes are ``(seq 0,
        HOLE_LOC)``; contiguous pieces of the same source are coalesced.

        Runtime complexity: O(f·log_f(full_every) · log n + k) map lookups for k
        extents returned, plus one walk per rewind epoch on the chain to ``seq``.
        """
        self._check_point(seq)
        self._check_resolvable(seq)
        self._check_range(start, end)
        if start == end:
            return []
        if seq == self._last_seq and end - start <= _FAST_SPAN:
            fast = self._resolve_head_fast(start, end)
            if fast is not None:
                return fast
        gaps: list[tuple[int, int]] = [(start, end)]
        out: list[Extent] = []
        x = seq
        while True:
            ei = self._epoch_of(x)
            for q, flat in self._layers(ei, x):
                gaps = _paint(q(gaps[0][0], gaps[-1][1]), flat, gaps, out)
                if not gaps:
                    break
            ep = self._epochs[ei]
            if not gaps or ep.target < 0:
                break
            x = ep.target
        out.extend(Extent(a, b, 0, HOLE_LOC, 0) for a, b in gaps)
        out.sort()
        return _coalesce_list(out)

    def resolve_columns(self, seq: int, start: int, end: int) -> Columns:
        """:meth:`resolve` as numpy columns, the same extents, painted in columns: no
        Python object per extent (for large ranges: a whole-history diff resolves
        hundreds of thousands of extents). Small ranges are cheaper through
        :meth:`resolve`, whose fast paths this skips.

        Runtime complexity: the map lookups of resolve, plus O(k log k) numpy work for k
        candidate entries.
        """
        self._check_point(seq)
        self._check_resolvable(seq)
        self._check_range(start, end)
        if start == end:
            return Columns.empty()
        gs = np.array([start], np.int64)
        ge = np.array([end], np.int64)
        parts: list[Columns] = []
        x = seq
        while True:
            ei = self._epoch_of(x)
            for q, flat in self._layers(ei, x):
                cand = q(int(gs[0]), int(ge[-1]))
                if cand.n:
                    got, gs, ge = _paint_columns(cand, flat, gs, ge)
                    parts.append(got)
                if not gs.shape[0]:
                    break
            ep = self._epochs[ei]
            if not gs.shape[0] or ep.target < 0:
                break
            x = ep.target
        if gs.shape[0]:
            z = np.zeros(gs.shape[0], np.int64)
            parts.append(Columns(gs, ge, z, np.full(gs.shape[0], HOLE_LOC, np.int64), z))
        c = Columns.concat(parts)
        return coalesce(c.take(np.argsort(c.start, kind="stable")), holes_join=True)

    # ------------------------------------------------------------------ diff

    def changed(
        self, seq_a: int, seq_b: int, start: int = 0, end: int | None = None
    ) -> list[tuple[int, int]]:
        """Sorted, merged ranges inside ``[start, end)`` whose content may differ between
        points ``seq_a`` and ``seq_b`` (either order).

        The union of the window maps between the points; across a rewind ``R -> S``:
        ``changed(a, S) | writes in (R, b]``, recursively.

        Runtime complexity: O(f·log n) map lookups + O(c log c) for c entries changed
        between the points inside the range — independent of volume size. From the start
        of an epoch (point 0: the whole history) the nearest full map stands for the
        windows it covers, so c is then the extents of that map plus the windows after
        it, not every write.
        """
        self._check_point(seq_a)
        self._check_point(seq_b)
        self._check_resolvable(seq_a)
        self._check_resolvable(seq_b)
        if end is None:
            end = END_OF_VOLUME
        self._check_range(start, end)
        lo, hi = sorted((seq_a, seq_b))
        parts: list[Columns] = []
        while lo < hi:
            ei = self._epoch_of(hi)
            ep = self._epochs[ei]
            r = ep.rewind_seq
            if r <= lo:
                self._coverage(ei, lo, hi, start, end, parts)
                break
            self._coverage(ei, r, hi, start, end, parts)
            lo, hi = sorted((lo, ep.target))
        if not parts:
            return []
        c = Columns.concat(parts)
        return union_ranges(np.maximum(c.start, start), np.minimum(c.end, end))

    def _coverage(self, ei: int, lo: int, hi: int, a: int, b: int, parts: list[Columns]) -> None:
        """Entries of epoch ``ei`` with seq in ``(lo, hi]`` intersecting ``[a, b)``."""
        ep = self._epochs[ei]
        nw = len(ep.windows)
        if ei == len(self._epochs) - 1 and hi > self._sealed_seq and self._live.n:
            parts.append(self._live.query(lo, hi)(a, b))
        wa = bisect_right(ep.his, lo)  # first window reaching past lo
        wb = bisect_right(ep.his, hi)  # windows [0, wb) end at or before hi
        first_full = wa
        if wa < nw and ep.lo_of(wa) < lo:
            parts.append(self._filtered(ep.windows[wa], lo, hi)(a, b))
            first_full = wa + 1
        if wb < nw and ep.lo_of(wb) < hi and wb >= first_full:
            parts.append(self._filtered(ep.windows[wb], lo, hi)(a, b))
        if first_full == 0 and ep.full_keys and ep.full_keys[0] <= wb:
            # windows [0, fb) of the epoch: its full map at fb covers exactly their union
            # (flat: newest per byte, no byte dropped), in O(extents now) entries instead
            # of every write since the epoch began (issue 27: `changed --from origin`)
            fb = ep.full_keys[bisect_right(ep.full_keys, wb) - 1]
            parts.append(ep.fulls[fb].query(a, b))
            first_full = fb
        for r in decompose_up(ep, first_full, wb, self._f, self._maxk):
            parts.append(r.query(a, b))

    # ------------------------------------------------------------------ retention

    @property
    def keep_after(self) -> int:
        """Every point at or after it resolves (0: no retain yet, every point does)."""
        return self._keep_after

    @property
    def retained(self) -> list[int]:
        """Points below :attr:`keep_after` that still resolve, sorted (copy)."""
        return list(self._retained)

    def resolvable(self, seq: int) -> bool:
        """Whether ``resolve(seq, ...)`` gives the exact state at ``seq``.

        Runtime complexity: O(1).
        """
        return seq == 0 or seq >= self._keep_after or seq in self._retained_set

    def _check_resolvable(self, seq: int) -> None:
        if seq and seq < self._keep_after and seq not in self._retained_set:
            raise MapExpired(f"point {seq} was expired by retention")

    def retain(self, points: Any, keep_after: int) -> RetainResult:
        """Rewrite the hierarchy so that only ``points`` and every point at or after
        ``keep_after`` stay resolvable; return the journal fragments nobody references.

        Windows ending at or before ``keep_after`` are replaced by one window per
        retained point (the newest write per byte between consecutive retained points;
        intermediate versions are dropped), the merged levels and full maps of every
        rewritten epoch are rebuilt, and the manifest is switched atomically (maps
        written by retain carry a ``-r<n>`` tag so they never overwrite a file the
        previous manifest names); old files are deleted after the switch. The targets of
        rewinds that retained points (or points after ``keep_after``) depend on are
        retained too. A point already given up cannot be retained again
        (:class:`MapExpired`); ``keep_after`` never moves backwards.

        Seals first. Runtime complexity: O(N log N) numpy work for the N entries of the
        rewritten epochs, plus writing their maps. Same as :meth:`retain_prepare`,
        :meth:`RetainJob.build`, :meth:`retain_finish` in one thread.
        """
        job = self.retain_prepare(points, keep_after)
        try:
            job.build()
        except BaseException:
            self._broken = True
            self._job = None
            raise
        return self.retain_finish(job)

    @property
    def retaining(self) -> bool:
        """A :class:`RetainJob` is pending: no seal or rewind until it is finished."""
        return self._job is not None

    def retain_prepare(self, points: Any, keep_after: int) -> RetainJob:
        """Seal, check the points and plan a retain (owner thread, cheap). The returned
        job's :meth:`~RetainJob.build` may run in another thread while this thread keeps
        feeding writes and resolving (nothing it reads changes); :meth:`seal` and
        :meth:`add_rewind` refuse until :meth:`retain_finish` installs the result."""
        if self._broken:
            raise MapUsageError("history is unusable after a failed write; reopen it")
        if self._job is not None:
            raise MapUsageError("a retain is already in progress")
        self.seal()
        ka = max(int(keep_after), self._keep_after)
        ka = min(ka, self._last_seq)
        want = sorted({int(p) for p in points if 0 < int(p) < ka})
        for p in want:
            self._check_point(p)
            self._check_resolvable(p)
        need = set(want)
        neps = len(self._epochs)
        for ei in range(neps - 1, -1, -1):
            ep = self._epochs[ei]
            nxt = self._rewinds[ei + 1] if ei + 1 < neps else self._last_seq + 1
            used = ka < nxt or any(ep.rewind_seq <= p < nxt for p in need)
            if used and ep.target > 0 and ep.target < ka:
                self._check_resolvable(ep.target)
                need.add(ep.target)
        nexts = [*self._rewinds[1:], self._last_seq + 1]
        job = RetainJob(self._store, self.policy, ka, need, f"-r{self._retain_gen + 1}",
                        [(ep, nexts[ei], ei == neps - 1) for ei, ep in enumerate(self._epochs)],
                        self._sealed_seq)
        self._job = job
        return job

    def retain_finish(self, job: RetainJob, *, remove: bool = True) -> RetainResult:
        """Install a built job (owner thread): switch the manifest, drop the old files.
        Cost: the manifest write and the deletion of the replaced map files; with
        ``remove=False`` the deletion is left to :meth:`RetainJob.remove_stale` (any
        thread; files left behind by a crash are deleted at the next open)."""
        if job is not self._job or not job.built:
            raise MapUsageError("retain_finish: not the pending, built retain job")
        self._job = None
        windows_before = sum(len(e.windows) for e in self._epochs)
        old_refs: list[MapRef] = []
        try:
            if self._sealed_seq != job.sealed_seq or len(self._epochs) != len(job.epochs):
                raise MapUsageError("the history was sealed while a retain was built")
            new_refs: list[MapRef] = []
            for ei, new in job.new_epochs.items():
                old_refs.extend(self._epochs[ei].refs())
                new_refs.extend(new.refs())
                self._epochs[ei] = new
            self._store.adopt(new_refs)
            if job.head is not None:
                self._reset_head(self._epochs[-1], job.head)
            self._retained = sorted(job.need)
            self._retained_set = set(self._retained)
            self._keep_after = job.ka
            self._retain_gen += 1
            self._store.commit(self._state())
        except BaseException:
            self._broken = True
            raise
        keep = {id(r) for ep in self._epochs for r in ep.refs()}
        stale = [r.name for r in old_refs if id(r) not in keep]
        if remove:
            self._store.drop(stale)
        else:
            job.stale = self._store.unregister(stale)
        d = Columns.concat(job.drops) if job.drops else Columns.empty()
        return RetainResult(
            list(self._retained), job.ka, d.seq, d.loc, d.poff, d.end - d.start,
            windows_before, sum(len(e.windows) for e in self._epochs), len(job.new_epochs),
        )

    def retain_abort(self, job: RetainJob) -> None:
        """Give up a pending job (its build failed): the history refuses further feeding."""
        if job is self._job:
            self._job = None
            self._broken = True

    def sealed_windows(self) -> list[MapRef]:
        """Every sealed L0 window (a copy of the list; the maps are immutable, so another
        thread may load them while this one feeds and seals)."""
        return [r for ep in self._epochs for r in ep.windows]

    def live_fragments(self) -> Iterator[Columns]:
        """Every journal fragment some resolvable point may reference: the entries of
        every L0 window and of the live window (zero extents left out), one batch per
        window. What no batch names is dead journal space.

        Runtime complexity: O(total L0 entries), one window in memory at a time.
        """
        for ep in self._epochs:
            for r in ep.windows:
                c = r.load().cols
                yield c.take(c.loc != ZERO_LOC)
        if self._live.n:
            c = self._live.columns()
            yield c.take(c.loc != ZERO_LOC)

    # ------------------------------------------------------------------ admin

    def stats(self) -> dict[str, Any]:
        """Map counts per level, entries, bytes on disk, cache bytes.

        Runtime complexity: O(number of maps).
        """
        counts: dict[str, int] = {}
        entries = 0
        for ep in self._epochs:
            counts["L0"] = counts.get("L0", 0) + len(ep.windows)
            entries += sum(len(r) for r in ep.windows)
            for k, lst in ep.levels.items():
                counts[f"L{k}"] = counts.get(f"L{k}", 0) + len(lst)
                entries += sum(len(r) for r in lst)
            counts["F"] = counts.get("F", 0) + len(ep.fulls)
            entries += sum(len(r) for r in ep.fulls.values())
        return {
            "maps": counts,
            "entries": entries,
            "epochs": len(self._epochs),
            "head_entries": self._head.n + self._recent.n,
            "head_bytes": self._head.nbytes + self._recent.nbytes,
            "live_entries": self._live.n,
            "disk_bytes": self._store.disk_bytes(),
            "cache_bytes": self._store.cache_bytes(),
            "last_seq": self._last_seq,
            "sealed_seq": self._sealed_seq,
        }

    def close(self) -> None:
        """Release files and caches. Unsealed writes are not persisted (replay them).
        When everything is sealed, the head is kept (``HEAD``, FORMATS.md) for the next
        open, which then reads it instead of rebuilding it from the maps.

        Runtime complexity: O(1); O(H) to write a head of H entries (40 bytes each).
        """
        try:
            if not self._broken and self._live.n == 0 and self._last_seq == self._sealed_seq:
                try:  # HEAD is tagged with a manifest generation: make that one durable
                    self._store.flush()
                except Exception:  # a failed deferred seal: reported to its caller; no HEAD
                    return
                # the two tiers as one, as the seal every _RECENT_WINDOWS windows joins them
                self._store.save_head(_splice(self._head, self._recent), self._sealed_seq)
        finally:
            self._store.close()

    def __enter__(self) -> MapHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, deep: bool = True, head: bool = True) -> list[str]:
        """Every broken invariant, as a readable string; ``[]`` when all hold (RocksDB's
        ``CheckConsistency``). Used by the tests (through :meth:`_check`, after
        mutations) and by ``cdpctl verify`` (on a history opened read-only).

        Checked: seqs and epochs in order; the live window and its index; every epoch's
        windows contiguous and ending by the next rewind (or ``sealed_seq``); merged
        levels and full maps covering exactly their windows; the head tiers flat and
        inside the newest epoch. ``deep``: also load every map and check its entries
        (sorted, seqs inside its window, flat where it must be, offset filter).
        ``deep`` and ``head``: also rebuild the head from the maps and compare it with
        the in-memory tiers, and resolve the whole head range (only when everything
        before holds; pointless right after an open, which builds the head from the
        maps, so verify passes ``head=False``).

        Runtime complexity: O(M + live entries) for M maps; ``deep`` adds O(total
        entries) of loading; ``head`` adds O(H log H) and a list of the H head extents.
        """
        out: list[str] = []
        if self._sealed_seq > self._last_seq:
            out.append(f"sealed seq {self._sealed_seq} after last seq {self._last_seq}")
        if self._rewinds != [e.rewind_seq for e in self._epochs]:
            out.append("rewind list disagrees with the epochs")
        if self._rewinds != sorted(set(self._rewinds)):
            out.append(f"rewind seqs not strictly increasing: {self._rewinds}")
        out += self._live.check(self._sealed_seq, self._last_seq)
        f = self._f
        for ei, ep in enumerate(self._epochs):
            where = f"epoch {ei} (rewind @{ep.rewind_seq})"
            nxt = self._rewinds[ei + 1] if ei + 1 < len(self._epochs) else self._sealed_seq
            if ep.target >= ep.rewind_seq:
                out.append(f"{where}: target @{ep.target} not before its rewind")
            prev = ep.rewind_seq
            if len(ep.his) != len(ep.windows):
                out.append(f"{where}: {len(ep.his)} window ends for {len(ep.windows)} windows")
            for w, r in enumerate(ep.windows):
                if r.lo != prev or r.hi <= r.lo or w >= len(ep.his) or ep.his[w] != r.hi:
                    out.append(f"{where}: window {w} {r.name} covers ({r.lo}, {r.hi}], "
                               f"expected to start after @{prev}")
                prev = r.hi
                if deep:
                    m = r.load()
                    out += [f"{r.name}: {p}" for p in m.check()]
                    if m.flat:
                        out.append(f"{r.name}: an L0 window is flat")
                    out += r.check_filter(m.cols)
            if prev > nxt:
                out.append(f"{where}: windows reach @{prev}, past @{nxt} "
                           "(the next rewind or the sealed seq)")
            for k, lst in ep.levels.items():
                size = f**k
                if not 1 <= k <= self._maxk:
                    out.append(f"{where}: level {k} outside 1..{self._maxk}")
                if len(lst) != len(ep.windows) // size:
                    out.append(f"{where}: {len(lst)} level-{k} maps for "
                               f"{len(ep.windows)} windows (fanout {f})")
                for j, r in enumerate(lst):
                    w1 = (j + 1) * size - 1
                    if w1 >= len(ep.his) or r.lo != ep.lo_of(j * size) or r.hi != ep.his[w1]:
                        out.append(f"{where}: level-{k} map {j} {r.name} covers "
                                   f"({r.lo}, {r.hi}], not windows {j * size}..{w1}")
                    if deep:
                        m = r.load()
                        out += [f"{r.name}: {p}" for p in m.check()]
                        if not m.flat:
                            out.append(f"{r.name}: a merged map is not flat")
                        out += r.check_filter(m.cols)
            if ep.full_keys != sorted(ep.fulls):
                out.append(f"{where}: full map keys out of step")
            for b, r in ep.fulls.items():
                if not 0 < b <= len(ep.his):
                    out.append(f"{where}: full map {r.name} at window {b} of {len(ep.his)}")
                elif r.lo != ep.rewind_seq or r.hi != ep.his[b - 1]:
                    out.append(f"{where}: full map {r.name} covers ({r.lo}, {r.hi}], "
                               f"not ({ep.rewind_seq}, {ep.his[b - 1]}]")
                if deep:
                    out += [f"{r.name}: {p}" for p in r.load().check()]
        last = self._epochs[-1]
        for name, tier in (("recent", self._recent), ("head", self._head)):
            hm = DeltaMap(last.rewind_seq, max(self._sealed_seq, last.rewind_seq), tier, flat=True)
            out += [f"{name} tier: {p}" for p in hm.check()]
        nw = len(last.windows)
        if not (0 <= self._recent_from <= nw and nw - self._recent_from < _RECENT_WINDOWS):
            out.append(f"recent tier starts at window {self._recent_from} of {nw}")
        if not (0 <= self._pend_from <= nw and nw - self._pend_from < max(f, 2)):
            out.append(f"pending level-1 deltas start at window {self._pend_from} of {nw}")
        if len(self._pend) != nw - self._pend_from or self._pend_in < 0:
            out.append(f"{len(self._pend)} pending level-1 deltas for windows "
                       f"{self._pend_from}..{nw} ({self._pend_in} bytes)")
        if deep and head and not out:
            out += self._check_head(last)
        return out

    def _check_head(self, ep: Epoch) -> list[str]:
        """The head tiers and the pending level-1 deltas against the newest epoch's maps
        (see :meth:`check`)."""
        out: list[str] = []
        nw = len(ep.windows)
        want = flat_upto(ep, nw, self._f, self._maxk)
        have = overlay([self._recent, self._head], want_dropped=False)[0]
        if not all(np.array_equal(x, y) for x, y in zip(want, have, strict=True)):
            out.append("head differs from the epoch's maps")
        flats = [
            flatten(ep.windows[w].load().cols, want_dropped=False)[0]
            for w in range(self._recent_from, nw)
        ]
        rec = overlay(flats[::-1], want_dropped=False)[0]
        if not all(np.array_equal(x, y) for x, y in zip(rec, self._recent, strict=True)):
            out.append("recent tier differs from its windows")
        # _pend holds the flat deltas of windows [_pend_from, nw): the next L1 map
        for w, p in zip(range(self._pend_from, nw), self._pend, strict=True):
            fw = flats[w - self._recent_from] if w >= self._recent_from else flatten(
                ep.windows[w].load().cols, want_dropped=False
            )[0]
            if not all(np.array_equal(x, y) for x, y in zip(fw, p, strict=True)):
                out.append(f"pending level-1 delta of window {w} differs from the window")
        pend_in = sum(_data_bytes(ep.windows[w].load().cols) for w in range(self._pend_from, nw))
        if self._pend_in != pend_in:
            out.append(f"pending level-1 input counted {self._pend_in} bytes, "
                       f"the windows hold {pend_in}")
        if self._head.n:
            a = int(self._head.start[0])
            b = int(self._head.end[-1])
            got = self.resolve(self._last_seq, a, b)
            if got[0].start != a or got[-1].end != b or any(
                got[i - 1].end != got[i].start for i in range(1, len(got))
            ):
                out.append(f"resolve at the head does not cover [{a}, {b}) exactly")
        return out

    def _check(self, deep: bool = True) -> None:
        """Assert :meth:`check` finds nothing (tests call it after mutations).

        Runtime complexity: as :meth:`check` with ``head=deep``.
        """
        problems = self.check(deep, head=deep)
        assert problems == [], problems


_EMPTY = Columns.empty()
_NO_FRAG: np.ndarray[Any, np.dtype[np.int64]] = np.zeros(0, np.int64)


def _data_bytes(c: Columns) -> int:
    """Bytes of journal data ``c`` references (zero extents excluded). O(n)."""
    if not c.n:
        return 0
    return int(((c.end - c.start) * (c.loc != ZERO_LOC)).sum())


def _flat_query(c: Columns, a: int, b: int) -> Columns:
    i0 = int(c.end.searchsorted(a, "right"))
    if i0 >= c.start.shape[0] or c.start[i0] >= b:
        return _EMPTY
    i1 = int(c.start.searchsorted(b, "left"))
    return c.take(slice(i0, i1))


def _splice(head: Columns, new: Columns) -> Columns:
    """Overlay flat ``new`` onto flat ``head``; only intersecting head entries are touched.

    Runtime complexity: O(k log H) + O(H) array copies for k new entries.
    Memory: the new arrays (40 bytes per entry) plus one column's temporary (8 bytes
    per entry) and a mask: the untouched entries go straight from ``head`` into the
    result, column by column, instead of through a copy of all of them first (a head
    of 1M entries spliced every 64 windows held ~130 MiB at once, issue 27).
    """
    if head.n == 0:
        return new
    if new.n == 0:
        return head
    n = head.n
    i0 = np.searchsorted(head.end, new.start, side="right")
    i1 = np.searchsorted(head.start, new.end, side="left")
    hit = i1 > i0
    mark = np.zeros(n + 1, np.int32)
    np.add.at(mark, i0[hit], 1)
    np.add.at(mark, i1[hit], -1)
    keep = np.cumsum(mark[:-1], dtype=np.int32) == 0
    del mark
    merged, _ = overlay([new, head.take(~keep)], want_dropped=False)
    kept_start = head.start[keep]
    # np.insert(kept, pos, merged) with pos ascending puts merged[i] at pos[i] + i
    at = np.searchsorted(kept_start, merged.start)
    at += np.arange(merged.n, dtype=at.dtype)
    total = kept_start.size + merged.n
    del kept_start
    is_new = np.zeros(total, np.bool_)
    is_new[at] = True
    is_old = ~is_new
    out = []
    for h, m in zip(head, merged, strict=True):
        col = np.empty(total, h.dtype)
        col[at] = m
        col[is_old] = h[keep]
        out.append(col)
    return Columns(*out)


def _paint(
    cand: Columns, flat: bool, gaps: list[tuple[int, int]], out: list[Extent]
) -> list[tuple[int, int]]:
    """Fill ``gaps`` from candidate entries (newest seq wins); return the gaps left."""
    if cand.n == 0:
        return gaps
    if cand.n * len(gaps) > _BIG:
        return _paint_vec(cand, flat, gaps, out)
    if flat:
        rows = zip(
            cand.start.tolist(),
            cand.end.tolist(),
            cand.seq.tolist(),
            cand.loc.tolist(),
            cand.poff.tolist(),
            strict=True,
        )
    else:
        o = np.argsort(-cand.seq, kind="stable")
        rows = zip(
            cand.start[o].tolist(),
            cand.end[o].tolist(),
            cand.seq[o].tolist(),
            cand.loc[o].tolist(),
            cand.poff[o].tolist(),
            strict=True,
        )
    for s, e, q, lc, p in rows:
        ng: list[tuple[int, int]] = []
        for ga, gb in gaps:
            if gb <= s or ga >= e:
                ng.append((ga, gb))
                continue
            a = ga if ga > s else s
            b = gb if gb < e else e
            out.append(Extent(a, b, q, lc, p + a - s))
            if ga < a:
                ng.append((ga, a))
            if b < gb:
                ng.append((b, gb))
        gaps = ng
        if not gaps:
            break
    return gaps


def _paint_vec(
    cand: Columns, flat: bool, gaps: list[tuple[int, int]], out: list[Extent]
) -> list[tuple[int, int]]:
    g = np.asarray(gaps, np.int64).reshape(-1, 2)
    got, gs, ge = _paint_columns(cand, flat, g[:, 0], g[:, 1])
    out.extend(got.extents())
    return list(zip(gs.tolist(), ge.tolist(), strict=True))


def _paint_columns(cand: Columns, flat: bool, gs: I64, ge: I64) -> tuple[Columns, I64, I64]:
    """Fill the sorted, disjoint gaps ``[gs, ge)`` from candidate entries (newest seq
    wins): the pieces painted (offset order, cut at every boundary) and the gaps left
    (touching ones joined). O(k log k) numpy work for k entries and gaps."""
    if not flat:
        cand = flatten(cand, want_dropped=False)[0]
    pts = sorted_unique(np.concatenate([cand.start, cand.end, gs, ge]))
    cut = pts[:-1]
    nxt = pts[1:]
    ig = np.searchsorted(gs, cut, side="right") - 1
    ing = (ig >= 0) & (ge[np.maximum(ig, 0)] > cut)
    i = np.searchsorted(cand.start, cut, side="right") - 1
    ic = np.maximum(i, 0)
    inc = (i >= 0) & (cand.end[ic] > cut)
    take = ing & inc
    ti = i[take]
    ps = cut[take]
    got = Columns(
        ps, nxt[take], cand.seq[ti], cand.loc[ti], shifted(cand.poff[ti], cand.start[ti], ps)
    )
    rem = ing & ~inc
    rs, re_ = cut[rem], nxt[rem]
    if rs.shape[0] > 1:  # cells in offset order, disjoint: join the touching ones
        new = np.ones(rs.shape[0], dtype=bool)
        new[1:] = rs[1:] != re_[:-1]
        last = np.ones(rs.shape[0], dtype=bool)
        last[:-1] = new[1:]
        rs, re_ = rs[new], re_[last]
    return got, rs, re_


def _coalesce_list(ex: list[Extent]) -> list[Extent]:
    if len(ex) < 2:
        return ex
    res = [ex[0]]
    for x in ex[1:]:
        p = res[-1]
        if (
            p.end == x.start
            and p.seq == x.seq
            and p.loc == x.loc
            and (x.loc == HOLE_LOC or x.poff == p.poff + (p.end - p.start))
        ):
            res[-1] = Extent(p.start, x.end, p.seq, p.loc, p.poff)
        else:
            res.append(x)
    return res
