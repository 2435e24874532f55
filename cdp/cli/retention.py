"""cdpctl retention show|set|keep: the fade-out policy of a volume (docs/RETENTION.md)."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, add_common, emit_json, fmt_time, table
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("retention", help="show or change what history a volume keeps")
    rs = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = rs.add_parser("show", help="tiers, oldest recoverable point per tier, what expires next")
    add_common(s)
    s.set_defaults(func=show)
    t = rs.add_parser("set", help="set the tiers (newest first), e.g. 'all 48h' '1h 14d' '1d 90d'")
    add_common(t)
    t.add_argument("tiers", nargs="*", metavar="TIER", help="KEEP FOR: 'all 48h', '1h 14d', ...")
    t.add_argument("--max-store-bytes", help="cap of journal + maps ('0': none)")
    t.add_argument("--on-full", choices=("expire", "refuse"))
    t.set_defaults(func=set_)
    k = rs.add_parser("keep", help="keep a marker beyond the tiers")
    add_common(k)
    k.add_argument("marker", help="markerN or a label")
    k.add_argument("--keep", required=True, help="a duration ('1y'), 'forever', or 'none' (release: the tiers decide again)")
    k.set_defaults(func=keep)


def _print(r: dict) -> None:  # type: ignore[type-arg]
    print(f"volume:      {r['volume']}  (policy from {r['source']})")
    print(f"tiers:       {', '.join(r['tiers'])}")
    cap = r["max_store_bytes"]
    print(f"store:       {format_size(r['store_bytes'])}"
          + (f" of {format_size(cap)} cap, on_full = {r['on_full']}" if cap else " (no cap)"))
    if r.get("warning"):
        print(f"WARNING:     {r['warning']}")
    print(table(
        [(t["tier"], t["oldest_point"] or "-", fmt_time(t["oldest_time_ns"]),
          fmt_time(t["next_expiry_ns"])) for t in r["per_tier"]],
        ["TIER", "OLDEST POINT", "TIME", "EXPIRES NEXT AT"],
    ))
    if r.get("kept_markers"):
        print("kept markers: " + ", ".join(
            f"marker{k} ({'forever' if v < 0 else 'until ' + fmt_time(v)})"
            for k, v in r["kept_markers"].items()))


def show(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("retention_show", {"volume": args.volume})
    if ctx.json:
        emit_json(r)
    else:
        _print(r)
    return 0


def set_(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("retention_set", {"volume": args.volume, "tiers": args.tiers,
                                   "max_store_bytes": args.max_store_bytes,
                                   "on_full": args.on_full})
    if ctx.json:
        emit_json(r)
    else:
        _print(r)
    return 0


def keep(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("retention_keep", {"volume": args.volume, "marker": args.marker,
                                    "keep": args.keep})
    if ctx.json:
        emit_json(r)
    else:
        until = r["keep_until_ns"]
        if until is None:
            print(f"{r['marker']} released: the tiers decide again"
                  + ("" if r.get("released") else " (it was not kept)"))
        else:
            print(f"{r['marker']} kept " + ("forever" if until < 0 else f"until {fmt_time(until)}"))
    return 0
