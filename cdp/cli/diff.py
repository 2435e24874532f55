"""cdpctl diff: files added, modified, deleted and renamed between two points."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, add_common, emit_json

_SIGN = {"added": "+", "deleted": "-", "modified": "M", "renamed": "R"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "diff", help="files added (+), deleted (-), modified (M), renamed (R) between two points",
    )
    add_common(p)
    p.add_argument("--from", dest="from_", required=True, metavar="A")
    p.add_argument("--to", default="now", metavar="B", help="default: now")
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("files_diff", {"volume": args.volume, "from": args.from_, "to": args.to},
                 progress=True)
    if ctx.json:
        emit_json(r)
        return 0
    for c in r["changes"]:
        line = f"{_SIGN[c['change']]}\t{c['path']}"
        if c["change"] == "renamed":
            line += f" -> {c['new_path']}"
        print(line)
    return 0
