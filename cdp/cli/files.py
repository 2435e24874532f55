"""cdpctl files: list the files of a volume as of a point in time (from the catalog)."""

from __future__ import annotations

import argparse
from typing import Any

from cdp.cli.common import Context, add_common, emit_json, fmt_time, table
from cdp.ntfs.names import from_argv, shown
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "files", help="list files as of POINT (NTFS and ext2/3/4 file catalog; nothing is mounted)",
        description="List a directory as of POINT. At a marker the listing comes straight "
        "from the catalog; at any other point an MFT diff from the nearest earlier marker "
        "is overlaid (nothing is stored). Paths use '/'; partitions of a disk appear as "
        "/p1, /p2...",
    )
    add_common(p)
    p.add_argument("--at", default="now", metavar="POINT", help="point in time (default: now)")
    p.add_argument("path", nargs="?", default="/", metavar="PATH")
    p.add_argument("-r", "--recursive", action="store_true", help="list the whole subtree")
    p.set_defaults(func=run)


def rows_table(entries: list[dict[str, Any]], *, full_path: bool) -> str:
    return table(
        [("d" if e["type"] == "dir" else "-",
          "" if e["type"] == "dir" else format_size(e["size"]),
          fmt_time(e.get("modified_ns")),
          shown(e["path"] if full_path else e["name"]) + ("/" if e["type"] == "dir" else "")
          + "".join(f"  [:{shown(s['name'])} {s['size']}]" for s in e.get("streams", [])))
         for e in entries],
        ["T", "SIZE", "MODIFIED", "NAME"],
    )


def run(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("files", {"volume": args.volume, "at": args.at, "path": from_argv(args.path),
                           "recursive": args.recursive}, progress=True)
    if ctx.json:
        emit_json(r)
        return 0
    if r.get("note"):
        print(f"# {r['note']}")
    print(rows_table(r["entries"], full_path=args.recursive))
    return 0
