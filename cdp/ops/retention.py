"""The retention operations (same signature as every operation; registered in :mod:`cdp.ops`):
``retention_show``, ``retention_set``, ``retention_keep``, ``gc``; and what retention
adds to the plain ``markers`` and ``status`` results."""

from __future__ import annotations

import time
from typing import Any

from cdp.progress import Progress
from cdp.retention.policy import parse_keep
from cdp.retention.service import retention_of
from cdp.store import Store
from cdp.units import parse_size
from cdp.volume import Volume


async def op_retention_show(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    return retention_of(store.volume(args.get("volume"))).show()


async def op_retention_set(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    ret = retention_of(store.volume(args.get("volume")))
    cap = args.get("max_store_bytes")
    ret.set_policy(
        tiers=args.get("tiers") or None,
        max_store_bytes=None if cap is None else parse_size(cap, "--max-store-bytes"),
        on_full=args.get("on_full"),
    )
    return ret.show()


async def op_retention_keep(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    vol = store.volume(args.get("volume"))
    name = str(args["marker"])
    mid = int(name[6:]) if name.startswith("marker") and name[6:].isdigit() else None
    if mid is None:
        seq = vol.resolve_point(name)
        mid = next(m.id for m in vol.markers if m.seq == seq)
    if str(args["keep"]) == "none":  # release: the tiers decide again
        had = retention_of(vol).release_marker(mid)
        return {"volume": vol.name, "marker": f"marker{mid}", "keep_until_ns": None,
                "released": had}
    until = parse_keep(str(args["keep"]), time.time_ns())
    retention_of(vol).keep_marker(mid, until)
    return {"volume": vol.name, "marker": f"marker{mid}", "keep_until_ns": until}


async def op_gc(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    names = [args["volume"]] if args.get("volume") else sorted(store.volumes)
    out = []
    for n in names:
        vol = store.volume(n)
        rate = args.get("rate")
        out.append(await retention_of(vol).gc(progress, rate=None if rate is None else float(rate)))
    return out


def marker_fields(vol: Volume, marker_id: int, seq: int) -> dict[str, Any]:
    """What retention says about one marker: expired, kept until (ns, or None)."""
    return {
        "expired": not vol.maps.resolvable(seq),
        "keep_until_ns": retention_of(vol).kept_until(marker_id),
    }


def status_fields(vol: Volume) -> dict[str, Any]:
    """The retention part of ``cdpctl status``: tiers with their oldest point and next
    expiry, the all-tier cutoff, the store cap."""
    r = retention_of(vol)
    return {"tiers": [t.text for t in r.settings.tiers], "per_tier": r.tier_info(),
            "keep_after": vol.maps.keep_after, "over_cap": r.over_cap,
            "warning": r.warning, "store_bytes": r.store_bytes(),
            "max_store_bytes": r.settings.max_store_bytes}


OPS: dict[str, Any] = {
    "retention_show": op_retention_show,
    "retention_set": op_retention_set,
    "retention_keep": op_retention_keep,
    "gc": op_gc,
}
OFFLINE = {"retention_show"}
