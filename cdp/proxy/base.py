"""What the parts of a proxy volume share: the primary and its worker threads, the
range queue, the dirty region log and its durability, the catch-up queue.

:class:`ProxyBase` is the state; :class:`~cdp.proxy.copy.InitialCopy`,
:class:`~cdp.proxy.reconcile.Reconcile` and :class:`~cdp.proxy.volume.ProxyVolume`
build on it (docs/PROXY.md).

Design notes
------------
* **DRL durability.** A region is marked dirty in memory, then the DRL page is written
  and fdatasync'd in a worker thread before any data moves there; every change bumps a
  generation and a write waits until its generation is durable, so concurrent writers
  share one DRL sync (:meth:`ProxyBase._drl_commit`). Clears and header fields are
  written soon without anyone waiting (:meth:`ProxyBase._drl_changed`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from cdp.proxy.drl import DirtyRegionLog
from cdp.proxy.primary import FilePrimary, NbdPrimary
from cdp.proxy.workers import RangeOp, Ranges, Workers, Writer
from cdp.volume import Volume

log = logging.getLogger("cdp.proxy")

#: ERROR record codes written by proxy mode (docs/PROXY.md)
ERR_PRIMARY_WRITE = 1
ERR_JOURNAL_GAP = 2
ERR_CRASH_RECONCILE = 3
ERR_COPY = 4

PIECE = 64 << 10  # compare granularity (primary vs. journal)


class ProxyBase(Volume):
    """The shared state of a proxy-mode volume (see the module notes). Not used alone:
    :class:`~cdp.proxy.volume.ProxyVolume` is the volume kind."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.primary_spec = ""
        self.ack = "primary"
        self.primary: FilePrimary | NbdPrimary | None = None
        self.drl: DirtyRegionLog = None  # type: ignore[assignment]  # set in _opened
        self._exec: Workers | None = None
        #: the one writer thread of host writes to a file primary (None: NBD, the pool)
        self._writer: Writer[Any] | None = None
        self._drl_exec: concurrent.futures.ThreadPoolExecutor | None = None
        self._ranges = Ranges()
        self._active: dict[int, int] = {}  # region -> writes (or a rewind) in flight
        self._undurable: dict[int, int] = {}
        self._drl_gen = 0
        self._drl_durable = 0
        self._drl_task: asyncio.Task[None] | None = None
        #: region -> why the journal owes a catch-up from the primary there
        self._catchup: dict[int, str] = {}
        self._bg: dict[str, asyncio.Task[None]] = {}
        self._running_loop: asyncio.AbstractEventLoop | None = None
        self.degraded: str | None = None

    # ------------------------------------------------------------------ helpers

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (the volume is used from one loop at a time). Cached: on
        CPython ``asyncio.get_running_loop`` makes a ``getpid`` system call, which was
        4% of the loop's time on the write path."""
        loop = self._running_loop
        if loop is None or not loop.is_running():
            loop = self._running_loop = asyncio.get_running_loop()
        return loop

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
        """Start due background work (initial copy, catch-up, cleaner); defined by
        :class:`~cdp.proxy.volume.ProxyVolume`."""
        raise NotImplementedError

    async def _barrier(self, start: int, end: int) -> RangeOp:
        op, preds = self._ranges.add(start, end, True)
        if preds:
            await asyncio.wait(preds)
        return op

    def _primary_flush(self) -> None:
        assert self.primary is not None
        self.primary.flush()

    def _stop_workers(self) -> None:
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
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

    async def _drl_commit_all(self) -> None:
        self._drl_gen += 1
        await self._drl_commit(self._drl_gen)

    def _drl_gen_bump(self) -> int:
        self._drl_gen += 1
        return self._drl_gen


