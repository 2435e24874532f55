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
* retention (later) drops or merges whole windows, and a merge reports exactly which
  journal bytes stopped being referenced.

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
over ``_head`` (everything before) — plus the live window in preallocated numpy columns
with a bucket index. A seal splices the new window into ``_recent`` only (vectorised:
only entries that intersect the window are re-overlaid; O(recent) copies); ``_recent``
goes into ``_head`` (O(H) copies: the one step whose cost follows the volume's extent
count) every 64 windows and at each full map, which needs the whole state anyway. A
4 KiB read at the head is one binary search per tier (two, not three: each tier costs
~0.7 µs of numpy call, so the tier count is what the head latency follows).

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

Thread safety: none. The caller serialises every call (the volume holds one lock).
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .core import (
    HOLE_LOC,
    ZERO_LOC,
    Columns,
    DeltaMap,
    Extent,
    MergeResult,
    build_l0,
    flatten,
    merge,
    overlay,
    shifted,
    sorted_unique,
    union_ranges,
)
from .errors import MapExpired, MapUsageError

__all__ = ["MapHistory", "MergePolicy", "RetainResult"]

END_OF_VOLUME = 1 << 62  #: ``end=None`` in :meth:`MapHistory.changed` means this.
_BIG = 64  # candidate·gap count above which painting switches to the vectorised path
# Live-window index: level L buckets volume offsets by ``>> (16 + 4·L)`` (64 KiB, 1 MiB,
# 16 MiB, ...); an entry sits in the lowest level where it touches at most two buckets.
_LIX_LEVELS = 12
_LIX_SCAN = 48  # buckets a query may visit before a plain vectorised scan is cheaper
_FAST_SPAN = 1 << 20  # resolve's single-entry fast path is tried up to this range size
# Windows the small head tier collects before it is spliced into the big one (O(head)),
# and at every full map. Head reads check both tiers; a seal splices into the small one.
_RECENT_WINDOWS = 64


@dataclass(frozen=True)
class MergePolicy:
    """How windows are cut and merged.

    * ``l0_max_writes``: ``add_*`` returns True once the live window holds this many
      entries (the caller should then :meth:`~MapHistory.seal`).
    * ``fanout``: ``f`` maps of level ``k-1`` merge into one map of level ``k``.
    * ``full_every``: a full (cumulative, epoch-relative) map every this many L0 windows;
      levels are only built while ``fanout**k < full_every``. 0 disables full maps (and
      then levels grow without bound).
    """

    fanout: int = 8
    l0_max_writes: int = 8192
    full_every: int = 64

    def __post_init__(self) -> None:
        if self.fanout < 2:
            raise MapUsageError("fanout must be >= 2")
        if self.l0_max_writes < 1:
            raise MapUsageError("l0_max_writes must be >= 1")
        if self.full_every < 0:
            raise MapUsageError("full_every must be >= 0")

    def max_level(self) -> int:
        """Highest merge level built."""
        k = 0
        while self.full_every == 0 or self.fanout ** (k + 1) < self.full_every:
            k += 1
            if self.full_every == 0 and k >= 40:
                break
        return k


class MapRef(Protocol):
    """A map the history holds: in memory (:class:`DeltaMap`) or in a file (lazy)."""

    name: str
    lo: int
    hi: int
    flat: bool

    def __len__(self) -> int: ...

    def query(self, start: int, end: int) -> Columns: ...

    def load(self) -> DeltaMap: ...


class Store(Protocol):
    """Where maps and the manifest go (memory, or a directory of files)."""

    def put(self, kind: str, level: int, m: DeltaMap, tag: str = "",
            register: bool = True) -> MapRef:
        """Write a map. ``register=False``: touch no shared state (safe in another
        thread); the owner thread then hands the refs to :meth:`adopt`."""
        ...

    def adopt(self, refs: list[MapRef]) -> None: ...

    def drop(self, names: list[str]) -> None: ...

    def unregister(self, names: list[str]) -> list[str]:
        """:meth:`drop` minus the file deletion: the paths to :meth:`remove` (any thread)."""
        ...

    def remove(self, paths: list[str]) -> None: ...

    def commit(self, state: dict[str, Any]) -> None: ...

    def disk_bytes(self) -> int: ...

    def cache_bytes(self) -> int: ...

    def close(self) -> None: ...


