"""Map engine benchmark: seal rate, resolve latency (random point and head), diff cost,
memory and bytes on disk as the history grows.

Workload: random 4 KiB writes over a 10 GiB volume, with one write in ten starting a
sequential run of 32 consecutive 4 KiB writes. Checkpoints at 10k / 100k / 1M / 10M
writes (``--quick`` stops at 100k, ``--max N`` caps the count).

    python -m tools.bench.mapengine_bench [--quick] [--max N] [--out DIR]

``seal_rate_wps`` is wall-clock (the goal); ``seal_cpu_wps`` divides by the process's
CPU time instead, which tells the code's own cost apart from a busy machine (fsync waits
and other processes' load show in the first only).

Goals: seal rate >= 200k writes/s; random 4 KiB resolve median <= 200 us at 10M; head
resolve with a full live window (``head_full``: the live window topped up to
``l0_max_writes - 1`` entries before measuring; those writes count towards the next
checkpoint) median <= 5 us.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

from mapengine import MapHistory, MergePolicy

VOLUME = 10 << 30
BLOCK = 4096
CHECKPOINTS = [10_000, 100_000, 1_000_000, 10_000_000]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _workload(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` write offsets: random blocks, one in ten starting a 32-block sequential run."""
    out = np.empty(n, np.int64)
    nblocks = VOLUME // BLOCK
    i = 0
    while i < n:
        k = min(n - i, 65536)
        starts = rng.integers(0, nblocks - 64, size=k)
        runs = rng.random(k) < 0.1
        chunk: list[np.ndarray] = []
        size = 0
        for s, r in zip(starts.tolist(), runs.tolist(), strict=True):
            if r:
                chunk.append(np.arange(s, s + 32, dtype=np.int64))
                size += 32
            else:
                chunk.append(np.array([s], np.int64))
                size += 1
            if size >= k:
                break
        blk = np.concatenate(chunk)[:k]
        out[i : i + k] = blk * BLOCK
        i += k
    return out


def _pct(v: list[float], p: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(p * len(s)))]


