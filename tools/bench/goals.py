"""Every performance goal of cdp, in one table: workload → goal.

A goal is either a ratio against the peer measured in the same run (``ratio >= x``), or
an absolute bound on cdp's own figure (``min``/``max`` in the row's unit), because some
workloads have no peer (map engine seal rate, resolve latency). The issue that set the
goal is named so a reader can find why.

``python -m tools.bench`` judges every row against this table; the suites import their
ratio goals from here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Goal:
    kind: str  # "ratio" (>=) | "ratio_max" (<=) | "min" | "max" (cdp's own figure)
    value: float
    text: str
    issue: int


GOALS: dict[str, Goal] = {
    # the disk itself: the physical limit of an append-only journal (issue 10)
    # journal (issue 2)
    "seq-1MiB": Goal("ratio", 0.90, ">= 0.90 x dd conv=fdatasync", 2),
    "buffered-4KiB": Goal("min", 200_000, ">= 200k records/s", 2),
    "compressible-1MiB": Goal("ratio", 1.00, "> dd bandwidth", 2),
    # map engine (issue 3): absolute, at the largest history measured
    "mapengine-seal": Goal("min", 200_000, ">= 200k writes/s", 3),
    "mapengine-resolve": Goal("max", 200, "median <= 200 us at 10M writes", 3),
    # NBD target (issues 4, 10)
    "nbd-randwrite-4k": Goal("ratio", 0.60, ">= 0.60 x nbdkit file", 4),
    "nbd-seqwrite-1m": Goal("ratio", 0.90, ">= 0.90 x dd conv=fdatasync", 4),
    "nbd-randread-4k": Goal("ratio", 0.70, ">= 0.70 x nbdkit file", 4),
    # reads (issue 23): one connection and four, quiet or beside a CPU burner; a
    # fragmented history; an image of a long history
    "nbd-randread-4k x1": Goal("ratio", 0.90, ">= 0.90 x nbdkit file", 23),
    "nbd-randread-4k x4": Goal("ratio", 1.30, ">= 1.3 x nbdkit file", 23),
    "nbd-fragread-4k": Goal("ratio", 0.90, ">= 0.90 x nbdkit file (same writes)", 23),
    "image": Goal("ratio", 0.80, ">= 0.80 x qemu-img convert from nbdkit file", 23),
    "pit-read": Goal("ratio", 0.50, ">= 0.50 x nbdkit file", 4),
    "nbd-flush": Goal("ratio", 1.50, ">= 1.5 x nbdkit file", 10),
    # a client pipelining 1 KiB READs, reading replies only between sends (issue 28)
    "nbd-pipelined-1k": Goal("ratio", 0.80, ">= 0.80 x nbdkit file", 28),
    # proxy (splitter) mode vs `nbdkit file` on the same kind of primary file (issue 23)
    "proxy-randwrite-4k ack=primary": Goal("ratio", 0.70, ">= 0.70 x nbdkit file", 23),
    "proxy-randwrite-4k ack=both": Goal("ratio", 0.50, ">= 0.50 x nbdkit file", 23),
    "proxy-randread-4k": Goal("ratio", 0.70, ">= 0.70 x nbdkit file", 23),
    # iSCSI target (issue 6)
    "randread-4k": Goal("ratio", 0.70, ">= 0.70 x tgt", 6),
    "randwrite-4k": Goal("ratio", 0.70, ">= 0.70 x tgt", 6),
    # files (issue 5)
    "MFT scan": Goal("min", 100_000, ">= 100k records/s", 5),
    "full index": Goal("min", 100_000, ">= 100k records/s", 5),
    "marker diff: records parsed": Goal("ratio", 50, ">= 50x fewer records than a full re-parse", 5),
    # files on ext4 (issue 25): the NTFS goals
    "ext4 scan": Goal("min", 100_000, ">= 100k inodes/s", 25),
    "ext4 full index": Goal("min", 100_000, ">= 100k inodes/s", 25),
    "ext4 marker diff: inodes parsed": Goal("ratio", 50, ">= 50x fewer inodes than a full re-parse", 25),
    # retention (issue 7)
    "ingest-during-compaction": Goal("ratio", 0.80, ">= 0.80 x ingest without gc", 7),
    # export (issue 8)
    "export-1%-throughput": Goal("ratio", 0.70, ">= 0.70 x raw-file read", 8),
    "export-1%-throughput-warm": Goal("ratio", 0.70, ">= 0.70 x raw-file read (warm cache)", 23),
    "export-proportional": Goal("ratio_max", 3.0, "s per changed GiB within 3x across 0.1..10%", 8),
    # ransomware sentinel (issue 21): ingest with the sentinel on vs off
    "sentinel-randwrite-4k": Goal("ratio", 0.95, ">= 0.95 x sentinel off", 21),
    "sentinel-seqwrite-1m": Goal("ratio", 0.95, ">= 0.95 x sentinel off", 21),
    # scale, the wide half (issue 27): many volumes, a big catalog, gc over a long history
    "wide-volumes-aggregate": Goal("ratio", 0.90, ">= 0.90 x one volume", 27),
    "wide-volumes-fairness": Goal("ratio", 0.50, "slowest >= 0.50 x mean", 27),
    "wide-volumes-rss": Goal("ratio_max", 1.0, "<= base + N x 24 MiB", 27),
    "wide-catalog-files-at": Goal("max", 50, "p99 <= 50 ms", 27),
    "wide-catalog-versions-path": Goal("max", 20, "p99 <= 20 ms", 27),
    "wide-catalog-search": Goal("max", 200, "p99 <= 200 ms", 27),
    "wide-catalog-bytes": Goal("max", 120, "<= 120 bytes per version", 27),
    "wide-gc-reclaim": Goal("ratio", 0.80, ">= 0.80 x dd conv=fdatasync", 27),
    "wide-gc-p99": Goal("ratio_max", 2.0, "<= 2 x without gc", 27),
    "wide-gc-pause": Goal("max", 100, "<= 100 ms", 27),
}


def goal_for(workload: str) -> Goal | None:
    """The goal whose key is the longest prefix of *workload* (None: report only)."""
    best = None
    for key, g in GOALS.items():
        if workload.startswith(key) and (best is None or len(key) > len(best[0])):
            best = (key, g)
    return best[1] if best else None


def judge(row: dict[str, Any]) -> str:
    """'pass' / 'short' / '-' for one normalised row (workload, cdp, ratio)."""
    g = goal_for(str(row.get("workload", "")))
    if g is None:
        return "-"
    if g.kind in ("ratio", "ratio_max"):
        r = row.get("ratio")
        if r is None:
            return "-"
        return "pass" if (r >= g.value if g.kind == "ratio" else r <= g.value) else "short"
    v = row.get("cdp")
    if v is None:
        return "-"
    return "pass" if (v >= g.value if g.kind == "min" else v <= g.value) else "short"


def ratio_goal(workload: str) -> float:
    """The ratio goal of a workload (for suites that print their own verdicts)."""
    g = goal_for(workload)
    assert g is not None and g.kind == "ratio", workload
    return g.value
