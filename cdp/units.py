"""Parsing and printing of sizes, durations and times, shared by the config, the CLI
and the messages of the volume and retention."""

from __future__ import annotations

import re
import time

from cdp.errors import UsageError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
    "y": 365 * 86400.0,
}
_NUM_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, what: str = "size") -> int:
    """``"10GiB"`` → 10737418240. Plain ints are bytes. Raises UsageError naming *what*."""
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{what}: size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise UsageError(f"{what}: expected a size like '10GiB', got {value!r}")
    m = _NUM_UNIT.match(value)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise UsageError(f"{what}: cannot parse size {value!r} (try '512MiB', '10GiB', '4096')")
    if m.group(1).isdigit():  # whole numbers exactly (a float rounds above 2^53)
        return int(m.group(1)) * _SIZE_UNITS[unit]
    n = float(m.group(1)) * _SIZE_UNITS[unit]
    if n != int(n):
        raise UsageError(f"{what}: {value!r} is not a whole number of bytes")
    return int(n)


def parse_duration(value: int | float | str, what: str = "duration") -> float:
    """``"48h"`` → 172800.0 seconds; plain numbers are seconds, and so is ``"0"`` (zero
    needs no unit: ``gc_interval = "0"``, as the config file writes it)."""
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise UsageError(f"{what}: duration must not be negative, got {value}")
        return float(value)
    if not isinstance(value, str):
        raise UsageError(f"{what}: expected a duration like '30s' or '48h', got {value!r}")
    m = _NUM_UNIT.match(value)
    unit = m.group(2).lower() if m else ""
    if m and not unit and float(m.group(1)) == 0:
        return 0.0
    if not m or unit not in _DURATION_UNITS:
        raise UsageError(
            f"{what}: cannot parse duration {value!r} (units: ms, s, m, h, d, w, y; e.g. '48h')"
        )
    return float(m.group(1)) * _DURATION_UNITS[unit]


def format_size(n: int) -> str:
    """1536 → '1.5 KiB' (binary units, at most one decimal)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    raise AssertionError("unreachable")


def parse_hostport(value: str, what: str, default_port: int) -> tuple[str, int]:
    """``"127.0.0.1:10809"`` → ("127.0.0.1", 10809); ``"[::1]:10809"`` works too."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what}: expected HOST:PORT, got {value!r}")
    host, sep, port_s = value.rpartition(":")
    if not sep:
        host, port_s = value, str(default_port)
    host = host.strip("[]")
    try:
        port = int(port_s)
    except ValueError:
        raise UsageError(f"{what}: bad port in {value!r}") from None
    if not 0 <= port <= 65535 or not host:
        raise UsageError(f"{what}: expected HOST:PORT with a port 0-65535, got {value!r}")
    return host, port


def format_time(ns: int, *, sep: str = " ", zone: bool = False, millis: bool = False) -> str:
    """Local time of *ns* (Unix epoch ns): ``2026-12-06 10:00:00``. *sep* goes between
    date and time, *millis* adds ``.123``, *zone* the UTC offset (``+0100``)."""
    t = time.localtime(ns / 1e9)
    out = time.strftime(f"%Y-%m-%d{sep}%H:%M:%S", t)
    if millis:
        out += f".{(ns // 1_000_000) % 1000:03d}"
    if zone:
        out += time.strftime("%z", t)
    return out
