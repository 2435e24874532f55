"""ext4 full index and marker diff vs. The Sleuth Kit, in the same run (mft_bench's twin).

    python -m tools.bench.ext4_bench [--quick]

* scan, parse only: every used inode of an image with 200k files (quick: 20k) parsed
  from the inode tables, inodes/s (best of 3), next to ``fls -r -p`` entries/s;
* full index: :meth:`Ext4.walk` (the inode scan, every directory read, every name
  joined to its inode: path, type, size, times, links), inodes/s, next to ``fls -r -p``;
  both also per CPU second of this process (the machine is shared: wall-clock rates
  vary with the load);
* marker diff after 100 files changed (appended to through fuse2fs): the inodes the
  changed 4 KiB blocks touch (``inodes_in``, parsed with ``read_inodes``) vs a full
  re-parse (goal: at least 50x fewer), the seconds of each, and the directories whose
  blocks changed;
* reading a 10k-entry (htree) directory with ``read_dir`` (best and median of 9);
* the catalog (:mod:`cdp.catalog.ext4index`): the full index end to end (compute and
  persist, as at a first marker; also its CPU time split: compute = scan, directories,
  plan; persist = SQLite insert, index build, COMMIT, checkpoint), the marker diff after
  the same 100 changed files (inodes parsed vs the full index's, goal: at least 50x
  fewer) and listing the 10k-entry directory from the catalog (goal: under 50 ms; best
  and median of 9; also with every entry turned into its JSON form, as ``files --at``
  does); next to ``fls -r -p`` (the full index, entries/s; ratio: cdp / fls) and ``fls
  -p`` of the one directory (the listing, ms; ratio: fls / cdp, so > 1 means cdp is
  faster).

``--index-only``: only the catalog's first full index and the listing, in CPU time, best
of several runs (:func:`tools.bench.mft_bench.index_cpu_rows`; what stays comparable on a
loaded machine).

Both sizes hold a real 10k-entry directory (``/big/d0000``, htree), so the listing row
is measured, not extrapolated. The image is built once (``mkfs.ext4 -d`` from a directory
tree, ``e2fsck -fD`` for the htree indexes; 20k files: ~25 s, 200k: ~1.5 min at load 5)
and cached under bench-results/. Prints cdp, peer, ratio, goal for each; ``run(quick)``
returns the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cdp.catalog.db import Catalog
from cdp.catalog.indexer import compute, persist
from cdp.ext4 import Ext4
from tools.bench.mft_bench import _row, changed_blocks, index_cpu_rows, print_table, reader
from tools.ext4_fixture import mkfs, mounted
from tools.ntfs_fixture import populate_many

CACHE = Path("bench-results")
PER_DIR = 1000  # mkfs -d inserts names linearly: 10k-entry directories take minutes


def build_image(files: int, big_dir: int) -> Path:
    """A cached ext4 image (default features, 4 KiB blocks) with *files* small files:
    one directory of *big_dir* entries, the rest in directories of :data:`PER_DIR`."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"ext4-{files}-{big_dir}.img"
    if not path.exists():
        tmp = path.with_suffix(".partial")
        with tempfile.TemporaryDirectory(dir=CACHE) as t:
            src = Path(t) / "src"
            big = src / "big"
            big.mkdir(parents=True)
            populate_many(big, big_dir, per_dir=big_dir)  # big/d0000/...: one directory
            populate_many(src, files - big_dir, per_dir=PER_DIR)
            size = max(256 << 20, files * 4096 + (256 << 20))
            mkfs(tmp, size, src, options=["-b", "4096", "-N", str(files + files // 10 + 1000)])
        tmp.rename(path)
    return path


def run(quick: bool = False) -> list[dict[str, Any]]:
    for tool in ("mkfs.ext4", "e2fsck", "fls", "fuse2fs"):
        if shutil.which(tool) is None:
            raise SystemExit(f"ext4_bench: requires {tool} (make sysdeps)")
    files = 20_000 if quick else 200_000
    big_dir = 10_000  # a real 10k-entry directory (mkfs -d: ~25 s of it)
    img = build_image(files, big_dir)
    size = img.stat().st_size
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="cdp-ext4-bench-", dir=CACHE))
    try:
        fs = Ext4.open(reader(img), 0, size)
        # ---- scan (parse only) and full index (walk), best of 3, vs fls -r -p
        scan_s = walk_s = scan_cpu = walk_cpu = 1e9
        used = names = 0
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            used = sum(len(chunk) for chunk in fs.scan())
            scan_s = min(scan_s, time.perf_counter() - t0)
            scan_cpu = min(scan_cpu, time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            names = sum(1 for _ in fs.walk())
            walk_s = min(walk_s, time.perf_counter() - t0)
            walk_cpu = min(walk_cpu, time.process_time() - c0)
        t0 = time.perf_counter()
        out = subprocess.run(["fls", "-r", "-p", str(img)], capture_output=True, check=True).stdout
        fls_s = time.perf_counter() - t0
        fls_rate = out.count(b"\n") / fls_s
        scan_rate, walk_rate = used / scan_s, used / walk_s
        rows.append(_row(f"ext4 scan, parse only ({used})", scan_rate, fls_rate, "fls -r -p",
                         "inodes/s", scan_rate / fls_rate, ">= 100000 inodes/s", scan_rate >= 100_000))
        rows.append(_row(f"ext4 full index, walk ({names} names)", walk_rate, fls_rate, "fls -r -p",
                         "inodes/s", walk_rate / fls_rate, ">= 100000 inodes/s", walk_rate >= 100_000))
        rows.append(_row("ext4 walk vs fls: seconds", walk_s, fls_s, "fls -r -p", "s",
                         fls_s / walk_s, "-", None))
        # the same per CPU second of this process: what a quiet machine would show
        rows.append(_row("ext4 CPU time: scan", used / scan_cpu, None, "-", "inodes/s", None, "-", None))
        rows.append(_row("ext4 CPU time: full index", used / walk_cpu, None, "-", "inodes/s", None,
                         "-", None))
        # ---- marker diff after 100 changed files vs a full re-parse
        img2 = work / "after.img"
        subprocess.run(["cp", "--sparse=always", str(img), str(img2)], check=True)
        with mounted(img2) as m:
            rest = files - big_dir
            for i in range(0, rest, max(rest // 100, 1))[:100]:
                with open(m / f"d{i // PER_DIR:04d}" / f"f{i:07d}.txt", "ab") as f:
                    f.write(b"changed")
        ranges = changed_blocks(img, img2)
        fs2 = Ext4.open(reader(img2), 0, size)
        t0 = time.perf_counter()
        touched = fs2.inodes_in(ranges)
        parsed = fs2.read_inodes(touched)
        diff_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = sum(len(chunk) for chunk in fs2.scan())
        full_s = time.perf_counter() - t0
        rows.append(_row("ext4 marker diff: inodes parsed", len(parsed), full, "full re-parse",
                         "inodes", full / max(len(parsed), 1), ">= 50x less work",
                         full >= 50 * len(parsed)))
        rows.append(_row("ext4 marker diff: seconds", diff_s, full_s, "full re-parse", "s",
                         full_s / max(diff_s, 1e-9), "-", None))
        changed_files = sum(1 for n, x in parsed.items() if x.is_reg and x.size != fs.inode(n).size)
        rows.append(_row("ext4 marker diff: files modified", changed_files, 100, "files changed",
                         "files", changed_files / 100, "100", changed_files >= 100))
        dirs = [w.inode for w in fs2.walk() if w.kind == "dir"]
        starts = sorted(ranges)
        hit = sum(1 for d in dirs if any(s < e2 and s2 < e for s, e in fs2.data_ranges(d)
                                         for s2, e2 in starts))
        rows.append(_row("ext4 marker diff: dirs changed", hit, len(dirs), "directories", "dirs",
                         None, "-", None))
        # ---- a 10k-entry directory listed by the parser
        bigdir = next(w.inode for w in fs.walk() if w.path == "/big/d0000")
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            n = len(fs.read_dir(bigdir))
            times.append(time.perf_counter() - t0)
        best, med = min(times) * 1000, sorted(times)[len(times) // 2] * 1000
        rows.append(_row(f"ext4 read_dir {n} entries (best)", best, None, "-", "ms", None,
                         "-", None))
        rows.append(_row(f"ext4 read_dir {n} entries (median)", med, None, "-", "ms", None,
                         "-", None))
        # the peer of a one-directory listing: fls of that directory (a process start,
        # the image opened, the directory read and printed)
        ftimes = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(["fls", "-p", str(img), str(bigdir.number)], capture_output=True, check=True)
            ftimes.append(time.perf_counter() - t0)
        rows += _catalog_rows(img, img2, ranges, size, work, fls_rate, min(ftimes) * 1000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _catalog_rows(img: Path, img2: Path, ranges: list[tuple[int, int]], size: int,
                  work: Path, fls_rate: float, fls_dir_ms: float) -> list[dict[str, Any]]:
    """The catalog on ext4: full index, marker diff, a 10k-entry listing; next to
    ``fls -r -p`` (entries/s) and ``fls`` of the one directory (ms, best of 3)."""
    rows: list[dict[str, Any]] = []
    cat = Catalog(work / "catalog.sqlite")
    t0, c0 = time.perf_counter(), time.process_time()
    full = asyncio.run(compute(reader(img), size, None, None, None, 1))
    c1 = time.process_time()
    asyncio.run(persist(cat, full, 1, 1, 1))  # CPU time: the index-build thread's too
    full_s, full_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows.append(_row(f"catalog ext4 full index end to end ({full.parsed} inodes)",
                     full.parsed / full_s, fls_rate, "fls -r -p", "inodes/s",
                     full.parsed / full_s / fls_rate, ">= 100000 inodes/s",
                     full.parsed / full_s >= 100_000))
    rows.append(_row("catalog ext4 full index, CPU time", full.parsed / full_cpu, fls_rate,
                     "fls -r -p (wall)", "inodes/s", full.parsed / full_cpu / fls_rate,
                     ">= 100000 inodes/s", full.parsed / full_cpu >= 100_000))
    n_in = max(full.parsed, 1)
    rows.append(_row("catalog ext4 full index, CPU: compute", (c1 - c0) * 1e6 / n_in, None, "-",
                     "us/inode", None, "-", None))
    rows.append(_row("catalog ext4 full index, CPU: persist", (c0 + full_cpu - c1) * 1e6 / n_in,
                     None, "-", "us/inode", None, "-", None))
    base = cat.last_version()

    def changed(base_seq: int, start: int, end: int) -> list[tuple[int, int]]:
        return ranges

    t0 = time.perf_counter()
    diff = asyncio.run(compute(reader(img2), size, cat, base, changed, 2))
    asyncio.run(persist(cat, diff, 2, 2, 2))
    diff_s = time.perf_counter() - t0
    p = diff.plans[0]
    rows.append(_row(f"catalog ext4 marker diff: inodes parsed ({len(p.modified)} modified)",
                     diff.parsed, full.parsed, "full index", "inodes",
                     full.parsed / max(diff.parsed, 1), ">= 50x less work",
                     full.parsed >= 50 * diff.parsed and diff.kind == "diff"))
    rows.append(_row("catalog ext4 marker diff: seconds", diff_s, full_s, "full index", "s",
                     full_s / max(diff_s, 1e-9), "-", None))
    cat.close()
    cat = Catalog(work / "catalog.sqlite", readonly=True)  # as cdpctl reads it offline
    times, cpu = [], []
    n = 0
    for _ in range(9):
        t0, c0 = time.perf_counter(), time.process_time()
        n = len(cat.list_dir("/big/d0000", 2))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    best, med = min(times) * 1000, sorted(times)[len(times) // 2] * 1000
    peer = f"fls -p of the directory ({fls_dir_ms:.0f} ms)"
    rows.append(_row(f"catalog ext4 listing {n} entries (best)", best, fls_dir_ms, peer, "ms",
                     fls_dir_ms / best, "< 50 ms", best < 50))
    rows.append(_row(f"catalog ext4 listing {n} entries (median)", med, fls_dir_ms, peer, "ms",
                     fls_dir_ms / med, "< 50 ms", med < 50))
    # CPU time of this process: what an idle core would take (the wall clock waits for
    # the CPU on a loaded machine)
    rows.append(_row(f"catalog ext4 listing {n} entries (CPU, best)", min(cpu) * 1000, fls_dir_ms,
                     peer, "ms", fls_dir_ms / (min(cpu) * 1000), "< 50 ms", min(cpu) * 1000 < 50))
    # what ``files --at`` of the directory builds (cdp.ops.catalog.files): every entry's
    # JSON form (before the JSON text and the socket)
    cpu = []
    for _ in range(9):
        c0 = time.process_time()
        n = len([e.to_dict() for e in cat.list_dir("/big/d0000", 2)])
        cpu.append(time.process_time() - c0)
    rows.append(_row(f"catalog ext4 listing {n} entries + to_dict (CPU, best)", min(cpu) * 1000,
                     fls_dir_ms, peer, "ms", fls_dir_ms / (min(cpu) * 1000), "-", None))
    cat.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k files instead of 200k")
    ap.add_argument("--index-only", action="store_true",
                    help="only the catalog's full index and listing, CPU time, best of several runs")
    a = ap.parse_args(argv)
    if a.index_only:
        files = 20_000 if a.quick else 200_000
        print_table(index_cpu_rows(build_image(files, 10_000), "/big/d0000", "inodes"))
        return 0
    print_table(run(a.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
