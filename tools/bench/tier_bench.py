"""The S3 tier against plain boto3 on the test Ceph RGW, ratios in one run (issue 26).

    python -m tools.bench.tier_bench [--quick] [--no-split-cores] [--compare-split] [--rounds N]
                                     [--seconds S] [--nice0] [--control-store DIR]
                                     [--control-rgw DIR]

The rig: the test RGW is a single-node Ceph on this machine, where a real S3 store is
another machine. With ``--split-cores`` (the default with two cores or more) every row
runs with this process (cdp: its loop, upload and flush threads; and the plain boto3
peer, pinned the same) on the first half of the cores and every thread of the RGW's
daemons (ceph-mon, ceph-osd, radosgw: the pids ``tools/ceph-s3`` started) on the
others (``os.sched_setaffinity`` per thread, ``/proc/PID/task``), restored afterwards;
both arms of a row alike. The disk, the kernel's writeback and loopback TCP stay
shared. ``--no-split-cores`` gives the shared rig; ``--compare-split`` measures the
upload and ingest rows under both layouts, alternating, the other one's rows suffixed
``[shared cores]`` (or ``[split cores]``). Each row's note says which cores each side
had.

Rows (``cdp``: the tier; ``peer``: the comparison, measured in the same run):
- ``tier-upload``: MiB/s of segment bytes a :class:`TierService` batch uploads (hash one
  segment ahead, multipart 8 MiB x8, state, manifest) vs plain boto3 ``upload_file`` of
  a file of the same size (s3transfer: 8 MiB parts x10), same RGW. Goal >= 0.8. The
  note gives the tier's rate with its upload threads at cdpd's own priority too.
- ``tier-ingest-4KiB`` / ``tier-ingest-1MiB``: MiB/s of volume writes (journal + maps,
  a flush every 8 MiB) with the tier task uploading behind them vs with ``[tier]`` off.
  Goal >= 0.9. Each timed run writes for ``--seconds`` (default ``SECONDS``, 4 s: the
  tier's batches, 2 s after a seal, run during it; capped at ``INGEST_CAP`` bytes), after
  a 96 MiB backlog of sealed segments (not timed) so the tier uploads from the start.
  The arms alternate in ``--rounds`` on/off pairs (the order swapped each round); a row
  gives the medians of each arm's rates and each pair's ratio as median (min-max), the
  load during the runs, and, in its JSON, ``pair_ratios``. ``--nice0`` adds an arm
  with the upload threads at cdpd's own priority (what ``UPLOAD_NICE`` buys). Each
  arm starts once the upload threads are idle. The note gives the MiB the tier sent during
  each timed run and the seconds its uploads gave way to the busy volume
  (``yielded_seconds``, see docs/TIER.md). It says where the time went, per arm
  (medians): CPU seconds of the event-loop thread (``time.thread_time``: if the tier
  competed for the loop this would grow), of the whole process (plus the upload
  threads), wall seconds and those spent awaiting the journal (flush fdatasync,
  backpressure), CPU seconds of the test RGW's own daemons and the MiB cdp and the
  RGW's daemons wrote to storage (``/proc/PID/io``). ``--control-rgw DIR`` runs these
  rows once more, alternating, against a second test RGW whose ``tools/ceph-s3`` state
  directory is DIR (``CDP_CEPH_S3_DIR=/dev/shm/NAME CDP_CEPH_S3_OSD_BYTES=3221225472
  tools/ceph-s3 up``: its OSD on a tmpfs, capped): the OSD no longer writes the uploads
  to the disk the journal flushes to, so what the tier still costs there is cdp's own
  (CPU, loopback, its own file work), not the rig's one disk.
  ``--control-store DIR`` (e.g. ``/dev/shm/NAME``, a tmpfs; at most ``CONTROL_CAP`` per
  run) runs these rows once more, alternating, with the store there: the journal's
  flushes no longer touch the disk the OSD writes the uploads to, so what the tier
  still costs there is its own (CPU, loopback), not the rig's shared disk.
- ``tier-recover``: MiB/s of ``recover_store`` (8 MiB ranged GETs, ``GETS`` at once over
  all the objects, each part written in place and hashed in order, one fsync per
  object, install) vs plain boto3 ``download_file`` of the same objects to files
  (s3transfer: 8 MiB ranged GETs, 10 threads, no hash, no fsync). Goal >= 0.7.
- ``tier-read-4KiB``: p50 ms of 4 KiB random reads (``Volume.read_async``) of a point
  whose records live only in the bucket (segments dropped, cache cold: each read one
  NotLocal, one fetch of one ~4 KiB record, one cache file, the read again) vs p50 of
  plain boto3 ranged GETs of 4 KiB of the same segment objects. Goal ratio <= 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cdp.config import JournalSettings, ReadSettings, Settings, TierSettings
from cdp.tier.recover import GETS, recover_store
from cdp.tier.service import _UPLOADER, UPLOAD_NICE, UPLOAD_THREADS, TierService
from cdp.volume import Volume
from tools import ceph_s3
from tools.bench.s3_bench import (
    _row,
    cdp_client,
    empty_bucket,
    multipart_rate,
    percentiles_ms,
    plain_client,
    put_rate,
    rgw,
)
from tools.bench.sysdeps import fs_type

MiB = 1 << 20
SIZE = 1 << 30
#: sealed, not yet uploaded history written before each timed ingest run
BACKLOG = 96 * MiB


def _settings(tmp: Path, url: str, segment: int) -> Settings:
    return replace(Settings(), store=tmp / "store",
                   journal=replace(JournalSettings(), segment_bytes=segment),
                   tier=TierSettings(url=url))


@dataclass
class Ingest:
    """One timed ingest run: its rate, and where the time went. ``loop_cpu``: CPU
    seconds of the event-loop thread (``time.thread_time`` there: the writes' own work
    plus whatever else runs on the loop, such as the tier task's on-loop steps);
    ``cpu``: CPU seconds of the whole process (the loop plus the upload threads);
    ``waits``: seconds spent awaiting the journal (flushes: fdatasync in a thread, and
    write backpressure). ``seconds - waits - loop_cpu`` is the loop thread runnable
    but not running: waiting for a core or for the GIL."""

    rate: float
    seconds: float
    loop_cpu: float
    cpu: float
    waits: float
    #: CPU seconds of the test RGW's own daemons (mon, osd, rgw) meanwhile, None if not ours
    rgw_cpu: float | None = None
    #: bytes this process (the journal, maps) and the RGW's daemons (the OSD storing the
    #: uploads) caused to be written to the block layer meanwhile (``/proc/PID/io``
    #: ``write_bytes``), None when not readable or not ours
    wrote: int | None = None
    rgw_wrote: int | None = None


def rgw_pids(state: Path | None = None) -> list[int]:
    """Pids of the test RGW's daemons (mon, osd, rgw) that ``tools/ceph-s3`` started in
    *state* (default: this checkout's state directory; its pid files, start times
    checked); [] when none run."""
    cl = ceph_s3.Cluster(ceph_s3.state_dir() if state is None else state)
    return [p for d in ceph_s3.DAEMONS if (p := cl.pid(d)) is not None]


def _written(pids: list[int]) -> int | None:
    """Bytes the processes *pids* caused to be written to storage so far (``write_bytes``
    of ``/proc/PID/io``: page cache writeback and direct I/O), None if one is unreadable."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("write_bytes:"))
        except (OSError, StopIteration, ValueError):
            return None
    return total


def _rgw_cpu(pids: list[int] | None = None) -> float | None:
    """CPU seconds used so far by the daemons *pids* (default: those of ``tools/ceph-s3``'s
    state directory), None when there are none: on this machine they share the cores
    with cdp (unless split), where a real S3 store would not."""
    if pids is None:
        pids = rgw_pids()
    ticks = 0
    for pid in pids:
        f = ceph_s3._stat_fields(pid)
        if f is not None:
            ticks += int(f[11]) + int(f[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK") if pids else None


# -- the rig: "the object store is another machine" -----------------------------------------


@dataclass(frozen=True)
class Split:
    """Cores of the bench process (cdp: its loop, upload and flush threads; the plain
    boto3 peer too) and of the test RGW's daemons during a row: disjoint, so neither
    side runs on the other's cores, as with a store on another machine. (The disk, the
    kernel's writeback and loopback TCP stay shared.)"""

    cdp: tuple[int, ...]
    rgw: tuple[int, ...]

    def note(self) -> str:
        return f"cores split: cdp {_cpus(self.cdp)}, RGW daemons {_cpus(self.rgw)}"


def _cpus(cores: tuple[int, ...]) -> str:
    return "{" + ",".join(map(str, cores)) + "}"


def split_cores(cores: set[int] | None = None) -> Split | None:
    """The first half of the cores this process may use (rounded up) for cdp, the rest
    for the RGW; None with fewer than two."""
    have = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if len(have) < 2:
        return None
    half = (len(have) + 1) // 2
    return Split(tuple(have[:half]), tuple(have[half:]))


def _tasks(pid: int) -> list[int]:
    """Thread ids of ``pid`` (``/proc/PID/task``); [] when it is gone."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return []


@contextmanager
def pinned(split: Split | None, daemons: list[int]) -> Iterator[str]:
    """Within the block, every thread of this process on ``split.cdp`` and every thread
    of the ``daemons`` on ``split.rgw`` (threads started meanwhile inherit it); each
    thread's former affinity restored afterwards (threads started meanwhile get their
    process's). Yields the note that says which cores each side had. ``split`` None:
    nothing pinned (today's rig: both sides share every core)."""
    if split is None:
        yield "cores shared (not split)"
        return
    me = os.getpid()
    sides = [(me, set(split.cdp))] + [(pid, set(split.rgw)) for pid in daemons]
    base: dict[int, set[int]] = {}
    for pid, _ in sides:
        with suppress(ProcessLookupError):
            base[pid] = os.sched_getaffinity(pid)
    sides = [(pid, cpus) for pid, cpus in sides if pid in base]
    saved: dict[int, set[int]] = {}
    try:
        for pid, cpus in sides:
            for tid in _tasks(pid):
                try:
                    saved[tid] = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, cpus)
                except ProcessLookupError:  # the thread ended meanwhile
                    pass
        yield split.note() if daemons else f"{split.note()} (no RGW daemons of ours found: not pinned)"
    finally:
        for pid, _ in sides:
            for tid in _tasks(pid):
                with suppress(ProcessLookupError):
                    os.sched_setaffinity(tid, saved.get(tid, base[pid]))


async def _ingest(vol: Volume, total: int, size: int, seed: int, seconds: float | None = None,
                  daemons: list[int] | None = None) -> Ingest:
    """``total`` bytes of ``size`` writes (half random, half zeros per write); with
    ``seconds``, stops at the first flush (every 8 MiB) once that long has passed, or
    at ``total`` bytes, whichever comes first. ``daemons``: the RGW's pids whose CPU
    and writes the run reports (default: this checkout's ``tools/ceph-s3``)."""
    rng = random.Random(seed)
    blobs = [rng.randbytes(size // 2) + bytes(size - size // 2) for _ in range(8)]
    if daemons is None:
        daemons = rgw_pids()
    t0 = time.perf_counter()
    c0, p0, r0 = time.thread_time(), time.process_time(), _rgw_cpu(daemons)
    io0, rio0 = _written([os.getpid()]), (_written(daemons) if daemons else None)
    done = since = 0
    waits = 0.0
    i = 0
    clock = time.perf_counter
    end = t0 + seconds if seconds is not None else None
    while done < total:
        off = rng.randrange(0, SIZE // size) * size
        r = vol.write(off, blobs[i % 8])
        if r is not None:
            w0 = clock()
            await r
            waits += clock() - w0
        i += 1
        done += size
        since += size
        if since >= 8 * MiB:
            w0 = clock()
            await vol.flush()
            waits += clock() - w0
            since = 0
            await asyncio.sleep(0)
            if end is not None and clock() >= end:
                break
    w0 = clock()
    await vol.flush()
    waits += clock() - w0
    dt = time.perf_counter() - t0
    r1 = _rgw_cpu(daemons)
    io1, rio1 = _written([os.getpid()]), (_written(daemons) if daemons else None)
    return Ingest(done / MiB / dt, dt, time.thread_time() - c0, time.process_time() - p0, waits,
                  None if r0 is None or r1 is None else r1 - r0,
                  None if io0 is None or io1 is None else io1 - io0,
                  None if rio0 is None or rio1 is None else rio1 - rio0)


async def _tiered_reads(tmp: Path, url: str, s3: Any,
                        n: int) -> tuple[list[float], list[float], list[float], list[str]]:
    """Seconds of ``n`` 4 KiB random reads of a point whose records only the bucket holds
    (a 32 MiB region of 4 KiB writes, then 16 MiB elsewhere so its segments seal, go up
    and are dropped): uncached (each read fetches), then the same offsets again (served
    from the tier's local cache); the same offsets read from the same point while its
    segments were still local (before the upload), as the local point they are compared
    with; and the keys of the segment objects."""
    # no in-memory payload cache: each phase's reads come from where the records are
    # (local segments, the bucket, the tier's local cache), not from an earlier phase's
    s = replace(_settings(tmp, url, 8 * MiB), read=ReadSettings(payload_cache_bytes=0))
    vol = Volume.create(tmp / "store" / "volumes" / "vol0", "vol0", SIZE, s)
    svc = TierService(vol, s.tier, s3=s3, autostart=False)
    vol.attach(svc)
    rng = random.Random(3)
    region = 32 * MiB
    for off in range(0, region, 4096):
        r = vol.write(off, rng.randbytes(2048) + bytes(2048))
        if r is not None:
            await r
    m = await vol.snapshot("m")
    for off in range(region, region + 16 * MiB, MiB):
        r = vol.write(off, os.urandom(MiB))
        if r is not None:
            await r
    await vol.flush()
    vol.journal.sync()
    offs = [rng.randrange(region // 4096) * 4096 for _ in range(n)]

    async def timed() -> tuple[list[float], list[bytes]]:
        lat, data = [], []
        for off in offs:
            t0 = time.perf_counter()
            got = await vol.read_async(off, 4096, m.seq)
            lat.append(time.perf_counter() - t0)
            data.append(got)
        return lat, data

    local, want = await timed()
    await svc.upload_now()
    await svc.drop_uploaded_async()
    assert svc.manifest is not None and vol.journal.dropped_segments()
    uncached, got = await timed()
    cached, again = await timed()
    assert got == want and again == want, "a tiered read differs from the local one"
    keys = [o.key for o in svc.manifest.segments]
    vol.close()
    return uncached, cached, local, keys


ROWS = ("upload", "read", "ingest", "recover")
#: timed ingest on/off pairs per row (alternating, the order swapped each round)
ROUNDS = 3


@dataclass(frozen=True)
class Rig:
    """How rows run: ``splits`` the core layouts measured (the first is the main one;
    a second, with ``--compare-split``, adds rows suffixed by :func:`_suffix`), and the
    pids of the RGW daemons to pin."""

    splits: tuple[Split | None, ...]
    daemons: tuple[int, ...]
    #: where the test RGW's OSD keeps its data, for the notes ("" when not ours)
    osd: str = ""

    def pinned(self, split: Split | None) -> AbstractContextManager[str]:
        return pinned(split, list(self.daemons))

    def suffix(self, split: Split | None) -> str:
        """"" for the main layout, else which one this row had."""
        if split == self.splits[0]:
            return ""
        return " [split cores]" if split is not None else " [shared cores]"


#: ingest arms: [tier] off; on (the upload threads niced, as cdpd runs them); on with the
#: upload threads at cdpd's own priority (what ``UPLOAD_NICE`` buys: ``--nice0``)
ARMS = ("off", "on", "on-nice0")


def _upload_threads_nice(niced: bool) -> None:
    """Set the nice of the tier's upload threads (``cdp-tier-up*``, made first if need
    be): this process's own + ``UPLOAD_NICE`` (as cdpd runs them), or its own. The part
    threads of a multipart upload inherit it from the upload thread that starts them.
    Returns once every upload thread is idle: an upload a stopped tier (the run before)
    left in flight finishes first, so it does not run into the next arm's timed run."""
    ready = threading.Barrier(UPLOAD_THREADS + 1)
    for _ in range(UPLOAD_THREADS):  # every upload thread exists once all wait at once
        _UPLOADER.submit(ready.wait, 120.0)
    try:
        ready.wait(120.0)
    except threading.BrokenBarrierError:
        print("tier_bench: an upload thread stayed busy for 120 s", file=sys.stderr)
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    for t in threading.enumerate():
        if t.name.startswith("cdp-tier-up") and t.native_id is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, t.native_id,
                               min(19, base + UPLOAD_NICE) if niced else base)
            except PermissionError:  # lowering nice needs CAP_SYS_NICE
                if not _unniced_failed:
                    print("tier_bench: cannot lower the upload threads' nice (needs "
                          "CAP_SYS_NICE): the on-nice0 figures are not measured", file=sys.stderr)
                _unniced_failed.append(True)


#: set when the upload threads could not be put back to this process's own priority
_unniced_failed: list[bool] = []


def _nice0_note(rate: float, ref: float) -> str:
    """The rate of an arm with the upload threads at cdpd's own priority, for a note."""
    if _unniced_failed:
        return "not measured: lowering nice needs CAP_SYS_NICE"
    return f"{rate:.1f} MiB/s, ratio {rate / ref:.3f}"


def _upload_rows(rig: Rig, tmp: Path, url: str, s3: Any, c: Any, bucket: str,
                 up_total: int) -> tuple[list[dict[str, Any]], str, list[str], int]:
    """The ``tier-upload`` row per layout; and the URL, keys and size of one upload (what
    the recovery row reads back)."""

    # one batch of incompressible 64 MiB segments, alternating with plain boto3 uploading
    # a file of the same size (both after os.sync(), so neither competes with the
    # writeback of what was just written), each layout in turn per round
    async def upload(d: Path, vol_url: str, split: Split | None) -> tuple[float, int, list[str]]:
        s = _settings(d, vol_url, 64 * MiB)
        vol = Volume.create(d / "store" / "volumes" / "vol0", "vol0", SIZE, s)
        svc = TierService(vol, s.tier, s3=s3, autostart=False)
        vol.attach(svc)
        for i in range(up_total // MiB + 64):  # + one segment to roll the last
            r = vol.write((i * MiB) % SIZE, os.urandom(MiB))
            if r is not None:
                await r
        await vol.flush()
        vol.journal.sync()
        await asyncio.to_thread(os.sync)
        with rig.pinned(split):
            t0 = time.perf_counter()
            await svc.upload_now()
            dt = time.perf_counter() - t0
        assert svc.manifest is not None
        nbytes = sum(o.size for o in svc.manifest.segments)
        keys = [o.key for o in svc.manifest.segments]
        vol.close()
        return nbytes / MiB / dt, nbytes, keys

    ups: dict[tuple[Split | None, bool], list[float]] = {
        (sp, niced): [] for sp in rig.splits for niced in (True, False)}
    peers: dict[Split | None, list[float]] = {sp: [] for sp in rig.splits}
    notes: dict[Split | None, str] = {}
    rec_url, nbytes = "", 0
    keys: list[str] = []
    with tempfile.NamedTemporaryFile(prefix="cdp-tier-bench-", dir=tmp) as f:
        f.write(os.urandom(64 * MiB))
        f.flush()
        for rnd in range(2):
            for j, split in enumerate(rig.splits):
                for niced in (True, False):  # as cdpd runs them, and at its own priority
                    name = f"up{rnd}-{j}-{int(niced)}"
                    _upload_threads_nice(niced)
                    try:
                        mine, nbytes, keys = asyncio.run(upload(tmp / name, f"{url}-{name}", split))
                    finally:
                        _upload_threads_nice(True)
                    rec_url = f"{url}-{name}"
                    shutil.rmtree(tmp / name, ignore_errors=True)
                    ups[(split, niced)].append(mine)
                os.sync()
                with rig.pinned(split) as notes[split]:
                    peers[split].append(multipart_rate(c, bucket, Path(f.name),
                                                       max(1, nbytes // (64 * MiB))))
    rows = []
    for sp in rig.splits:
        peer = statistics.mean(peers[sp])
        nice0 = statistics.mean(ups[(sp, False)])
        rows.append(_row(
            f"tier-upload{rig.suffix(sp)}", statistics.mean(ups[(sp, True)]), peer, "MiB/s",
            f"{nbytes // MiB} MiB of 64 MiB segments, 2 alternating rounds; cdp: TierService "
            "batch (sha256 one segment ahead + multipart 8 MiB x8 + state + manifest), upload "
            f"threads at nice +{UPLOAD_NICE} as in cdpd (at cdpd's own priority: "
            f"{_nice0_note(nice0, peer)}); peer: upload_file; {notes[sp]}; "
            f"load {os.getloadavg()[0]:.1f}"))
    return rows, rec_url, keys, nbytes


@dataclass(frozen=True)
class Layout:
    """Where one set of ingest rows runs: the cores (``split``), the directory the
    volume's store lives under (``base``), and the suffix of its rows' names."""

    split: Split | None
    base: Path
    suffix: str
    note: str = ""


#: the most bytes one ingest run may put in the control store directory (``--control-store``)
CONTROL_CAP = 1 << 30


def control_layout(rig: Rig, d: Path, need: int) -> Layout:
    """The control layout: the main cores, the store under *d* (made; a tmpfs such as
    /dev/shm takes the journal's disk writes, and the OSD's contention for them, out of
    the rows). UsageError-free: SystemExit when *d* cannot take *need* bytes per run
    within :data:`CONTROL_CAP`."""
    d.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(d).free
    if need > CONTROL_CAP or need + 64 * MiB > free:
        raise SystemExit(f"tier_bench: --control-store {d}: a run needs {need // MiB} MiB "
                         f"(cap {CONTROL_CAP // MiB} MiB, {free // MiB} MiB free)")
    kind = fs_type(d)
    return Layout(rig.splits[0], Path(tempfile.mkdtemp(prefix="cdp-tier-bench-", dir=d)),
                  f" [store on {kind}]", f"control: the store on {kind} ({d})")


@dataclass(frozen=True)
class Target:
    """An S3 store the ingest rows upload to: the main test RGW, or a control one (e.g.
    its OSD on a tmpfs). ``daemons``: its pids (pinned with the RGW's cores, their CPU
    and writes reported); ``suffix`` names its rows; ``osd`` says where its OSD lives."""

    s3: Any
    url: str
    daemons: tuple[int, ...]
    suffix: str = ""
    osd: str = ""


@dataclass(frozen=True)
class Cell:
    """One set of ingest rows: a layout (cores, where the store lives) and a target."""

    lay: Layout
    target: Target

    @property
    def suffix(self) -> str:
        return self.lay.suffix + self.target.suffix


def control_target(d: Path) -> tuple[Target, Any, str]:
    """The control RGW whose ``tools/ceph-s3`` state directory is *d* (started by the
    user: ``CDP_CEPH_S3_DIR=D CDP_CEPH_S3_OSD_BYTES=BYTES tools/ceph-s3 up``); its
    target, a plain client and a fresh bucket (the caller deletes it). SystemExit when
    it does not answer."""
    info = ceph_s3.load_info(d)
    if info is None or not ceph_s3.rgw_answers(str(info["endpoint"])):
        raise SystemExit(f"tier_bench: --control-rgw {d}: no RGW answering there "
                         f"(CDP_CEPH_S3_DIR={d} tools/ceph-s3 up)")
    t = {k: str(info[k]) for k in ("endpoint", "access_key", "secret_key")}
    c = plain_client(t)
    bucket = f"cdp-tier-bench-{uuid.uuid4().hex[:8]}"
    c.create_bucket(Bucket=bucket)
    put_rate(c, bucket, 4 * MiB, 8)  # warm-up
    kind = fs_type(d)
    return (Target(cdp_client(t), f"s3://{bucket}/b", tuple(rgw_pids(d)), f" [OSD on {kind}]",
                   f"; control RGW: its OSD on {kind} ({d})"), c, bucket)


#: seconds each timed ingest run writes for (``--seconds``): long enough that the tier's
#: batches (a GATHER of 2 s after a seal) run during it and one flush's hiccup is noise
SECONDS = 4.0
#: the most bytes one timed ingest run writes (its store is deleted after it)
INGEST_CAP = 3 << 30


def _ingest_rows(rig: Rig, tmp: Path, main: Target, rounds: int, seconds: float,
                 arms: tuple[str, ...], control: Path | None = None,
                 control_rgw: Target | None = None) -> list[dict[str, Any]]:
    """``tier-ingest-4KiB`` / ``-1MiB`` per cell: ``rounds`` pairs of timed runs of
    ``seconds`` each (arms off/on, alternating, the order swapped each round; cells in
    turn within a round), the medians and each pair's ratio. With ``control``, a layout
    more: the main cores, the store under that directory (rows suffixed by its file
    system type, e.g. ``[store on tmpfs]``); with ``control_rgw``, the main layout
    against that RGW too (``[OSD on tmpfs]``)."""
    layouts = [Layout(sp, tmp, rig.suffix(sp)) for sp in rig.splits]
    cells = [Cell(lay, main) for lay in layouts]
    if control is not None:
        cells.append(Cell(control_layout(rig, control, BACKLOG + CONTROL_CAP // 2), main))
    if control_rgw is not None:
        cells.append(Cell(layouts[0], control_rgw))
    rows = []
    try:
        for size, name in ((4096, "4KiB"), (MiB, "1MiB")):
            rows += _ingest_size(rig, cells, size, name, rounds, seconds, arms)
    finally:
        for cell in cells:
            if cell.lay.base != tmp:
                shutil.rmtree(cell.lay.base, ignore_errors=True)
    return rows


def _range(xs: list[float], fmt: str = ".2f") -> str:
    """``median (min-max)`` of *xs*."""
    return (f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"
            if xs else "-")


def _ingest_size(rig: Rig, cells: list[Cell], size: int, name: str, rounds: int,
                 seconds: float, arms: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of one write size, one per cell."""
    rows = []
    runs: dict[tuple[int, str], list[Ingest]] = {(j, a): [] for j in range(len(cells)) for a in arms}
    sent: dict[int, list[int]] = {j: [] for j in range(len(cells))}
    #: seconds the uploads gave way to ingest per run (``yielded_seconds``; 0 before it)
    yielded: dict[int, list[float]] = {j: [] for j in range(len(cells))}
    notes: dict[int, str] = {}
    loads: list[float] = []
    for rnd in range(rounds):
        for j, cell in enumerate(cells):
            lay, tg = cell.lay, cell.target
            cap = CONTROL_CAP // 2 if lay.base != rig_base(cells) else INGEST_CAP
            for a in (arms if rnd % 2 == 0 else tuple(reversed(arms))):
                d = lay.base / f"in-{name}-{rnd}-{j}-{a}"
                on = a != "off"

                async def ingest(d: Path = d, on: bool = on, rnd: int = rnd, tg: Target = tg,
                                 cap: int = cap, sent: list[int] = sent[j],
                                 yielded: list[float] = yielded[j]) -> Ingest:
                    # a backlog of sealed segments first (not timed), so the tier
                    # uploads from the start of the timed run
                    s = _settings(d, f"{tg.url}-ingest-{d.name}", 8 * MiB)
                    vol = Volume.create(d / "store" / "volumes" / "vol0", "vol0", SIZE, s)
                    for i in range(BACKLOG // MiB):
                        r = vol.write(SIZE - (i + 1) * MiB, os.urandom(MiB))
                        if r is not None:
                            await r
                    await vol.flush()
                    vol.journal.sync()
                    svc = None
                    if on:
                        svc = TierService(vol, s.tier, s3=tg.s3, autostart=False)
                        vol.attach(svc)
                        svc.start()
                    got = await _ingest(vol, cap, size, rnd, seconds, list(tg.daemons))
                    if svc is not None:
                        sent.append(svc.sent_bytes)
                        yielded.append(svc.status().get("yielded_seconds", 0.0))
                    vol.close()
                    return got

                os.sync()
                _upload_threads_nice(a != "on-nice0")
                try:
                    with pinned(lay.split, list(tg.daemons)) as notes[j]:
                        runs[(j, a)].append(asyncio.run(ingest()))
                finally:
                    _upload_threads_nice(True)
                loads.append(os.getloadavg()[0])
                shutil.rmtree(d, ignore_errors=True)

    for j, cell in enumerate(cells):
        arm = {a: runs[(j, a)] for a in arms}

        def med(a: str, what: str, arm: dict[str, list[Ingest]] = arm) -> float:
            return float(statistics.median(getattr(r, what) for r in arm[a]))

        def rgw_cpu(a: str, arm: dict[str, list[Ingest]] = arm) -> str:
            got = [r.rgw_cpu for r in arm[a] if r.rgw_cpu is not None]
            return f"{statistics.median(got):.2f}" if got else "?"

        def mib(what: str, arm: dict[str, list[Ingest]] = arm) -> str:
            def one(a: str) -> str:
                got = [v for r in arm[a] if (v := getattr(r, what)) is not None]
                return f"{statistics.median(got) / MiB:.0f}" if got else "?"
            return "/".join(one(a) for a in arms)

        def trio(what: str, med: Any = med) -> str:
            return "/".join(f"{med(a, what):.2f}" for a in arms)

        pairs = [on.rate / off.rate for on, off in zip(arm["on"], arm["off"], strict=True)]
        sn = sent[j]
        nice0 = (f" Upload threads at cdpd's own priority instead of nice +{UPLOAD_NICE}: "
                 f"{_nice0_note(med('on-nice0', 'rate'), med('off', 'rate'))}."
                 if "on-nice0" in arms else "")
        row = _row(
            f"tier-ingest-{name}{cell.suffix}", med("on", "rate"), med("off", "rate"), "MiB/s",
            f"{name} writes for {seconds:g} s per run (MiB written per run: off "
            f"{_range([r.rate * r.seconds for r in arm['off']], '.0f')}, on "
            f"{_range([r.rate * r.seconds for r in arm['on']], '.0f')}), volume level, "
            f"{rounds} alternating on/off pairs (order swapped each round); pair ratios on/off "
            f"{_range(pairs, '.3f')}; MiB/s off {_range([r.rate for r in arm['off']], '.0f')}, "
            f"on {_range([r.rate for r in arm['on']], '.0f')}; a {BACKLOG // MiB} MiB backlog "
            f"first, the tier sent {min(sn) // MiB}-{max(sn) // MiB} MiB during each timed run "
            f"(uploads gave way {min(yielded[j]):.2f}-{max(yielded[j]):.2f} s); peer: [tier] "
            f"off; {notes[j]}{'; ' + cell.lay.note if cell.lay.note else ''}"
            f"{cell.target.osd or rig.osd}.{nice0} "
            f"{'/'.join(arms)}: loop thread CPU s {trio('loop_cpu')}, process CPU s "
            f"{trio('cpu')}, wall s {trio('seconds')}, of which awaiting the journal "
            f"{trio('waits')}, RGW daemons' CPU s "
            f"{'/'.join(rgw_cpu(a) for a in arms)}, MiB written to storage by cdp "
            f"{mib('wrote')} and by the RGW's daemons {mib('rgw_wrote')}; load during the "
            f"runs {_range(loads, '.1f')}")
        row.update(pair_ratios=[round(x, 3) for x in pairs],
                   ratio_min=round(min(pairs), 3), ratio_max=round(max(pairs), 3),
                   ratio_median_of_pairs=round(statistics.median(pairs), 3),
                   sent_mib=[x // MiB for x in sn], yielded_s=yielded[j],
                   load=[round(x, 2) for x in loads])
        rows.append(row)
    return rows


def rig_base(cells: list[Cell]) -> Path:
    """The directory the main layout's stores live under."""
    return cells[0].lay.base


#: timed runs of each side of the recovery row (alternating, medians)
RECOVER_ROUNDS = 3


def _recover_row(rig: Rig, split: Split | None, tmp: Path, s3: Any, c: Any, bucket: str,
                 url: str, keys: list[str], nbytes: int) -> dict[str, Any]:
    """``tier-recover``: :func:`recover_store` of the upload row's bucket prefix vs plain
    boto3 ``download_file`` of its segment objects, :data:`RECOVER_ROUNDS` runs each,
    alternating (who goes first swaps each round; ``os.sync()`` before each, so neither
    pays the other's writeback), medians."""
    mine: list[float] = []
    peer: list[float] = []
    got = 0
    notes: list[str] = []
    for rnd in range(RECOVER_ROUNDS):
        for side in (("cdp", "plain") if rnd % 2 == 0 else ("plain", "cdp")):
            d = tmp / f"rec-{side}-{rnd}"
            os.sync()
            with rig.pinned(split) as note:
                notes.append(note)
                t0 = time.perf_counter()
                if side == "cdp":
                    got = recover_store(s3, url, d).bytes
                    mine.append(got / MiB / (time.perf_counter() - t0))
                else:
                    d.mkdir()
                    for i, k in enumerate(keys):  # what "download the bucket" is with plain boto3
                        c.download_file(bucket, k, str(d / str(i)))
                    peer.append(nbytes / MiB / (time.perf_counter() - t0))
            shutil.rmtree(d, ignore_errors=True)
    return _row("tier-recover", statistics.median(mine), statistics.median(peer), "MiB/s",
                f"{got // MiB} MiB, {RECOVER_ROUNDS} alternating rounds, medians (cdp "
                f"{'/'.join(f'{x:.0f}' for x in mine)}, peer {'/'.join(f'{x:.0f}' for x in peer)}); "
                f"cdp: recover_store ({GETS} 8 MiB ranged GETs at once over all objects, each "
                "part written in place and hashed in order, one fsync per object, install); "
                "peer: boto3 download_file of each segment (s3transfer: 8 MiB ranged GETs, 10 "
                f"threads, no hash, no fsync); {notes[-1]}{rig.osd}")


def run(quick: bool = False, only: tuple[str, ...] = ROWS, split: bool | None = None,
        compare: bool = False, rounds: int = ROUNDS,
        control: Path | None = None, seconds: float = SECONDS, nice0: bool = False,
        control_rgw: Path | None = None) -> list[dict[str, Any]]:
    """The rows named in ``only`` (``recover`` needs ``upload``). ``split``: pin this
    process and the RGW's daemons to disjoint cores (:class:`Split`; None: when the
    machine has two or more); ``compare``: measure the upload and ingest rows under the
    other layout too (extra rows, alternating with the main ones); ``control``: the ingest
    rows once more with the store under that directory (e.g. a tmpfs: ``/dev/shm/x``),
    alternating, to tell the journal disk's share from the tier's; ``control_rgw``: the
    ingest rows once more against the RGW of that ``tools/ceph-s3`` state directory (its
    OSD on a tmpfs: the OSD's writes off the journal's disk), alternating. ``seconds``:
    each timed ingest run's length; ``nice0``: a third ingest arm, the upload threads at
    cdpd's own priority."""
    up_total = (64 if quick else 256) * MiB
    if quick:
        seconds = min(seconds, 1.0)
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="cdp-tier-bench-"))
    with rgw() as target:
        os.environ["AWS_ACCESS_KEY_ID"] = target["access_key"]
        os.environ["AWS_SECRET_ACCESS_KEY"] = target["secret_key"]
        info = ceph_s3.load_info()
        ours = info is not None and str(info["endpoint"]) == target["endpoint"]
        daemons = tuple(rgw_pids()) if ours else ()
        main_split = split_cores() if split is not False else None
        if main_split is not None and not daemons:
            print("tier_bench: the RGW at this endpoint was not started by this checkout's "
                  "tools/ceph-s3: its daemons cannot be pinned, cores not split", file=sys.stderr)
            main_split = None
        other = None if main_split is not None else (split_cores() if daemons else None)
        splits = (main_split, other) if compare and other != main_split else (main_split,)
        osd = f"; the RGW's OSD on {fs_type(ceph_s3.state_dir())}" if ours else ""
        rig = Rig(splits, daemons, osd)
        c = plain_client(target)
        s3 = cdp_client(target)
        bucket = f"cdp-tier-bench-{uuid.uuid4().hex[:8]}"
        c.create_bucket(Bucket=bucket)
        try:
            put_rate(c, bucket, 4 * MiB, 8)  # warm-up
            url = f"s3://{bucket}/b"

            if "upload" in only:
                got, rec_url, keys, nbytes = _upload_rows(rig, tmp, url, s3, c, bucket, up_total)
                rows += got

            if "read" in only:
                # -- 4 KiB random reads of a tiered, uncached point vs plain ranged GETs
                n = 100 if quick else 400
                with rig.pinned(main_split) as note:
                    lat, cached, local, rkeys = asyncio.run(
                        _tiered_reads(tmp / "rd", f"{url}-reads", s3, n))
                    sizes = {k: c.head_object(Bucket=bucket, Key=k)["ContentLength"] for k in rkeys}
                    rng = random.Random(5)
                    plain = []
                    for _ in range(n):
                        k = rng.choice(rkeys)
                        off = rng.randrange(max(1, sizes[k] // 4096 - 1)) * 4096
                        t0 = time.perf_counter()
                        c.get_object(Bucket=bucket, Key=k, Range=f"bytes={off}-{off + 4095}")["Body"].read()
                        plain.append(time.perf_counter() - t0)
                mine_ms, peer_ms = percentiles_ms(lat), percentiles_ms(plain)
                rows.append(_row("tier-read-4KiB", mine_ms["p50"], peer_ms["p50"], "ms p50",
                                 f"{n} reads; cdp p95 {mine_ms['p95']:.2f} ms, peer p95 "
                                 f"{peer_ms['p95']:.2f} ms; cdp: read_async of a dropped, uncached "
                                 f"point (fetch + cache + read); peer: get_object Range 4 KiB; {note}. "
                                 "Goal: ratio <= 2"))
                cached_ms, local_ms = percentiles_ms(cached), percentiles_ms(local)
                # a rate row (higher is better): reads per second at the p50 latency
                rows.append(_row("tier-read-4KiB-cached", 1000 / cached_ms["p50"],
                                 1000 / local_ms["p50"], "reads/s at p50",
                                 f"the same {n} offsets read again once cached (p50 "
                                 f"{cached_ms['p50']:.3f} ms, p95 {cached_ms['p95']:.3f} ms) "
                                 f"vs read from the same point while its segments were local, "
                                 f"before the upload (p50 {local_ms['p50']:.3f} ms, p95 "
                                 f"{local_ms['p95']:.3f} ms); every read's bytes equal the "
                                 f"local read's; {note}. Goal: ratio >= 0.7"))
                rows[-1]["peer_name"] = "the same point, local"

            if "ingest" in only:
                ctl = None
                if control_rgw is not None:
                    ctl, cc, cbucket = control_target(control_rgw)
                try:
                    rows += _ingest_rows(rig, tmp, Target(s3, url, daemons), rounds, seconds,
                                         ("off", "on", "on-nice0") if nice0 else ("off", "on"),
                                         control, ctl)
                finally:
                    if ctl is not None:
                        empty_bucket(cc, cbucket)

            if "recover" in only and "upload" in only:
                rows.append(_recover_row(rig, main_split, tmp, s3, c, bucket, rec_url, keys, nbytes))
        finally:
            empty_bucket(c, bucket)
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(ROWS), help=f"rows to run (of {','.join(ROWS)})")
    ap.add_argument("--split-cores", action=argparse.BooleanOptionalAction, default=None,
                    help="pin this process and the RGW's daemons to disjoint cores "
                         "(default: on with two cores or more)")
    ap.add_argument("--compare-split", action="store_true",
                    help="also measure the upload and ingest rows under the other layout "
                         "(split / shared), alternating with the main one")
    ap.add_argument("--rounds", type=int, default=ROUNDS,
                    help="timed ingest on/off pairs per row (the order swapped each round)")
    ap.add_argument("--seconds", type=float, default=SECONDS,
                    help=f"length of each timed ingest run (default {SECONDS:g})")
    ap.add_argument("--nice0", action="store_true",
                    help="a third ingest arm: the upload threads at cdpd's own priority")
    ap.add_argument("--control-rgw", type=Path, metavar="DIR",
                    help="the ingest rows once more against the RGW of this tools/ceph-s3 "
                         "state directory (CDP_CEPH_S3_DIR=DIR tools/ceph-s3 up; its OSD on a "
                         "tmpfs such as /dev/shm/NAME, capped by CDP_CEPH_S3_OSD_BYTES), "
                         "alternating")
    ap.add_argument("--control-store", type=Path, metavar="DIR",
                    help="the ingest rows once more with the store under DIR (e.g. a tmpfs such "
                         f"as /dev/shm/NAME; at most {CONTROL_CAP >> 20} MiB per run), alternating")
    a = ap.parse_args(argv)
    for r in run(a.quick, tuple(a.only.split(",")), a.split_cores, a.compare_split, a.rounds,
                 a.control_store, a.seconds, a.nice0, a.control_rgw):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
