"""Scale, the wide half (issue 27): many volumes on one cdpd, a big file catalog, gc
over a long history. Opt-in suite ``scale-wide``.

    python -m tools.bench.scale_wide_bench [--quick] [--out DIR] [--volumes N]
        [--files N] [--markers N] [--history-gib N] [PART ...]

Parts (default: all three, in this order):

* ``volumes``: cdpd with one volume, then cdpd with N (64) volumes. fio
  ``--ioengine=nbd`` 4 KiB random writes: one connection at iodepth 32 on the
  one-volume daemon ("one volume at full speed"), then one job per volume (N NBD
  connections, iodepth 4 each) at once. Rows: the aggregate against the single volume
  (goal >= 0.9), fairness = the slowest volume's IOPS against the mean (goal >= 0.5;
  the p99 latencies of the slowest and fastest volume are named), and cdpd's RSS after
  the run against ``base + N x 24 MiB``, where base is the RSS of the one-volume daemon
  just started. The aggregate row also gives the CPU per write (µs) of cdpd and of fio
  in both runs (``/proc`` and the waited children's rusage). Two controls (report
  only; ``--no-control`` skips them): ``wide-volumes-shape``, the same N connections at
  iodepth 4 to *one* volume of a fresh cdpd (the aggregate against it is what N
  volumes cost beyond N connections), and ``wide-volumes-control``, both loads against
  ``nbdkit file dir=`` serving N sparse files (what the load's shape costs a C server
  and the rig: its N/1 ratio and CPU per write). Measured: cdpd's CPU per write rises
  from ~12 to ~21 µs from one connection to N = 64, by the same amount with 64
  connections to one volume, and nbdkit's from ~11 to ~20 µs: the rise is per
  connection (at most 4 requests per receive and per reply send), not per volume.
* ``catalog``: F files (200k) x M markers (50), every file modified at every marker
  (size and mtime change), so the catalog holds F x M file versions. Generated through
  the catalog's own update path, in-process: each marker is what
  :func:`cdp.catalog.indexer.compute` does after parsing (``Catalog.visible`` of the
  changed records at the base, a :class:`~cdp.catalog.rules.Resolver` falling back to
  ``Catalog.dir_info``, :func:`~cdp.catalog.rules.plan_steps` with the version rules)
  and :func:`cdp.catalog.indexer.persist` writes it (one transaction per marker,
  WAL checkpoint after it). Only the MFT parse is replaced: records are synthetic
  objects with the attributes the planner reads, and their entries come from a
  ``states_fn`` as :func:`cdp.catalog.ext4index.states_of_inode` makes them for ext.
  Files sit 100 to a directory under ``/data<k>/proj<j>``. Then the queries the CLI
  runs, timed with the conversion to dicts the ops do: ``files --at`` of a directory
  at a random marker (:class:`~cdp.catalog.indexer.View`), ``versions --path``
  (``Catalog.history`` + ``versions``), ``find`` by name glob with a literal prefix
  (10 names) and one without (``*_012345.*``, a single name); p99 of 200 (quick: 20)
  each, and the catalog file's size per version.
* ``gc``: the disk's sequential write speed (``dd conv=fdatasync``), then cdpd with
  retention ``all 5s`` (gc only on demand, everything else default, so compaction runs
  at its default ``compact_rate``): H GiB (8; quick 0.25) of compressible 64 KiB random
  writes (fio ``buffer_compress_percentage=75``: the journal stores about a third of
  it) over a 2 GiB region, so most of the history is overwritten. The reclaim rate is
  per second of the gc as cdpd reports it (``seconds``), without cdpctl's own start. After the tier
  cutoff passes, 4 KiB writes at a fixed 1,000 IOPS (fio, iodepth 4) for 10 s without
  gc, then again while ``cdpctl gc --now`` runs. Rows: bytes reclaimed per second of gc
  against dd (goal >= 0.8), write p99 latency during gc against without (goal <= 2x),
  the longest write during gc (goal <= 100 ms). Latencies are per write (fio's
  ``write_lat_log``), windowed to the gc's run. ``--gc-rate`` runs the gc at another
  compaction budget (``cdpctl gc --rate``; 0: unthrottled); without it the volume's
  default pacing applies (full speed while its host writes stay under
  ``compact_busy_writes``, 16 MiB/s; the bench's 1,000 writes/s are 4 MB/s).
  ``--write-size`` sets the history's write size (default 64 KiB; 4 KiB makes a history
  of small records, where the per-record cost of compaction shows), ``--gc-region`` the
  region it overwrites. A line per run on stderr puts reclaim/dd and the p99 during/
  without side by side.

Every cdpd runs the product's ``[maps]`` defaults (:func:`product_maps`; the test
harness's config seals every 2 s) with 64 MiB segments.

Quick mode (``--quick``, CI): 8 volumes, 2,000 files x 5 markers, 256 MiB of history;
no thresholds anywhere. Plots (matplotlib, when installed): per-volume IOPS and the
write latency over time during gc, in ``OUT/scale-wide-*.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cdp.catalog.db import CATALOG_FILE, Catalog, Version
from cdp.catalog.indexer import Computed, View, gc_paused, persist
from cdp.catalog.model import Entry
from cdp.catalog.rules import Plan, Resolver, plan_steps
from tools.bench.nbd_bench import dd_bandwidth, fio
from tools.harness import Cdpd, listening_port

MiB = 1 << 20
GiB = 1 << 30
PARTS = ("volumes", "catalog", "gc")


def _row(workload: str, cdp: float | None, peer: float | None, peer_name: str, unit: str,
         ratio: float | None, **extra: Any) -> dict[str, Any]:
    return {"workload": workload, "cdp": None if cdp is None else round(cdp, 3),
            "peer": None if peer is None else round(peer, 3), "peer_name": peer_name,
            "unit": unit, "ratio": None if ratio is None else round(ratio, 3), **extra}


def rss_mib(pid: int) -> float:
    """Resident set of process *pid* (``VmRSS``), MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def p99(xs: list[float]) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


