"""Export names <-> iSCSI target names (IQNs), both ways, with IQN characters only.

Scheme (``PREFIX = iqn.2026-11.io.cdp:``)::

    vol0                 <->  iqn.2026-11.io.cdp:vol0              live volume, writable
    vol0@marker17        <->  iqn.2026-11.io.cdp:vol0.marker17     point-in-time, read-only
    vol0@before-upgrade  <->  iqn.2026-11.io.cdp:vol0.before-upgrade
    vol0@@123            <->  iqn.2026-11.io.cdp:vol0.seq-123      point = seq 123
    Vol_A@Nightly        <->  iqn.2026-11.io.cdp::56ol:5f:41.:4eightly

An IQN may only hold ``a-z 0-9 - . :`` (RFC 3720 §3.2.6, after stringprep lowercasing).
Each part keeps ``a-z``, ``0-9`` and ``-``; every other byte of its UTF-8 form becomes
``:`` + two lowercase hex digits (so ``.`` never appears inside a part and separates the
volume from the point). A point ``@N`` (a seq) is written ``seq-N``; a label that
itself starts with ``seq-`` has its ``s`` escaped (``:73eq-...``), so the mapping is a
bijection. Incoming names are lowercased first (IQNs compare case-insensitively).
"""

from __future__ import annotations

import re

PREFIX = "iqn.2026-11.io.cdp:"

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_SEQ = re.compile(r"seq-(\d+)")
_ESCAPE = re.compile(r":([0-9a-f]{2})")


def _enc(part: str) -> str:
    out: list[str] = []
    for ch in part:
        if ch in _PLAIN:
            out.append(ch)
        else:
            out.extend(f":{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def _dec(part: str) -> str | None:
    raw = bytearray()
    i = 0
    while i < len(part):
        ch = part[i]
        if ch == ":":
            m = _ESCAPE.match(part, i)
            if m is None:
                return None
            raw.append(int(m.group(1), 16))
            i += 3
        elif ch in _PLAIN:
            raw.append(ord(ch))
            i += 1
        else:
            return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def target_name(export: str) -> str:
    """The IQN of an export name (``vol0@@123`` -> ``iqn.2026-11.io.cdp:vol0.seq-123``)."""
    vol, sep, point = export.partition("@")
    name = PREFIX + _enc(vol)
    if not sep:
        return name
    if point.startswith("@") and point[1:].isdigit():
        return f"{name}.seq-{int(point[1:])}"
    enc = _enc(point)
    if enc.startswith("seq-"):
        enc = ":73" + enc[1:]
    return f"{name}.{enc}"


def export_name(iqn: str) -> str | None:
    """The export an IQN names, or None when it is not one of ours."""
    iqn = iqn.lower()
    if not iqn.startswith(PREFIX):
        return None
    rest = iqn[len(PREFIX) :]
    vol_part, sep, point_part = rest.partition(".")
    vol = _dec(vol_part)
    if not vol or "." in point_part:
        return None
    if not sep:
        return vol
    m = _SEQ.fullmatch(point_part)
    if m:
        return f"{vol}@@{int(m.group(1))}"
    point = _dec(point_part)
    if not point:
        return None
    return f"{vol}@{point}"
