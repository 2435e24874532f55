"""cdpctl store recover: a new store from the S3 tier's bucket alone (docs/TIER.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdp.cli.common import Context, ProgressBar, emit_json
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("store", help="whole-store operations (recover from the S3 tier)")
    ss = p.add_subparsers(dest="store_cmd", required=True)
    r = ss.add_parser("recover", help="build a new store from s3://BUCKET/PREFIX (newest complete generation)")
    r.add_argument("--from", dest="src", required=True, metavar="s3://BUCKET/PREFIX")
    r.add_argument("--endpoint", metavar="URL", help="S3 endpoint (default: [tier] endpoint, else AWS)")
    r.add_argument("--to", dest="dest", required=True, metavar="DIR", help="new store directory (absent or empty)")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    r.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    # boto3 and the store stack load here, not in every cdpctl
    from cdp.tier.recover import recover_store
    from cdp.tier.s3 import S3, S3Settings

    t = ctx.settings.tier
    s3 = S3(S3Settings(endpoint=args.endpoint or t.endpoint, region=t.region,
                       credentials_file=t.credentials_file))
    bar = ProgressBar()  # progress on stderr
    try:
        rep = recover_store(s3, args.src, Path(args.dest), bar.update)
    finally:
        bar.finish()
    if ctx.json:
        emit_json(rep.to_dict())
        return 0
    for name, v in sorted(rep.volumes.items()):
        print(f"{name}: generation {v['generation']}, {v['segments']} segments through "
              f"@{v['last_seq']}{', catalog' if v['catalog'] else ''}")
    print(f"recovered {format_size(rep.bytes)} in {rep.seconds:.1f} s into {rep.store}; "
          f"serve it with `cdpd --store {rep.store}`")
    return 0
