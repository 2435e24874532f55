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
- **Rate**: a backlog is shipped with ``--rate R``; the bytes the source sends per
  second (``cdp_replication_sent_bytes_total``) in a window in the middle, over R
  (goal: >= 0.90, and never above 1.05).
- **Catch-up after an outage**: replication is stopped while fio writes 4 KiB random
  at full speed for 60 s (10 s with ``--quick``), then started with ``--rate R``; the
  time to caught up against ``bytes behind / R`` (the link's own limit): ratio
  expected / measured (goal >= 0.90); also in seconds per GiB behind.
- **Control rows, on tmpfs** (``--tmpfs``; marked ``tmpfs:``): the 1 MiB rows again with
  the target's store on /dev/shm, then with both stores there. They show the share of
  the disk: with replication on, every byte is fdatasync'ed on the source (it ships only
  durable records) and again on the target, on the same disk here.

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

from cdp.admin import AdminClient
from cdp.config import SOCKET_NAME
from cdp.targets.nbd.client import NbdClient
from tools.bench.nbd_bench import _row, fio, print_table
from tools.harness import Cdpd

SIZE = 1 << 30
SECRET = b"replication-bench-secret-0123456789"
#: seconds a cdpd may take to start (the machine is shared: a loaded one is slow)
START_TIMEOUT = 120.0


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


_WORKLOADS = {"4k": ("randwrite", "4k", 32, "iops"), "1m": ("write", "1M", 8, "MBps")}


class _Pair:
    """A source and a target cdpd in ``s_dir`` / ``t_dir``, vol0 replicating to rep0."""

    def __init__(self, s_dir: Path, t_dir: Path) -> None:
        self.secret = s_dir / "secret"
        self.secret.write_bytes(SECRET)
        os.chmod(self.secret, 0o600)
        self.t_dir = t_dir
        self.src = Cdpd(s_dir, size="1GiB", segment_bytes="64MiB",
                        extra_config=f'\n[replication]\nsecret_file = "{self.secret}"\n')

    def __enter__(self) -> _Pair:
        self.src.start(START_TIMEOUT)
        for attempt in range(5):  # a free port may be taken before the target binds it
            self.to = f"127.0.0.1:{_free_port()}"
            self.tgt = Cdpd(self.t_dir, size="1GiB", segment_bytes="64MiB", extra_config=(
                f'\n[replication]\nlisten = "{self.to}"\nsecret_file = "{self.secret}"\n'))
            try:
                self.tgt.start(START_TIMEOUT)
                break
            except RuntimeError as e:
                if self.tgt.proc is not None and self.tgt.proc.poll() is None:
                    self.tgt.stop()
                if "address already in use" not in str(e) or attempt == 4:
                    self.src.stop()
                    raise
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.src.stop()
        self.tgt.stop()

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        """``op`` through the source's admin socket (what cdpctl sends, without a
        process start: seconds on a loaded machine, which the timed rows would count)."""
        client = AdminClient(self.src.store / SOCKET_NAME)
        try:
            return client.call(op, args)
        finally:
            client.close()

    def start(self, rate: int = 0) -> None:
        self._call("replicate_start", {"volume": "vol0", "to": self.to, "as": "rep0",
                                       "rate": str(rate)})

    def stop(self) -> None:
        self._call("replicate_stop", {"volume": "vol0", "to": self.to})


def _apply_vs_ingest(pair: _Pair, wl: str, fio_secs: float, label: str = "") -> dict[str, Any]:
    rw, bs, depth, unit = _WORKLOADS[wl]
    t0 = time.monotonic()
    res = fio(pair.src.uri(), rw, bs, depth, 1, fio_secs, SIZE)
    t1 = time.monotonic()
    t2 = _wait_caught_up(pair.src)
    ratio = (t1 - t0) / (t2 - t0)
    return _row(f"{label}repl-apply-vs-ingest-{wl}", res[unit] * ratio, res[unit],
                "source ingest", unit, 0.90, ratio=ratio)


def _on_vs_off(pair: _Pair, wl: str, fio_secs: float, pairs: int, label: str = "") -> dict[str, Any]:
    rw, bs, depth, unit = _WORKLOADS[wl]
    on: list[float] = []
    off: list[float] = []
    for i in range(pairs):
        for state in (("off", "on") if i % 2 == 0 else ("on", "off")):
            if state == "off":
                pair.stop()
            else:
                pair.start()
                _wait_caught_up(pair.src)
            (on if state == "on" else off).append(
                fio(pair.src.uri(), rw, bs, depth, 1, fio_secs, SIZE)[unit])
        pair.start()
        _wait_caught_up(pair.src)
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    return _row(f"{label}repl-ingest-on-vs-off-{wl}", statistics.median(on),
                statistics.median(off), "replication off", unit, 0.85,
                ratio=statistics.median(ratios))


