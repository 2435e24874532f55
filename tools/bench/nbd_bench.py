"""cdpd over NBD vs. its peers, in the same run: fio --ioengine=nbd against cdpd and
`nbdkit file`, and `dd conv=fdatasync` for the disk's durable sequential bandwidth.

    python -m tools.bench.nbd_bench [--quick] [--out DIR] [WORKLOAD ...]

Workloads: disk, nbd-randwrite-4k, nbd-seqwrite-1m, nbd-randread-4k, nbd-randread-4k-busy,
nbd-fragread-4k, image, nbd-flush, pit-read, nbd-pipelined-1k.
Prints cdp, peer, ratio, goal, pass/short for each; ``run()`` returns the rows.
nbd-seqwrite-1m alternates dd and cdpd runs (3 pairs) and reports the median ratio; so
do the read rows (``--runs`` pairs, cdp then peer, each ratio taken within its pair).
nbd-randread-4k-busy runs the same reads with one CPU-burning process beside both sides
(issue 23: "reads on both cores"). nbd-fragread-4k reads a 1 GiB region right after 15 s
of 4 KiB random writes to it (a fragmented history; nbdkit gets the same writes: same
fio seed, same count). image: ``cdpctl image`` of a volume with a long history of 4 KiB
random writes against ``qemu-img convert`` of the same bytes from ``nbdkit file``
(issue 23 asks 4 GiB / 1M writes: ``--image-size 4096 --image-writes 1000000``; the
default is scaled down to what a shared 2-core machine finishes in minutes).
nbd-pipelined-1k reads back 1 GiB (quick: 16 MiB) just written, in 1 KiB READs from the
client of :mod:`cdp.targets.testing.nbd_standoff` (issue 28: replies read only between
sends); the row names the longest gap between replies on each side and the CPU time
per request (µs, medians) of each server and of the client beside it. That client is
Python and costs about as much CPU per request as ``nbdkit file``: it bounds the peer's
figure, so the ratio measures the client as much as the server.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    """Run fio --ioengine=nbd; returns iops, MB/s (reads + writes) and ios (the count)."""
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
    ios = j["read"]["total_ios"] + j["write"]["total_ios"]
    return {"iops": iops, "MBps": bw, "ios": float(ios)}


def pairs(cdp: Callable[[], float], peer: Callable[[], float], runs: int) -> tuple[float, float, float]:
    """*runs* alternated measurements, cdp then its peer; the medians of cdp, peer and of
    the per-pair ratios (a drift of the machine's load hits both sides of a pair)."""
    cs, ps, rs = [], [], []
    for _ in range(runs):
        c = cdp()
        p = peer()
        cs.append(c)
        ps.append(p)
        rs.append(c / p if p else 0.0)
    return statistics.median(cs), statistics.median(ps), statistics.median(rs)


@contextmanager
def cpu_burner() -> Iterator[None]:
    """One process spinning on a CPU for the duration (the busy-machine rows)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process *pid*, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process (the in-process NBD client)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_average() -> str:
    """The 1-minute load average now, for the row's note."""
    return f"{os.getloadavg()[0]:.1f}"


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
    "nbd-randwrite-4k", "nbd-seqwrite-1m", "nbd-randread-4k x1", "nbd-randread-4k x4", "nbd-flush",
    "pit-read", "nbd-pipelined-1k", "nbd-fragread-4k", "image")}
#: fio's seed for the writes that both sides of a row must get alike
SEED = "20261207"


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


