"""Compaction benchmark: ingest IOPS while retention compacts vs. without, and
compaction throughput.

    python -m tools.bench.compaction_bench [--quick] [--json]

Rows:

- ``ingest-during-compaction``: fio --ioengine=nbd randwrite 4 KiB (iodepth 32) against
  cdpd, IOPS while ``cdpctl gc --now`` compacts a journal full of dead data (median of
  3 runs) vs. the median of the same runs before the fill and after gc finished (3
  each; --quick: one run each). Goal: ratio >= 0.8 (compaction is throttled by
  ``compact_rate`` and copies in a worker thread).
- ``compaction-throughput``: MB of segment read (and rewritten) per second of gc, with
  the bench's ``compact_rate`` (0 = unthrottled in the throughput row).

``run(quick)`` returns the rows as dicts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tools.bench.nbd_bench import fio
from tools.harness import Cdpd

CFG = """
[volume.retention]
tiers = ["all 1s"]
gc_interval = 0
compact_below = 0.9
compact_rate = "{rate}"
"""


def _fill(d: Cdpd, size: int, seconds: float) -> None:
    """Overwrite a small region many times: almost everything becomes dead after gc."""
    fio(d.uri(), "randwrite", "64k", 16, 1, seconds, size)


def _gc(d: Cdpd, out: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    # the gc compacts ~10 GB at the compact_rate budget (64 MiB/s): minutes, not seconds
    r = d.cdpctl("gc", "--now", "--json", timeout=3600)
    out["seconds"] = time.perf_counter() - t0
    out["result"] = json.loads(r.stdout)


def run(quick: bool = False) -> list[dict[str, Any]]:
    runtime = 5 if quick else 20
    reps = 1 if quick else 3
    fill = 2 if quick else 30
    size = 64 << 20
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cdp-compact-bench-") as tmp:
        # ingest with and without compaction (throttled)
        (Path(tmp) / "a").mkdir()
        d = Cdpd(Path(tmp) / "a", size="1GiB", segment_bytes="8MiB", l0_max_writes=8192,
                 extra_config=CFG.format(rate="64MiB"))
        d.start()
        try:
            def ingest() -> float:
                return float(fio(d.uri(), "randwrite", "4k", 32, 1, runtime, size)["iops"])

            before = [ingest() for _ in range(reps)]
            _fill(d, 16 << 20, fill)
            time.sleep(1.5)
            out: dict[str, Any] = {}
            t = threading.Thread(target=_gc, args=(d, out))
            t.start()
            during = [ingest() for _ in range(reps)]
            gc_alive = t.is_alive()
            t.join()
            # the same runs again once gc is done: the baseline is the median of the runs
            # before the fill and after gc, so drift of the machine over the minutes gc
            # takes weighs on both sides (single 20 s runs without gc differ by up to 20%)
            after = [ingest() for _ in range(reps)]
            without = statistics.median(before + after)
            dur = statistics.median(during)
            r = out["result"]
            rows.append({
                "test": "ingest-during-compaction", "unit": "IOPS", "cdp": round(dur, 1),
                "peer": f"{without:.1f} (no gc)", "ratio": round(dur / without, 3),
                "result": "pass" if dur / without >= 0.8 else "fail",
                "runs": {"before": [round(x) for x in before],
                         "during": [round(x) for x in during],
                         "after": [round(x) for x in after]},
                "gc_outlasted_fio": gc_alive, "segments_compacted": r["segments_compacted"],
            })
        finally:
            d.stop()
        # compaction throughput, unthrottled
        (Path(tmp) / "b").mkdir()
        d = Cdpd(Path(tmp) / "b", size="1GiB", segment_bytes="8MiB", l0_max_writes=8192,
                 extra_config=CFG.format(rate="0"))
        d.start()
        try:
            _fill(d, 16 << 20, fill)
            time.sleep(1.5)
            out = {}
            _gc(d, out)
            r = out["result"]
            mb = r["bytes_before"] / 1e6
            rows.append({
                "test": "compaction-throughput", "unit": "MB/s",
                "cdp": round(mb / out["seconds"], 1), "peer": "-", "ratio": "-",
                "result": "info", "bytes_before": r["bytes_before"],
                "bytes_after": r["bytes_after"], "segments_compacted": r["segments_compacted"],
            })
        finally:
            d.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compaction_bench")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = run(a.quick)
    if a.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    for r in rows:
        print(f"{r['test']:<26} {r['unit']:<5} {r['cdp']!s:<10} {r['peer']!s:<20} "
              f"{r['ratio']!s:<6} {r['result']}  "
              + " ".join(f"{k}={v}" for k, v in r.items()
                         if k not in ("test", "unit", "cdp", "peer", "ratio", "result")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
