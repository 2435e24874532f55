"""Where a proxy volume's journal and primary are brought back together: reconcile at
open (after a crash), the catch-up of the journal from the primary, and the rewrite of
the primary after a rewind (docs/PROXY.md).

Design notes
------------
* **Catch-up.** A region whose journal side failed (or whose primary write failed) is
  queued; a background task holds new writes there back (a barrier), reads the
  primary and appends an ERROR record plus the 64 KiB pieces where the journal's head
  differs (:meth:`Reconcile._append_diff`).
* **After a crash** the dirty regions are compared before the volume is served: the
  primary holds every acknowledged write, so where it differs from the journal's head
  the journal gets an ERROR record (code 3) and the primary's bytes. A rewind whose
  primary rewrite was interrupted (DRL header ``rewind_from``) is completed instead:
  the journal's head is written to the primary.
* **Rewind** appends the REWIND record (metadata, as in mirror mode), then rewrites on
  the primary only the bytes that differ from the target inside the candidate ranges of
  ``changed(now, target)``, region by region behind a barrier; reads meanwhile come
  from the journal. The regions are marked dirty and ``rewind_from`` set first, so a
  crash in the middle is completed at the next start.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cdp.errors import CdpError, UsageError
from cdp.journal import RecordKind
from cdp.progress import Progress
from cdp.proxy.base import (
    ERR_CRASH_RECONCILE,
    ERR_JOURNAL_GAP,
    ERR_PRIMARY_WRITE,
    PIECE,
    ProxyBase,
)
from cdp.volume import Volume

log = logging.getLogger("cdp.proxy")


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


class Reconcile(ProxyBase):
    """The reconcile, catch-up and rewind part of :class:`~cdp.proxy.volume.ProxyVolume`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rewinding = False
        self.rewind_progress: dict[str, Any] | None = None
        self.caught_up_bytes = 0
        self.reconcile_report: dict[str, Any] = {}

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
        if self.maps.last_seq > self.maps.sealed_seq:
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

    # ------------------------------------------------------------------ catch-up

    def _append_diff(self, start: int, primary: bytes, code: int, why: str) -> int:
        """Make the journal's head equal *primary* over [start, start+len): an ERROR
        record, then WRITE records where they differ. Returns the bytes journalled."""
        head = Volume.read(self, start, len(primary))
        runs = _diff_runs(primary, head)
        if not runs:
            return 0
        n = sum(b - a for a, b in runs)
        self._record_error(code, start, len(primary), f"{why}; {n} bytes caught up from the primary")
        for a, b in runs:
            self._record_write(start + a, primary[a:b])
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


