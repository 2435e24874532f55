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

Detection (:func:`detection`), block evidence alone on a raw volume (as
tests/integration/test_sentinel_cdpd.py, ``bucket_seconds = "2s"``, the harness's 2 s
seal): documents (text) are written and a marker taken, then the host keeps editing
them (one 4 KiB page every :data:`EDIT_EVERY` s for :data:`EDIT_SECONDS` s, the work a
rewind to that marker loses), then an attack encrypts the documents in place at
:data:`ATTACK_RATE` (256 KiB writes, read-xor-write) while the metrics endpoint is
polled. Rows: the seconds and MiB of attack written before the alert (goal 10 s), and
how far the clean point lies before the attack's first write (goal: the write just
before it) next to what a checkpoint product hands back, the previous marker: the
host writes and seconds of work between that point and the attack, lost on a rewind.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from cdp.targets.nbd.client import NbdClient
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


#: detection: documents, their edits after the marker, the attack's pace
REGION = 256 << 10
EDIT_SECONDS = 10.0
EDIT_EVERY = 0.05
ATTACK_RATE = 16 * MiB  # bytes per second
WORDS = [b"invoice", b"report", b"customer", b"balance", b"meeting", b"the", b"and", b"of"]


def _text(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(WORDS) for _ in range(10)) + b".\n"
    return bytes(out[:n])


def _alerts_total(d: Cdpd) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics",
                                  timeout=10).read().decode()
    m = re.search(r'^cdp_sentinel_alerts_total\{volume="vol0"\} (\S+)$', body, re.M)
    return float(m.group(1)) if m else 0.0


def _info(label: str, cdp: float | None, peer: float | None, peer_name: str, unit: str,
          goal: str, verdict: str) -> dict[str, Any]:
    return {"workload": label, "cdp": None if cdp is None else round(cdp, 2),
            "peer": None if peer is None else round(peer, 2), "peer_name": peer_name,
            "unit": unit, "ratio": None, "goal": goal, "verdict": verdict}