class _MemRef:
    """An in-memory map (the memory store's handle)."""

    __slots__ = ("flat", "hi", "lo", "m", "name")

    def __init__(self, name: str, m: DeltaMap) -> None:
        self.name = name
        self.m = m
        self.lo = m.lo
        self.hi = m.hi
        self.flat = m.flat

    def __len__(self) -> int:
        return len(self.m)

    def query(self, start: int, end: int) -> Columns:
        return self.m.query(start, end)

    def load(self) -> DeltaMap:
        return self.m


class MemoryStore:
    """Keeps every map in memory; nothing persists. For tests and benchmarks."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        self._bytes = 0

    def put(self, kind: str, level: int, m: DeltaMap, tag: str = "",
            register: bool = True) -> MapRef:
        if register:
            self._bytes += m.nbytes
        return _MemRef(map_name(kind, level, m.lo, m.hi, tag), m)

    def adopt(self, refs: list[MapRef]) -> None:
        for r in refs:
            if isinstance(r, _MemRef):
                self._bytes += r.m.nbytes

    def drop(self, names: list[str]) -> None:
        pass

    def unregister(self, names: list[str]) -> list[str]:
        return []

    def remove(self, paths: list[str]) -> None:
        pass

    def commit(self, state: dict[str, Any]) -> None:
        self.state = state

    def disk_bytes(self) -> int:
        return 0

    def cache_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        pass


def map_name(kind: str, level: int, lo: int, hi: int, tag: str = "") -> str:
    """File name of a map: ``L<k>-<first:020d>-<last:020d>.map`` or ``F-<last:020d>.map``.

    ``first = lo + 1`` and ``last = hi``: the seqs the window covers. ``tag`` (``-r<n>``)
    marks maps written by the n-th :meth:`MapHistory.retain`, so that they never reuse
    the name of a file the previous manifest still names.
    """
    if kind == "F":
        return f"F-{hi:020d}{tag}.map"
    return f"L{level}-{lo + 1:020d}-{hi:020d}{tag}.map"


@dataclass(frozen=True, eq=False)
class RetainResult:
    """What :meth:`MapHistory.retain` kept and gave up.

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
    """A planned :meth:`MapHistory.retain` (see :meth:`MapHistory.retain_prepare`).

    :meth:`build` reads only the immutable maps of the history as it was planned and
    writes new map files under fresh names (not yet named by the manifest: a crash
    leaves files the next open deletes); it may run in any thread.
    """

    def __init__(self, h: MapHistory, ka: int, need: set[int], tag: str,
                 epochs: list[tuple[_Epoch, int, bool]], sealed_seq: int) -> None:
        self._h = h
        self.ka = ka
        self.need = need
        self.tag = tag
        self.epochs = epochs  # (epoch as planned, next rewind seq, is the last epoch)
        self.sealed_seq = sealed_seq
        self.new_epochs: dict[int, _Epoch] = {}
        self.drops: list[Columns] = []
        self.head: Columns | None = None
        self.built = False
        self.stale: list[str] = []

    def remove_stale(self) -> None:
        """Delete the map files the finished retain replaced (any thread)."""
        paths, self.stale = self.stale, []
        self._h._store.remove(paths)

    def build(self) -> None:
        """Compute and write the rewritten epochs. Runtime complexity: as retain."""
        for ei, (ep, nxt, last) in enumerate(self.epochs):
            self._h._retain_epoch(self, ei, ep, nxt, last)
        self.built = True


