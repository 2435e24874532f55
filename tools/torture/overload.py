"""Overload: 16 connections (12 NBD writers of our own, 4 iSCSI sessions of qemu-io)
writing at once while a marker is taken every second, point-in-time exports are read,
images are exported and ``cdpctl gc --now`` runs when it exists. Afterwards every block
must hold what was written, every read-back must have matched, ``cdpctl verify`` must
be clean; the figures include cdpd's peak RSS (VmHWM)."""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from cdp.admin import AdminClient
from cdp.targets.nbd.client import NbdClient
from tools.harness import Cdpd
from tools.torture.model import BLOCK, Model, check_blocks
from tools.torture.writer import Gate, Writer

MiB = 1 << 20


def _rss_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def run_overload(work: Path, *, seconds: float = 30, seed: int = 1, nbd: int = 12, iscsi: int = 4,
                 size_mib: int = 256, log: Any = print) -> dict[str, Any]:
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    cd = Cdpd(work, size=f"{size_mib}MiB", segment_bytes="16MiB", l0_max_writes=1024).start()
    assert cd.proc is not None
    pid = cd.proc.pid
    problems: list[str] = []
    nblocks = size_mib * MiB // BLOCK
    nbd_blocks = nblocks * 3 // 4  # NBD writers own the first 3/4, iSCSI the rest
    model = Model(nblocks)
    gate = Gate(nbd)
    per = nbd_blocks // nbd
    ws = [Writer(cd.uri("vol0"), model, range(i * per, (i + 1) * per), gate, rng.randrange(1 << 30))
          for i in range(nbd)]
    stop = threading.Event()
    counts = {"markers": 0, "pit_reads": 0, "images": 0, "iscsi_rounds": 0, "gc": 0}
    lock = threading.Lock()
    has_iscsi = shutil.which("qemu-io") is not None

    def admin(op: str, args: dict[str, Any]) -> Any:
        c = AdminClient(cd.store / "cdpd.sock")
        try:
            return c.call(op, args)
        finally:
            c.close()

    def iscsi_loop(k: int) -> None:
        base = nbd_blocks * BLOCK + k * ((nblocks - nbd_blocks) // iscsi) * BLOCK
        span = (nblocks - nbd_blocks) // iscsi * BLOCK
        r = random.Random(seed * 100 + k)
        while not stop.is_set():
            pat = r.randrange(1, 255)
            off = base + r.randrange(0, span // 65536 - 1) * 65536
            cmds = ["-c", f"write -P {pat} {off} 64k", "-c", "flush", "-c", f"read -P {pat} {off} 64k"]
            p = subprocess.run(["qemu-io", "-f", "raw", *cmds, cd.iscsi_uri()], capture_output=True,
                               timeout=120)
            out = p.stdout + p.stderr
            if p.returncode != 0 or b"Pattern verification failed" in out or b"failed" in out:
                problems.append(f"iscsi {k}: {out[-300:]!r}")
            with lock:
                counts["iscsi_rounds"] += 1

    def markers_loop() -> None:
        while not stop.wait(1.0):
            try:
                admin("snapshot", {"volumes": ["vol0"]})
                with lock:
                    counts["markers"] += 1
            except Exception as e:
                problems.append(f"marker: {e}")

    def pit_loop() -> None:
        r = random.Random(seed + 7)
        while not stop.wait(0.2):
            ms = admin("markers", {"volume": "vol0"})
            if not ms:
                continue
            name = r.choice(ms)["name"]
            try:
                with NbdClient.connect(cd.uri(f"vol0@{name}"), timeout=60) as c:
                    for _ in range(20):
                        off = r.randrange(0, size_mib * MiB // 65536) * 65536
                        c.pread(off, 65536)
                with lock:
                    counts["pit_reads"] += 20
            except Exception as e:
                problems.append(f"pit read {name}: {e}")

    def image_loop() -> None:
        while not stop.wait(2.0):
            ms = admin("markers", {"volume": "vol0"})
            if not ms:
                continue
            out = work / "img.raw"
            p = subprocess.run([*_cdpctl(cd), "image", "--at", ms[-1]["name"], "-o", str(out)],
                               capture_output=True, text=True, timeout=300)
            if p.returncode != 0:
                problems.append(f"image: {p.stderr[-300:]}")
            out.unlink(missing_ok=True)
            with lock:
                counts["images"] += 1
            if cd.cdpctl("gc", "--help", check=False).returncode == 0:
                g = cd.cdpctl("gc", "--now", check=False)
                if g.returncode != 0:
                    problems.append(f"gc: {g.stderr[-300:]}")
                counts["gc"] += 1

    threads = [threading.Thread(target=f, daemon=True) for f in (markers_loop, pit_loop, image_loop)]
    if has_iscsi:
        threads += [threading.Thread(target=iscsi_loop, args=(k,), daemon=True) for k in range(iscsi)]
    t0 = time.monotonic()
    for w in ws:
        w.start()
    for t in threads:
        t.start()
    peak = 0
    while time.monotonic() - t0 < seconds:
        time.sleep(0.5)
        peak = max(peak, _rss_kib(pid, "VmRSS"))
    stop.set()
    ok = gate.quiesce(lambda: sum(1 for w in ws if w.is_alive()), timeout=60)
    if not ok:
        problems.append("NBD writers did not quiesce (deadlock?)")
    for t in threads:
        t.join(180)
        if t.is_alive():
            problems.append(f"{t.name} did not finish (deadlock?)")
    elapsed = time.monotonic() - t0
    for w in ws:
        if w.error is not None:
            problems.append(f"writer error: {w.error}")
    with NbdClient.connect(cd.uri("vol0"), timeout=120) as c:
        data = c.pread(0, nbd_blocks * BLOCK)
    res, _obs = check_blocks(model, data)
    problems.extend(res.details)
    gate.halt()
    for w in ws:
        w.join(30)
    hwm = _rss_kib(pid, "VmHWM")
    v = cd.cdpctl("verify", check=False)
    if v.returncode != 0:
        problems.append(f"verify exit {v.returncode}: {v.stdout[-500:]}")
    if cd.stop() != 0:
        problems.append("cdpd did not stop cleanly")
    writes = sum(w.writes for w in ws)
    return {"connections": nbd + (iscsi if has_iscsi else 0), "seconds": round(elapsed, 1),
            "writes": writes, "writes_per_s": round(writes / elapsed), "flushes": sum(w.flushes for w in ws),
            "blocks_checked": res.checked, "lost": res.lost, **counts,
            "peak_rss_mib": round(max(hwm, peak) / 1024, 1), "problems": problems[:20]}


def _cdpctl(cd: Cdpd) -> list[str]:
    import sys

    return [sys.executable, "-m", "cdp.cli.main", "--config", str(cd.config)]
