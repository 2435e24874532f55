"""cdpctl alerts [dismiss ID | scan]: the ransomware sentinel's alerts (docs/SENTINEL.md)."""

from __future__ import annotations

import argparse
from typing import Any

from cdp.cli.common import Context, add_common, emit_json, fmt_time, table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("alerts", help="ransomware sentinel alerts and their clean points")
    add_common(p)
    p.set_defaults(func=show)
    rs = p.add_subparsers(dest="action", required=False, metavar="ACTION")
    d = rs.add_parser("dismiss", help="mark an alert a false positive (raises the threshold)")
    add_common(d)
    d.add_argument("id", help="alertN (or N)")
    d.set_defaults(func=dismiss)
    sc = rs.add_parser("scan", help="scan the files changed since the last marker now")
    add_common(sc)
    sc.set_defaults(func=scan)


def show(ctx: Context, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = ctx.call("alerts", {"volume": args.volume})
    if ctx.json:
        emit_json(rows)
        return 0
    if not rows:
        print("no alerts")
        return 0
    print(table(
        [(a["id"], a["volume"], a["state"], f"@{a['first_seq']}", fmt_time(a["first_time"]),
          fmt_time(a["detected_time"]), a["clean_point"], a["score"],
          f"{100 * float(a['evidence'].get('suspect_share', 0)):.0f}%",
          len(a["files"] or [])) for a in rows],
        ["ID", "VOLUME", "STATE", "FIRST", "FIRST TIME", "DETECTED", "CLEAN POINT", "SCORE",
         "SUSPECT", "FILES"],
    ))
    return 0


def dismiss(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("alerts_dismiss", {"volume": args.volume, "id": args.id})
    if ctx.json:
        emit_json(r)
    else:
        print(f"{r['volume']}: {r['id']} dismissed; {r['clean_point']} is no longer kept; "
              f"threshold now {100 * float(r['threshold']):.0f}% of written bytes")
    return 0


def scan(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("alerts_scan", {"volume": args.volume})
    if ctx.json:
        emit_json(r)
        return 0
    ev = r["evidence"]
    churn = ev["extension_churn"]
    print(f"{r['volume']}: @{ev['from_seq']}..@{ev['to_seq']}: {ev['encrypted_files']} files "
          f"encrypted ({ev['suspect_files_window']} in the slow window), "
          f"{churn['files']} gained .{churn['extension'] or '-'}, {ev['renamed']} renamed, "
          f"{ev['deleted']} deleted, ransom notes in {ev['ransom_note_dirs']} directories; "
          f"score {r['score']}" + (f"; {r['alert']}" if r["alert"] else ""))
    return 0