# ---------------------------------------------------------------------- many volumes

def _volumes_config(n: int, size: str) -> str:
    return "".join(f'[[volume]]\nname = "vol{i}"\nsize = "{size}"\n' for i in range(1, n))


def product_maps(d: Cdpd) -> Cdpd:
    """*d* with the product's ``[maps]`` defaults but ``l0_max_writes`` (the test
    harness seals every 2 s and merges with fanout 4)."""
    text = d.config.read_text()
    for line in ('seal_interval = "2s"\n', "fanout = 4\n", "full_every = 8\n"):
        text = text.replace(line, "")
    d.config.write_text(text)
    return d


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process *pid* has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class _CpuMeter:
    """CPU seconds of the server *pid* and of the waited children (fio) over a block:
    ``server_us`` / ``client_us`` per write once ``writes`` is set."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.server = self.client = 0.0

    def __enter__(self) -> _CpuMeter:
        self._s0, self._c0 = cpu_s(self.pid), _children_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server = cpu_s(self.pid) - self._s0
        self.client = _children_cpu_s() - self._c0

    def per_write_us(self, writes: float) -> tuple[float, float]:
        w = max(writes, 1.0)
        return round(self.server / w * 1e6, 2), round(self.client / w * 1e6, 2)


def fio_per_volume(port: int, n: int, runtime: float, region: int, iodepth: int,
                   names: list[str] | None = None) -> list[dict[str, float]]:
    """One fio job per volume ``vol0..vol{n-1}`` (or per export of *names*; one NBD
    connection each), 4 KiB random writes for *runtime* s; per job: write IOPS and clat
    p99 (ms)."""
    jobs = ["[global]", "ioengine=nbd", "rw=randwrite", "bs=4k", f"iodepth={iodepth}",
            f"size={region}", "time_based", f"runtime={runtime}", "randrepeat=0", "norandommap",
            "thread"]
    for i, name in enumerate(names or [f"vol{i}" for i in range(n)]):
        jobs += [f"[v{i}]", f"uri=nbd://127.0.0.1:{port}/{name}"]
    with tempfile.NamedTemporaryFile("w", suffix=".fio", delete=False) as f:
        f.write("\n".join(jobs) + "\n")
        jobfile = f.name
    try:
        r = subprocess.run(["fio", "--output-format=json", jobfile], capture_output=True, text=True)
    finally:
        os.unlink(jobfile)
    if r.returncode:
        raise RuntimeError(f"fio ({n} volumes) exited {r.returncode}: {(r.stderr or r.stdout)[-2000:]}")
    out = []
    for j in json.loads(r.stdout[r.stdout.index("{"):])["jobs"]:
        w = j["write"]
        pct = w.get("clat_ns", {}).get("percentile", {})
        out.append({"iops": float(w["iops"]), "p99_ms": float(pct.get("99.000000", 0)) / 1e6})
    return out


def _nbdkit_dir(d: Path, n: int, size: int) -> subprocess.Popen[Any]:
    """``nbdkit file dir=D`` serving *n* sparse files ``vol0..vol{n-1}`` of *size*
    bytes, each an export of its name."""
    for i in range(n):
        with open(d / f"vol{i}", "wb") as f:
            f.truncate(size)
    return subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", "0",
                             "file", f"dir={d}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def run_control(base: Path, n: int, runtime: float, region: int) -> dict[str, Any]:
    """The rig's own loss (the control): the same two loads against ``nbdkit file``
    serving *n* sparse files as exports: one connection at iodepth 32, then *n* at
    iodepth 4 at once. A C server that costs little CPU per write: its n/1 ratio is what
    fio's *n* threads and *n* sockets cost the machine, not what cdpd does."""
    (base / "kit").mkdir()
    kit = _nbdkit_dir(base / "kit", n, GiB)
    try:
        port = listening_port(kit, "nbdkit")
        with _CpuMeter(kit.pid) as m1:
            one = fio(f"nbd://127.0.0.1:{port}/vol0", "randwrite", "4k", 32, 1, runtime, region)
        with _CpuMeter(kit.pid) as mn:
            per = fio_per_volume(port, n, runtime, region, 4)
    finally:
        kit.terminate()
        kit.wait(10)
        shutil.rmtree(base / "kit", ignore_errors=True)
    agg = sum(p["iops"] for p in per)
    return {"one": one["iops"], "agg": agg,
            "cpu_one": m1.per_write_us(one["iops"] * runtime),
            "cpu_many": mn.per_write_us(agg * runtime)}


