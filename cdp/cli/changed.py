"""cdpctl changed: the byte ranges that differ between two points, with totals."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, add_common, emit_json, table
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("changed", help="byte ranges that differ between two points (A -> B), with totals")
    add_common(p)
    p.add_argument("--from", dest="from_", required=True, metavar="A",
                   help="older point ('origin': everything ever written)")
    p.add_argument("--to", default="now", metavar="B", help="default: now")
    p.add_argument("--kinds", action="store_true",
                   help="also list the pieces with what B holds there (data / zero)")
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("changed", {"volume": args.volume, "from": args.from_, "to": args.to,
                             "kinds": args.kinds}, progress=True)
    if ctx.json:
        emit_json(r)
        return 0
    rows = [(x["offset"], x["length"], x["offset"] + x["length"]) for x in r["ranges"]]
    if rows:
        print(table(rows, ["offset", "length", "end"]))
    if args.kinds:
        print(table([(p["offset"], p["length"], p["kind"]) for p in r["pieces"]],
                    ["offset", "length", "kind"]))
    print(f"{r['volume']} {r['from']} (@{r['from_seq']}) -> {r['to']} (@{r['to_seq']}): "
          f"{r['ranges_count']} ranges, {format_size(r['changed_bytes'])} changed "
          f"({format_size(r['data_bytes'])} data, {format_size(r['zero_bytes'])} zeroes)")
    return 0
