"""cdpctl find: search file names (or paths) in the catalog, across all versions."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cdp.cli.common import Context, add_common, emit_json, fmt_time, table
from cdp.errors import ExitStatus
from cdp.ntfs.names import from_argv, shown
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "find", help="glob over file names (or paths, when PATTERN has a '/')",
        description="Case-insensitive glob (*, ?, [..]) over names, or over whole paths when "
        "PATTERN contains '/' (anchored at the root: 'reports/*/q3*' is '/reports/*/q3*'; "
        "'*' also matches '/'). Without --at every catalogued version is searched. "
        "Exit status 1 when nothing matched (as grep).",
    )
    add_common(p)
    p.add_argument("pattern", metavar="PATTERN")
    p.add_argument("--at", metavar="POINT", help="only the files present at POINT")
    p.set_defaults(func=run)


def versions_cell(e: dict[str, Any]) -> str:
    """``marker1..marker3``, ``marker2..`` (still current), or ``after the last marker``
    for an entry seen only at a point past the catalogued markers (start version 0)."""
    if not e["start_version"]:
        return "after the last marker"
    end = f"marker{e['end_version']}" if e["end_version"] else ""
    return f"marker{e['start_version']}..{end}"


def run(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("find", {"volume": args.volume, "pattern": from_argv(args.pattern), "at": args.at},
                 progress=True)
    found = int(ExitStatus.OK if r["entries"] else ExitStatus.ERROR)
    if ctx.json:
        emit_json(r)
        return found
    if not r["entries"]:
        print(f"cdpctl: find: no matches for {r['pattern']!r}", file=sys.stderr)
        return found
    print(table([(shown(e["path"]) + ("/" if e["type"] == "dir" else ""),
                  "" if e["type"] == "dir" else format_size(e["size"]),
                  fmt_time(e["modified_ns"]), versions_cell(e))
                 for e in r["entries"]],
                ["PATH", "SIZE", "MODIFIED", "VERSIONS"]))
    return found
