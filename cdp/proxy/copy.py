"""The initial full copy of a proxy volume: the primary's content at creation, region
by region, into INIT records (docs/PROXY.md, "The initial full copy").

Design notes
------------
* **Initial full copy** at creation: region by region into INIT records (zero runs
  skipped), throttled, progress reported. A host write to a region not copied yet
  copies that region first, so INIT records always precede the host writes of their
  region. The copied watermark lives in the DRL header (persisted only after the INIT
  records are durable), so a restart continues where the copy stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from cdp.errors import CdpError
from cdp.progress import Progress
from cdp.proxy.base import ERR_COPY, PIECE, ProxyBase

log = logging.getLogger("cdp.proxy")


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


class InitialCopy(ProxyBase):
    """The initial-copy part of :class:`~cdp.proxy.volume.ProxyVolume`: its state and
    :meth:`wait_initial_copy`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._copy_ahead: set[int] = set()  # regions copied ahead of the watermark
        self._copy_next = 0  # in memory; the DRL header has the durable watermark
        self._copying: dict[int, asyncio.Future[None]] = {}
        self._copy_task: asyncio.Task[None] | None = None
        self._copy_waiters: list[Progress] = []
        self.copy_rate = 0  # bytes/s, 0: unthrottled
        self.copied_bytes = 0

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
                    self._record_write(start + a, data[a:b], init=True)
                    self.copied_bytes += b - a
            finally:
                self._ranges.finish(op)
        except (CdpError, OSError) as e:
            # keep the volume available: the catch-up journals this region later
            self._catchup.setdefault(r, f"journal: initial copy of region {r} failed: {e}")
            if self.degraded is None:
                log.warning("volume %s: DEGRADED: initial copy of region %d failed: %s", self.name, r, e)
            self.degraded = f"initial copy: {e}"
            try:
                self._record_error(ERR_COPY, start, end - start, f"initial copy failed: {e}")
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


