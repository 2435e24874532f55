"""cdpctl rewind: make the live volume what it was at a point (metadata only, undoable)."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, add_common, emit_json


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rewind",
        help="rewind the live volume to POINT (undo by rewinding to a point before it)",
    )
    add_common(p)
    p.add_argument("--to", required=True, metavar="POINT",
                   help="markerN, a label, @SEQ, a time (local unless offset given) or -10m")
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("rewind", {"volume": args.volume, "to": args.to})
    if ctx.json:
        emit_json(r)
        return 0
    at = r["to"] if r["to"] == f"@{r['target_seq']}" else f"{r['to']} (@{r['target_seq']})"
    if not r["changed"]:
        print(f"{r['volume']}: already at {at}: nothing to rewind, nothing written")
    else:
        print(f"{r['volume']}: rewound to {at}; "
              f"undo with: cdpctl rewind -V {r['volume']} --to {r['undo']}")
    return 0
