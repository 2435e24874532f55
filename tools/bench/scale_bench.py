"""Scale against history length (issue 27, the history half): cdpd's memory, restart
time, past-point reads and ``changed`` at 1M, 10M (and 100M) writes of history.

    python -m tools.bench.scale_bench [--writes N[,N...]] [--hot SIZE] [--out DIR] [--scratch DIR]
    python -m tools.bench.scale_bench --store DIR --writes N --build-only   (build, keep)
    python -m tools.bench.scale_bench --store DIR --writes N                (measure it)
    python -m tools.bench.scale_bench --out DIR --plot-from A/scale.json B/scale.json  (one curve)
    python -m tools.bench scale            (opt-in suite: it is long)

History is generated through the real write path: the store is opened in-process
(``Store.open``, every service attached, as cdpd does) and ``Volume.write`` is called
for each 4 KiB write on the event loop, so the journal, the map engine (seals, merges,
full maps) and the services see exactly what an NBD write would give them. Between
checkpoints the store is closed and cdpd (a real daemon process) serves it; the
measurements are taken against that daemon.

Workload, on a sparse 1 TiB volume: a hot region of ``--hot`` bytes (default 2 GiB) in
the middle of the volume is first written once sequentially (4 KiB writes; the marker
``scale-base`` is taken after it: the "far back" point), then every further write is a
random 4 KiB block of that region. Payloads are compressible on purpose: a 16-byte
header (write number, offset) followed by a fixed pattern, which lz4 shrinks to tens of
bytes, so 100M writes fit in a few GB of disk. Memory and restart are per-record costs,
not per-byte ones, so this changes none of the quantities measured; reads of the live
volume and of the past point decode the same kind of payload.

Rows (one per checkpoint): ``rss_mib`` (cdpd VmRSS after the reads below, caches warm),
``rss_start_mib`` (right after start), ``restart_clean_s`` (process start to NBD
listening, after a clean stop), ``restart_kill9_s`` (the same after ``kill -9`` during a
fio random-write run; ``replayed`` records fed to the maps at that open),
``read_live_p50_us`` / ``read_past_p50_us`` (fio 4 KiB random reads at queue depth 1
over NBD, of the live volume and of ``vol0@scale-base``, the latter after
``past_region_ms``: the median first read of each 64 MiB region of the hot area at that
point, which resolves the region once for the view cache), ``read_past_warm_p50_us`` / ``read_live_warm_p50_us`` (the same reads again
after the journal segments holding the point's records and the live volume's were read
once into the page cache: the first passes pay the disk for whatever of a long history
the page cache no longer holds, the point's records being the oldest; ``past_cached_pct``
/ ``live_cached_pct`` / ``warm_cached_pct``: the share of those segments in the page
cache before the first passes and after the warming, from ``fincore``;
``disk_read_p50_us``: fio 4 KiB random reads at queue depth 1 with O_DIRECT of the point's
segments, what the disk costs a read the page cache cannot answer), ``changed_s`` (in-process
``Volume.changed(0, head)`` over the whole history; ``changed_cli_s`` the same through
``cdpctl changed --from origin``), ``ingest_wps`` (in-process writes per second of the
last stretch), ``ingest_rss_mib`` (RSS of the generating process, the store open with
its services, at the end of the stretch: the memory of a daemon that has been ingesting
since the previous checkpoint, where ``rss_mib`` is that of one freshly restarted),
``open_clean_s`` / ``open_kill9_s`` (the part of each restart spent in ``Store.open``,
from cdpd's log: the rest is Python's imports, which a loaded machine stretches),
``start_rest_s`` (``restart_clean_s`` less ``open_clean_s``: Python's imports and the
listeners), ``nbd_clean_s`` / ``nbd_kill9_s`` (process start to cdpd's "NBD on" log
line: serving NBD, before the later listeners (iSCSI, metrics, web) and the run file
that ``restart_*_s`` waits for), ``segments`` (journal segment files: sealed at ``segment_bytes`` or
``segment_records``, whichever comes first, so recovery scans a bounded open segment),
``disk_mib`` (store size). The store is verified (``cdpctl verify``, which reads every
record) at checkpoints up to ``--verify-upto`` writes. Plots: ``scale.png`` in the
output directory. ``pieces_s`` is the in-process cost of what ``cdpctl changed --from origin`` runs in
cdpd (the ``changed`` operation: ``changed`` refined to data/zero pieces, totals, ranges).

``--store DIR`` keeps the history in ``DIR`` (``DIR/scale-state.json`` records how many
writes it holds and the hot size): a later run with the same ``DIR`` extends it to its
checkpoints, or measures it as it is when a checkpoint equals what it holds (checkpoints
below it are skipped). ``--build-only`` generates without measuring, so a long history can
be built at low priority ahead of the measurement. Each measurement adds a few seconds of
fio writes (the kill -9 row) to the store, which stay in it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

VOLUME = 1 << 40
BLOCK = 4096
CHECKPOINTS = [1_000_000, 10_000_000]
QUICK_CHECKPOINTS = [50_000, 100_000]
_HDR = struct.Struct("<QQ")
_PATTERN = (bytes(range(256)) * (BLOCK // 256))[: BLOCK - _HDR.size]
_CHUNK = 1 << 16  # writes per random-offset draw (seeded per chunk: resumable)

CONFIG = """
[store]
path = "{store}"
[[volume]]
name = "vol0"
size = "1TiB"
"""


def payload(i: int, off: int) -> bytes:
    """The 4 KiB of write number *i* at *off*: a 16-byte header, then a fixed pattern."""
    return _HDR.pack(i, off) + _PATTERN


def offsets(first: int, last: int, hot_start: int, hot_blocks: int) -> np.ndarray:
    """Offsets of writes ``first .. last-1``: the sequential fill of the hot region, then
    random blocks of it. Deterministic (each chunk of ``_CHUNK`` writes has its own seed),
    so a history can be extended checkpoint by checkpoint."""
    out = np.empty(last - first, np.int64)
    i = first
    while i < last:
        c = i // _CHUNK
        lo, hi = c * _CHUNK, (c + 1) * _CHUNK
        blocks = np.random.default_rng(c).integers(0, hot_blocks, size=_CHUNK, dtype=np.int64)
        idx = np.arange(lo, hi, dtype=np.int64)
        blocks = np.where(idx < hot_blocks, idx, blocks)
        a, b = max(i, lo), min(last, hi)
        out[a - first : b - first] = hot_start + blocks[a - lo : b - lo] * BLOCK
        i = b
    return out


async def _ingest(vol: Any, first: int, last: int, hot_start: int, hot_blocks: int) -> None:
    """Write ``first .. last-1``. Offsets are drawn one ``_CHUNK`` at a time: a whole
    stretch's offsets as Python ints would cost ~40 bytes per write in this process and
    be counted in ``ingest_rss_mib`` as if the store held them."""
    write = vol.write
    pack = _HDR.pack
    pat = _PATTERN
    start = first
    while start < last:
        stop = min(last, (start // _CHUNK + 1) * _CHUNK)
        for k, off in enumerate(offsets(start, stop, hot_start, hot_blocks).tolist()):
            i = start + k
            r = write(off, pack(i, off) + pat)
            if r is not None:
                await r
            if i & 1023 == 0:
                await asyncio.sleep(0)  # let the seal tasks (group commit, then seal) run
            if i == hot_blocks - 1:
                await vol.snapshot("scale-base")
        start = stop


def generate(config: Path, first: int, last: int, hot: int) -> dict[str, float]:
    """Write ``first .. last-1`` into vol0 of the store *config* names, in-process through
    ``Volume.write`` with every service attached; close the store. Returns the ingest rate
    and the in-process cost of ``changed`` over the whole history, and the generating
    process's RSS at the end of the stretch (a long-running writer's memory)."""
    from cdp.config import load_config
    from cdp.store import Store

    hot_start = (VOLUME // 2) & ~(BLOCK - 1)
    hot_blocks = hot // BLOCK
    store = Store.open(load_config(config))
    try:
        vol = store.volume("vol0")
        t0 = time.perf_counter()
        asyncio.run(_ingest(vol, first, last, hot_start, hot_blocks))
        vol.seal()
        dt = time.perf_counter() - t0
        rss = _rss_mib(os.getpid())
        row = _inproc(store)
    finally:
        store.close()
    return {"ingest_wps": (last - first) / dt if dt else 0.0, "ingest_rss_mib": rss, **row}


def rss_ingest(scratch: str | os.PathLike[str] | None, writes: int, hot: int, every: int,
               trim: bool = True, max_disk: int = 2800 << 20) -> list[dict[str, Any]]:
    """The memory of one process that keeps ingesting (``--rss-ingest``): a fresh store
    (cdpd creates it), opened in-process with every service attached as cdpd opens it,
    *writes* 4 KiB writes through ``Volume.write`` (the sequential fill of a *hot*
    region, then random blocks of it, as :func:`generate`), without a restart. Every
    *every* writes a row: RSS, the maps' cache and head bytes, the process's CPU
    seconds, and the allocator trims (:mod:`cdp.memtrim`) so far. *trim* False turns
    the trims off (``memtrim.interval = 0``) for the comparison. The run stops early
    once the store passes *max_disk* bytes (about 380 bytes a write: journal and maps,
    nothing expired); the store is deleted."""
    from cdp import memtrim
    from cdp.config import load_config
    from cdp.store import Store
    from tools.harness import Cdpd

    base = Path(tempfile.mkdtemp(prefix="cdp-scale-rss-", dir=scratch or Path.cwd())).resolve()
    rows: list[dict[str, Any]] = []
    saved = memtrim.interval
    if not trim:
        memtrim.interval = 0.0
    try:
        cdpd = Cdpd(base)
        cdpd.config.write_text(CONFIG.format(store=cdpd.store))
        cdpd.start(timeout=120)  # creates the store and vol0, as a user would
        cdpd.stop()
        hot_start = (VOLUME // 2) & ~(BLOCK - 1)
        store = Store.open(load_config(cdpd.config))
        try:
            vol = store.volume("vol0")

            async def main() -> None:
                t0 = time.perf_counter()
                c0 = time.process_time()
                done = 0
                while done < writes:
                    nxt = min(writes, done + every)
                    await _ingest(vol, done, nxt, hot_start, hot // BLOCK)
                    done = nxt
                    st = vol.maps.stats()
                    row = {"workload": f"scale-rss-ingest ({done:,} writes, trim "
                                       f"{'on' if trim else 'off'})",
                           "writes": done, "rss_mib": round(_rss_mib(os.getpid()), 1),
                           "map_cache_mib": round(st["cache_bytes"] / 2**20, 1),
                           "head_mib": round(st["head_bytes"] / 2**20, 1),
                           "cpu_s": round(time.process_time() - c0, 1),
                           "wall_s": round(time.perf_counter() - t0, 1),
                           "trims": memtrim.calls, "trim_s": round(memtrim.seconds, 3),
                           "disk_mib": round(_du_mib(base), 0)}
                    row["cdp"], row["unit"] = row["rss_mib"], "MiB"
                    rows.append(row)
                    print("   " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                    if row["disk_mib"] * 2**20 > max_disk:
                        print(f"   the store passed {max_disk >> 20} MiB: stopping", flush=True)
                        break

            asyncio.run(main())
        finally:
            store.close()
    finally:
        memtrim.interval = saved
        shutil.rmtree(base, ignore_errors=True)
    return rows


def plot_rss(runs: list[list[dict[str, Any]]], path: str) -> bool:
    """RSS and the maps' cache against writes, one line per ``--rss-ingest`` run;
    False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for rows in runs:
        if not rows:
            continue
        tag = rows[0]["workload"].rsplit("trim ", 1)[-1].rstrip(")")
        xs = [r["writes"] / 1e6 for r in rows]
        ax.plot(xs, [r["rss_mib"] for r in rows], marker="o", label=f"RSS, malloc_trim {tag}")
    ax.plot(xs, [r["map_cache_mib"] for r in runs[-1]], ls="--", label="maps' cache (accounted)")
    ax.axhline(512, color="r", ls=":", label="goal 512 MiB")
    ax.set_xlabel("writes without a restart (millions)")
    ax.set_ylabel("MiB")
    ax.set_title("one process ingesting 4 KiB random writes (4 GiB hot region)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _inproc(store: Any) -> dict[str, float]:
    """In-process cost of ``Volume.changed`` and of the ``changed`` operation (what
    ``cdpctl changed --from origin`` runs in cdpd: pieces, totals, ranges) over the
    whole history of vol0."""
    from cdp.ops.backup import changed

    vol = store.volume("vol0")
    t0 = time.perf_counter()
    ranges = vol.changed(0, vol.head_seq)
    changed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = asyncio.run(changed(store, {"volume": "vol0", "from": "origin"}, lambda *a: None))
    pieces_s = time.perf_counter() - t0
    return {"changed_s": changed_s, "changed_ranges": len(ranges), "pieces_s": pieces_s,
            "pieces": r["data_pieces"] + r["zero_pieces"]}


def inproc(config: Path) -> dict[str, float]:
    """:func:`_inproc` on vol0 of the store *config* names, opened and closed here."""
    from cdp.config import load_config
    from cdp.store import Store

    store = Store.open(load_config(config))
    try:
        return _inproc(store)
    finally:
        store.close()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _fio_read_p50_us(uri: str, hot_start: int, hot: int, runtime: float) -> float:
    args = ["fio", "--name=r", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
            "--iodepth=1", f"--offset={hot_start}", f"--size={hot}", "--time_based",
            f"--runtime={runtime}", "--randrepeat=0", "--norandommap", "--output-format=json"]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"fio randread on {uri} exited {r.returncode}: {r.stderr[-2000:]}")
    j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    return float(j["read"]["clat_ns"]["percentile"]["50.000000"]) / 1000


