"""The S3 tier against plain boto3 on the test Ceph RGW, ratios in one run (issue 26).

    python -m tools.bench.tier_bench [--quick]

Rows (``cdp``: the tier; ``peer``: the comparison, measured in the same run):
- ``tier-upload``: MiB/s of segment bytes a :class:`TierService` batch uploads (hash,
  HEAD, multipart 8 MiB x8, manifest) vs plain boto3 ``upload_file`` of a file of the
  same size (s3transfer: 8 MiB parts x10), same RGW. Goal >= 0.8.
- ``tier-ingest-4KiB`` / ``tier-ingest-1MiB``: MiB/s of volume writes (journal + maps,
  a flush every 8 MiB) with the tier task uploading behind them vs with ``[tier]`` off.
  Goal >= 0.9.
- ``tier-recover``: MiB/s of ``recover_store`` (ranged 8 MiB GETs + sha256 + install)
  vs plain boto3 ``download_file`` of the same objects to files. Goal >= 0.7.
- Tiered reads are not built yet (docs/TIER.md, "Limits"): no row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from cdp.config import JournalSettings, Settings, TierSettings
from cdp.tier.recover import recover_store
from cdp.tier.service import TierService
from cdp.volume import Volume
from tools.bench.s3_bench import (
    _row,
    cdp_client,
    multipart_rate,
    plain_client,
    put_rate,
    rgw,
)

MiB = 1 << 20
SIZE = 1 << 30


def _settings(tmp: Path, url: str, segment: int) -> Settings:
    return replace(Settings(), store=tmp / "store",
                   journal=replace(JournalSettings(), segment_bytes=segment),
                   tier=TierSettings(url=url))


async def _ingest(vol: Volume, total: int, size: int, seed: int) -> float:
    """MiB/s of ``total`` bytes of ``size`` writes (half random, half zeros per write)."""
    rng = random.Random(seed)
    blobs = [rng.randbytes(size // 2) + bytes(size - size // 2) for _ in range(8)]
    t0 = time.perf_counter()
    done = since = 0
    i = 0
    while done < total:
        off = rng.randrange(0, SIZE // size) * size
        r = vol.write(off, blobs[i % 8])
        if r is not None:
            await r
        i += 1
        done += size
        since += size
        if since >= 8 * MiB:
            await vol.flush()
            since = 0
            await asyncio.sleep(0)
    await vol.flush()
    return total / MiB / (time.perf_counter() - t0)


def run(quick: bool = False) -> list[dict[str, Any]]:
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

            # -- upload: one batch of incompressible 64 MiB segments
            async def upload() -> tuple[float, int, list[str]]:
                s = _settings(tmp / "up", url, 64 * MiB)
                vol = Volume.create(tmp / "up" / "store" / "volumes" / "vol0", "vol0", SIZE, s)
                svc = TierService(vol, s.tier, s3=s3, autostart=False)
                vol.attach(svc)
                for i in range(up_total // MiB + 64):  # + one segment to roll the last
                    r = vol.write((i * MiB) % SIZE, os.urandom(MiB))
                    if r is not None:
                        await r
                await vol.flush()
                vol.journal.sync()
                t0 = time.perf_counter()
                await svc.upload_now()
                dt = time.perf_counter() - t0
                assert svc.manifest is not None
                nbytes = sum(o.size for o in svc.manifest.segments)
                keys = [o.key for o in svc.manifest.segments]
                vol.close()
                return nbytes / MiB / dt, nbytes, keys

            mine, nbytes, keys = asyncio.run(upload())
            with tempfile.NamedTemporaryFile(prefix="cdp-tier-bench-", dir=tmp) as f:
                f.write(os.urandom(64 * MiB))
                f.flush()
                peer = multipart_rate(c, bucket, Path(f.name), max(1, nbytes // (64 * MiB)))
            rows.append(_row("tier-upload", mine, peer, "MiB/s",
                             f"{nbytes // MiB} MiB of 64 MiB segments; cdp: TierService batch "
                             "(sha256 + HEAD + multipart 8 MiB x8 + manifest); peer: upload_file"))

            # -- ingest with the tier uploading behind it vs off
            for size, name in ((4096, "4KiB"), (MiB, "1MiB")):
                total = ingest_total // (4 if size == 4096 else 1)
                rates: dict[bool, list[float]] = {True: [], False: []}
                for rnd in range(2):
                    for on in (False, True):
                        d = tmp / f"in-{name}-{rnd}-{on}"

                        async def ingest(d: Path = d, on: bool = on, rnd: int = rnd, total: int = total,
                                         size: int = size) -> float:
                            s = _settings(d, f"{url}-ingest-{d.name}", 8 * MiB)
                            vol = Volume.create(d / "store" / "volumes" / "vol0", "vol0", SIZE, s)
                            if on:
                                svc = TierService(vol, s.tier, s3=s3)
                                vol.attach(svc)
                                svc.start()
                            rate = await _ingest(vol, total, size, rnd)
                            vol.close()
                            return rate

                        rates[on].append(asyncio.run(ingest()))
                        shutil.rmtree(d, ignore_errors=True)
                rows.append(_row(f"tier-ingest-{name}", sum(rates[True]) / 2, sum(rates[False]) / 2,
                                 "MiB/s", f"{total // MiB} MiB of {name} writes, volume level, "
                                 "2 alternating rounds; peer: [tier] off"))

            # -- recovery vs plain download of the same objects
            t0 = time.perf_counter()
            rep = recover_store(s3, url, tmp / "rec")
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
    a = ap.parse_args(argv)
    for r in run(a.quick):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
