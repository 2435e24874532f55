"""cdpctl verify: check every journal record, the markers, the map files and manifest,
and the file catalog of a store.

Works on a running daemon (through it) and on a stopped store (reading only: nothing is
repaired or truncated). Exit status 0 when clean, 6 when anything is damaged.
``--repair`` (stopped store only) rebuilds what is derived from the journal — maps,
markers file, catalog — and says what it could not rebuild (journal damage); exit 0
when the store verifies clean afterwards, else 6.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cdp.cli.common import Context, add_common, emit_json
from cdp.errors import Corruption, StoreLocked


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify", help="check every record of the store (exit 6 on damage)",
        description="Checks journal records, markers, map files + manifest and the file "
        "catalog. Exit status: 0 clean, 6 damage found (each problem is printed with the "
        "file and place), 7 --repair while cdpd runs.")
    add_common(p)
    p.add_argument("--repair", action="store_true",
                   help="stopped store only: rebuild maps, markers file and catalog from the "
                   "journal (damaged files are moved aside, never deleted)")
    p.add_argument("--tier", action="store_true",
                   help="check the S3 tier's newest generation against its manifest "
                   "(HEAD every object, sha256 of a sample; docs/TIER.md)")
    p.add_argument("--full", action="store_true", help="with --tier: sha256 of every object")
    p.set_defaults(func=run)


def _print(r: dict[str, Any]) -> None:
    for v in r["volumes"]:
        state = "ok" if v["ok"] else "DAMAGED"
        extra = ""
        if "maps" in v:
            extra = f", {v['maps']} maps, {v.get('catalog_versions', 0)} catalog versions"
        print(f"{v['volume']}: {state}: {v['records']} records, {v['bytes']} bytes, "
              f"{v['markers']} markers{extra}")
        for p in v["problems"]:
            print("  " + ", ".join(f"{k}={val}" for k, val in p.items()), file=sys.stdout)


def run_tier(ctx: Context, args: argparse.Namespace) -> int:
    """verify --tier: the tier's objects against the newest manifest (exit 6 on damage)."""
    r = ctx.call("verify_tier", {"volume": args.volume, "full": args.full})
    if ctx.json:
        emit_json(r)
    else:
        for v in r["volumes"]:
            print(f"{v['volume']}: tier {'ok' if v['ok'] else 'DAMAGED'}: generation "
                  f"{v.get('generation', '?')}, {v.get('objects', 0)} objects, "
                  f"{v.get('hashed', 0)} hashed")
            for p in v["problems"]:
                print("  " + ", ".join(f"{k}={val}" for k, val in p.items()))
    if not r["ok"]:
        print("cdpctl: verify --tier found damage", file=sys.stderr)
        return Corruption.exit_status
    return 0


def run(ctx: Context, args: argparse.Namespace) -> int:
    if args.tier:
        return run_tier(ctx, args)
    if args.repair:
        client = ctx.daemon()
        if client is not None:
            client.close()
            raise StoreLocked(f"verify --repair needs a stopped store: cdpd is running on {ctx.store_path}; "
                              "stop it first")
        from cdp.verify import repair

        rr = repair(ctx.settings, args.volume)
        if ctx.json:
            emit_json(rr)
        else:
            for a in rr["actions"]:
                print(f"repaired: {a}")
            for f in rr["not_repaired"]:
                print(f"NOT repaired: {f}")
            _print(rr["verify"])
        if not rr["ok"]:
            print("cdpctl: verify --repair could not rebuild everything", file=sys.stderr)
            return Corruption.exit_status
        return 0
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
        _print(r)
    if not r["ok"]:
        print("cdpctl: verify found damage", file=sys.stderr)
        return Corruption.exit_status
    return 0
