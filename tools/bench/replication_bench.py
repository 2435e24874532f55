"""Replication (issue 20, docs/REPLICATION.md): two cdpd on this machine, the source
replicating vol0 to the target over loopback.

    python -m tools.bench.replication_bench [--quick] [--tmpfs] [--rig split|unsplit|both]

- **RPO**: a paced NBD writer (cdp's own client) issues 2,000 random 4 KiB writes/s for
  a while; the source's ``cdp_replication_lag_seconds`` is sampled from its metrics page
  every 50 ms: p50, p99, max (goal p99 <= 2 s, aim 1 s).
- **Throughput**: fio (nbd engine) writes at full speed for a while (4 KiB random,
  iodepth 32; 1 MiB sequential, iodepth 8) with replication on; the target's durable
  apply rate is the bytes written over the time until the target acknowledged the
  last record (both clocks start with fio); ratio apply / ingest (goal >= 0.90).
- **Ingest on vs off**: the same fio runs with replication stopped and running,
  alternated; ratio on / off (goal >= 0.85). Beside it the source cdpd's CPU (all
  threads, user + system, from ``/proc/PID/stat``) per write in each arm, the "on" arm
  counted until the target acknowledged the run: what shipping costs the source, less
  sensitive to the machine's load than throughput (ratio off / on).
- **Rate**: a backlog is shipped with ``--rate R``; the bytes the source sends per
  second (``cdp_replication_sent_bytes_total``) in a window in the middle, over R
  (goal: >= 0.90, and never above 1.05).
- **Catch-up after an outage**: replication is stopped while fio writes 4 KiB random
  at full speed for 60 s (10 s with ``--quick``), then started with ``--rate R``; the
  time to caught up against ``bytes behind / R`` (the link's own limit): ratio
  expected / measured (goal >= 0.90); also in seconds per GiB behind.
- **Disk** (control row): 1 GiB written by ``dd conv=fdatasync`` beside the stores, in
  MB/s: the most a store can make durable per second (with replication on, the source
  ships only durable records, so its fdatasyncs bound the apply rate, and the target
  writes the same bytes again on the same disk here).
- **Control rows, on tmpfs** (``--tmpfs``; marked ``tmpfs:``): the 1 MiB rows again with
  the target's store on /dev/shm, then with both stores there. They show the share of
  the disk: with replication on, every byte is fdatasync'ed on the source (it ships only
  durable records) and again on the target, on the same disk here. Every byte written
  is kept as history (by both stores: the "off" runs are shipped when replication
  starts again), so each fio run of these rows is capped (``--io_size``): the runs
  of one store pair together write at most :data:`TMPFS_SHARE` of what /dev/shm has
  free when the rows start, and one run never more than :data:`TMPFS_RUN_CAP`; a run
  that reaches its cap ends early (its rate is what it wrote in its time). Each pair's
  stores are removed before the next pair starts.

- **Control store for the apply rows** (``--control-store DIR``, e.g. ``/dev/shm/NAME``;
  rows marked ``control:t[FSTYPE]``): the apply rows (the ``--sizes``) again with the
  target's store under DIR (the source's stays on the disk): in production the target
  has its own disk, here it shares the source's, and this row shows what the target
  applies when it does not. Capped like the ``--tmpfs`` rows: each fio run writes at
  most :data:`TMPFS_SHARE` of DIR's free space over the runs, :data:`TMPFS_RUN_CAP` a
  run (``--io_size``; a capped run ends early, its rate is what it wrote in its time);
  the target's store is removed afterwards.

- **Fresh stores** (``--fresh 1m``): every fio run of the apply and on/off rows (and
  of the ``--control-store`` rows) of the named workloads on a store pair of its own, made for it and removed
  after it, so that a run may write up to ``--cap`` (e.g. ``2500MiB``: each store
  under 3 GB) and still no store holds more than that run: at 1 MiB the runs then
  last seconds, not the 1.2-2 s that capped runs on one pair for the whole row did.
  The apply rows make ``--pairs`` runs, the on/off rows ``--pairs`` alternated pairs
  (off then on, then on then off, ...); each row is the median, and its range
  (min-max of the runs' ratios) is printed as a ``# range`` line. A pair costs two
  cdpd starts (seconds), outside the timed runs.

- **The rig: split cores** (``--rig split``, the default with 2 or more cores): in
  production the target is another appliance at another site, but here both cdpd run
  on one machine, so without care the target takes cores from the source. Split, the
  source cdpd, fio, the paced writer and this script run on one set of cores and the
  target cdpd on the others (``os.sched_setaffinity`` of every thread of each process,
  ``/proc/PID/task/*``; threads started later inherit it), for every row, the
  replication-off arm included (the target then idles on its own cores, as a remote
  one would). ``--rig unsplit`` gives the old numbers (everything on every core);
  ``--rig both`` runs the rows under each, rows labelled ``split:`` / ``unsplit:``.
  What the split cannot separate is the disk (both stores share it) and the kernel's
  own work (loopback TCP, writeback); the ``--tmpfs`` rows show the disk's share.

Numbers come from a shared 2-core machine (other work may be running): ratios of runs
made back to back matter, absolute numbers less.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.admin import AdminClient
from cdp.config import SOCKET_NAME
from cdp.targets.nbd.client import NbdClient
from cdp.units import parse_size
from tools.bench.nbd_bench import _row, fio, print_table
from tools.bench.sysdeps import fs_type
from tools.harness import Cdpd

SIZE = 1 << 30
SECRET = b"replication-bench-secret-0123456789"
#: seconds a cdpd may take to start (the machine is shared: a loaded one is slow)
START_TIMEOUT = 120.0
#: bytes one fio run of the ``--tmpfs`` rows writes at most (stores on /dev/shm)
TMPFS_RUN_CAP = 2 << 30
#: the share of /dev/shm's free space the runs of one ``--tmpfs`` store pair may fill
TMPFS_SHARE = 0.4
#: the ``--tmpfs`` rows are skipped when a run could write less than this
TMPFS_MIN_RUN = 64 << 20
#: bytes one fio run of the apply and on/off rows writes at most (``--cap``; None: no
#: cap). Every byte written stays in both stores' history (no retention here): at
#: 1 MiB a 5 s run writes ~3-4 GB into each, and a run with ``--pairs 2`` makes five
#: such runs on one pair of stores; a capped run ends early (its rate is what it wrote
#: in its time), so the apply ratio's tail (the last commit and ACK) weighs more.
RUN_CAP: int | None = None


#: the workloads (``_WORKLOADS`` keys) whose apply, on/off and control runs are each
#: on a store pair of their own (``--fresh``; the others share one pair per row group)
FRESH: frozenset[str] = frozenset()
#: runs of each apply row with ``--fresh`` (``--pairs``)
FRESH_RUNS = 2


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


@dataclass(frozen=True)
class Rig:
    """Which cores each side runs on: ``source`` (the source cdpd, fio, the paced writer
    and this script) and ``target`` (the target cdpd); both None: unsplit."""

    source: frozenset[int] | None = None
    target: frozenset[int] | None = None

    @property
    def label(self) -> str:
        return "split" if self.source is not None else "unsplit"

    def describe(self) -> str:
        if self.source is None or self.target is None:
            return (f"unsplit: both cdpd, fio and this script on every core "
                    f"{sorted(os.sched_getaffinity(0))}")
        return (f"split: source cdpd + fio + this script on cores {sorted(self.source)}, "
                f"target cdpd on cores {sorted(self.target)}")


def split_rig(cores: set[int] | None = None) -> Rig:
    """The split rig on ``cores`` (default: the cores this process may use): the source
    side gets the first half (the larger one when odd: it runs fio too), the target the
    rest. Unsplit (``Rig()``) with fewer than 2 cores."""
    cs = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cs) < 2:
        return Rig()
    half = (len(cs) + 1) // 2
    return Rig(frozenset(cs[:half]), frozenset(cs[half:]))


def pin(pid: int, cpus: frozenset[int]) -> set[int]:
    """Every thread of process ``pid`` onto ``cpus`` (threads it starts later inherit
    their creator's affinity); returns the cores its threads now have (to print).
    Looks again until no thread appeared meanwhile."""
    done: set[int] = set()
    while True:
        tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")} - done
        if not tids:
            break
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):  # a thread that ended
                os.sched_setaffinity(tid, cpus)
            done.add(tid)
    got: set[int] = set()
    for t in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            got |= os.sched_getaffinity(int(t))
    if not got <= cpus:
        raise RuntimeError(f"pid {pid}: threads on cores {sorted(got)}, wanted {sorted(cpus)}")
    return got


@contextmanager
def on_source_cores(rig: Rig) -> Iterator[None]:
    """This script's thread (and so the fio and cdpd it starts, and its threads) on the
    source's cores for the duration."""
    if rig.source is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, rig.source)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


