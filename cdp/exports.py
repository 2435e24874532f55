"""Block devices over volumes, and the export names the targets (NBD and iSCSI) see.

Export names: ``VOLUME`` is the live, writable volume; ``VOLUME@POINT`` a read-only view
of it at POINT (``vol0@marker17``, ``vol0@before-upgrade``, ``vol0@@123456``,
``vol0@2024-05-01T10:00:00``). A point given as a time or a relative time is resolved
once, when the export is opened: the view does not move while a client reads it.

Metadata contexts: ``base:allocation``, and ``x-cdp:changed:POINT`` (any point, e.g.
``x-cdp:changed:marker3``): BLOCK_STATUS flag 1 marks the ranges that changed between
POINT and the export's own point (the live export: now), like ``qemu:dirty-bitmap:NAME``.
Listing (NBD_OPT_LIST_META_CONTEXT, live and point-in-time exports alike): the empty
query lists ``base:allocation``, one ``x-cdp:changed:markerN`` per marker whose point
is still kept, then ``x-cdp:changed:`` itself; the query ``x-cdp:`` or
``x-cdp:changed:`` lists the same changed contexts. The trailing ``x-cdp:changed:`` is
the namespace entry the spec allows for names a client computes (``@SEQ``, a label, a
time): it tells the client that any point may follow and is never selected itself.

Alignment: an export takes any offset and length (NBD minimum block size 1), except a
proxy volume whose primary needs aligned requests (an NBD primary that advertises a
larger minimum block size): its live export advertises that minimum (a file or block
device primary is written through the page cache and needs none).

Design notes
------------
- ``base:allocation`` answers come in whole 512-byte sectors: a sector holding any
  data byte is reported as data, only sectors with none are HOLE|ZERO. The volume knows
  its extents to the byte, but with a minimum block size of 1 qemu's NBD client passes
  extents on unrounded and ``qemu-img convert`` / ``compare`` work in sectors: a
  1-byte zero extent at the start of a sector made them treat the whole sector as zero
  and drop the data behind it (found by test_nbd_unaligned). Reporting data where
  there are zeros is always allowed; the ``x-cdp:changed`` runs are widened the same
  way (:func:`cdp.backup.changes.status_runs`).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from cdp.backup.changes import status_runs
from cdp.errors import CdpError, ReadOnly
from cdp.journal import NotLocal
from cdp.points import split_export_name
from cdp.replication.role import load_role
from cdp.targets.nbd.proto import StateFlag

if TYPE_CHECKING:
    from cdp.store import Store
    from cdp.volume import Volume

BASE_ALLOCATION = "base:allocation"
CDP_NAMESPACE = "x-cdp:"
CHANGED_PREFIX = "x-cdp:changed:"
#: the most bytes one BLOCK_STATUS answer of a changed context covers (clients ask on)
CHANGED_SPAN = 1 << 30
#: the most bytes one ``base:allocation`` answer covers (clients ask again for the rest)
ALLOCATION_SPAN = 64 << 20
#: ``base:allocation`` granularity: a sector with any data in it is data (design notes)
ALLOCATION_GRAIN = 512
_HOLE_ZERO = int(StateFlag.HOLE | StateFlag.ZERO)


def sector_runs(runs: list[tuple[int, int]], offset: int, grain: int = ALLOCATION_GRAIN
                ) -> list[tuple[int, int]]:
    """``base:allocation`` runs from ``offset`` (flags 0: data, else HOLE|ZERO) with
    every data run widened to whole ``grain``-byte sectors, clipped to the runs' span;
    the hole runs keep what is left. Cost: O(runs)."""
    end = offset
    data: list[list[int]] = []  # widened data intervals, merged, in order
    for n, flags in runs:
        s, end = end, end + n
        if flags & _HOLE_ZERO:
            continue
        s -= s % grain
        if data and s <= data[-1][1]:
            data[-1][1] = max(data[-1][1], end)
        else:
            data.append([max(s, offset), end])
    out: list[tuple[int, int]] = []
    pos = offset
    for s, e in data:
        e = min(-(-e // grain) * grain, end)
        if e <= pos:
            continue
        s = max(s, pos)
        if s > pos:
            out.append((s - pos, _HOLE_ZERO))
        if out and out[-1][1] == 0:
            out[-1] = (out[-1][0] + e - s, 0)
        else:
            out.append((e - s, 0))
        pos = e
    if pos < end:
        out.append((end - pos, _HOLE_ZERO))
    return out


class VolumeDevice:
    """The live volume as a writable block device."""

    read_only = False
    can_multi_conn = True  # one journal: a flush on any connection covers every write

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.size = volume.size
        self.description = f"cdp volume {volume.name} (live)"
        self.min_block_size = _primary_min_block(volume)
        volume.connections += 1
        self._closed = False
        self._changed_seqs: dict[str, int] = {}

    def read(self, offset: int, length: int) -> bytes | Awaitable[bytes]:
        try:
            return self.volume.read(offset, length)
        except NotLocal:  # tiered history: fetch, then read (costs nothing when local)
            return self.volume.read_async(offset, length)

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> Awaitable[None] | None:
        return self.volume.write(offset, data, fua)

    def flush(self) -> Awaitable[None]:
        return self.volume.flush()

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None] | None:
        return self.volume.zero(offset, length, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool
    ) -> Awaitable[None] | None:
        # zeroing is always metadata here (a ZERO record), so FAST_ZERO is honoured
        return self.volume.zero(offset, length, fua)

    def cache(self, offset: int, length: int) -> None:
        return None

    def meta_contexts(self) -> list[str]:
        """Every context a client may select, for the empty listing query (see the
        module docstring). Cost: O(markers)."""
        return [BASE_ALLOCATION, *self._changed_listing()]

    def _changed_listing(self) -> list[str]:
        """``x-cdp:changed:markerN`` per marker still resolvable, then the namespace
        entry ``x-cdp:changed:``."""
        maps = self.volume.maps
        names = [CHANGED_PREFIX + m.name for m in self.volume.markers if maps.resolvable(m.seq)]
        names.append(CHANGED_PREFIX)
        return names

    def match_meta_contexts(self, query: str, listing: bool) -> list[str]:
        """``base:allocation`` and ``x-cdp:changed:POINT`` (selected when POINT resolves;
        the seq is fixed here, at negotiation). Listing ``x-cdp:`` or ``x-cdp:changed:``
        names one changed context per kept marker and the namespace entry. Cost: a
        point resolve; a listing O(markers)."""
        if query == BASE_ALLOCATION:
            return [BASE_ALLOCATION]
        if listing and query.endswith(":") and BASE_ALLOCATION.startswith(query):
            return [BASE_ALLOCATION]
        if listing and query in (CDP_NAMESPACE, CHANGED_PREFIX):
            return self._changed_listing()
        if query.startswith(CHANGED_PREFIX) and len(query) > len(CHANGED_PREFIX):
            try:
                self._changed_seq(query)
            except CdpError:
                return []
            return [query]
        return []

    def _changed_seq(self, context: str) -> int:
        seq = self._changed_seqs.get(context)
        if seq is None:
            seq = self._changed_seqs[context] = self.volume.resolve_point(context[len(CHANGED_PREFIX):])
        return seq

    def _point_seq(self) -> int:
        return self.volume.head_seq

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        if context.startswith(CHANGED_PREFIX):
            return status_runs(self.volume, self._changed_seq(context), self._point_seq(),
                               offset, min(length, CHANGED_SPAN))
        n = min(length, ALLOCATION_SPAN)
        return sector_runs(self.volume.block_status(offset, n), offset)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.volume.connections -= 1


class ReplicaDevice(VolumeDevice):
    """The live volume of a replica (docs/REPLICATION.md): it follows the stream and is
    read-only to hosts (a host write would make it diverge from its source), until a
    failover makes it a primary."""

    read_only = True

    def __init__(self, volume: Volume) -> None:
        super().__init__(volume)
        self.description = f"cdp volume {volume.name} (replica, read-only)"


class PointInTimeDevice(VolumeDevice):
    """A read-only view of a volume at a fixed seq."""

    read_only = True

    def __init__(self, volume: Volume, seq: int, point: str) -> None:
        super().__init__(volume)
        self.seq = seq
        self.min_block_size = 1  # read from the journal, never from a primary
        self.description = f"cdp volume {volume.name} at {point} (@{seq}, read-only)"

    def read(self, offset: int, length: int) -> bytes | Awaitable[bytes]:
        try:
            return self.volume.read(offset, length, self.seq)
        except NotLocal:  # tiered history: fetch, then read (costs nothing when local)
            return self.volume.read_async(offset, length, self.seq)

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        raise ReadOnly(f"{self.description}: writes are refused")

    def flush(self) -> None:  # type: ignore[override]
        return None

    def trim(self, offset: int, length: int, fua: bool) -> None:
        raise ReadOnly(f"{self.description}: writes are refused")

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool
    ) -> None:
        raise ReadOnly(f"{self.description}: writes are refused")

    def _point_seq(self) -> int:
        return self.seq

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        if context != BASE_ALLOCATION:
            return super().block_status(context, offset, length)
        n = min(length, ALLOCATION_SPAN)
        return sector_runs(self.volume.block_status(offset, n, self.seq), offset)


def _primary_min_block(volume: Volume) -> int:
    """1, or the minimum block size a proxy volume's primary needs (``min_block`` of
    :mod:`cdp.proxy_nbd`'s primaries: an NBD primary's advertised minimum)."""
    primary = getattr(volume, "primary", None)  # proxy volumes only
    return int(getattr(primary, "min_block", 1))


class StoreExports:
    """The :class:`~cdp.targets.blockdev.ExportProvider` of a store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def list_exports(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name in sorted(self.store.volumes):
            v = self.store.volumes[name]
            out.append((name, f"cdp volume {name} (live, {v.size} bytes)"))
            for m in v.markers:
                label = f" {m.label!r}" if m.label else ""
                out.append((f"{name}@{m.name}", f"read-only view at {m.name}{label} (@{m.seq})"))
        return out

    def open_export(self, name: str) -> VolumeDevice:
        vol_name, point = split_export_name(name)
        if not name:
            vol_name = None  # type: ignore[assignment]  # default export: the only volume
        vol = self.store.volume(vol_name)
        if point is None:
            if load_role(vol).role == "replica":
                return ReplicaDevice(vol)  # only the replication stream writes a replica
            return VolumeDevice(vol)
        seq = vol.resolve_point(point)
        return PointInTimeDevice(vol, seq, point)
