"""A protected volume: one journal + one map history + its markers.

Design notes
------------
* The journal is the source of truth. Every write is appended (buffered, no sync) and
  fed to the map engine's live window; FLUSH/FUA (or ``sync = "always"``) wait for the
  journal's group commit. Map files are derived: after a crash the records with
  ``seq > maps.sealed_seq`` are replayed from the journal into the map engine. Maps are
  written only after the journal records they name are durable (``seal`` and ``rewind``
  sync the journal first), so ``sealed_seq`` never runs ahead of what a crash keeps.
* The live volume is "the state at the newest seq". A point-in-time view is the same
  volume read at a fixed seq; it is read-only.
* Markers cost no data movement: a MARKER record, a line in ``markers.json`` and a seal
  of the live window (so the marker's state is a map boundary).
* Rewind is metadata: a REWIND record ("state(R) = state(S)") fed to the map engine.
  Nothing is copied; rewinding to a point before the rewind undoes it.
  In-flight I/O during a rewind: writes appended before the REWIND record belong to the
  old timeline (they are overwritten by the rewind and stay readable at their own seqs),
  writes appended after it land on the rewound content. Reads see the new content as
  soon as ``rewind()`` returns.
* Pause holds new writes (they wait, none fail) so that markers can be taken on several
  volumes at one consistent point.
* Everything runs on the daemon's event loop thread; methods return plain values when
  they can complete at once, and an awaitable only when they must wait (durability,
  pause) — the NBD server then needs no task per request.
* **Read ahead for small reads in order.** A small live read that continues the last
  one loads a window (4 KiB doubling to 64 KiB, inside one extent and one record
  chunk) and the reads inside it are served from those bytes: a stream of 1 KiB NBD
  READs cost a map resolve and a journal read each (over half of cdpd's loop time in
  issue 28's pipelined row). The window is valid at one ``journal.last_seq``; a
  write or zero that misses it carries it to the next seq, one that hits it shrinks
  the next window to 4 KiB. Random reads never start one.
* **One append path.** Every record a volume kind appends goes through
  ``_record_write`` / ``_record_zero`` / ``_record_error`` (markers and rewinds have
  their own methods): journal append, map add, ``on_record`` to the services, one more
  live-window entry and, when the window is full, the non-blocking :meth:`_seal_soon`.
  Host request counters (``writes``, ``bytes_written``) stay with the host paths.
* **Services** (:class:`VolumeService`) are what the volume knows of the world above
  it: the store attaches retention and the file catalog (next: replication, tiering,
  the ransomware sentinel) with :meth:`Volume.attach`, the way nbdkit filters sit on a
  plugin. The volume calls them at fixed events (a host write about to be appended,
  a record appended, a seal, a marker, a rewind, an unresolvable point, close); every
  callback defaults to "pass through". The volume imports no service and works with
  none (tests, tools). Hot path: a write calls only the services that override
  ``admit_write`` / ``on_record`` (two tuples kept by :meth:`attach`), so with the
  store's services a write pays one call (retention's O(1) cap check).
* **Sampled writes.** A service that needs to see only some WRITE records (the
  sentinel: one in ``stride``) overrides ``on_sample`` instead of ``on_record``: the
  volume counts down the WRITE records itself and calls it for one in N, N being what
  the last call returned, and adds every WRITE's length to ``write_record_bytes``. An
  unsampled write then costs the samplers a decrement and an add (~0.05 µs) instead of
  a method call (0.2-0.3 µs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from cdp import memtrim
from cdp.config import MapSettings, Settings
from cdp.errors import CdpError, Corruption, NotFound, OutOfRange, PointError, UsageError
from cdp.fsutil import write_file_atomic
from cdp.journal import Journal, RecordKind
from cdp.journal.format import CHUNK_SIZE, GRANULE_SIZE, RECORD_HEADER, REWIND_PAYLOAD
from cdp.journal.tiered import NotLocal, fetch_retry, missing_records, prefetch_limit
from cdp.markers import Marker, load_markers, save_markers
from cdp.points import PointKind, PointSpec, parse_point
from cdp.units import format_time
from mapengine import HOLE_LOC, Columns, Extent, MapHistory, MergePolicy
from mapengine.errors import MapError, MapExpired

log = logging.getLogger("cdp.volume")

VOLUME_FORMAT = 1  # volume.json "format"; bump on an incompatible change

#: the largest volume size: NBD's export size is at most 2^63 - 1 (the protocol's
#: signed-offset rule) and the map engine keeps offsets as int64 ends (exclusive), so
#: the end of a volume must fit 2^63 - 1; rounded down to whole 512-byte sectors. The
#: journal's u64 offset/length fields allow more and so do not bound it.
MAX_VOLUME_SIZE = ((1 << 63) - 1) // 512 * 512


def check_size(size: int, what: str = "volume size") -> None:
    """UsageError unless *size* is a positive multiple of 512 up to :data:`MAX_VOLUME_SIZE`."""
    if size <= 0 or size % 512:
        raise UsageError(f"{what} must be a positive multiple of 512, got {size}")
    if size > MAX_VOLUME_SIZE:
        raise UsageError(
            f"{what} {size} is too large: at most {MAX_VOLUME_SIZE} bytes (2^63 - 512; NBD "
            "sizes and the map engine's int64 offsets end at 2^63 - 1)")

# NBD base:allocation flags, also used for our own block status answers
STATE_HOLE = 1
STATE_ZERO = 2


def map_policy(m: MapSettings) -> MergePolicy:
    return MergePolicy(fanout=m.fanout, l0_max_writes=m.l0_max_writes, full_every=m.full_every)


class _PayloadCache:
    """LRU of decoded journal payload chunks keyed (seq, chunk index), bounded in bytes
    (the journal's ChunkCache; a chunk is at most 64 KiB). O(1) get/put."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._d: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def get(self, key: tuple[int, int]) -> bytes | None:
        p = self._d.get(key)
        if p is not None:
            self._d.move_to_end(key)
        return p

    def put(self, key: tuple[int, int], payload: bytes) -> None:
        n = len(payload)
        if n > self.budget // 4:
            return
        old = self._d.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._d[key] = payload
        self.used += n
        while self.used > self.budget:
            _, old = self._d.popitem(last=False)
            self.used -= len(old)


#: a resolved region: start, end, seq, loc, poff columns (see _ViewRegions)
_Cols = tuple["array[int]", ...]
_EMPTY_COLS: _Cols = tuple(array("q") for _ in range(5))
_EXTENT_BYTES = 40  # five int64 columns
#: deferred seals whose fsyncs (the maps' writer thread) may be outstanding when a live
#: window 4x its size starts another seal beside the one waiting for them; beyond, a
#: blocking seal (a disk that cannot keep up holds ingest back instead of queueing
#: without bound)
SEAL_JOBS_BEHIND = 2
#: fetches from the S3 tier one read_async may make (one per record not local)
READ_FETCHES = 4096
#: live reads up to this size that continue the previous one read ahead (Volume.read)
READ_AHEAD_MAX = 16 << 10
#: the read-ahead window: it starts at READ_AHEAD_MIN and doubles with each window
#: loaded up to READ_AHEAD_SPAN (never past its record's 64 KiB chunk); a write into
#: the window (or a window no extent covers) takes it back to READ_AHEAD_MIN
READ_AHEAD_MIN = 4 << 10
READ_AHEAD_SPAN = 64 << 10


class _ViewRegions:
    """Resolved extents of past points, per 64 MiB region, LRU-bounded by bytes.

    A past point never changes (new writes, rewinds included, only add history), so a
    region resolved once for a point-in-time view answers every later read of it with
    a binary search instead of a walk over the map hierarchy. Kept as five int64
    columns (start, end, seq, loc, poff: 40 bytes an extent) searched with ``bisect``
    (no numpy call per read). Retention clears it (points it expires must be refused)."""

    REGION = 64 << 20

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._d: OrderedDict[tuple[int, int], _Cols] = OrderedDict()

    def get(self, key: tuple[int, int]) -> _Cols | None:
        r = self._d.get(key)
        if r is not None:
            self._d.move_to_end(key)
        return r

    def put(self, key: tuple[int, int], exts: list[Any]) -> _Cols:
        """Store *exts* (start, end, seq, loc, poff tuples) as five int64 columns."""
        cols: _Cols = tuple(array("q", c) for c in zip(*exts, strict=True)) if exts else _EMPTY_COLS
        nbytes = _EXTENT_BYTES * len(exts)
        if nbytes <= self.budget // 4:
            self._d[key] = cols
            self.used += nbytes
            while self.used > self.budget:
                _, old = self._d.popitem(last=False)
                self.used -= _EXTENT_BYTES * len(old[0])
        return cols

    def clear(self) -> None:
        self._d.clear()
        self.used = 0


class VolumeService:
    """A per-volume service, attached with :meth:`Volume.attach` (retention, the file
    catalog; next: replication, tiering, the ransomware sentinel).

    Every callback here passes through (does nothing), like an nbdkit filter that
    does not override a call: a service overrides what it needs. The volume calls them
    synchronously on the event loop, in the order the services were attached; none may
    block. A service that needs to do I/O starts its own task (the catalog does).
    """

    def admit_write(self, vol: Volume, nbytes: int) -> None:
        """Before a host write of *nbytes* of payload is appended: raise a CdpError to
        refuse it (nothing is appended; the host gets its errno). Not called for trims
        and write-zeroes (no payload), INIT records or a proxy's catch-up. Hot path: O(1)."""

    def on_record(self, vol: Volume, kind: RecordKind, seq: int, offset: int, length: int,
                  payload: bytes | bytearray | memoryview | None) -> None:
        """After every record is appended (WRITE, ZERO, INIT, ERROR, MARKER, REWIND), in
        seq order; the record is not durable yet (``vol.journal.durable_seq``). *payload*
        is the caller's buffer for WRITE/INIT (copy what you keep), else None (also for
        records applied from a replication stream). Hot path: no I/O, no blocking."""

    def on_sample(self, vol: Volume, seq: int, offset: int, length: int,
                  payload: bytes | bytearray | memoryview) -> int:
        """After one WRITE record in N is appended (not INIT; not records applied from a
        replication stream, which carry no payload), N being what the previous call
        returned (at least 1; the first WRITE after :meth:`Volume.attach` is sampled).
        The bytes of every WRITE record are counted in ``vol.write_record_bytes``.
        *payload* is the caller's buffer (copy what you keep). With several samplers
        the smallest N wins. Hot path: no I/O, no blocking."""
        return 1

    def on_sealed(self, vol: Volume, seq: int) -> None:
        """The live window was sealed into map files through *seq* (every record up to
        it is durable and in the maps)."""

    def on_marker(self, vol: Volume, marker: Marker) -> None:
        """*marker* is durable, listed in markers.json and sealed."""

    def on_rewind(self, vol: Volume, seq: int, target_seq: int) -> None:
        """REWIND record *seq* (the volume is now what it was at *target_seq*) is
        durable and the maps are sealed."""

    def point_error(self, vol: Volume, seq: int, what: str | None) -> CdpError | None:
        """Point *seq* (asked for as *what*, e.g. ``marker3``) can no longer be resolved:
        the error to raise, or None to leave it to the next service (the volume's own
        answer is a plain PointError)."""
        return None

    def resolve_label(self, vol: Volume, label: str) -> int | None:
        """A point named *label* that no marker carries: the seq this service knows it
        by (the sentinel's ``clean-before-alertN``), or None to ask the next service."""
        return None

    def held_points(self, vol: Volume) -> Iterable[int]:
        """Seqs this service needs kept from retention (the sentinel's clean points
        until their alert is dismissed). Asked at each gc: O(points)."""
        return ()

    def close(self, vol: Volume) -> None:
        """*vol* is closing (before its final seal): stop work that uses it."""


def _overrides(svc: VolumeService, name: str) -> bool:
    return getattr(type(svc), name) is not getattr(VolumeService, name)


class Volume:
    """One protected volume in ``STORE/volumes/NAME``. Not thread-safe (event loop only).

    A subclass (a volume kind, e.g. :class:`cdp.proxy.volume.ProxyVolume`) appends
    records only through ``_record_write`` / ``_record_zero`` / ``_record_error``, asks
    the services with ``_admit`` before a host write, and may override ``_opened``.
    """

    #: "mirror": the host writes its primary itself and mirrors to us; "proxy": we own the
    #: primary too (cdp.proxy.volume.ProxyVolume; the store picks the kind by volume.json "mode")
    mode = "mirror"

    def __init__(
        self,
        path: Path,
        name: str,
        size: int,
        uuid_: str,
        journal: Journal,
        maps: MapHistory,
        settings: Settings,
        markers: list[Marker],
        next_marker_id: int,
    ) -> None:
        self.path = path
        self.name = name
        self.size = size
        self.uuid = uuid_
        self.journal = journal
        self.maps = maps
        self.settings = settings
        self._markers = markers
        self._next_marker_id = next_marker_id
        self._cache = _PayloadCache(settings.read.payload_cache_bytes)
        self.view_regions = _ViewRegions(settings.read.view_cache_bytes)
        #: the live read ahead (see :meth:`read`): journal.last_seq it is valid at,
        #: start, end, bytes; and where the last small live read ended
        self._ahead: tuple[int, int, int, bytes] = (-1, 0, 0, b"")
        self._ahead_span = READ_AHEAD_MIN
        self._next_read = -1
        self._live_writes = 0
        self._last_seal = time.monotonic()
        #: event-loop seconds spent sealing the live window (map writes and their
        #: fsyncs): what :class:`SealPacer` meters
        self.seal_seconds = 0.0
        self._l0_max = settings.maps.l0_max_writes
        self._seal_task: asyncio.Task[None] | None = None
        #: the seal task only waits for its maps' fsyncs (see _seal_soon)
        self._seal_syncing = False
        self.closed = False
        self._sync_always = settings.journal.sync == "always"
        self._gate: asyncio.Future[None] | None = None
        self.connections = 0
        self._services: tuple[VolumeService, ...] = ()
        self._admitters: tuple[VolumeService, ...] = ()  # those overriding admit_write
        self._recorders: tuple[VolumeService, ...] = ()  # those overriding on_record
        self._samplers: tuple[VolumeService, ...] = ()  # those overriding on_sample
        self._sample_in = 1  # WRITE records until the samplers' next on_sample
        #: bytes of WRITE records appended while a sampler is attached (see on_sample)
        self.write_record_bytes = 0
        # counters for status and metrics
        self.writes = 0
        self.bytes_written = 0
        self.reads = 0
        self.bytes_read = 0
        self.flushes = 0
        self.flush_seconds = 0.0
        self.replayed = 0

    # ------------------------------------------------------------------ services

    def attach(self, service: VolumeService) -> None:
        """Attach *service*: from now on the volume calls it at every event (see
        :class:`VolumeService`). Attaching the same object again does nothing."""
        if service in self._services:
            return
        self._services = (*self._services, service)
        self._admitters = tuple(s for s in self._services if _overrides(s, "admit_write"))
        self._recorders = tuple(s for s in self._services if _overrides(s, "on_record"))
        self._samplers = tuple(s for s in self._services if _overrides(s, "on_sample"))
        if _overrides(service, "on_sample"):
            self._sample_in = 1  # the next WRITE goes to the new sampler

    @property
    def services(self) -> tuple[VolumeService, ...]:
        """The attached services, in attach order."""
        return self._services

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _new_meta(path: Path, name: str, size: int) -> dict[str, Any]:
        """Check *size*, create the (new) volume directory *path* and return the base
        keys of its volume.json. A volume kind adds its keys and files, then calls
        :meth:`_write_meta` (volume.json last: a directory without it is no volume)."""
        check_size(size)
        if path.exists():
            raise UsageError(f"volume {name!r} already exists in {path.parent}")
        path.mkdir(parents=True)
        return {
            "format": VOLUME_FORMAT,
            "name": name,
            "size": size,
            "uuid": str(uuid.uuid4()),
            "created_ns": time.time_ns(),
        }

    @staticmethod
    def _write_meta(path: Path, meta: dict[str, Any]) -> None:
        write_file_atomic(path / "volume.json", json.dumps(meta, indent=2).encode() + b"\n")

    @classmethod
    def create(cls, path: Path, name: str, size: int, settings: Settings) -> Self:
        """Create an empty (all-zero, thin) volume directory and open it."""
        meta = cls._new_meta(path, name, size)
        cls._write_meta(path, meta)
        return cls.open(path, settings)

    @classmethod
    def open(cls, path: Path, settings: Settings) -> Self:
        """Open a volume: journal recovery, map history, replay of unsealed records.
        Mode-blind: the store picks the class from volume.json's "mode"
        (:func:`read_meta`). No service is attached.

        Cost: O(records after the last sealed map) for the replay.
        """
        meta = read_meta(path)
        markers, next_id = load_markers(path / "markers.json")
        journal = Journal.open(
            path / "journal",
            segment_bytes=settings.journal.segment_bytes,
            sync=settings.journal.sync,
            segment_records=settings.journal.segment_records,
        )
        try:
            maps = MapHistory.open(
                path / "maps",
                policy=map_policy(settings.maps),
                cache_bytes=settings.maps.cache_bytes,
            )
        except MapError as e:
            journal.close()
            raise Corruption(f"volume {meta['name']}: map history: {e}") from e
        vol = cls(
            path, meta["name"], int(meta["size"]), meta["uuid"], journal, maps, settings,
            markers, next_id,
        )
        try:
            vol._replay()
        except BaseException:
            journal.close()
            raise
        vol._opened(meta)
        return vol

    def _opened(self, meta: dict[str, Any]) -> None:
        """Hook for subclasses: the volume is open and replayed (proxy mode attaches its
        primary and reconciles here). Close what you opened before raising."""

    def _replay(self) -> None:
        """Feed journal records newer than the sealed maps into the map engine."""
        start = self.maps.sealed_seq + 1
        known = {m.id for m in self._markers}
        added = False
        n = 0
        for rec in self.journal.scan_meta(start):  # the maps need no payloads
            self._apply(rec.kind, rec.seq, rec.offset, rec.length, rec.loc, rec)
            n += 1
            mid = rec.marker_id
            if rec.kind == RecordKind.MARKER and mid is not None and mid not in known:
                self._markers.append(Marker(mid, rec.seq, rec.timestamp_ns, rec.label or ""))
                self._next_marker_id = max(self._next_marker_id, mid + 1)
                known.add(mid)
                added = True
        self.replayed = n
        if added:
            self._markers.sort(key=lambda m: m.seq)
            self._save_markers()
        if n:
            self.seal()

    def _apply(self, kind: int, seq: int, offset: int, length: int, loc: int, rec: Any) -> None:
        if kind == RecordKind.WRITE or kind == RecordKind.INIT:
            self.maps.add_write(seq, offset, offset + length, loc)
            self._note_live()
        elif kind == RecordKind.ZERO:
            self.maps.add_zero(seq, offset, offset + length)
            self._note_live()
        elif kind == RecordKind.REWIND:
            self.maps.add_rewind(seq, rec.target_seq)
        else:
            self.maps.note_seq(seq)

    def seal(self) -> None:
        """Seal the whole live window into an L0 map now, blocking (cost: one journal
        fdatasync + sort and write of the window). For open, close and bulk loads; the
        I/O path uses :meth:`_seal_soon`.

        The journal is made durable first: a map file must never name records that a
        power loss (or, for the user-space buffer, a kill) could still take away.

        While retention rewrites the maps in a worker thread (``maps.retaining``) only
        the journal is synced: the window stays live and is sealed after the retain."""
        t0 = time.perf_counter()
        self.journal.sync()
        if self.maps.retaining:
            return
        self.maps.seal()
        self._live_writes = 0
        self._last_seal = time.monotonic()
        self._sealed()
        self.seal_seconds += time.perf_counter() - t0
        memtrim.after_seal(self._last_seal)

    def _sealed(self) -> None:
        for s in self._services:
            s.on_sealed(self, self.maps.sealed_seq)

    def _note_live(self) -> None:
        """One more entry in the live window; start a seal once the window is full."""
        self._live_writes += 1
        if self._live_writes >= self._l0_max:
            self._seal_soon()

    def _seal_soon(self) -> None:
        """Seal without holding up I/O: a task waits for the journal's group commit,
        then seals only the entries that commit made durable; writes arriving meanwhile
        stay in the live window. Without a running event loop (replay at open, tools)
        it seals at once. If ingest outruns the seals (the window reaches 4x its size
        while one is pending) it falls back to a blocking seal, to bound the window."""
        if self.maps.retaining:
            return  # sealed by seal_after_retain
        if self._seal_task is not None:
            if self._live_writes >= 4 * self._l0_max:
                if self._seal_syncing and self.maps.pending_jobs < SEAL_JOBS_BEHIND:
                    # the pending seal only waits for its fsyncs (the maps' writer
                    # thread): seal beside it, its job queues behind that one's
                    self._live_writes = 0
                    self._seal_syncing = False
                    self._seal_task = asyncio.get_running_loop().create_task(
                        self._seal_durable())
                else:
                    self.seal()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.seal()
            return
        self._live_writes = 0
        self._seal_task = loop.create_task(self._seal_durable())

    async def _seal_durable(self) -> None:
        me = asyncio.current_task()
        try:
            target = self.journal.last_seq
            await self.journal.commit()
            if self.maps.retaining:  # sealed by seal_after_retain
                return
            if target > self.maps.sealed_seq:  # a blocking seal may have passed it
                t0 = time.perf_counter()
                # the map files' and manifest's fsyncs run in the maps' writer thread,
                # in order (files, directory, then the manifest naming them); the loop
                # only writes the files into the page cache
                self.maps.seal(target, defer=True)
                self._sealed()
                self.seal_seconds += time.perf_counter() - t0
                # the next seal waits for these fsyncs (so a seal covers what came
                # meanwhile: fewer, larger windows), unless the live window reaches 4x
                # its size first: then _seal_soon starts one beside this (its job
                # queues behind), up to SEAL_JOBS_BEHIND jobs, else a blocking seal
                pending = self.maps.pending
                if pending is not None:
                    self._seal_syncing = True
                    # shielded: a cancel (close) must not cancel the queued job itself
                    await asyncio.shield(asyncio.wrap_future(pending))
            self._last_seal = time.monotonic()
            # the seal's temporaries and a replaced head are free now (cdp.memtrim)
            memtrim.after_seal(self._last_seal)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("volume %s: sealing the live window failed", self.name)
        finally:
            if self._seal_task is me:  # not replaced by a seal started beside it
                self._seal_task = None
                self._seal_syncing = False

    def seal_after_retain(self) -> None:
        """Seals held back while a retain was built: start one now if the window is due."""
        if self._live_writes >= self._l0_max or (
            self.maps.last_seq > self.maps.sealed_seq
            and time.monotonic() - self._last_seal >= self.settings.maps.seal_interval
        ):
            self._seal_soon()

    def seal_overdue(self, now: float | None = None) -> float:
        """Seconds the time-based seal is overdue (``seal_interval`` after the last
        seal, with unsealed writes); negative when it is not due. O(1)."""
        if self.maps.last_seq <= self.maps.sealed_seq:
            return float("-inf")
        now = time.monotonic() if now is None else now
        return now - self._last_seal - self.settings.maps.seal_interval

    def tick(self, seal: bool = True) -> None:
        """Called about once a second by the daemon: the time-based seal when it is due
        (and *seal*: the daemon's :class:`SealPacer` says which volumes may seal now)."""
        if seal and self.seal_overdue() >= 0:
            self._seal_soon()

    def close(self) -> None:
        """Tell the services, seal, make the journal durable, close files."""
        self.closed = True
        for s in self._services:
            try:
                s.close(self)
            except Exception:  # the files are closed anyway
                log.exception("volume %s: closing service %r failed", self.name, s)
        if self._seal_task is not None:
            self._seal_task.cancel()
            self._seal_task = None
        try:
            if self.maps.last_seq > self.maps.sealed_seq:
                self.seal()
            self.journal.sync()
        finally:
            self.maps.close()
            self.journal.close()

    # ------------------------------------------------------------------ points

    @property
    def head_seq(self) -> int:
        return self.journal.last_seq

    @property
    def markers(self) -> list[Marker]:
        return list(self._markers)

    @property
    def next_marker_id(self) -> int:
        """The id the next marker gets (ids are never reused, even once expired)."""
        return self._next_marker_id

    def marker(self, ident: int) -> Marker:
        for m in self._markers:
            if m.id == ident:
                return m
        raise NotFound(f"volume {self.name}: no marker{ident} ({self._marker_hint()})")

    def _marker_hint(self) -> str:
        if not self._markers:
            return "it has no markers yet"
        names = [m.name for m in self._markers[-5:]]
        return "newest markers: " + ", ".join(names)

    def resolve_point(self, point: str | PointSpec, *, now_ns: int | None = None) -> int:
        """:meth:`_resolve_point`, then a point the maps can no longer resolve (expired
        by retention) raises the services' :meth:`VolumeService.point_error` (retention
        names the nearest retained points). Cost: O(log n) + O(markers)."""
        seq = self._resolve_point(point, now_ns=now_ns)
        if not self.maps.resolvable(seq):
            raise self._point_error(seq, point if isinstance(point, str) else None)
        return seq

    def _point_error(self, seq: int, what: str | None) -> CdpError:
        for s in self._services:
            e = s.point_error(self, seq, what)
            if e is not None:
                return e
        return PointError(f"volume {self.name}: {what or f'@{seq}'} (@{seq}) can no longer "
                          "be resolved (expired)")

    def _resolve_point(self, point: str | PointSpec, *, now_ns: int | None = None) -> int:
        """Turn a point (``marker3``, a label, ``@SEQ``, a time, ``-10m``) into a seq.

        Raises NotFound for an unknown marker/label and PointError for a time before the
        first write or after now. Cost: O(log n) (markers scan is O(markers)).
        """
        spec = parse_point(point) if isinstance(point, str) else point
        head = self.journal.last_seq
        k = spec.kind
        if k is PointKind.SEQ:
            seq = int(spec.value)
            if seq > head:
                raise PointError(
                    f"volume {self.name}: @{seq} is after now (newest is @{head})"
                )
            if 0 < seq < self.journal.first_seq:
                raise PointError(
                    f"volume {self.name}: @{seq} is no longer in the journal "
                    f"(oldest is @{self.journal.first_seq})"
                )
            return seq
        if k is PointKind.MARKER:
            return self.marker(int(spec.value)).seq
        if k is PointKind.NOW:
            return head
        if k is PointKind.ORIGIN:
            return 0
        if k is PointKind.LABEL:
            for m in reversed(self._markers):
                if m.label == spec.value:
                    return m.seq
            for s in self._services:
                found = s.resolve_label(self, str(spec.value))
                if found is not None:
                    return found
            raise NotFound(
                f"volume {self.name}: no marker labelled {spec.value!r} ({self._marker_hint()})"
            )
        now = time.time_ns() if now_ns is None else now_ns
        ns = now - int(float(spec.value) * 1e9) if k is PointKind.RELATIVE else int(spec.value)
        if ns > now:
            raise PointError(f"volume {self.name}: {spec.text} is in the future")
        if head == 0:
            raise PointError(f"volume {self.name}: {spec.text} is before the first write (none yet)")
        first = self.journal.time_of_seq(self.journal.first_seq)
        if ns < first:
            raise PointError(
                f"volume {self.name}: {spec.text} is before the first write "
                f"(at {format_time(first, sep='T', zone=True)})"
            )
        return self.journal.seq_at_time(ns)

    # ------------------------------------------------------------------ I/O

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(
                f"volume {self.name}: bytes [{offset}, {offset + length}) are outside "
                f"the volume (size {self.size})"
            )

    def write(self, offset: int, data: bytes | bytearray, fua: bool = False) -> Awaitable[None] | None:
        """Journal *data* at *offset*. Returns an awaitable when the caller must wait
        (FUA / sync=always: durability; paused volume), else None. O(1) amortised."""
        self._check_range(offset, len(data))
        if self._gate is not None:
            return self._after_gate(self.write, offset, data, fua)
        for s in self._admitters:
            s.admit_write(self, len(data))
        self._record_write(offset, data)
        self.writes += 1
        self.bytes_written += len(data)
        if fua or self._sync_always:
            return self.flush()
        return None

    def zero(self, offset: int, length: int, fua: bool = False) -> Awaitable[None] | None:
        """Trim / write-zeroes: a ZERO record (no payload); reads return zeros."""
        self._check_range(offset, length)
        if length == 0:
            return None
        if self._gate is not None:
            return self._after_gate(self.zero, offset, length, fua)
        self._record_zero(offset, length)
        self.writes += 1
        if fua or self._sync_always:
            return self.flush()
        return None

    # the one append path (see the design notes); callers check ranges and admission

    def _admit(self, nbytes: int) -> None:
        """Ask the services whether a host write of *nbytes* may be appended."""
        for s in self._admitters:
            s.admit_write(self, nbytes)

    def _record_write(self, offset: int, data: bytes | bytearray | memoryview, *,
                      init: bool = False) -> int:
        """Append a WRITE (INIT with *init*) record of *data* at *offset* and feed it to
        the maps and services; returns its seq. Journal errors propagate (nothing was
        appended). O(1) amortised; a full live window is sealed by a task
        (:meth:`_seal_soon`), not on the caller's time."""
        seq, loc = self.journal.append_write(offset, data, init=init)
        n = len(data)
        self.maps.add_write(seq, offset, offset + n, loc)
        if self._ahead[0] == seq - 1:
            self._keep_ahead(seq, offset, offset + n)
        for s in self._recorders:
            s.on_record(self, RecordKind.INIT if init else RecordKind.WRITE, seq, offset, n, data)
        if self._samplers and not init:
            self.write_record_bytes += n
            self._sample_in -= 1
            if not self._sample_in:
                self._sample(seq, offset, n, data)
        self._note_live()
        return seq

    def _sample(self, seq: int, offset: int, n: int, data: bytes | bytearray | memoryview) -> None:
        """The countdown reached 0: call the samplers, count down again from the
        smallest N they return."""
        self._sample_in = max(1, min(s.on_sample(self, seq, offset, n, data)
                                     for s in self._samplers))

    def _record_zero(self, offset: int, length: int) -> int:
        """Append a ZERO record (trim / write-zeroes): as :meth:`_record_write`."""
        seq, _loc = self.journal.append_zero(offset, length)
        self.maps.add_zero(seq, offset, offset + length)
        if self._ahead[0] == seq - 1:
            self._keep_ahead(seq, offset, offset + length)
        for s in self._recorders:
            s.on_record(self, RecordKind.ZERO, seq, offset, length, None)
        self._note_live()
        return seq

    def _keep_ahead(self, seq: int, start: int, end: int) -> None:
        """Record *seq* changed ``[start, end)`` right after the read-ahead window was
        valid: the window stays valid at *seq* unless the record overlaps it; if it
        does, the window is dropped (its seq is old) and the next one starts small
        (a reader that rewrites what it reads gains nothing from reading ahead)."""
        _gen, a_start, a_end, ahead = self._ahead
        if start < a_end and a_start < end:
            self._ahead_span = READ_AHEAD_MIN
        else:
            self._ahead = (seq, a_start, a_end, ahead)

    def _record_error(self, code: int, offset: int, length: int, message: str) -> int:
        """Append an ERROR record (what failed where; the maps get a seq that changes
        no data); returns its seq."""
        seq, _loc = self.journal.append_error(code, offset, length, message)
        self.maps.note_seq(seq)
        for s in self._recorders:
            s.on_record(self, RecordKind.ERROR, seq, offset, length, None)
        return seq

    async def flush(self) -> None:
        """Durable: every record appended before the call (group commit)."""
        t0 = time.perf_counter()
        await self.journal.commit()
        self.flushes += 1
        self.flush_seconds += time.perf_counter() - t0

    async def _after_gate(self, fn: Callable[..., Awaitable[None] | None], *args: Any) -> None:
        while self._gate is not None:
            await asyncio.shield(self._gate)
        r = fn(*args)
        if r is not None:
            await r

    def read(self, offset: int, length: int, seq: int | None = None) -> bytes:
        """Bytes [offset, offset+length) as of *seq* (default: now). Holes and zero
        extents read as zeros. Cost: one map resolve (a small live read: one
        ``resolve_head``) + per extent the journal pieces it overlaps (one pread: the
        4 KiB granules of a raw chunk of a version 3 record, else the 64 KiB chunks,
        decoded chunks cached). Raises Corruption (EIO) if a needed piece is damaged.

        Read ahead: a small live read (up to :data:`READ_AHEAD_MAX`) that starts where
        the previous one ended reads on, a window growing from 4 to 64 KiB (not past its
        record's chunk), when one extent covers it (:meth:`_read_ahead`), and keeps
        those bytes while no record changes them: valid at one ``journal.last_seq``
        (every change of the live content appends a record), carried to the next seq by
        a write or zero that misses it (:meth:`_keep_ahead`). The reads it covers cost a
        comparison and a slice: a sequential stream of 1 KiB reads resolves the maps
        and reads the journal once per 64 KiB instead of once per read (issue 28's
        pipelined row)."""
        end = offset + length
        if seq is None and 0 <= offset < end <= self.size:
            gen, a_start, a_end, ahead = self._ahead
            if a_start <= offset and end <= a_end and gen == self.journal.last_seq:
                self.reads += 1
                self.bytes_read += length
                return ahead[offset - a_start : end - a_start]
            # the live head, one extent (the common small read): no lists, no wrappers
            e = self.maps.resolve_head(offset, end)
            if e is not None:
                self.reads += 1
                self.bytes_read += length
                if offset == self._next_read and length <= READ_AHEAD_MAX:
                    got = self._read_ahead(e, offset, length)
                    if got is not None:
                        return got
                self._next_read = end
                if e.loc < 0:
                    return bytes(length)
                return self.journal.read_slice(e.seq, e.loc, e.poff, length, cache=self._cache)
        self._check_range(offset, length)
        self.reads += 1
        self.bytes_read += length
        at = self.journal.last_seq if seq is None else seq
        if at == 0 or length == 0:
            return bytes(length)
        exts = self._resolve(at, offset, offset + length)
        if len(exts) == 1:
            e = exts[0]
            if e.loc < 0:
                return bytes(length)
            return self._payload(e.seq, e.loc, e.poff, length)
        buf = bytearray(length)
        cache = self._cache
        view = self.journal.read_slice_view
        for e in exts:
            if e.loc < 0:
                continue
            buf[e.start - offset : e.end - offset] = view(
                e.seq, e.loc, e.poff, e.end - e.start, cache=cache)
        return bytes(buf)

    def _read_ahead(self, e: Any, offset: int, length: int) -> bytes | None:
        """The read ahead of :meth:`read` from *offset* (extent *e* covers the read):
        keep the live bytes of the window (``_ahead_span`` from *offset*, not past the
        end of *e*'s 64 KiB record chunk; failing that, to the end of its 4 KiB granule,
        for records of 4 KiB writes) if one extent covers them, and return the read's
        part; None when no window is larger than the read or it cannot be read (a
        damaged granule past the read, a record only the tier holds: the exact read
        then answers as it would have). Cost: one or two more ``resolve_head`` and one
        journal read of at most 64 KiB (the page cache's granules, CRC-checked)."""
        gen = self.journal.last_seq  # before reading: a record appended meanwhile voids it
        end = offset + length
        span = self._ahead_span
        ends: tuple[int, ...]
        if e.loc < 0:
            ends = (offset + span,)
        else:
            chunk_left = CHUNK_SIZE - (e.poff & (CHUNK_SIZE - 1))
            ends = (offset + (span if span < chunk_left else chunk_left),
                    offset + GRANULE_SIZE - (e.poff & (GRANULE_SIZE - 1)))
        size = self.size
        maps = self.maps
        for w_end in ends:
            if w_end > size:
                w_end = size
            if w_end <= end:
                return None
            w = maps.resolve_head(offset, w_end)
            if w is not None:
                break
            self._ahead_span = READ_AHEAD_MIN  # extents smaller than the window
        else:
            return None
        if w.loc < 0:
            data = bytes(w_end - offset)
        else:
            try:
                data = self.journal.read_slice(w.seq, w.loc, w.poff, w_end - offset,
                                               cache=self._cache)
            except (Corruption, NotLocal):
                return None
        self._ahead = (gen, offset, w_end, data)
        self._next_read = w_end
        if w_end - offset >= span and span < READ_AHEAD_SPAN:
            self._ahead_span = span * 2
        return data[:length]

    async def read_async(self, offset: int, length: int, seq: int | None = None) -> bytes:
        """:meth:`read` for points whose records may live only in the S3 tier: on
        :class:`~cdp.journal.NotLocal` the journal's fetcher (``journal.remote``, injected
        by the tier service) GETs every record of the read that is not local (up to half
        the read cache; neighbours coalesced) and puts them in the read cache, then the
        read is tried again (:func:`~cdp.journal.tiered.fetch_retry`): one round of GETs
        for a read that fits the cache. NotLocal when no tier fetcher is attached, or
        when the same records are missing again right after their fetch (the cache
        cannot hold what the read needs)."""
        j = self.journal

        def plan(missed: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
            locs = ((e.seq, e.loc) for e in self.extents(offset, offset + length, seq)
                    if e.loc >= 0)
            return missed + missing_records(j, locs, prefetch_limit(j))

        return await fetch_retry(j, lambda: self.read(offset, length, seq), plan)

    def _resolve(self, seq: int, start: int, end: int) -> list[Any]:
        R = _ViewRegions.REGION
        region = start // R
        if seq < self.journal.last_seq and (end - 1) // R == region and end > start:
            # a past point: resolve its 64 MiB region once, then bisect (see _ViewRegions)
            key = (seq, region)
            cached = self.view_regions.get(key)
            if cached is None:
                r0 = region * R
                cached = self.view_regions.put(
                    key, self._resolve_maps(seq, r0, min(r0 + R, self.size)))
            starts, ends, seqs, locs, poffs = cached
            i = bisect_right(ends, start)
            j = bisect_left(starts, end, i)
            out = []
            for k in range(i, j):
                a, loc, poff = starts[k], locs[k], poffs[k]
                if a < start:
                    if loc >= 0:
                        poff += start - a
                    a = start
                b = ends[k]
                out.append(Extent(a, b if b < end else end, seqs[k], loc, poff))
            return out
        return self._resolve_maps(seq, start, end)

    def _resolve_maps(self, seq: int, start: int, end: int) -> list[Any]:
        try:
            return self.maps.resolve(seq, start, end)
        except MapExpired:
            raise self._point_error(seq, None) from None
        except MapError as e:
            raise Corruption(f"volume {self.name}: map history: {e}") from e

    def _payload(self, seq: int, loc: int, poff: int, n: int) -> bytes:
        """Payload bytes [poff, poff+n) of record seq: only the chunks they touch."""
        return self.journal.read_slice(seq, loc, poff, n, cache=self._cache)

    def read_extent(self, e: Any, offset: int, length: int) -> bytes | memoryview:
        """Bytes ``[offset, offset+length)`` (inside extent *e*, as :meth:`extents`
        gives it) without resolving the maps again: zeros for a hole or zero extent,
        else the journal slice (a view may come back). For one-pass readers that walk
        extents (image): the payload cache is neither read nor filled. Cost: the journal
        read alone (a large raw extent: one pread), without :meth:`read`'s resolve. Raises Corruption / NotLocal as
        :meth:`read` does."""
        if e.loc < 0:
            return bytes(length)
        # no payload cache: a one-pass reader would only evict the host reads' chunks
        return self.journal.read_slice_view(e.seq, e.loc, e.poff + offset - e.start, length)

    def extents(self, start: int, end: int, seq: int | None = None) -> list[Any]:
        """The resolved extents of [start, end) at *seq* (holes included)."""
        self._check_range(start, end - start)
        at = self.journal.last_seq if seq is None else seq
        if at == 0:
            return [_Hole(start, end)]
        return self._resolve(at, start, end)

    def extent_columns(self, start: int, end: int, seq: int | None = None) -> Columns:
        """:meth:`extents` as numpy columns (the same extents), resolved in columns: no
        object per extent, for large ranges (a whole-history diff); small ranges are
        cheaper through :meth:`extents` and its caches. Raises as :meth:`extents`."""
        self._check_range(start, end - start)
        at = self.journal.last_seq if seq is None else seq
        if at == 0:
            z = np.zeros(1, np.int64)
            return Columns(np.array([start], np.int64), np.array([end], np.int64), z,
                           np.full(1, HOLE_LOC, np.int64), z)
        try:
            return self.maps.resolve_columns(at, start, end)
        except MapExpired:
            raise self._point_error(at, None) from None
        except MapError as e:
            raise Corruption(f"volume {self.name}: map history: {e}") from e

    def block_status(self, offset: int, length: int, seq: int | None = None) -> list[tuple[int, int]]:
        """``base:allocation`` runs (length, flags): holes and zeroed ranges report
        HOLE|ZERO, data 0. Adjacent runs with equal flags are merged."""
        out: list[tuple[int, int]] = []
        for e in self.extents(offset, offset + length, seq):
            flags = STATE_HOLE | STATE_ZERO if e.loc < 0 else 0
            n = e.end - e.start
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))
        return out

    def iter_data(
        self, seq: int, chunk: int = 64 << 20, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes | None, int]]:
        """Yield (offset, data or None for zeros, length) over [start, end) at *seq*,
        in offset order; zero/hole runs are yielded as None so writers stay sparse."""
        end = self.size if end is None else end
        pos = start
        while pos < end:
            stop = min(end, pos + chunk)
            for e in self.extents(pos, stop, seq):
                n = e.end - e.start
                if e.loc < 0:
                    yield e.start, None, n
                else:
                    yield e.start, self._payload(e.seq, e.loc, e.poff, n), n
            pos = stop

    def changed(self, seq_a: int, seq_b: int, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """Byte ranges ``[start, end)`` whose content may differ between two points (either
        order). Cost follows the changes between the points, not the volume size."""
        head = self.journal.last_seq
        for s in (seq_a, seq_b):
            if not 0 <= s <= head:
                raise PointError(f"volume {self.name}: @{s} is not a point of this volume")
        if seq_a == seq_b:
            return []
        try:
            return self.maps.changed(seq_a, seq_b, start, self.size if end is None else end)
        except MapError as e:
            raise Corruption(f"volume {self.name}: map history: {e}") from e

    # ------------------------------------------------------------------ markers, rewind, pause

    async def snapshot(self, label: str = "") -> Marker:
        """Take a marker: a MARKER record made durable, listed, and a map seal."""
        if self._gate is not None:
            raise UsageError(f"volume {self.name} is paused; use snapshot_paused")
        return await self.snapshot_paused(label)

    async def snapshot_paused(self, label: str = "") -> Marker:
        """Like :meth:`snapshot` but also while paused (the caller holds the pause)."""
        if len(label) > 200:
            raise UsageError("marker label too long (at most 200 characters)")
        if label and (label.startswith("marker") and label[6:].isdigit()):
            raise UsageError(f"label {label!r} looks like a marker id; choose another")
        mid = self._next_marker_id
        self._next_marker_id += 1
        seq, _loc = self.journal.append_marker(mid, label)
        self.maps.note_seq(seq)
        for s in self._recorders:
            s.on_record(self, RecordKind.MARKER, seq, 0, 0, None)
        await self.journal.commit()
        m = Marker(mid, seq, self.journal.time_of_seq(seq), label)
        self._markers.append(m)
        self._save_markers()
        # the marker ends an L0 window (it is durable), unless a retain is being built
        if seq > self.maps.sealed_seq and not self.maps.retaining:
            self.maps.seal(seq)
            self._last_seal = time.monotonic()
            self._sealed()
        for s in self._services:
            s.on_marker(self, m)
        return m

    async def rewind(self, target_seq: int) -> int:
        """Make the live volume what it was at *target_seq*; returns the REWIND seq."""
        if not 0 <= target_seq <= self.journal.last_seq:
            raise PointError(f"volume {self.name}: cannot rewind to @{target_seq}")
        if self._gate is not None:
            raise UsageError(f"volume {self.name} is paused; resume it first")
        while self.maps.retaining:  # add_rewind starts an epoch: not while retain builds
            await asyncio.sleep(0.01)
        seq, _loc = self.journal.append_rewind(target_seq)
        for s in self._recorders:
            s.on_record(self, RecordKind.REWIND, seq, 0, 0, None)
        self.journal.sync()  # add_rewind persists the maps at once: the record first
        self.maps.add_rewind(seq, target_seq)
        await self.journal.commit()
        self.seal()
        for s in self._services:
            s.on_rewind(self, seq, target_seq)
        return seq

    async def apply_stored(self, records: Sequence[bytes | memoryview]) -> int:
        """Replica side of replication: append records shipped from the source verbatim
        (:meth:`Journal.append_stored`: same seqs, times, bytes) and apply each as replay
        at open does: maps fed, a MARKER listed with the source's id, label and time
        once durable, a REWIND applied as :meth:`rewind` applies it. Returns the durable
        seq to acknowledge (every record given is durable by then).

        Errors of ``append_stored`` (a gap, damage) propagate; the records before the
        bad one stay applied. The caller serialises calls (one stream per volume).
        Cost: as many host writes of the same sizes, plus one group commit per call
        (and one per REWIND).
        """
        new: list[Marker] = []
        for raw in records:
            if len(raw) > RECORD_HEADER.size and raw[9] == RecordKind.REWIND:
                await self.flush()  # the records before it are durable first
                while self.maps.retaining:  # add_rewind starts an epoch: not during a retain
                    await asyncio.sleep(0.01)
            seq, loc = self.journal.append_stored(raw)  # checked: the header is sound
            h = RECORD_HEADER.unpack_from(raw)
            kind, offset, length = h[3], h[9], h[10]
            if kind == RecordKind.WRITE or kind == RecordKind.INIT:
                self.maps.add_write(seq, offset, offset + length, loc)
                self._note_live()
            elif kind == RecordKind.ZERO:
                self.maps.add_zero(seq, offset, offset + length)
                self._note_live()
            elif kind == RecordKind.REWIND:
                (target,) = REWIND_PAYLOAD.unpack_from(raw, RECORD_HEADER.size)
                self.journal.sync()  # add_rewind persists the maps at once: the record first
                self.maps.add_rewind(seq, target)
                self._live_writes = 0
                self._sealed()
                for s in self._services:
                    s.on_rewind(self, seq, target)
            else:
                self.maps.note_seq(seq)
                if kind == RecordKind.MARKER:
                    rec = self.journal.read_record(seq, loc)
                    new.append(Marker(rec.marker_id or 0, seq, rec.timestamp_ns, rec.label or ""))
            for s in self._recorders:
                s.on_record(self, RecordKind(kind), seq, offset, length, None)
            if kind == RecordKind.WRITE and self._samplers:  # counted, never sampled
                self.write_record_bytes += length
        await self.journal.commit()
        if new:
            self._markers.extend(new)
            self._next_marker_id = max(self._next_marker_id, *(m.id + 1 for m in new))
            self._save_markers()
            last = new[-1].seq
            if last > self.maps.sealed_seq and not self.maps.retaining:
                self.maps.seal(last)
                self._last_seal = time.monotonic()
                self._sealed()
            for m in new:
                for s in self._services:
                    s.on_marker(self, m)
        return self.journal.durable_seq

    def pause(self) -> None:
        """Hold new writes (they wait, none fail) until :meth:`resume`."""
        if self._gate is None:
            self._gate = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        if self._gate is not None:
            gate, self._gate = self._gate, None
            gate.set_result(None)

    @property
    def paused(self) -> bool:
        return self._gate is not None

    # ------------------------------------------------------------------ status

    def oldest_point(self) -> int:
        """The oldest seq (after origin) that reads resolve, by the read path's own
        tests: in the journal (``first_seq``) and resolvable by the maps (at or after
        ``keep_after``, or a retained point). 0 when nothing was written. O(retained)."""
        j = self.journal
        if not j.last_seq:
            return 0
        first = j.first_seq
        ka = self.maps.keep_after
        if not ka:
            return first
        pts = [p for p in self.maps.retained if p >= first]
        return min([*pts, max(ka, first)])

    def status(self) -> dict[str, Any]:
        """What ``cdpctl status`` shows. The recoverable range (``first_seq`` ..
        ``last_seq``) is :meth:`oldest_point` .. the head: what the read path accepts,
        also after gc expired the oldest points (``all_points_from_seq``: every point
        from there on; below it only retained points)."""
        j = self.journal
        st = j.stats()
        first = self.oldest_point()
        d: dict[str, Any] = {
            "volume": self.name,
            "size": self.size,
            "uuid": self.uuid,
            "paused": self.paused,
            "connections": self.connections,
            "first_seq": first,
            "last_seq": j.last_seq,
            "durable_seq": j.durable_seq,
            "first_time_ns": j.time_of_seq(first) if first else None,
            "all_points_from_seq": max(self.maps.keep_after, first),
            "last_time_ns": j.time_of_seq(j.last_seq) if j.last_seq else None,
            "journal_records": st.records,
            "written_bytes": st.raw_bytes,
            "journal_bytes": st.file_bytes,
            "compression_ratio": round(st.raw_bytes / st.stored_bytes, 3) if st.stored_bytes else None,
            "journal_segments": st.segments,
            "markers": len(self._markers),
            "newest_marker": self._markers[-1].to_dict() if self._markers else None,
            "session_writes": self.writes,
            "session_bytes_written": self.bytes_written,
            "maps": self.maps.stats(),
        }
        return d

    def grow(self, new_size: int) -> dict[str, Any] | None:
        """Grow the volume to *new_size* bytes (a multiple of 512, at most
        :data:`MAX_VOLUME_SIZE`): a recorded change, appended to volume.json's
        ``resizes`` (the head seq, the time, the old and new size) and written atomically.
        Shrinking is refused (UsageError); the same size changes nothing (None).

        Points before the resize keep their content and take the new size: the bytes
        past the old size never held data, so they read as zeros at every point (the
        map holds holes there); a rewind keeps the current size. Open exports keep the
        size they were opened with; a new connection sees the new one. Cost: one small
        file write."""
        check_size(new_size)
        if new_size < self.size:
            raise UsageError(
                f"volume {self.name}: shrinking ({self.size} -> {new_size} bytes) is refused: "
                "the bytes past the new end would be cut from every point in time; only "
                "growing is supported")
        if new_size == self.size:
            return None
        meta = read_meta(self.path)
        change = {"seq": self.journal.last_seq, "time_ns": time.time_ns(),
                  "from": self.size, "to": new_size}
        meta["size"] = new_size
        meta["resizes"] = [*meta.get("resizes", []), change]
        self._write_meta(self.path, meta)
        self.size = new_size
        self.view_regions.clear()  # regions resolved up to the old end
        return change

    # ------------------------------------------------------------------ persistence

    def _save_markers(self) -> None:
        save_markers(self.path / "markers.json", self._markers, self._next_marker_id)


class SealPacer:
    """Time-based seals of many volumes under one budget of event-loop time.

    Design notes
    ------------
    * A seal wrote a map file and the manifest with four fsyncs on the event loop
      (mapengine); the seals the I/O path starts now leave those fsyncs to the maps'
      writer thread (``MapHistory.seal(defer=True)``), the loop keeps the sort, the
      encoding and the writes into the page cache. With 64 volumes on one cdpd the ``seal_interval`` seals alone took
      40% of the loop (py-spy: 95 of 230 samples at a 2 s interval) and cut the
      aggregate ingest to 0.43x of the same run without them (tools/bench scale-wide);
      volumes started together also fell due in the same tick, stalling every
      connection for seconds at once.
    * So the daemon starts time-based seals through this pacer. Each tick it takes the
      due volumes, most overdue first (round robin in effect): the first always, the
      others while the credit lasts. The credit grows by :attr:`share` of the
      wall-clock time (10%, up to :attr:`burst` seconds); a seal started is charged
      the cost learnt from the earlier ones (:attr:`estimate`), and at the next tick
      what those volumes' seals really took on the loop (``Volume.seal_seconds``)
      replaces the guess. On an idle disk a seal costs a few ms and every volume is
      sealed on time; on a busy one the seals of lightly written volumes are spread
      out and their live windows stay live longer (each holds few writes; replay after
      a crash covers them). A one-volume store is never held back.
    * Only time-based seals are paced: size-based ones (``l0_max_writes``), markers,
      rewinds and close are not, and are not charged (a busy volume does not hold the
      others' time-based seals). No volume waits longer than :attr:`max_delay`
      intervals past due (12: one minute at the default ``seal_interval``).
    * Cost: O(volumes) per tick plus a sort of the due ones.
    """

    share = 0.10
    burst = 0.2
    max_delay = 12

    def __init__(self) -> None:
        self.credit = self.burst
        #: loop seconds one seal is expected to take (learnt from the seals started)
        self.estimate = 0.005
        self._last: float | None = None
        #: the volumes started at the last tick: id -> (volume, its seal_seconds then)
        self._started: dict[int, tuple[Volume, float]] = {}

    def due(self, volumes: Iterable[Volume], now: float | None = None) -> list[Volume]:
        """The volumes whose time-based seal may start now (``Volume.tick(seal=True)``);
        charges what the seals started at the last call cost."""
        now = time.monotonic() if now is None else now
        vols = list(volumes)
        started = self._started
        spent = sum(v.seal_seconds - before for v, before in started.values())
        elapsed = 0.0 if self._last is None else now - self._last
        self._last = now
        # the guesses of the last tick are replaced by what the seals really cost
        guessed = self.estimate * len(started)
        self.credit = min(self.burst, self.credit + guessed + self.share * elapsed) - spent
        if started:
            self.estimate = max(0.001, 0.5 * self.estimate + 0.5 * spent / len(started))
        over = sorted(((v.seal_overdue(now), i) for i, v in enumerate(vols)), reverse=True)
        out: list[Volume] = []
        for o, i in over:  # the most overdue first
            if o < 0:
                break
            v = vols[i]
            if not out or self.credit > 0 or o >= self.max_delay * v.settings.maps.seal_interval:
                out.append(v)
                self.credit -= self.estimate  # a guess until the next tick
        self._started = {id(v): (v, v.seal_seconds) for v in out}
        return out


@dataclass(frozen=True)
class _Hole:
    start: int
    end: int
    seq: int = 0
    loc: int = HOLE_LOC
    poff: int = 0


def read_meta(path: Path) -> dict[str, Any]:
    """The volume.json of volume directory *path* (NotFound if there is none,
    Corruption if it is not a volume.json of a known format)."""
    try:
        meta = json.loads((path / "volume.json").read_text())
    except FileNotFoundError:
        raise NotFound(f"no volume at {path}") from None
    except ValueError as e:
        raise Corruption(f"{path / 'volume.json'}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != VOLUME_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise Corruption(f"{path / 'volume.json'}: unsupported format {fmt!r}")
    return meta


__all__ = [
    "MAX_VOLUME_SIZE",
    "STATE_HOLE",
    "STATE_ZERO",
    "VOLUME_FORMAT",
    "SealPacer",
    "Volume",
    "VolumeService",
    "check_size",
    "map_policy",
    "read_meta",
]