def _first_touch_ms(uri: str, hot_start: int, hot: int) -> float:
    """Median latency (ms) of the first 4 KiB read of each 64 MiB region of the hot area
    at a past point: the one-time resolve of the region (``Volume._resolve``'s view
    cache), which the reads measured after it no longer pay."""
    from cdp.targets.nbd.client import NbdClient

    region = 64 << 20
    c = NbdClient.connect(uri)
    try:
        lat = []
        for off in range(hot_start, hot_start + hot, region):
            t0 = time.perf_counter()
            c.pread(off, BLOCK)
            lat.append((time.perf_counter() - t0) * 1e3)
    finally:
        c.close()
    return statistics.median(lat)


def _segments(store: Path) -> list[tuple[int, Path]]:
    """vol0's journal segment files with their first seqs (the name), in seq order."""
    segs = [(int(f.stem), f) for f in store.glob("volumes/vol0/journal/*.seg")]
    return sorted(segs)


def _cached_pct(files: list[Path]) -> float | None:
    """Percent of the bytes of *files* in the page cache (``fincore``), None without it."""
    if not files or shutil.which("fincore") is None:
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE",
                        *map(str, files)], capture_output=True, text=True)
    res = size = 0
    for line in r.stdout.splitlines():
        a, b = line.split()
        res, size = res + int(a), size + int(b)
    return round(100 * res / size, 1) if size else None


