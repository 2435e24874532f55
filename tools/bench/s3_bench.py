"""Plain boto3 against the test Ceph RGW: the peer figures the S3 tier is compared with.

    python -m tools.bench.s3_bench [--quick]
    python -m tools.bench s3            # opt-in suite: not part of the default run

Uses the running RGW (``CDP_TEST_S3_ENDPOINT`` + ``AWS_*`` keys, or ``tools/ceph-s3``'s
state), or starts one with ``tools/ceph-s3 up`` and stops it afterwards. One fresh bucket,
warmed up first (RGW's first writes are slow), deleted at the end.

Rows (``peer``: plain boto3, as a user would write it; ``cdp``: the same bytes through
``cdp.tier.s3``, the client the tier uses, where there is one):
- ``s3-put-4MiB x1`` / ``x4``: put_object of 4 MiB objects, one stream / 4 threads, MiB/s.
- ``s3-put-64MiB multipart``: one 64 MiB file, boto3 ``upload_file`` (s3transfer: 8 MiB
  parts, 10 threads) vs ``S3.upload_file`` (8 MiB parts, 4 workers), MiB/s.
- ``s3-get-4MiB x1``: whole-object GETs, one stream, MiB/s (the recovery peer).
- ``s3-get-4KiB-range p50`` / ``p95`` / ``p99``: random 4 KiB ranged GETs of a 64 MiB
  object, one stream, ms (plain ``get_object(Range=...)`` vs ``S3.get_range``).

The functions (``put_rate``, ``multipart_rate``, ``get_rate``, ``range_latencies``) are
what the tier bench calls for its ratios, in the same run. ``run(quick)`` returns the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import numpy as np
from boto3.s3.transfer import TransferConfig

from cdp.tier.s3 import S3, S3Settings, client_config, file_sha256
from tools import ceph_s3

MiB = 1 << 20


def empty_bucket(c: Any, bucket: str) -> None:
    """Delete every object of *bucket*, then the bucket."""
    keys_left = [o["Key"] for p in c.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                 for o in p.get("Contents", [])]
    for i in range(0, len(keys_left), 1000):
        c.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in keys_left[i:i + 1000]], "Quiet": True})
    c.delete_bucket(Bucket=bucket)


@contextmanager
def rgw() -> Iterator[dict[str, str]]:
    """endpoint, access_key, secret_key of a running RGW (started here if need be)."""
    env = os.environ
    if env.get("CDP_TEST_S3_ENDPOINT") and ceph_s3.rgw_answers(env["CDP_TEST_S3_ENDPOINT"]):
        yield {"endpoint": env["CDP_TEST_S3_ENDPOINT"], "access_key": env["AWS_ACCESS_KEY_ID"],
               "secret_key": env["AWS_SECRET_ACCESS_KEY"]}
        return
    info = ceph_s3.load_info()
    started = False
    if info is None or not ceph_s3.rgw_answers(str(info["endpoint"])):
        if ceph_s3.main(["up"]) != 0:
            raise SystemExit("s3_bench: requires Ceph RGW: tools/ceph-s3 up failed")
        info = ceph_s3.load_info()
        started = True
    assert info is not None
    try:
        yield {k: str(info[k]) for k in ("endpoint", "access_key", "secret_key")}
    finally:
        if started:
            ceph_s3.main(["stop"])


def plain_client(target: dict[str, str], pool: int = 16) -> Any:
    """boto3 as a user would make it for RGW (same Config as cdp's, bigger pool)."""
    return boto3.session.Session().client(
        "s3", endpoint_url=target["endpoint"], region_name="us-east-1",
        aws_access_key_id=target["access_key"], aws_secret_access_key=target["secret_key"],
        config=client_config(S3Settings(max_pool_connections=pool)),
    )


def cdp_client(target: dict[str, str]) -> S3:
    """cdp.tier.s3 on a client with the same Config (cdp's own, bigger pool)."""
    return S3(S3Settings(endpoint=target["endpoint"], max_pool_connections=16),
              client=plain_client(target))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def put_rate(client: Any, bucket: str, size: int, count: int, threads: int = 1) -> float:
    """MiB/s of ``count`` put_object calls of ``size`` random bytes, ``threads`` at once."""
    blobs = [os.urandom(size) for _ in range(min(count, 4))]
    run = uuid.uuid4().hex[:6]

    def one(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"put-{run}/{i}", Body=blobs[i % len(blobs)])

    def all_() -> None:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, range(count)))

    return size * count / MiB / _timed(all_)


def multipart_rate(client: Any, bucket: str, path: Path, reps: int) -> float:
    """MiB/s of boto3 ``upload_file`` of ``path`` (s3transfer defaults: multipart above
    8 MiB, 8 MiB parts, 10 threads): what "plain boto3" does with a file."""
    cfg = TransferConfig()
    t = 0.0
    for i in range(reps):
        t0 = time.perf_counter()
        client.upload_file(str(path), bucket, f"mp/{i}", Config=cfg)
        t += time.perf_counter() - t0
    return path.stat().st_size * reps / MiB / t


