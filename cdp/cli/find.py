"""cdpctl find: search file names (or paths) in the catalog, across all versions."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, add_common, emit_json, fmt_time, table
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "find", help="glob over file names (or paths, when PATTERN has a '/')",
        description="Case-insensitive glob (*, ?, [..]) over names, or over whole paths when "
        "PATTERN contains '/'. Without --at every catalogued version is searched.",
    )
    add_common(p)
    p.add_argument("pattern", metavar="PATTERN")
    p.add_argument("--at", metavar="POINT", help="only the files present at POINT")
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("find", {"volume": args.volume, "pattern": args.pattern, "at": args.at},
                 progress=True)
    if ctx.json:
        emit_json(r)
        return 0
    print(table([(e["path"] + ("/" if e["type"] == "dir" else ""),
                  "" if e["type"] == "dir" else format_size(e["size"]),
                  fmt_time(e["modified_ns"]),
                  f"marker{e['start_version']}..{'marker' + str(e['end_version']) if e['end_version'] else ''}")
                 for e in r["entries"]],
                ["PATH", "SIZE", "MODIFIED", "VERSIONS"]))
    return 0
