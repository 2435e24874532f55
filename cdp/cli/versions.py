"""cdpctl versions: every catalogued version of a file, or the catalogued markers."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, add_common, emit_json, fmt_time, table
from cdp.ntfs.names import from_argv
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "versions", help="every version of PATH with its time span (no PATH: catalogued markers)",
        description="Each row is one catalog entry: valid from its start marker until its "
        "end marker (state 'replaced': a newer version follows; 'deleted': the file was "
        "deleted or renamed away; 'current': still there at the newest marker).",
    )
    add_common(p)
    p.add_argument("path", nargs="?", metavar="PATH")
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("file_versions", {"volume": args.volume,
                                   "path": from_argv(args.path) if args.path else None})
    if ctx.json:
        emit_json(r)
        return 0
    if not args.path:
        print(table([(v["marker"], f"@{v['seq']}", fmt_time(v["time_ns"]), v["kind"],
                      ",".join(v.get("fs") or []) or "-",
                      v["stats"].get("parsed", ""), v["stats"].get("added", ""),
                      v["stats"].get("modified", ""), v["stats"].get("deleted", ""), v["note"])
                     for v in r["versions"]],
                    ["MARKER", "SEQ", "TIME", "KIND", "FS", "PARSED", "ADDED", "MODIFIED",
                     "DELETED", "NOTE"]))
        if r.get("last_error"):
            print(f"# last error: {r['last_error']}")
        return 0
    print(table([(v["from_marker"], v["to_marker"] or "-", fmt_time(v["from_ns"]),
                  fmt_time(v["to_ns"]), v["state"], format_size(v["size"]),
                  fmt_time(v["modified_ns"]))
                 for v in r["versions"]],
                ["FROM", "TO", "SINCE", "UNTIL", "STATE", "SIZE", "MODIFIED"]))
    return 0
