"""cdpctl pause / resume: hold the live volumes' writes (they wait, none fail)."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, emit_json, volumes_arg


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, help_ in (("pause", "hold new writes of the volumes"), ("resume", "release held writes")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("-V", "--volume", action="append", help="volume (repeat for several)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=run, op=name)


def run(ctx: Context, args: argparse.Namespace) -> int:
    rows = ctx.call(args.op, {"volumes": volumes_arg(args)})
    if ctx.json:
        emit_json(rows)
    else:
        for r in rows:
            if r["paused"]:
                print(f"{r['volume']}: paused")
            elif r.get("was_paused", True):
                print(f"{r['volume']}: resumed")
            else:
                print(f"{r['volume']}: was not paused (nothing to resume)")
    return 0
