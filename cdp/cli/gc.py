"""cdpctl gc --now: expire history by the retention policy and compact the journal."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, add_common, emit_json
from cdp.errors import UsageError
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gc", help="expire old history by policy and reclaim journal space")
    add_common(p)
    p.add_argument("--now", action="store_true", help="run now (cdpd also runs it on a schedule)")
    p.add_argument("--rate", help="compaction I/O budget in bytes/s for this run (0: unthrottled)")
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    if not args.now:
        raise UsageError("gc runs on a schedule inside cdpd; `cdpctl gc --now` runs it at once")
    a: dict[str, object] = {"volume": args.volume}
    if args.rate is not None:
        from cdp.units import parse_size

        a["rate"] = parse_size(args.rate, "--rate")
    rows = ctx.call("gc", a, progress=True)
    if ctx.json:
        emit_json(rows if len(rows) != 1 else rows[0])
        return 0
    for r in rows:
        print(f"{r['volume']}: {format_size(r['bytes_before'])} -> {format_size(r['bytes_after'])}, "
              f"{r['segments_compacted']} segments compacted, {r['expired_seqs']} points expired"
              f" ({r['markers_expired']} markers), {r['seconds']} s")
        if r.get("emergency_rounds"):
            print(f"  WARNING: store cap reached; expired the oldest history early "
                  f"({r['emergency_rounds']} rounds)")
    return 0
