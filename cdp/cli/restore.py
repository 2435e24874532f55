"""cdpctl restore: one file's bytes as of a point in time, without mounting anything."""

from __future__ import annotations

import argparse
import os

from cdp.cli.common import Context, add_common, emit_json
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "restore", help="write PATH as of POINT to OUT (--stream NAME for a named stream)",
        description="Reads the file's MFT record at POINT and follows its runlist (or "
        "resident bytes) in the point-in-time view: exact size, sparse runs become holes, "
        "modification and access times are set. PATH is taken literally: ':' , spaces and "
        "newlines are part of the name (quote them); a path starting with '-' goes after "
        "'--'.",
    )
    add_common(p)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--stream", metavar="NAME", help="an alternate data stream of PATH (NTFS ADS)")
    p.add_argument("--at", required=True, metavar="POINT")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.set_defaults(func=run)


def _shown(name: str) -> str:
    """A name as printed: as is, or quoted with escapes when it has a newline or other
    unprintable character (so one result stays one line)."""
    return name if name.isprintable() else repr(name)


def run(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("restore", {"volume": args.volume, "path": args.path, "stream": args.stream,
                             "at": args.at, "output": os.path.abspath(args.output)}, progress=True)
    if ctx.json:
        emit_json(r)
    else:
        print(f"{r['output']}: {_shown(r['path'])}{' stream ' + _shown(r['stream']) if r['stream'] else ''} "
              f"as of {r['at']} (@{r['seq']}), {format_size(r['size'])}")
    return 0
