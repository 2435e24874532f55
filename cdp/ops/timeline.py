"""The ``timeline`` operation: what happened to a volume over a time range, in buckets,
for the web console's timeline (docs/WEB.md). Read-only; also runs offline.

Design notes
------------
* **No scan.** Writes per bucket come from the journal's time index: the records of a
  bucket are ``seq_at_time(end) - seq_at_time(start)``, one O(log n) bisection per
  bucket edge, so a volume with 10M writes costs the same as one with ten. Bytes per
  bucket are the written (raw) bytes of each journal segment the bucket overlaps, shared
  out by the share of the segment's stored bytes that falls inside the bucket (the
  record offsets of the time index): exact for whole segments, proportional within one.
* **Entropy** is what the sentinel keeps: the hourly maximum share of suspect
  (high-entropy overwriting) bytes, plus its live buckets; a bucket shows the largest
  share of the hours it overlaps (None with the sentinel off or no evidence).
* **Retention bands** are the tiers' age bands (``retention_show``'s ``per_tier``) and
  ``faded_before_ns``: before it only retained points resolve.
* Markers, alerts and rewinds inside the range are listed whole (each a few fields);
  markers are capped at ``max_markers`` (the newest), the count is given.
"""

from __future__ import annotations

import time
from typing import Any

from cdp.errors import PointError, UsageError
from cdp.ops.retention import status_fields
from cdp.progress import Progress
from cdp.retention.service import retention_of
from cdp.sentinel.service import sentinel_of
from cdp.store import Store
from cdp.volume import Volume

DEFAULT_BUCKETS = 200
MAX_BUCKETS = 5000
MAX_MARKERS = 2000
_HOUR_NS = 3600 * 10**9


def _time_arg(vol: Volume, text: Any, default: int) -> int:
    """A range edge: nanoseconds since the epoch (an integer), or a point (its time)."""
    if text is None or text == "":
        return default
    s = str(text)
    if s.isdigit():
        return int(s)
    seq = vol.resolve_point(s)
    return vol.journal.time_of_seq(seq) if seq else default


def _entropy(vol: Volume) -> dict[int, float]:
    """hour index -> suspect share the sentinel saw (its baseline hours and live buckets)."""
    s = sentinel_of(vol)
    if s is None:
        return {}
    return s.det.share_by_hour()


async def timeline(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Buckets of writes, bytes and entropy between ``from`` and ``to`` (ns or points;
    default: the first recoverable write .. now), with the markers, alerts, rewinds
    and retention bands of the range. Cost: O(buckets · log n + markers)."""
    vol = store.volume(args.get("volume"))
    j = vol.journal
    now = time.time_ns()
    first = vol.oldest_point()
    first_ns = j.time_of_seq(first) if first else now
    t0 = _time_arg(vol, args.get("from"), first_ns)
    t1 = _time_arg(vol, args.get("to"), now)
    try:
        n = int(args.get("buckets") or DEFAULT_BUCKETS)
    except ValueError:
        raise UsageError(f"buckets: expected a number, got {args.get('buckets')!r}") from None
    if not 1 <= n <= MAX_BUCKETS:
        raise UsageError(f"buckets: between 1 and {MAX_BUCKETS}, got {n}")
    if t1 <= t0:
        t1 = t0 + n  # an empty or inverted range: n one-ns buckets
    width = (t1 - t0) / n
    edges = [t0 + round(i * width) for i in range(n + 1)]
    # bucket i holds the records stamped in [edges[i], edges[i+1]); the last also edges[n]
    seqs = [j.seq_at_time(t - 1) for t in edges[:-1]] + [j.seq_at_time(edges[-1])]
    ent = _entropy(vol)
    buckets = []
    for i in range(n):
        a, b = seqs[i], seqs[i + 1]
        e = None
        if ent:
            hours = range(edges[i] // _HOUR_NS, edges[i + 1] // _HOUR_NS + 1)
            vals = [ent[h] for h in hours if h in ent] if len(hours) < 4096 else \
                [v for h, v in ent.items() if hours.start <= h < hours.stop]
            e = round(max(vals), 4) if vals else None
        buckets.append({"start_ns": edges[i], "end_ns": edges[i + 1], "first_seq": a + 1,
                        "last_seq": b, "writes": b - a, "bytes": j.raw_bytes_between(a, b),
                        "entropy": e})
    ms = [m for m in vol.markers if t0 <= m.time_ns <= t1]
    cap = int(args.get("max_markers") or MAX_MARKERS)
    markers = [{"name": m.name, "id": m.id, "seq": m.seq, "time_ns": m.time_ns, "label": m.label,
                "expired": not vol.maps.resolvable(m.seq)} for m in ms[-cap:]]
    s = sentinel_of(vol)
    alerts = [] if s is None else [
        {k: a.get(k) for k in ("id", "state", "first_seq", "first_time", "detected_time",
                               "clean_point", "score")}
        for a in s.alert_list() if t0 <= int(a.get("first_time") or 0) <= t1
        or t0 <= int(a.get("detected_time") or 0) <= t1]
    rewinds = []
    for rewind_seq, target in vol.maps.rewinds:
        try:
            ts = j.time_of_seq(rewind_seq)
        except PointError:
            continue  # its record was compacted away
        if t0 <= ts <= t1:
            rewinds.append({"seq": rewind_seq, "time_ns": ts, "target_seq": target,
                            "undo": f"@{rewind_seq - 1}"})
    ret = retention_of(vol)
    ka = vol.maps.keep_after
    faded = None
    if ka:
        try:
            faded = j.time_of_seq(max(ka, j.first_seq))
        except PointError:
            faded = None
    st = status_fields(vol)
    return {
        "volume": vol.name, "from_ns": t0, "to_ns": t1, "now_ns": now,
        "first_seq": first, "first_time_ns": first_ns if first else None,
        "last_seq": j.last_seq, "bucket_ns": width, "buckets": buckets,
        "markers": markers, "markers_in_range": len(ms), "alerts": alerts, "rewinds": rewinds,
        "retention": {"tiers": st["tiers"], "per_tier": ret.tier_info(now),
                      "faded_before_ns": faded, "retained_points": len(vol.maps.retained)},
    }


OPS: dict[str, Any] = {"timeline": timeline}
OFFLINE = {"timeline"}