@dataclass
class _Epoch:
    rewind_seq: int  # R: state(R) == state(target); 0 for the first epoch
    target: int  # S; -1 for the first epoch (no base: holes)
    windows: list[MapRef] = field(default_factory=list)
    his: list[int] = field(default_factory=list)  # hi seq of each window
    levels: dict[int, list[MapRef]] = field(default_factory=dict)  # level k>=1
    fulls: dict[int, MapRef] = field(default_factory=dict)  # window boundary -> full map
    full_keys: list[int] = field(default_factory=list)  # sorted boundaries

    def lo_of(self, w: int) -> int:
        return self.his[w - 1] if w else self.rewind_seq


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

    def __init__(self, store: Store, policy: MergePolicy, state: dict[str, Any] | None) -> None:
        self.policy = policy
        self._store = store
        self._epochs: list[_Epoch] = [_Epoch(0, -1)]
        self._rewinds: list[int] = [0]
        self._last_seq = 0
        self._sealed_seq = 0
        self._broken = False
        self.on_merge: Callable[[str, MergeResult], None] | None = None
        self.dropped_bytes_total = 0
        self._f = policy.fanout
        self._lmax = policy.l0_max_writes
        self._maxk = policy.max_level()
        cap = max(16, policy.l0_max_writes)
        self._ls = np.empty(cap, np.int64)
        self._le = np.empty(cap, np.int64)
        self._lq = np.empty(cap, np.int64)
        self._ll = np.empty(cap, np.int64)
        self._ln = 0
        # bucket index of the live window (see _live_slots): slots [0, _lix_n) indexed
        self._lix: list[dict[int, list[int]]] = [{} for _ in range(_LIX_LEVELS)]
        self._lix_used = 0  # bit L set: level L holds slots
        self._lix_n = 0
        self._lix_first = 0  # seq of slot 0 when the index was (re)started
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
        if state is not None:
            self._restore(state)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str] | None,
        policy: MergePolicy | None = None,
        cache_bytes: int = 256 << 20,
        fs: Any = None,
    ) -> MapHistory:
        """Open (or create) the history kept in ``directory``.

        ``None`` keeps everything in memory. Map files the manifest does not name are
        crash leftovers and are deleted. ``fs`` is the file-operation hook
        (:class:`mapengine.storage.FileOps`) tests use to interrupt writes. The
        manifest's ``fanout`` and ``full_every`` win over ``policy`` for an existing
        history (they shape the files); ``l0_max_writes`` always comes from ``policy``.
        ``cache_bytes`` bounds the decoded map blocks kept in memory (cdp's
        ``maps.cache_bytes``, same default) and, separately, the maps' offset filters.

        Runtime complexity: O(M + H) for M map files and a head of H entries.
        """
        policy = policy or MergePolicy()
        if directory is None:
            return cls(MemoryStore(), policy, None)
        from .storage import DirStore

        store, state = DirStore.open(os.fspath(directory), cache_bytes=cache_bytes, fs=fs)
        if state is not None:
            policy = MergePolicy(
                fanout=int(state["fanout"]),
                l0_max_writes=policy.l0_max_writes,
                full_every=int(state["full_every"]),
            )
        return cls(store, policy, state)

    def _restore(self, state: dict[str, Any]) -> None:
        self._epochs = [_Epoch(int(r), int(t)) for r, t in state["epochs"]]
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
        self._reset_head(self._epochs[-1])

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
    def seal_due(self) -> bool:
        """True once the live window holds ``policy.l0_max_writes`` entries.

        Runtime complexity: O(1).
        """
        return self._ln >= self.policy.l0_max_writes

    def _next(self, seq: int) -> None:
        if self._broken:
            raise MapUsageError("history is unusable after a failed write; reopen it")
        if seq <= self._last_seq:
            raise MapUsageError(f"seq {seq} not after last seq {self._last_seq}")

    def _append(self, seq: int, start: int, end: int, loc: int) -> bool:
        if start < 0 or end < start:
            raise MapUsageError(f"bad range [{start}, {end})")
        self._next(seq)
        self._last_seq = seq
        if start == end:
            return self._ln >= self.policy.l0_max_writes
        n = self._ln
        if n == self._ls.shape[0]:
            self._grow()
        self._ls[n] = start
        self._le[n] = end
        self._lq[n] = seq
        self._ll[n] = loc
        self._ln = n + 1
        return n + 1 >= self.policy.l0_max_writes

    def _grow(self) -> None:
        cap = self._ls.shape[0] * 2
        for name in ("_ls", "_le", "_lq", "_ll"):
            old = getattr(self, name)
            new = np.empty(cap, np.int64)
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def add_write(self, seq: int, start: int, end: int, loc: int) -> bool:
        """Record ``seq`` wrote volume bytes ``[start, end)``; payload at journal ``loc``.

        Returns True when a seal is due (``policy.l0_max_writes`` reached).

        Runtime complexity: O(1) amortised.
        """
        n = self._ln
        if loc >= 0 and 0 <= start < end and seq > self._last_seq and not self._broken:
            if n < self._ls.shape[0]:  # the common case, inline (~0.5 us a write)
                self._last_seq = seq
                self._ls[n] = start
                self._le[n] = end
                self._lq[n] = seq
                self._ll[n] = loc
                self._ln = n + 1
                return n + 1 >= self._lmax
        elif loc < 0:
            raise MapUsageError(f"bad loc {loc}")
        return self._append(seq, start, end, loc)

    def add_zero(self, seq: int, start: int, end: int) -> bool:
        """Record ``seq`` zeroed (trim / write-zeroes) ``[start, end)``.

        Runtime complexity: O(1) amortised.
        """
        return self._append(seq, start, end, ZERO_LOC)

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
        self._epochs.append(_Epoch(seq, target_seq))
        self._rewinds.append(seq)
        self._last_seq = seq
        self._reset_head(self._epochs[-1])
        self._sealed_seq = seq
        self._commit()

    # ------------------------------------------------------------------ sealing

    def _live(self) -> Columns:
        n = self._ln
        return Columns(
            self._ls[:n], self._le[:n], self._lq[:n], self._ll[:n], np.zeros(n, np.int64)
        )

    def _commit(self) -> None:
        try:
            self._store.commit(self._state())
        except BaseException:
            self._broken = True
            raise

    def seal(self, upto: int | None = None) -> None:
        """Turn the live window — or its part with seqs ``<= upto`` — into an L0 map
        (+ due merges and full map); persist.

        ``upto`` lets the caller seal only what its journal has made durable while newer
        entries keep arriving (they stay live). Default: everything fed so far.

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
            n = self._ln
            k = n if upto == self._last_seq else int(
                np.searchsorted(self._lq[:n], upto, side="right")
            )
            if k:
                self._seal_window(k, upto)
            if k < n:
                for a in (self._ls, self._le, self._lq, self._ll):
                    a[: n - k] = a[k:n].copy()
            self._ln = n - k
            if k:
                self._lix_reset()  # slots shifted: re-indexed lazily at the next read
            self._sealed_seq = upto
            self._store.commit(self._state())
        except BaseException:
            self._broken = True
            raise

    def _reset_head(self, ep: _Epoch, head: Columns | None = None) -> None:
        """Rebuild the head tiers from the epoch's maps (or install *head*, already built
        from them by a retain job). Runtime complexity: O(H log H) when it builds."""
        nw = len(ep.windows)
        if head is None:
            head = self._epoch_all(ep, nw) if nw else Columns.empty()
        self._head = head
        self._recent = Columns.empty()
        self._recent_from = nw
        self._pend = []
        self._pend_from = nw
        self._pend_in = 0

    def _seal_window(self, k: int, hi: int) -> None:
        """Seal the first ``k`` live entries as the window ``(lo, hi]``.

        The new window's flat deltas are spliced into ``_recent`` (O(recent) copies, the
        windows since the last big splice); every ``_RECENT_WINDOWS`` windows and at each
        full map ``_recent`` moves into ``_head`` — the only O(H) step. Every f windows the
        level-1 map is the overlay of the f windows' flat deltas kept since (no re-read
        and re-merge of the L0 files).
        """
        ep = self._epochs[-1]
        lo = ep.his[-1] if ep.his else ep.rewind_seq
        live = self._live()
        l0 = build_l0(lo, hi, Columns(*(a[:k].copy() for a in live)))
        ref = self._store.put("L", 0, l0)
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
                lst.append(self._store.put("L", 1, l1.map))
                continue
            below = ep.windows if k == 1 else ep.levels[k - 1]
            res = merge([r.load() for r in below[j * f : (j + 1) * f]])
            self.dropped_bytes_total += res.dropped_bytes
            lst.append(self._store.put("L", k, res.map))
            if self.on_merge is not None:
                self.on_merge(f"L{k}", res)
        if full_due:
            full = DeltaMap(ep.rewind_seq, l0.hi, self._head, flat=True)
            ep.fulls[nw] = self._store.put("F", 0, full)
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

    def _decompose_down(self, ep: _Epoch, wc: int) -> Iterator[MapRef]:
        """Maps covering windows ``[0, wc)`` newest first: Fenwick blocks, then a full map."""
        i = bisect_right(ep.full_keys, wc) - 1
        base = ep.full_keys[i] if i >= 0 else 0
        pos = wc
        f = self._f
        while pos > base:
            for k in range(self._maxk, -1, -1):
                size = f**k
                if pos % size or pos - size < base:
                    continue
                if k == 0:
                    yield ep.windows[pos - 1]
                    break
                lst = ep.levels.get(k)
                j = pos // size - 1
                if lst is not None and j < len(lst):
                    yield lst[j]
                    break
            pos -= size
        if base:
            yield ep.fulls[base]

    def _decompose_up(self, ep: _Epoch, a: int, b: int) -> Iterator[MapRef]:
        """Maps covering windows ``[a, b)`` exactly (any order)."""
        pos = a
        f = self._f
        while pos < b:
            for k in range(self._maxk, -1, -1):
                size = f**k
                if pos % size or pos + size > b:
                    continue
                if k == 0:
                    yield ep.windows[pos]
                    break
                lst = ep.levels.get(k)
                j = pos // size
                if lst is not None and j < len(lst):
                    yield lst[j]
                    break
            pos += size

    # The live window's index. Slots are positions in the live arrays (seq order). Level L
    # of ``_lix`` maps ``offset >> (16 + 4·L)`` to the slots of the entries touching that
    # bucket; an entry goes to the lowest level where it touches at most two buckets (the
    # top level takes anything), so a small range visits one or two buckets per used level.
    # The index is brought up to date lazily (at query time) for the slots appended since,
    # and restarted whenever the live arrays shift (partial seal) or empty (seal).

    def _lix_reset(self) -> None:
        used = self._lix_used
        for lvl in range(_LIX_LEVELS):
            if used >> lvl & 1:
                self._lix[lvl].clear()
        self._lix_used = 0
        self._lix_n = 0

    def _lix_sync(self) -> None:
        """Index live slots ``[_lix_n, _ln)``. Amortised O(1) per live entry."""
        n = self._ln
        k = self._lix_n
        if k and (k > n or self._lq.item(0) != self._lix_first):
            self._lix_reset()  # the live arrays shifted under the index
            k = 0
        if k >= n:
            return
        if k == 0:
            self._lix_first = self._lq.item(0)
        lix = self._lix
        used = self._lix_used
        top = _LIX_LEVELS - 1
        for i, s, e in zip(
            range(k, n), self._ls[k:n].tolist(), self._le[k:n].tolist(), strict=True
        ):
            e -= 1
            sh = 16
            lvl = 0
            while (e >> sh) - (s >> sh) > 1 and lvl < top:
                sh += 4
                lvl += 1
            d = lix[lvl]
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
        self._lix_used = used
        self._lix_n = n

    def _live_slots(self, a: int, b: int) -> list[int] | None:
        """Sorted live slots whose buckets touch ``[a, b)`` (a superset of the entries
        intersecting it); None when the range spans so many buckets that a vectorised
        scan of the whole live window is cheaper.

        Runtime complexity: O(levels used + k) for k slots returned.
        """
        if b - a > _LIX_SCAN << 16:
            return None  # wide: scan (and leave indexing to the next small read)
        self._lix_sync()
        used = self._lix_used
        out: list[int] = []
        b -= 1
        budget = _LIX_SCAN
        lvl = 0
        sh = 16
        lix = self._lix
        while used:
            if used & 1:
                lo = a >> sh
                hi = b >> sh
                budget -= hi - lo + 1
                if budget < 0:
                    return None
                d = lix[lvl]
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

    def _live_query(self, lo: int, hi: int) -> Callable[[int, int], Columns]:
        def q(a: int, b: int) -> Columns:
            n = self._ln
            cand = self._live_slots(a, b) if n else None
            if cand is None:
                s, e, sq, ll = self._ls[:n], self._le[:n], self._lq[:n], self._ll[:n]
            else:
                ci = np.array(cand, np.int64)
                s, e, sq, ll = self._ls[ci], self._le[ci], self._lq[ci], self._ll[ci]
            m = (s < b) & (e > a)
            if lo > 0:
                m &= sq > lo
            if hi < self._last_seq:
                m &= sq <= hi
            idx = np.flatnonzero(m)
            return Columns(s[idx], e[idx], sq[idx], ll[idx], np.zeros(idx.shape[0], np.int64))

        return q

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
        if self._ln:
            cand = self._live_slots(a, b)
            if cand is None:
                return None
            if cand:
                ls, le = self._ls.item, self._le.item
                for i in reversed(cand):  # newest first
                    s = ls(i)
                    e = le(i)
                    if s < b and e > a:
                        if s <= a and e >= b:
                            return Extent(a, b, self._lq.item(i), self._ll.item(i), a - s)
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
            if self._ln and x > self._sealed_seq:
                yield self._live_query(0, x), False
            recent, head = self._recent, self._head
            if recent.n:
                yield (lambda a, b: _flat_query(recent, a, b)), True
            yield (lambda a, b: _flat_query(head, a, b)), True
            return
        wc = bisect_right(ep.his, x)
        if wc < len(ep.his) and ep.lo_of(wc) < x:
            yield self._filtered(ep.windows[wc], -1, x), False
        for r in _decompose_down_list(self, ep, wc):
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
        """:meth:`resolve` as numpy columns (for large ranges). Runtime complexity: as resolve."""
        ex = self.resolve(seq, start, end)
        if not ex:
            return Columns.empty()
        return Columns.from_lists(*zip(*ex, strict=True))

    # ------------------------------------------------------------------ diff

    def changed(
        self, seq_a: int, seq_b: int, start: int = 0, end: int | None = None
    ) -> list[tuple[int, int]]:
        """Sorted, merged ranges inside ``[start, end)`` whose content may differ between
        points ``seq_a`` and ``seq_b`` (either order).

        The union of the window maps between the points; across a rewind ``R -> S``:
        ``changed(a, S) | writes in (R, b]``, recursively.

        Runtime complexity: O(f·log n) map lookups + O(c log c) for c entries changed
        between the points inside the range — independent of volume size.
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
        if ei == len(self._epochs) - 1 and hi > self._sealed_seq and self._ln:
            parts.append(self._live_query(lo, hi)(a, b))
        wa = bisect_right(ep.his, lo)  # first window reaching past lo
        wb = bisect_right(ep.his, hi)  # windows [0, wb) end at or before hi
        first_full = wa
        if wa < nw and ep.lo_of(wa) < lo:
            parts.append(self._filtered(ep.windows[wa], lo, hi)(a, b))
            first_full = wa + 1
        if wb < nw and ep.lo_of(wb) < hi and wb >= first_full:
            parts.append(self._filtered(ep.windows[wb], lo, hi)(a, b))
        for r in self._decompose_up(ep, first_full, wb):
            parts.append(r.query(a, b))

    # ------------------------------------------------------------------ whole maps

    def _epoch_all(self, ep: _Epoch, wc: int) -> Columns:
        """Flat deltas of windows ``[0, wc)`` of an epoch (newest wins)."""
        layers: list[Columns] = []
        for r in _decompose_down_list(self, ep, wc):
            m = r.load()
            layers.append(m.cols if m.flat else flatten(m.cols, want_dropped=False)[0])
        return overlay(layers, want_dropped=False)[0]

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
        job = RetainJob(self, ka, need, f"-r{self._retain_gen + 1}",
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
                old_refs.extend(_all_refs(self._epochs[ei]))
                new_refs.extend(_all_refs(new))
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
        keep = {id(r) for ep in self._epochs for r in _all_refs(ep)}
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

    def _retain_epoch(self, job: RetainJob, ei: int, ep: _Epoch, nxt: int,
                      last_epoch: bool) -> None:
        """Build the rewrite of epoch ``ei``'s windows ending at or before ``ka`` into a
        new epoch object (``job.new_epochs``); the installed one is not touched."""
        ka, need, tag = job.ka, job.need, job.tag
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
        job.drops.extend(ep_drops)
        put = self._store.put
        windows = [put("L", 0, m, tag, False) for m in new_maps] + ep.windows[k_cut:]
        new = _Epoch(ep.rewind_seq, ep.target, windows, [r.hi for r in windows])
        f = self._f
        n = len(windows)
        for k in range(1, self._maxk + 1):
            size = f**k
            if n < size:
                break
            below = windows if k == 1 else new.levels[k - 1]
            lst = new.levels.setdefault(k, [])
            for j in range(n // size):
                res = merge([r.load() for r in below[j * f : (j + 1) * f]])
                lst.append(put("L", k, res.map, tag, False))
        fe = self.policy.full_every
        if fe:
            for b in range(fe, n + 1, fe):
                full = DeltaMap(new.rewind_seq, new.his[b - 1], self._epoch_all(new, b), flat=True)
                new.fulls[b] = put("F", 0, full, tag, False)
                new.full_keys.append(b)
        if last_epoch:
            job.head = self._epoch_all(new, n)
        job.new_epochs[ei] = new

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
        if self._ln:
            c = self._live()
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
            "live_entries": self._ln,
            "disk_bytes": self._store.disk_bytes(),
            "cache_bytes": self._store.cache_bytes(),
            "last_seq": self._last_seq,
            "sealed_seq": self._sealed_seq,
        }

    def close(self) -> None:
        """Release files and caches. Unsealed writes are not persisted (replay them).

        Runtime complexity: O(1).
        """
        self._store.close()

    def __enter__(self) -> MapHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, deep: bool = True) -> None:
        """Assert every invariant (tests call it after mutations).

        Runtime complexity: O(total entries) (+ a full resolve at the head when ``deep``).
        """
        assert self._sealed_seq <= self._last_seq
        assert self._rewinds == [e.rewind_seq for e in self._epochs]
        assert self._rewinds == sorted(set(self._rewinds))
        assert 0 <= self._ln <= self._ls.shape[0]
        if self._ln:
            lq = self._lq[: self._ln]
            assert (np.diff(lq) > 0).all()
            assert lq[0] > self._sealed_seq and lq[-1] <= self._last_seq
        self._check_lix()
        f = self._f
        for ei, ep in enumerate(self._epochs):
            nxt = self._rewinds[ei + 1] if ei + 1 < len(self._epochs) else self._sealed_seq
            assert ep.target < ep.rewind_seq
            prev = ep.rewind_seq
            for w, r in enumerate(ep.windows):
                assert r.lo == prev and r.hi > r.lo and ep.his[w] == r.hi
                prev = r.hi
                if deep:
                    m = r.load()
                    m._check()
                    assert not m.flat
                    _check_ref_filter(r, m)
            assert prev <= nxt
            for k, lst in ep.levels.items():
                size = f**k
                assert 1 <= k <= self._maxk
                assert len(lst) == len(ep.windows) // size
                for j, r in enumerate(lst):
                    assert r.lo == ep.lo_of(j * size) and r.hi == ep.his[(j + 1) * size - 1]
                    if deep:
                        m = r.load()
                        m._check()
                        assert m.flat
                        _check_ref_filter(r, m)
            assert ep.full_keys == sorted(ep.fulls)
            for b, r in ep.fulls.items():
                assert 0 < b <= len(ep.windows)
                assert r.lo == ep.rewind_seq and r.hi == ep.his[b - 1]
                if deep:
                    r.load()._check()
        last = self._epochs[-1]
        for tier in (self._recent, self._head):
            DeltaMap(
                last.rewind_seq, max(self._sealed_seq, last.rewind_seq), tier, flat=True
            )._check()
        nw = len(last.windows)
        assert 0 <= self._recent_from <= nw and nw - self._recent_from < _RECENT_WINDOWS
        assert 0 <= self._pend_from <= nw and nw - self._pend_from < max(f, 2)
        assert len(self._pend) == nw - self._pend_from and self._pend_in >= 0
        if deep:
            ep = last
            want = self._epoch_all(ep, nw)
            have = overlay([self._recent, self._head], want_dropped=False)[0]
            assert all(np.array_equal(x, y) for x, y in zip(want, have, strict=True)), (
                "head differs from the epoch's maps"
            )
            flats = [
                flatten(ep.windows[w].load().cols, want_dropped=False)[0]
                for w in range(self._recent_from, nw)
            ]
            rec = overlay(flats[::-1], want_dropped=False)[0]
            assert all(np.array_equal(x, y) for x, y in zip(rec, self._recent, strict=True)), (
                "recent tier differs from its windows"
            )
            # _pend holds the flat deltas of windows [_pend_from, nw): the next L1 map
            for w, p in zip(range(self._pend_from, nw), self._pend, strict=True):
                fw = flats[w - self._recent_from] if w >= self._recent_from else flatten(
                    ep.windows[w].load().cols, want_dropped=False
                )[0]
                assert all(np.array_equal(x, y) for x, y in zip(fw, p, strict=True))
            assert self._pend_in == sum(
                _data_bytes(ep.windows[w].load().cols) for w in range(self._pend_from, nw)
            )
            if self._head.n:
                a = int(self._head.start[0])
                b = int(self._head.end[-1])
                got = self.resolve(self._last_seq, a, b)
                assert got[0].start == a and got[-1].end == b
                for i in range(1, len(got)):
                    assert got[i - 1].end == got[i].start

    def _check_lix(self) -> None:
        """Invariants of the live index: after a sync every live slot sits exactly in the
        buckets it touches at its level, and nothing else is indexed."""
        self._lix_sync()
        n = self._ln
        assert self._lix_n == n
        want: dict[tuple[int, int], list[int]] = {}
        for i, s, e in zip(range(n), self._ls[:n].tolist(), self._le[:n].tolist(), strict=True):
            assert e > s
            sh, lvl = 16, 0
            while ((e - 1) >> sh) - (s >> sh) > 1 and lvl < _LIX_LEVELS - 1:
                sh += 4
                lvl += 1
            for bk in range(s >> sh, ((e - 1) >> sh) + 1):
                want.setdefault((lvl, bk), []).append(i)
        have = {
            (lvl, bk): lst for lvl, d in enumerate(self._lix) for bk, lst in d.items()
        }
        assert have == want, "live index out of step with the live window"
        for lvl, d in enumerate(self._lix):
            assert bool(d) == bool(self._lix_used >> lvl & 1)
        if n:
            assert self._lix_first == int(self._lq[0])
        # the index answers like a scan
        for i in range(0, n, max(1, n // 16)):
            a, b = int(self._ls[i]), int(self._le[i])
            slots = self._live_slots(a, b)
            if slots is not None:
                hit = set(np.flatnonzero((self._ls[:n] < b) & (self._le[:n] > a)).tolist())
                assert hit <= set(slots)


def _check_ref_filter(r: MapRef, m: DeltaMap) -> None:
    chk = getattr(r, "check_filter", None)
    if chk is not None:
        chk(m.cols)


def _all_refs(ep: _Epoch) -> list[MapRef]:
    out: list[MapRef] = list(ep.windows)
    for lst in ep.levels.values():
        out.extend(lst)
    out.extend(ep.fulls.values())
    return out


def _decompose_down_list(h: MapHistory, ep: _Epoch, wc: int) -> Iterator[MapRef]:
    return h._decompose_down(ep, wc)


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
    """
    if head.n == 0:
        return new
    if new.n == 0:
        return head
    n = head.n
    i0 = np.searchsorted(head.end, new.start, side="right")
    i1 = np.searchsorted(head.start, new.end, side="left")
    hit = i1 > i0
    mark = np.zeros(n + 1, np.int64)
    np.add.at(mark, i0[hit], 1)
    np.add.at(mark, i1[hit], -1)
    aff = np.cumsum(mark[:-1]) > 0
    merged, _ = overlay([new, head.take(aff)], want_dropped=False)
    keep = head.take(~aff)
    pos = np.searchsorted(keep.start, merged.start)
    return Columns(*(np.insert(k, pos, m) for k, m in zip(keep, merged, strict=True)))


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
    if not flat:
        cand = flatten(cand, want_dropped=False)[0]
    g = np.asarray(gaps, np.int64).reshape(-1, 2)
    gs, ge = g[:, 0], g[:, 1]
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
    out.extend(
        Columns(
            ps, nxt[take], cand.seq[ti], cand.loc[ti], shifted(cand.poff[ti], cand.start[ti], ps)
        ).extents()
    )
    rem = ing & ~inc
    return union_ranges(cut[rem], nxt[rem])


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
