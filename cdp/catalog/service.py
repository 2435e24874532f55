"""The marker hook: every marker of a volume updates its file catalog in the background.

Design notes
------------
* :func:`attach_catalog` attaches a :class:`CatalogService` to the volume (a
  :class:`~cdp.volume.VolumeService`; only ``on_marker`` is overridden). The hook only
  queues the marker; one task per volume drains the queue in marker order on the
  daemon's event loop, in chunks of ~1000 records with ``await asyncio.sleep(0)``
  between them (the Volume is not thread-safe, so there is no worker thread). Ingest
  keeps flowing; a version appears in the catalog when its single transaction commits.
* Markers taken while the daemon was down (or before the catalog existed) are caught
  up when the service is attached on a running loop, or, attached with ``hold`` (cdpd:
  the store opens before NBD listens), at the first :meth:`CatalogService.catch_up`:
  until then markers are queued, none is catalogued, so none is catalogued before an
  older one.
* The parser modules (the database, the indexer with its NTFS and ext4 parsers: ~0.1 s
  of imports) load at the first catalog work, not with this module: attaching a
  service costs cdpd's start nothing (issue 27, restart time).
* A failure (damaged journal bytes, a bug) is logged and that marker is skipped; the
  next marker diffs against the last catalogued one, so nothing is lost.
* History the S3 tier dropped locally: the computation reads synchronously on the
  loop; :func:`fetching` runs it again after each miss, and :func:`prefetcher` lets
  each of its steps fetch, before it reads, every record it is about to need (the
  maps' extents of those bytes, :func:`~cdp.journal.tiered.missing_records`): a
  marker's diff costs a few rounds of coalesced GETs, not one round per record.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from cdp.journal import NotLocal
from cdp.journal.tiered import missing_records, prefetch_limit
from cdp.markers import Marker
from cdp.volume import READ_FETCHES, Volume, VolumeService

if TYPE_CHECKING:  # imported where the work starts (module docstring)
    from cdp.catalog.db import Catalog, Version
    from cdp.catalog.indexer import Computed, Prefetch, View

T = TypeVar("T")

log = logging.getLogger("cdp.catalog")

_services: weakref.WeakKeyDictionary[Volume, CatalogService] = weakref.WeakKeyDictionary()


class CatalogService(VolumeService):
    """The catalog of one volume and its background indexer."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self._catalog: Catalog | None = None
        self._pending: list[Marker] = []
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.last_result: dict[str, Any] | None = None
        #: markers are queued but not catalogued until catch_up() (attach_catalog's hold)
        self.held = False
        #: called (on the loop) after each marker's version commits: ``hook(before, after)``,
        #: the views of the version it was diffed against (None for a full index) and of
        #: the new one
        self.version_hooks: list[Callable[[View | None, View], None]] = []

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            from cdp.catalog.db import CATALOG_FILE, Catalog

            self._catalog = Catalog(self.volume.path / CATALOG_FILE)
        return self._catalog

    # ------------------------------------------------------------------ scheduling

    def on_marker(self, vol: Volume, marker: Marker) -> None:
        """Service hook (on the event loop): queue the marker. O(1)."""
        self._pending.append(marker)
        self._kick()

    def catch_up(self) -> int:
        """Queue every marker newer than the last catalogued one and start cataloguing
        (ends a hold); returns how many. Cost: opens the catalog database."""
        self.held = False
        last = self.catalog.last_version()
        todo = [m for m in self.volume.markers if last is None or m.id > last.version]
        known = {m.id for m in self._pending}
        self._pending.extend(m for m in todo if m.id not in known)
        self._pending.sort(key=lambda m: m.id)
        if self._pending:
            self._kick()
        return len(todo)

    def _kick(self) -> None:
        if self.held:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._pending:
            m = self._pending.pop(0)
            try:
                await self.catalog_marker(m)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.last_error = f"{m.name}: {e}"
                log.exception("volume %s: file catalog of %s failed", self.volume.name, m.name)

    async def idle(self) -> None:
        """Wait until every queued marker is catalogued."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    # ------------------------------------------------------------------ work

    async def catalog_marker(self, m: Marker) -> Computed | None:
        """Catalog marker *m*: an MFT diff against the newest catalogued marker (a full
        index for the first one). Returns None if *m* is already catalogued."""
        from cdp.catalog.indexer import View, compute, gc_paused, persist

        cat = self.catalog
        base = cat.last_version()
        if base is not None and (base.version >= m.id or base.seq > m.seq):
            return None
        vol = self.volume
        with gc_paused():  # across both: the computed plan lives until it is written
            c = await fetching(vol, lambda: compute(reader_at(vol, m.seq), vol.size, cat, base,
                                                    changed_to(vol, m.seq), m.time_ns,
                                                    prefetch=prefetcher(vol, m.seq)))
            await persist(cat, c, m.id, m.seq, m.time_ns)
        self.last_result = {"marker": m.name, "kind": c.kind, "parsed": c.parsed,
                            "seconds": round(c.seconds, 4)}
        log.info("volume %s: catalogued %s (%s, %d records parsed, %.3f s)",
                 vol.name, m.name, c.kind, c.parsed, c.seconds)
        for hook in self.version_hooks:
            try:
                hook(None if base is None else View(cat, base.version, seq=base.seq),
                     View(cat, m.id, seq=m.seq))
            except Exception:
                log.exception("volume %s: a catalog version hook failed", vol.name)
        return c

    async def view(self, point: str) -> View:
        """The catalog as of *point*: a catalogued marker straight from the catalog,
        any other point as an overlay computed from the nearest earlier catalogued
        marker (nothing persisted). Cost: O(records changed since that marker)."""
        from cdp.catalog.indexer import View, compute

        vol = self.volume
        seq = vol.resolve_point(point)
        cat = self.catalog
        versions = cat.versions()
        for v in versions:
            if v.seq == seq:
                return View(cat, v.version, seq=seq)
        base: Version | None = None
        for v in versions:
            if v.seq <= seq and (base is None or v.seq > base.seq):
                base = v
        when = vol.journal.time_of_seq(seq) if seq else 0
        c = await fetching(vol, lambda: compute(reader_at(vol, seq), vol.size, cat, base,
                                                changed_to(vol, seq), when,
                                                prefetch=prefetcher(vol, seq)))
        return View(cat, base.version if base else None, c, seq=seq)

    async def head_views(self) -> tuple[View, View] | None:
        """(the newest catalogued marker's view, a view at the newest write), once the
        queued markers are catalogued; None before the first. Cost: :meth:`view`."""
        from cdp.catalog.indexer import View

        await self.idle()
        base = self.catalog.last_version()
        if base is None:
            return None
        head = await self.view(f"@{self.volume.journal.last_seq}")
        return View(self.catalog, base.version, seq=base.seq), head


async def fetching(vol: Volume, run: Callable[[], Awaitable[T]]) -> T:
    """``await run()``, a computation that reads *vol* synchronously; when it needs
    records that only the S3 tier holds (NotLocal), fetch them into the journal's read
    cache (``journal.remote``) and run it again. Each attempt gets further, since fetched
    records stay cached (up to ``local_cache_bytes``). Cost: one attempt per missing
    record the computation did not prefetch (:func:`prefetcher`); nothing when
    everything is local."""
    for _ in range(READ_FETCHES):
        try:
            return await run()
        except NotLocal as e:
            remote = vol.journal.remote
            if remote is None or not e.ranges:
                raise
            await remote(e.ranges)
    raise NotLocal(f"volume {vol.name}: more than {READ_FETCHES} fetches from the tier "
                   "for one catalog run (is local_cache_bytes too small?)")


def prefetcher(vol: Volume, seq: int) -> Prefetch | None:
    """The catalog computation's *prefetch* for *vol* as of *seq*: fetch, in one call
    of ``journal.remote`` (coalesced GETs), the records of dropped segments that
    reading the given volume byte ranges needs and the read cache lacks (up to half
    the cache). None without a tier fetcher or dropped history (segments dropped
    later are met as misses, and the rerun gets a prefetch). Cost: one map resolve
    of the ranges plus the fetch."""
    j = vol.journal
    if j.remote is None or not j.dropped_segments():
        return None

    async def prefetch(ranges: list[tuple[int, int]]) -> None:
        remote = j.remote
        if remote is None:
            return
        size = vol.size
        locs = ((e.seq, e.loc) for a, b in ranges if a < min(b, size)
                for e in vol.extents(a, min(b, size), seq) if e.loc >= 0)
        want = missing_records(j, locs, prefetch_limit(j))
        if want:
            await remote(want)

    return prefetch


def reader_at(vol: Volume, seq: int) -> Any:
    """``read(offset, length)`` of *vol* as of *seq* (reads past the end are cut)."""
    size = vol.size

    def read(offset: int, length: int) -> bytes:
        if offset >= size or length <= 0:
            return bytes(max(length, 0))
        n = min(length, size - offset)
        data = vol.read(offset, n, seq)
        return data if n == length else data + bytes(length - n)

    return read


def changed_to(vol: Volume, seq: int) -> Any:
    def changed(base_seq: int, start: int, end: int) -> list[tuple[int, int]]:
        return vol.changed(base_seq, seq, start, min(end, vol.size))

    return changed


def service_for(volume: Volume) -> CatalogService:
    """The volume's catalog service: the attached one, else one created (and kept)
    without attaching it (it then sees no markers)."""
    for s in volume.services:
        if isinstance(s, CatalogService):
            return s
    svc = _services.get(volume)
    if svc is None:
        svc = _services[volume] = CatalogService(volume)
    return svc


def attach_catalog(volume: Volume, *, hold: bool = False) -> CatalogService:
    """Keep *volume*'s file catalog up to date: attach its service and, when called on
    a running event loop, queue the markers not catalogued yet. Idempotent.

    *hold*: attach, queue markers, catalog nothing until :meth:`CatalogService.catch_up`
    (cdpd calls it once NBD serves: the catch-up opens the database). Cost without it:
    the catch-up, on a running loop."""
    svc = service_for(volume)
    volume.attach(svc)
    if hold:
        svc.held = True
        return svc
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return svc
    try:
        svc.catch_up()
    except Exception:
        log.exception("volume %s: file catalog catch-up failed", volume.name)
    return svc
