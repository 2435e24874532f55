"""cdpctl verify: check every journal record, the markers and the maps of a store.

Works on a running daemon (through it) and on a stopped store (reading only: nothing is
repaired or truncated). Exit status 0 when clean, 6 when anything is damaged.
"""

from __future__ import annotations

import argparse
import sys

from cdp.cli.common import Context, add_common, emit_json
from cdp.errors import Corruption


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("verify", help="check every record of the store (exit 6 on damage)")
    add_common(p)
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    client = ctx.daemon()
    if client is not None:
        try:
            r = client.call("verify", {"volume": args.volume})
        finally:
            client.close()
    else:
        from cdp.verify import verify_store_offline

        r = verify_store_offline(ctx.store_path, args.volume)
    if ctx.json:
        emit_json(r)
    else:
        for v in r["volumes"]:
            state = "ok" if v["ok"] else "DAMAGED"
            print(f"{v['volume']}: {state}: {v['records']} records, {v['bytes']} bytes, {v['markers']} markers")
            for p in v["problems"]:
                print("  " + ", ".join(f"{k}={val}" for k, val in p.items()), file=sys.stdout)
    if not r["ok"]:
        print("cdpctl: verify found damage", file=sys.stderr)
        return Corruption.exit_status
    return 0
