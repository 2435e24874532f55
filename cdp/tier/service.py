"""The tier service: a volume's sealed history uploaded to S3 (docs/TIER.md).

    svc = attach_tier(vol)          # by the store when [tier] url is set
    svc.start()                     # needs a running loop (cdpd: start_tiers(store))
    await svc.upload_now()          # one batch now (tests, tools); returns the generation
    svc.drop_uploaded()             # drop local copies the bucket holds (the task does it
                                    # after each of its batches)
    svc.status() -> dict            # what `cdpctl tier status` prints

Design notes
------------
- **A VolumeService with one task.** ``on_sealed`` / ``on_marker`` / ``on_rewind`` only
  wake the task (O(1), no I/O); it waits ``GATHER`` (2 s) more, so the seals of a busy
  stretch make one batch, not a generation per seal (each generation is a HEAD and
  three small PUTs, each a commit on the store's side, which on a test box shares the
  disk with the journal). The task lists the journal's sealed, durable segments old
  enough (``upload_after``), uploads the ones the newest generation lacks, in seq order,
  then the volume's state files, and ends the batch with a generation manifest. Every
  boto3 call, file read and hash runs in a worker thread (uploads in ``_UPLOADER``'s,
  fetches in asyncio's, so reads never queue behind uploads); the
  loop only plans and records.
- **Hashed one ahead.** A segment's key holds its sha256, so it is hashed (one read of
  the file) before its upload starts; each segment of a batch is hashed while the one
  before it is being sent, so the store is not idle while cdp hashes. A segment that
  fits one PUT is read once, into the buffer that is sent, and its sha256 is also the
  PUT's SigV4 payload hash (``cdp.tier.s3``: botocore does not hash it again; the store
  checks it). The parts of a multipart upload are still hashed by botocore as sent.
- **Only whole objects are referenced.** A manifest names an object only after its PUT
  or CompleteMultipartUpload returned; the manifest itself is the last PUT of a batch. A
  crash (cdpd kill -9) mid-upload leaves at most an incomplete multipart (aborted at the
  next start: ``abort_incomplete_uploads``) or a complete object no manifest names yet:
  the next batch finds it by HEAD (same key, same sha256) and reuses it rather than
  writing the key again. A batch cut off by an unreachable store (RGW killed
  mid-upload) may leave an incomplete multipart whose abort failed as well: the next
  batch first aborts the volume's incomplete uploads. Keys are never overwritten. Only segments that existed at
  start can have such an object (one cdpd per prefix), so only they are looked for:
  one listing of the volume's ``segments/`` at the first upload, then a HEAD of a key
  only if it is listed; one this process put in a batch that failed later is reused
  from memory.
- **Seq-ordered prefix.** The manifest covers the longest run of sealed segments from
  the journal's first that are uploaded, so ``last_seq`` is a point every earlier point
  of which the bucket can serve. ``markers.json`` goes up filtered to markers at or
  below ``last_seq``; the catalog snapshot goes up with the newest marker seq known
  when it was copied (``through_seq``), so recovery can tell whether it is usable.
- **Faults.** botocore retries each call (jittered backoff); a batch that still fails
  sets ``state`` to ``unreachable`` (connection, timeout, 5xx) or ``refused`` (403,
  bad credentials, other 4xx) with ``last_error``, and the task tries again after a
  backoff doubling from 1 s to 60 s. Ingest never waits for the tier: the journal stays
  local and the store's own ``on_full`` policy applies.
- **Garbage.** Objects that neither of the two newest generations names (segments local
  retention dropped or compaction rewrote, older state and manifests, objects a crash
  left unnamed) are deleted by :meth:`TierService.gc`, after a batch that dropped some
  and on `cdpctl tier gc`; it holds the batch lock, so an upload in flight is never
  garbage. Retention decides what expires (a segment leaves the manifest only once the
  local journal dropped it, i.e. every point it served expired; `--keep forever`
  markers pin theirs). A version still under object lock is refused by the store and
  skipped, logged and retried at the next gc, never deleted early.
- **Rate, and giving way.** ``rate`` bytes/s is a token bucket over segment bytes sent,
  paced between parts in the uploading thread; while the volume is busy the uploads
  also pause in proportion (``_Yield``, within the lag limit ``YIELD_LAG``). Both waits
  end at once when the tier stops (``stop()`` sets the event they wait on).
- **Local space.** After a batch whose generation is in the bucket, every sealed segment
  it names (same size, same compaction state) whose last record is older than
  ``upload_after``, except the newest ``KEEP_LOCAL`` sealed ones (the hot tail: recent
  points stay local), is dropped locally (``Journal.drop_segments``: the state write,
  unlinks and fsyncs in a worker thread). Its reads then go
  through the journal's read cache (``local_cache_bytes``) and, on a miss, through
  :meth:`TierService.fetch`, injected as ``journal.remote``: ranged GETs of exactly the
  records named, adjacent ones coalesced, in a worker thread; the bytes are checked by
  each record's CRC when read (a tampered object is Corruption, never data).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from cdp.config import TierSettings
from cdp.errors import (
    CdpError,
    Corruption,
    NotFound,
    OutOfRange,
    RemoteRefused,
    RemoteUnreachable,
    UsageError,
)
from cdp.journal import SealedFile
from cdp.journal.tiered import Range, cache_writer, index_cached
from cdp.markers import MARKERS_FORMAT, Marker
from cdp.tier.manifest import (
    Manifest,
    SegmentObject,
    StateObject,
    generation_key,
    generation_of,
    generations_prefix,
    segment_key,
    state_key,
    volume_prefix,
)
from cdp.tier.s3 import DEFAULT_PART, S3, ObjectRef, S3Settings, parse_s3_url
from cdp.volume import Volume, VolumeService

log = logging.getLogger("cdp.tier")
_T = TypeVar("_T")

#: states `cdpctl tier status` reports
STATES = ("off", "idle", "uploading", "unreachable", "refused")
CATALOG_FILE = "catalog.sqlite"
MAX_BACKOFF = 60.0
#: parts of one multipart segment upload in flight (memory: that many 8 MiB parts)
UPLOAD_WORKERS = 8
#: the newest sealed segments never dropped locally (the hot tail of recent points)
KEEP_LOCAL = 1
#: upload threads shared by every volume's tier (one batch uses one, plus its parts')
UPLOAD_THREADS = 4
#: seconds a wake-up (a seal, a marker) waits before its batch, so a busy stretch of
#: ingest makes one batch of several segments, not one generation per seal
GATHER = 2.0
#: missing records of one segment closer than this are fetched by one ranged GET
FETCH_GAP = 256 << 10
#: ranged GETs of one fetch in flight at once
FETCH_WORKERS = 8


#: how much nicer than cdpd the upload threads (and the part threads they start) run
UPLOAD_NICE = 10


def _lower_priority() -> None:
    """Run the calling thread ``UPLOAD_NICE`` nicer than it is (Linux: nice is per
    thread, and threads it starts inherit it). Raising nice needs no privilege."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + UPLOAD_NICE))


