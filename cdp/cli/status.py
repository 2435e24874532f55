"""cdpctl status: size, journal use, recoverable range, markers, activity."""

from __future__ import annotations

import argparse
from typing import Any

from cdp.cli.common import Context, add_common, emit_json, fmt_time, volumes_arg
from cdp.cli.tier import status_line as tier_status_line
from cdp.errors import CdpError
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="show a volume's state")
    add_common(p)
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    rows = ctx.call("status", {"volumes": volumes_arg(args)})
    tiers = ({t["volume"]: t for t in ctx.call("tier_status", {"refresh": False})}  # docs/TIER.md
             if ctx.settings.tier.enabled else {})
    for s in rows:
        if s.get("volume") in tiers:
            s["tier"] = tiers[s["volume"]]
    _add_filesystems(ctx, rows)
    if ctx.json:
        emit_json(rows if len(rows) != 1 else rows[0])
        return 0
    for i, s in enumerate(rows):
        if i:
            print()
        if "damaged" in s:
            print(f"volume:        {s['volume']}  (DAMAGED, not served)")
            print(f"error:         {s['damaged']}")
            print("repair:        stop cdpd, then `cdpctl verify --repair`")
            continue
        nm = s.get("newest_marker")
        ratio = s.get("compression_ratio")
        print(f"volume:        {s['volume']}{'  (PAUSED)' if s['paused'] else ''}")
        print(f"size:          {format_size(s['size'])}")
        print(f"written:       {format_size(s['written_bytes'] or 0)} in {s['journal_records'] or 0} records")
        print(f"journal:       {format_size(s['journal_bytes'] or 0)}" + (f" (compression {ratio:.2f}x)" if ratio else ""))
        every = s.get("all_points_from_seq", s["first_seq"])
        print(f"recoverable:   @{s['first_seq']} {fmt_time(s['first_time_ns'])}  ..  @{s['last_seq']} {fmt_time(s['last_time_ns'])}"
              + (f"  (every point from @{every}; retained points before it)" if every > s["first_seq"] else ""))
        print(f"durable up to: @{s['durable_seq']}")
        print(f"markers:       {s['markers']}" + (f" (newest {nm['name']} @{nm['seq']} {fmt_time(nm['time_ns'])})" if nm else ""))
        fsl = s.get("filesystems")
        if fsl is not None:  # docs/FILES.md: what the catalog found at the newest marker
            print(f"file systems:  {_fs_text(fsl)}")
        print(f"connections:   {s['connections']}")
        print(f"this session:  {s['session_writes']} writes, {format_size(s['session_bytes_written'])}")
        ret = s.get("retention")
        if ret:  # docs/RETENTION.md
            cap = f", cap {format_size(ret['max_store_bytes'])}" if ret.get("max_store_bytes") else ""
            print(f"retention:     {', '.join(ret['tiers'])}{cap}"
                  + (f"  WARNING: {ret['warning']}" if ret.get("warning") else ""))
            for t in ret["per_tier"]:
                oldest = (f"oldest {t['oldest_point']} {fmt_time(t['oldest_time_ns'])}, "
                          f"expires {fmt_time(t['next_expiry_ns'])}") if t["oldest_point"] else "no point yet"
                print(f"  {t['tier']:<12} {oldest}")
        if s.get("tier"):
            print(f"tier:          {tier_status_line(s['tier'])}")
        if s.get("role") == "replica":  # docs/REPLICATION.md
            print(f"role:          replica of {s.get('source') or '?'} (read-only)")
        for r in s.get("replication") or []:
            lag = f"lag {r['lag_seconds']} s / {r['lag_records']} records" if r["lag_records"] else "caught up"
            print(f"replication:   -> {r['target']} as {r['as']}: {r['state']}, {lag}, acked @{r['acked_seq']}"
                  + (f"  ({r['refused']})" if r.get("refused") else "")
                  + (f"  ({r['reason']})" if r.get("reason") else ""))
        px = s.get("proxy")
        if px:  # proxy mode (docs/PROXY.md)
            state = f"DEGRADED ({px['degraded_reason']})" if px["degraded"] else "ok"
            copy = "done" if px["initial_copy"]["done"] else f"{px['initial_copy']['regions_copied']}/{px['drl']['regions']} regions"
            print(f"proxy:         primary {px['primary']}, ack {px['ack']}, {state}")
            print(f"               dirty regions {px['drl']['dirty_regions']}, initial copy {copy}, "
                  f"errors primary {px['primary_errors']} journal {px['journal_errors']}")
            rec = px.get("reconcile") or {}
            if rec.get("dirty_regions"):
                print(f"               crash recovery: {rec['dirty_regions']} dirty regions, "
                      f"{rec['differing_regions']} differed ({format_size(rec['bytes'])}, {rec['direction']})")
    return 0


def _add_filesystems(ctx: Context, rows: list[dict[str, Any]]) -> None:
    """Add ``filesystems`` (the catalog's file systems at the newest catalogued
    marker: ``{"marker", "fs": [{"name", "fs"}]}``) to each volume's row."""
    names = [s["volume"] for s in rows if "damaged" not in s]
    if not names:
        return
    try:
        found = {r["volume"]: r for r in ctx.call("file_systems", {"volumes": names})}
    except CdpError:
        return  # the status itself is what matters
    for s in rows:
        r = found.get(s.get("volume", ""))
        if r is not None:
            s["filesystems"] = {"marker": r["marker"], "fs": r["fs"]}


def _fs_text(fsl: dict[str, Any]) -> str:
    if fsl["marker"] is None:
        return "not catalogued yet"
    if not fsl["fs"]:
        return f"none found (at {fsl['marker']})"
    kinds = ", ".join(f"{p['fs']} ({p['name']})" if p["name"] else p["fs"] for p in fsl["fs"])
    return f"{kinds} (at {fsl['marker']})"