def run(
    quick: bool = False,
    max_writes: int = 10_000_000,
    out: str | None = None,
    cache_mib: int = 256,
) -> list[dict[str, Any]]:
    """Run the benchmark; print a table and return its rows."""
    limit = min(max_writes, 100_000 if quick else max_writes)
    points = [c for c in CHECKPOINTS if c <= limit] or [limit]
    rng = np.random.default_rng(12345)
    rnd = random.Random(6789)
    tmp = tempfile.mkdtemp(prefix="mapbench-")
    rows: list[dict[str, Any]] = []
    try:
        h = MapHistory.open(tmp, policy=MergePolicy(), cache_bytes=cache_mib << 20)
        seq = 0
        ingest_s = 0.0
        ingest_cpu = 0.0
        done = 0
        for target in points:
            offs = _workload(rng, max(0, target - done))
            add = h.add_write
            seal = h.seal
            c0 = time.process_time()
            t0 = time.perf_counter()
            for off in offs.tolist():
                seq += 1
                if add(seq, off, off + BLOCK, seq):
                    seal()
            ingest_s += time.perf_counter() - t0
            ingest_cpu += time.process_time() - c0
            done = max(done, target)
            nsamp = 2000
            lat: list[float] = []
            for _ in range(nsamp):
                x = rnd.randint(1, seq)
                off = rnd.randrange(VOLUME // BLOCK) * BLOCK
                t = time.perf_counter()
                h.resolve(x, off, off + BLOCK)
                lat.append((time.perf_counter() - t) * 1e6)
            hl: list[float] = []
            for _ in range(nsamp):
                off = rnd.randrange(VOLUME // BLOCK) * BLOCK
                t = time.perf_counter()
                h.resolve(seq, off, off + BLOCK)
                hl.append((time.perf_counter() - t) * 1e6)
            # the same at the head with a full live window
            live = h.stats()["live_entries"]
            extra = _workload(rng, max(0, h.policy.l0_max_writes - 1 - live))
            c0 = time.process_time()
            t0 = time.perf_counter()
            for off in extra.tolist():
                seq += 1
                add(seq, off, off + BLOCK, seq)
            ingest_s += time.perf_counter() - t0
            ingest_cpu += time.process_time() - c0
            done += extra.shape[0]
            hf: list[float] = []
            for _ in range(nsamp):
                off = rnd.randrange(VOLUME // BLOCK) * BLOCK
                t = time.perf_counter()
                h.resolve(seq, off, off + BLOCK)
                hf.append((time.perf_counter() - t) * 1e6)
            dl: list[float] = []
            dr: list[int] = []
            for _ in range(10):
                a = rnd.randint(0, seq)
                b = min(seq, a + rnd.randint(1, max(1, seq // 100)))
                t = time.perf_counter()
                r = h.changed(a, b)
                dl.append((time.perf_counter() - t) * 1e3)
                dr.append(len(r))
            st = h.stats()
            row = {
                "writes": target,
                "seal_rate_wps": round(done / ingest_s),
                "seal_cpu_wps": round(done / ingest_cpu),
                "resolve_med_us": round(statistics.median(lat), 1),
                "resolve_p99_us": round(_pct(lat, 0.99), 1),
                "head_med_us": round(statistics.median(hl), 1),
                "head_p99_us": round(_pct(hl, 0.99), 1),
                "head_full_med_us": round(statistics.median(hf), 1),
                "diff_med_ms": round(statistics.median(dl), 2),
                "diff_ranges_med": int(statistics.median(dr)),
                "rss_mib": round(_rss_bytes() / 2**20, 1),
                "disk_mib": round(st["disk_bytes"] / 2**20, 1),
                "maps": sum(st["maps"].values()),
                "head_entries": st["head_entries"],
            }
            rows.append(row)
            print(_fmt_row(row, header=len(rows) == 1), flush=True)
        h.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "mapengine.json"), "w") as f:
            json.dump(rows, f, indent=1)
        _plot(rows, os.path.join(out, "mapengine.png"))
    return rows


_COLS = [
    ("writes", 10),
    ("seal_rate_wps", 13),
    ("seal_cpu_wps", 12),
    ("resolve_med_us", 14),
    ("resolve_p99_us", 14),
    ("head_med_us", 11),
    ("head_p99_us", 11),
    ("head_full_med_us", 16),
    ("diff_med_ms", 11),
    ("diff_ranges_med", 15),
    ("rss_mib", 8),
    ("disk_mib", 9),
    ("maps", 6),
    ("head_entries", 12),
]


def _fmt_row(row: dict[str, Any], header: bool) -> str:
    line = " ".join(f"{row[k]!s:>{w}}" for k, w in _COLS)
    if header:
        return " ".join(f"{k:>{w}}" for k, w in _COLS) + "\n" + line
    return line


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return
    xs = [r["writes"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(xs, [r["resolve_med_us"] for r in rows], "o-", label="random point, median")
    ax[0].plot(xs, [r["resolve_p99_us"] for r in rows], "o--", label="random point, p99")
    ax[0].plot(xs, [r["head_med_us"] for r in rows], "s-", label="head, median")
    ax[0].set_ylabel("4 KiB resolve (us)")
    ax[1].plot(xs, [r["seal_rate_wps"] for r in rows], "o-")
    ax[1].set_ylabel("ingest (writes/s)")
    ax[2].plot(xs, [r["rss_mib"] for r in rows], "o-", label="RSS")
    ax[2].plot(xs, [r["disk_mib"] for r in rows], "s-", label="disk")
    ax[2].set_ylabel("MiB")
    for a in ax:
        a.set_xscale("log")
        a.set_xlabel("writes in history")
        a.grid(True, alpha=0.3)
    ax[0].legend()
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="stop at 100k writes")
    p.add_argument("--max", type=int, default=10_000_000, help="largest history (writes)")
    p.add_argument("--out", default="bench-results", help="directory for json + png")
    p.add_argument("--cache-mib", type=int, default=256,
                   help="map block cache (MiB); cdp's maps.cache_bytes default is 256 MiB")
    a = p.parse_args(argv)
    run(a.quick, a.max, a.out, a.cache_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