def cdp_multipart_rate(s3: S3, bucket: str, path: Path, reps: int, workers: int = 4) -> float:
    """MiB/s of ``S3.upload_file`` of ``path`` (8 MiB parts, ``workers`` in flight), its
    sha256 given as the tier does (it has it from the manifest)."""
    digest = file_sha256(path)
    t = 0.0
    for i in range(reps):
        t0 = time.perf_counter()
        s3.upload_file(bucket, f"cdp-mp/{i}", path, sha256=digest, workers=workers)
        t += time.perf_counter() - t0
    return path.stat().st_size * reps / MiB / t


def get_rate(client: Any, bucket: str, keys: list[str], size: int) -> float:
    """MiB/s of whole-object GETs of ``keys`` (each ``size``), one stream."""
    t0 = time.perf_counter()
    for k in keys:
        client.get_object(Bucket=bucket, Key=k)["Body"].read()
    return size * len(keys) / MiB / (time.perf_counter() - t0)


def range_samples(get: Callable[[int], bytes], object_size: int, n: int, size: int = 4096,
                  seed: int = 7) -> list[float]:
    """Seconds of each of ``n`` ranged GETs of ``size`` at random aligned offsets;
    ``get(offset)`` does one."""
    rng = random.Random(seed)
    lat = []
    for _ in range(n):
        off = rng.randrange(object_size // size) * size
        t0 = time.perf_counter()
        got = get(off)
        lat.append(time.perf_counter() - t0)
        assert len(got) == size
    return lat


def percentiles_ms(samples: list[float]) -> dict[str, float]:
    p = np.percentile(np.array(samples) * 1000, [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


def range_latencies(get: Callable[[int], bytes], object_size: int, n: int, size: int = 4096) -> dict[str, float]:
    """p50/p95/p99 (ms) of ``n`` ranged GETs (see :func:`range_samples`)."""
    return percentiles_ms(range_samples(get, object_size, n, size))


def _row(workload: str, cdp: float | None, peer: float, unit: str, note: str = "") -> dict[str, Any]:
    ratio = round(cdp / peer, 3) if cdp is not None and peer else None
    return {"workload": workload, "cdp": None if cdp is None else round(cdp, 2),
            "peer": round(peer, 2), "peer_name": "plain boto3", "unit": unit, "ratio": ratio,
            "note": note}


def run(quick: bool = False) -> list[dict[str, Any]]:
    n_put = 8 if quick else 64
    n_mp = 1 if quick else 4
    n_get = 200 if quick else 3000
    rows: list[dict[str, Any]] = []
    with rgw() as target:
        c = plain_client(target)
        s3 = cdp_client(target)
        bucket = f"cdp-bench-{uuid.uuid4().hex[:8]}"
        c.create_bucket(Bucket=bucket)
        try:
            put_rate(c, bucket, 4 * MiB, 8)  # warm-up: RGW's first writes are slow
            rows.append(_row("s3-put-4MiB x1", None, put_rate(c, bucket, 4 * MiB, n_put), "MiB/s"))
            rows.append(_row("s3-put-4MiB x4", None, put_rate(c, bucket, 4 * MiB, n_put, 4), "MiB/s"))
            with tempfile.NamedTemporaryFile(prefix="cdp-s3-bench-") as f:
                f.write(os.urandom(64 * MiB))
                f.flush()
                seg = Path(f.name)
                peer = multipart_rate(c, bucket, seg, n_mp)
                mine = cdp_multipart_rate(s3, bucket, seg, n_mp)
                peer = (peer + multipart_rate(c, bucket, seg, n_mp)) / 2  # alternate: drift
            rows.append(_row("s3-put-64MiB multipart", mine, peer, "MiB/s",
                             "one file; peer: upload_file, 8 MiB parts x10 threads; "
                             "cdp: S3.upload_file, 8 MiB parts x4"))
            keys = [f"get/{i}" for i in range(min(n_put, 16))]
            blob = os.urandom(4 * MiB)
            for k in keys:
                c.put_object(Bucket=bucket, Key=k, Body=blob)
            rows.append(_row("s3-get-4MiB x1", None, get_rate(c, bucket, keys, 4 * MiB), "MiB/s"))
            big = os.urandom(64 * MiB)
            c.put_object(Bucket=bucket, Key="ranged", Body=big)

            def plain_get(off: int) -> bytes:
                r = c.get_object(Bucket=bucket, Key="ranged", Range=f"bytes={off}-{off + 4095}")
                return bytes(r["Body"].read())

            def cdp_get(off: int) -> bytes:
                return s3.get_range(bucket, "ranged", off, 4096)

            range_samples(plain_get, len(big), 50)  # warm the connection and caches
            # alternate rounds: the machine's load drifts more than the two differ
            peer_s: list[float] = []
            cdp_s: list[float] = []
            for rnd in range(10):
                peer_s += range_samples(plain_get, len(big), n_get // 10, seed=rnd)
                cdp_s += range_samples(cdp_get, len(big), n_get // 10, seed=rnd)
            peer_lat, cdp_lat = percentiles_ms(peer_s), percentiles_ms(cdp_s)
            for q in ("p50", "p95", "p99"):
                rows.append(_row(f"s3-get-4KiB-range {q}", cdp_lat[q], peer_lat[q], "ms",
                                 f"{n_get} random 4 KiB GETs of a 64 MiB object, one stream, "
                                 "10 alternating rounds"))
        finally:
            empty_bucket(c, bucket)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    for r in run(a.quick):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
