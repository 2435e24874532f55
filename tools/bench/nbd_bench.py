"""cdpd over NBD vs. its peers, in the same run: fio --ioengine=nbd against cdpd and
`nbdkit file`, and `dd conv=fdatasync` for the disk's durable sequential bandwidth.

    python -m tools.bench.nbd_bench [--quick] [--out DIR] [WORKLOAD ...]

Workloads: disk, nbd-randwrite-4k, nbd-seqwrite-1m, nbd-randread-4k, nbd-flush, pit-read,
nbd-pipelined-1k.
Prints cdp, peer, ratio, goal, pass/short for each; ``run()`` returns the rows.
nbd-seqwrite-1m alternates dd and cdpd runs (3 pairs) and reports the median ratio.
nbd-pipelined-1k reads back 1 GiB (quick: 16 MiB) just written, in 1 KiB READs from the
client of :mod:`cdp.targets.testing.nbd_standoff` (issue 28: replies read only between
sends); the row names the longest gap between replies on each side. That client is
Python, so it also bounds the peer's figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cdp.targets.testing.nbd_standoff import read_back
from tools.bench.goals import ratio_goal
from tools.harness import Cdpd, listening_port

GiB = 1 << 30
MiB = 1 << 20


class Nbdkit:
    """`nbdkit file` on a preallocated file, on a loopback TCP port."""

    def __init__(self, path: Path, size: int) -> None:
        with open(path, "wb") as f:
            f.truncate(size)
        self.path = path
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", "0", "file", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.port = listening_port(self.proc, "nbdkit")

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def fio(uri: str, rw: str, bs: str, iodepth: int, jobs: int, runtime: float, size: int,
        extra: tuple[str, ...] = ()) -> dict[str, float]:
    """Run fio --ioengine=nbd; returns iops and MB/s (reads + writes)."""
    args = [
        "fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={iodepth}", f"--numjobs={jobs}", f"--size={size // jobs}",
        f"--offset_increment={size // jobs}", "--group_reporting", "--output-format=json",
        "--randrepeat=0", "--norandommap",
    ]
    if runtime:
        args += ["--time_based", f"--runtime={runtime}"]
    args += list(extra)
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"fio {rw} {bs} on {uri} exited {r.returncode}: "
                           f"{(r.stderr or r.stdout)[-2000:]}")
    j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    iops = j["read"]["iops"] + j["write"]["iops"]
    bw = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1e6
    return {"iops": iops, "MBps": bw}


def dd_bandwidth(directory: Path, count: int) -> float:
    """MB/s of `dd if=/dev/zero bs=1M count=N conv=fdatasync` into *directory*."""
    target = directory / "dd.bin"
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={count}", "conv=fdatasync"],
        check=True, capture_output=True,
    )
    dt = time.perf_counter() - t0
    target.unlink()
    return count * MiB / dt / 1e6


GOALS = {w: ratio_goal(w) for w in (
    "nbd-randwrite-4k", "nbd-seqwrite-1m", "nbd-randread-4k", "nbd-flush", "pit-read", "nbd-pipelined-1k")}


def seqwrite_pairs(cdpd: Cdpd, base: Path, size: int, pairs: int) -> tuple[float, float, float]:
    """1 MiB sequential writes of *size* bytes through cdpd (fio, iodepth 8, fsync at the
    end) against ``dd conv=fdatasync`` of as many bytes, in *pairs* alternating runs
    (the disk's bandwidth drifts by a third over minutes here, so each cdpd run is
    compared with the dd run just before it). Both are timed wall-clock, process start
    to durable end. Returns the medians: cdpd MB/s, dd MB/s, per-pair ratio."""
    cs, ds, rs = [], [], []
    for _ in range(pairs):
        d = dd_bandwidth(base, size // MiB)
        t0 = time.perf_counter()
        fio(cdpd.uri(), "write", "1M", 8, 1, 0, size, ("--end_fsync=1",))
        c = size / (time.perf_counter() - t0) / 1e6
        cs.append(c)
        ds.append(d)
        rs.append(c / d)
    return statistics.median(cs), statistics.median(ds), statistics.median(rs)


def _row(workload: str, cdp: float, peer: float, peer_name: str, unit: str, goal: float | None,
         ratio: float | None = None) -> dict[str, Any]:
    if ratio is None:
        ratio = cdp / peer if peer else 0.0
    return {
        "workload": workload, "cdp": round(cdp, 1), "peer": round(peer, 1), "peer_name": peer_name,
        "unit": unit, "ratio": round(ratio, 3), "goal": goal,
        "verdict": "-" if goal is None else ("pass" if ratio >= goal else "short"),
    }


def run(quick: bool = False, workloads: list[str] | None = None, scratch: Path | None = None) -> list[dict[str, Any]]:
    for tool in ("fio", "nbdkit", "dd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"nbd_bench: requires {tool} (make sysdeps)")
    want = set(workloads or ["disk", "nbd-randwrite-4k", "nbd-seqwrite-1m", "nbd-randread-4k", "nbd-flush",
                             "pit-read", "nbd-pipelined-1k"])
    runtime = 1.0 if quick else 20.0
    size = 256 * MiB if quick else 2 * GiB
    base = Path(tempfile.mkdtemp(prefix="cdp-bench-", dir=scratch or Path.cwd()))
    rows: list[dict[str, Any]] = []
    dd_mbps = dd_bandwidth(base, 256 if quick else 2048)
    if "disk" in want:
        rows.append(_row("disk", dd_mbps, dd_mbps, "dd", "MB/s", None))
    (base / "cdp").mkdir()
    cdpd = Cdpd(base / "cdp", size=f"{size // MiB}MiB", segment_bytes="256MiB", l0_max_writes=8192)
    kit = Nbdkit(base / "nbdkit.img", size)
    try:
        cdpd.start()
        for conns in (1, 4):
            if "nbd-randwrite-4k" in want:
                c = fio(cdpd.uri(), "randwrite", "4k", 32, conns, runtime, size)["iops"]
                p = fio(kit.uri(), "randwrite", "4k", 32, conns, runtime, size)["iops"]
                rows.append(_row(f"nbd-randwrite-4k x{conns}", c, p, "nbdkit file", "IOPS", GOALS["nbd-randwrite-4k"]))
        if "nbd-seqwrite-1m" in want:
            c, p, r = seqwrite_pairs(cdpd, base, size, 1 if quick else 3)
            rows.append(_row("nbd-seqwrite-1m", c, p, "dd conv=fdatasync", "MB/s",
                             GOALS["nbd-seqwrite-1m"], ratio=r))
        if "nbd-randread-4k" in want:
            # both exports fully written first, so reads hit data, not holes
            fio(cdpd.uri(), "write", "1M", 8, 1, 0, size)
            fio(kit.uri(), "write", "1M", 8, 1, 0, size)
            for conns in (1, 4):
                c = fio(cdpd.uri(), "randread", "4k", 32, conns, runtime, size)["iops"]
                p = fio(kit.uri(), "randread", "4k", 32, conns, runtime, size)["iops"]
                rows.append(_row(f"nbd-randread-4k x{conns}", c, p, "nbdkit file", "IOPS", GOALS["nbd-randread-4k"]))
        if "nbd-flush" in want:
            if "nbd-randread-4k" not in want:
                # nbdkit overwrites written blocks, as it does after the other workloads
                # (writes into holes would cost it an ext4 journal commit per flush)
                fio(kit.uri(), "write", "1M", 8, 1, 0, size)
            for every in (1, 32):
                extra = (f"--fsync={every}",)
                c = fio(cdpd.uri(), "randwrite", "4k", 32, 1, runtime, size, extra)["iops"]
                p = fio(kit.uri(), "randwrite", "4k", 32, 1, runtime, size, extra)["iops"]
                rows.append(_row(f"nbd-flush fsync={every}", c, p, "nbdkit file", "IOPS", GOALS["nbd-flush"]))
        if "pit-read" in want:
            n = 20_000 if quick else 1_000_000
            half = n // 2 * 4096
            fio(cdpd.uri(), "randwrite", "4k", 32, 1, 0, size, (f"--io_size={half}",))
            cdpd.cdpctl("snapshot", "--label", "bench-mid")
            fio(cdpd.uri(), "randwrite", "4k", 32, 1, 0, size, (f"--io_size={half}",))
            c = fio(cdpd.uri("vol0@bench-mid"), "randread", "4k", 32, 1, runtime, size)["iops"]
            p = fio(kit.uri(), "randread", "4k", 32, 1, runtime, size)["iops"]
            rows.append(_row(f"pit-read ({n} writes)", c, p, "nbdkit file (live)", "IOPS", GOALS["pit-read"]))
        if "nbd-pipelined-1k" in want:
            total = min(size, 16 * MiB if quick else GiB)
            fio(cdpd.uri(), "write", "1M", 8, 1, 0, total)
            fio(kit.uri(), "write", "1M", 8, 1, 0, total)
            c_r = read_back("127.0.0.1", cdpd.nbd_port, "vol0", total)
            p_r = read_back("127.0.0.1", kit.port, "", total)
            rows.append(_row(f"nbd-pipelined-1k (gaps {c_r.max_gap:.2f}/{p_r.max_gap:.2f} s)",
                             c_r.mb_per_s, p_r.mb_per_s, "nbdkit file", "MB/s", GOALS["nbd-pipelined-1k"]))
    finally:
        kit.stop()
        if cdpd.proc is not None:
            cdpd.stop()
        shutil.rmtree(base, ignore_errors=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    hdr = f"{'workload':<28} {'cdp':>10} {'peer':>10} {'unit':>5}  {'ratio':>6} {'goal':>5}  verdict  peer"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        goal = f"{r['goal']:.2f}" if r["goal"] is not None else "-"
        print(f"{r['workload']:<28} {r['cdp']:>10} {r['peer']:>10} {r['unit']:>5}  {r['ratio']:>6.2f} {goal:>5}  {r['verdict']:<7}  {r['peer_name']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds per workload (harness check)")
    ap.add_argument("--scratch", type=Path, help="directory for the stores (default: cwd)")
    ap.add_argument("workloads", nargs="*")
    a = ap.parse_args(argv)
    rows = run(a.quick, a.workloads or None, a.scratch)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

