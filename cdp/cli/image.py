"""cdpctl image: write a sparse raw image of a volume at a point in time."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from cdp.cli.common import Context, add_common, emit_json
from cdp.errors import ExitStatus
from cdp.units import format_size

ON_ERROR_HELP = ("what to do with data that fails its checksum: stop (default), zero (write "
                 "zeros there and go on){}; every damaged range is listed, and the exit "
                 "status is 6 when there was any")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("image", help="write a sparse raw image of POINT to FILE")
    add_common(p)
    p.add_argument("--at", default="now", metavar="POINT", help="point in time (default: now)")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--on-error", choices=("stop", "zero"), default="stop",
                   help=ON_ERROR_HELP.format(""))
    p.set_defaults(func=run)


def report_damage(r: dict[str, Any]) -> int:
    """Print the damaged ranges of an image or restore result (one line each, as a
    ddrescue map: output offset, length, volume offset, reason) to stderr; the exit
    status: 6 (corruption) when there were any, else 0."""
    for d in r.get("damaged", ()):
        print(f"damaged: offset {d['offset']} length {d['length']} (volume offset "
              f"{d['source_offset']}) {'zeroed' if r['on_error'] == 'zero' else 'skipped'}: "
              f"{d['reason']}", file=sys.stderr)
    return int(ExitStatus.CORRUPTION) if r.get("damaged") else 0


def run(ctx: Context, args: argparse.Namespace) -> int:
    out = args.output if args.output == "-" else os.path.abspath(args.output)
    r = ctx.call("image", {"volume": args.volume, "at": args.at, "output": out,
                           "on_error": args.on_error}, progress=True)
    if ctx.json:
        emit_json(r)
    else:
        damaged = f", {format_size(r['damaged_bytes'])} damaged (zeroed)" if r["damaged"] else ""
        print(f"{r['output']}: {r['volume']} at {r['at']} (@{r['seq']}), "
              f"{format_size(r['size'])}, {format_size(r['data_bytes'])} of data{damaged}, "
              f"{r['seconds']} s")
    return report_damage(r)
