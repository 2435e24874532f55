"""Retention of one volume as a volume service: its policy and kept markers, expired
points, the store cap, and gc (map retain + journal compaction).

Design notes
------------
* **Attached, not built in.** The store attaches a :class:`Retention` to every volume
  it serves (:func:`attach_retention`); the volume calls it through the
  :class:`~cdp.volume.VolumeService` hooks: ``admit_write`` (the store cap) and
  ``point_error`` (an expired point, named with the nearest retained ones). Code above
  the store finds it with :func:`retention_of`. Which points a policy keeps is
  :mod:`cdp.retention.policy`.
* **gc** (:meth:`Retention.gc`): seal, ``maps.retain(points, keep_after)`` (maps
  between retained points are merged and switched atomically through the manifest),
  then every sealed segment whose live fraction is below ``compact_below`` is compacted
  by the journal (live records and chunks copied forward, same seqs; see
  ``cdp.journal.compact``) in a worker thread, at full speed while the volume's host
  writes stay under ``compact_busy_writes`` bytes/s, else at ``compact_rate``.
* **Store cap.** ``max_store_bytes`` (journal + maps of the volume). ``on_full =
  "refuse"``: host writes and zeroes (of either volume kind: the check is
  ``admit_write``) fail with StoreFull (ENOSPC) while over the cap.
  ``"expire"``: writes keep working, a warning is raised (status, log, metric) and an
  emergency gc expires the oldest retained points first, then moves the ``all`` cutoff
  forward, until the store is under 90 % of the cap or nothing more can go.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from cdp.config import RetentionSettings, parse_tiers
from cdp.errors import CdpError, ConfigError, Corruption, PointError, StoreFull, UsageError
from cdp.fsutil import write_file_atomic
from cdp.journal import Pacer, build_compacted
from cdp.progress import Progress
from cdp.retention.policy import NS, policy_points
from cdp.units import format_time
from cdp.volume import Volume, VolumeService
from mapengine import ZERO_LOC

log = logging.getLogger("cdp.retention")

RETENTION_FILE = "retention.json"
RETENTION_FORMAT = 1
#: bytes written between two checks of the store size against the cap
_CAP_CHECK_BYTES = 4 << 20


def attach_retention(vol: Volume) -> Retention:
    """Attach *vol*'s retention (reads ``retention.json``, checks the cap); returns the
    attached one if there is one already."""
    for s in vol.services:
        if isinstance(s, Retention):
            return s
    ret = Retention(vol)
    vol.attach(ret)
    return ret


def retention_of(vol: Volume) -> Retention:
    """The retention attached to *vol* (every volume the store serves has one).
    UsageError for a volume opened without it. O(services)."""
    for s in vol.services:
        if isinstance(s, Retention):
            return s
    raise UsageError(f"volume {vol.name} has no retention attached")


class Retention(VolumeService):
    """The retention state of one volume (policy, kept markers, cap, gc). Create it
    with :func:`attach_retention`."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.path = vol.path / RETENTION_FILE
        self._doc = self._load()
        self._written = 0
        self._cap = 0
        self.over_cap = False
        self.warning: str | None = None
        self.running: asyncio.Task[Any] | None = None
        self._lock = asyncio.Lock()
        self.last_gc: dict[str, Any] | None = None
        self._last_gc_mono = time.monotonic()
        self.expired_total = 0
        self._early: tuple[set[int], int] | None = None
        self.reclaimed_total = 0
        self.check_cap()

    # ------------------------------------------------------------------ policy

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"format": RETENTION_FORMAT, "keep": {}}
        except ValueError as e:
            raise Corruption(f"{self.path}: not valid JSON: {e}") from None
        if doc.get("format") != RETENTION_FORMAT:
            raise Corruption(f"{self.path}: unsupported format {doc.get('format')!r}")
        doc.setdefault("keep", {})
        return dict(doc)

    def _save(self) -> None:
        write_file_atomic(self.path, json.dumps(self._doc, indent=1).encode() + b"\n")

    @property
    def settings(self) -> RetentionSettings:
        s = self.vol.settings.retention_for(self.vol.name)
        over = self._doc.get("policy") or {}
        if "tiers" in over:
            s = replace(s, tiers=parse_tiers(over["tiers"], f"{self.path}: tiers"))
        for k in ("max_store_bytes", "on_full"):
            if k in over:
                s = replace(s, **{k: over[k]})
        return s

    def set_policy(self, tiers: list[str] | None = None, max_store_bytes: int | None = None,
                   on_full: str | None = None) -> RetentionSettings:
        over = dict(self._doc.get("policy") or {})
        if tiers is not None:
            parse_tiers(list(tiers), "tiers")
            if not tiers:
                raise UsageError("retention set: give at least one tier like 'all 48h'")
            over["tiers"] = list(tiers)
        if max_store_bytes is not None:
            over["max_store_bytes"] = int(max_store_bytes)
        if on_full is not None:
            if on_full not in ("expire", "refuse"):
                raise ConfigError(f"on_full: expected 'expire' or 'refuse', got {on_full!r}")
            over["on_full"] = on_full
        self._doc["policy"] = over
        self._save()
        self.check_cap()
        return self.settings

    def keep_marker(self, marker_id: int, until_ns: int) -> None:
        self.vol.marker(marker_id)  # NotFound if unknown
        self._doc["keep"][str(marker_id)] = until_ns
        self._save()

    def release_marker(self, marker_id: int) -> bool:
        """Drop a marker's keep (``retention keep M --keep none``): the tiers decide
        again. True when it had one."""
        self.vol.marker(marker_id)  # NotFound if unknown
        had = self._doc["keep"].pop(str(marker_id), None) is not None
        self._save()
        return had

    def kept_until(self, marker_id: int, now_ns: int | None = None) -> int | None:
        """Until when (ns; -1 forever) the marker is kept, None when it is not (never
        kept, released, or its keep has run out by ``now_ns``, default now)."""
        v = self._doc["keep"].get(str(marker_id))
        if v is None:
            return None
        now = time.time_ns() if now_ns is None else now_ns
        return int(v) if int(v) < 0 or int(v) > now else None

    # ------------------------------------------------------------------ points

    def plan(self, now_ns: int | None = None) -> tuple[set[int], int]:
        """(retained points below keep_after, keep_after) the policy wants now."""
        now = time.time_ns() if now_ns is None else now_ns
        j = self.vol.journal
        head = j.last_seq
        if head == 0:
            return set(), 0
        pts, ka = policy_points(self.settings.tiers, now, j.seq_at_time, head)
        for m in self.vol.markers:
            if self.kept_until(m.id, now) is not None:
                pts.add(m.seq)
        for s in self.vol.services:  # points a service holds (the sentinel's clean points)
            pts.update(s.held_points(self.vol))
        maps = self.vol.maps
        pts = {p for p in pts if 0 < p < ka and maps.resolvable(p)}
        return pts, ka

    def resolvable(self, seq: int) -> bool:
        return self.vol.maps.resolvable(seq)

    def expired_error(self, seq: int, what: str | None = None) -> PointError:
        """The PointError for an expired point, naming the nearest retained points."""
        maps = self.vol.maps
        ret = maps.retained
        i = bisect_left(ret, seq)
        before = ret[i - 1] if i else None
        after = ret[i] if i < len(ret) else (maps.keep_after or None)
        near = [f"@{p} ({_time_of(self.vol, p)})" for p in (before, after) if p]
        name = what or f"@{seq}"
        return PointError(
            f"volume {self.vol.name}: {name} (@{seq}) was expired by retention "
            f"(policy {', '.join(t.text for t in self.settings.tiers)}); nearest retained "
            f"points: {' and '.join(near) if near else 'none'}"
        )

    def point_error(self, vol: Volume, seq: int, what: str | None) -> CdpError | None:
        """Service hook: a point the maps cannot resolve was expired by retention."""
        return self.expired_error(seq, what)

    def tier_info(self, now_ns: int | None = None) -> list[dict[str, Any]]:
        """Per tier: its age band, the oldest recoverable point in it, what expires next."""
        now = time.time_ns() if now_ns is None else now_ns
        j = self.vol.journal
        maps = self.vol.maps
        out = []
        age = 0.0
        ret = maps.retained
        for t in self.settings.tiers:
            lo_ns = now - int((age + t.span) * NS)
            hi_ns = now - int(age * NS)
            lo_seq = j.seq_at_time(lo_ns) + 1 if lo_ns > 0 else 1
            hi_seq = j.seq_at_time(hi_ns)
            oldest = None
            if t.every == 0:
                cand = max(lo_seq, maps.keep_after, 1)
                if cand <= hi_seq:
                    oldest = cand
                else:
                    k = bisect_left(ret, lo_seq)
                    oldest = ret[k] if k < len(ret) and ret[k] <= hi_seq else None
            else:
                k = bisect_left(ret, lo_seq)
                if k < len(ret) and ret[k] <= hi_seq:
                    oldest = ret[k]
                elif maps.keep_after and lo_seq <= maps.keep_after <= hi_seq:
                    oldest = maps.keep_after
            row: dict[str, Any] = {"tier": t.text, "keep": "all" if t.every == 0 else t.text.split()[0],
                                   "from_age_s": age, "to_age_s": age + t.span,
                                   "oldest_point": None, "oldest_time_ns": None,
                                   "next_expiry_ns": None}
            if oldest:
                ts = j.time_of_seq(oldest)
                row["oldest_point"] = f"@{oldest}"
                row["oldest_time_ns"] = ts
                row["next_expiry_ns"] = ts + int((age + t.span) * NS)
            out.append(row)
            age += t.span
        return out

    # ------------------------------------------------------------------ store cap

    def store_bytes(self) -> int:
        return int(self.vol.journal.stats().file_bytes + self.vol.maps.stats()["disk_bytes"])

    def check_cap(self) -> bool:
        cap = self._cap = self.settings.max_store_bytes
        was = self.over_cap
        self.over_cap = bool(cap) and self.store_bytes() >= cap
        if self.over_cap and not was:
            s = self.settings
            self.warning = (f"store cap reached: {self.store_bytes()} of {cap} bytes; "
                            + ("refusing host writes (ENOSPC)" if s.on_full == "refuse"
                               else "expiring the oldest history early"))
            log.warning("volume %s: %s", self.vol.name, self.warning)
        elif not self.over_cap and was:
            log.warning("volume %s: store back under its cap", self.vol.name)
        return self.over_cap

    def admit_write(self, vol: Volume, nbytes: int) -> None:
        """Service hook before a host write or zero: StoreFull while over the cap in
        refuse mode. O(1) (a cap check of the store size every 4 MiB written)."""
        if not self._cap:
            return
        self._written += nbytes
        if self._written >= _CAP_CHECK_BYTES:
            self._written = 0
            self.check_cap()
        if self.over_cap and self.settings.on_full == "refuse":
            raise StoreFull(f"volume {self.vol.name}: store cap of "
                            f"{self.settings.max_store_bytes} bytes reached (on_full = refuse)")

    # ------------------------------------------------------------------ gc

    def due(self) -> bool:
        iv = self.settings.gc_interval
        if self.running is not None and not self.running.done():
            return False
        if self.over_cap and self.settings.on_full == "expire":
            return True
        return bool(iv) and time.monotonic() - self._last_gc_mono >= iv

    def tick(self) -> None:
        """Called about once a second by cdpd: start a gc when one is due."""
        if self.settings.max_store_bytes:
            self.check_cap()
        if self.due():
            self._last_gc_mono = time.monotonic()
            self.running = asyncio.get_running_loop().create_task(self._scheduled())

    async def _scheduled(self) -> None:
        try:
            r = await self.gc()
            if r["segments_compacted"] or r["expired_seqs"]:
                log.info("volume %s: gc %s", self.vol.name, r)
        except Exception:
            log.exception("volume %s: gc failed", self.vol.name)

    async def gc(self, progress: Progress | None = None, now_ns: int | None = None,
                 rate: float | None = None) -> dict[str, Any]:
        """Expire by policy, then compact; emergency rounds while over a cap in expire mode.
        One gc at a time per volume (a second one waits for the first). While any gc
        runs, the interpreter's switch interval is at most ``GC_SWITCH_INTERVAL``."""
        async with self._lock:
            with _fine_switching():
                return await self._gc(progress, now_ns, rate)

    async def _gc(self, progress: Progress | None, now_ns: int | None,
                  rate: float | None) -> dict[str, Any]:
        r = await self._gc_once(progress, now_ns, rate)
        s = self.settings
        rounds = 0
        while self.check_cap() and s.on_full == "expire" and rounds < 32:
            cap = s.max_store_bytes
            if self.store_bytes() < cap * 0.9:
                break
            if not self._expire_early(now_ns):
                break
            rounds += 1
            r2 = await self._gc_once(progress, now_ns, rate, extra_ok=True)
            for k in ("expired_seqs", "segments_compacted", "markers_expired", "dropped_bytes"):
                r[k] += r2[k]
            r["bytes_after"] = r2["bytes_after"]
        r["emergency_rounds"] = rounds
        r["over_cap"] = self.over_cap
        if rounds:
            self.warning = (f"store cap {s.max_store_bytes} bytes: expired the oldest history "
                            f"early ({rounds} rounds)")
            log.warning("volume %s: %s", self.vol.name, self.warning)
        self.last_gc = r
        return r

    def _expire_early(self, now_ns: int | None) -> bool:
        """Give up the oldest quarter of retained points, or move the all-cutoff forward.
        Sets ``self._early`` for the next gc round; False if nothing is left to give."""
        maps = self.vol.maps
        ret = maps.retained
        head = self.vol.journal.last_seq
        early = self._early or (set(ret), maps.keep_after)
        pts = sorted(early[0])
        ka = early[1]
        if pts:
            pts = pts[max(1, len(pts) // 4):]
        elif ka < head:
            ka = ka + max(1, (head - ka) // 2)
        else:
            return False
        self._early = (set(pts), ka)
        return True

    async def _gc_once(self, progress: Progress | None, now_ns: int | None,
                       rate: float | None, extra_ok: bool = False) -> dict[str, Any]:
        vol = self.vol
        j = vol.journal
        maps = vol.maps
        t0 = time.perf_counter()
        bytes_before = self.store_bytes()
        vol.seal()
        old_ka, old_ret = maps.keep_after, set(maps.retained)
        pts, ka = self.plan(now_ns)
        early = self._early
        if extra_ok and early is not None:
            epts, eka = early  # the emergency cut: a subset of what is retained now
            ka = max(ka, eka)
            pts = {p for p in epts if p < ka and maps.resolvable(p)}
        self._early = None
        was = {m.id for m in vol.markers if maps.resolvable(m.seq)}
        loop = asyncio.get_running_loop()
        # the map rewrite runs in a worker thread; ingest and reads go on meanwhile
        # (seals wait for it) and the result is switched in on the loop
        job = maps.retain_prepare(sorted(pts), ka)
        try:
            await loop.run_in_executor(None, job.build)
        except BaseException:
            maps.retain_abort(job)
            raise
        if vol.closed:
            maps.retain_abort(job)
            raise UsageError(f"volume {vol.name} was closed during gc")
        res = maps.retain_finish(job, remove=False)
        vol.view_regions.clear()  # cached past points may just have expired
        vol.seal_after_retain()
        await loop.run_in_executor(None, job.remove_stale)
        hi = res.keep_after
        if old_ka == 0:
            before = max(0, hi - 1)
        else:
            before = max(0, hi - old_ka) + sum(1 for p in old_ret if p < hi)
        expired = max(0, before - sum(1 for p in res.retained if p < hi))
        markers_expired = sum(1 for m in vol.markers
                              if m.id in was and not maps.resolvable(m.seq))
        # liveness per seq from the maps (in a worker thread: the windows are immutable
        # files); compact sealed segments below the threshold
        sealed_upto = maps.sealed_seq
        segs = [s for s in j.segments() if s.sealed and s.records and s.last_seq <= sealed_upto]
        s = self.settings
        q, po, ln, todo = await loop.run_in_executor(
            None, _liveness, maps.sealed_windows(), segs, s.compact_below)
        total = sum(sg.bytes for sg in todo)
        done = 0
        compacted = 0
        stop = threading.Event()  # set when this gc is cancelled (cdpd stopping)
        if rate is None:  # the volume's budget, applied while its ingest is busy
            pacer = Pacer(rate_fn=IngestPace(vol, s.compact_rate, s.compact_busy_writes),
                          stop=stop)
        else:  # cdpctl gc --rate: a fixed budget (0: unthrottled)
            pacer = Pacer(rate, stop=stop)
        try:
            for sg in todo:
                if vol.closed:
                    break
                src = j.compact_source(sg.first_seq)
                a = int(np.searchsorted(q, sg.first_seq, side="left"))
                b = int(np.searchsorted(q, sg.last_seq, side="right"))
                prep = await loop.run_in_executor(
                    None, _compact, src, q[a:b], po[a:b], ln[a:b], pacer)
                if await j.compact_commit_async(prep):
                    compacted += 1
                done += sg.bytes
                if progress is not None:
                    progress(done, total, "compact")
        except asyncio.CancelledError:
            stop.set()  # a paced compaction thread ends now instead of sleeping on
            raise
        self.check_cap()
        bytes_after = self.store_bytes()
        self.expired_total += expired
        self.reclaimed_total += max(0, bytes_before - bytes_after)
        self._last_gc_mono = time.monotonic()
        return {
            "volume": vol.name,
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "segments_compacted": compacted,
            "segments_considered": len(segs),
            "expired_seqs": expired,
            "markers_expired": markers_expired,
            "dropped_bytes": res.dropped_bytes,
            "retained_points": len(res.retained),
            "keep_after": res.keep_after,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    # ------------------------------------------------------------------ reporting

    def show(self) -> dict[str, Any]:
        s = self.settings
        maps = self.vol.maps
        return {
            "volume": self.vol.name,
            "tiers": [t.text for t in s.tiers],
            "max_store_bytes": s.max_store_bytes,
            "on_full": s.on_full,
            "gc_interval_s": s.gc_interval,
            "compact_below": s.compact_below,
            "compact_rate": s.compact_rate,
            "compact_busy_writes": s.compact_busy_writes,
            "store_bytes": self.store_bytes(),
            "over_cap": self.over_cap,
            "warning": self.warning,
            "keep_after": maps.keep_after,
            "retained_points": len(maps.retained),
            "kept_markers": {k: v for k, v in self._doc["keep"].items()
                             if self.kept_until(int(k)) is not None},  # not run out
            "per_tier": self.tier_info(),
            "last_gc": self.last_gc,
            "source": "retention.json" if self._doc.get("policy") else "config",
        }


def _liveness(windows: list[Any], segs: list[Any], below: float) -> tuple[Any, Any, Any, list[Any]]:
    """Live fragments of the sealed segments ``segs`` (seq, payload offset, length;
    sorted by seq) and the segments less live than ``below``. Any thread: it only
    loads immutable map files."""
    firsts = np.array([sg.first_seq for sg in segs], np.int64)
    lasts = np.array([sg.last_seq for sg in segs], np.int64)
    parts = []
    for r in windows:  # vectorised: no Python object per fragment
        c = r.load().cols
        c = c.take(c.loc != ZERO_LOC)
        parts.append((c.seq, c.poff, c.end - c.start))
    if parts and len(segs):
        q = np.concatenate([p[0] for p in parts])
        po = np.concatenate([p[1] for p in parts])
        ln = np.concatenate([p[2] for p in parts])
        si = np.searchsorted(firsts, q, side="right") - 1
        ok = (si >= 0) & (q <= lasts[np.maximum(si, 0)])
        q, po, ln, si = q[ok], po[ok], ln[ok], si[ok]
        live_raw: Any = np.bincount(si, weights=ln, minlength=len(segs))
    else:
        q = po = ln = np.empty(0, np.int64)
        live_raw = np.zeros(len(segs))
    todo = [sg for i, sg in enumerate(segs)
            if sg.raw_bytes > 0 and live_raw[i] / sg.raw_bytes < below]
    order = np.argsort(q, kind="stable")
    return q[order], po[order], ln[order], todo


#: the interpreter's switch interval while a gc runs (seconds; Python's default is
#: 5 ms): how long the event loop may wait for the GIL while a gc worker thread runs
#: Python (the map rewrite, compaction's steps) before the interpreter makes it yield
GC_SWITCH_INTERVAL = 0.0005
_fine: list[float] = []  # [interval to restore, gcs running] (loop thread only)


@contextmanager
def _fine_switching() -> Iterator[None]:
    """Lower the switch interval to GC_SWITCH_INTERVAL while at least one gc runs."""
    if not _fine:
        _fine.extend((sys.getswitchinterval(), 0))
        sys.setswitchinterval(min(_fine[0], GC_SWITCH_INTERVAL))
    _fine[1] += 1
    try:
        yield
    finally:
        _fine[1] -= 1
        if not _fine[1]:
            sys.setswitchinterval(_fine[0])
            _fine.clear()


class IngestPace:
    """The compaction budget of one gc as the volume's ingest allows (a ``rate_fn`` of
    :class:`~cdp.journal.compact.Pacer`): ``rate`` bytes/s while the volume's host
    writes ran above ``busy`` bytes/s over the last quarter second or more, else 0
    (unthrottled). ``busy`` 0: always ``rate``. Any thread (it reads one counter)."""

    WINDOW = 0.25

    def __init__(self, vol: Volume, rate: float, busy: int) -> None:
        self.vol, self.rate, self.busy = vol, rate, busy
        self._t = time.monotonic()
        self._b = vol.bytes_written
        self.is_busy = True  # until the first window says otherwise

    def __call__(self) -> float:
        if not self.busy or self.rate <= 0:
            return self.rate
        now = time.monotonic()
        if now - self._t >= self.WINDOW:
            b = self.vol.bytes_written
            self.is_busy = (b - self._b) / (now - self._t) > self.busy
            self._t, self._b = now, b
        return self.rate if self.is_busy else 0.0


def _compact(src: Any, q: Any, po: Any, ln: Any, pacer: Pacer) -> Any:
    """The live map of one segment from its fragments, then :func:`build_compacted`
    (any thread)."""
    sub: dict[int, list[tuple[int, int]]] = {}
    for qq, pp, nn in zip(q.tolist(), po.tolist(), ln.tolist(), strict=True):
        sub.setdefault(qq, []).append((pp, nn))
    return build_compacted(src, sub, pacer=pacer)


def _time_of(vol: Volume, seq: int) -> str:
    try:
        ns = vol.journal.time_of_seq(seq)
    except Exception:
        return "?"
    return format_time(ns, sep="T")