#: the row groups (``--rows``)
ROWS = ("disk", "rpo", "apply", "onoff", "rate", "catchup")
_WORKLOADS = {"4k": ("randwrite", "4k", 32, "iops"), "1m": ("write", "1M", 8, "MBps")}


class _Pair:
    """A source and a target cdpd in ``s_dir`` / ``t_dir``, vol0 replicating to rep0."""

    def __init__(self, s_dir: Path, t_dir: Path, rig: Rig | None = None,
                 ship_window: str | None = None) -> None:
        self.rig = rig or Rig()
        self.secret = s_dir / "secret"
        self.secret.write_bytes(SECRET)
        os.chmod(self.secret, 0o600)
        self.t_dir = t_dir
        win = "" if ship_window is None else f'ship_window = "{ship_window}"\n'
        self.src = Cdpd(s_dir, size="1GiB", segment_bytes="64MiB",
                        extra_config=f'\n[replication]\nsecret_file = "{self.secret}"\n{win}')

    def __enter__(self) -> _Pair:
        self.src.start(START_TIMEOUT)
        self._pin(self.src, self.rig.source, "source")
        for attempt in range(5):  # a free port may be taken before the target binds it
            self.to = f"127.0.0.1:{_free_port()}"
            self.tgt = Cdpd(self.t_dir, size="1GiB", segment_bytes="64MiB", extra_config=(
                f'\n[replication]\nlisten = "{self.to}"\nsecret_file = "{self.secret}"\n'))
            try:
                self.tgt.start(START_TIMEOUT)
                self._pin(self.tgt, self.rig.target, "target")
                break
            except RuntimeError as e:
                if self.tgt.proc is not None and self.tgt.proc.poll() is None:
                    self.tgt.stop()
                if "address already in use" not in str(e) or attempt == 4:
                    self.src.stop()
                    raise
        self.start()
        return self

    @staticmethod
    def _pin(d: Cdpd, cpus: frozenset[int] | None, side: str) -> None:
        if cpus is None or d.proc is None:
            return
        got = pin(d.proc.pid, cpus)
        print(f"# {side} cdpd pid {d.proc.pid}: {len(os.listdir(f'/proc/{d.proc.pid}/task'))} "
              f"threads on cores {sorted(got)}", flush=True)

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


