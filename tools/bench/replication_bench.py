"""Replication (issue 20, docs/REPLICATION.md): two cdpd on this machine, the source
replicating vol0 to the target over loopback.

    python -m tools.bench.replication_bench [--quick]

- **RPO**: a paced NBD writer (cdp's own client) issues 2,000 random 4 KiB writes/s for
  a while; the source's ``cdp_replication_lag_seconds`` is sampled from its metrics page
  every 50 ms: p50, p99, max (goal p99 <= 2 s, aim 1 s).
- **Throughput**: fio (nbd engine) writes at full speed for a while (4 KiB random,
  iodepth 32; 1 MiB sequential, iodepth 8) with replication on; the target's durable
  apply rate is the bytes written over the time until the target acknowledged the
  last record (both clocks start with fio); ratio apply / ingest (goal >= 0.90).
- **Ingest on vs off**: the same fio runs with replication stopped and running,
  alternated; ratio on / off (goal >= 0.85).

Numbers come from a shared 2-core machine (other work may be running): ratios of runs
made back to back matter, absolute numbers less.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from cdp.targets.nbd.client import NbdClient
from tools.bench.nbd_bench import _row, fio, print_table
from tools.harness import Cdpd

SIZE = 1 << 30
SECRET = b"replication-bench-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(d: Cdpd, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def _paced_writes(uri: str, rate: int, seconds: float, stop: threading.Event) -> int:
    """``rate`` random 4 KiB writes per second for ``seconds``; how many were written."""
    rng = random.Random(1)
    c = NbdClient.connect(uri, window=32)
    n = 0
    t0 = time.monotonic()
    buf = os.urandom(1 << 16)
    try:
        while not stop.is_set():
            now = time.monotonic() - t0
            if now >= seconds:
                break
            due = int(now * rate)
            while n < due:
                off = rng.randrange(0, SIZE >> 12) << 12
                k = (n * 4096) % ((1 << 16) - 4096)
                c.pwrite(buf[k:k + 4096], off)
                n += 1
            c.drain()
            time.sleep(0.002)
        c.flush()
    finally:
        c.close()
    return n


def _wait_caught_up(src: Cdpd, timeout: float = 600) -> float:
    """Monotonic time at which the target had acknowledged everything."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _metric(src, "cdp_replication_lag_records") == 0:
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError("the target did not catch up")


def run(quick: bool = False, scratch: Path | None = None) -> list[dict[str, Any]]:
    secs = 3.0 if quick else 20.0
    fio_secs = 2 if quick else 10
    pairs = 1 if quick else 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        base = Path(tmp)
        secret = base / "secret"
        secret.write_bytes(SECRET)
        os.chmod(secret, 0o600)
        port = _free_port()
        to = f"127.0.0.1:{port}"
        for d in ("s", "t"):
            (base / d).mkdir()
        src = Cdpd(base / "s", size="1GiB", segment_bytes="64MiB",
                   extra_config=f'\n[replication]\nsecret_file = "{secret}"\n')
        tgt = Cdpd(base / "t", size="1GiB", segment_bytes="64MiB", extra_config=(
            f'\n[replication]\nlisten = "{to}"\nsecret_file = "{secret}"\n'))
        src.start()
        tgt.start()
        try:
            src.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
            _wait_caught_up(src)

            # RPO at 2,000 4 KiB writes/s
            lags: list[float] = []
            stop = threading.Event()
            done: list[int] = []
            w = threading.Thread(target=lambda: done.append(
                _paced_writes(src.uri(), 2000, secs, stop)))
            t0 = time.monotonic()
            w.start()
            while w.is_alive():
                lags.append(_metric(src, "cdp_replication_lag_seconds"))
                time.sleep(0.05)
            w.join()
            rate = done[0] / (time.monotonic() - t0) if done else 0.0
            _wait_caught_up(src)
            q = statistics.quantiles(lags, n=100) if len(lags) >= 2 else [0.0] * 99
            for name, v in (("p50", q[49]), ("p99", q[98]), ("max", max(lags))):
                rows.append(_row(f"repl-rpo-lag-{name}", v, 2.0, "2 s goal", "s",
                                 None if name != "p99" else 1.0, ratio=2.0 / v if v else 99.0))
            rows.append(_row("repl-rpo-writes-per-s", rate, 2000, "offered", "op/s", None))

            # throughput: the target's durable apply rate vs the source's ingest
            for wl, (rw, bs, depth, unit) in {"4k": ("randwrite", "4k", 32, "iops"),
                                                "1m": ("write", "1M", 8, "MBps")}.items():
                t0 = time.monotonic()
                res = fio(src.uri(), rw, bs, depth, 1, fio_secs, SIZE)
                t1 = time.monotonic()
                t2 = _wait_caught_up(src)
                ratio = (t1 - t0) / (t2 - t0)
                rows.append(_row(f"repl-apply-vs-ingest-{wl}", res[unit] * ratio, res[unit],
                                 "source ingest", unit, 0.90, ratio=ratio))

            # source ingest with replication on vs off, alternated
            for wl, (rw, bs, depth, unit) in {"4k": ("randwrite", "4k", 32, "iops"),
                                                "1m": ("write", "1M", 8, "MBps")}.items():
                on: list[float] = []
                off: list[float] = []
                for i in range(pairs):
                    for state in (("off", "on") if i % 2 == 0 else ("on", "off")):
                        if state == "off":
                            src.cdpctl("replicate", "stop", "-V", "vol0")
                        else:
                            src.cdpctl("replicate", "start", "-V", "vol0", "--to", to)
                            _wait_caught_up(src)
                        (on if state == "on" else off).append(
                            fio(src.uri(), rw, bs, depth, 1, fio_secs, SIZE)[unit])
                    src.cdpctl("replicate", "start", "-V", "vol0", "--to", to)
                    _wait_caught_up(src)
                ratios = [a / b for a, b in zip(on, off, strict=True)]
                rows.append(_row(f"repl-ingest-on-vs-off-{wl}", statistics.median(on),
                                 statistics.median(off), "replication off", unit, 0.85,
                                 ratio=statistics.median(ratios)))
        finally:
            src.stop()
            tgt.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few seconds per measurement")
    ap.add_argument("--scratch", type=Path, help="directory for the stores (default: /tmp)")
    args = ap.parse_args(argv)
    print_table(run(args.quick, args.scratch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
