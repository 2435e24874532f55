"""NBD protocol overhead: fio 4 KiB random I/O against our server (RAM device) and nbdkit.

``python -m tools.bench.nbd_proto_bench [--quick]`` prints IOPS for each case, the same
case against ``nbdkit memory`` (the peer), and our share of the peer's IOPS. This is the
ceiling the appliance's NBD path can reach (its goals: >= 60% of nbdkit for writes,
>= 70% for reads, against nbdkit file). Both servers run on this machine with fio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from cdp.targets.testing.memdev import MemoryProvider
from cdp.targets.testing.nbd_thread import ServerThread
from tools.harness import listening_port

SIZE = 256 << 20


@contextmanager
def _ours() -> Iterator[str]:
    p = MemoryProvider()
    p.add("bench", SIZE)
    with ServerThread(p) as s:
        yield s.uri("bench")


@contextmanager
def _nbdkit(plugin: str) -> Iterator[str]:
    tmp = tempfile.NamedTemporaryFile(prefix="nbdbench-", dir="/var/tmp")  # noqa: SIM115 (closed below)
    os.truncate(tmp.name, SIZE)
    args = ["memory", str(SIZE)] if plugin == "memory" else ["file", tmp.name]
    proc = subprocess.Popen(
        [
            "nbdkit",
            "--foreground",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
            "0",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = listening_port(proc, "nbdkit")
        yield f"nbd://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)
        tmp.close()


def _fio(uri: str, rw: str, jobs: int, seconds: int) -> float:
    cmd = [
        "fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
        "--iodepth=32", f"--numjobs={jobs}", f"--size={SIZE // jobs}",
        f"--offset_increment={SIZE // jobs}", "--time_based", f"--runtime={seconds}",
        "--ramp_time=1", "--group_reporting", "--output-format=json",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["read" if rw == "randread" else "write"]["iops"])


def run(quick: bool) -> list[dict[str, object]]:
    """Measure every case; one dict per case (rw, connections, iops, peer_iops, ratio)."""
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"requires {tool}")
    seconds = 1 if quick else 10
    rows: list[dict[str, object]] = []
    for rw in ("randwrite", "randread"):
        for jobs in (1, 4):
            with _ours() as uri:
                ours = _fio(uri, rw, jobs, seconds)
            for plugin in ("memory", "file"):
                with _nbdkit(plugin) as uri:
                    peer = _fio(uri, rw, jobs, seconds)
                rows.append(
                    {
                        "rw": rw,
                        "bs": "4k",
                        "iodepth": 32,
                        "connections": jobs,
                        "iops": round(ours),
                        "peer": f"nbdkit {plugin}",
                        "peer_iops": round(peer),
                        "ratio": round(ours / peer, 3) if peer else 0.0,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 s per case instead of 10 s")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    rows = run(args.quick)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'case':<22}{'cdp IOPS':>10}{'peer':>16}{'peer IOPS':>11}{'ratio':>8}")
    for r in rows:
        case = f"{r['rw']} 4k qd32 x{r['connections']}"
        print(f"{case:<22}{r['iops']:>10}{r['peer']:>16}{r['peer_iops']:>11}{r['ratio']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
