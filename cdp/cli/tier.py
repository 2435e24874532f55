"""cdpctl tier status / upload / gc: the S3 tier of each volume (docs/TIER.md)."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, emit_json, table
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tier", help="the S3 tier of sealed history (docs/TIER.md)")
    ts = p.add_subparsers(dest="tier_cmd", required=True)
    st = ts.add_parser("status", help="upload state, pending segments, bytes, last error")
    up = ts.add_parser("upload", help="upload what is sealed now and wait for it (cdpd)")
    gc = ts.add_parser("gc", help="delete objects no recent generation names (locked ones are skipped)")
    for q in (st, up, gc):
        q.add_argument("-V", "--volume")
        q.add_argument("--json", action="store_true", help="print JSON instead of a table")
        q.set_defaults(func=run)


_COLS = ("volume", "state", "generation", "uploaded_segments", "pending_segments",
         "uploaded_bytes", "local_bytes", "oldest_pending_age_seconds", "cache_hit_ratio")


def run(ctx: Context, args: argparse.Namespace) -> int:
    rows = ctx.call(f"tier_{args.tier_cmd}", {"volume": args.volume})
    if ctx.json or args.tier_cmd == "gc":
        emit_json(rows)
        return 0
    out = []
    for r in rows:
        row = [r.get(c) for c in _COLS]
        row[5], row[6] = format_size(r["uploaded_bytes"]), format_size(r["local_bytes"])
        out.append(row)
    print(table(out, _COLS))
    for r in rows:
        if r.get("last_error"):
            print(f"{r['volume']}: {r['state']}: {r['last_error']}")
    return 0


def status_line(t: dict[str, object]) -> str:
    """The ``tier:`` line of `cdpctl status`."""
    if t["state"] == "off":
        return "off"
    s = (f"{t['state']}, generation {t['generation']} through @{t['uploaded_seq']}, "
         f"{t['uploaded_segments']} segments up, {t['pending_segments']} pending")
    return s + (f"  ({t['last_error']})" if t.get("last_error") else "")
