"""Ingest with the ransomware sentinel on vs off (issue 21): fio --ioengine=nbd against
two cdpd, identical but for ``[sentinel] enabled``, 4 KiB random writes (iodepth 32)
and 1 MiB sequential writes (iodepth 8). fio's buffers are random bytes, so every
write is high entropy and the sentinel does all its work (sample, batch entropy, reads
of the overwritten bytes up to its check budget).

    python -m tools.bench.sentinel_bench [--quick]

Runs alternate off/on in pairs (order swapped each pair, to cancel drift on a shared
machine) and report the median per-pair ratio on/off; goal >= 0.95. Also each cdpd's
CPU time per request (/proc/PID/stat), steadier than throughput on a busy machine:
its ratio off/on is the share of the ingest CPU left to the host's writes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tools.bench.goals import ratio_goal
from tools.bench.nbd_bench import _row, fio, print_table
from tools.harness import Cdpd

MiB = 1 << 20
WORKLOADS = {  # name: (rw, bs, iodepth, metric)
    "sentinel-randwrite-4k": ("randwrite", "4k", 32, "iops"),
    "sentinel-seqwrite-1m": ("write", "1M", 8, "MBps"),
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process *pid* so far (/proc/PID/stat)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def run(quick: bool = False, scratch: Path | None = None) -> list[dict[str, Any]]:
    for tool in ("fio",):
        if shutil.which(tool) is None:
            raise SystemExit(f"sentinel_bench: requires {tool} (make sysdeps)")
    runtime = 3.0 if quick else 15.0
    pairs = 2 if quick else 5
    size = 256 * MiB if quick else 2048 * MiB
    base = Path(tempfile.mkdtemp(prefix="cdp-bench-", dir=scratch or Path.cwd()))
    ds: dict[bool, Cdpd] = {}
    rows: list[dict[str, Any]] = []
    try:
        for on in (False, True):
            (base / str(on)).mkdir()
            ds[on] = Cdpd(base / str(on), size=f"{size // MiB}MiB", segment_bytes="256MiB",
                          l0_max_writes=8192,
                          extra_config=f"[sentinel]\nenabled = {str(on).lower()}\n").start()
        for name, (rw, bs, depth, metric) in WORKLOADS.items():
            got: dict[bool, list[float]] = {False: [], True: []}
            cpu: dict[bool, list[float]] = {False: [], True: []}  # cdpd CPU µs per request
            ratios = []
            for p in range(pairs):
                order = (False, True) if p % 2 == 0 else (True, False)
                for on in order:
                    pid = ds[on].proc.pid  # type: ignore[union-attr]
                    c0 = cpu_seconds(pid)
                    r = fio(ds[on].uri(), rw, bs, depth, 1, runtime, size)
                    ops = r["iops"] * runtime
                    cpu[on].append((cpu_seconds(pid) - c0) / ops * 1e6 if ops else 0.0)
                    got[on].append(r[metric])
                ratios.append(got[True][-1] / got[False][-1])
            unit = "IOPS" if metric == "iops" else "MB/s"
            rows.append(_row(name, statistics.median(got[True]), statistics.median(got[False]),
                             "sentinel off", unit, ratio_goal(name),
                             ratio=statistics.median(ratios)))
            c_on, c_off = statistics.median(cpu[True]), statistics.median(cpu[False])
            rows.append({"workload": f"{name} cdpd CPU per request", "cdp": round(c_on, 1),
                         "peer": round(c_off, 1), "peer_name": "sentinel off",
                         "unit": "µs", "ratio": round(c_off / c_on, 3) if c_on else 0.0,
                         "goal": None, "verdict": "-"})
        alerts = ds[True].cdpctl_json("alerts", "--json")
        rows.append({"workload": "sentinel alerts during the bench", "cdp": len(alerts),
                     "peer": 0, "peer_name": "-", "unit": "alerts", "ratio": None,
                     "goal": None, "verdict": "pass" if not alerts else "short"})
    finally:
        for d in ds.values():
            if d.proc is not None:
                d.stop()
        shutil.rmtree(base, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds per run, 2 pairs")
    args = ap.parse_args()
    rows = run(quick=args.quick)
    for r in rows:
        r.setdefault("ratio", 0.0)
    print_table([{**r, "ratio": r["ratio"] or 0.0} for r in rows])


if __name__ == "__main__":
    main()
