"""Proxy mode vs. `nbdkit file` on the same kind of primary file, in the same run.

    python -m tools.bench.proxy_bench [--quick] [--scratch DIR] [--size BYTES] [--runtime S] [--writes-only]

Rows (goals: tools/bench/goals.py, issue 23):
- ``proxy-randwrite-4k ack=primary|both``: fio --ioengine=nbd, 4 KiB random writes,
  iodepth 32, to a proxy volume (primary = a sparse file) vs. `nbdkit file` on an
  equal file. cdp, peer (IOPS), ratio.
- ``mirror-randwrite-4k (reference)``: the same writes to a mirror volume of the same
  cdpd (journal only, no primary): what the journal path alone costs, which a proxy
  volume pays too.
- ``ack=both extra latency p50/p99``: fio completion latency (clat) percentiles in µs
  of ``ack = "both"`` minus those of ``ack = "primary"`` (what waiting for the journal's
  group commit adds), with the absolute values of both next to it.
- ``proxy-randread-4k``: 4 KiB random reads, iodepth 32, of a proxy volume whose
  primary is a file filled with data, vs. `nbdkit file` serving *the same file* (read
  once beforehand, so both sides read from the page cache).

Each I/O row also notes the server's CPU time per I/O (cdpd's, nbdkit's: all threads,
from /proc), which a machine shared with other work changes much less than IOPS; for
cdpd's write rows also the part of it its event loop (the main thread) spent.

The machine's load average is printed before and after (the two cores are shared).
``run(quick)`` returns the rows as dicts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tools.bench.goals import goal_for
from tools.bench.nbd_bench import Nbdkit
from tools.harness import Cdpd, listening_port

MiB = 1 << 20
GiB = 1 << 30


def fio_clat(uri: str, runtime: float, size: int, extra: tuple[str, ...] = (),
             rw: str = "randwrite") -> dict[str, float]:
    """4 KiB random I/O (*rw*) at iodepth 32: IOPS and clat percentiles (µs)."""
    args = [
        "fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
        "--iodepth=32", "--numjobs=1", f"--size={size}", "--output-format=json",
        "--randrepeat=0", "--norandommap", "--time_based", f"--runtime={runtime}",
        "--percentile_list=50:99:99.9", *extra,
    ]
    r = subprocess.run(args, capture_output=True, text=True, check=True)
    w = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["read" if "read" in rw else "write"]
    pct = w["clat_ns"].get("percentile", {})

    def p(k: str) -> float:
        return float(pct.get(k, 0.0)) / 1000.0

    return {"iops": float(w["iops"]), "ios": float(w["total_ios"]), "p50": p("50.000000"),
            "p99": p("99.000000"), "p999": p("99.900000")}


def cpu_seconds(pid: int, tid: int = 0) -> float:
    """User + system CPU time of process *pid*, all its threads (/proc/PID/stat), or of
    its thread *tid* alone (/proc/PID/task/TID/stat; the main thread's tid is *pid*)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio_cpu(pid: int, uri: str, runtime: float, size: int, rw: str = "randwrite") -> dict[str, float]:
    """:func:`fio_clat`, plus ``cpu_us``: the server's (*pid*) CPU time per I/O in µs,
    which a busy machine changes much less than IOPS, and ``loop_us``: the part of it
    spent by the main thread (cdpd's event loop; the rest is worker threads)."""
    c0, m0 = cpu_seconds(pid), cpu_seconds(pid, pid)
    r = fio_clat(uri, runtime, size, rw=rw)
    n = max(r["ios"], 1.0)
    r["cpu_us"] = (cpu_seconds(pid) - c0) / n * 1e6
    r["loop_us"] = (cpu_seconds(pid, pid) - m0) / n * 1e6
    return r


def _row(workload: str, cdp: float, peer: float, peer_name: str, unit: str, note: str = "") -> dict[str, Any]:
    ratio = cdp / peer if peer else 0.0
    g = goal_for(workload)
    goal = g.value if g is not None and g.kind == "ratio" else None
    return {"workload": workload, "cdp": round(cdp, 1), "peer": round(peer, 1), "peer_name": peer_name,
            "unit": unit, "ratio": round(ratio, 3), "goal": goal,
            "verdict": "-" if goal is None else ("pass" if ratio >= goal else "short"), "note": note}


def fill(path: Path, size: int) -> None:
    """Write *size* bytes of non-zero data to *path* (1 MiB pieces), then read it once
    so it sits in the page cache."""
    piece = bytes(range(256)) * (MiB // 256)
    with open(path, "wb") as f:
        for pos in range(0, size, MiB):
            f.write(memoryview(piece)[: min(MiB, size - pos)])
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def _nbdkit(path: Path) -> subprocess.Popen[bytes]:
    """`nbdkit file` over an existing *path* (not truncated), on a loopback port."""
    return subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", "0", "file", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run(quick: bool = False, scratch: Path | None = None, size: int = 0, runtime: float = 0.0,
        reads: bool = True) -> list[dict[str, Any]]:
    """The rows; *size* (bytes per primary) and *runtime* (s per workload) default to
    2 GiB and 20 s (quick: 256 MiB, 3 s); without *reads*, the write rows only."""
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"proxy_bench: requires {tool} (make sysdeps)")
    runtime = runtime or (3.0 if quick else 20.0)
    size = size or (256 * MiB if quick else 2 * GiB)
    base = Path(tempfile.mkdtemp(prefix="cdp-proxy-bench-", dir=scratch or Path.cwd()))
    rows: list[dict[str, Any]] = []
    cdpd = Cdpd(base, size="16MiB", segment_bytes="256MiB", l0_max_writes=8192)
    kit = Nbdkit(base / "nbdkit.img", size)
    reader: subprocess.Popen[bytes] | None = None
    print(f"load average before: {load()}", file=sys.stderr)
    try:
        cdpd.start()
        assert cdpd.proc is not None
        cdpd_pid = cdpd.proc.pid
        res: dict[str, dict[str, float]] = {}
        for ack in ("primary", "both"):
            prim = base / f"primary-{ack}.img"
            with open(prim, "wb") as f:
                f.truncate(size)
            cdpd.cdpctl("volume", "create", f"p{ack}", "--mode", "proxy", "--primary", str(prim),
                        "--no-initial-copy", "--ack", ack)
            res[ack] = fio_cpu(cdpd_pid, cdpd.uri(f"p{ack}"), runtime, size)
        cdpd.cdpctl("volume", "create", "mirror", "--size", str(size))
        mirror = fio_cpu(cdpd_pid, cdpd.uri("mirror"), runtime, size)
        peer = fio_cpu(kit.proc.pid, kit.uri(), runtime, size)
        rows.append(_row("mirror-randwrite-4k (reference)", mirror["iops"], peer["iops"], "nbdkit file", "IOPS",
                         f"CPU µs/write cdp {mirror['cpu_us']:.0f} (loop {mirror['loop_us']:.0f}), "
                         f"nbdkit {peer['cpu_us']:.0f}"))
        for ack in ("primary", "both"):
            rows.append(_row(f"proxy-randwrite-4k ack={ack}", res[ack]["iops"], peer["iops"], "nbdkit file", "IOPS",
                             f"CPU µs/write cdp {res[ack]['cpu_us']:.0f} (loop {res[ack]['loop_us']:.0f}), "
                             f"nbdkit {peer['cpu_us']:.0f}"))
        for k in ("p50", "p99"):
            extra = res["both"][k] - res["primary"][k]
            rows.append(_row(
                f"ack=both extra clat {k}", extra, res["primary"][k], "ack=primary clat", "µs",
                f"both {res['both'][k]:.0f} µs, primary {res['primary'][k]:.0f} µs, nbdkit {peer[k]:.0f} µs",
            ))
        if not reads:
            return rows
        data = base / "data.img"
        fill(data, size)
        reader = _nbdkit(data)
        port = listening_port(reader, "nbdkit")
        cdpd.cdpctl("volume", "create", "pread", "--mode", "proxy", "--primary", str(data),
                    "--no-initial-copy")
        c = fio_cpu(cdpd_pid, cdpd.uri("pread"), runtime, size, rw="randread")
        p = fio_cpu(reader.pid, f"nbd://127.0.0.1:{port}/", runtime, size, rw="randread")
        rows.append(_row("proxy-randread-4k", c["iops"], p["iops"], "nbdkit file (same file)", "IOPS",
                         f"clat p50/p99 {c['p50']:.0f}/{c['p99']:.0f} µs, nbdkit {p['p50']:.0f}/{p['p99']:.0f} µs; "
                         f"CPU µs/read cdp {c['cpu_us']:.0f}, nbdkit {p['cpu_us']:.0f}"))
    finally:
        print(f"load average after: {load()}", file=sys.stderr)
        if reader is not None:
            reader.terminate()
            reader.wait(10)
        kit.stop()
        if cdpd.proc is not None:
            cdpd.stop()
        shutil.rmtree(base, ignore_errors=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    hdr = f"{'workload':<32} {'cdp':>10} {'peer':>10} {'unit':>5}  {'ratio':>6} {'goal':>6} {'':>5}  peer / note"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        tail = r["peer_name"] + (f"  ({r['note']})" if r["note"] else "")
        goal = f"{r['goal']:.2f}" if r["goal"] is not None else "-"
        print(f"{r['workload']:<32} {r['cdp']:>10} {r['peer']:>10} {r['unit']:>5}  {r['ratio']:>6.2f} "
              f"{goal:>6} {r['verdict']:>5}  {tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds per workload (harness check)")
    ap.add_argument("--scratch", type=Path, help="directory for the store and primaries (default: cwd)")
    ap.add_argument("--size", type=int, default=0, help="bytes per primary file (default 2 GiB)")
    ap.add_argument("--runtime", type=float, default=0.0, help="seconds per workload (default 20)")
    ap.add_argument("--writes-only", action="store_true", help="skip the read row")
    a = ap.parse_args(argv)
    print_table(run(a.quick, a.scratch, a.size, a.runtime, reads=not a.writes_only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