def _add(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """Append *row* and show it at once on stderr (a full run takes many minutes)."""
    rows.append(row)
    print(f"  {row['workload']}: cdp {row['cdp']} peer {row['peer']} {row['unit']}, "
          f"ratio {row['ratio']}", file=sys.stderr, flush=True)


def _row(workload: str, cdp: float, peer: float, peer_name: str, unit: str, goal: float | None,
         ratio: float | None = None) -> dict[str, Any]:
    if ratio is None:
        ratio = cdp / peer if peer else 0.0
    return {
        "workload": workload, "cdp": round(cdp, 1), "peer": round(peer, 1), "peer_name": peer_name,
        "unit": unit, "ratio": round(ratio, 3), "goal": goal,
        "verdict": "-" if goal is None else ("pass" if ratio >= goal else "short"),
    }


ALL = ["disk", "nbd-randwrite-4k", "nbd-seqwrite-1m", "nbd-randread-4k", "nbd-randread-4k-busy",
       "nbd-fragread-4k", "image", "nbd-flush", "pit-read", "nbd-pipelined-1k"]


def run(quick: bool = False, workloads: list[str] | None = None, scratch: Path | None = None,
        runs: int | None = None, image_size: int | None = None,
        image_writes: int | None = None, pipelined: int | None = None,
        read_seconds: float | None = None) -> list[dict[str, Any]]:
    """Every chosen workload (default: all) on one cdpd and one ``nbdkit file``; the
    read rows alternate *runs* pairs (default 3, quick 1). *image_size* (bytes) and
    *image_writes* scale the image row (default 1 GiB / 200k writes, quick 64 MiB / 5k);
    *pipelined* is the bytes nbd-pipelined-1k reads back (default 1 GiB, quick 16 MiB);
    *read_seconds* is each read run's length (default 10 s, quick 1 s)."""
    for tool in ("fio", "nbdkit", "dd", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"nbd_bench: requires {tool} (make sysdeps)")
    want = set(workloads or ALL)
    unknown = want - set(ALL)
    if unknown:
        raise SystemExit(f"nbd_bench: unknown workload {sorted(unknown)[0]!r} (choose from {', '.join(ALL)})")
    runtime = 1.0 if quick else 20.0
    read_s = read_seconds or (1.0 if quick else 10.0)
    runs = runs or (1 if quick else 3)
    size = 256 * MiB if quick else 2 * GiB
    frag = 64 * MiB if quick else GiB
    img_size = image_size or (64 * MiB if quick else GiB)
    img_writes = image_writes or (5_000 if quick else 200_000)
    base = Path(tempfile.mkdtemp(prefix="cdp-bench-", dir=scratch or Path.cwd()))
    rows: list[dict[str, Any]] = []
    dd_mbps = dd_bandwidth(base, 256 if quick else 2048)
    if "disk" in want:
        _add(rows, _row("disk", dd_mbps, dd_mbps, "dd", "MB/s", None))
    (base / "cdp").mkdir()
    extra = (f'[[volume]]\nname = "frag"\nsize = "{frag // MiB}MiB"\n'
             f'[[volume]]\nname = "img"\nsize = "{img_size // MiB}MiB"\n')
    cdpd = Cdpd(base / "cdp", size=f"{size // MiB}MiB", segment_bytes="256MiB", l0_max_writes=8192,
                extra_config=extra)
    kit = Nbdkit(base / "nbdkit.img", size)
    try:
        cdpd.start(timeout=120)  # a loaded machine takes long to import
        for conns in (1, 4):
            if "nbd-randwrite-4k" in want:
                c = fio(cdpd.uri(), "randwrite", "4k", 32, conns, runtime, size)["iops"]
                p = fio(kit.uri(), "randwrite", "4k", 32, conns, runtime, size)["iops"]
                _add(rows, _row(f"nbd-randwrite-4k x{conns}", c, p, "nbdkit file", "IOPS", GOALS["nbd-randwrite-4k"]))
        if "nbd-seqwrite-1m" in want:
            c, p, r = seqwrite_pairs(cdpd, base, size, 1 if quick else 3)
            _add(rows, _row("nbd-seqwrite-1m", c, p, "dd conv=fdatasync", "MB/s",
                             GOALS["nbd-seqwrite-1m"], ratio=r))
        if want & {"nbd-randread-4k", "nbd-randread-4k-busy"}:
            # both exports fully written first, so reads hit data, not holes
            fio(cdpd.uri(), "write", "1M", 8, 1, 0, size)
            fio(kit.uri(), "write", "1M", 8, 1, 0, size)
            for busy in (False, True):
                if f"nbd-randread-4k{'-busy' if busy else ''}" not in want:
                    continue
                for conns in (1, 4):
                    def cr(conns: int = conns) -> float:
                        return fio(cdpd.uri(), "randread", "4k", 32, conns, read_s, size)["iops"]

                    def pr(conns: int = conns) -> float:
                        return fio(kit.uri(), "randread", "4k", 32, conns, read_s, size)["iops"]

                    load = load_average()
                    if busy:
                        with cpu_burner():
                            c, p, r = pairs(cr, pr, runs)
                    else:
                        c, p, r = pairs(cr, pr, runs)
                    name = f"nbd-randread-4k x{conns}{' busy' if busy else ''}"
                    _add(rows, _row(f"{name} (load {load})", c, p, "nbdkit file", "IOPS",
                                     GOALS[f"nbd-randread-4k x{conns}"], ratio=r))
        if "nbd-fragread-4k" in want:
            _add(rows, _fragread(cdpd, base, frag, 2.0 if quick else 15.0, read_s, runs))
        if "image" in want:
            _add(rows, _image(cdpd, base, img_size, img_writes, runs))
        if "nbd-flush" in want:
            if "nbd-randread-4k" not in want:
                # nbdkit overwrites written blocks, as it does after the other workloads
                # (writes into holes would cost it an ext4 journal commit per flush)
                fio(kit.uri(), "write", "1M", 8, 1, 0, size)
            for every in (1, 32):
                extra_args = (f"--fsync={every}",)
                c = fio(cdpd.uri(), "randwrite", "4k", 32, 1, runtime, size, extra_args)["iops"]
                p = fio(kit.uri(), "randwrite", "4k", 32, 1, runtime, size, extra_args)["iops"]
                _add(rows, _row(f"nbd-flush fsync={every}", c, p, "nbdkit file", "IOPS", GOALS["nbd-flush"]))
        if "pit-read" in want:
            n = 20_000 if quick else 1_000_000
            half = n // 2 * 4096
            fio(cdpd.uri(), "randwrite", "4k", 32, 1, 0, size, (f"--io_size={half}",))
            cdpd.cdpctl("snapshot", "-V", "vol0", "--label", "bench-mid")
            fio(cdpd.uri(), "randwrite", "4k", 32, 1, 0, size, (f"--io_size={half}",))
            c = fio(cdpd.uri("vol0@bench-mid"), "randread", "4k", 32, 1, runtime, size)["iops"]
            p = fio(kit.uri(), "randread", "4k", 32, 1, runtime, size)["iops"]
            _add(rows, _row(f"pit-read ({n} writes)", c, p, "nbdkit file (live)", "IOPS", GOALS["pit-read"]))
        if "nbd-pipelined-1k" in want:
            total = min(size, pipelined or (16 * MiB if quick else GiB))
            fio(cdpd.uri(), "write", "1M", 8, 1, 0, total)
            fio(kit.uri(), "write", "1M", 8, 1, 0, total)
            gaps: list[str] = []
            us: dict[str, list[float]] = {"cdp": [], "kit": [], "client cdp": [], "client kit": []}

            def read(side: str, pid: int, port: int, export: str) -> float:
                c0, m0 = cpu_seconds(pid), own_cpu_seconds()
                res = read_back("127.0.0.1", port, export, total)
                n = max(res.replies, 1)
                us[side].append((cpu_seconds(pid) - c0) / n * 1e6)
                us[f"client {side}"].append((own_cpu_seconds() - m0) / n * 1e6)
                gaps.append(f"{res.max_gap:.2f}")
                return res.mb_per_s

            assert cdpd.proc is not None
            cdpd_pid = cdpd.proc.pid
            load = load_average()
            c, p, r = pairs(lambda: read("cdp", cdpd_pid, cdpd.nbd_port, "vol0"),
                            lambda: read("kit", kit.proc.pid, kit.port, ""), runs)
            cpu = {k: f"{statistics.median(v):.1f}" for k, v in us.items()}
            _add(rows, _row(f"nbd-pipelined-1k ({total // MiB} MiB, gaps {'/'.join(gaps)} s, "
                             f"CPU us/req cdpd {cpu['cdp']} nbdkit {cpu['kit']} client "
                             f"{cpu['client cdp']}/{cpu['client kit']}, load {load})",
                             c, p, "nbdkit file", "MB/s", GOALS["nbd-pipelined-1k"], ratio=r))
    finally:
        kit.stop()
        if cdpd.proc is not None:
            cdpd.stop()
        shutil.rmtree(base, ignore_errors=True)
    return rows


def _same_writes(cdp_uri: str, peer_uri: str, size: int, seconds: float | None,
                 count: int | None) -> int:
    """4 KiB random writes (qd32, fio seed :data:`SEED`) to cdp for *seconds* or *count*
    writes, then as many of the same writes to the peer; returns the count."""
    seed = (f"--randseed={SEED}",)
    if count is None:
        assert seconds is not None
        count = int(fio(cdp_uri, "randwrite", "4k", 32, 1, seconds, size, seed)["ios"])
    else:
        fio(cdp_uri, "randwrite", "4k", 32, 1, 0, size, (*seed, f"--number_ios={count}"))
    fio(peer_uri, "randwrite", "4k", 32, 1, 0, size, (*seed, f"--number_ios={count}"))
    return count


def _fragread(cdpd: Cdpd, base: Path, size: int, write_s: float, read_s: float,
              runs: int) -> dict[str, Any]:
    """Issue 23's fragmented-history read: the volume written whole (1 MiB writes), then
    *write_s* seconds of 4 KiB random writes, then 4 KiB random reads qd32 at once; the
    peer, a fresh ``nbdkit file``, gets the same writes."""
    kit = Nbdkit(base / "frag.img", size)
    try:
        uri = cdpd.uri("frag")
        fio(uri, "write", "1M", 8, 1, 0, size)
        fio(kit.uri(), "write", "1M", 8, 1, 0, size)
        n = _same_writes(uri, kit.uri(), size, write_s, None)
        load = load_average()
        c, p, r = pairs(lambda: fio(uri, "randread", "4k", 32, 1, read_s, size)["iops"],
                        lambda: fio(kit.uri(), "randread", "4k", 32, 1, read_s, size)["iops"], runs)
    finally:
        kit.stop()
    return _row(f"nbd-fragread-4k ({size // MiB} MiB, {n} writes, load {load})", c, p,
                "nbdkit file", "IOPS", GOALS["nbd-fragread-4k"], ratio=r)


def _image(cdpd: Cdpd, base: Path, size: int, writes: int, runs: int) -> dict[str, Any]:
    """``cdpctl image`` of a volume with *writes* 4 KiB random writes in its history
    against ``qemu-img convert -O raw`` from an ``nbdkit file`` given the same writes;
    MB/s of the volume size (both outputs sparse), wall-clock including process start."""
    kit = Nbdkit(base / "img-src.img", size)
    out = base / "img-out.raw"
    try:
        _same_writes(cdpd.uri("img"), kit.uri(), size, None, writes)

        def ours() -> float:
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            cdpd.cdpctl("image", "-V", "img", "-o", str(out))
            return size / (time.perf_counter() - t0) / 1e6

        def peer() -> float:
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", kit.uri(), str(out)],
                           check=True, capture_output=True)
            return size / (time.perf_counter() - t0) / 1e6

        load = load_average()
        c, p, r = pairs(ours, peer, runs)
    finally:
        kit.stop()
        out.unlink(missing_ok=True)
    return _row(f"image ({size // MiB} MiB, {writes} writes, load {load})", c, p,
                "qemu-img convert from nbdkit file", "MB/s", GOALS["image"], ratio=r)