def detection(quick: bool = False, scratch: Path | None = None) -> list[dict[str, Any]]:
    """The detection rows (see the module's docstring)."""
    docs = 64 * MiB if quick else 128 * MiB
    base = Path(tempfile.mkdtemp(prefix="cdp-bench-", dir=scratch or Path.cwd()))
    d = Cdpd(base, size=f"{2 * docs // MiB}MiB", segment_bytes="64MiB",
             extra_config='[sentinel]\nbucket_seconds = "2s"\n').start()
    try:
        rng = random.Random(21)
        n = docs // REGION
        with NbdClient.connect(d.uri()) as c:
            for i in range(n):
                c.pwrite(_text(rng, REGION), i * REGION)
            c.flush()
            marker = d.cdpctl_json("snapshot")
            mark = d.cdpctl_json("status", "-V", "vol0")["newest_marker"]
            assert marker and mark is not None
            t_end = time.monotonic() + (EDIT_SECONDS / 3 if quick else EDIT_SECONDS)
            while time.monotonic() < t_end:  # the host's work after the marker
                c.pwrite(_text(rng, 4096), rng.randrange(docs // 4096) * 4096)
                time.sleep(EDIT_EVERY)
            c.flush()
            time.sleep(2.5)  # a quiet bucket: the attack is a new burst
            st = d.cdpctl_json("status", "-V", "vol0")
            last_seq, last_ns = int(st["last_seq"]), int(st["last_time_ns"])
            t0 = time.monotonic()
            written = 0
            at_alert: float | None = None
            for i in range(n):
                old = c.pread(i * REGION, REGION)
                key = rng.randbytes(REGION)
                c.pwrite((int.from_bytes(old, "little") ^ int.from_bytes(key, "little"))
                         .to_bytes(REGION, "little"), i * REGION)
                written += REGION
                if _alerts_total(d) >= 1:
                    at_alert = written
                    break
                lag = t0 + written / ATTACK_RATE - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            c.flush()
            rate = written / max(time.monotonic() - t0, 1e-9)
            deadline = time.monotonic() + 30
            while at_alert is None and time.monotonic() < deadline:  # the documents ran out
                if _alerts_total(d) >= 1:
                    at_alert = written
                time.sleep(0.1)
            latency = time.monotonic() - t0
        alerts = d.cdpctl_json("alerts") if at_alert is not None else []
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    if not alerts:
        rows.append(_info("sentinel detection (raw volume, block evidence)", None, None, "-",
                          "s", "<= 10 s", "short"))
        return rows
    a = alerts[0]
    first = last_seq + 1  # the attack's first write
    rows.append(_info(f"sentinel detection: seconds after the attack began "
                      f"({rate / MiB:.1f} MiB/s)", latency, None, "-", "s", "<= 10 s",
                      "pass" if latency <= 10 else "short"))
    rows.append(_info("sentinel detection: attack MiB written before the alert",
                      (at_alert or 0) / MiB, docs / MiB, "documents", "MiB", "-", "-"))
    clean = int(a["first_seq"]) - 1  # clean-before-alertN: the write before the first suspect one
    lost_ns = 0 if clean >= last_seq else None  # a clean point inside the benign edits: unknown
    rows.append(_info("sentinel clean point: host writes between it and the attack",
                      last_seq - clean, last_seq - int(mark["seq"]),
                      f"previous marker ({marker['name']})", "writes",
                      "the write just before", "pass" if clean == first - 1 else "short"))
    rows.append(_info("sentinel clean point: seconds of work lost on a rewind",
                      None if lost_ns is None else lost_ns / 1e9,
                      (last_ns - int(mark["time_ns"])) / 1e9,
                      f"previous marker ({marker['name']})", "s", "-", "-"))
    return rows


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
    alerts = 0

    def fresh() -> None:
        """Both cdpd on empty stores: every byte a run writes is kept as history (a
        15 s run of 1 MiB writes keeps up to ~6 GB), so the stores start anew for each
        pair of runs, or the disk fills and fio gets ENOSPC."""
        for on in (False, True):
            d = ds.pop(on, None)
            if d is not None and d.proc is not None:
                d.stop()
            shutil.rmtree(base / str(on), ignore_errors=True)
            (base / str(on)).mkdir()
            ds[on] = Cdpd(base / str(on), size=f"{size // MiB}MiB", segment_bytes="256MiB",
                          l0_max_writes=8192,
                          extra_config=f"[sentinel]\nenabled = {str(on).lower()}\n").start()

    try:
        for name, (rw, bs, depth, metric) in WORKLOADS.items():
            got: dict[bool, list[float]] = {False: [], True: []}
            cpu: dict[bool, list[float]] = {False: [], True: []}  # cdpd CPU µs per request
            ratios = []
            for p in range(pairs):
                fresh()
                order = (False, True) if p % 2 == 0 else (True, False)
                for on in order:
                    pid = ds[on].proc.pid  # type: ignore[union-attr]
                    c0 = cpu_seconds(pid)
                    r = fio(ds[on].uri(), rw, bs, depth, 1, runtime, size)
                    ops = r["iops"] * runtime
                    cpu[on].append((cpu_seconds(pid) - c0) / ops * 1e6 if ops else 0.0)
                    got[on].append(r[metric])
                ratios.append(got[True][-1] / got[False][-1])
                alerts += len(ds[True].cdpctl_json("alerts", "--json"))
            unit = "IOPS" if metric == "iops" else "MB/s"
            rows.append(_row(name, statistics.median(got[True]), statistics.median(got[False]),
                             "sentinel off", unit, ratio_goal(name),
                             ratio=statistics.median(ratios)))
            c_on, c_off = statistics.median(cpu[True]), statistics.median(cpu[False])
            rows.append({"workload": f"{name} cdpd CPU per request", "cdp": round(c_on, 1),
                         "peer": round(c_off, 1), "peer_name": "sentinel off",
                         "unit": "µs", "ratio": round(c_off / c_on, 3) if c_on else 0.0,
                         "goal": None, "verdict": "-"})
        rows.append({"workload": "sentinel alerts during the bench", "cdp": alerts,
                     "peer": 0, "peer_name": "-", "unit": "alerts", "ratio": None,
                     "goal": None, "verdict": "pass" if not alerts else "short"})
    finally:
        for d in ds.values():
            if d.proc is not None:
                d.stop()
        shutil.rmtree(base, ignore_errors=True)
    return rows + detection(quick, scratch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds per run, 2 pairs")
    ap.add_argument("--detection", action="store_true", help="the detection rows only")
    args = ap.parse_args()
    rows = detection(args.quick) if args.detection else run(quick=args.quick)
    table = [{**r, "ratio": r["ratio"] or 0.0} for r in rows if not isinstance(r["goal"], str)]
    if table:
        print_table(table)
    info = [r for r in rows if isinstance(r["goal"], str)]
    if info:  # the detection rows: a goal in words, values that may be unknown
        print()
        hdr = f"{'detection':<62} {'cdp':>8} {'peer':>8} {'unit':>6}  {'goal':<22} verdict  peer"
        print(hdr)
        print("-" * len(hdr))
        for r in info:
            cdp, peer = ("-" if r[k] is None else r[k] for k in ("cdp", "peer"))
            print(f"{r['workload']:<62} {cdp:>8} {peer:>8} {r['unit']:>6}  {r['goal']:<22} "
                  f"{r['verdict']:<7}  {r['peer_name']}")


if __name__ == "__main__":
    main()