def _rate_use(pair: _Pair, rate: int, secs: float) -> dict[str, Any]:
    """Ship a backlog of about 2.5 x ``secs`` x ``rate`` with ``--rate``: bytes sent per
    second in the middle window over the rate."""
    pair.stop()
    backlog = int(rate * secs * 2.5)
    fio(pair.src.uri(), "write", "1M", 8, 1, 0, SIZE, (f"--io_size={backlog}",))
    pair.start(rate)
    time.sleep(secs * 0.5)
    b0, t0 = _metric(pair.src, "cdp_replication_sent_bytes_total"), time.monotonic()
    time.sleep(secs)
    b1, t1 = _metric(pair.src, "cdp_replication_sent_bytes_total"), time.monotonic()
    got = (b1 - b0) / (t1 - t0)
    _wait_caught_up(pair.src)
    pair.start(0)
    return _row("repl-rate-link-use", got / (1 << 20), rate / (1 << 20), "--rate (<=1.05)",
                "MiBps", 0.90)


def _catch_up(pair: _Pair, rate: int, outage: float) -> list[dict[str, Any]]:
    """Replication stopped for ``outage`` seconds of full-speed 4 KiB random writes,
    then started with ``--rate``: time to caught up against bytes behind / rate."""
    pair.stop()
    fio(pair.src.uri(), "randwrite", "4k", 32, 1, outage, SIZE)
    b0 = _metric(pair.src, "cdp_replication_sent_bytes_total")
    t0 = time.monotonic()
    pair.start(rate)
    t1 = _wait_caught_up(pair.src, timeout=3600)
    behind = _metric(pair.src, "cdp_replication_sent_bytes_total") - b0
    pair.start(0)
    took, want = t1 - t0, behind / rate
    return [_row("repl-catchup-after-outage", took, want, "bytes behind / rate", "s", 0.90,
                 ratio=want / took if took else 0.0),
            _row("repl-catchup-s-per-gib", took / (behind / (1 << 30)) if behind else 0.0,
                 (1 << 30) / rate, "1 GiB / rate", "s", None)]


def run(quick: bool = False, scratch: Path | None = None, tmpfs: bool = False
        ) -> list[dict[str, Any]]:
    secs = 3.0 if quick else 20.0
    fio_secs = 2 if quick else 10
    pairs = 1 if quick else 2
    # --rate of the rate and catch-up rows: well below what the target applies on this
    # machine, so that the link limit is what is measured, not the target
    link = (4 if quick else 16) << 20
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        base = Path(tmp)
        for d in ("s", "t"):
            (base / d).mkdir()
        with _Pair(base / "s", base / "t") as pair:
            src = pair.src
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
            for wl in _WORKLOADS:
                rows.append(_apply_vs_ingest(pair, wl, fio_secs))
            # source ingest with replication on vs off, alternated
            for wl in _WORKLOADS:
                rows.append(_on_vs_off(pair, wl, fio_secs, pairs))
            rows.append(_rate_use(pair, link, 4.0 if quick else 10.0))
            rows += _catch_up(pair, link, 10.0 if quick else 60.0)
    if tmpfs:  # control rows: how much of the 1 MiB rows is the disk
        for label, on_shm in (("tmpfs:t ", ("t",)), ("tmpfs:st ", ("s", "t"))):
            with tempfile.TemporaryDirectory(dir=scratch) as tmp, \
                    tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
                dirs = {k: (Path(shm) if k in on_shm else Path(tmp)) / k for k in ("s", "t")}
                for path in dirs.values():
                    path.mkdir()
                with _Pair(dirs["s"], dirs["t"]) as pair:
                    _wait_caught_up(pair.src)
                    rows.append(_apply_vs_ingest(pair, "1m", fio_secs, label))
                    rows.append(_on_vs_off(pair, "1m", fio_secs, pairs, label))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few seconds per measurement")
    ap.add_argument("--scratch", type=Path, help="directory for the stores (default: /tmp)")
    ap.add_argument("--tmpfs", action="store_true",
                    help="also the 1 MiB rows with stores on /dev/shm (control rows)")
    args = ap.parse_args(argv)
    print_table(run(args.quick, args.scratch, args.tmpfs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
