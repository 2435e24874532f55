"""Which points a retention policy keeps (pure: no volume, no I/O).

Design notes
------------
* **Policy.** Tiers are *consecutive age bands*, newest first: with
  ``all 48h, 1h 14d, 1d 90d`` every write younger than 48 h is a point, then for ages
  48 h .. 48 h + 14 d the last point of each clock hour, then for the next 90 days the
  last point of each day; anything older is expired. Intervals are aligned to multiples
  of the granularity since the Unix epoch (UTC). The policy comes from the config
  (``[retention]``, overridden per volume by ``[volume.retention]``) and, once changed
  at run time, from ``VOLUME/retention.json`` (written atomically), which also holds the
  markers kept beyond the tiers (``snapshot --keep``).
* **Retained points** = the head, every point at or after the ``all`` cutoff, the last
  point of each interval of each granularity band, and kept markers; the map engine adds
  the targets of rewinds those depend on. A point that is no longer resolvable stays
  expired (a later policy cannot bring it back).
"""

from __future__ import annotations

from collections.abc import Callable

from cdp.config import Tier
from cdp.errors import UsageError
from cdp.units import parse_duration

NS = 1_000_000_000


def parse_keep(text: str, now_ns: int) -> int:
    """``--keep 1y`` → the ns until which the marker is kept; ``forever`` → -1."""
    if text == "forever":
        return -1
    try:
        return now_ns + int(parse_duration(text, "--keep") * NS)
    except Exception as e:
        raise UsageError(f"--keep: expected a duration like '30d' or 'forever', got {text!r}") from e


def policy_points(tiers: tuple[Tier, ...], now_ns: int, seq_at_time: Callable[[int], int],
                  head: int) -> tuple[set[int], int]:
    """(points of the granularity bands, keep_after) for ``now_ns``.

    ``keep_after`` is the state at the ``all`` tier's cutoff (every point at or after it
    is kept) or the head when there is no ``all`` tier. Cost: O(intervals of all bands)
    calls of *seq_at_time*.
    """
    pts: set[int] = set()
    age = 0.0
    keep_after = head
    for t in tiers:
        hi_ns = now_ns - int(age * NS)
        lo_ns = now_ns - int((age + t.span) * NS)
        if t.every == 0:
            keep_after = seq_at_time(lo_ns) if lo_ns > 0 else 0
        else:
            g = int(t.every * NS)
            k = max(lo_ns, 0) // g
            kmax = (hi_ns - 1) // g
            while k <= kmax:
                end = (k + 1) * g - 1
                p = seq_at_time(min(end, now_ns))
                if p:
                    pts.add(p)
                k += 1
        age += t.span
    return pts, keep_after
