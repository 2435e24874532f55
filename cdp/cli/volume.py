"""cdpctl volume create|list|delete|resize: protected volumes of the store."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, add_common, emit_json, table
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("volume", help="create, list, delete or grow volumes")
    vs = p.add_subparsers(dest="volume_cmd", required=True, metavar="{create,list,delete,resize}")
    c = vs.add_parser("create", help="create a thin volume (optionally from an image)")
    c.add_argument("name")
    c.add_argument("--size", help="size, e.g. 10GiB (default: the image's size); a multiple of "
                   "512 up to 2^63-512 bytes")
    c.add_argument(
        "--from-image", metavar="FILE",
        help="initial full copy from FILE (raw or any format qemu-img reads), journalled as time zero",
    )
    c.add_argument("--mode", choices=("mirror", "proxy"), default="mirror",
                   help="mirror: the host mirrors writes here (default); proxy: cdpd owns --primary")
    c.add_argument("--primary", metavar="PATH",
                   help="proxy mode: the primary volume (file, block device or nbd:// URL)")
    c.add_argument("--ack", choices=("primary", "both"),
                   help="proxy mode: reply once the primary write completed (default) or both sides")
    c.add_argument("--no-initial-copy", dest="initial_copy", action="store_false",
                   help="proxy mode: the primary is empty; time zero reads as zeros")
    c.add_argument("--drl-region", metavar="SIZE", help="proxy mode: dirty region size (default 1MiB)")
    c.add_argument("--copy-rate", metavar="SIZE", help="proxy mode: initial copy throttle per second")
    add_common(c, volume=False)
    c.set_defaults(func=create)
    ls = vs.add_parser("list", help="list volumes")
    add_common(ls, volume=False)
    ls.set_defaults(func=list_)
    d = vs.add_parser(
        "delete", help="delete a volume and all its history (refused while clients are "
        "connected or markers are kept, unless --force)")
    d.add_argument("name")
    d.add_argument("--force", action="store_true",
                   help="delete even with open connections (they get errors) or kept markers")
    add_common(d, volume=False)
    d.set_defaults(func=delete)
    r = vs.add_parser(
        "resize", help="grow a volume (shrinking is refused); new connections see the new "
        "size, and points before the resize read zeros past the old size")
    r.add_argument("name")
    r.add_argument("size", help="the new size, e.g. 20GiB (at least the current size, at most 2^63-512)")
    add_common(r, volume=False)
    r.set_defaults(func=resize)


def delete(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("volume_delete", {"name": args.name, "force": args.force})
    if ctx.json:
        emit_json(r)
    else:
        print(f"deleted {r['volume']} and its history ({format_size(r['freed_bytes'])} freed)")
        if r.get("warning"):
            print(f"warning: {r['warning']}")
    return 0


def resize(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("volume_resize", {"volume": args.name, "size": args.size})
    if ctx.json:
        emit_json(r)
    elif r["changed"]:
        print(f"resized {r['volume']}: {format_size(r['old_size'])} -> {format_size(r['size'])} "
              "(new connections see the new size)")
    else:
        print(f"{r['volume']} is already {format_size(r['size'])}: nothing changed")
    return 0


def create(ctx: Context, args: argparse.Namespace) -> int:
    req = {"name": args.name, "size": args.size, "from_image": args.from_image, "mode": args.mode,
           "primary": args.primary, "ack": args.ack, "initial_copy": args.initial_copy,
           "drl_region": args.drl_region, "copy_rate": args.copy_rate}  # the op refuses a misfit
    r = ctx.call("volume_create", req, progress=True)
    if ctx.json:
        emit_json(r)
    else:
        extra = f", initial copy {format_size(r['initial_copy_bytes'])}" if args.from_image else ""
        if r.get("mode") == "proxy":
            extra = f", proxy for {r['primary']}, ack {r['ack']}, initial copy {format_size(r['initial_copy_bytes'])}"
        print(f"created {r['volume']} ({format_size(r['size'])}{extra})")
    return 0


def list_(ctx: Context, args: argparse.Namespace) -> int:
    rows = ctx.call("volume_list", {})
    if ctx.json:
        emit_json(rows)
    else:
        print(table(
            [(r["volume"], format_size(r["size"]), r["markers"], r["last_seq"], r["connections"],
              r.get("role", "primary"), r.get("source") or "") for r in rows],
            ["VOLUME", "SIZE", "MARKERS", "LAST SEQ", "CONNECTIONS", "ROLE", "SOURCE"],
        ))
    return 0