def _rpo(pair: _Pair, secs: float) -> list[dict[str, Any]]:
    """``cdp_replication_lag_seconds`` sampled every 50 ms under 2,000 paced 4 KiB
    writes/s for ``secs``: p50, p99, max, and the write rate reached."""
    src = pair.src
    lags: list[float] = []
    stop = threading.Event()
    done: list[int] = []
    w = threading.Thread(target=lambda: done.append(_paced_writes(src.uri(), 2000, secs, stop)))
    t0 = time.monotonic()
    w.start()
    while w.is_alive():
        lags.append(_metric(src, "cdp_replication_lag_seconds"))
        time.sleep(0.05)
    w.join()
    rate = done[0] / (time.monotonic() - t0) if done else 0.0
    _wait_caught_up(src)
    q = statistics.quantiles(lags, n=100) if len(lags) >= 2 else [0.0] * 99
    rows = [_row(f"repl-rpo-lag-{name}", v, 2.0, "2 s goal", "s",
                 None if name != "p99" else 1.0, ratio=2.0 / v if v else 99.0)
            for name, v in (("p50", q[49]), ("p99", q[98]), ("max", max(lags)))]
    rows.append(_row("repl-rpo-writes-per-s", rate, 2000, "offered", "op/s", None))
    return rows


def _disk(scratch: Path, mib: int) -> dict[str, Any]:
    """The disk the stores are on: ``mib`` MiB written by dd and fdatasync'ed, in MB/s
    (what a store can make durable at most; both cdpd share it here)."""
    path = scratch / "dd.bin"
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}",
                    "conv=fdatasync", "status=none"], check=True)
    mbps = mib * (1 << 20) / 1e6 / (time.monotonic() - t0)
    path.unlink()
    return _row("repl-disk-dd-fdatasync-1m", mbps, mbps, "dd conv=fdatasync", "MB/s", None)


