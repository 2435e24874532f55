"""cdp's iSCSI target vs. tgt (tgtd, file backing store in tmpfs), in the same run.

    python -m tools.bench.iscsi_bench [--quick] [--json]

Workloads:
- ``randread-4k``: ``iscsi-perf -r -m 32 -b 8`` (4 KiB random reads, 32 in flight), IOPS;
- ``randwrite-4k``: ``qemu-img bench -w -d 32 -s 4k`` over iscsi://, IOPS.

Two cdp rows per workload: the protocol ceiling (a RAM device, ``MemoryProvider``, from a
background thread of this process) and the appliance itself (a real cdpd, the volume
journalled on disk, written in full first so reads hit data). tgtd serves a file in
/dev/shm (written in full too). Prints cdp, peer, ratio, goal, pass/short per workload;
``run(quick)`` returns the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from cdp.targets.testing.iscsi_thread import IscsiServerThread
from cdp.targets.testing.memdev import MemoryProvider
from tools.bench.goals import ratio_goal
from tools.harness import listening_port

MiB = 1 << 20
SIZE = 256 * MiB
GOALS = {w: ratio_goal(w) for w in ("randread-4k", "randwrite-4k")}


class Tgt:
    """tgtd on a loopback port with one LUN backed by a file."""

    def __init__(self, path: Path, size: int) -> None:
        with open(path, "wb") as f:
            f.truncate(size)
        self.iqn = "iqn.2026-11.io.tgt:bench"
        # the portal binds port 0 (read back from the kernel); the control port -C is
        # only a lock name, and tgtd exits at once when another tgtd holds it: try the next
        log = path.with_suffix(".tgtd.log")
        base = 1000 + os.getpid() % 30000
        for attempt in range(20):
            self.ctl = str(base + attempt)
            with open(log, "wb") as logf:
                self.proc = subprocess.Popen(
                    ["tgtd", "-f", "-C", self.ctl, "--iscsi", "portal=127.0.0.1:0"],
                    stdout=subprocess.DEVNULL, stderr=logf,
                )
            try:
                self.port = listening_port(self.proc, "tgtd")
                break
            except RuntimeError:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
                if "another tgtd is using" not in log.read_text(errors="replace"):
                    raise
        else:
            raise RuntimeError(f"tgtd: control ports {base}..{base + 19} are all in use")
        adm = ["tgtadm", "-C", self.ctl, "--lld", "iscsi"]
        for args in (["--op", "new", "--mode", "target", "--tid", "1", "-T", self.iqn],
                     ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                      "-b", str(path)],
                     ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]):
            subprocess.run(adm + args, check=True, capture_output=True)

    def uri(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{self.iqn}/1"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def perf_randread(uri: str, seconds: int) -> float:
    """IOPS of iscsi-perf 4 KiB random reads, 32 in flight."""
    r = subprocess.run(["iscsi-perf", "-m", "32", "-b", "8", "-r", "-t", str(seconds), uri],
                       capture_output=True, text=True, timeout=seconds + 30)
    m = re.findall(r"iops average (\d+)", r.stdout + r.stderr)
    if not m:
        raise RuntimeError(f"iscsi-perf: {r.stdout[-500:]} {r.stderr[-500:]}")
    return float(m[-1])


def qemu_randwrite(uri: str, count: int) -> float:
    """IOPS of qemu-img bench 4 KiB writes, 32 in flight, over iscsi://."""
    t0 = time.monotonic()
    r = subprocess.run(["qemu-img", "bench", "-w", "-f", "raw", "-t", "none", "-d", "32",
                        "-s", "4096", "-S", "1052672", "-c", str(count), uri],
                       capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    m = re.search(r"Run completed in ([\d.]+) seconds", r.stdout)
    if r.returncode != 0:
        raise RuntimeError(f"qemu-img bench: {r.stderr[-500:]}")
    return count / (float(m.group(1)) if m else wall)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every workload against cdp and tgt; one row per workload."""
    for tool in ("iscsi-perf", "qemu-img", "tgtd", "tgtadm"):
        if shutil.which(tool) is None:
            raise SystemExit(f"requires {tool}")
    seconds = 1 if quick else 10
    count = 20000 if quick else 100000
    provider = MemoryProvider()
    provider.add("bench", SIZE)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=shm) as tmp, IscsiServerThread(provider) as srv:
        tgt = Tgt(Path(tmp) / "tgt.img", SIZE)
        try:
            cdp_uri, tgt_uri = srv.uri("bench"), tgt.uri()
            qemu_randwrite(cdp_uri, 2000)  # warm up (allocate the RAM pages)
            qemu_randwrite(tgt_uri, 2000)
            for name, fn, arg in (("randread-4k", perf_randread, seconds),
                                  ("randwrite-4k", qemu_randwrite, count)):
                cdp = fn(cdp_uri, arg)
                peer = fn(tgt_uri, arg)
                ratio = cdp / peer if peer else 0.0
                rows.append({"workload": name, "unit": "IOPS", "cdp": round(cdp),
                             "peer": round(peer), "peer_name": "tgt", "ratio": round(ratio, 3),
                             "goal": GOALS[name], "result": "pass" if ratio >= GOALS[name]
                             else "short"})
            # the appliance: a journal-backed volume of a real cdpd
            from tools.harness import Cdpd

            base = Path(tempfile.mkdtemp(prefix="cdp-iscsi-bench-", dir=os.getcwd()))
            cdpd = Cdpd(base, size=f"{SIZE // MiB}MiB", segment_bytes="256MiB",
                        l0_max_writes=8192).start()
            try:
                vol_uri = cdpd.iscsi_uri()
                # incompressible data, as a real volume mostly holds: a fill pattern would
                # let lz4 chunks be decoded once and shared, flattering the reads
                fill = base / "fill.img"
                with open(fill, "wb") as f:
                    for _ in range(SIZE // MiB):
                        f.write(os.urandom(MiB))
                for uri in (vol_uri, tgt_uri):
                    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                                    str(fill), uri], check=True, capture_output=True)
                fill.unlink()
                for name, fn, arg in (("randread-4k", perf_randread, seconds),
                                      ("randwrite-4k", qemu_randwrite, count)):
                    cdp = fn(vol_uri, arg)
                    peer = fn(tgt_uri, arg)
                    ratio = cdp / peer if peer else 0.0
                    rows.append({"workload": f"{name} (cdpd volume)", "unit": "IOPS",
                                 "cdp": round(cdp), "peer": round(peer), "peer_name": "tgt",
                                 "ratio": round(ratio, 3), "goal": GOALS[name],
                                 "result": "pass" if ratio >= GOALS[name] else "short"})
            finally:
                cdpd.stop()
                shutil.rmtree(base, ignore_errors=True)
        finally:
            tgt.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    rows = run(args.quick)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'workload':<14}{'cdp':>10}{'tgt':>10}{'ratio':>8}{'goal':>7}  result")
    for r in rows:
        print(f"{r['workload']:<14}{r['cdp']:>10}{r['peer']:>10}{r['ratio']:>8.2f}"
              f"{r['goal']:>7.2f}  {r['result']}")


if __name__ == "__main__":
    main()
