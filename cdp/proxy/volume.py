"""Proxy mode ("appliance in the data path"): the appliance owns the primary volume.

The host talks only to the appliance; every write goes to the primary *and* the
journal. See docs/PROXY.md for the operator's view. The parts: :mod:`cdp.proxy.base`
(shared state, DRL durability), :mod:`cdp.proxy.copy` (initial copy),
:mod:`cdp.proxy.reconcile` (crash reconcile, catch-up, rewind), :mod:`cdp.proxy.workers`
(worker threads, range queue), :mod:`cdp.proxy.primary` (file and NBD primaries),
:mod:`cdp.proxy.drl` (the dirty region log file).

Design notes
------------
* **Write path.** A write first waits for any barrier on its range (initial copy of the
  region, journal catch-up, rewind rewrite). If it touches a region that is clean in
  the dirty region log (:mod:`cdp.proxy.drl`), the bit is set and the DRL page
  fdatasync'd (concurrent writers share one DRL sync) before anything moves. Then, in
  one synchronous step on the event loop, the record is appended to the journal
  through the volume's one append path (buffered, sealed without blocking, exactly as
  a mirror volume) and the primary write is registered in the range queue and queued:
  for a file primary, on the one writer thread (:class:`~cdp.proxy.workers.Writer`:
  one hand-off per loop turn, queue order, ``pwritev`` per contiguous run; a batch
  whose writes overlap nothing else in it is one ``lio_listio``,
  :mod:`cdp.proxy.lio`, so the thread takes the GIL back once per batch); for an NBD
  primary, on the worker pool after the earlier writes it overlaps. Either way writes
  whose ranges overlap reach the primary in the order their records were appended, so
  the journal's order and the primary's final content always agree. The common case
  (nothing to wait for) creates no coroutine and no future: ``write`` returns the host
  write itself, a :class:`~cdp.targets.completion.Completion` that the writer's
  results (and, when asked, a journal commit) finish; the NBD server registers a plain
  callback on it, and the writes a batch finishes send their replies together at the
  batch's end, in the turn the writer's wake-up runs. ``ack = "primary"`` replies when
  the primary write completed; ``ack = "both"`` also waits for the journal record to be
  durable (group commit, running concurrently with the primary write; the writes of
  each loop turn start their own commit while earlier ones run, up to four, which the
  journal pipelines). The volume's services
  admit the write first (retention's ``on_full = "refuse"``): a refused write moves
  nothing on either side.
* **Reads** come from the primary, except point-in-time reads (the journal) and reads
  during a rewind (the journal's head, i.e. the target state). What the page cache
  holds of a file primary is read on the loop and answered at once (``preadv2`` with
  ``RWF_NOWAIT`` never waits for the disk); the rest goes to the worker threads.
* **Errors.** A failed primary write answers EIO and appends an ERROR record
  (code 1); the region is queued for catch-up so the journal again describes what the
  primary holds. A failed journal append (ENOSPC, a failed sync) with ``ack =
  "primary"`` still acknowledges the host: the volume is *degraded*, the region stays
  dirty and queued, and a background task catches the journal up from the primary when
  it can (ERROR record code 2 describing the gap, then WRITE records of the primary's
  content where it differs from the journal's head).
* **Clean regions, lazily.** About once a second a cleaner takes the dirty regions with
  nothing in flight and no write for ``CLEAN_IDLE_TICKS`` (8) seconds, makes the
  primary and the journal durable, and clears those not touched meanwhile (the DRL
  pages are written without anyone waiting for them). A region under steady writes
  thus stays dirty, and its writes skip the DRL sync.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Self

from cdp.config import Settings
from cdp.errors import CdpError, Corruption, UsageError
from cdp.proxy import lio
from cdp.proxy.base import ERR_PRIMARY_WRITE
from cdp.proxy.copy import InitialCopy
from cdp.proxy.drl import DEFAULT_REGION, DirtyRegionLog, check_region_bytes
from cdp.proxy.primary import FilePrimary, open_primary
from cdp.proxy.reconcile import Reconcile
from cdp.proxy.workers import RangeOp, Workers, Writer
from cdp.targets import completion
from cdp.targets.completion import Completion

log = logging.getLogger("cdp.proxy")

ACKS = ("primary", "both")
DRL_NAME = "drl"
CLEAN_DELAY = 1.0  # seconds between cleaner runs
#: a region is cleaned once unwritten for this many ticks (~seconds). Long enough that a
#: region under steady writes stays dirty: cleaning it would cost the primary's and the
#: journal's fdatasync and then, at its next write, a DRL sync the write waits for
#: (issue 23: at 2 ticks, random 4 KiB writes over the whole volume kept cleaning and
#: re-dirtying regions)
CLEAN_IDLE_TICKS = 8
RETRY_DELAY = 1.0  # seconds between catch-up attempts
#: journal commits run at once for writes that wait for durability (the journal's
#: SYNCS_IN_FLIGHT: more would only wait for a sync thread)
COMMITS_IN_FLIGHT = 4
CACHED_READ_MAX = 1 << 20  # larger live reads always go to the worker threads
#: a file primary's writer hands a batch of non-overlapping writes to glibc at once
#: (:mod:`cdp.proxy.lio`) where it can
USE_LIO = lio.available


def proxy_meta(primary: str, ack: str = "primary") -> dict[str, Any]:
    """The volume.json keys of a proxy-mode volume."""
    if ack not in ACKS:
        raise UsageError(f"ack must be one of {', '.join(ACKS)}, got {ack!r}")
    if not primary:
        raise UsageError("proxy mode needs a primary (a file, block device or nbd:// URL)")
    return {"mode": "proxy", "primary": primary, "ack": ack}


def primary_size(primary: str) -> int:
    """Size in bytes of a primary (opens and closes it)."""
    p = open_primary(primary, connections=1)
    try:
        return int(p.size)
    finally:
        p.close()


def create_drl(path: Path, size: int, region: int = DEFAULT_REGION, initial_copy: bool = True) -> None:
    """Write the DRL of a new proxy volume (before the volume is first opened)."""
    regions = -(-size // region)
    DirtyRegionLog.create(path / DRL_NAME, size, region, copy_next=0 if initial_copy else regions).close()


class _HostWrite(Completion):
    """One host write between its journal append and its reply, which is the write
    itself (a :class:`~cdp.targets.completion.Completion`: the NBD server's callback,
    or awaiters): it is finished once its *pending* parts are done, the primary write
    and, when asked, the journal record's durability."""

    __slots__ = ("data", "fua", "jerr", "length", "offset", "op", "pending", "perr", "regs", "seq")

    def __init__(self, offset: int, length: int, data: bytes | bytearray | None, fua: bool,
                 regs: range) -> None:
        Completion.__init__(self)
        self.offset = offset
        self.length = length
        self.data = data
        self.fua = fua
        self.regs = regs
        self.op: RangeOp = None  # type: ignore[assignment]  # set by _start
        self.seq = 0
        self.pending = 1
        self.perr: BaseException | None = None
        self.jerr: BaseException | None = None


