"""cdpctl snapshot / markers: take and list snapshot markers (no data movement)."""

from __future__ import annotations

import argparse
from typing import Any

from cdp.cli.common import Context, add_common, emit_json, fmt_time, table, volumes_arg
from cdp.errors import UsageError


def _state(r: dict[str, Any]) -> str:
    """expired (no longer recoverable), kept (beyond the tiers) or '' (fades with its tier)."""
    if r.get("expired"):
        return "expired"
    until = r.get("keep_until_ns")
    if until is None:
        return ""
    return "kept forever" if until < 0 else f"kept until {fmt_time(until)}"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "snapshot",
        help="take a marker; several -V take one consistent marker on each",
    )
    p.add_argument("-V", "--volume", action="append", help="volume (repeat for several)")
    p.add_argument("--label", default="", help="a name for the marker (usable as a point)")
    p.add_argument("--keep", help="keep the marker beyond the retention tiers: a duration "
                   "('1y') or 'forever' (needs --label)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=snapshot)
    m = sub.add_parser("markers", help="list a volume's markers")
    add_common(m)
    m.set_defaults(func=markers)


def snapshot(ctx: Context, args: argparse.Namespace) -> int:
    if args.keep and not args.label:
        raise UsageError("--keep needs --label (only labelled markers are kept)")
    rows = ctx.call("snapshot", {"volumes": volumes_arg(args), "label": args.label})
    for r in rows if args.keep else []:
        r["keep_until_ns"] = ctx.call("retention_keep", {
            "volume": r["volume"], "marker": r["name"], "keep": args.keep})["keep_until_ns"]
    if ctx.json:
        emit_json(rows if len(rows) != 1 else rows[0])
    elif len(rows) == 1:
        print(rows[0]["name"])
    else:
        for r in rows:
            print(f"{r['volume']} {r['name']}")
    return 0


def markers(ctx: Context, args: argparse.Namespace) -> int:
    rows = ctx.call("markers", {"volume": args.volume})
    if ctx.json:
        emit_json(rows)
    else:
        print(table(
            [(r["name"], f"@{r['seq']}", fmt_time(r["time_ns"]), r["label"], _state(r))
             for r in rows],
            ["MARKER", "SEQ", "TIME", "LABEL", "RETENTION"],
        ))
    return 0