def print_table(rows: list[dict[str, Any]]) -> None:
    hdr = f"{'workload':<60} {'cdp':>10} {'peer':>10} {'unit':>5}  {'ratio':>6} {'goal':>5}  verdict  peer"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        goal = f"{r['goal']:.2f}" if r["goal"] is not None else "-"
        print(f"{r['workload']:<60} {r['cdp']:>10} {r['peer']:>10} {r['unit']:>5}  {r['ratio']:>6.2f} {goal:>5}  {r['verdict']:<7}  {r['peer_name']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds per workload (harness check)")
    ap.add_argument("--scratch", type=Path, help="directory for the stores (default: cwd)")
    ap.add_argument("--runs", type=int, help="alternated cdp/peer pairs per read row (default 3)")
    ap.add_argument("--image-size", type=int, metavar="MiB", help="the image row's volume (default 1024)")
    ap.add_argument("--image-writes", type=int, metavar="N", help="its history (default 200000)")
    ap.add_argument("--pipelined-size", type=int, metavar="MiB",
                    help="bytes nbd-pipelined-1k reads back (default 1024)")
    ap.add_argument("--read-seconds", type=float, metavar="S",
                    help="length of each read run (default 10, quick 1)")
    ap.add_argument("workloads", nargs="*")
    a = ap.parse_args(argv)
    rows = run(a.quick, a.workloads or None, a.scratch, a.runs,
               a.image_size * MiB if a.image_size else None, a.image_writes,
               a.pipelined_size * MiB if a.pipelined_size else None, a.read_seconds)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

