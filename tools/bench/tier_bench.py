"""The S3 tier against plain boto3 on the test Ceph RGW, ratios in one run (issue 26).

    python -m tools.bench.tier_bench [--quick]

Rows (``cdp``: the tier; ``peer``: the comparison, measured in the same run):
- ``tier-upload``: MiB/s of segment bytes a :class:`TierService` batch uploads (hash,
  HEAD, multipart 8 MiB x8, manifest) vs plain boto3 ``upload_file`` of a file of the
  same size (s3transfer: 8 MiB parts x10), same RGW. Goal >= 0.8.
- ``tier-ingest-4KiB`` / ``tier-ingest-1MiB``: MiB/s of volume writes (journal + maps,
  a flush every 8 MiB) with the tier task uploading behind them vs with ``[tier]`` off.
  Goal >= 0.9. The note says where the time went, on/off (medians): CPU seconds of the
  event-loop thread (``time.thread_time``: if the tier competed for the loop this
  would grow), of the whole process (plus the upload threads), wall seconds and those
  spent awaiting the journal (flush fdatasync, backpressure), and CPU seconds of the
  test RGW's own daemons, which on this machine share the cores and the disk with cdp
  (a real S3 store would not). Measured 2026-12-07, 2 cores at load 5-9: the loop's
  CPU is the same on and off (0.31-0.35 s per 128 MiB of 4 KiB writes), the upload
  threads add ~0.17 s of process CPU (py-spy ``--gil``: ~0.18 s holding the GIL per
  run), the RGW daemons 0.27-0.66 s, and the journal's flushes wait 0.23 -> 0.51 s
  (the OSD writes the uploads to the same disk): the tier competes for cores and disk,
  not for the loop.
- ``tier-recover``: MiB/s of ``recover_store`` (ranged 8 MiB GETs + sha256 + install)
  vs plain boto3 ``download_file`` of the same objects to files. Goal >= 0.7.
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
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cdp.config import JournalSettings, Settings, TierSettings
from cdp.tier.recover import recover_store
from cdp.tier.service import TierService
from cdp.volume import Volume
from tools import ceph_s3
from tools.bench.s3_bench import (
    _row,
    cdp_client,
    multipart_rate,
    percentiles_ms,
    plain_client,
    put_rate,
    rgw,
)

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


def _rgw_cpu() -> float | None:
    """CPU seconds used so far by the daemons of ``tools/ceph-s3``'s state directory
    (their pid files), None when there are none: on this machine they share the cores
    with cdp, where a real S3 store would not."""
    run_dir = ceph_s3.state_dir() / "run"
    ticks = 0
    pids = sorted(run_dir.glob("*.pid")) if run_dir.is_dir() else []
    for p in pids:
        try:
            f = ceph_s3._stat_fields(int(p.read_text().split()[0]))
        except (ValueError, IndexError, OSError):
            f = None
        if f is not None:
            ticks += int(f[11]) + int(f[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK") if pids else None


async def _ingest(vol: Volume, total: int, size: int, seed: int) -> Ingest:
    """``total`` bytes of ``size`` writes (half random, half zeros per write)."""
    rng = random.Random(seed)
    blobs = [rng.randbytes(size // 2) + bytes(size - size // 2) for _ in range(8)]
    t0 = time.perf_counter()
    c0, p0, r0 = time.thread_time(), time.process_time(), _rgw_cpu()
    done = since = 0
    waits = 0.0
    i = 0
    clock = time.perf_counter
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
    w0 = clock()
    await vol.flush()
    waits += clock() - w0
    dt = time.perf_counter() - t0
    r1 = _rgw_cpu()
    return Ingest(total / MiB / dt, dt, time.thread_time() - c0, time.process_time() - p0, waits,
                  None if r0 is None or r1 is None else r1 - r0)


async def _tiered_reads(tmp: Path, url: str, s3: Any, n: int) -> tuple[list[float], list[str]]:
    """Seconds of ``n`` 4 KiB random reads of a point whose records only the bucket holds
    (a 32 MiB region of 4 KiB writes, then 16 MiB elsewhere so its segments seal, go up
    and are dropped); and the keys of the segment objects."""
    s = _settings(tmp, url, 8 * MiB)
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
    await svc.upload_now()
    await svc.drop_uploaded_async()
    assert svc.manifest is not None and vol.journal.dropped_segments()
    lat = []
    for _ in range(n):
        off = rng.randrange(region // 4096) * 4096
        t0 = time.perf_counter()
        got = await vol.read_async(off, 4096, m.seq)
        lat.append(time.perf_counter() - t0)
        assert len(got) == 4096
    keys = [o.key for o in svc.manifest.segments]
    vol.close()
    return lat, keys


ROWS = ("upload", "read", "ingest", "recover")


def run(quick: bool = False, only: tuple[str, ...] = ROWS) -> list[dict[str, Any]]:
    """The rows named in ``only`` (``recover`` needs ``upload``)."""
    up_total = (64 if quick else 256) * MiB
    ingest_total = (64 if quick else 256) * MiB
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="cdp-tier-bench-"))
    with rgw() as target:
        os.environ["AWS_ACCESS_KEY_ID"] = target["access_key"]
        os.environ["AWS_SECRET_ACCESS_KEY"] = target["secret_key"]
        c = plain_client(target)
        s3 = cdp_client(target)
        bucket = f"cdp-tier-bench-{uuid.uuid4().hex[:8]}"
        c.create_bucket(Bucket=bucket)
        try:
            put_rate(c, bucket, 4 * MiB, 8)  # warm-up
            url = f"s3://{bucket}/b"

            if "upload" in only:
                # -- upload: one batch of incompressible 64 MiB segments, alternating with
                # plain boto3 uploading a file of the same size (both after os.sync(), so
                # neither competes with the writeback of what was just written)
                async def upload(rnd: int) -> tuple[float, int, list[str]]:
                    d = tmp / f"up{rnd}"
                    s = _settings(d, f"{url}-up{rnd}", 64 * MiB)
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
                    t0 = time.perf_counter()
                    await svc.upload_now()
                    dt = time.perf_counter() - t0
                    assert svc.manifest is not None
                    nbytes = sum(o.size for o in svc.manifest.segments)
                    keys = [o.key for o in svc.manifest.segments]
                    vol.close()
                    return nbytes / MiB / dt, nbytes, keys

                ups: list[float] = []
                peers: list[float] = []
                with tempfile.NamedTemporaryFile(prefix="cdp-tier-bench-", dir=tmp) as f:
                    f.write(os.urandom(64 * MiB))
                    f.flush()
                    for rnd in range(2):
                        mine, nbytes, keys = asyncio.run(upload(rnd))
                        ups.append(mine)
                        os.sync()
                        peers.append(multipart_rate(c, bucket, Path(f.name), max(1, nbytes // (64 * MiB))))
                rows.append(_row("tier-upload", sum(ups) / 2, sum(peers) / 2, "MiB/s",
                                 f"{nbytes // MiB} MiB of 64 MiB segments, 2 alternating rounds; "
                                 "cdp: TierService batch (sha256 + multipart 8 MiB x8 + state + "
                                 "manifest); peer: upload_file"))
                rec_url = f"{url}-up1"  # what the recovery row reads back

            if "read" in only:
                # -- 4 KiB random reads of a tiered, uncached point vs plain ranged GETs
                n = 100 if quick else 400
                lat, rkeys = asyncio.run(_tiered_reads(tmp / "rd", f"{url}-reads", s3, n))
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
                                 "point (fetch + cache + read); peer: get_object Range 4 KiB. "
                                 "Goal: ratio <= 2"))

            if "ingest" in only:
                # -- ingest with the tier uploading behind it vs off: alternating rounds, the
                # median of each; the note says how much the tier sent during the "on" runs
                for size, name in ((4096, "4KiB"), (MiB, "1MiB")):
                    total = ingest_total // (2 if size == 4096 else 1)
                    runs: dict[bool, list[Ingest]] = {True: [], False: []}
                    sent: list[int] = []
                    for rnd in range(3):
                        for on in (False, True):
                            d = tmp / f"in-{name}-{rnd}-{on}"

                            async def ingest(d: Path = d, on: bool = on, rnd: int = rnd, total: int = total,
                                             size: int = size, sent: list[int] = sent) -> Ingest:
                                # a backlog of sealed segments first (not timed), so the tier
                                # uploads during the whole timed run
                                s = _settings(d, f"{url}-ingest-{d.name}", 8 * MiB)
                                vol = Volume.create(d / "store" / "volumes" / "vol0", "vol0", SIZE, s)
                                for i in range(BACKLOG // MiB):
                                    r = vol.write(SIZE - (i + 1) * MiB, os.urandom(MiB))
                                    if r is not None:
                                        await r
                                await vol.flush()
                                vol.journal.sync()
                                svc = None
                                if on:
                                    svc = TierService(vol, s.tier, s3=s3, autostart=False)
                                    vol.attach(svc)
                                    svc.start()
                                got = await _ingest(vol, total, size, rnd)
                                if svc is not None:
                                    sent.append(svc.sent_bytes)
                                vol.close()
                                return got

                            os.sync()
                            runs[on].append(asyncio.run(ingest()))
                            shutil.rmtree(d, ignore_errors=True)

                    def med(on: bool, what: str, runs: dict[bool, list[Ingest]] = runs) -> float:
                        return float(statistics.median(getattr(r, what) for r in runs[on]))

                    def rgw_cpu(on: bool, runs: dict[bool, list[Ingest]] = runs) -> str:
                        got = [r.rgw_cpu for r in runs[on] if r.rgw_cpu is not None]
                        return f"{statistics.median(got):.2f}" if got else "?"

                    rows.append(_row(f"tier-ingest-{name}", med(True, "rate"), med(False, "rate"),
                                     "MiB/s",
                                     f"{total // MiB} MiB of {name} writes, volume level, 3 alternating "
                                     f"rounds, medians; a {BACKLOG // MiB} MiB backlog first, the "
                                     f"tier sent {min(sent) // MiB}-{max(sent) // MiB} MiB during "
                                     "each timed run; peer: [tier] off. Loop thread CPU s "
                                     f"on/off {med(True, 'loop_cpu'):.2f}/{med(False, 'loop_cpu'):.2f}, "
                                     f"process CPU s {med(True, 'cpu'):.2f}/{med(False, 'cpu'):.2f}, "
                                     f"wall s {med(True, 'seconds'):.2f}/{med(False, 'seconds'):.2f}, "
                                     f"of which awaiting the journal {med(True, 'waits'):.2f}/"
                                     f"{med(False, 'waits'):.2f}, RGW daemons' CPU s "
                                     f"{rgw_cpu(True)}/{rgw_cpu(False)}; "
                                     f"load {os.getloadavg()[0]:.1f}"))

            if "recover" in only and "upload" in only:
                # -- recovery vs plain download of the same objects
                t0 = time.perf_counter()
                rep = recover_store(s3, rec_url, tmp / "rec")
                mine = rep.bytes / MiB / (time.perf_counter() - t0)
                dl = tmp / "plain"
                dl.mkdir()
                t0 = time.perf_counter()
                for i, k in enumerate(keys):  # what "download the bucket" is with plain boto3
                    c.download_file(bucket, k, str(dl / str(i)))
                peer = nbytes / MiB / (time.perf_counter() - t0)
                rows.append(_row("tier-recover", mine, peer, "MiB/s",
                                 f"{rep.bytes // MiB} MiB; cdp: recover_store (4 segments at once, "
                                 "8 MiB ranged GETs, sha256, fsync); peer: boto3 download_file of each "
                                 "segment (s3transfer, 10 threads)"))
        finally:
            keys_left = [o["Key"] for p in c.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                         for o in p.get("Contents", [])]
            for i in range(0, len(keys_left), 1000):
                c.delete_objects(Bucket=bucket, Delete={
                    "Objects": [{"Key": k} for k in keys_left[i:i + 1000]], "Quiet": True})
            c.delete_bucket(Bucket=bucket)
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(ROWS), help=f"rows to run (of {','.join(ROWS)})")
    a = ap.parse_args(argv)
    for r in run(a.quick, tuple(a.only.split(","))):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
