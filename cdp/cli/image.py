"""cdpctl image: write a sparse raw image of a volume at a point in time."""

from __future__ import annotations

import argparse
import os

from cdp.cli.common import Context, add_common, emit_json
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("image", help="write a sparse raw image of POINT to FILE")
    add_common(p)
    p.add_argument("--at", default="now", metavar="POINT", help="point in time (default: now)")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    out = args.output if args.output == "-" else os.path.abspath(args.output)
    r = ctx.call("image", {"volume": args.volume, "at": args.at, "output": out}, progress=True)
    if ctx.json:
        emit_json(r)
    else:
        print(f"{r['output']}: {r['volume']} at {r['at']} (@{r['seq']}), "
              f"{format_size(r['size'])}, {format_size(r['data_bytes'])} of data, {r['seconds']} s")
    return 0
