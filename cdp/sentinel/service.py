"""The ransomware sentinel of one volume as a volume service: block evidence from the
write stream, alerts, and the clean point before the first suspicious write.

Design notes
------------
* **Hot path: one write in ``stride``, counted by the volume.** The sentinel is a
  sampler (``VolumeService.on_sample``), not a recorder: the volume counts the bytes of
  every WRITE (``Volume.write_record_bytes``) and counts down the writes, and calls
  :meth:`on_sample` for one in ``stride`` (the value it returned), which leaves that
  write's seq, time, range, the journal's lz4 probe ratio (``Journal.last_lz4``) and
  a copy of its first :data:`~cdp.sentinel.signals.SAMPLE` bytes in a bounded deque.
  An unsampled write costs the sentinel no call (~0.05 µs in the volume, against
  0.2-0.3 µs for the call it replaced). The stride is set at every batch from that
  batch's writes, so that about :data:`SAMPLES_PER_BATCH` writes are sampled per
  batch; a burst that came before the stride caught up is classified on an even
  subsample.
* **A background task** (started at the first write on a running loop) drains the deque
  every :data:`POLL` (500 ms): the samples' entropy (one ``bincount`` per 32 samples,
  then one numpy pass; the rest of a batch's bookkeeping is plain Python: a dozen numpy
  calls on a few dozen samples cost more than the loops they replace), the detector's
  counters (the high-entropy share of the sampled bytes stands for all bytes written),
  then for sampled high-entropy writes the bytes they overwrote, read from cdp's own
  maps at the seq before (:meth:`_old_bytes`: a narrow map resolve at ``seq - 1``), at
  most ``checks_per_second`` and :data:`CHECK_CPU` of a core (each check's CPU time is
  measured: a check costs more as the map history it walks grows), once the write is
  sealed into map files (``on_sealed``: a resolve at a past seq inside the live window
  would index the whole window, ~1 µs per write). At an alert the writes before the first suspect one that were not sampled
  are read back from the journal (:meth:`_walk_back`) to find the first suspicious
  write exactly. A batch costs ~0.45 ms of CPU in cdpd, mostly fixed, and costs the
  write path around it 2-3 times as much again (measured side by side, not traced:
  cache refills, presumably), hence 2 batches a second rather than 10. Both check
  budgets refill before a batch chooses its checks, so a burst that fits in one batch
  after a quiet spell gets the checks the spell earned (refilled after the choice, the
  raw-volume attack of tests/integration/test_sentinel_cdpd.py got 4 checks in half
  the runs at 2 batches a second, under the detector's floor of 8 suspect writes).
* **The clean point is the sentinel's, not a marker.** A MARKER record names no past
  seq and adding one would change the format, so ``clean-before-alertN`` lives in
  ``sentinel.json``: the volume resolves it through :meth:`resolve_label` and retention
  keeps it through :meth:`held_points` while the alert is active.
* **File evidence loads when used.** :mod:`cdp.sentinel.files` (with the ext4 parser)
  is imported by the first file scan, not with this module: the sentinel attaches
  before cdpd's NBD listener (it must see every write the volume accepts), so its
  import is on the restart path (issue 27).
* **State** (``sentinel.json``, atomic writes): alerts, hourly baseline maxima, the
  raised threshold. Written on an alert, a dismissal, each hour and at close.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cdp.config import SentinelSettings
from cdp.errors import CdpError, Corruption, NotFound, UsageError
from cdp.fsutil import write_file_atomic
from cdp.journal import RecordKind
from cdp.sentinel.detector import Detector, Firing
from cdp.sentinel.signals import (
    LZ4_COMPRESSIBLE,
    SAMPLE,
    Verdict,
    entropy_batch,
    entropy_bits,
    overwrite_verdict,
)
from cdp.units import format_time
from cdp.volume import Volume, VolumeService
from mapengine.errors import MapError

if TYPE_CHECKING:  # imported by the first file scan (design notes)
    from cdp.sentinel.files import FileCatalog, View

log = logging.getLogger("cdp.sentinel")

SENTINEL_FILE = "sentinel.json"
SENTINEL_FORMAT = 1
CLEAN_LABEL = "clean-before-alert"
_CLEAN_RE = re.compile(r"clean-before-alert(\d+)\Z")
#: writes waiting for the background task (more: the oldest are dropped)
MAX_PENDING = 1 << 16
#: at most this many journal records are scanned back for the first suspicious write
WALK_MAX = 1 << 12
#: sampled writes per batch the stride aims at (the rest are extrapolated)
SAMPLES_PER_BATCH = 32
MAX_STRIDE = 1 << 12
#: the walk back stops after this many consecutive non-suspect writes
WALK_STOP = 32
#: seconds between batches
POLL = 0.5
#: CPU seconds per second the checks of overwritten bytes may take on average (0.5 % of
#: a core), besides ``checks_per_second``: a check's cost grows with the map layers it
#: walks (0.1-0.3 ms in cdpd, whose compaction keeps the layers few; 1-3.5 ms after
#: 250k random 4 KiB writes without compaction, most checked ranges being holes that
#: every layer must confirm), and 20 checks a second must stay a small cost
CHECK_CPU = 0.005
#: CPU seconds of checks saved up for a burst
CHECK_CPU_BURST = 0.02
#: busy sentinels of one process that run at the full rates (2 batches a second,
#: ``checks_per_second``, :data:`CHECK_CPU`); with more busy at once each gets a share
#: (:func:`share`): together they cost what this many cost
SHARED_FREE = 8
#: a sentinel counts as busy this many seconds after a batch that had samples
BUSY_FOR = 5.0
#: id(sentinel) -> monotonic time of its last batch with samples
_busy: dict[int, float] = {}
_cpu_time = time.thread_time
_time_ns = time.time_ns


def share(now: float | None = None) -> float:
    """The share of the full rates each busy sentinel of this process gets now:
    ``min(1, SHARED_FREE / busy)``. With 64 volumes written at once, the per-volume
    batches (~0.45 ms of CPU each, and 2-3 times that again in the write path around
    them) and checks (up to :data:`CHECK_CPU` each) were ~10 % of cdpd's loop (py-spy,
    issue 27): each now polls every ``POLL / share`` s and refills its check budgets at
    ``share`` of their rates, so a lone attacked volume keeps the full rates and 64 busy
    ones cost what 8 did. O(sentinels) (stale entries are dropped)."""
    now = time.monotonic() if now is None else now
    cut = now - BUSY_FOR
    for k in [k for k, t in _busy.items() if t < cut]:
        del _busy[k]
    n = len(_busy)
    return 1.0 if n <= SHARED_FREE else SHARED_FREE / n


def attach_sentinel(vol: Volume) -> Sentinel:
    """Attach *vol*'s sentinel (reads ``sentinel.json``); returns the attached one if
    there is one already."""
    for s in vol.services:
        if isinstance(s, Sentinel):
            return s
    sen = Sentinel(vol, vol.settings.sentinel)
    vol.attach(sen)
    return sen


def sentinel_of(vol: Volume) -> Sentinel | None:
    """The sentinel attached to *vol*, None when ``[sentinel] enabled = false``."""
    for s in vol.services:
        if isinstance(s, Sentinel):
            return s
    return None


class Sentinel(VolumeService):
    """Block evidence, alerts and clean points of one volume (docs/SENTINEL.md)."""

    def __init__(self, vol: Volume, settings: SentinelSettings) -> None:
        self.vol = vol
        self.s = settings
        self.path = vol.path / SENTINEL_FILE
        doc = self._load()
        self.alerts: list[dict[str, Any]] = doc["alerts"]
        self._next_id = int(doc["next_alert"])
        self.det = Detector(settings, {int(k): float(v) for k, v in doc["hourly_max"].items()},
                            float(doc["raised"]))
        self.det.alerting = any(a["state"] == "active" for a in self.alerts)
        self._pending: deque[tuple[int, int, int, int, float, bytes | bytearray]] = deque(maxlen=MAX_PENDING)
        self._counted = vol.write_record_bytes  # WRITE bytes up to the last batch
        self._stride = 1  # one write in stride is sampled
        #: chosen high-entropy writes waiting for their seal: (seq, ns, offset, length)
        self._to_check: deque[tuple[int, int, int, int]] = deque()
        self._sealed_seq = 0
        #: recent seal boundaries (map window edges), ascending
        self._seals: deque[int] = deque(maxlen=4096)
        self._task: asyncio.Task[None] | None = None
        self._tokens = float(settings.checks_per_second)
        self._refill = time.monotonic()
        self._cpu = CHECK_CPU_BURST  # CPU seconds the checks may still take (CHECK_CPU)
        self._check_cost = 0.0  # CPU seconds per check, a moving average (0: none yet)
        self._hour = time.time_ns() // (3600 * 10**9)
        self._closed = False
        self._active: dict[str, Any] | None = None
        #: suspect files in the slow window: path -> [first suspicious write ns, seq]
        self.suspect_files: dict[str, list[int]] = {
            str(k): [int(v[0]), int(v[1])] for k, v in doc["suspect_files"].items()}
        self._scan_lock = asyncio.Lock()
        self.files: FileCatalog | None = None  # the catalog (use_catalog)
        # counters (metrics)
        self.alerts_total = 0
        self.writes_seen = 0
        self.dropped = 0
        self.high_entropy_bytes = 0
        self.checked_writes = 0
        self.suspect_writes = 0
        self.batches = 0
        self.batch_cpu = 0.0  # CPU seconds in batches, without their checks
        self.check_cpu = 0.0  # CPU seconds in checks of overwritten bytes

    # ------------------------------------------------------------------ state

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"format": SENTINEL_FORMAT, "next_alert": 1, "alerts": [],
                    "hourly_max": {}, "raised": 0.0, "suspect_files": {}}
        except ValueError as e:
            raise Corruption(f"{self.path}: not valid JSON: {e}") from None
        if doc.get("format") != SENTINEL_FORMAT:
            raise Corruption(f"{self.path}: unsupported format {doc.get('format')!r}")
        for k, v in (("next_alert", 1), ("alerts", []), ("hourly_max", {}), ("raised", 0.0),
                     ("suspect_files", {})):
            doc.setdefault(k, v)
        return dict(doc)

    def _save(self) -> None:
        doc = {"format": SENTINEL_FORMAT, "next_alert": self._next_id, "alerts": self.alerts,
               "hourly_max": {str(k): v for k, v in sorted(self.det.hourly_max.items())},
               "raised": self.det.raised, "suspect_files": self.suspect_files}
        write_file_atomic(self.path, json.dumps(doc, indent=1).encode() + b"\n")

    # ------------------------------------------------------------------ service hooks

    def on_sample(self, vol: Volume, seq: int, offset: int, length: int,
                  payload: bytes | bytearray | memoryview) -> int:
        """Hot path, one WRITE in ``stride`` (the volume counts the others): keep its
        time, range, lz4 probe and a copy of its first 512 bytes for the background
        task; returns the stride. ~1 µs."""
        if len(self._pending) == MAX_PENDING:
            self.dropped += 1
        sample = payload[:SAMPLE]  # a copy, except of a memoryview
        self._pending.append((seq, _time_ns(), offset, length, vol.journal.last_lz4,
                              sample.tobytes() if type(sample) is memoryview else sample))
        if self._task is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return self._stride  # no loop (a tool): the batch waits for the next one or close
            self._task = loop.create_task(self._run(), name=f"sentinel-{vol.name}")
        return self._stride

    def on_sealed(self, vol: Volume, seq: int) -> None:
        """Writes through *seq* are in map files: their checks may run."""
        self._sealed_seq = seq
        if not self._seals or seq > self._seals[-1]:
            self._seals.append(seq)

    def resolve_label(self, vol: Volume, label: str) -> int | None:
        """``clean-before-alertN``: the seq of alert N's clean point."""
        m = _CLEAN_RE.match(label)
        if m is None:
            return None
        for a in self.alerts:
            if a["id"] == f"alert{m.group(1)}":
                return int(a["clean_seq"])
        return None

    def held_points(self, vol: Volume) -> Iterable[int]:
        """The clean points of active alerts (kept from retention until dismissed)."""
        return [int(a["clean_seq"]) for a in self.alerts
                if a["state"] == "active" and a["clean_seq"] > 0]

    def close(self, vol: Volume) -> None:
        self._closed = True
        _busy.pop(id(self), None)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if not self.writes_seen:
            return  # nothing learned (a tool that only read): leave the file alone
        log.info("volume %s: sentinel: %d samples, %d batches %.3f s CPU, %d checks %.3f s "
                 "CPU", vol.name, self.writes_seen, self.batches, self.batch_cpu,
                 self.checked_writes, self.check_cpu)
        try:
            self._save()
        except OSError as e:  # closing anyway; the alerts were saved when raised
            log.warning("volume %s: sentinel state not saved at close: %s", vol.name, e)

    # ------------------------------------------------------------------ background

    async def _run(self) -> None:
        try:
            while not self._closed:
                await asyncio.sleep(POLL / share())
                if self._pending:
                    await self.process()
                elif self._to_check:
                    await self._check_sealed()
        except asyncio.CancelledError:
            raise
        except Exception:  # the sentinel must never take the volume down
            log.exception("volume %s: sentinel stopped", self.vol.name)
            self._task = None

    async def process(self) -> None:
        """Classify the sampled writes (one batch; at most about 2 x
        :data:`SAMPLES_PER_BATCH`, an even subsample of a larger one), add the batch to
        the detector (the bytes written since the last batch, the sampled and the
        high-entropy ones), queue the overwritten-bytes checks of sampled high-entropy
        writes within the budgets (``checks_per_second`` and :data:`CHECK_CPU`, with the
        measured cost of a check), run the checks of sealed writes, and set the sampling
        stride for about :data:`SAMPLES_PER_BATCH` samples per batch. Cost: ~5 µs per
        sample classified, plus the checks."""
        if not self._pending:
            return
        t0 = _cpu_time()
        batch = list(self._pending)
        self._pending.clear()
        k = len(batch)
        self.writes_seen += k
        # the stride follows the write rate at once (k * stride writes came in this
        # batch), rather than doubling from 1 over several batches of surplus samples
        self._stride = min(MAX_STRIDE, max(1, k * self._stride // SAMPLES_PER_BATCH))
        if k > 2 * SAMPLES_PER_BATCH:  # a burst before the stride caught up: an even subsample
            batch = batch[:: k // SAMPLES_PER_BATCH]
        seqs, nss, offs, lens, ratios, samples = zip(*batch, strict=True)
        # a batch is a few dozen samples: plain Python over its columns costs less than the
        # fixed cost of a dozen numpy calls (the entropies are the one vectorised step)
        thr = self.s.entropy_bits
        hi = [b >= thr and not 0 <= r < LZ4_COMPRESSIBLE
              for b, r in zip(entropy_batch(samples).tolist(), ratios, strict=True)]
        total = self.vol.write_record_bytes
        written, self._counted = total - self._counted, total
        sampled = sum(lens)
        self.high_entropy_bytes += int(written * sum(n for n, h in zip(lens, hi, strict=True) if h)
                                       / sampled)
        # the bytes written go to the buckets of the samples, in proportion (one bucket
        # almost always; at a bucket's edge both get their share)
        bucket_ns = self.det.bucket_ns
        per: dict[int, list[int]] = {}  # bucket -> [sampled bytes, high-entropy bytes]
        for ns, n, h in zip(nss, lens, hi, strict=True):
            acc = per.get(ns // bucket_ns)
            if acc is None:
                acc = per[ns // bucket_ns] = [0, 0]
            acc[0] += n
            if h:
                acc[1] += n
        for b, (sb, hb) in sorted(per.items()):
            self.det.add(b * bucket_ns, round(written * sb / sampled), sb, hb)
        cand = [i for i, h in enumerate(hi) if h]
        # refill both budgets for the time since the last batch before choosing: the
        # first batch after a quiet spell gets the tokens the spell earned (refilled
        # after the choice, a burst that fit in one batch was checked on the few tokens
        # left by the batch before it, too few to alert)
        now = time.monotonic()
        _busy[id(self)] = now
        f = share(now)  # of the process's busy sentinels' budgets (see share)
        cps = self.s.checks_per_second
        self._tokens = min(float(cps), self._tokens + (now - self._refill) * cps * f)
        self._cpu = min(CHECK_CPU_BURST, self._cpu + (now - self._refill) * CHECK_CPU * f)
        self._refill = now
        room = self._tokens
        if self._check_cost:  # and the CPU budget, less what the queued checks will take
            cost = self._check_cost
            room = min(room, (self._cpu - len(self._to_check) * cost) / cost)
        if len(cand) > room:  # over budget: an even spread (numpy.linspace's points)
            m = max(0, int(room))
            last = len(cand) - 1
            step = last / (m - 1) if m > 1 else 0.0
            cand = [cand[last if j == m - 1 and m > 1 else int(j * step)] for j in range(m)]
        self._tokens -= len(cand)
        self._to_check.extend((seqs[i], nss[i], offs[i], lens[i]) for i in cand)
        self.batches += 1
        self.batch_cpu += _cpu_time() - t0
        await self._check_sealed()

    async def _check_sealed(self) -> None:
        """Judge the chosen writes that are sealed into map files (a resolve at their
        seq - 1 then reads map files only: a live-window resolve at a past seq would
        index the whole live window, ~1 µs per write). Raise an alert if it fires."""
        todo = self._to_check
        j = 0
        while todo and todo[0][0] <= self._sealed_seq:
            seq, ns, off, n = todo.popleft()
            t = _cpu_time()
            v = self._judge(seq, off, n)
            t = _cpu_time() - t
            self._cpu -= t
            self.check_cpu += t
            self._check_cost += (t - self._check_cost) / 8 if self._check_cost else t
            if v is None:
                continue
            j += 1
            if j % 64 == 0:
                await asyncio.sleep(0)
            fire = self.det.checked(seq, ns, n, v is Verdict.SUSPECT)
            if v is Verdict.SUSPECT and self._active is not None:
                ev = self._active["evidence"]
                ev["suspect_writes_after"] = ev.get("suspect_writes_after", 0) + 1
            if fire is not None:
                await self._alert(fire)
        hour = time.time_ns() // (3600 * 10**9)
        if hour != self._hour:
            self._hour = hour
            self._save()

    def _judge(self, seq: int, off: int, n: int) -> Verdict | None:
        """Read the bytes high-entropy write *seq* overwrote and judge it (None:
        unreadable). The bytes are read as of the last seal before the write, a map
        window edge (resolving inside a window filters the whole window: ~0.7 ms, against
        the edge's flat maps); a write to the same bytes earlier in that window is
        missed, which only matters for data encrypted within seconds of being written."""
        seals = self._seals
        i = bisect_left(seals, seq)  # the window edge before the write: a cheap point
        at = seals[i - 1] if i else seq - 1
        try:
            old = self._old_bytes(at, off, min(SAMPLE, n))
        except (CdpError, MapError):
            return None
        v = overwrite_verdict(old, self.s.entropy_bits)
        self.checked_writes += 1
        if v is Verdict.SUSPECT:
            self.suspect_writes += 1
        return v

    def _old_bytes(self, seq: int, off: int, n: int) -> bytes:
        """Bytes [off, off+n) as of *seq*: one narrow map resolve + the journal
        slices. Not ``vol.read(off, n, seq)``: for a past seq that resolves and caches
        the whole 64 MiB region (made for exports that read a point many times), tens of
        ms for each distinct seq. Cost: one ``maps.resolve`` of n bytes (~30 µs)."""
        vol = self.vol
        buf = bytearray(n)
        for e in vol.maps.resolve(seq, off, off + n):
            if e.loc >= 0:
                buf[e.start - off : e.end - off] = vol.journal.read_slice(
                    e.seq, e.loc, e.poff, e.end - e.start)
        return bytes(buf)

    async def _walk_back(self, first_seq: int, first_ns: int) -> tuple[int, int]:
        """Move the first suspicious write back over the writes before it that were not
        judged (most were not sampled): the journal's records from a bucket of time
        before the burst (at most :data:`WALK_MAX` records), newest first, while they
        are suspect; it stops after :data:`WALK_STOP` non-suspect high-entropy writes.
        Cost: one journal scan of that span + one check per high-entropy write (yields)."""
        j = self.vol.journal
        start = max(j.seq_at_time(first_ns - self.det.bucket_ns), first_seq - WALK_MAX, 1)
        recs: list[tuple[int, int, int, int, bytes]] = []
        for n, r in enumerate(j.scan(start)):
            if r.seq >= first_seq:
                break
            if r.kind is RecordKind.WRITE:
                recs.append((r.seq, r.timestamp_ns, r.offset, r.length, r.payload[:SAMPLE]))
            if n % 256 == 255:
                await asyncio.sleep(0)
        quiet = 0
        for n, (seq, ns, off, length, sample) in enumerate(reversed(recs)):
            if quiet >= WALK_STOP:
                break
            if n % 64 == 63:
                await asyncio.sleep(0)
            if entropy_bits(sample) < self.s.entropy_bits:
                continue
            v = self._judge(seq, off, length)
            if v is Verdict.SUSPECT:
                first_seq, first_ns, quiet = seq, ns, 0
            elif v is Verdict.BENIGN:
                quiet += 1
        return first_seq, first_ns

    def active_alert(self) -> dict[str, Any] | None:
        """The newest active alert (None when there is none)."""
        return next((a for a in reversed(self.alerts) if a["state"] == "active"), None)

    async def _alert(self, fire: Firing) -> None:
        first_seq, first_ns = await self._walk_back(fire.first_seq, fire.first_ns)
        cur = self.active_alert()
        if cur is not None:  # raised by the file evidence: the block evidence joins it
            cur["evidence"].update(fire.evidence)
            cur["score"] = max(float(cur["score"]), fire.score)
            self._active = cur
            self._save()
            return
        a = self._raise(first_seq, first_ns, fire.score,
                        {"signal": "high-entropy writes over low-entropy data", **fire.evidence})
        log.warning(
            "volume %s: ransomware sentinel %s: %.0f%% of written bytes are encrypted "
            "over plain data (threshold %.0f%%), first suspicious write @%d at %s; clean "
            "point %s (@%d); rewind with `cdpctl rewind -V %s --to %s`",
            self.vol.name, a["id"], 100 * float(fire.evidence["suspect_share"]),
            100 * float(fire.evidence["threshold"]), first_seq,
            format_time(first_ns, sep="T", zone=True), a["clean_point"], a["clean_seq"],
            self.vol.name, a["clean_point"])

    def _raise(self, first_seq: int, first_ns: int, score: float,
               evidence: dict[str, Any]) -> dict[str, Any]:
        """Record a new active alert (clean point ``first_seq - 1``), save the state and
        start the ``on_alert`` command."""
        n = self._next_id
        self._next_id += 1
        a: dict[str, Any] = {
            "id": f"alert{n}", "volume": self.vol.name, "state": "active",
            "first_seq": first_seq, "first_time": first_ns, "detected_time": time.time_ns(),
            "clean_point": f"{CLEAN_LABEL}{n}", "clean_seq": first_seq - 1, "score": score,
            "evidence": evidence, "files": [],
        }
        self.alerts.append(a)
        self._active = a
        self.det.alerting = True
        self.alerts_total += 1
        self._save()
        if self.s.on_alert:
            asyncio.get_running_loop().create_task(self._run_hook(a))
        return a

    # ------------------------------------------------------------------ file evidence

    def use_catalog(self, files: FileCatalog) -> None:
        """Take file evidence from *files* (the volume's catalog service, handed over
        by the store): a scan after each catalogued marker, ``alerts scan`` on demand."""
        self.files = files
        files.version_hooks.append(self.on_catalog_version)

    def on_catalog_version(self, va: View | None, vb: View) -> None:
        """Catalog hook (on the loop): version *vb* committed; scan the files that
        changed since *va* in the background (nothing for a first, full index)."""
        if va is None or self._closed:
            return
        asyncio.get_running_loop().create_task(self._scan_logged(va, vb))

    def _catalog(self) -> FileCatalog:
        if self.files is None:
            raise UsageError(f"volume {self.vol.name}: the sentinel has no file catalog")
        return self.files

    async def _scan_logged(self, va: View, vb: View) -> None:
        try:
            await self.scan_files(va, vb)
        except asyncio.CancelledError:
            raise
        except Exception:  # the sentinel must never take the volume down
            log.exception("volume %s: sentinel file scan failed", self.vol.name)

    async def scan_head(self) -> dict[str, Any]:
        """On demand, between markers: the files changed from the newest catalogued
        marker to now (an overlay indexed like ``files --at``), scanned."""
        views = await self._catalog().head_views()
        if views is None:
            raise UsageError(f"volume {self.vol.name}: no catalogued marker yet (take a snapshot)")
        return await self.scan_files(*views)

    async def scan_files(self, va: View, vb: View) -> dict[str, Any]:
        """Collect the file evidence between *va* and *vb*, add its suspect files to the
        slow window, score block + file evidence, and raise or update an alert. Returns
        the evidence, the scores and the alert id (None). Cost: docs/SENTINEL.md."""
        async with self._scan_lock:
            return await self._scan_files(va, vb)

    async def _scan_files(self, va: View, vb: View) -> dict[str, Any]:
        from cdp.sentinel.files import collect, file_score, first_writes, reader_at

        vol, s = self.vol, self.s
        t0 = time.perf_counter()
        ev = await collect(va, vb, reader_at(vol, va.seq), reader_at(vol, vb.seq),
                           entropy=s.entropy_bits, notes=s.ransom_notes)
        try:
            await first_writes(vol, ev, s.entropy_bits)
        except CdpError as e:  # journal bytes gone or damaged: the interval's start
            log.warning("volume %s: sentinel: first suspicious writes not found: %s", vol.name, e)
        for x in ev.suspects:
            seq = x.first_seq or ev.from_seq + 1
            ns = x.first_ns or (vol.journal.time_of_seq(seq) if seq else 0)
            old = self.suspect_files.get(x.path)
            if old is None or seq < old[1]:
                self.suspect_files[x.path] = [ns, seq]
        cutoff = time.time_ns() - int(s.slow_window * 1e9)
        for p in [p for p, (ns, _) in self.suspect_files.items() if ns < cutoff]:
            del self.suspect_files[p]
        n = len(self.suspect_files)
        fscore = file_score(n, ev, s.min_files, s.note_dirs)
        bscore = self.det.recent_score()
        score = round(fscore + bscore, 3)
        summary = {**ev.summary(), "suspect_files_window": n, "file_score": round(fscore, 3),
                   "block_score": round(bscore, 3),
                   "scan_seconds": round(time.perf_counter() - t0, 4)}
        a = self.active_alert()
        if a is None and score >= 1.0:
            firsts = sorted((seq, ns) for ns, seq in self.suspect_files.values())
            seq0, ns0 = firsts[0] if firsts else (ev.from_seq + 1, 0)
            if not ns0:
                ns0 = vol.journal.time_of_seq(seq0)
            a = self._raise(seq0, ns0, score, {"signal": "files turned from low to high entropy",
                                               "files": summary})
            log.warning(
                "volume %s: ransomware sentinel %s: %d files encrypted (%d in the last scan), "
                "%d gained .%s, ransom notes in %d directories; first suspicious write @%d; "
                "clean point %s (@%d); rewind with `cdpctl rewind -V %s --to %s`",
                vol.name, a["id"], n, len(ev.suspects), ev.churn[1], ev.churn[0], ev.note_dirs,
                seq0, a["clean_point"], a["clean_seq"], vol.name, a["clean_point"])
        elif a is not None:
            a["evidence"]["files"] = summary
            a["score"] = max(float(a["score"]), score)
        if a is not None:
            a["files"] = await self._affected(a, vb)
            self._save()
        return {"volume": vol.name, "evidence": summary, "score": score,
                "alert": a["id"] if a else None}

    async def _affected(self, a: dict[str, Any], vb: View) -> list[dict[str, Any]]:
        """The files changed between *a*'s clean point and *vb* (the catalog diff), the
        encrypted ones flagged."""
        from cdp.sentinel.files import collect, reader_at

        vol = self.vol
        clean = int(a["clean_seq"])
        if clean >= vb.seq:
            return list(a.get("files") or [])
        vc = await self._catalog().view(f"@{clean}")
        ev = await collect(vc, vb, reader_at(vol, clean), reader_at(vol, vb.seq),
                           entropy=self.s.entropy_bits, notes=self.s.ransom_notes)
        enc = {x.path for x in ev.suspects} | {x.new_path for x in ev.suspects}
        return [{**c, "encrypted": c["path"] in enc or c.get("new_path") in enc}
                for c in ev.changes]

    async def _run_hook(self, alert: dict[str, Any]) -> None:
        try:
            p = await asyncio.create_subprocess_shell(
                self.s.on_alert, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            await p.communicate(json.dumps(alert).encode() + b"\n")
            if p.returncode:
                log.warning("sentinel on_alert command exited with %s", p.returncode)
        except OSError as e:
            log.warning("sentinel on_alert command failed: %s", e)

    # ------------------------------------------------------------------ operations

    def alert_list(self) -> list[dict[str, Any]]:
        """The alerts, oldest first (the fields of ``cdpctl alerts``)."""
        return [dict(a) for a in self.alerts]

    def dismiss(self, ident: str) -> dict[str, Any]:
        """Mark alert *ident* (``alertN`` or ``N``) a false positive: its clean point is
        released to retention and the volume's threshold is raised above its share."""
        name = ident if ident.startswith("alert") else f"alert{ident}"
        for a in self.alerts:
            if a["id"] == name:
                break
        else:
            known = ", ".join(x["id"] for x in self.alerts) or "none"
            raise NotFound(f"volume {self.vol.name}: no {name} (alerts: {known})")
        if a["state"] != "active":
            raise UsageError(f"volume {self.vol.name}: {name} is already {a['state']}")
        a["state"] = "dismissed"
        a["dismissed_time"] = time.time_ns()
        self.suspect_files.clear()  # judged benign: they no longer count
        self.det.dismissed(float(a["evidence"].get("suspect_share", 0.0)))
        self.det.alerting = any(x["state"] == "active" for x in self.alerts)
        if self._active is a:
            self._active = None
        self._save()
        return {**a, "threshold": round(self.det.threshold(), 4)}

    def status(self) -> dict[str, Any]:
        return {"threshold": round(self.det.threshold(), 4),
                "baseline": round(self.det.baseline(), 4),
                "active_alerts": sum(1 for a in self.alerts if a["state"] == "active")}