def _disk_read_p50_us(files: list[Path], runtime: float) -> float | None:
    """p50 (us) of 4 KiB random reads at queue depth 1 of *files* with O_DIRECT (fio,
    read-only): what the disk costs a read the page cache cannot answer."""
    if not files:
        return None
    args = ["fio", "--name=d", "--filename=" + ":".join(map(str, files)), "--rw=randread",
            "--bs=4k", "--direct=1", "--iodepth=1", "--readonly", "--time_based",
            f"--runtime={runtime}", "--output-format=json"]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        return None
    j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    return round(float(j["read"]["clat_ns"]["percentile"]["50.000000"]) / 1000, 1)


def _warm(files: list[Path]) -> None:
    """Read *files* once (into the page cache)."""
    buf = bytearray(1 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _du_mib(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total / 2**20


def _from_log(cdpd: Any, pattern: str) -> float | None:
    """The number the last log line matching *pattern* (one group) carries, if any."""
    found = re.findall(pattern, cdpd.logs())
    return float(found[-1]) if found else None


def _nbd_after(cdpd: Any, since: int, t0: float) -> float | None:
    """Seconds from *t0* (wall clock, the process start) to the first "NBD on" line cdpd
    logged after offset *since* of its log (log times have millisecond resolution)."""
    import datetime

    m = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO cdp\.daemon: NBD on ",
                  cdpd.logs()[since:], re.M)
    if not m:
        return None
    at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return round(at - t0, 2)


def measure(cdpd: Any, hot: int, runtime: float, verify: bool = True) -> dict[str, Any]:
    """Restart (clean, then after kill -9 mid-ingest), RSS, reads and ``changed`` of the
    store *cdpd* serves (stopped on entry and on return), then ``cdpctl verify`` if
    *verify*."""
    hot_start = (VOLUME // 2) & ~(BLOCK - 1)
    row: dict[str, Any] = {}
    since, w0 = len(cdpd.logs()), time.time()
    t0 = time.perf_counter()
    cdpd.start(timeout=600)
    row["restart_clean_s"] = round(time.perf_counter() - t0, 2)
    row["nbd_clean_s"] = _nbd_after(cdpd, since, w0)
    row["open_clean_s"] = _from_log(cdpd, r"store opened in ([0-9.]+) s")
    assert cdpd.proc is not None
    row["rss_start_mib"] = round(_rss_mib(cdpd.proc.pid), 1)
    row["read_live_p50_us"] = round(_fio_read_p50_us(cdpd.uri(), hot_start, hot, runtime), 1)
    row["past_region_ms"] = round(_first_touch_ms(cdpd.uri("vol0@scale-base"), hot_start, hot), 1)
    segs = _segments(cdpd.store)
    blocks = hot // BLOCK
    past_segs = [f for first, f in segs if first <= blocks + 1]  # the point's records
    # the live volume's records: a block's newest write is older than 10 x blocks writes
    # with probability e**-10, so these segments hold all but a few of them
    last = segs[-1][0] if segs else 0
    live_segs = [f for (first, f), (nxt, _) in zip(segs, [*segs[1:], (1 << 62, None)], strict=True)
                 if nxt > last - 10 * blocks]
    row["past_cached_pct"] = _cached_pct(past_segs)
    row["live_cached_pct"] = _cached_pct(live_segs)
    row["read_past_p50_us"] = round(
        _fio_read_p50_us(cdpd.uri("vol0@scale-base"), hot_start, hot, runtime), 1)
    row["disk_read_p50_us"] = _disk_read_p50_us(past_segs, runtime)
    # the same reads with both sides' segments read into the page cache first: the first
    # passes pay the disk for whatever of a long history the page cache no longer holds
    # (the point's records are the oldest); these, what cdp's own read path costs
    _warm(past_segs + live_segs)
    row["warm_cached_pct"] = _cached_pct(past_segs + live_segs)
    row["read_past_warm_p50_us"] = round(
        _fio_read_p50_us(cdpd.uri("vol0@scale-base"), hot_start, hot, runtime), 1)
    row["read_live_warm_p50_us"] = round(_fio_read_p50_us(cdpd.uri(), hot_start, hot, runtime), 1)
    t0 = time.perf_counter()
    ch = cdpd.cdpctl_json("changed", "--from", "origin")
    row["changed_cli_s"] = round(time.perf_counter() - t0, 2)
    row["changed_bytes_gib"] = round(ch["changed_bytes"] / 2**30, 2)
    row["rss_mib"] = round(_rss_mib(cdpd.proc.pid), 1)
    # kill -9 while fio writes, then the time to serve again
    fio = subprocess.Popen(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri={cdpd.uri()}", "--rw=randwrite",
         "--bs=4k", "--iodepth=32", f"--offset={hot_start}", f"--size={hot}", "--time_based",
         "--runtime=60", "--randrepeat=0", "--norandommap"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(max(2.0, runtime))
    cdpd.kill9()
    fio.wait(60)
    since, w0 = len(cdpd.logs()), time.time()
    t0 = time.perf_counter()
    cdpd.start(timeout=600)
    row["restart_kill9_s"] = round(time.perf_counter() - t0, 2)
    row["nbd_kill9_s"] = _nbd_after(cdpd, since, w0)
    row["open_kill9_s"] = _from_log(cdpd, r"store opened in ([0-9.]+) s")
    log = cdpd.logs()
    rep = re.findall(r"replayed ([0-9]+) records", log[log.rfind("store opened in"):])
    row["replayed"] = int(rep[0]) if rep else 0
    print("   " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if verify:  # O(history): every record's checksum
        ver = cdpd.cdpctl("verify", check=False, timeout=3600)
        row["verify_ok"] = ver.returncode == 0
        if not row["verify_ok"]:
            print(ver.stdout + ver.stderr, file=sys.stderr)
    cdpd.stop()
    row["disk_mib"] = round(_du_mib(cdpd.store), 1)
    if row["open_clean_s"] is not None:
        row["start_rest_s"] = round(row["restart_clean_s"] - row["open_clean_s"], 2)
    row["segments"] = sum(1 for _ in cdpd.store.glob("volumes/*/journal/*.seg"))
    return row


def run(quick: bool = False, out: str | os.PathLike[str] | None = None,
        writes: list[int] | None = None, hot: int = 2 << 30,
        scratch: str | os.PathLike[str] | None = None, verify_upto: int = 1_000_000,
        keep: bool = False, store: str | os.PathLike[str] | None = None,
        build_only: bool = False) -> list[dict[str, Any]]:
    """Build the history checkpoint by checkpoint and measure each; return the rows.
    ``cdpctl verify`` (which reads every record) runs at checkpoints up to
    *verify_upto* writes; *keep* leaves the store in the scratch directory. *store*: a
    directory that keeps the history between runs (see the module docstring);
    *build_only*: generate, measure nothing."""
    from tools.harness import Cdpd

    if shutil.which("fio") is None:
        raise SystemExit("scale_bench: requires fio (make sysdeps)")
    points = sorted(writes or (QUICK_CHECKPOINTS if quick else CHECKPOINTS))
    if quick or points[-1] <= 200_000:
        hot = min(hot, max(BLOCK, points[0] // 4 * BLOCK))  # the fill must end early
    runtime = 1.0 if quick else 5.0
    done = 0
    if store is not None:
        keep = True
        base = Path(store).resolve()
        base.mkdir(parents=True, exist_ok=True)
        state_file = base / "scale-state.json"
        if state_file.exists():
            state = json.loads(state_file.read_text())
            done, hot = int(state["writes"]), int(state["hot"])
    else:
        base = Path(tempfile.mkdtemp(prefix="cdp-scale-", dir=scratch or Path.cwd())).resolve()
    rows: list[dict[str, Any]] = []
    try:
        cdpd = Cdpd(base)
        cdpd.config.write_text(CONFIG.format(store=cdpd.store))
        if done == 0:
            cdpd.start(timeout=120)  # creates the store and vol0, as a user would
            cdpd.stop()
        for target in points:
            if target < done:
                print(f"   {target:,} writes: the store holds {done:,} already; skipped")
                continue
            g = generate(cdpd.config, done, target, hot) if target > done else inproc(cdpd.config)
            done = target
            if store is not None:
                (base / "scale-state.json").write_text(json.dumps({"writes": done, "hot": hot}))
            if build_only:
                print(f"   built {done:,} writes in {base}: {g}", flush=True)
                continue
            row: dict[str, Any] = {"workload": f"scale-rss ({target:,} writes)",
                                   "writes": target, "hot_gib": round(hot / 2**30, 3),
                                   "ingest_wps": round(g.get("ingest_wps", 0)) or None,
                                   "ingest_rss_mib": round(g.get("ingest_rss_mib", 0), 1) or None,
                                   "changed_s": round(g["changed_s"], 3),
                                   "changed_ranges": g["changed_ranges"],
                                   "pieces_s": round(g["pieces_s"], 3), "pieces": g["pieces"]}
            try:
                row.update(measure(cdpd, hot, runtime, verify=target <= verify_upto))
            finally:
                if cdpd.proc is not None:
                    cdpd.kill9()
            row["cdp"], row["unit"] = row.get("rss_mib"), "MiB"
            rows.append(row)
            print("   " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    if out and rows:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "scale.json"), "w") as f:
            json.dump(rows, f, indent=1)
        plot(rows, os.path.join(out, "scale.png"))
    return rows


def plot(rows: list[dict[str, Any]], path: str) -> bool:
    """Cost against history length, four panels; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))

    def line(i: int, key: str, style: str, label: str) -> None:
        """One series, skipping rows without *key* (older rows, a measured-only store)."""
        pts = [(r["writes"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax[i].plot(*zip(*pts, strict=True), style, label=label)

    line(0, "rss_mib", "o-", "cdpd RSS, caches warm")
    line(0, "rss_start_mib", "s--", "cdpd RSS at start")
    line(0, "ingest_rss_mib", "^-", "RSS while ingesting")
    ax[0].set_ylabel("MiB")
    line(1, "nbd_clean_s", "o-", "after clean stop")
    line(1, "nbd_kill9_s", "s-", "after kill -9")
    ax[1].set_ylabel("restart to NBD serving (s)")
    line(2, "read_live_p50_us", "o-", "live")
    line(2, "read_past_p50_us", "s-", "past point (scale-base)")
    line(2, "read_live_warm_p50_us", "o:", "live, segments cached")
    line(2, "read_past_warm_p50_us", "s:", "past point, segments cached")
    ax[2].set_ylabel("4 KiB random read p50, QD1 (us)")
    line(3, "changed_s", "o-", "Volume.changed (in-process)")
    line(3, "changed_cli_s", "s-", "cdpctl changed")
    ax[3].set_ylabel("changed over the whole history (s)")
    for i, y, what in ((0, 512, "goal at 100M"), (1, 2, "goal, clean"), (1, 10, "goal, kill -9"),
                       (3, 10, "goal")):
        ax[i].axhline(y, color="r", ls="--", lw=0.8, label=what)
    for a in ax:
        a.set_xscale("log")
        a.set_xlabel("writes in history")
        a.grid(True, alpha=0.3)
        a.set_ylim(bottom=0)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")
    return True


def main(argv: list[str] | None = None) -> int:
    from cdp.units import parse_size

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny checkpoints (harness check)")
    p.add_argument("--writes", default="",
                   help="checkpoints, comma-separated (default 1000000,10000000)")
    p.add_argument("--hot", default="2GiB", help="hot region written at random (default 2GiB)")
    p.add_argument("--out", default="bench-results", help="directory for json + png")
    p.add_argument("--scratch", default=None, help="directory for the store (default: cwd)")
    p.add_argument("--verify-upto", type=int, default=1_000_000,
                   help="run cdpctl verify at checkpoints up to this many writes")
    p.add_argument("--keep", action="store_true", help="keep the store")
    p.add_argument("--store", default=None,
                   help="keep the history in this directory and reuse it on later runs")
    p.add_argument("--build-only", action="store_true",
                   help="generate the history up to the checkpoints, measure nothing")
    p.add_argument("--plot-from", nargs="+", metavar="JSON", default=None,
                   help="measure nothing: plot the rows of these scale.json files (runs "
                        "of different stores, e.g. 1M, 10M and 100M) into OUT/scale.png")
    p.add_argument("--rss-ingest", default=None, metavar="N",
                   help="measure only the memory of one process ingesting N writes without "
                        "a restart into a fresh store (rows every --rss-every writes)")
    p.add_argument("--rss-every", default="500000", help="--rss-ingest: writes between rows")
    p.add_argument("--no-trim", action="store_true",
                   help="--rss-ingest: no allocator trims after seals (cdp.memtrim), to compare")
    p.add_argument("--max-disk", default="2800MiB",
                   help="--rss-ingest: stop once the store passes this size (default 2800MiB)")
    p.add_argument("--plot-rss", nargs="+", metavar="JSON", default=None,
                   help="measure nothing: plot --rss-ingest runs into OUT/scale-rss-ingest.png")
    a = p.parse_args(argv)
    if a.plot_rss:
        os.makedirs(a.out, exist_ok=True)
        runs = [json.loads(Path(f).read_text()) for f in a.plot_rss]
        return 0 if plot_rss(runs, os.path.join(a.out, "scale-rss-ingest.png")) else 1
    if a.rss_ingest:
        rows = rss_ingest(a.scratch, int(float(a.rss_ingest)), parse_size(a.hot),
                          int(float(a.rss_every)), not a.no_trim, parse_size(a.max_disk))
        os.makedirs(a.out, exist_ok=True)
        name = f"scale-rss-ingest-{'notrim' if a.no_trim else 'trim'}.json"
        with open(os.path.join(a.out, name), "w") as f:
            json.dump(rows, f, indent=1)
        plot_rss([rows], os.path.join(a.out, "scale-rss-ingest.png"))
        return 0
    if a.plot_from:
        rows = sorted((r for f in a.plot_from for r in json.loads(Path(f).read_text())),
                      key=lambda r: r["writes"])
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "scale.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return 0 if plot(rows, os.path.join(a.out, "scale.png")) else 1
    pts = [int(float(x)) for x in a.writes.split(",") if x] or None
    run(a.quick, a.out, pts, parse_size(a.hot), a.scratch, a.verify_upto, a.keep, a.store,
        a.build_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