class ProxyVolume(InitialCopy, Reconcile):
    """A volume whose appliance owns the primary (mode ``proxy`` in volume.json).

    Like an nbdkit filter on its plugin, it uses :class:`~cdp.volume.Volume` through the
    public API plus only these protected members: ``_record_write``, ``_record_zero``,
    ``_record_error`` (the one append path), ``_admit`` (services' admission of a host
    write), ``_check_range``, ``_gate`` (read: paused?), ``_sync_always``, and for
    creation ``_new_meta`` / ``_write_meta``; it overrides ``_opened``. Nothing of the
    live window, the seals or the caches.
    """

    mode = "proxy"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._touch: dict[int, int] = {}  # region -> tick of its last write
        self._tick_no = 0
        self._last_clean = 0.0
        self._last_retry = 0.0
        self.primary_errors = 0
        self.journal_errors = 0
        self.regions_cleaned = 0
        #: writes waiting for their journal record to be durable, in seq order
        self._jwaiters: deque[_HostWrite] = deque()
        self._jcommits = 0  # commit tasks running for them (at most COMMITS_IN_FLIGHT)
        self._jcovered = 0  # the last seq a started commit covers
        self._jstarting = False  # a commit task is made and has not taken its target yet
        self._lio: lio.WriteList | None = None  # the writer thread's, made at its first batch

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls, path: Path, name: str, size: int, settings: Settings, *, primary: str = "",
        ack: str = "primary", drl_region: int = DEFAULT_REGION, initial_copy: bool = True,
        copy_rate: int = 0,
    ) -> Self:
        """Create a proxy-mode volume over *primary* (size 0: the primary's size) and
        open it. The initial full copy, if wanted, starts in the background once an
        event loop runs the volume (:meth:`wait_initial_copy` joins it)."""
        keys = proxy_meta(primary, ack)
        check_region_bytes(drl_region)
        psize = primary_size(primary)
        if not size:
            size = psize - psize % 512
        if size <= 0:
            raise UsageError(f"primary {primary} is empty (size {psize})")
        if size > psize:
            raise UsageError(f"volume size {size} is larger than the primary {primary} ({psize} bytes)")
        meta = cls._new_meta(path, name, size)
        meta.update(keys)
        create_drl(path, size, drl_region, initial_copy)
        cls._write_meta(path, meta)
        vol = cls.open(path, settings)
        vol.copy_rate = copy_rate
        return vol

    def _opened(self, meta: dict[str, Any]) -> None:
        """Open the primary and the DRL; reconcile dirty regions (before serving)."""
        try:
            self.primary_spec = str(meta["primary"])
            self.ack = str(meta.get("ack", "primary"))
            if self.ack not in ACKS:
                raise Corruption(f"{self.path / 'volume.json'}: bad ack {self.ack!r}")
            self.primary = open_primary(self.primary_spec)
            if self.primary.size < self.size:
                raise UsageError(
                    f"volume {self.name}: primary {self.primary_spec} has {self.primary.size} "
                    f"bytes, the volume {self.size}"
                )
            drl_path = self.path / DRL_NAME
            if not drl_path.exists():
                create_drl(self.path, self.size, initial_copy=False)
            self.drl = DirtyRegionLog.open(drl_path)
            self._copy_next = self.drl.copy_next
            if self.drl.volume_bytes != self.size:
                raise Corruption(f"{drl_path}: covers {self.drl.volume_bytes} bytes, volume {self.size}")
            if self.drl.header_damaged:
                log.warning("volume %s: DRL header damaged: every region is compared", self.name)
            self._exec = Workers(4, f"primary-{self.name}")
            if isinstance(self.primary, FilePrimary):
                self._writer = Writer(f"primary-writer-{self.name}", self._write_batch, self._writes_done)
            self._drl_exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"drl-{self.name}")
            self._reconcile_at_open()
        except BaseException:
            self._close_proxy_files()
            super().close()
            raise

    def close(self) -> None:
        """Stop background work, make both sides durable, mark regions clean when no
        catch-up is owed, close the primary and the DRL, then the journal and maps."""
        for t in [*self._bg.values(), *([self._copy_task] if self._copy_task else [])]:
            t.cancel()
        self._bg.clear()
        self._copy_task = None
        try:
            self._stop_workers()  # no DRL write or primary I/O may still be running
            if self.primary is not None and self.drl is not None:
                clean = True
                try:
                    self.primary.flush()
                    self.journal.sync()
                except (OSError, CdpError) as e:
                    log.warning("volume %s: at close: %s; dirty regions stay dirty", self.name, e)
                    clean = False
                if clean and self._copy_next > self.drl.copy_next:
                    self.drl.set_copy_next(self._copy_next)  # INITs are durable now
                if clean and not self._ranges.ops and not self._rewinding:
                    owed = set(self._catchup)
                    self.drl.clear([r for r in self.drl.dirty() if r not in owed])
                    if not owed:
                        self.drl.set_rewind_from(0)
                self.drl.sync()
        finally:
            self._close_proxy_files()
            super().close()

    # ------------------------------------------------------------------ background work

    def _kick(self) -> None:
        """Start due background work (initial copy, catch-up, cleaner)."""
        now = time.monotonic()
        if self._copy_next < self.drl.regions and self._copy_task is None:
            self._copy_task = self._loop().create_task(self._copy_loop())
        if self._catchup and "catchup" not in self._bg and now - self._last_retry >= RETRY_DELAY:
            self._last_retry = now
            self._spawn("catchup", self._catchup_run())
        if (self.drl.dirty_count and "clean" not in self._bg and now - self._last_clean >= CLEAN_DELAY):
            self._last_clean = now
            self._spawn("clean", self._clean())

    def tick(self, seal: bool = True) -> None:
        super().tick(seal)
        self._tick_no += 1
        self._kick()

    async def _clean(self) -> None:
        owed = self._catchup
        idle = self._tick_no - CLEAN_IDLE_TICKS
        touch = self._touch
        cand = [r for r in self.drl.dirty()
                if r not in self._active and r not in owed and touch.get(r, -1) <= idle]
        if not cand or self._rewinding:
            return
        seen = {r: touch.get(r, -1) for r in cand}
        try:
            await asyncio.gather(self._in_exec(self._primary_flush), self.journal.commit())
        except (CdpError, OSError) as e:
            log.debug("volume %s: cleaner: %s", self.name, e)
            return
        ok = [r for r in cand if r not in self._active and r not in owed and touch.get(r, -1) == seen[r]]
        if ok and not self._rewinding:
            self.regions_cleaned += self.drl.clear(ok)
            for r in ok:
                self._touch.pop(r, None)
            self._drl_changed()

    # ------------------------------------------------------------------ journal side

    def _journal(self, offset: int, length: int, data: bytes | bytearray | None, init: bool = False) -> int | None:
        """Append a WRITE/ZERO/INIT record; None (and degraded) when the journal refuses."""
        try:
            if data is None:
                return self._record_zero(offset, length)
            return self._record_write(offset, data, init=init)
        except (CdpError, OSError) as e:
            self._journal_failed(offset, length, e)
            return None

    def _journal_failed(self, offset: int, length: int, exc: BaseException) -> None:
        self.journal_errors += 1
        regs = self.drl.regions_of(offset, length)
        for r in regs:
            self._catchup.setdefault(r, f"journal write failed: {exc}")
        if self.degraded is None:
            log.warning(
                "volume %s: DEGRADED: journal write of [%d, %d) failed (%s); the primary has "
                "it, the journal will catch up from the primary", self.name, offset, offset + length, exc,
            )
        self.degraded = f"journal: {exc}"

    # ------------------------------------------------------------------ I/O

    def write(self, offset: int, data: bytes | bytearray, fua: bool = False) -> Awaitable[None] | None:
        self._check_range(offset, len(data))
        if not data:
            return None
        return self._io(offset, len(data), data, fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> Awaitable[None] | None:
        self._check_range(offset, length)
        if length == 0:
            return None
        return self._io(offset, length, None, fua)

    def _io(self, offset: int, length: int, data: bytes | bytearray | None, fua: bool) -> Awaitable[None]:
        """Start a host write (*data*) or zero (None); the awaitable completes with the
        reply. The common case (not paused, no barrier there, initial copy done there,
        the DRL bits already durable) is one synchronous step returning a future; a
        write that must wait first runs as a coroutine (:meth:`_io_wait`)."""
        writer = self._writer
        if self._gate is not None or writer is None:
            return self._io_wait(offset, length, data, fua, False)
        if data is not None:
            self._admit(length)  # may refuse: nothing has moved yet
        drl = self.drl
        regs = drl.regions_of(offset, length)
        if (self._ranges.barriers(offset, offset + length)
                or (self._copy_next < drl.regions
                    and any(r >= self._copy_next and r not in self._copy_ahead for r in regs))
                or ((self._undurable or not drl.all_dirty(regs))
                    and self._mark(regs) > self._drl_durable)):
            self._kick()
            return self._io_wait(offset, length, data, fua, True)
        active = self._active
        for r in regs:
            active[r] = active.get(r, 0) + 1
        try:
            w, _ = self._start(offset, length, data, fua, regs)
        except BaseException:
            self._inactive(regs)
            raise
        if writer.submit(w):  # the turn's first write: due background work once a turn
            self._kick()
        return w

    async def _io_wait(self, offset: int, length: int, data: bytes | bytearray | None, fua: bool,
                       admitted: bool) -> None:
        """The write path with its waits: pause, barriers, the region's initial copy,
        the DRL sync; then :meth:`_start` and the primary write."""
        if not admitted:
            while self._gate is not None:
                await asyncio.shield(self._gate)
            if data is not None:
                self._admit(length)  # may refuse: nothing has moved yet
            self._kick()
        end = offset + length
        regs = self.drl.regions_of(offset, length)
        active = self._active
        for r in regs:
            active[r] = active.get(r, 0) + 1
        try:
            while True:
                bar = self._ranges.barriers(offset, end)
                if bar:
                    await asyncio.wait(bar)
                    continue
                if self._copy_next < self.drl.regions:
                    todo = [r for r in regs if r >= self._copy_next and r not in self._copy_ahead]
                    if todo:
                        for r in todo:
                            await self._copy_region(r)
                        continue
                if self._gate is not None:
                    await asyncio.shield(self._gate)
                    continue
                need = self._mark(regs)
                if need > self._drl_durable:
                    await self._drl_commit(need)
                    continue
                break
        except BaseException:
            self._inactive(regs)
            raise
        w, preds = self._start(offset, length, data, fua, regs)
        if self._writer is not None:
            self._writer.submit(w)
        else:  # an NBD primary: the worker pool, ordered by the range queue
            try:
                if preds:
                    await asyncio.wait(preds)
                await self._in_exec(self._primary_io, offset, length, data, fua)
            except BaseException as e:
                self._primary_done(w, e)
                if not isinstance(e, Exception):
                    raise
            else:
                self._primary_done(w, None)
        await w

    def _start(self, offset: int, length: int, data: bytes | bytearray | None, fua: bool,
               regs: range) -> tuple[_HostWrite, list[asyncio.Future[None]]]:
        """The one synchronous step: append the journal record and enter the range
        queue, so that journal order == primary order for overlapping writes. The caller
        hands the primary write off at once (the writer thread, or the pool after
        *preds*, the earlier writes it overlaps)."""
        seq = self._journal(offset, length, data)
        self.writes += 1
        if data is not None:
            self.bytes_written += length
        touch, now_tick = self._touch, self._tick_no
        for r in regs:
            touch[r] = now_tick
        w = _HostWrite(offset, length, data, fua, regs)
        w.op, preds = self._ranges.add(offset, offset + length, False, self._writer is None)
        if seq is not None and (self.ack == "both" or fua or self._sync_always):
            w.seq = seq
            if self.journal.durable_seq < seq:
                w.pending = 2
                self._jwaiters.append(w)
                self._durable_soon()
        return w, preds

    def _durable_soon(self) -> None:
        """Start a commit for the waiting writes no running commit covers, unless one is
        about to start or COMMITS_IN_FLIGHT run (the last to end looks again)."""
        if (not self._jstarting and self._jcommits < COMMITS_IN_FLIGHT and self._jwaiters
                and self._jwaiters[-1].seq > self._jcovered):
            self._jstarting = True
            self._jcommits += 1
            self._loop().create_task(self._durable_commit())

    async def _durable_commit(self) -> None:
        """Group commit for the writes that wait for their journal record (``ack =
        "both"``, FUA, ``sync = "always"``): one commit serves every write appended
        before it started (the writes of a loop turn, at least), and the writes of the
        next turns start their own commit at once, up to COMMITS_IN_FLIGHT side by side,
        which the journal runs as pipelined fdatasyncs that end in order. So a write
        waits about one sync, not the rest of the running one and then its own."""
        self._jstarting = False
        target = self._jcovered = self.journal.last_seq
        err: BaseException | None = None
        try:
            await self.journal.commit()
        except (CdpError, OSError) as e:
            err = e
        finally:
            self._jcommits -= 1
        durable = self.journal.durable_seq
        q = self._jwaiters
        with completion.batch():  # their replies leave together, at its end
            while q:
                w = q[0]
                if w.seq > durable:
                    if err is None or w.seq > target:
                        break
                    w.jerr = err
                q.popleft()
                self._part_done(w)
        self._durable_soon()

    def _write_batch(self, batch: list[_HostWrite]) -> list[BaseException | None]:
        """The writer thread's work: the primary writes of *batch* in order, writes that
        continue each other as one ``pwritev``; one flush if any asked for FUA. One
        result per write (None: done); never raises."""
        p = self.primary
        n = len(batch)
        errs: list[BaseException | None] = [None] * n
        if p is None:
            return [OSError(errno.EIO, "the primary is closed")] * n
        vec = isinstance(p, FilePrimary)
        # written at once (only FUA is left), or one by one from the first
        i = n if vec and n > 1 and USE_LIO and self._lio_batch(batch, errs) else 0
        while i < n:
            w = batch[i]
            j = i + 1
            if vec and w.data is not None:
                end = w.offset + w.length
                while j < n and batch[j].data is not None and batch[j].offset == end:
                    end += batch[j].length
                    j += 1
            try:
                if w.data is None:
                    p.zero(w.offset, w.length)
                elif j == i + 1:
                    p.pwrite(w.data, w.offset)
                else:
                    assert isinstance(p, FilePrimary)
                    p.pwritev([x.data for x in batch[i:j] if x.data is not None], w.offset)
            except Exception as e:
                if j == i + 1:
                    errs[i] = e
                else:  # find which of them failed
                    for k in range(i, j):
                        x = batch[k]
                        try:
                            p.pwrite(x.data or b"", x.offset)
                        except Exception as e2:
                            errs[k] = e2
            i = j
        fua = [k for k in range(n) if batch[k].fua and errs[k] is None]
        if fua:
            try:
                p.flush()
            except Exception as e:
                for k in fua:
                    errs[k] = e
        return errs

    def _lio_batch(self, batch: list[_HostWrite], errs: list[BaseException | None]) -> bool:
        """The writer thread's fast path for a batch whose writes overlap nothing else
        in it (the usual random writes): one ``lio_listio`` for all of them
        (:mod:`cdp.proxy.lio`), so the thread takes the GIL back once, not once per
        write; writes that continue each other go as one piece. False (nothing
        written) when the batch holds a zero, overlapping writes or a single run:
        those go one by one in queue order (or as one ``pwritev``). Fills *errs*."""
        runs: list[tuple[int, int]] = []  # [first, last + 1) indices into batch
        i, n = 0, len(batch)
        while i < n:
            w = batch[i]
            if type(w.data) is not bytes and type(w.data) is not bytearray:
                return False  # a zero (None), or a buffer lio.WriteList does not take
            end = w.offset + w.length
            j = i + 1
            while j < n and batch[j].data is not None and batch[j].offset == end:
                end += batch[j].length
                j += 1
            runs.append((i, j))
            i = j
        if not 1 < len(runs) <= lio.MAX_REQUESTS:
            return False
        items: list[tuple[bytes | bytearray, int]] = []
        for i, j in runs:
            w = batch[i]
            data = w.data if j == i + 1 else b"".join(x.data for x in batch[i:j])  # type: ignore[misc]
            assert data is not None
            items.append((data, w.offset))
        if not lio.disjoint([(o, len(d)) for d, o in items]):
            return False
        p = self.primary
        assert isinstance(p, FilePrimary)
        wl = self._lio
        if wl is None:
            wl = self._lio = lio.WriteList(p.fileno())
        for (i, j), r, (data, offset) in zip(runs, wl.write(items), items, strict=True):
            if not r:
                continue
            try:  # failed or short: again alone, for its exception or the rest of it
                p.pwrite(data, offset)
            except Exception as e:
                for k in range(i, j):
                    errs[k] = e
        return True

    def _writes_done(self, writes: list[_HostWrite], errs: Sequence[BaseException | None]) -> None:
        """A batch's results, on the loop: its writes that are complete now are
        finished in one completion batch (their NBD replies leave together at its end)."""
        with completion.batch():
            for w, e in zip(writes, errs, strict=True):
                self._primary_done(w, e)

    def _primary_done(self, w: _HostWrite, exc: BaseException | None) -> None:
        if exc is not None:
            w.perr = exc
            if isinstance(exc, (OSError, CdpError)):
                self._primary_failed(w.offset, w.length, exc)
        self._ranges.finish(w.op)
        self._part_done(w)

    def _part_done(self, w: _HostWrite) -> None:
        """One of the write's parts (primary, journal) is done; reply when both are."""
        w.pending -= 1
        if w.pending:
            return
        self._inactive(w.regs)
        if w.done:
            return
        perr, jerr = w.perr, w.jerr
        if perr is not None:
            if isinstance(perr, (OSError, CdpError)):
                w.finish(Corruption(f"volume {self.name}: primary write failed: {perr}"))
            else:
                w.finish(perr)  # a CancelledError cancels the awaiters
        elif jerr is not None:
            self._journal_failed(w.offset, w.length, jerr)
            w.finish(jerr if self.ack == "both" else None)
        else:
            w.finish()

    def _inactive(self, regs: range) -> None:
        active = self._active
        for r in regs:
            n = active[r] - 1
            if n:
                active[r] = n
            else:
                del active[r]

    def _primary_io(self, offset: int, length: int, data: bytes | bytearray | None, fua: bool) -> None:
        p = self.primary
        assert p is not None
        if data is None:
            p.zero(offset, length)
        else:
            p.pwrite(data, offset)
        if fua:
            p.flush()

    def _primary_failed(self, offset: int, length: int, exc: BaseException) -> None:
        self.primary_errors += 1
        log.error("volume %s: primary write of [%d, %d) failed: %s", self.name, offset, offset + length, exc)
        try:
            self._record_error(ERR_PRIMARY_WRITE, offset, length, f"primary write failed: {exc}")
        except (CdpError, OSError):
            pass
        for r in self.drl.regions_of(offset, length):
            self._catchup.setdefault(r, "primary write failed")

    async def flush(self) -> None:
        """Both sides durable: fdatasync/FLUSH of the primary and the journal's group
        commit, concurrently. A journal failure only degrades with ``ack = "primary"``."""
        t0 = time.perf_counter()
        res: Any = await asyncio.gather(
            self._in_exec(self._primary_flush), self.journal.commit(), return_exceptions=True
        )
        p_res, j_res = res
        self.flushes += 1
        self.flush_seconds += time.perf_counter() - t0
        if isinstance(p_res, BaseException):
            if not isinstance(p_res, (OSError, CdpError)):
                raise p_res
            self.primary_errors += 1
            log.error("volume %s: primary flush failed: %s", self.name, p_res)
            raise Corruption(f"volume {self.name}: primary flush failed: {p_res}")
        if isinstance(j_res, BaseException):
            if not isinstance(j_res, (OSError, CdpError)) or self.ack == "both":
                raise j_res
            self.journal_errors += 1
            if self.degraded is None:
                log.warning("volume %s: DEGRADED: journal commit failed: %s", self.name, j_res)
            self.degraded = f"journal: {j_res}"

    def read(self, offset: int, length: int, seq: int | None = None) -> Any:
        """Live reads come from the primary, point-in-time reads and reads during a
        rewind from the journal. From a file primary, what the page cache holds is read
        on the loop and returned at once (``preadv2(RWF_NOWAIT)``: it never waits for
        the disk); anything else is an awaitable served by the worker threads."""
        if seq is not None or self._rewinding:
            return super().read(offset, length, seq)
        self._check_range(offset, length)
        self.reads += 1
        self.bytes_read += length
        if length == 0:
            return b""
        p = self.primary
        if isinstance(p, FilePrimary) and length <= CACHED_READ_MAX:
            got = p.pread_cached(offset, length)
            if got is not None:
                return bytes(got)
        assert self._exec is not None and p is not None
        return self._exec.submit_mapped(self._read_failed, p.pread, offset, length)

    def _read_failed(self, exc: BaseException) -> BaseException:
        if not isinstance(exc, OSError):
            return exc
        self.primary_errors += 1
        return Corruption(f"volume {self.name}: primary read failed: {exc}")

    def block_status(self, offset: int, length: int, seq: int | None = None) -> list[tuple[int, int]]:
        if seq is None and (self._copy_next < self.drl.regions or self._catchup or self.degraded):
            return [(length, 0)]  # the journal may not know everything yet: all data
        return super().block_status(offset, length, seq)

    # ------------------------------------------------------------------ status

    def proxy_status(self) -> dict[str, Any]:
        return {
            "primary": self.primary_spec,
            "primary_kind": getattr(self.primary, "kind", None),
            "ack": self.ack,
            "degraded": self.degraded is not None,
            "degraded_reason": self.degraded,
            "drl": self.drl.to_dict() if self.drl is not None else None,
            "initial_copy": {
                "done": self._copy_next >= self.drl.regions if self.drl is not None else None,
                "regions_copied": self._copy_next,
                "bytes_journalled": self.copied_bytes,
            },
            "catchup_pending_regions": len(self._catchup),
            "caught_up_bytes": self.caught_up_bytes,
            "primary_errors": self.primary_errors,
            "journal_errors": self.journal_errors,
            "regions_cleaned": self.regions_cleaned,
            "in_flight": len(self._ranges.ops),
            "reconcile": self.reconcile_report,
            "rewind": self.rewind_progress,
        }

    def status(self) -> dict[str, Any]:
        d = super().status()
        d["mode"] = "proxy"
        d["proxy"] = self.proxy_status()
        return d



def describe(path: Path) -> dict[str, Any]:
    """Offline: the proxy keys of a volume directory (for tools and tests)."""
    meta = json.loads((path / "volume.json").read_text())
    return {k: meta.get(k) for k in ("mode", "primary", "ack")}


__all__ = [
    "ACKS",
    "DRL_NAME",
    "ProxyVolume",
    "create_drl",
    "describe",
    "primary_size",
    "proxy_meta",
]
