"""Point-in-time specifications: what a user may write after ``--at`` / ``--to`` / ``@``.

Grammar (first match wins)::

    point := "@" SEQ            a journal sequence number          @123456
           | "marker" N         a snapshot marker by id            marker17
           | "now" | "origin"   the newest write / the empty volume
           | "-" DURATION       relative to now                    -10m, -2h, -30s
           | ISO-8601 time      local time when no offset is given 2024-05-01T10:00
           | LABEL              a marker's label                   before-upgrade

Parsing is pure; :meth:`cdp.volume.Volume.resolve_point` turns a :class:`PointSpec`
into a seq against a real journal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from cdp.errors import MalformedPoint, UsageError
from cdp.units import parse_duration


class PointKind(Enum):
    SEQ = "seq"
    MARKER = "marker"
    NOW = "now"
    ORIGIN = "origin"
    RELATIVE = "relative"
    TIME = "time"
    LABEL = "label"


@dataclass(frozen=True)
class PointSpec:
    """A parsed point. ``value``: seq, marker id, seconds back, or ns since the epoch."""

    kind: PointKind
    value: int | float | str
    text: str


_MARKER = re.compile(r"^marker(\d{1,18})$")
_SEQ = re.compile(r"^@(\d{1,20})$")
_REL = re.compile(r"^-\s*\d+(\.\d+)?\s*(ms|s|m|h|d|w|y)$")
_TIMEISH = re.compile(r"^\d{4}-\d{2}-\d{2}([T ].*)?$")


def parse_point(text: str) -> PointSpec:
    """Parse *text* per the grammar above. Raises MalformedPoint (a UsageError, exit 2,
    and a PointError) for empty or malformed text; whether a well-formed point exists is :meth:`resolve_point`'s
    question (PointError/NotFound, exit 3)."""
    if not isinstance(text, str) or not text.strip():
        raise MalformedPoint("empty point: give markerN, a label, @SEQ, a time or -10m")
    t = text.strip()
    if m := _SEQ.match(t):
        return PointSpec(PointKind.SEQ, int(m.group(1)), t)
    if m := _MARKER.match(t):
        return PointSpec(PointKind.MARKER, int(m.group(1)), t)
    if t == "now":
        return PointSpec(PointKind.NOW, 0, t)
    if t == "origin":
        return PointSpec(PointKind.ORIGIN, 0, t)
    if _REL.match(t):
        try:
            return PointSpec(PointKind.RELATIVE, parse_duration(t[1:].strip()), t)
        except UsageError as e:
            raise MalformedPoint(f"cannot parse point {t!r}: {e}") from None
    if _TIMEISH.match(t):
        try:
            dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            raise MalformedPoint(f"cannot parse time {t!r} (try 2024-05-01T10:00:00)") from None
        if dt.tzinfo is None:
            dt = dt.astimezone()  # local time
        ns = int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
        return PointSpec(PointKind.TIME, ns, t)
    if t.startswith("@") or t.startswith("-"):
        raise MalformedPoint(f"cannot parse point {t!r}: @SEQ takes digits, -DURATION like -10m")
    return PointSpec(PointKind.LABEL, t, t)


def split_export_name(name: str) -> tuple[str, str | None]:
    """``"vol0@marker3"`` → ("vol0", "marker3"); ``"vol0"`` → ("vol0", None).

    The first ``@`` separates the volume from the point, so ``vol0@@123`` names seq 123.
    """
    vol, sep, point = name.partition("@")
    return vol, (point if sep else None)


def point_arg(args: dict[str, object], key: str, default: str = "now") -> str:
    """The point an operation was given under ``key``: ``default`` when absent (None),
    else the text as given, so an empty ``--at ''`` reaches :func:`parse_point` and is
    refused (exit 2) instead of silently meaning ``default``."""
    v = args.get(key)
    return default if v is None else str(v)
