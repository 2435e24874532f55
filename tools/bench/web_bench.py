"""The web API against its goals (issue 22), side by side with cdpctl:

* **timeline**: ``GET /volumes/vol0/timeline?buckets=200`` on a volume with many writes
  and markers (default 1M 4 KiB writes, 10k markers; the goal is 10M / 10k in <= 200 ms:
  the cost is one time-index bisection per bucket edge, so it does not grow with writes);
* **listing**: ``GET files`` of a 1000-entry directory at a marker vs ``cdpctl files``;
* **restore**: ``GET restore`` of a 256 MiB file (to /dev/null) vs ``cdpctl restore``
  (goal: >= 70 % of its rate).

cdpctl is timed twice: the command (wall time, a Python start included) and its
operation over the admin socket (what the daemon spends; the fair comparison).

    python -m tools.bench.web_bench [--writes N] [--markers N] [--big-mib N] [--out FILE]

Prints one row per measurement; the medians of 5 runs (restore: of 3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from cdp.admin import AdminClient
from cdp.config import load_config
from cdp.store import Store
from tools.harness import Cdpd
from tools.ntfs_fixture import make_image, populate_many

MiB = 1 << 20


async def _fill(store: Store, writes: int, markers: int) -> None:
    """*writes* 4 KiB writes at random offsets of vol0 with *markers* markers between."""
    vol = store.volume("vol0")
    rng = random.Random(22)
    bufs = [os.urandom(4096) for _ in range(64)]
    blocks = vol.size // 4096
    every = max(1, writes // max(1, markers))
    for i in range(writes):
        vol.write(rng.randrange(blocks) * 4096, bufs[i % 64])
        if i % 1024 == 1023:
            await vol.flush()
        if markers and i % every == every - 1:
            await vol.snapshot()
    await vol.flush()


def _get(url: str, token: str, sink: bool = False) -> tuple[float, int]:
    """Seconds for one GET (the whole body read), and its length."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    t0 = time.perf_counter()
    n = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        while chunk := r.read(4 * MiB if sink else -1):
            n += len(chunk)
            if not sink:
                break
    return time.perf_counter() - t0, n


def _cli(d: Cdpd, *args: str) -> float:
    t0 = time.perf_counter()
    d.cdpctl(*args)
    return time.perf_counter() - t0


def _admin(d: Cdpd, op: str, args: dict[str, Any]) -> float:
    """Seconds for one operation over the admin socket: cdpctl's path without starting
    a Python interpreter (which dominates a cdpctl run on a busy 2-core machine)."""
    c = AdminClient(d.store / "cdpd.sock")
    try:
        t0 = time.perf_counter()
        c.call(op, args, None)
        return time.perf_counter() - t0
    finally:
        c.close()


def _median(fn: Any, n: int) -> float:
    return float(statistics.median(fn() for _ in range(n)))


def run(writes: int, markers: int, big_mib: int, scratch: Path | None = None) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="web-bench-", dir=scratch))
    rows: list[dict[str, Any]] = []
    d = Cdpd(tmp, size="4GiB", segment_bytes="64MiB", l0_max_writes=65536)
    try:
        # ---- a volume with many writes and markers, built in process, then served
        settings = load_config(d.config)
        store = Store.open(settings, create=True)
        t0 = time.perf_counter()
        try:
            asyncio.run(_fill(store, writes, markers))
        finally:
            store.close()
        build = time.perf_counter() - t0
        d.start(timeout=300)
        token = (d.store / "http.token").read_text().strip()
        base = d.http_url + "/api/v1/volumes"
        st = d.cdpctl_json("status")
        _get(base + "/vol0/timeline?buckets=200", token)  # warm: index sidecars loaded once
        tl = _median(lambda: _get(base + "/vol0/timeline?buckets=200", token)[0], 5)
        tl_adm = _median(lambda: _admin(d, "timeline", {"volume": "vol0", "buckets": 200}), 5)
        rows.append({"what": f"timeline, {st['last_seq']} records, {st['markers']} markers, 200 buckets",
                     "api_ms": round(tl * 1e3, 1), "admin_socket_ms": round(tl_adm * 1e3, 1),
                     "goal_ms": 200, "build_s": round(build, 1)})

        # ---- an NTFS volume: a 1000-file directory and a big file
        img = tmp / "ntfs.img"
        big = big_mib * MiB

        def populate(m: Path) -> None:
            populate_many(m, 3000)
            with open(m / "big.bin", "wb") as f:
                for _ in range(big // (4 * MiB)):
                    f.write(os.urandom(4 * MiB))

        make_image(img, big + 512 * MiB, populate)
        d.cdpctl("volume", "create", "vol1", "--from-image", str(img), timeout=1200)
        d.cdpctl("snapshot", "-V", "vol1")
        deadline = time.monotonic() + 600
        while not d.cdpctl_json("versions", "-V", "vol1")["versions"]:
            assert time.monotonic() < deadline, "vol1 was not catalogued"
            time.sleep(0.5)
        ls_api = _median(lambda: _get(base + "/vol1/files?at=marker1&path=/d0001", token)[0], 5)
        ls_cli = _median(lambda: _cli(d, "files", "-V", "vol1", "--at", "marker1", "/d0001", "--json"), 5)
        ls_adm = _median(lambda: _admin(d, "files", {"volume": "vol1", "at": "marker1",
                                                     "path": "/d0001"}), 5)
        rows.append({"what": "files: a 1000-entry directory at a marker", "api_ms": round(ls_api * 1e3, 1),
                     "admin_socket_ms": round(ls_adm * 1e3, 1), "cdpctl_ms": round(ls_cli * 1e3, 1),
                     "ratio_vs_admin": round(ls_adm / ls_api, 2)})
        out = tmp / "big.out"
        r_api = _median(lambda: _get(base + "/vol1/restore?at=marker1&path=/big.bin", token, True)[0], 3)
        r_cli = _median(lambda: _cli(d, "restore", "-V", "vol1", "/big.bin", "--at", "marker1",
                                     "-o", str(out)), 3)
        r_adm = _median(lambda: _admin(d, "restore", {"volume": "vol1", "path": "/big.bin",
                                                      "at": "marker1", "output": str(out)}), 3)
        rows.append({"what": f"restore {big_mib} MiB", "api_mb_s": round(big / r_api / 1e6, 1),
                     "admin_socket_mb_s": round(big / r_adm / 1e6, 1),
                     "cdpctl_mb_s": round(big / r_cli / 1e6, 1),
                     "ratio_vs_admin": round(r_adm / r_api, 2), "goal_ratio": 0.7})
    finally:
        if d.proc is not None:
            d.stop()
        subprocess.run(["sync"], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=1_000_000)
    ap.add_argument("--markers", type=int, default=10_000)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--scratch", type=Path, help="directory for the temporary store")
    a = ap.parse_args()
    rows = run(a.writes, a.markers, a.big_mib, a.scratch)
    for r in rows:
        print(json.dumps(r))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