def run_volumes(base: Path, n: int, quick: bool, plots: Path | None,
                control: bool = True) -> list[dict[str, Any]]:
    runtime = 3.0 if quick else 20.0
    region = 64 * MiB
    rows: list[dict[str, Any]] = []
    (base / "one").mkdir()
    one = product_maps(Cdpd(base / "one", size="1GiB", l0_max_writes=8192, segment_bytes="64MiB"))
    one.start()
    try:
        assert one.proc is not None
        time.sleep(1.0)
        base_rss = rss_mib(one.proc.pid)
        with _CpuMeter(one.proc.pid) as m1:
            single = fio(one.uri(), "randwrite", "4k", 32, 1, runtime, region)["iops"]
    finally:
        one.stop()
    shape = None
    if control:
        # the same load shape (n connections at iodepth 4) on one volume: what n
        # connections cost cdpd without n volumes
        (base / "shape").mkdir()
        sh = product_maps(Cdpd(base / "shape", size="1GiB", l0_max_writes=8192,
                               segment_bytes="64MiB"))
        sh.start()
        try:
            assert sh.proc is not None
            time.sleep(1.0)
            with _CpuMeter(sh.proc.pid) as ms:
                sper = fio_per_volume(sh.nbd_port, n, runtime, region, 4, ["vol0"] * n)
            shape = (sum(p["iops"] for p in sper), ms)
        finally:
            sh.stop()
        shutil.rmtree(base / "shape", ignore_errors=True)
    (base / "many").mkdir()
    many = product_maps(Cdpd(base / "many", size="1GiB", l0_max_writes=8192, segment_bytes="64MiB",
                             extra_config=_volumes_config(n, "1GiB")))
    many.start(timeout=120)
    try:
        assert many.proc is not None
        time.sleep(1.0)
        idle_rss = rss_mib(many.proc.pid)
        with _CpuMeter(many.proc.pid) as mn:
            per = fio_per_volume(many.nbd_port, n, runtime, region, 4)
        after_rss = rss_mib(many.proc.pid)
    finally:
        many.stop(timeout=300)
    iops = [p["iops"] for p in per]
    agg, mean = sum(iops), statistics.mean(iops)
    slow = min(range(n), key=lambda i: iops[i])
    fast = max(range(n), key=lambda i: iops[i])
    cpu1, cpun = m1.per_write_us(single * runtime), mn.per_write_us(agg * runtime)
    rows.append(_row(f"wide-volumes-aggregate ({n} volumes x 4 KiB randwrite, iodepth 4 each)",
                     agg, single, "one volume, iodepth 32", "IOPS", agg / single if single else None,
                     cdpd_us_per_write_one=cpu1[0], cdpd_us_per_write_many=cpun[0],
                     fio_us_per_write_one=cpu1[1], fio_us_per_write_many=cpun[1]))
    if shape is not None:
        cps = shape[1].per_write_us(shape[0] * runtime)
        rows.append(_row(f"wide-volumes-shape ({n} volumes / {n} connections to one volume, "
                         "iodepth 4 each)", agg, shape[0], f"one volume, {n} connections", "IOPS",
                         agg / shape[0] if shape[0] else None,
                         cdpd_us_per_write_shape=cps[0], fio_us_per_write_shape=cps[1],
                         shape_vs_one=round(shape[0] / single, 3) if single else None))
    if control:
        c = run_control(base, n, runtime, region)
        rows.append(_row(f"wide-volumes-control (nbdkit file, {n} exports x iodepth 4 / one, "
                         "iodepth 32)", c["agg"], c["one"], "nbdkit one export, iodepth 32", "IOPS",
                         c["agg"] / c["one"] if c["one"] else None,
                         nbdkit_us_per_write_one=c["cpu_one"][0],
                         nbdkit_us_per_write_many=c["cpu_many"][0],
                         fio_us_per_write_one=c["cpu_one"][1], fio_us_per_write_many=c["cpu_many"][1]))
    rows.append(_row(f"wide-volumes-fairness ({n} volumes: slowest / mean)", iops[slow], mean,
                     "mean volume", "IOPS", iops[slow] / mean if mean else None,
                     p99_slowest_ms=round(per[slow]["p99_ms"], 2),
                     p99_fastest_ms=round(per[fast]["p99_ms"], 2),
                     p99_max_ms=round(max(p["p99_ms"] for p in per), 2)))
    budget = base_rss + n * 24
    rows.append(_row(f"wide-volumes-rss ({n} volumes, after the run)", after_rss, budget,
                     f"base {base_rss:.0f} + {n} x 24 MiB", "MiB", after_rss / budget,
                     idle_rss_mib=round(idle_rss, 1), base_rss_mib=round(base_rss, 1),
                     per_volume_mib=round((after_rss - base_rss) / n, 2)))
    if plots is not None:
        _plot_volumes(plots, iops, single)
    return rows


