"""One command for every performance goal, side by side with the peers.

    python -m tools.bench [--quick] [--out DIR] [SUITE ...]

Suites: journal, mapengine, nbd, nbd-proto, iscsi, mft, ext4 ... (default: all that are present).
Opt-in suites run only when named: s3 (plain boto3 against the test Ceph RGW, which it
starts with tools/ceph-s3 if it is not running).
Each suite measures cdp and its peer in the same run and returns rows with a ratio and
a goal; this writes ``DIR/REPORT.md`` (tables), ``DIR/results.json`` and the plots the
suites make. ``--quick`` (seconds per workload) proves the harness works; CI runs it and
asserts no threshold.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tools.bench.goals import goal_for, judge
from tools.bench.sysdeps import advice, missing

SUITES = {
    "journal": "tools.bench.journal_bench",
    "mapengine": "tools.bench.mapengine_bench",
    "nbd": "tools.bench.nbd_bench",
    "nbd-proto": "tools.bench.nbd_proto_bench",
    "iscsi": "tools.bench.iscsi_bench",
    "mft": "tools.bench.mft_bench",
    "ext4": "tools.bench.ext4_bench",
    "export": "tools.bench.export_bench",
    "compaction": "tools.bench.compaction_bench",
    "proxy": "tools.bench.proxy_bench",
    "sentinel": "tools.bench.sentinel_bench",
}
#: suites that run only when named (they need a Ceph RGW, or run long)
OPT_IN = {
    "s3": "tools.bench.s3_bench",
    "scale-wide": "tools.bench.scale_wide_bench",
    "scale": "tools.bench.scale_bench",  # long: history of 1M and 10M writes
}


def summarize(suite: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one suite in the common shape (workload, cdp, peer, unit, ratio, goal,
    verdict), judged against the one goals table (tools/bench/goals.py)."""
    if suite == "mapengine" and rows:
        big = max(rows, key=lambda r: r.get("writes", 0))
        n = big.get("writes", 0)
        norm = [
            {"workload": f"mapengine-seal ({n:,} writes)", "cdp": big.get("seal_rate_wps"),
             "peer": None, "peer_name": "-", "unit": "writes/s", "ratio": None},
            {"workload": f"mapengine-resolve ({n:,} writes)", "cdp": big.get("resolve_med_us"),
             "peer": None, "peer_name": "-", "unit": "us median", "ratio": None},
        ]
    elif suite == "nbd-proto":  # protocol ceiling: the RAM device vs nbdkit
        norm = [
            {"workload": f"proto-{r['rw']}-4k x{r['connections']} (RAM device)",
             "cdp": r["iops"], "peer": r["peer_iops"], "peer_name": r["peer"],
             "unit": "IOPS", "ratio": r["ratio"]}
            for r in rows
        ]
    else:
        norm = []
        for r in rows:
            name = r.get("workload") or r.get("test") or r.get("case") or "?"
            norm.append({
                "workload": str(name), "cdp": r.get("cdp"), "peer": r.get("peer"),
                "peer_name": r.get("peer_name", "-"), "unit": r.get("unit", ""),
                "ratio": r.get("ratio"),
            })
    for r in norm:
        g = goal_for(r["workload"])
        r["goal"] = g.text if g else "-"
        r["verdict"] = judge(r)
    return norm


def _call(mod: Any, quick: bool, out: Path) -> list[dict[str, Any]]:
    fn = mod.run
    kwargs: dict[str, Any] = {"quick": quick}
    code = fn.__code__
    if "out" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
        kwargs["out"] = out
    rows = fn(**kwargs)
    return list(rows)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def report(results: dict[str, Any]) -> str:
    lines = [
        "# cdp benchmark report",
        "",
        f"- date: {results['date']}",
        f"- machine: {results['machine']}",
        f"- mode: {'quick' if results['quick'] else 'full'}",
        "",
        "## Goals (cdp and its peer measured in the same run)",
        "",
        "| suite | workload | cdp | peer | unit | ratio | goal | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for suite, rows in results.get("summary", {}).items():
        for r in rows:
            peer = "-" if r["peer"] is None else f"{_fmt(r['peer'])} ({r['peer_name']})"
            lines.append(
                f"| {suite} | {r['workload']} | {_fmt(r['cdp'])} | {peer} | {r['unit']} | "
                f"{_fmt(r['ratio'])} | {r['goal']} | {r['verdict']} |"
            )
    lines += ["", "## Details", ""]
    for suite, rows in results["suites"].items():
        lines.append(f"### {suite}")
        lines.append("")
        if isinstance(rows, dict) and "error" in rows:
            lines.append(f"failed: `{rows['error']}`")
            lines.append("")
            continue
        keys: list[str] = []
        for r in rows:
            for k in r:
                if k not in keys:
                    keys.append(k)
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds per workload; no thresholds")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    known = {**SUITES, **OPT_IN}
    ap.add_argument("suites", nargs="*", metavar="SUITE", help=", ".join(known))
    a = ap.parse_args(argv)
    unknown = [s for s in a.suites if s not in known]
    if unknown:
        ap.error(f"unknown suite {unknown[0]!r} (choose from {', '.join(known)})")
    chosen = a.suites or list(SUITES)
    lacking = missing(chosen)  # before any suite starts (tools/bench/sysdeps.py)
    if lacking:
        print(f"python -m tools.bench: {advice(lacking)}", file=sys.stderr)
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
        "quick": a.quick,
        "suites": {},
    }
    failed = False
    for name in chosen:
        try:
            mod = importlib.import_module(known[name])
        except ModuleNotFoundError:
            print(f"== {name}: not built yet, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            rows = _call(mod, a.quick, a.out)
            results["suites"][name] = rows
            results.setdefault("summary", {})[name] = summarize(name, rows)
            for r in rows:
                print("   " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.items()), flush=True)
        except Exception as e:  # report and go on with the other suites
            failed = True
            traceback.print_exc()
            results["suites"][name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (a.out / "REPORT.md").write_text(report(results) + "\n")
    print(f"wrote {a.out / 'REPORT.md'} and {a.out / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
