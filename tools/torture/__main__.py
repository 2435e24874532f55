"""python -m tools.torture [--runs N] [--powerloss N] [--corrupt N] [--overload SECONDS]
                          [--fuzz SECONDS [--fuzz-targets A,B] [--fuzz-jobs N]]

Prints the figures of each rig as JSON; exits 1 if anything acknowledged was lost or a
check failed."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.torture", description=__doc__)
    ap.add_argument("--runs", type=int, default=10, help="kill -9 runs (0: skip)")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temp dir)")
    ap.add_argument("--phases", default="writes,markers,rewind,catalog,gc",
                    help="kill phases to draw from")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--no-ntfs", action="store_true")
    ap.add_argument("--powerloss", type=int, default=0, metavar="N",
                    help="power-loss histories (each crashed at every flush point)")
    ap.add_argument("--corrupt", type=int, default=0, metavar="N", help="corruption cases")
    ap.add_argument("--overload", type=float, default=0, metavar="SECONDS")
    ap.add_argument("--fuzz", type=float, default=0, metavar="SECONDS",
                    help="coverage-guided fuzzing, SECONDS per target")
    ap.add_argument("--fuzz-targets", default=None,
                    help="comma-separated fuzz targets (default: all)")
    ap.add_argument("--fuzz-jobs", type=int, default=1, help="fuzz targets run at once")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    log = (lambda *_: None) if a.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    out: dict[str, Any] = {"seed": a.seed}
    bad = False
    with tempfile.TemporaryDirectory(prefix="cdp-torture-") as tmp:
        work = a.work or Path(tmp)
        if a.runs:
            from tools.torture.killloop import KillLoop

            kl = KillLoop(work / "kill", seed=a.seed, fio=not a.no_fio, ntfs=not a.no_ntfs,
                          phases=tuple(a.phases.split(",")), log=log)
            t = kl.run(a.runs)
            out["kill"] = t.to_dict()
            bad |= t.lost > 0 or bool(t.problems)
            print(f"kill -9: runs {t.runs}, kills {t.kills}, writes checked {t.blocks_checked} "
                  f"(+{t.pit_blocks_checked} in marker views), lost = {t.lost}", flush=True)
        if a.powerloss:
            from tools.torture.powerloss import run_powerloss

            r = run_powerloss(a.powerloss, seed=a.seed, log=log)
            out["powerloss"] = r
            bad |= r["lost"] > 0 or bool(r["problems"])
            print(f"power loss: histories {r['histories']}, crash points {r['crashes']}, "
                  f"writes checked {r['writes_checked']}, lost = {r['lost']}", flush=True)
        if a.corrupt:
            from tools.torture.corrupt import run_corruption

            r = run_corruption(work / "corrupt", cases=a.corrupt, seed=a.seed, log=log)
            out["corruption"] = r
            bad |= bool(r["problems"])
            print(f"corruption: cases {r['cases']}, detected {r['detected']}, "
                  f"silent {r['silent']}, damaged volume refused (others served) "
                  f"{r['volumes_refused']}", flush=True)
        if a.overload:
            from tools.torture.overload import run_overload

            r = run_overload(work / "overload", seconds=a.overload, seed=a.seed, log=log)
            out["overload"] = r
            bad |= bool(r["problems"])
            print(f"overload: {r['connections']} connections, {r['writes']} writes, "
                  f"{r['markers']} markers, errors {len(r['problems'])}, peak RSS "
                  f"{r['peak_rss_mib']} MiB", flush=True)
        if a.fuzz:
            from tools.torture.fuzz import run_fuzz
            from tools.torture.fuzz_targets import TARGETS

            names = a.fuzz_targets.split(",") if a.fuzz_targets else list(TARGETS)
            r = run_fuzz(a.fuzz, names, work / "fuzz", log=log, jobs=a.fuzz_jobs)
            out["fuzz"] = r
            bad |= bool(r["problems"])
            for row in r["targets"]:
                print(f"fuzz {row['target']}: {row['executions']} executions "
                      f"({row['exec_per_s']}/s), coverage {row['coverage']}, "
                      f"findings {len(row['findings'])}", flush=True)
    print(json.dumps(out, indent=1, default=str))
    if bad:
        print("torture: FAILED", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
