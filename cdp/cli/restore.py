"""cdpctl restore: one file's bytes as of a point in time, without mounting anything."""

from __future__ import annotations

import argparse
import os

from cdp.cli.common import Context, add_common, emit_json
from cdp.cli.image import ON_ERROR_HELP, report_damage
from cdp.ntfs.names import from_argv, shown
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "restore", help="write PATH as of POINT to OUT (--stream NAME for a named stream)",
        description="Reads the file's MFT record at POINT and follows its runlist (or "
        "resident bytes) in the point-in-time view: exact size, sparse runs become holes, "
        "modification and access times are set. PATH is taken literally: ':' , spaces and "
        "newlines are part of the name (quote them); a path starting with '-' goes after "
        "'--'. Names that are not valid Unicode (an NTFS name with a lone UTF-16 "
        "surrogate) are printed escaped, 'a\\udc00b', and typed as bash writes them: "
        "$'a\\udc00b'.",
    )
    add_common(p)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--stream", metavar="NAME", help="an alternate data stream of PATH (NTFS ADS)")
    p.add_argument("--at", required=True, metavar="POINT")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--on-error", choices=("stop", "zero", "skip-file"), default="stop",
                   help=ON_ERROR_HELP.format(", skip-file (leave the file unwritten)"))
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("restore", {"volume": args.volume, "path": from_argv(args.path),
                             "stream": from_argv(args.stream) if args.stream else None,
                             "at": args.at, "output": os.path.abspath(args.output),
                             "on_error": args.on_error}, progress=True)
    if ctx.json:
        emit_json(r)
    elif r["skipped"]:
        print(f"{shown(r['path'])} as of {r['at']} (@{r['seq']}): skipped, "
              f"{format_size(r['damaged_bytes'])} damaged; {r['output']} not written")
    else:
        print(f"{r['output']}: {shown(r['path'])}{' stream ' + shown(r['stream']) if r['stream'] else ''} "
              f"as of {r['at']} (@{r['seq']}), {format_size(r['size'])}")
    return report_damage(r)
