"""The shape of the hierarchy: :class:`MergePolicy`, one rewind :class:`Epoch` of maps,
and the walks over an epoch's windows, merged levels and full maps.

Both the history (:mod:`mapengine.history`: seal, resolve, changed) and a retain job
(:mod:`mapengine.retain`: rebuilding the levels and full maps of a rewritten epoch) walk
epochs, so they live here, below both.

Levels are Fenwick blocks: the level-``k`` map ``j`` covers windows
``[j·f**k, (j+1)·f**k)`` of its epoch, and a full map at window boundary ``b`` covers
``[0, b)``. Any prefix ``[0, wc)`` of the windows is then the nearest full map plus at
most ``(f-1)`` maps per level, and any span ``[a, b)`` at most ``2·(f-1)`` per level.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field

from .core import Columns, flatten, overlay
from .errors import MapUsageError
from .storage import MapRef

__all__ = ["Epoch", "MergePolicy", "decompose_down", "decompose_up", "flat_upto"]


@dataclass(frozen=True)
class MergePolicy:
    """How windows are cut and merged.

    * ``l0_max_writes``: ``add_*`` returns True once the live window holds this many
      entries (the caller should then :meth:`~mapengine.history.MapHistory.seal`).
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


@dataclass
class Epoch:
    """The maps of one rewind epoch (the writes after ``rewind_seq``), epoch-relative."""

    rewind_seq: int  # R: state(R) == state(target); 0 for the first epoch
    target: int  # S; -1 for the first epoch (no base: holes)
    windows: list[MapRef] = field(default_factory=list)
    his: list[int] = field(default_factory=list)  # hi seq of each window
    levels: dict[int, list[MapRef]] = field(default_factory=dict)  # level k>=1
    fulls: dict[int, MapRef] = field(default_factory=dict)  # window boundary -> full map
    full_keys: list[int] = field(default_factory=list)  # sorted boundaries

    def lo_of(self, w: int) -> int:
        """The seq window ``w`` starts after."""
        return self.his[w - 1] if w else self.rewind_seq

    def refs(self) -> list[MapRef]:
        """Every map of the epoch: windows, levels, full maps."""
        out: list[MapRef] = list(self.windows)
        for lst in self.levels.values():
            out.extend(lst)
        out.extend(self.fulls.values())
        return out


def decompose_down(ep: Epoch, wc: int, f: int, maxk: int) -> Iterator[MapRef]:
    """Maps covering windows ``[0, wc)`` newest first: Fenwick blocks, then a full map.

    ``f`` is the fanout and ``maxk`` the highest level built. Runtime complexity:
    O(f·log_f(full_every)) maps.
    """
    i = bisect_right(ep.full_keys, wc) - 1
    base = ep.full_keys[i] if i >= 0 else 0
    pos = wc
    while pos > base:
        for k in range(maxk, -1, -1):
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


def decompose_up(ep: Epoch, a: int, b: int, f: int, maxk: int) -> Iterator[MapRef]:
    """Maps covering windows ``[a, b)`` exactly (any order). Runtime complexity:
    O(f·log_f(b - a)) maps."""
    pos = a
    while pos < b:
        for k in range(maxk, -1, -1):
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


def flat_upto(ep: Epoch, wc: int, f: int, maxk: int) -> Columns:
    """Flat deltas of windows ``[0, wc)`` of an epoch (newest wins).

    Runtime complexity: O(N log N) for the N entries of the maps of
    :func:`decompose_down` (each is loaded whole).
    """
    layers: list[Columns] = []
    for r in decompose_down(ep, wc, f, maxk):
        m = r.load()
        layers.append(m.cols if m.flat else flatten(m.cols, want_dropped=False)[0])
    return overlay(layers, want_dropped=False)[0]
