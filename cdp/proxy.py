"""Proxy mode ("appliance in the data path"): the appliance owns the primary volume.

The host talks only to the appliance; every write goes to the primary *and* the
journal. See docs/PROXY.md for the operator's view.

Design notes
------------
* **Write path.** A write first waits for any barrier on its range (initial copy of the
  region, journal catch-up, rewind rewrite). If it touches a region that is clean in
  the dirty region log (:mod:`cdp.drl`), the bit is set and the DRL page fdatasync'd
  (concurrent writers share one DRL sync) before anything moves. Then, in one
  synchronous step on the event loop, the record is appended to the journal (buffered,
  like a mirror volume) and the primary write is registered in the range queue; the
  primary write itself runs in a worker thread. Writes whose ranges overlap reach the
  primary in the order their records were appended, so the journal's order and the
  primary's final content always agree. ``ack = "primary"`` replies when the primary
  write completed; ``ack = "both"`` also waits for the journal record to be durable
  (group commit, running concurrently with the primary write).
* **Reads** come from the primary (a worker thread), except point-in-time reads (the
  journal) and reads during a rewind (the journal's head, i.e. the target state).
* **Errors.** A failed primary write answers EIO and appends an ERROR record
  (code 1); the region is queued for catch-up so the journal again describes what the
  primary holds. A failed journal append (ENOSPC, a failed sync) with ``ack =
  "primary"`` still acknowledges the host: the volume is *degraded*, the region stays
  dirty and queued, and a background task catches the journal up from the primary when
  it can (ERROR record code 2 describing the gap, then WRITE records of the primary's
  content where it differs from the journal's head).
* **Clean regions, lazily.** About once a second a cleaner takes the dirty regions with
  nothing in flight, makes the primary and the journal durable, and clears those not
  touched meanwhile (the DRL pages are written without anyone waiting for them).
* **After a crash** the dirty regions are compared before the volume is served: the
  primary holds every acknowledged write, so where it differs from the journal's head
  the journal gets an ERROR record (code 3) and the primary's bytes. A rewind whose
  primary rewrite was interrupted (DRL header ``rewind_from``) is completed instead:
  the journal's head is written to the primary.
* **Initial full copy** at creation: region by region into INIT records (zero runs
  skipped), throttled, progress reported. A host write to a region not copied yet
  copies that region first, so INIT records always precede the host writes of their
  region. The copied watermark lives in the DRL header (persisted only after the INIT
  records are durable), so a restart continues where the copy stopped.
* **Rewind** appends the REWIND record (metadata, as in mirror mode), then rewrites on
  the primary only the bytes that differ from the target inside the candidate ranges of
  ``changed(now, target)``, region by region behind a barrier; reads meanwhile come
  from the journal. The regions are marked dirty and ``rewind_from`` set first, so a
  crash in the middle is completed at the next start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp.drl import DEFAULT_REGION, DirtyRegionLog, check_region_bytes
from cdp.errors import CdpError, Corruption, UsageError
from cdp.journal import RecordKind
from cdp.proxy_nbd import FilePrimary, NbdPrimary, open_primary
from cdp.volume import Volume

if TYPE_CHECKING:
    from cdp.store import Store

log = logging.getLogger("cdp.proxy")

#: ERROR record codes written by proxy mode (docs/PROXY.md)
ERR_PRIMARY_WRITE = 1
ERR_JOURNAL_GAP = 2
ERR_CRASH_RECONCILE = 3
ERR_COPY = 4

ACKS = ("primary", "both")
PIECE = 64 << 10  # compare granularity (primary vs. journal)
DRL_NAME = "drl"
CLEAN_DELAY = 1.0  # seconds between cleaner runs
CLEAN_IDLE_TICKS = 2  # a region is cleaned once unwritten for this many ticks (~seconds)
RETRY_DELAY = 1.0  # seconds between catch-up attempts

Progress = Callable[[int, int, str], None]


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


def create_proxy_volume(
    store: Store, name: str, size: int, primary: str, *, ack: str = "primary",
    drl_region: int = DEFAULT_REGION, initial_copy: bool = True, copy_rate: int = 0,
) -> ProxyVolume:
    """Create a proxy-mode volume over *primary* (size 0: the primary's size). The initial
    full copy, if wanted, starts in the background once an event loop runs the volume
    (:meth:`ProxyVolume.wait_initial_copy` joins it)."""
    meta = proxy_meta(primary, ack)
    check_region_bytes(drl_region)
    psize = primary_size(primary)
    if not size:
        size = psize - psize % 512
    if size <= 0:
        raise UsageError(f"primary {primary} is empty (size {psize})")
    if size > psize:
        raise UsageError(f"volume size {size} is larger than the primary {primary} ({psize} bytes)")

    def prepare(path: Path) -> None:
        create_drl(path, size, drl_region, initial_copy)

    vol = store.create_volume(name, size, meta, prepare)
    assert isinstance(vol, ProxyVolume)
    vol.copy_rate = copy_rate
    return vol


class _Workers:
    """Worker threads for primary I/O with batched hand-off both ways: a worker takes
    every queued call at once and hands the results back with one loop wake-up, so a
    deep queue of small writes costs few thread switches (the event loop never blocks
    on the primary)."""

    def __init__(self, n: int, name: str) -> None:
        self._q: deque[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = deque()
        self._cv = threading.Condition()
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._done_lock = threading.Lock()
        self._wake = False
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        self._loop = loop
        fut: asyncio.Future[Any] = loop.create_future()
        with self._cv:
            self._q.append((fn, args, fut))
            self._cv.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._stop:
                    self._cv.wait()
                if not self._q:
                    return
                batch = [self._q.popleft() for _ in range(min(len(self._q), 16))]
            out: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            for fn, args, fut in batch:
                try:
                    out.append((fut, fn(*args), None))
                except BaseException as e:  # handed to the awaiting coroutine
                    out.append((fut, None, e))
            with self._done_lock:
                self._done.extend(out)
                wake = not self._wake
                self._wake = True
            if wake and self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:
                    pass  # the loop is closed: nobody waits any more

    def _deliver(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
            self._wake = False
        for fut, res, exc in done:
            if fut.cancelled():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(res)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()


class _Op:
    __slots__ = ("barrier", "done", "end", "start")

    def __init__(self, start: int, end: int, done: asyncio.Future[None], barrier: bool) -> None:
        self.start = start
        self.end = end
        self.done = done
        self.barrier = barrier


class _Ranges:
    """In-flight primary operations. A new one waits for every earlier one it overlaps;
    a *barrier* also holds back writes that have not been journalled yet."""

    def __init__(self) -> None:
        self.ops: list[_Op] = []

    def add(self, start: int, end: int, barrier: bool) -> tuple[_Op, list[asyncio.Future[None]]]:
        preds = [o.done for o in self.ops if o.start < end and start < o.end]
        op = _Op(start, end, asyncio.get_running_loop().create_future(), barrier)
        self.ops.append(op)
        return op, preds

    def barriers(self, start: int, end: int) -> list[asyncio.Future[None]]:
        return [o.done for o in self.ops if o.barrier and o.start < end and start < o.end]

    def finish(self, op: _Op) -> None:
        self.ops.remove(op)
        if not op.done.done():
            op.done.set_result(None)


def _diff_runs(a: bytes, b: bytes, piece: int = PIECE) -> list[tuple[int, int]]:
    """[start, end) runs of *piece*-sized pieces where a and b differ (coalesced)."""
    runs: list[tuple[int, int]] = []
    n = len(a)
    for p in range(0, n, piece):
        q = min(n, p + piece)
        if a[p:q] != b[p:q]:
            if runs and runs[-1][1] == p:
                runs[-1] = (runs[-1][0], q)
            else:
                runs.append((p, q))
    return runs


def _nonzero_runs(data: bytes, piece: int = PIECE) -> list[tuple[int, int]]:
    zero = bytes(piece)
    runs: list[tuple[int, int]] = []
    for p in range(0, len(data), piece):
        q = min(len(data), p + piece)
        if data[p:q] != zero[: q - p]:
            if runs and runs[-1][1] == p:
                runs[-1] = (runs[-1][0], q)
            else:
                runs.append((p, q))
    return runs


class ProxyVolume(Volume):
    """A volume whose appliance owns the primary (mode ``proxy`` in volume.json)."""

    mode = "proxy"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.primary_spec = ""
        self.ack = "primary"
        self.primary: FilePrimary | NbdPrimary | None = None
        self.drl: DirtyRegionLog = None  # type: ignore[assignment]  # set in _opened
        self._exec: _Workers | None = None
        self._drl_exec: concurrent.futures.ThreadPoolExecutor | None = None
        self._ranges = _Ranges()
        self._active: dict[int, int] = {}
        self._touch: dict[int, int] = {}  # region -> tick of its last write
        self._tick_no = 0
        self._undurable: dict[int, int] = {}
        self._drl_gen = 0
        self._drl_durable = 0
        self._drl_task: asyncio.Task[None] | None = None
        self._catchup: dict[int, str] = {}
        self._copy_ahead: set[int] = set()
        self._copy_next = 0  # in memory; the DRL header has the durable watermark
        self._copying: dict[int, asyncio.Future[None]] = {}
        self._copy_task: asyncio.Task[None] | None = None
        self._copy_waiters: list[Progress] = []
        self.copy_rate = 0  # bytes/s, 0: unthrottled
        self.copied_bytes = 0
        self._bg: dict[str, asyncio.Task[None]] = {}
        self._last_clean = 0.0
        self._last_retry = 0.0
        self._rewinding = False
        self.rewind_progress: dict[str, Any] | None = None
        self.degraded: str | None = None
        self.primary_errors = 0
        self.journal_errors = 0
        self.caught_up_bytes = 0
        self.reconcile_report: dict[str, Any] = {}
        self.regions_cleaned = 0

    # ------------------------------------------------------------------ lifecycle

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
            self._exec = _Workers(4, f"primary-{self.name}")
            self._drl_exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"drl-{self.name}")
            self._reconcile_at_open()
        except BaseException:
            self._close_proxy_files()
            super().close()
            raise

    def _stop_workers(self) -> None:
        if self._exec is not None:
            self._exec.shutdown()
        if self._drl_exec is not None:
            self._drl_exec.shutdown(wait=True)
        self._exec = self._drl_exec = None

    def _close_proxy_files(self) -> None:
        self._stop_workers()
        if self.primary is not None:
            self.primary.close()
            self.primary = None
        if self.drl is not None:
            self.drl.close()

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

    # ------------------------------------------------------------------ helpers

    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def _in_exec(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        assert self._exec is not None
        return self._exec.submit(fn, *args)

    def _region_bounds(self, r: int) -> tuple[int, int]:
        return self.drl.region_range(r)

    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        async def runner() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("volume %s: %s failed", self.name, name)
            finally:
                self._bg.pop(name, None)

        self._bg[name] = asyncio.get_running_loop().create_task(runner())

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

    def tick(self) -> None:
        super().tick()
        self._tick_no += 1
        self._kick()

    # ------------------------------------------------------------------ DRL durability

    def _mark(self, regs: Iterable[int]) -> int:
        """Mark regions dirty; returns the DRL generation a write must see durable."""
        new = self.drl.mark(regs)
        if new:
            self._drl_gen += 1
            for r in new:
                self._undurable[r] = self._drl_gen
        need = 0
        for r in regs:
            g = self._undurable.get(r, 0)
            if g > need:
                need = g
        return need

    async def _drl_commit(self, gen: int) -> None:
        """Return once DRL generation *gen* is on disk (one fdatasync for many callers)."""
        while self._drl_durable < gen:
            task = self._drl_task
            if task is None:
                task = self._drl_task = self._loop().create_task(self._drl_run())
            await asyncio.shield(task)

    async def _drl_run(self) -> None:
        try:
            gen = self._drl_gen
            pages = self.drl.pending_pages()
            await self._loop().run_in_executor(self._drl_exec, self.drl.write, pages)
            self._drl_durable = max(self._drl_durable, gen)
            if self._undurable:
                for r in [r for r, g in self._undurable.items() if g <= gen]:
                    del self._undurable[r]
        finally:
            self._drl_task = None

    def _drl_changed(self) -> None:
        """A change nobody waits for (clears, header fields): write it soon."""
        self._drl_gen += 1
        if self._drl_task is None:
            self._drl_task = self._loop().create_task(self._drl_run())

    # ------------------------------------------------------------------ journal side

    def _journal(self, offset: int, length: int, data: bytes | bytearray | None, init: bool = False) -> int | None:
        """Append a WRITE/ZERO/INIT record; None (and degraded) when the journal refuses."""
        try:
            if data is None:
                seq, _loc = self.journal.append_zero(offset, length)
                self.maps.add_zero(seq, offset, offset + length)
            else:
                seq, loc = self.journal.append_write(offset, data, init=init)
                self.maps.add_write(seq, offset, offset + length, loc)
        except (CdpError, OSError) as e:
            self._journal_failed(offset, length, e)
            return None
        self._live_writes += 1
        if self._live_writes >= self._l0_max:
            self.seal()
        return seq

    def _append_error(self, code: int, offset: int, length: int, message: str) -> int:
        """An ERROR record (fed to the maps as a seq that changes no data)."""
        seq, _loc = self.journal.append_error(code, offset, length, message)
        self.maps.note_seq(seq)
        return seq

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

    async def _io(self, offset: int, length: int, data: bytes | bytearray | None, fua: bool) -> None:
        while self._gate is not None:
            await asyncio.shield(self._gate)
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
            # one synchronous step: journal order == primary order for overlapping writes
            seq = self._journal(offset, length, data)
            self.writes += 1
            if data is not None:
                self.bytes_written += length
            touch, now_tick = self._touch, self._tick_no
            for r in regs:
                touch[r] = now_tick
            op, preds = self._ranges.add(offset, end, False)
            jwait: asyncio.Task[None] | None = None
            if seq is not None and (self.ack == "both" or fua or self._sync_always):
                jwait = self._loop().create_task(self.journal.commit())
            perr: BaseException | None = None
            try:
                if preds:
                    await asyncio.wait(preds)
                await self._in_exec(self._primary_io, offset, length, data, fua)
            except (OSError, CdpError) as e:
                perr = e
                self._primary_failed(offset, length, e)
            finally:
                self._ranges.finish(op)
            jerr: BaseException | None = None
            if jwait is not None:
                try:
                    await jwait
                except (CdpError, OSError) as e:
                    jerr = e
            if perr is not None:
                raise Corruption(f"volume {self.name}: primary write failed: {perr}") from None
            if jerr is not None:
                self._journal_failed(offset, length, jerr)
                if self.ack == "both":
                    raise jerr
        finally:
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
            self._append_error(ERR_PRIMARY_WRITE, offset, length, f"primary write failed: {exc}")
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

    def _primary_flush(self) -> None:
        assert self.primary is not None
        self.primary.flush()

    def read(self, offset: int, length: int, seq: int | None = None) -> Any:
        """Live reads come from the primary (an awaitable); point-in-time reads and reads
        during a rewind from the journal."""
        if seq is not None or self._rewinding:
            return super().read(offset, length, seq)
        self._check_range(offset, length)
        self.reads += 1
        self.bytes_read += length
        if length == 0:
            return b""
        return self._read_primary(offset, length)

    async def _read_primary(self, offset: int, length: int) -> bytes:
        assert self.primary is not None
        try:
            data: bytes = await self._in_exec(self.primary.pread, offset, length)
        except OSError as e:
            self.primary_errors += 1
            raise Corruption(f"volume {self.name}: primary read failed: {e}") from None
        return data

    def block_status(self, offset: int, length: int, seq: int | None = None) -> list[tuple[int, int]]:
        if seq is None and (self._copy_next < self.drl.regions or self._catchup or self.degraded):
            return [(length, 0)]  # the journal may not know everything yet: all data
        return super().block_status(offset, length, seq)

    # ------------------------------------------------------------------ catch-up

    async def _barrier(self, start: int, end: int) -> _Op:
        op, preds = self._ranges.add(start, end, True)
        if preds:
            await asyncio.wait(preds)
        return op

    def _append_diff(self, start: int, primary: bytes, code: int, why: str) -> int:
        """Make the journal's head equal *primary* over [start, start+len): an ERROR
        record, then WRITE records where they differ. Returns the bytes journalled."""
        head = Volume.read(self, start, len(primary))
        runs = _diff_runs(primary, head)
        if not runs:
            return 0
        n = sum(b - a for a, b in runs)
        self._append_error(code, start, len(primary), f"{why}; {n} bytes caught up from the primary")
        for a, b in runs:
            seq, loc = self.journal.append_write(start + a, primary[a:b])
            self.maps.add_write(seq, start + a, start + b, loc)
            self._live_writes += 1
        if self._live_writes >= self._l0_max:
            self.seal()
        return n

    async def _catchup_region(self, r: int, why: str) -> int:
        start, end = self._region_bounds(r)
        op = await self._barrier(start, end)
        try:
            assert self.primary is not None
            data = await self._in_exec(self.primary.pread, start, end - start)
            code = ERR_JOURNAL_GAP if why.startswith("journal") else ERR_PRIMARY_WRITE
            return self._append_diff(start, data, code, why)
        finally:
            self._ranges.finish(op)

    async def _catchup_run(self) -> None:
        if self._rewinding:
            return  # the primary is being rewritten to the journal: it must not win now
        done = 0
        for r in sorted(self._catchup):
            why = self._catchup.get(r)
            if why is None:
                continue
            try:
                n = await self._catchup_region(r, why)
            except (CdpError, OSError) as e:
                log.info("volume %s: catch-up of region %d not possible yet: %s", self.name, r, e)
                break
            self._catchup.pop(r, None)
            self.caught_up_bytes += n
            done += n
        if done:
            try:
                await self.journal.commit()
            except (CdpError, OSError) as e:
                log.warning("volume %s: catch-up commit failed: %s", self.name, e)
                return
        if not self._catchup and self.degraded is not None:
            try:
                await self.journal.commit()
            except (CdpError, OSError):
                return
            log.warning("volume %s: caught up (%d bytes from the primary); no longer degraded",
                        self.name, self.caught_up_bytes)
            self.degraded = None

    # ------------------------------------------------------------------ cleaner

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

    # ------------------------------------------------------------------ initial copy

    async def _copy_region(self, r: int) -> None:
        fut = self._copying.get(r)
        if fut is not None:
            await asyncio.shield(fut)
            return
        fut = self._loop().create_future()
        self._copying[r] = fut
        start, end = self._region_bounds(r)
        try:
            op = await self._barrier(start, end)
            try:
                assert self.primary is not None
                data = await self._in_exec(self.primary.pread, start, end - start)
                for a, b in _nonzero_runs(data):
                    seq, loc = self.journal.append_write(start + a, data[a:b], init=True)
                    self.maps.add_write(seq, start + a, start + b, loc)
                    self._live_writes += 1
                    self.copied_bytes += b - a
                if self._live_writes >= self._l0_max:
                    self.seal()
            finally:
                self._ranges.finish(op)
        except (CdpError, OSError) as e:
            # keep the volume available: the catch-up journals this region later
            self._catchup.setdefault(r, f"journal: initial copy of region {r} failed: {e}")
            if self.degraded is None:
                log.warning("volume %s: DEGRADED: initial copy of region %d failed: %s", self.name, r, e)
            self.degraded = f"initial copy: {e}"
            try:
                self._append_error(ERR_COPY, start, end - start, f"initial copy failed: {e}")
            except (CdpError, OSError):
                pass
        finally:
            self._copy_ahead.add(r)
            del self._copying[r]
            fut.set_result(None)

    async def _copy_loop(self) -> None:
        drl = self.drl
        total = self.size
        t0 = time.monotonic()
        moved = 0
        last_persist = time.monotonic()
        if self._copy_next == 0:
            log.info("volume %s: initial full copy of %s (%d bytes) started", self.name, self.primary_spec, total)
        else:
            log.info("volume %s: initial full copy continues at region %d of %d",
                     self.name, self._copy_next, drl.regions)
        try:
            while self._copy_next < drl.regions:
                r = self._copy_next
                if r not in self._copy_ahead:
                    await self._copy_region(r)
                _s, e = self._region_bounds(r)
                moved += e - _s
                self._copy_ahead.discard(r)
                self._copy_next = r + 1
                now = time.monotonic()
                if now - last_persist >= 1.0:
                    # the watermark goes to disk only once its INIT records are durable
                    mark = self._copy_next
                    await self.journal.commit()
                    drl.set_copy_next(mark)
                    self._drl_changed()
                    last_persist = now
                for cb in list(self._copy_waiters):
                    cb(e, total, "initial copy")
                if self.copy_rate:
                    ahead = moved / self.copy_rate - (time.monotonic() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                else:
                    await asyncio.sleep(0)
            await self.journal.commit()
            self.seal()
            drl.set_copy_next(drl.regions)
            await self._drl_commit_all()
            log.info("volume %s: initial full copy done: %d bytes of data journalled in %.1fs",
                     self.name, self.copied_bytes, time.monotonic() - t0)
        finally:
            self._copy_task = None

    async def _drl_commit_all(self) -> None:
        self._drl_gen += 1
        await self._drl_commit(self._drl_gen)

    async def wait_initial_copy(self, progress: Progress | None = None, rate: int = 0) -> int:
        """Run (or join) the initial full copy; returns the bytes journalled as INIT."""
        if rate:
            self.copy_rate = rate
        if self._copy_next >= self.drl.regions and self._copy_task is None:
            return self.copied_bytes
        if progress is not None:
            self._copy_waiters.append(progress)
        try:
            self._kick()
            task = self._copy_task
            if task is not None:
                await asyncio.shield(task)
        finally:
            if progress is not None:
                self._copy_waiters.remove(progress)
        if self._copy_next < self.drl.regions:
            raise CdpError(f"volume {self.name}: initial copy did not finish")
        if progress is not None:
            progress(self.size, self.size, "initial copy")
        return self.copied_bytes

    # ------------------------------------------------------------------ crash reconcile

    def _reconcile_at_open(self) -> None:
        drl = self.drl
        dirty = [r for r in drl.dirty() if r < drl.copy_next]
        beyond = [r for r in drl.dirty() if r >= drl.copy_next]
        if not dirty and not beyond and not drl.rewind_from:
            self.reconcile_report = {"dirty_regions": 0}
            return
        t0 = time.monotonic()
        journal_wins = False
        if drl.rewind_from:
            for rec in self.journal.scan(drl.rewind_from + 1):
                if rec.kind == RecordKind.REWIND:
                    journal_wins = True
                    break
        assert self.primary is not None
        differing = 0
        nbytes = 0
        failed: list[int] = []
        for r in dirty:
            start, end = drl.region_range(r)
            try:
                data = self.primary.pread(start, end - start)
                if journal_wins:
                    head = Volume.read(self, start, end - start)
                    n = 0
                    for a, b in _diff_runs(head, data):
                        self.primary.pwrite(head[a:b], start + a)
                        n += b - a
                else:
                    n = self._append_diff(start, data, ERR_CRASH_RECONCILE,
                                          "crash recovery: dirty region differed")
            except (CdpError, OSError) as e:
                log.error("volume %s: reconcile of region %d failed: %s", self.name, r, e)
                failed.append(r)
                self._catchup[r] = f"journal: reconcile after crash failed: {e}"
                continue
            if n:
                differing += 1
                nbytes += n
        try:
            self.primary.flush()
            self.journal.sync()
        except (CdpError, OSError) as e:
            log.error("volume %s: reconcile could not make both sides durable: %s", self.name, e)
            failed = list(drl.dirty())
        if self._live_writes:
            self.seal()
        drl.clear([r for r in drl.dirty() if r not in failed])
        if not failed:
            drl.set_rewind_from(0)
        drl.sync()
        if failed:
            self.degraded = f"reconcile: {len(failed)} regions could not be compared"
        self.reconcile_report = {
            "dirty_regions": len(dirty) + len(beyond),
            "compared_regions": len(dirty),
            "differing_regions": differing,
            "bytes": nbytes,
            "direction": "journal->primary (interrupted rewind)" if journal_wins else "primary->journal",
            "failed_regions": len(failed),
            "seconds": round(time.monotonic() - t0, 3),
            "at_ns": time.time_ns(),
        }
        log.warning(
            "volume %s: crash recovery: %d dirty regions, %d differed (%d bytes, %s)%s",
            self.name, len(dirty) + len(beyond), differing, nbytes,
            self.reconcile_report["direction"],
            f", {len(failed)} FAILED" if failed else "",
        )

    # ------------------------------------------------------------------ rewind

    async def rewind(self, target_seq: int, progress: Progress | None = None) -> int:
        """REWIND record (metadata), then the primary is brought to the target state by
        rewriting only the bytes that differ; reads meanwhile see the target state."""
        head = self.journal.last_seq
        if not 0 <= target_seq <= head:
            return await super().rewind(target_seq)  # raises the usual PointError
        if self._gate is not None:
            raise UsageError(f"volume {self.name} is paused; resume it first")
        if self._rewinding:
            raise UsageError(f"volume {self.name}: a rewind is already in progress")
        ranges = self.changed(head, target_seq)
        regs = sorted({r for a, b in ranges for r in self.drl.regions_of(a, b - a)})
        self._rewinding = True
        for r in regs:
            self._active[r] = self._active.get(r, 0) + 1
        total = sum(b - a for a, b in ranges)
        done = rewritten = 0
        t0 = time.monotonic()
        self.rewind_progress = {"target_seq": target_seq, "done": 0, "total": total, "rewritten": 0}
        ok = False
        try:
            self.drl.set_rewind_from(head)
            await self._drl_commit(max(self._mark(regs), self._drl_gen_bump()))
            seq = await super().rewind(target_seq)
            for a, b in ranges:
                pos = a
                while pos < b:
                    r_end = min(b, (pos // self.drl.region_bytes + 1) * self.drl.region_bytes)
                    rewritten += await self._rewrite(pos, r_end)
                    done += r_end - pos
                    self.rewind_progress.update(done=done, rewritten=rewritten)
                    if progress is not None:
                        progress(done, total, "rewind primary")
                    pos = r_end
            await self._in_exec(self._primary_flush)
            self.drl.set_rewind_from(0)
            await self._drl_commit_all()
            ok = True
        finally:
            for r in regs:
                n = self._active[r] - 1
                if n:
                    self._active[r] = n
                else:
                    del self._active[r]
            if ok:
                self._rewinding = False
            else:
                self.degraded = "rewind: the primary was not fully rewritten (reads come from the journal)"
                log.error("volume %s: %s", self.name, self.degraded)
        log.info("volume %s: rewind to @%d: primary rewritten, %d of %d candidate bytes differed (%.2fs)",
                 self.name, target_seq, rewritten, total, time.monotonic() - t0)
        self.rewind_progress = dict(self.rewind_progress, finished=True, seconds=round(time.monotonic() - t0, 3))
        return seq

    def _drl_gen_bump(self) -> int:
        self._drl_gen += 1
        return self._drl_gen

    async def _rewrite(self, start: int, end: int) -> int:
        """Primary [start, end) := the journal's head, where it differs."""
        op = await self._barrier(start, end)
        try:
            assert self.primary is not None
            want = Volume.read(self, start, end - start)
            have = await self._in_exec(self.primary.pread, start, end - start)
            n = 0
            for a, b in _diff_runs(want, have):
                await self._in_exec(self.primary.pwrite, want[a:b], start + a)
                n += b - a
            return n
        finally:
            self._ranges.finish(op)

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
    "ERR_COPY",
    "ERR_CRASH_RECONCILE",
    "ERR_JOURNAL_GAP",
    "ERR_PRIMARY_WRITE",
    "ProxyVolume",
    "create_drl",
    "create_proxy_volume",
    "primary_size",
    "proxy_meta",
]