#: the threads that hash and upload segments, state and manifests, so a long upload never
#: holds the threads of asyncio's default executor that the fetches of tiered reads (which
#: serve hosts) use. They run at a lower priority (``UPLOAD_NICE``): on a core the event
#: loop needs, the tier's hashing and sending (~3 ms of CPU per MiB sent) waits for the
#: loop's idle time (its flushes) instead of taking half the core from ingest; on an idle
#: core nice changes nothing. (Measured on the shared bench box, where the test RGW's
#: daemons run on the same cores, upload fell from 0.82 to 0.70 of plain boto3 at nice
#: 10: there the store itself competes with the niced threads; see docs/TIER.md.)
_UPLOADER = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="cdp-tier-up",
                               initializer=_lower_priority)


async def _uploading(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in an upload thread."""
    return await asyncio.get_running_loop().run_in_executor(_UPLOADER, fn, *args)


def s3_settings(t: TierSettings) -> S3Settings:
    return S3Settings(endpoint=t.endpoint, region=t.region, credentials_file=t.credentials_file)


_clients: dict[S3Settings, S3] = {}
_clients_lock = threading.Lock()


def client_for(t: TierSettings) -> S3:
    """One shared :class:`S3` per connection settings (a boto3 client costs ~50-100 ms).
    ConfigError for a bad credentials file."""
    key = s3_settings(t)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = _clients[key] = S3(key)
        return c


def markers_doc(markers: list[Marker], through_seq: int) -> bytes:
    """markers.json (format 1) with the markers at or below *through_seq*."""
    kept = [m for m in markers if m.seq <= through_seq]
    doc = {"format": MARKERS_FORMAT, "next_id": max((m.id for m in kept), default=0) + 1,
           "markers": [{"id": m.id, "seq": m.seq, "time_ns": m.time_ns, "label": m.label}
                       for m in kept]}
    return json.dumps(doc, indent=1).encode() + b"\n"


def newest_manifest(s3: S3, bucket: str, prefix: str, volume: str) -> Manifest | None:
    """The newest generation manifest of *volume* that parses and checks, or None.
    Blocking: one listing plus one GET (more if the newest ones are damaged)."""
    gens = sorted(
        (g, o.key) for o in s3.list_objects(bucket, generations_prefix(prefix, volume))
        if (g := generation_of(o.key)) is not None
    )
    for _g, key in reversed(gens):
        where = f"s3://{bucket}/{key}"
        try:
            return Manifest.decode(s3.get_object(bucket, key), where)
        except CdpError as e:
            if isinstance(e, RemoteUnreachable | RemoteRefused):
                raise
            log.error("tier: skipping damaged manifest %s: %s", where, e)
    return None


def list_volumes(s3: S3, bucket: str, prefix: str) -> list[str]:
    """Names of the volumes with at least one generation manifest under the prefix."""
    names = set()
    root = f"{prefix}volumes/"
    for o in s3.list_objects(bucket, root):
        name, _, rest = o.key[len(root):].partition("/")
        if rest.startswith("generations/") and generation_of(rest) is not None:
            names.add(name)
    return sorted(names)


@dataclass
class _Run:
    """Records of one segment fetched by one ranged GET of bytes ``[off, end)``."""

    first: int
    key: str
    off: int
    end: int
    records: list[Range]


class _Pacer:
    """A token bucket: :meth:`take` waits (in the caller's thread) to keep *rate* B/s,
    and returns at once when *stopped* is set (the tier stopping: cdpd shutting down
    must not wait out a slow ``rate``)."""

    def __init__(self, rate: int, stopped: threading.Event | None = None) -> None:
        self.rate = rate
        self._stopped = stopped if stopped is not None else threading.Event()
        self._t = time.monotonic()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        self._t = max(self._t, time.monotonic()) + n / self.rate
        delay = self._t - time.monotonic() - 1.0  # one second of burst
        if delay > 0:
            self._stopped.wait(delay)


#: a volume appending at least this many bytes/s is busy: uploads give way (``_Yield``)
YIELD_RATE = 16 << 20
#: while busy, each PUT or part of t seconds is followed by a pause of t times the
#: volume's append rate over YIELD_RATE, at most YIELD_SHARE times t
YIELD_SHARE = 8.0
#: the lag limit: a pause never delays the upload of a segment past this many seconds
#: after its last record was written (plus ``upload_after``); older segments go at once
YIELD_LAG = 30.0


#: while the volume is busy (``YIELD_RATE``), uploaded segments are dropped locally only
#: once this many bytes of them wait: each drop is a state write, unlinks and two or
#: three fsyncs on the disk the journal flushes to
DROP_BUSY_BYTES = 256 << 20


class _Yield:
    """Uploads give way to a busy volume. :meth:`step` (the upload thread, before each
    PUT or part) looks at how many bytes the journal appended since the previous step;
    at ``YIELD_RATE`` or more it pauses ``rate / YIELD_RATE`` times as long as that
    interval (the PUT just made), at most ``YIELD_SHARE`` times: at 16 MiB/s of ingest
    the uploads send half the time, at 128 MiB/s or more a ninth, and the journal's
    flushes, the loop's core and (on a shared box) the store's disk are free the rest.
    Bounded by the lag limit: a pause never goes past ``room`` (the caller's: until
    ``YIELD_LAG`` seconds after the segment's last record, plus ``upload_after``), so
    sustained ingest delays each segment's upload by at most that much; a backlog older
    than that goes at full (niced) speed. Cost: two clock reads and one int read per step."""

    def __init__(self, appended: Callable[[], int], stopping: Callable[[], bool], *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        self._appended = appended
        self._stopping = stopping
        self._clock = clock
        self._sleep = sleep
        self._mark: tuple[float, int] | None = None
        #: seconds paused in this batch, and in all batches since start
        self.paused = 0.0
        self.total = 0.0

    def reset(self) -> None:
        """A new batch: a fresh pause budget; the first step only marks."""
        self._mark = None
        self.paused = 0.0

    def step(self, room: float = YIELD_LAG) -> None:
        """Before a PUT or part: pause if the volume is busy, for at most ``room``
        seconds (how long this upload may still be delayed: the lag limit)."""
        now, got = self._clock(), self._appended()
        mark = self._mark
        if mark is not None and now > mark[0] and room > 0:
            dt = now - mark[0]
            busy = (got - mark[1]) / dt / YIELD_RATE
            if busy >= 1.0:
                pause = min(dt * min(busy, YIELD_SHARE), room)
                end = now + pause
                while not self._stopping() and (left := end - self._clock()) > 0:
                    self._sleep(min(left, 0.1))
                paused = max(0.0, self._clock() - now)
                self.paused += paused
                self.total += paused
                now, got = self._clock(), self._appended()
        self._mark = (now, got)


class TierService(VolumeService):
    """Uploads one volume's sealed history to ``[tier] url`` (see the module notes)."""

    def __init__(self, vol: Volume, settings: TierSettings, *, store_uuid: str = "",
                 s3: S3 | None = None, autostart: bool = True) -> None:
        self.vol = vol
        self.settings = settings
        self.bucket, self.prefix = parse_s3_url(settings.url)
        self.store_uuid = store_uuid
        self._s3 = s3
        self.state = "idle"
        self.last_error: str | None = None
        self.manifest: Manifest | None = None
        #: bytes of segments sent since start (not counting reused objects)
        self.sent_bytes = 0
        self.batches = 0
        self.failures = 0
        #: tiered objects deleted by gc since start; objects the last gc found locked
        self.gc_deleted = 0
        self.gc_locked = 0
        self._loaded = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: (monotonic time, journal bytes appended) at the task's last look at dropping
        self._drop_mark: tuple[float, int] | None = None
        #: set by :meth:`stop`: a pacing or yielding upload thread returns at once
        self._stopped = threading.Event()
        self._pacer = _Pacer(settings.rate, self._stopped)
        j = vol.journal
        self._yield = _Yield(lambda: j.appended_bytes, self._stopped.is_set,
                             sleep=self._stopped.wait)
        self._lock = asyncio.Lock()
        self._gc_due = False
        self._stopping = False
        #: start the task on the first seal/marker when a loop runs (cdpd); tests drive
        #: batches themselves with :meth:`upload_now`
        self._auto = autostart
        #: segments dropped locally since start; ranged GETs, the records they brought,
        #: and their bytes
        self.dropped_segments = 0
        self.fetches = 0
        self.fetched_records = 0
        self.fetched_bytes = 0
        #: segment keys this process put; segments whose object a crash (before this
        #: start) may have left unnamed end at this seq: only those are HEADed first
        self._put_keys: set[str] = set()
        self._orphans_upto = vol.journal.last_seq
        #: keys under the volume's segments/ listed once, at the first upload (see _left_keys)
        self._listed: set[str] | None = None
        #: abort the volume's incomplete multipart uploads before the next batch (set
        #: when a batch failed unreachable: its upload's abort may have failed too)
        self._abort_due = False
        vol.journal.set_cache_bytes(settings.local_cache_bytes)
        vol.journal.remote = self.fetch

    @property
    def s3(self) -> S3:
        if self._s3 is None:
            self._s3 = client_for(self.settings)
        return self._s3

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    # ------------------------------------------------------------------ service callbacks

    def on_sealed(self, vol: Volume, seq: int) -> None:
        self._kick()

    def on_marker(self, vol: Volume, marker: Marker) -> None:
        self._kick()

    def on_rewind(self, vol: Volume, seq: int, target_seq: int) -> None:
        self._kick()

    def _kick(self) -> None:
        self._wake.set()
        if self._task is None and self._auto:
            with contextlib.suppress(RuntimeError):  # no running loop (offline tools)
                self.start()

    def close(self, vol: Volume) -> None:
        self.stop()

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the upload task (needs a running event loop); idempotent."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._stopped.clear()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        self._auto = False
        self._stopping = True  # an upload in a worker thread aborts at its next part
        self._stopped.set()  # and a paced or yielding one stops waiting
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def upload_now(self) -> int:
        """Run one batch now (waits for one in progress); the newest generation number
        (0: none yet). Raises the batch's error (RemoteUnreachable, RemoteRefused, ...)."""
        async with self._lock:
            await self._batch()
        return self.manifest.generation if self.manifest else 0

    @property
    def running(self) -> bool:
        """The upload task runs (in cdpd): it loads the manifest itself."""
        return self._task is not None and not self._task.done()

    async def refresh(self) -> None:
        """Load the newest manifest from the bucket if not done yet (status on a stopped
        store); a failure only sets ``state``/``last_error``."""
        if self._loaded:
            return
        try:
            self.manifest = await asyncio.to_thread(
                newest_manifest, self.s3, self.bucket, self.prefix, self.vol.name)
            self._loaded = True
        except (RemoteUnreachable, RemoteRefused) as e:
            self.state = "refused" if isinstance(e, RemoteRefused) else "unreachable"
            self.last_error = str(e)

    def pending(self) -> list[Any]:
        """Sealed, durable segments the newest generation does not hold (any age)."""
        have = self._have()
        return [i for i in self.vol.journal.sealed_segments()
                if (o := have.get(i.first_seq)) is None or o.size != i.bytes]

    def status(self) -> dict[str, Any]:
        """The fields of `cdpctl tier status`. O(segments)."""
        j = self.vol.journal
        pend = self.pending()
        oldest = 0.0
        if pend:
            now = time.time_ns()
            oldest = max(0.0, (now - j.time_of_seq(pend[0].last_seq)) / 1e9)
        m = self.manifest
        return {
            "volume": self.vol.name, "url": self.url, "state": self.state,
            "generation": m.generation if m else 0,
            "uploaded_seq": m.last_seq if m else 0,
            "uploaded_segments": len(m.segments) if m else 0,
            "pending_segments": len(pend),
            "uploaded_bytes": sum(s.size for s in m.segments) if m else 0,
            "local_bytes": j.local_bytes(),
            "oldest_pending_age_seconds": round(oldest, 3),
            "cache_hit_ratio": self.cache_hit_ratio(),
            "dropped_segments": len(j.dropped_segments()),
            "sent_bytes": self.sent_bytes,
            "yielded_seconds": round(self._yield.total, 3),
            "last_error": self.last_error,
        }

    def cache_hit_ratio(self) -> float | None:
        """Hits / lookups of the journal's read cache of tiered records since open;
        None before the first read of tiered history."""
        hits, misses, _n = self.vol.journal.cache_stats()
        return round(hits / (hits + misses), 4) if hits + misses else None

    # ------------------------------------------------------------------ tiered reads

    async def fetch(self, ranges: list[tuple[int, int, int]]) -> None:
        """GET byte ranges ``(first_seq, offset, length)`` of dropped segments (whole
        stored records) from their objects in the newest generation and put them in the
        journal's read cache. Records of one segment closer than ``FETCH_GAP`` share one
        ranged GET (the gap's bytes are read and dropped: cheaper than a round-trip);
        the GETs (up to ``FETCH_WORKERS`` at once) and the cache file writes run in a
        worker thread, only the cache's index is updated on the loop. NotFound if a
        segment is in no generation; RemoteUnreachable/Refused as any S3 call;
        Corruption if an object is shorter than a range."""
        if not self._loaded:
            await self.refresh()
        have = self._have()
        runs: list[_Run] = []
        for r in sorted(set(ranges)):
            first, off, n = r
            o = have.get(first)
            if o is None:
                raise NotFound(f"volume {self.vol.name}: segment {first} is dropped locally "
                               f"but no generation at {self.url} names it")
            last = runs[-1] if runs else None
            if last is not None and last.first == first and off - last.end <= FETCH_GAP:
                last.end = max(last.end, off + n)
                last.records.append(r)
            else:
                runs.append(_Run(first, o.key, off, off + n, [r]))
        if not runs:
            return
        j = self.vol.journal
        written = await asyncio.to_thread(self._get_runs, runs, cache_writer(j))
        index_cached(j, written)
        self.fetches += len(runs)
        self.fetched_records += len(written)
        self.fetched_bytes += sum(r.end - r.off for r in runs)

    def _get_runs(self, runs: list[_Run],
                  write: Callable[[Iterable[Range], int, bytes], list[Range]]) -> list[Range]:
        """One ranged GET per run, several at once; each run's records written to the
        cache directory as they arrive. Worker thread."""
        def one(run: _Run) -> list[Range]:
            n = run.end - run.off
            try:
                data = self.s3.get_range(self.bucket, run.key, run.off, n)
            except OutOfRange:
                data = b""
            if len(data) != n:
                raise Corruption(f"s3://{self.bucket}/{run.key}: {len(data)} bytes at offset "
                                 f"{run.off}, expected {n} (object changed behind cdp's back?)")
            return write(run.records, run.off, data)

        if len(runs) == 1:
            return one(runs[0])
        with ThreadPoolExecutor(min(FETCH_WORKERS, len(runs))) as pool:
            return [r for got in pool.map(one, runs) for r in got]

    def drop_uploaded(self) -> int:
        """Drop the local copy of every sealed segment the newest generation holds as
        it is (size, compaction), older than ``upload_after``, but the newest
        ``KEEP_LOCAL`` sealed ones; bytes freed. Blocking file writes and fsyncs in the
        calling thread (the task uses :meth:`drop_uploaded_async`)."""
        freed = 0
        for first in self._droppable():
            try:
                freed += self.vol.journal.drop_segment(first)
            except (UsageError, NotFound) as e:
                log.info("tier %s: keeping segment %d local: %s", self.vol.name, first, e)
                continue
            self.dropped_segments += 1
        self._log_freed(freed)
        return freed

    async def drop_uploaded_async(self) -> int:
        """:meth:`drop_uploaded` with the state write, unlinks and fsyncs in a worker
        thread (``Journal.drop_segments``): the loop only switches the segments to the
        read cache."""
        firsts = self._droppable()
        if not firsts:
            return 0
        j = self.vol.journal
        before = len(j.dropped_segments())
        freed = await j.drop_segments(firsts)
        self.dropped_segments += len(j.dropped_segments()) - before
        self._log_freed(freed)
        return freed

    def _log_freed(self, freed: int) -> None:
        if freed:
            log.info("tier %s: dropped %d bytes of uploaded segments locally",
                     self.vol.name, freed)

    def _droppable(self) -> list[int]:
        """First seqs of the segments :meth:`drop_uploaded` drops, oldest first."""
        if self.manifest is None:
            return []
        j = self.vol.journal
        have = self._have()
        now = time.time_ns()
        after = int(self.settings.upload_after * 1e9)
        sealed = j.sealed_segments()
        out: list[int] = []
        for info in sealed[: max(0, len(sealed) - KEEP_LOCAL)]:
            o = have.get(info.first_seq)
            if (not info.local or o is None or o.size != info.bytes
                    or o.compacted != info.compacted or info.records == 0):
                continue
            if after and now - j.time_of_seq(info.last_seq) < after:
                break
            out.append(info.first_seq)
        return out

    # ------------------------------------------------------------------ the task

    def _drop_now(self) -> bool:
        """Whether the task drops uploaded segments now: unless the journal appended
        ``YIELD_RATE`` or more since the last look and less than ``DROP_BUSY_BYTES`` of
        uploaded segments wait to be dropped (a busy volume's flushes keep the disk; the
        local copies go once it is quieter, or once that much waits). O(segments)."""
        j = self.vol.journal
        now, got = time.monotonic(), j.appended_bytes
        mark, self._drop_mark = self._drop_mark, (now, got)
        if mark is None or now <= mark[0] or (got - mark[1]) / (now - mark[0]) < YIELD_RATE:
            return True
        sizes = {i.first_seq: i.bytes for i in j.sealed_segments()}
        return sum(sizes.get(f, 0) for f in self._droppable()) >= DROP_BUSY_BYTES

    async def _run(self) -> None:
        delay = 1.0
        self._drop_mark = (time.monotonic(), self.vol.journal.appended_bytes)
        with contextlib.suppress(Exception):
            n = await asyncio.to_thread(self.s3.abort_incomplete_uploads, self.bucket,
                                        volume_prefix(self.prefix, self.vol.name))
            if n:
                log.info("tier %s: aborted %d incomplete upload(s) left by a crash", self.vol.name, n)
        while True:
            wait = max(1.0, self.settings.upload_after / 4) if self.settings.upload_after else 30.0
            try:
                async with self._lock:
                    await self._batch()
                    if self._drop_now():
                        await self.drop_uploaded_async()
                    else:  # deferred while busy: look again soon
                        wait = min(wait, GATHER)
                delay = 1.0
                if self._gc_due:
                    self._gc_due = False
                    await self.gc()
            except asyncio.CancelledError:
                raise
            except (RemoteUnreachable, RemoteRefused) as e:
                wait, delay = delay, min(MAX_BACKOFF, delay * 2)
                log.warning("tier %s: %s (retry in %.0f s)", self.vol.name, e, wait)
            except Exception as e:  # keep the task alive: ingest must never depend on it
                self.state, self.last_error = "unreachable", str(e)
                wait, delay = delay, min(MAX_BACKOFF, delay * 2)
                log.exception("tier %s: batch failed (retry in %.0f s)", self.vol.name, wait)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                continue
            await asyncio.sleep(GATHER)  # let the seals of a busy stretch make one batch

    def _have(self) -> dict[int, SegmentObject]:
        return {s.first_seq: s for s in self.manifest.segments} if self.manifest else {}

    async def _batch(self) -> None:
        """One batch: the missing segments, then state, then a manifest (only if
        something changed). Sets ``state``/``last_error``; raises on failure."""
        try:
            if self._abort_due:  # a failed upload whose abort may have failed too
                await asyncio.to_thread(self.s3.abort_incomplete_uploads, self.bucket,
                                        volume_prefix(self.prefix, self.vol.name))
                self._abort_due = False
            await self._batch_inner()
        except RemoteRefused as e:
            self.state, self.last_error = "refused", str(e)
            self.failures += 1
            raise
        except RemoteUnreachable as e:
            self.state, self.last_error = "unreachable", str(e)
            self.failures += 1
            self._abort_due = True  # an upload cut off may be left incomplete
            raise
        self.state = "idle"

    async def _batch_inner(self) -> None:
        vol, j = self.vol, self.vol.journal
        if not self._loaded:
            self.manifest = await asyncio.to_thread(
                newest_manifest, self.s3, self.bucket, self.prefix, vol.name)
            self._loaded = True
        have = self._have()
        now = time.time_ns()
        after = int(self.settings.upload_after * 1e9)
        plan: list[SegmentObject | int] = []
        for info in j.sealed_segments():
            o = have.get(info.first_seq)
            if o is not None and o.size == info.bytes and o.compacted == info.compacted:
                plan.append(o)
                continue
            if after and now - j.time_of_seq(info.last_seq) < after:
                break
            plan.append(info.first_seq)
        chain = await self._upload_chain(plan)
        prev = self.manifest
        last_seq = chain[-1].last_seq if chain else (prev.last_seq if prev else 0)
        if not chain and prev is None:
            return
        markers = markers_doc(vol.markers, last_seq)
        msha = hashlib.sha256(markers).hexdigest()
        same_segments = prev is not None and prev.segments == chain
        old_m = prev.state_named("markers.json") if prev else None
        if same_segments and old_m is not None and old_m.sha256 == msha:
            return
        self.state = "uploading"
        gen = (prev.generation if prev else 0) + 1
        state = await _uploading(self._put_state, gen, markers, last_seq)
        m = Manifest(generation=gen, volume=vol.name, volume_uuid=vol.uuid, size=vol.size,
                     last_seq=last_seq, created_ns=time.time_ns(), store_uuid=self.store_uuid,
                     segments=chain, state=state)
        key = generation_key(self.prefix, vol.name, gen)
        await _uploading(partial(self.s3.put_object, self.bucket, key, m.encode(),
                                 retain_until=self._until()))
        dropped = prev is not None and bool({k for k, _s, _h in prev.objects()}
                                            - {k for k, _s, _h in m.objects()})
        self.manifest = m
        self.batches += 1
        if dropped or self.gc_locked:
            self._gc_due = True
        self.last_error = None
        log.info("tier %s: generation %d (%d segments through seq %d) at %s",
                 vol.name, gen, len(chain), last_seq, self.url)

    async def _upload_chain(self, plan: list[SegmentObject | int]) -> list[SegmentObject]:
        """The objects of ``plan``, in order: those the bucket already holds as they are,
        and the segments named by first seq, uploaded one after the other. Each segment
        is opened and hashed (``_stage``) in an upload thread while the one before it is
        being sent, so the store is not left idle while cdp hashes (a 256 MiB segment is
        ~0.15 s of sha256). Stops before a segment replaced meanwhile (compaction): the
        next batch takes it."""
        firsts = [p for p in plan if isinstance(p, int)]
        after = dict(itertools.pairwise(firsts))
        self._yield.reset()
        #: staged segments not handed to a send yet (the current one, and the next)
        ahead: dict[int, tuple[Future[_Staged], SealedFile]] = {}
        chain: list[SegmentObject] = []
        try:
            for p in plan:
                if not isinstance(p, int):
                    chain.append(p)
                    continue
                if p not in ahead and not self._stage(p, ahead):
                    break  # replaced meanwhile (compaction): next batch
                self.state = "uploading"
                staged = await asyncio.wrap_future(ahead[p][0])
                del ahead[p]
                nxt = after.get(p)
                if nxt is not None:
                    self._stage(nxt, ahead)  # hashed while this one is sent
                # the worker thread owns the file from here and closes it: a cancelled
                # await (cdpd stopping) must not close a descriptor the thread still reads
                chain.append(await _uploading(self._send_owned, staged))
        finally:
            for cf, f in ahead.values():  # staged, never to be sent: close their files
                cf.add_done_callback(partial(_discard, f))
        return chain

    def _stage(self, first: int, ahead: dict[int, tuple[Future[_Staged], SealedFile]]) -> bool:
        """Open segment ``first`` and start hashing it in an upload thread (into
        ``ahead``); False if it is gone (replaced by compaction)."""
        j = self.vol.journal
        try:
            f = j.open_sealed(first)
        except NotFound:
            return False
        try:  # the lag limit of its uploads' pauses for a busy volume (_Yield)
            due = j.time_of_seq(f.last_seq) / 1e9 + self.settings.upload_after + YIELD_LAG
        except CdpError:
            due = 0.0  # unknown: never paused for
        ahead[first] = (_UPLOADER.submit(self._hash_owned, f, due), f)
        return True

    async def gc(self) -> dict[str, int]:
        """Delete the volume's objects that neither of the two newest generations names
        (segments local retention dropped or compaction replaced, older state and
        manifests, objects a crash left unnamed). Runs between batches (the batch lock),
        so an upload in progress is never taken for garbage. An object still under
        object lock is refused by the store: skipped, logged, tried again at the next gc.
        Returns counts: ``deleted``, ``locked``, ``kept``."""
        async with self._lock:
            if not self._loaded:
                await self.refresh()
            if self.manifest is None:
                return {"deleted": 0, "locked": 0, "kept": 0}
            return await asyncio.to_thread(self._gc, self.manifest)

    def _gc(self, newest: Manifest) -> dict[str, int]:
        keep = {k for k, _s, _h in newest.objects()}
        keep.add(generation_key(self.prefix, self.vol.name, newest.generation))
        if newest.generation > 1:
            with contextlib.suppress(NotFound, CdpError):
                key = generation_key(self.prefix, self.vol.name, newest.generation - 1)
                prev = Manifest.decode(self.s3.get_object(self.bucket, key), key)
                keep.add(key)
                keep.update(k for k, _s, _h in prev.objects())
        root = volume_prefix(self.prefix, self.vol.name)
        doomed = [ObjectRef(o.key, o.version_id)
                  for o in self.s3.list_versions(self.bucket, root) if o.key not in keep]
        if not doomed:
            return {"deleted": 0, "locked": 0, "kept": len(keep)}
        r = self.s3.delete_objects(self.bucket, doomed)
        for f in r.refused:
            log.info("tier %s: gc skips s3://%s/%s (%s: %s); retried at the next gc",
                     self.vol.name, self.bucket, f.ref.key, f.code, f.message)
        self.gc_deleted += len(r.deleted)
        self.gc_locked = len(r.refused)
        return {"deleted": len(r.deleted), "locked": len(r.refused), "kept": len(keep)}

    def _until(self) -> datetime | None:
        days = self.settings.object_lock_days
        return datetime.now(UTC) + timedelta(days=days) if days else None

    # ------------------------------------------------------------------ worker-thread parts

    def _hash_owned(self, f: SealedFile, due: float = 0.0) -> _Staged:
        """Hash a sealed segment (closing it on failure; on success the :class:`_Staged`
        holds it open for :meth:`_send_owned`). Worker thread. Cost: one read of the
        file and its sha256 (~1.5 GB/s with SHA-NI). A segment that fits one PUT is
        read once, into the buffer the PUT sends (no copy), and its digest signs that
        PUT (botocore does not hash it again: see ``cdp.tier.s3``)."""
        try:
            whole = f.read_all() if f.size <= DEFAULT_PART else None  # read once
            h = hashlib.sha256(whole if whole is not None else b"")
            if whole is None:  # one buffer reused for every chunk
                buf = bytearray(DEFAULT_PART)
                view = memoryview(buf)
                for off in range(0, f.size, DEFAULT_PART):
                    n = min(DEFAULT_PART, f.size - off)
                    if f.read_into(buf, off) < n:
                        raise CdpError(f"segment {f.name} shrank while being hashed")
                    h.update(view[:n])
                view.release()
            return _Staged(f, h.hexdigest(), whole, due)
        except BaseException:
            f.close()
            raise

    def _send_owned(self, st: _Staged) -> SegmentObject:
        try:
            return self._send(st)
        finally:
            st.f.close()

    def _send(self, st: _Staged) -> SegmentObject:
        """Upload one hashed segment (reusing an identical complete object left by a
        crash). Worker thread."""
        f, digest, whole = st.f, st.digest, st.whole
        key = segment_key(self.prefix, self.vol.name, f.first_seq, digest)
        obj = SegmentObject(key, f.first_seq, f.last_seq, f.records, f.size, digest, f.compacted)
        if key in self._put_keys:  # this process put it (its batch failed after the PUT)
            return obj
        if f.first_seq <= self._orphans_upto and key in self._left_keys():
            # a crash before this start put it: reuse it if it is whole
            with contextlib.suppress(NotFound):
                info = self.s3.head(self.bucket, key)
                if info.size == f.size and info.sha256 == digest:
                    return obj
        until = self._until()
        if whole is not None:
            self._yield.step(st.due - time.time())
            self._pacer.take(len(whole))
            if self._stopping:  # nothing sent; the next start uploads it
                raise CdpError(f"tier of {self.vol.name} stopping: upload of {f.name} abandoned")
            self.s3.put_object(self.bucket, key, whole, sha256=digest, retain_until=until)
        else:
            self.s3.put_multipart(self.bucket, key, self._parts(f, st.due), sha256=digest,
                                  retain_until=until, workers=UPLOAD_WORKERS)
        self.sent_bytes += f.size
        self._put_keys.add(key)
        return obj

    def _left_keys(self) -> set[str]:
        """The keys under the volume's ``segments/`` when first asked: one listing (1000
        keys per request) instead of a HEAD per segment that existed at start, nearly
        all of which answer 404 (each ~1.5-3 ms of the cdp core's CPU, ~10 ms of wall:
        a backlog of 12 segments cost ~36 ms of CPU before its first byte went up).
        Only a listed key is HEADed. Worker thread; two threads listing at once is
        harmless (the same keys)."""
        if self._listed is None:
            where = volume_prefix(self.prefix, self.vol.name) + "segments/"
            self._listed = {o.key for o in self.s3.list_objects(self.bucket, where)}
        return self._listed

    def _parts(self, f: SealedFile, due: float = 0.0) -> Iterator[bytearray]:
        for off in range(0, f.size, DEFAULT_PART):
            try:  # read straight into the buffer the part sends (no copy)
                data = f.read_range(off, min(DEFAULT_PART, f.size - off))
            except Corruption:
                raise CdpError(f"segment {f.name} shrank while being uploaded") from None
            if self._stopping:  # the multipart is aborted; the next start uploads it whole
                raise CdpError(f"tier of {self.vol.name} stopping: upload of {f.name} abandoned")
            self._yield.step(due - time.time())
            self._pacer.take(len(data))
            if self._stopping:
                raise CdpError(f"tier of {self.vol.name} stopping: upload of {f.name} abandoned")
            yield data

    def _put_state(self, gen: int, markers: bytes, last_seq: int) -> list[StateObject]:
        """volume.json, markers.json (filtered) and a catalog snapshot under the
        generation's state prefix. Worker thread."""
        out: list[StateObject] = []
        until = self._until()

        def put(name: str, data: bytes, through: int) -> None:
            key = state_key(self.prefix, self.vol.name, gen, name)
            r = self.s3.put_object(self.bucket, key, data, retain_until=until)
            out.append(StateObject(name, key, r.size, r.sha256, through))

        put("volume.json", (self.vol.path / "volume.json").read_bytes(), 0)
        put("markers.json", markers, last_seq)
        db = self.vol.path / CATALOG_FILE
        if db.exists():
            through = max((m.seq for m in self.vol.markers), default=0)
            snap = _sqlite_snapshot(db)
            if snap is not None:
                put(CATALOG_FILE, snap, through)
        return out


@dataclass
class _Staged:
    """A sealed segment open and hashed, ready to send: its sha256 (hex), its bytes
    when it fits one PUT (read once), and the lag limit of its pauses (``_Yield``)."""

    f: SealedFile
    digest: str
    whole: bytearray | None
    #: wall time (s) after which its upload no longer pauses for a busy volume
    due: float = 0.0


def _discard(f: SealedFile, cf: Future[_Staged]) -> None:
    """Close the file of a staged segment that will not be sent (a hash that failed
    closed it already)."""
    if cf.cancelled():
        f.close()
    elif cf.exception() is None:
        cf.result().f.close()


def _sqlite_snapshot(db: Path) -> bytes | None:
    """A consistent copy of an SQLite file (the backup API into memory, then its file
    image: the same pages as a copy on disk, but no temporary file, so no fsyncs on the
    journal's disk per batch), or None if it cannot be read now (logged; the next
    generation tries again). Memory: one copy of the catalog."""
    try:
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        dst = sqlite3.connect(":memory:")
        try:
            src.backup(dst)
            return dst.serialize()
        finally:
            dst.close()
            src.close()
    except sqlite3.Error as e:
        log.warning("tier: catalog snapshot of %s failed: %s", db, e)
        return None


# ---------------------------------------------------------------------- store glue


def attach_tier(vol: Volume, *, store_uuid: str = "") -> TierService:
    """Attach *vol*'s tier service (``[tier] url`` must be set); the attached one if any."""
    for s in vol.services:
        if isinstance(s, TierService):
            return s
    if not store_uuid:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            store_uuid = str(json.loads((vol.path.parent.parent / "store.json").read_text())["uuid"])
    svc = TierService(vol, vol.settings.tier, store_uuid=store_uuid)
    vol.attach(svc)
    return svc


def tier_of(vol: Volume) -> TierService | None:
    """The tier service of *vol*, None when ``[tier]`` is off."""
    for s in vol.services:
        if isinstance(s, TierService):
            return s
    return None


def check_tier(settings: TierSettings) -> None:
    """Start-up checks of ``[tier]``: the URL, the credentials file, and with
    ``object_lock_days`` that the bucket has object lock (ConfigError, a clear message).
    An unreachable bucket is logged, not fatal: ingest never waits for the tier. Blocking."""
    bucket, _ = parse_s3_url(settings.url)
    s3 = client_for(settings)
    if settings.object_lock_days:
        try:
            s3.require_object_lock(bucket)
        except RemoteUnreachable as e:
            log.warning("tier: cannot check object lock of %s now: %s", bucket, e)


def start_tiers(volumes: Iterable[Volume]) -> int:
    """Start the tier task of every volume that has one (on the running loop); how many."""
    n = 0
    for v in volumes:
        svc = tier_of(v)
        if svc is not None:
            svc.start()
            n += 1
    return n
