"""cdpctl replicate start / stop / status: ship a volume's journal to another cdp."""

from __future__ import annotations

import argparse

from cdp.cli.common import Context, emit_json, table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("replicate", help="replicate volumes to another cdp (docs/REPLICATION.md)")
    rs = p.add_subparsers(dest="replicate_cmd", required=True)
    st = rs.add_parser("start", help="start (or resume) streaming a volume to a target")
    st.add_argument("-V", "--volume")
    st.add_argument("--to", required=True, metavar="HOST:PORT")
    st.add_argument("--as", dest="as_name", metavar="NAME", help="replica volume name there")
    st.add_argument("--rate", metavar="BYTES/s", help="limit the stream (e.g. 50MiB)")
    sp = rs.add_parser("stop", help="stop streaming a volume")
    sp.add_argument("-V", "--volume")
    sp.add_argument("--to", metavar="HOST:PORT")
    ss = rs.add_parser("status", help="replication state, lag and acknowledged seq")
    ss.add_argument("-V", "--volume")
    ss.add_argument("--to", metavar="HOST:PORT")
    for q in (st, sp, ss):
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=run)
    fo = sub.add_parser("failover", help="make a replica a writable primary (docs/REPLICATION.md)")
    fo.add_argument("-V", "--volume")
    fo.add_argument("--at", metavar="POINT",
                    help="the point to become (default: the newest replicated point)")
    fo.add_argument("--json", action="store_true")
    fo.set_defaults(func=run_failover)


_COLS = ("volume", "target", "state", "lag_seconds", "lag_records", "acked_seq", "sent_bytes")


def run(ctx: Context, args: argparse.Namespace) -> int:
    cmd = args.replicate_cmd
    req: dict[str, object] = {"volume": args.volume, "to": args.to}
    if cmd == "start":
        req.update({"as": args.as_name, "rate": args.rate})
    res = ctx.call(f"replicate_{cmd}", req)
    rows = res if isinstance(res, list) else [res]
    if ctx.json:
        emit_json(res)
    else:
        print(table([[r.get(c) for c in _COLS] for r in rows], _COLS))
        for r in rows:  # a fallback (docs/REPLICATION.md)
            if r.get("reason"):
                print(f"{r['volume']} -> {r['target']}: {r['reason']}")
    return 0


def run_failover(ctx: Context, args: argparse.Namespace) -> int:
    r = ctx.call("failover", {"volume": args.volume, "at": args.at})
    if ctx.json:
        emit_json(r)
    else:
        at = f" at @{r['at_seq']} (rewind @{r['rewind_seq']})" if r["rewind_seq"] else ""
        print(f"{r['volume']}: now a primary, epoch {r['epoch']}{at}; "
              f"streams of epoch {r['epoch'] - 1} are refused from now on")
    return 0
