"""The sentinel operations (same signature as every operation; registered in
:mod:`cdp.ops`): ``alerts`` (list, offline too), ``alerts_dismiss`` and ``alerts_scan``."""

from __future__ import annotations

from typing import Any

from cdp.errors import UsageError
from cdp.progress import Progress
from cdp.sentinel.service import Sentinel, sentinel_of
from cdp.store import Store
from cdp.volume import Volume

#: the fields of one alert, in the order cdpctl prints them
FIELDS = ("id", "volume", "state", "first_seq", "first_time", "detected_time", "clean_point",
          "score", "evidence", "files")


def _sentinel(vol: Volume) -> Sentinel:
    s = sentinel_of(vol)
    if s is None:
        raise UsageError(f"volume {vol.name}: the sentinel is off ([sentinel] enabled = false)")
    return s


async def op_alerts(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Alerts of one volume (``volume``) or of all, oldest first per volume."""
    vols = [store.volume(args["volume"])] if args.get("volume") else \
        [store.volumes[n] for n in sorted(store.volumes)]
    out: list[dict[str, Any]] = []
    for v in vols:
        s = sentinel_of(v)
        if s is not None:
            out.extend({k: a.get(k) for k in FIELDS} for a in s.alert_list())
    return out


async def op_alerts_dismiss(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Dismiss alert ``id`` of ``volume`` as a false positive (raises its threshold)."""
    vol = store.volume(args.get("volume"))
    a = _sentinel(vol).dismiss(str(args["id"]))
    return {**{k: a.get(k) for k in FIELDS}, "threshold": a["threshold"]}


async def op_alerts_scan(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Scan ``volume``'s files now, between markers: the file evidence from its newest
    catalogued marker to the newest write (an overlay, as ``files --at``); may raise or
    update an alert. Returns the evidence, the scores and the alert id (or None)."""
    vol = store.volume(args.get("volume"))
    return await _sentinel(vol).scan_head()


OPS: dict[str, Any] = {"alerts": op_alerts, "alerts_dismiss": op_alerts_dismiss,
                       "alerts_scan": op_alerts_scan}
OFFLINE = {"alerts"}
