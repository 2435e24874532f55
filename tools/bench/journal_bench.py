"""Journal benchmark, side by side with ``dd`` on the same file system.

    python -m tools.bench.journal_bench [--quick] [--dir DIR] [--json]

Rows:

- ``seq-1MiB``: 1 MiB incompressible appends, a commit every 64 MiB (the next 64 MiB are
  appended while the previous sync runs), vs ``dd bs=1M conv=fdatasync``. Goal >= 90 %.
- ``buffered-4KiB``: 4 KiB incompressible appends, no sync: records/s. Goal >= 200k/s.
- ``always-4KiB-x32``: 32 concurrent writers, each ``append`` + ``await commit()`` per
  record (sync="always"), vs ``dd bs=4k oflag=dsync`` (one sync per write). Reports
  records/s and fdatasyncs/s.
- ``compressible-1MiB``: 50 %-compressible 1 MiB appends, raw MB/s ingested vs dd's
  bandwidth. Goal: above the raw disk bandwidth (ratio > 1).
- ``slice-4KiB-of-1MiB``: ``read_slice`` of 4 KiB at random offsets of 1 MiB records
  (64 MiB journal, page cache warm, no chunk cache), reads/s, vs reading the whole
  payload and slicing it (what reads cost before chunked records).

The disk may be shared with other work, so the full run alternates dd and cdp three
times and keeps the best of each. The buffered row appends 1 GiB: enough to measure the
append path, small enough for the page cache (longer runs converge to disk bandwidth).

``run(quick)`` returns the rows as dicts for a harness; ``main`` prints a table.

Last full run (2 vCPU VM, ext4 on virtio disk, other benchmarks running alongside)::

    test               unit   cdp       peer                             ratio  result
    seq-1MiB           MB/s   671.4     631.1 (dd bs=1M conv=fdatasync)  1.06   pass
    buffered-4KiB      rec/s  271462.8  -                                -      pass
    always-4KiB-x32    rec/s  18430.6   3592.5 (dd bs=4k oflag=dsync)    5.13   pass
                       (576 fdatasyncs/s, 32 records per sync)
    compressible-1MiB  MB/s   824.8     631.1 (dd bs=1M conv=fdatasync)  1.31   pass
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from cdp.journal import Journal, OsFileLayer

MiB = 1 << 20
DEFAULT_DIR = "/var/tmp/cdp-journal-bench"


def _dd(directory: str, bs: str, count: int, flag: str) -> float:
    """Seconds dd needs to write ``count`` blocks of ``bs`` with ``flag``."""
    target = os.path.join(directory, "dd.out")
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", f"bs={bs}", f"count={count}", flag],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    dt = time.perf_counter() - t0
    os.unlink(target)
    return dt


def _fresh(directory: str) -> str:
    d = os.path.join(directory, "journal")
    shutil.rmtree(d, ignore_errors=True)
    return d


def _pool(n: int, size: int, compressible: bool) -> list[bytes]:
    out = []
    for _ in range(n):
        if compressible:  # every 4 KiB: 2 KiB random + 2 KiB zeros, lz4 ratio ~0.5
            out.append(b"".join(os.urandom(2048) + bytes(2048) for _ in range(size // 4096)))
        else:
            out.append(os.urandom(size))
    return out


def _stream(directory: str, total: int, compressible: bool) -> tuple[float, int]:
    """1 MiB appends with a commit every 64 MiB; (seconds until all durable, stored bytes)."""
    d = _fresh(directory)
    pool = _pool(16, MiB, compressible)
    j = Journal.open(d)

    async def go() -> None:
        pending: asyncio.Task[None] | None = None
        append = j.append_write
        n = total // MiB
        for i in range(n):
            append(i * MiB, pool[i & 15])
            if i % 64 == 63:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(j.commit())
                await asyncio.sleep(0)
        if pending is not None:
            await pending
        await j.commit()

    t0 = time.perf_counter()
    asyncio.run(go())
    dt = time.perf_counter() - t0
    stored = j.stats().file_bytes
    j.close()
    shutil.rmtree(d, ignore_errors=True)
    return dt, stored


def _buffered(directory: str, n: int) -> float:
    """Seconds for ``n`` buffered 4 KiB appends (no sync)."""
    d = _fresh(directory)
    block = os.urandom(4096 * 1024)
    mv = memoryview(block)
    views = [mv[i * 4096 : (i + 1) * 4096] for i in range(1024)]
    j = Journal.open(d)
    append = j.append_write
    t0 = time.perf_counter()
    for i in range(n):
        append(i << 12, views[i & 1023])
    dt = time.perf_counter() - t0
    j.close()
    shutil.rmtree(d, ignore_errors=True)
    return dt


def _always(directory: str, seconds: float, writers: int) -> tuple[int, int, float]:
    """(records, fdatasyncs, seconds) for ``writers`` append+commit loops."""
    d = _fresh(directory)
    fs = OsFileLayer()
    j = Journal.open(d, sync="always", fs=fs)
    data = [os.urandom(4096) for _ in range(writers)]
    count = 0
    syncs = 0

    async def writer(w: int, stop: float) -> None:
        nonlocal count
        i = 0
        while time.perf_counter() < stop:
            j.append_write((w << 30) + (i << 12), data[w])
            await j.commit()
            count += 1
            i += 1

    async def go() -> float:
        base = fs.fdatasync_count
        t0 = time.perf_counter()
        await asyncio.gather(*(writer(w, t0 + seconds) for w in range(writers)))
        nonlocal syncs
        syncs = fs.fdatasync_count - base
        return time.perf_counter() - t0

    dt = asyncio.run(go())
    j.close()
    shutil.rmtree(d, ignore_errors=True)
    return count, syncs, dt


def _slice_reads(directory: str, seconds: float) -> tuple[float, float]:
    """(read_slice reads/s, whole-payload reads/s) for 4 KiB of 1 MiB records."""
    import random

    d = _fresh(directory)
    j = Journal.open(d)
    locs = [j.append_write(i * MiB, os.urandom(MiB)) for i in range(64)]
    j.sync()
    rng = random.Random(1)
    probes = [(*locs[rng.randrange(64)], rng.randrange(MiB // 4096) * 4096) for _ in range(4096)]
    rates = []
    for whole in (False, True):
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for seq, loc, poff in probes[:256]:
                if whole:
                    j.read_payload(seq, loc)[poff : poff + 4096]
                else:
                    j.read_slice(seq, loc, poff, 4096)
            n += 256
            probes.append(probes.pop(0))
        rates.append(n / (time.perf_counter() - t0))
    j.close()
    shutil.rmtree(d, ignore_errors=True)
    return rates[0], rates[1]


def _row(name: str, unit: str, cdp: float, peer: float | None, peer_name: str, goal: str,
         passed: bool, **extra: Any) -> dict[str, Any]:
    return {
        "test": name,
        "unit": unit,
        "cdp": round(cdp, 1),
        "peer": None if peer is None else round(peer, 1),
        "peer_name": peer_name,
        "ratio": None if not peer else round(cdp / peer, 3),
        "goal": goal,
        "result": "pass" if passed else "short",
        **extra,
    }


def run(quick: bool = False, directory: str = DEFAULT_DIR) -> list[dict[str, Any]]:
    """Run every benchmark; one dict per row (test, unit, cdp, peer, ratio, goal, result)."""
    os.makedirs(directory, exist_ok=True)
    total = (512 if quick else 2048) * MiB
    rows: list[dict[str, Any]] = []

    # the disk is shared and noisy: alternate dd and cdp runs and keep the best of each
    reps = 1 if quick else 3
    dd_mbs = mbs = 0.0
    for _ in range(reps):
        dd_mbs = max(dd_mbs, total / MiB / _dd(directory, "1M", total // MiB, "conv=fdatasync"))
        mbs = max(mbs, total / MiB / _stream(directory, total, compressible=False)[0])
    rows.append(_row("seq-1MiB", "MB/s", mbs, dd_mbs, "dd bs=1M conv=fdatasync",
                     ">= 90% of dd", mbs >= 0.9 * dd_mbs))

    n = 100_000 if quick else 250_000  # 1 GiB: fits the page cache, measures our cost
    rate = n / _buffered(directory, n)
    rows.append(_row("buffered-4KiB", "rec/s", rate, None, "-", ">= 200k rec/s", rate >= 200_000))

    secs = 2.0 if quick else 5.0
    recs, syncs, dt = _always(directory, secs, 32)
    dd_count = 500 if quick else 2000
    dd_rate = dd_count / _dd(directory, "4k", dd_count, "oflag=dsync")
    rows.append(_row("always-4KiB-x32", "rec/s", recs / dt, dd_rate, "dd bs=4k oflag=dsync",
                     "> dd (group commit)", recs / dt > dd_rate,
                     syncs_per_s=round(syncs / dt, 1), records_per_sync=round(recs / max(syncs, 1), 1)))

    mbs = 0.0
    stored = 0
    for _ in range(reps):
        dt, stored = _stream(directory, total, compressible=True)
        mbs = max(mbs, total / MiB / dt)
    rows.append(_row("compressible-1MiB", "MB/s", mbs, dd_mbs, "dd bs=1M conv=fdatasync",
                     "> dd (raw ingest)", mbs > dd_mbs, stored_ratio=round(stored / total, 3)))

    sliced, whole = _slice_reads(directory, 1.0 if quick else 3.0)
    rows.append(_row("slice-4KiB-of-1MiB", "reads/s", sliced, whole, "read whole payload",
                     ">= 10x whole", sliced >= 10 * whole))
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["test", "unit", "cdp", "peer", "ratio", "goal", "result", "notes"]
    lines = []
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.items()
                          if k not in {"test", "unit", "cdp", "peer", "ratio", "goal", "result",
                                       "peer_name"})
        peer = "-" if r["peer"] is None else f"{r['peer']} ({r['peer_name']})"
        lines.append([r["test"], r["unit"], f"{r['cdp']}", peer,
                      "-" if r["ratio"] is None else f"{r['ratio']:.2f}", r["goal"], r["result"],
                      notes])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*x) for x in lines)])


def main(argv: list[str] | None = None) -> int:
    """Print the benchmark table (or JSON); exit status 0 even when a goal is short."""
    ap = argparse.ArgumentParser(prog="journal_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (~20 s)")
    ap.add_argument("--dir", default=DEFAULT_DIR, help=f"scratch directory ({DEFAULT_DIR})")
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    args = ap.parse_args(argv)
    rows = run(args.quick, args.dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