def _fio(uri: str, wl: str, secs: float, cap: int | None) -> dict[str, float]:
    """fio's ``wl`` for ``secs`` seconds, ending early after ``cap`` bytes (None: no
    cap). A capped run is not ``time_based`` (fio then loops over the region and no
    byte limit holds): ``--io_size`` bounds it and ``--runtime`` still ends it."""
    rw, bs, depth, _unit = _WORKLOADS[wl]
    if cap is None:
        return fio(uri, rw, bs, depth, 1, secs, SIZE)
    return fio(uri, rw, bs, depth, 1, 0, SIZE, (f"--io_size={cap}", f"--runtime={secs}"))


def _capped(cap: int | None) -> int | None:
    """A run's cap: ``cap`` (a row's own), and ``--cap`` (:data:`RUN_CAP`), the smaller."""
    if cap is None or RUN_CAP is None:
        return RUN_CAP if cap is None else cap
    return min(cap, RUN_CAP)


def tmpfs_run_cap(free: int, pairs: int) -> int:
    """Bytes one fio run of the ``--tmpfs`` rows may write, with ``free`` bytes free on
    /dev/shm: a store pair runs one apply row and ``pairs`` on/off pairs (``1 + 2 *
    pairs`` runs), every run's bytes kept by the source and shipped to the target, so
    with both stores there ``2 + 4 * pairs`` copies; together under :data:`TMPFS_SHARE`
    of ``free``, one under :data:`TMPFS_RUN_CAP`."""
    copies = 2 + 4 * pairs
    return min(TMPFS_RUN_CAP, int(free * TMPFS_SHARE) // copies)


def _apply_vs_ingest(pair: _Pair, wl: str, fio_secs: float, label: str = "",
                     cap: int | None = None) -> list[dict[str, Any]]:
    """The target's durable apply rate against the source's ingest; beside it the target
    cdpd's CPU per write (all threads, from fio's start until it acknowledged the run)
    and how busy that kept its cores (CPU seconds over wall seconds: near the number of
    its cores, the target is bound by CPU; well below, by the disk or the source)."""
    unit = _WORKLOADS[wl][3]
    assert pair.tgt.proc is not None
    pid = pair.tgt.proc.pid
    c0 = _cpu_seconds(pid)
    t0 = time.monotonic()
    res = _fio(pair.src.uri(), wl, fio_secs, _capped(cap))
    t1 = time.monotonic()
    t2 = _wait_caught_up(pair.src)
    cpu = _cpu_seconds(pid) - c0
    ratio = (t1 - t0) / (t2 - t0)
    return [_row(f"{label}repl-apply-vs-ingest-{wl}", res[unit] * ratio, res[unit],
                 "source ingest", unit, 0.90, ratio=ratio),
            _row(f"{label}repl-target-cpu-per-write-{wl}", cpu / max(1.0, res["ios"]) * 1e6,
                 cpu / (t2 - t0), "target CPU busy (s/s)", "us", None,
                 ratio=cpu / (t2 - t0))]


def control_run_cap(free: int, runs: int) -> int:
    """Bytes one fio run of the ``--control-store`` rows may write, with ``free`` bytes
    free under the control directory: the target keeps a copy of every run, so ``runs``
    runs together under :data:`TMPFS_SHARE` of ``free``, one under :data:`TMPFS_RUN_CAP`."""
    return min(TMPFS_RUN_CAP, int(free * TMPFS_SHARE) // max(1, runs))


def _control_rows(scratch: Path | None, control: Path, rig: Rig, fio_secs: float,
                  ship_window: str | None, sizes: tuple[str, ...]) -> list[dict[str, Any]]:
    """The apply rows with the target's store under ``control`` (the source's on the
    disk, in ``scratch``), capped (see the module notes); [] with a note when there is
    too little room."""
    control.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(control)
    shared = tuple(w for w in sizes if w not in FRESH)
    cap = control_run_cap(st.f_bavail * st.f_frsize, max(1, len(shared)))
    kind = fs_type(control)
    print(f"# control rows: the target's store under {control} ({kind}); each fio run "
          f"writes at most {cap >> 20} MiB"
          + ("" if cap >= TMPFS_MIN_RUN else ": too little, skipped"), flush=True)
    if cap < TMPFS_MIN_RUN:
        return []
    rows: list[dict[str, Any]] = []
    for wl in sizes:  # each run on its own pair: a run may fill the whole cap
        if wl in FRESH:
            rows += _apply_fresh(scratch, rig, ship_window, wl, fio_secs, FRESH_RUNS,
                                 f"control:t[{kind}] ", cap, control)
    if not shared:
        return rows
    with tempfile.TemporaryDirectory(dir=scratch) as tmp, \
            tempfile.TemporaryDirectory(dir=control, prefix="repl-bench-") as ctl:
        (Path(tmp) / "s").mkdir()
        (Path(ctl) / "t").mkdir()
        with _Pair(Path(tmp) / "s", Path(ctl) / "t", rig, ship_window) as pair:
            _wait_caught_up(pair.src)
            for wl in shared:
                rows += _apply_vs_ingest(pair, wl, fio_secs, f"control:t[{kind}] ", cap)
    return rows


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _on_vs_off(pair: _Pair, wl: str, fio_secs: float, pairs: int, label: str = "",
               cap: int | None = None) -> list[dict[str, Any]]:
    """Source ingest with replication on / off, alternated; and the source cdpd's CPU
    per write in each arm (on: until the target acknowledged the run's last write, so
    the shipping of the run is in it)."""
    unit = _WORKLOADS[wl][3]
    on: list[float] = []
    off: list[float] = []
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    assert pair.src.proc is not None
    pid = pair.src.proc.pid
    for i in range(pairs):
        for state in (("off", "on") if i % 2 == 0 else ("on", "off")):
            if state == "off":
                pair.stop()
            else:
                pair.start()
                _wait_caught_up(pair.src)
            c0 = _cpu_seconds(pid)
            res = _fio(pair.src.uri(), wl, fio_secs, _capped(cap))
            if state == "on":
                _wait_caught_up(pair.src)
            cpu[state].append((_cpu_seconds(pid) - c0) / max(1.0, res["ios"]) * 1e6)
            (on if state == "on" else off).append(res[unit])
        pair.start()
        _wait_caught_up(pair.src)
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    c_on, c_off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    return [_row(f"{label}repl-ingest-on-vs-off-{wl}", statistics.median(on),
                 statistics.median(off), "replication off", unit, 0.85,
                 ratio=statistics.median(ratios)),
            _row(f"{label}repl-source-cpu-per-write-{wl}", c_on, c_off,
                 "replication off (ratio off/on)", "us", None,
                 ratio=c_off / c_on if c_on else 0.0)]


@contextmanager
def _fresh_pair(scratch: Path | None, rig: Rig, ship_window: str | None,
                t_root: Path | None = None) -> Iterator[_Pair]:
    """A new store pair (the source's under ``scratch``, the target's under ``t_root``,
    default ``scratch``), replicating and caught up; removed afterwards."""
    with tempfile.TemporaryDirectory(dir=scratch, prefix="repl-bench-") as tmp, \
            tempfile.TemporaryDirectory(dir=t_root or scratch, prefix="repl-bench-") as ttmp:
        (Path(tmp) / "s").mkdir()
        (Path(ttmp) / "t").mkdir()
        with _Pair(Path(tmp) / "s", Path(ttmp) / "t", rig, ship_window) as pair:
            _wait_caught_up(pair.src)
            yield pair


def _median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several runs (same rows each) as one: medians of value, peer and ratio;
    the range of the ratios printed (``# range``)."""
    out = []
    for rows in zip(*runs, strict=True):
        r = dict(rows[0])
        for k in ("cdp", "peer", "ratio"):
            r[k] = round(statistics.median(x[k] for x in rows), 3)
        ratios = [x["ratio"] for x in rows]
        if r["goal"] is not None:
            r["verdict"] = "pass" if r["ratio"] >= r["goal"] else "short"
        print(f"# range {r['workload']}: ratio median {r['ratio']:.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}; runs "
              + " ".join(f"{x:.3f}" for x in ratios) + ")", flush=True)
        out.append(r)
    return out


def _apply_fresh(scratch: Path | None, rig: Rig, ship_window: str | None, wl: str,
                 fio_secs: float, runs: int, label: str = "", cap: int | None = None,
                 t_root: Path | None = None) -> list[dict[str, Any]]:
    """The apply rows, each of ``runs`` runs on a fresh store pair (``--fresh``)."""
    got = []
    for _ in range(runs):
        with _fresh_pair(scratch, rig, ship_window, t_root) as pair:
            got.append(_apply_vs_ingest(pair, wl, fio_secs, label, _capped(cap)))
    return _median_rows(got)


def _on_off_fresh(scratch: Path | None, rig: Rig, ship_window: str | None, wl: str,
                  fio_secs: float, pairs: int) -> list[dict[str, Any]]:
    """:func:`_on_vs_off` with each arm on a fresh store pair (``--fresh``): replication
    stopped right after the pair started (off; the target idles on its cores) or
    running; ``pairs`` alternated pairs; the ratio is the median of the pairs'."""
    unit = _WORKLOADS[wl][3]
    runs: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(pairs):
        for state in (("off", "on") if i % 2 == 0 else ("on", "off")):
            with _fresh_pair(scratch, rig, ship_window) as pair:
                assert pair.src.proc is not None
                pid = pair.src.proc.pid
                if state == "off":
                    pair.stop()
                c0 = _cpu_seconds(pid)
                res = _fio(pair.src.uri(), wl, fio_secs, _capped(None))
                if state == "on":
                    _wait_caught_up(pair.src)
                cpu[state].append((_cpu_seconds(pid) - c0) / max(1.0, res["ios"]) * 1e6)
                runs[state].append(res[unit])
    ratios = [a / b for a, b in zip(runs["on"], runs["off"], strict=True)]
    c_on, c_off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    name = f"repl-ingest-on-vs-off-{wl}"
    print(f"# range {name}: ratio median {statistics.median(ratios):.3f} (min "
          f"{min(ratios):.3f}, max {max(ratios):.3f}; pairs "
          + " ".join(f"{x:.3f}" for x in ratios) + "); on " + " ".join(
              f"{x:.0f}" for x in runs["on"]) + ", off " + " ".join(
              f"{x:.0f}" for x in runs["off"]) + f" {unit}; source CPU per write (us) on "
          + " ".join(f"{x:.0f}" for x in cpu["on"]) + ", off "
          + " ".join(f"{x:.0f}" for x in cpu["off"]), flush=True)
    return [_row(name, statistics.median(runs["on"]), statistics.median(runs["off"]),
                 "replication off", unit, 0.85, ratio=statistics.median(ratios)),
            _row(f"repl-source-cpu-per-write-{wl}", c_on, c_off,
                 "replication off (ratio off/on)", "us", None,
                 ratio=c_off / c_on if c_on else 0.0)]


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


def run(quick: bool = False, scratch: Path | None = None, tmpfs: bool = False,
        rig: Rig | None = None, rows_wanted: frozenset[str] = frozenset(ROWS),
        fio_secs: float | None = None, pairs: int | None = None,
        ship_window: str | None = None,
        sizes: tuple[str, ...] = tuple(_WORKLOADS),
        control: Path | None = None) -> list[dict[str, Any]]:
    """The rows named in ``rows_wanted`` (:data:`ROWS`) under ``rig`` (default: the split
    rig when there are 2 or more cores), then the ``--tmpfs`` control rows, then the
    ``--control-store`` ones (the apply rows with the target's store under ``control``);
    the source's ``[replication] ship_window`` is ``ship_window`` (None: the default);
    the apply and on/off rows run the workloads in ``sizes`` (``4k``, ``1m``)."""
    rig = split_rig() if rig is None else rig
    print(f"# rig {rig.describe()}", flush=True)
    with on_source_cores(rig):
        rows = _run(quick, scratch, tmpfs, rig, rows_wanted, fio_secs, pairs, ship_window,
                    sizes)
        if control is not None:
            secs = fio_secs if fio_secs is not None else (2 if quick else 10)
            rows += _control_rows(scratch, control, rig, secs, ship_window, sizes)
        return rows


def _run(quick: bool, scratch: Path | None, tmpfs: bool, rig: Rig, want: frozenset[str],
         fio_secs: float | None, pairs: int | None, ship_window: str | None,
         sizes: tuple[str, ...]) -> list[dict[str, Any]]:
    secs = 3.0 if quick else 20.0
    fio_secs = fio_secs if fio_secs is not None else (2 if quick else 10)
    pairs = pairs if pairs is not None else (1 if quick else 2)
    # --rate of the rate and catch-up rows: well below what the target applies on this
    # machine, so that the link limit is what is measured, not the target
    link = (4 if quick else 16) << 20
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        base = Path(tmp)
        for d in ("s", "t"):
            (base / d).mkdir()
        if "disk" in want:
            rows.append(_disk(base, 256 if quick else 1024))
        # (with --fresh the apply and on/off runs make pairs of their own)
        shared = tuple(w for w in sizes if w not in FRESH)
        use = bool(want & {"rpo", "rate", "catchup"}) or (
            bool(shared) and bool(want & {"apply", "onoff"}))
        with _Pair(base / "s", base / "t", rig, ship_window) if use \
                else contextlib.nullcontext() as pair:
            if pair is not None:
                _wait_caught_up(pair.src)
                if "rpo" in want:  # RPO at 2,000 4 KiB writes/s
                    rows += _rpo(pair, secs)
                if "apply" in want:  # the target's durable apply rate vs the ingest
                    for wl in shared:
                        rows += _apply_vs_ingest(pair, wl, fio_secs)
                if "onoff" in want:  # ingest with replication on vs off, alternated
                    for wl in shared:
                        rows += _on_vs_off(pair, wl, fio_secs, pairs)
                if "rate" in want:
                    rows.append(_rate_use(pair, link, 4.0 if quick else 10.0))
                if "catchup" in want:
                    rows += _catch_up(pair, link, 10.0 if quick else 60.0)
    for wl in sizes:  # the --fresh workloads: each run on a store pair of its own
        if wl in FRESH:
            if "apply" in want:
                rows += _apply_fresh(scratch, rig, ship_window, wl, fio_secs, pairs)
            if "onoff" in want:
                rows += _on_off_fresh(scratch, rig, ship_window, wl, fio_secs, pairs)
    if tmpfs:  # control rows: how much of the 1 MiB rows is the disk
        st = os.statvfs("/dev/shm")
        cap = tmpfs_run_cap(st.f_bavail * st.f_frsize, pairs)
        print(f"# tmpfs rows: each fio run writes at most {cap >> 20} MiB"
              + ("" if cap >= TMPFS_MIN_RUN else ": too little, skipped"), flush=True)
        for label, on_shm in (("tmpfs:t ", ("t",)), ("tmpfs:st ", ("s", "t"))):
            if cap < TMPFS_MIN_RUN:
                break
            with tempfile.TemporaryDirectory(dir=scratch) as tmp, \
                    tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
                dirs = {k: (Path(shm) if k in on_shm else Path(tmp)) / k for k in ("s", "t")}
                for path in dirs.values():
                    path.mkdir()
                with _Pair(dirs["s"], dirs["t"], rig, ship_window) as pair:
                    _wait_caught_up(pair.src)
                    rows += _apply_vs_ingest(pair, "1m", fio_secs, label, cap)
                    rows += _on_vs_off(pair, "1m", fio_secs, pairs, label, cap)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few seconds per measurement")
    ap.add_argument("--scratch", type=Path, help="directory for the stores (default: /tmp)")
    ap.add_argument("--tmpfs", action="store_true",
                    help="also the 1 MiB rows with stores on /dev/shm (control rows)")
    ap.add_argument("--rig", choices=("split", "unsplit", "both"), default="split",
                    help="split: source cdpd + fio on half the cores, the target cdpd on "
                         "the others (the default; unsplit with fewer than 2 cores); "
                         "unsplit: all on every core; both: each, one after the other")
    ap.add_argument("--no-split-cores", dest="rig", action="store_const", const="unsplit",
                    help="same as --rig unsplit")
    ap.add_argument("--split-cores", dest="rig", action="store_const", const="split",
                    help="same as --rig split")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"comma-separated rows to run (default: all of {','.join(ROWS)})")
    ap.add_argument("--fio-secs", type=float, help="seconds per fio run (default 10, quick 2)")
    ap.add_argument("--pairs", type=int, help="on/off pairs per ingest row (default 2, quick 1)")
    ap.add_argument("--ship-window", help="the source's [replication] ship_window (e.g. 0: "
                    "every record read back from the journal; default: cdpd's default)")
    ap.add_argument("--sizes", default=",".join(_WORKLOADS),
                    help=f"workloads of the apply and onoff rows (default: {','.join(_WORKLOADS)})")
    ap.add_argument("--control-store", type=Path, metavar="DIR",
                    help="the apply rows once more with the target's store under DIR (e.g. "
                         "a tmpfs such as /dev/shm/NAME; capped), the source's on the disk")
    ap.add_argument("--cap", metavar="SIZE",
                    help="bytes each fio run of the apply and on/off rows writes at most "
                         "(e.g. 900MiB: keeps the stores small; default: no cap)")
    ap.add_argument("--fresh", metavar="SIZES", default="",
                    help="workloads (e.g. 1m) whose apply, on/off and control runs are "
                         "each on a store pair of their own (with --cap: runs of seconds "
                         "at 1 MiB, each store under the cap)")
    ap.add_argument("--markdown", action="store_true", help="also print the rows as a markdown table")
    args = ap.parse_args(argv)
    global RUN_CAP, FRESH, FRESH_RUNS
    if args.cap:
        RUN_CAP = parse_size(args.cap, "--cap")
    FRESH = frozenset(w.strip() for w in args.fresh.split(",") if w.strip())
    if FRESH - set(_WORKLOADS):
        ap.error(f"--fresh: choose from {','.join(_WORKLOADS)}")
    if args.pairs:
        FRESH_RUNS = args.pairs
    want = frozenset(r.strip() for r in args.rows.split(",") if r.strip())
    if not want <= set(ROWS):
        ap.error(f"--rows: unknown {sorted(want - set(ROWS))}; choose from {','.join(ROWS)}")
    sizes = tuple(w.strip() for w in args.sizes.split(",") if w.strip())
    if not set(sizes) <= set(_WORKLOADS):
        ap.error(f"--sizes: choose from {','.join(_WORKLOADS)}")
    rigs = {"split": [split_rig()], "unsplit": [Rig()],
            "both": [split_rig(), Rig()]}[args.rig]
    rows: list[dict[str, Any]] = []
    for rig in rigs:
        got = run(args.quick, args.scratch, args.tmpfs, rig, want, args.fio_secs, args.pairs,
                  args.ship_window, sizes, args.control_store)
        if len(rigs) > 1:
            for r in got:
                r["workload"] = f"{rig.label}:{r['workload']}"
        rows += got
    print(f"# load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f}", flush=True)
    print_table(rows)
    if args.markdown:
        print("\n| row | value | against | unit | ratio | goal |\n|---|---|---|---|---|---|")
        for r in rows:
            goal = "-" if r["goal"] is None else f"{r['goal']:.2f}"
            print(f"| {r['workload']} | {r['cdp']} | {r['peer']} ({r['peer_name']}) | "
                  f"{r['unit']} | {r['ratio']:.2f} | {goal} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
