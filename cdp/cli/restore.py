"""cdpctl restore: one file's bytes as of a point in time, without mounting anything."""

from __future__ import annotations

import argparse
import os

from cdp.cli.common import Context, add_common, emit_json
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "restore", help="write PATH as of POINT to OUT (PATH:stream for a named stream)",
        description="Reads the file's MFT record at POINT and follows its runlist (or "
        "resident bytes) in the point-in-time view: exact size, sparse runs become holes, "
        "modification and access times are set.",
    )
    add_common(p)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--at", required=True, metavar="POINT")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("restore", {"volume": args.volume, "path": args.path, "at": args.at,
                             "output": os.path.abspath(args.output)}, progress=True)
    if ctx.json:
        emit_json(r)
    else:
        print(f"{r['output']}: {r['path']}{':' + r['stream'] if r['stream'] else ''} "
              f"as of {r['at']} (@{r['seq']}), {format_size(r['size'])}")
    return 0
