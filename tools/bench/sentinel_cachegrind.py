"""The sentinel's cost on the volume's write path, counted instead of timed: cachegrind
(valgrind) counts instructions and simulates the caches the same way whatever the
machine's load, which timing on a shared VM without hardware counters cannot.

    python -m tools.bench.sentinel_cachegrind [--writes N] [--rate IOPS]
    python -m tools.bench.sentinel_cachegrind --drive on|off N IOPS   (one run, no valgrind)

Each run writes N random 4 KiB writes over 2 GiB through ``Volume.write`` in process
(retention attached, an 8192-write live window), driven as cdpd at IOPS would be: a
virtual clock advances 1/IOPS s a write (the sentinel's check budget reads it), the
sentinel's batch runs every IOPS x ``POLL`` writes, its checks on the seals. Four runs
under cachegrind, sentinel off and on, N and 2N writes; the steady state per write is
((on - off) at 2N - (on - off) at N) / N, which leaves out the start (imports, the first
batch, which samples every write until the stride is set). Prints instructions, L1 and
L2 data misses per write (the simulated last level is this EPYC's L2, 1 MiB 8-way; simulated
misses depend on where buffers land, so take them as ±; instructions are exact).
Takes ~10 min at load 10 (valgrind runs Python ~50x slower); run it at nice 19.
docs/SENTINEL.md "Cost" has the numbers it gave.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import replace
from pathlib import Path

#: the cachegrind summary's events, in its order
EVENTS = ("Ir", "I1mr", "ILmr", "Dr", "D1mr", "DLmr", "Dw", "D1mw", "DLmw")
CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=1048576,8,64")


def drive(mode: str, n: int, rate: int) -> None:
    """One run of *n* writes with the sentinel *mode* ("on" or "off") at a virtual *rate*."""
    from cdp.config import JournalSettings, MapSettings, Settings
    from cdp.retention.service import attach_retention
    from cdp.sentinel import service as svc
    from cdp.volume import Volume

    vt = [1000.0]

    def vclock() -> float:
        return vt[0]

    vars(svc)["time"] = types.SimpleNamespace(monotonic=vclock, time_ns=time.time_ns,
                                              thread_time=vclock)
    svc._cpu_time = vclock  # a check "costs" nothing: only checks_per_second binds

    class _Driven:  # stands for the sentinel's task: the batches are called below
        def cancel(self) -> None:
            pass

    async def main() -> None:
        tmp = Path(tempfile.mkdtemp(prefix="cdp-cg-"))
        try:
            st = replace(Settings(), store=tmp / "store",
                         journal=replace(JournalSettings(), segment_bytes=256 << 20),
                         maps=replace(MapSettings(), l0_max_writes=8192))
            size = 2 << 30
            vol = Volume.create(tmp / "v", "v", size, st)
            attach_retention(vol)
            sen = None
            if mode == "on":
                sen = svc.attach_sentinel(vol)
                sen._task = _Driven()  # type: ignore[assignment]
                sen._refill = vclock()
            rng = random.Random(1)
            bufs = [rng.randbytes(4096) for _ in range(256)]
            offs = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
            per_batch = int(rate * svc.POLL)
            t0 = time.thread_time()
            for i in range(n):
                r = vol.write(offs[i], bufs[i & 255])
                if r is not None:
                    await r
                vt[0] += 1.0 / rate
                if i & 31 == 31:
                    await asyncio.sleep(0)
                if sen is not None and i % per_batch == per_batch - 1:
                    await sen.process()
            cpu = (time.thread_time() - t0) / n * 1e6
            extra = (f"; {sen.batches} batches, {sen.writes_seen} samples, "
                     f"{sen.checked_writes} checks" if sen is not None else "")
            print(f"sentinel {mode}: {n} writes, {cpu:.2f} µs CPU a write{extra}", flush=True)
            vol.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    asyncio.run(main())


def _summary(path: Path) -> dict[str, int]:
    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            return dict(zip(EVENTS, (int(x) for x in line.split()[1:]), strict=True))
    raise SystemExit(f"sentinel_cachegrind: no summary in {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=60_000, help="N (default 60000)")
    ap.add_argument("--rate", type=int, default=30_000, help="virtual IOPS (default 30000)")
    ap.add_argument("--drive", nargs=3, metavar=("MODE", "N", "IOPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive:
        drive(args.drive[0], int(args.drive[1]), int(args.drive[2]))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("sentinel_cachegrind: requires valgrind")
    out = Path(tempfile.mkdtemp(prefix="cdp-cg-out-"))
    try:
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        procs: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
        for mode in ("off", "on"):
            for n in (args.writes, 2 * args.writes):
                f = out / f"{mode}.{n}"
                procs[(mode, n)] = subprocess.Popen(
                    ["valgrind", "--tool=cachegrind", "--cache-sim=yes", *CACHES,
                     f"--cachegrind-out-file={f}", sys.executable, "-m",
                     "tools.bench.sentinel_cachegrind", "--drive", mode, str(n), str(args.rate)],
                    env=env, stderr=subprocess.DEVNULL)
        for p in procs.values():
            if p.wait():
                raise SystemExit(f"sentinel_cachegrind: a run exited {p.returncode}")
        s = {k: _summary(out / f"{k[0]}.{k[1]}") for k in procs}
        n1: int = args.writes
        n2 = 2 * n1

        def per_write(ev: str) -> float:
            return ((s[("on", n2)][ev] - s[("off", n2)][ev])
                    - (s[("on", n1)][ev] - s[("off", n1)][ev])) / n1

        print(f"steady state, sentinel on minus off, per write ({n1} writes at {args.rate} "
              f"virtual IOPS): instructions {per_write('Ir'):+.0f}, L1 data misses "
              f"{per_write('D1mr') + per_write('D1mw'):+.1f}, L2 data misses "
              f"{per_write('DLmr') + per_write('DLmw'):+.1f}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