def _plot_volumes(out: Path, iops: list[float], single: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(iops)), iops, label="per volume")
    mean = statistics.mean(iops)
    ax.axhline(mean, color="k", label=f"mean {mean:,.0f}")
    ax.axhline(mean / 2, color="r", ls="--", label="0.5 x mean (goal floor)")
    ax.set_xlabel("volume")
    ax.set_ylabel("4 KiB write IOPS")
    ax.set_title(f"{len(iops)} volumes at once: aggregate {sum(iops):,.0f} vs one volume {single:,.0f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale-wide-volumes.png", dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------- catalog

class _Name:
    """An NTFS file name as the planner reads it (``parent``, ``parent_sequence``, ``name``)."""

    __slots__ = ("name", "parent", "parent_sequence")

    def __init__(self, parent: int, name: str) -> None:
        self.parent, self.parent_sequence, self.name = parent, 1, name


class SynthRecord:
    """A parsed MFT record as :class:`~cdp.catalog.rules.Resolver` and the states
    function read it: in use, undamaged, one name; *size* and *mtime* are what a marker
    changes."""

    __slots__ = ("damaged", "in_use", "is_dir", "mtime", "names", "number", "sequence", "size")

    def __init__(self, number: int, parent: int, name: str, is_dir: bool, size: int, mtime: int) -> None:
        self.number, self.sequence, self.in_use, self.damaged = number, 1, True, ""
        self.is_dir, self.size, self.mtime = is_dir, size, mtime
        self.names = [_Name(parent, name)]

    def preferred_names(self) -> list[_Name]:
        return self.names


def synth_states(rec: SynthRecord, part: str, resolver: Resolver, backup_ns: int) -> list[Entry]:
    """The catalog entries of a synthetic record, shaped as NTFS's: a non-resident file
    with a one-run runlist (``location``), four timestamps, archive attributes."""
    n = rec.names[0]
    mt = rec.mtime
    loc = b"\x31\x08" + (rec.number * 8).to_bytes(3, "little") + b"\x00" if not rec.is_dir else b""
    alloc = (rec.size + 4095) & ~4095
    return [Entry(part, resolver.dir_path(n.parent, n.parent_sequence), n.name, 0, 0, 0, rec.number,
                  rec.sequence, n.parent, int(rec.is_dir), rec.size, alloc, mt - 86_400 * 10**9, mt,
                  mt, mt, 0x20 if not rec.is_dir else 0x10, 0, 0, loc, "", backup_ns)]


EXTS = (".docx", ".xlsx", ".pdf", ".txt", ".pptx", ".jpg", ".csv", ".msg")
PER_DIR = 100
FIRST_RECORD = 64  # NTFS's first user record; directories first, then files
T0 = 1_780_000_000 * 10**9


def file_name(i: int) -> str:
    return f"report_{i:06d}{EXTS[i % len(EXTS)]}"


def file_dir(i: int) -> tuple[int, str]:
    """(directory index, path) of file *i*: 100 a directory, 50 directories under each
    of the top-level ones."""
    d = i // PER_DIR
    return d, f"/data{d // 50:02d}/proj{d:05d}"


def _layout(files: int) -> tuple[int, int]:
    """(top-level directories, leaf directories) for *files* files."""
    leaves = (files + PER_DIR - 1) // PER_DIR
    return (leaves + 49) // 50, leaves


def _records(files: int, marker: int, with_dirs: bool) -> dict[int, SynthRecord]:
    tops, leaves = _layout(files)
    rng = random.Random(marker)
    out: dict[int, SynthRecord] = {}
    if with_dirs:
        for t in range(tops):
            out[FIRST_RECORD + t] = SynthRecord(FIRST_RECORD + t, 5, f"data{t:02d}", True, 0, T0)
        for d in range(leaves):
            num = FIRST_RECORD + tops + d
            out[num] = SynthRecord(num, FIRST_RECORD + d // 50, f"proj{d:05d}", True, 0, T0)
    first_file = FIRST_RECORD + tops + leaves
    mt = T0 + marker * 3600 * 10**9
    for i in range(files):
        num = first_file + i
        d = i // PER_DIR
        out[num] = SynthRecord(num, FIRST_RECORD + tops + d, file_name(i), False,
                               rng.randrange(1, 4 << 20), mt + i)
    return out


async def _catalog_marker(cat: Catalog, files: int, version: int, base: Version | None) -> None:
    """Catalog marker *version* as the background indexer does (see the module notes)."""
    backup_ns = T0 + version * 3600 * 10**9
    fp = {"name": "", "offset": 0, "size": 1 << 40, "fs": "ntfs", "serial": "00000000cafe0001"}
    with gc_paused():
        if base is None:
            new = _records(files, version, with_dirs=True)
            plan = Plan("", records=len(new))
            steps = plan_steps(plan, new, {}, Resolver("", new), backup_ns, states_fn=synth_states)
        else:
            new = _records(files, version, with_dirs=False)
            old = cat.visible("", new, base.version)
            plan = Plan("", records=len(new))
            bv = base.version
            resolver = Resolver("", new, lambda r: cat.dir_info("", r, bv))
            steps = plan_steps(plan, new, old, resolver, backup_ns,
                               lambda d: cat.subtree(d, bv), states_fn=synth_states)
        for _ in steps:
            await asyncio.sleep(0)
        c = Computed("full" if base is None else "diff", parts=[fp], plans=[plan],
                     parsed=len(new), changed_records=len(new))
        await persist(cat, c, version, version * 1000, backup_ns)


def build_catalog(path: Path, files: int, markers: int,
                  progress: Callable[[int, float], None] | None = None) -> float:
    """A catalog of *files* x *markers* file versions at *path* (see the module notes).
    Returns the seconds it took."""
    t0 = time.perf_counter()
    cat = Catalog(path)
    try:
        for v in range(1, markers + 1):
            asyncio.run(_catalog_marker(cat, files, v, cat.last_version()))
            if progress is not None:
                progress(v, time.perf_counter() - t0)
    finally:
        cat.close()
    return time.perf_counter() - t0


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def query_catalog(path: Path, files: int, markers: int, n: int) -> dict[str, Any]:
    """p99 (and median) ms of the CLI's catalog queries, and what they returned."""
    cat = Catalog(path, readonly=True)
    rng = random.Random(7)
    got: dict[str, int] = {}
    try:
        def files_at() -> None:
            v = rng.randint(1, markers)
            _, d = file_dir(rng.randrange(files))
            view = View(cat, v)
            got["files"] = len([e.to_dict() for e in view.list_dir(d)])

        def versions_path() -> None:
            i = rng.randrange(files)
            _, d = file_dir(i)
            vs = {x.version: x for x in cat.versions()}
            rows = [e.to_dict() for e in cat.history(d, file_name(i))]
            got["versions"] = len(rows) if vs else 0

        def find_prefix() -> None:
            i = rng.randrange(files // 10) * 10
            pat = f"report_{i // 10:05d}*"
            got["find_prefix"] = len([e.to_dict() for e in cat.glob(pat, on_path=False)])

        def find_any() -> None:
            i = rng.randrange(files)
            pat = f"*_{i:06d}.*"
            got["find_any"] = len([e.to_dict() for e in cat.glob(pat, on_path=False)])

        res: dict[str, Any] = {}
        for name, fn, k in (("files", files_at, n), ("versions", versions_path, n),
                            ("find_prefix", find_prefix, n), ("find_any", find_any, max(3, n // 10))):
            fn()  # warm
            ms = _timed(fn, k)
            res[name] = {"p99": p99(ms), "median": statistics.median(ms), "rows": got.get(name, 0)}
        rows = cat.reader.execute("SELECT count(*) FROM entries").fetchone()[0]
    finally:
        cat.close()
    res["rows"] = rows
    return res


def run_catalog(base: Path, files: int, markers: int, quick: bool) -> list[dict[str, Any]]:
    path = base / CATALOG_FILE

    def progress(v: int, s: float) -> None:
        if v == 1 or v % 5 == 0 or v == markers:
            print(f"   catalog: marker {v}/{markers} after {s:.0f} s", flush=True)

    secs = build_catalog(path, files, markers, progress)
    q = query_catalog(path, files, markers, 20 if quick else 200)
    size = sum(p.stat().st_size for p in base.glob(CATALOG_FILE + "*"))
    rows_n = q["rows"]
    label = f"{files:,} files x {markers} markers"
    return [
        _row(f"wide-catalog-generate ({label})", rows_n / secs, None, "-", "versions/s", None,
             seconds=round(secs, 1), versions=rows_n),
        _row(f"wide-catalog-files-at ({label}, {PER_DIR}-entry dir)", q["files"]["p99"], None, "-",
             "ms p99", None, median_ms=round(q["files"]["median"], 2), entries=q["files"]["rows"]),
        _row(f"wide-catalog-versions-path ({label})", q["versions"]["p99"], None, "-", "ms p99", None,
             median_ms=round(q["versions"]["median"], 2), entries=q["versions"]["rows"]),
        _row(f"wide-catalog-search ({label}, glob with a prefix)", q["find_prefix"]["p99"], None, "-",
             "ms p99", None, median_ms=round(q["find_prefix"]["median"], 2),
             entries=q["find_prefix"]["rows"]),
        _row(f"wide-catalog-search ({label}, glob without a prefix)", q["find_any"]["p99"], None, "-",
             "ms p99", None, median_ms=round(q["find_any"]["median"], 2),
             entries=q["find_any"]["rows"]),
        _row(f"wide-catalog-bytes ({label})", size / rows_n if rows_n else None, None, "-",
             "bytes/version", None, file_mib=round(size / MiB, 1)),
    ]


# ---------------------------------------------------------------------- gc

GC_CFG = """
[volume.retention]
tiers = ["all 5s"]
gc_interval = 0
"""


def _fio_lat(uri: str, runtime: float, region: int, logdir: Path, tag: str,
             stop: threading.Event | None = None) -> tuple[float, list[tuple[float, float]]]:
    """4 KiB random writes at 1,000 IOPS (iodepth 4) for *runtime* s, or until *stop*
    is set (then SIGINT: fio ends cleanly). Returns (start time, [(ms since start,
    latency ms)]) from fio's per-write completion latency log."""
    prefix = logdir / tag
    args = ["fio", "--name=lat", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
            "--iodepth=4", "--rate_iops=1000", f"--size={region}", "--time_based",
            f"--runtime={runtime}", "--randrepeat=0", "--norandommap",
            f"--write_lat_log={prefix}", "--log_avg_msec=0", "--output-format=json"]
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = False
    if stop is not None:
        while p.poll() is None and not stop.wait(0.1):
            pass
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            stopped = True
    _, err = p.communicate()
    if p.returncode and not (stopped and p.returncode in (1, 128, 130)):
        raise RuntimeError(f"fio latency run exited {p.returncode}: {err[-2000:]}")
    lats = []
    for f in logdir.glob(f"{tag}_clat.*.log"):
        for line in f.read_text().splitlines():
            cols = line.split(",")
            if len(cols) >= 2:
                lats.append((float(cols[0]), int(cols[1]) / 1e6))
        f.unlink()
    for f in logdir.glob(f"{tag}_*.log"):
        f.unlink()
    return t0, sorted(lats)


def run_gc(base: Path, history: int, quick: bool, plots: Path | None,
           rate: int | None = None, write_size: int = 64 << 10,
           region: int | None = None) -> list[dict[str, Any]]:
    """The gc rows (see the module notes); *rate*: ``cdpctl gc --rate`` in bytes/s (0:
    unthrottled), None for the volume's default pacing; *write_size*: the history's
    write (and so record) size; *region*: the volume bytes the history overwrites."""
    dd = dd_bandwidth(base, 256 if quick else 2048)
    if region is None:
        region = 2 * GiB if not quick else 256 * MiB
    (base / "gc").mkdir()
    d = product_maps(Cdpd(base / "gc", size="4GiB", segment_bytes="64MiB", l0_max_writes=8192,
                          extra_config=GC_CFG))
    d.start()
    rows: list[dict[str, Any]] = []
    try:
        assert d.proc is not None
        t = time.perf_counter()
        fio(d.uri(), "randwrite", f"{write_size // 1024}k", 16, 1, 0, region,
            (f"--io_size={history}", "--buffer_compress_percentage=75", "--refill_buffers",
             "--buffer_compress_chunk=4k"))
        fill_s = time.perf_counter() - t
        time.sleep(6.0)  # past the "all 5s" cutoff: the fill is all expired history
        lat_region = 256 * MiB
        _, quiet = _fio_lat(d.uri(), 5.0 if quick else 10.0, lat_region, base, "quiet")
        rss_before = rss_mib(d.proc.pid)
        out: dict[str, Any] = {}
        stop = threading.Event()

        def gc() -> None:
            time.sleep(1.0)
            out["t0"] = time.perf_counter()
            r = d.cdpctl("gc", "--now", "--json", *(() if rate is None else ("--rate", str(rate))),
                         timeout=3600)
            out["t1"] = time.perf_counter()
            out["result"] = json.loads(r.stdout)
            time.sleep(0.5)
            stop.set()

        th = threading.Thread(target=gc)
        th.start()
        try:
            f0, during = _fio_lat(d.uri(), 3600, lat_region, base, "during", stop)
        finally:
            stop.set()
            th.join()
        rss_after = rss_mib(d.proc.pid)
    finally:
        d.stop(timeout=300)
    r = out["result"]
    gc_s = out["t1"] - out["t0"]
    lo, hi = (out["t0"] - f0) * 1000, (out["t1"] - f0) * 1000
    window = [ms for at, ms in during if lo <= at <= hi]
    q = [ms for _, ms in quiet]
    # the store also grew by what was written during gc (4 KiB payloads, fio's default
    # incompressible buffers, plus a 48-byte record header each): count it as reclaimed
    freed = r["bytes_before"] - r["bytes_after"] + len(window) * (4096 + 48)
    # the gc's own time (cdpd's "seconds"): the client's wall clock adds cdpctl's start
    # (0.3-1 s of imports), a large part of an unthrottled gc of a few GiB
    gc_run_s = float(r.get("seconds") or gc_s)
    reclaim = freed / gc_run_s / 1e6
    how = ("default pacing" if rate is None else "unthrottled" if rate == 0
           else f"--rate {rate / MiB:g} MiB/s")
    label = (f"{history / GiB:g} GiB of {write_size // 1024} KiB writes, "
             f"{r['bytes_before'] / GiB:.2f} GiB stored, {how}")
    p_gc, p_q = p99(window), p99(q)
    print(f"gc {write_size // 1024} KiB records, {how}: reclaim {max(reclaim, 0.0):.0f} MB/s / dd "
          f"{dd:.0f} MB/s = {max(reclaim, 0.0) / dd if dd else 0:.2f} (goal >= 0.8) | write p99 "
          f"during {p_gc:.2f} ms / without {p_q:.2f} ms = {p_gc / p_q if p_q else 0:.2f}x "
          f"(goal <= 2x) | longest {max(window, default=0.0):.1f} ms (goal <= 100) | "
          f"gc {gc_run_s:.2f} s, {len(window)} writes during it", file=sys.stderr, flush=True)
    rows.append(_row(f"wide-gc-reclaim ({label})", max(reclaim, 0.0), dd, "dd conv=fdatasync", "MB/s",
                     max(reclaim, 0.0) / dd if dd else None, freed_mib=round(freed / MiB), gc_s=round(gc_run_s, 2),
                     cdpctl_s=round(gc_s, 2),
                     segments_compacted=r.get("segments_compacted"),
                     segments_considered=r.get("segments_considered"), fill_s=round(fill_s, 1),
                     stored_after_mib=round(r["bytes_after"] / MiB)))
    rows.append(_row(f"wide-gc-p99 ({label}, 4 KiB writes at 1,000/s)", p_gc, p_q, "without gc",
                     "ms p99", p_gc / p_q if p_q else None, writes_during_gc=len(window),
                     rss_before_mib=round(rss_before), rss_after_mib=round(rss_after)))
    rows.append(_row(f"wide-gc-pause ({label}, longest write during gc)", max(window, default=0.0),
                     max(q, default=0.0), "without gc", "ms max", None))
    if plots is not None:
        _plot_gc(plots, quiet, during, lo, hi)
    return rows


def _plot_gc(out: Path, quiet: list[tuple[float, float]], during: list[tuple[float, float]],
             lo: float, hi: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot([a / 1000 for a, _ in during], [m for _, m in during], ",", label="during the gc run")
    ax.axvspan(lo / 1000, hi / 1000, alpha=0.15, color="r", label="gc")
    ax.axhline(p99([m for _, m in quiet]), color="k", ls="--", label="p99 without gc")
    ax.set_yscale("log")
    ax.set_xlabel("s")
    ax.set_ylabel("4 KiB write latency (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale-wide-gc.png", dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------- suite

def run(quick: bool = False, out: Path | None = None, parts: list[str] | None = None,
        volumes: int | None = None, files: int | None = None, markers: int | None = None,
        history_gib: float | None = None, scratch: Path | None = None,
        gc_rate: int | None = None, write_size: int = 64 << 10,
        gc_region: int | None = None, control: bool = True) -> list[dict[str, Any]]:
    """The suite's rows (see the module notes); plots into *out* when given."""
    want = parts or list(PARTS)
    if ("volumes" in want or "gc" in want) and shutil.which("fio") is None:
        raise SystemExit("scale_wide_bench: requires fio (make sysdeps)")
    base = Path(tempfile.mkdtemp(prefix="cdp-scale-wide-", dir=scratch or Path.cwd()))
    rows: list[dict[str, Any]] = []
    try:
        if "volumes" in want:
            (base / "v").mkdir()
            rows += run_volumes(base / "v", volumes or (8 if quick else 64), quick, out, control)
        if "catalog" in want:
            (base / "c").mkdir()
            rows += run_catalog(base / "c", files or (2_000 if quick else 200_000),
                                markers or (5 if quick else 50), quick)
            shutil.rmtree(base / "c", ignore_errors=True)
        if "gc" in want:
            (base / "g").mkdir()
            h = history_gib if history_gib is not None else (0.25 if quick else 8.0)
            rows += run_gc(base / "g", int(h * GiB), quick, out, gc_rate, write_size, gc_region)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (harness check)")
    ap.add_argument("--out", type=Path, help="directory for the plots")
    ap.add_argument("--scratch", type=Path, help="directory for the stores (default: cwd)")
    ap.add_argument("--volumes", type=int)
    ap.add_argument("--files", type=int)
    ap.add_argument("--markers", type=int)
    ap.add_argument("--history-gib", type=float)
    ap.add_argument("--gc-rate", help="the gc part's compaction budget, bytes/s (cdpctl gc "
                    "--rate; 0: unthrottled; default: the volume's compact_rate, 64 MiB/s)")
    ap.add_argument("--write-size", default="64KiB", help="the gc part's history write "
                    "size (each a journal record; 4KiB shows the per-record cost)")
    ap.add_argument("--gc-region", help="the volume bytes the gc part's history overwrites "
                    "(default 2GiB; quick 256MiB)")
    ap.add_argument("--no-control", action="store_true",
                    help="volumes: skip the nbdkit control (the rig's own 1 -> N loss)")
    ap.add_argument("parts", nargs="*", metavar="PART", help=", ".join(PARTS))
    a = ap.parse_args(argv)
    bad = [p for p in a.parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part {bad[0]!r} (choose from {', '.join(PARTS)})")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
    from cdp.units import parse_size

    rate = None if a.gc_rate is None else parse_size(a.gc_rate, "--gc-rate")
    ws = parse_size(a.write_size, "--write-size")
    if ws < 4096 or ws % 4096:
        ap.error("--write-size: a multiple of 4 KiB")
    region = None if a.gc_region is None else parse_size(a.gc_region, "--gc-region")
    rows = run(a.quick, a.out, a.parts or None, a.volumes, a.files, a.markers, a.history_gib, a.scratch,
               rate, ws, region, not a.no_control)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
