"""Assertions on large buffers that report themselves.

``assert a == b`` on two 16 MiB images makes pytest explain the difference, and under
``CI=true`` it neither truncates nor stops: it pretty-prints both buffers and runs
difflib over them, which took longer than the five-minute timeout. A conftest
``pytest_assertrepr_compare`` cannot prevent that (every implementation of the hook
runs, and pytest's own materialises its diff), so buffers are compared here: where two
differ is said in three lines, in O(n) with C-speed comparisons.
"""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview

_WINDOW = 32  # bytes of hex shown from each side around the first difference
_CHUNK = 1 << 16  # comparison step while looking for the first difference


def first_difference(a: Buffer, b: Buffer) -> int | None:
    """Offset of the first byte where ``a`` and ``b`` differ (``min(len)`` when one is a
    prefix of the other), or None when they are equal. O(n), compared 64 KiB at a time."""
    va, vb = memoryview(a).cast("B"), memoryview(b).cast("B")
    n = min(len(va), len(vb))
    pos = 0
    while pos < n:
        end = min(n, pos + _CHUNK)
        if va[pos:end] != vb[pos:end]:
            while va[pos] == vb[pos]:
                pos += 1
            return pos
        pos = end
    return None if len(va) == len(vb) else n


def _hex(v: memoryview, start: int) -> str:
    piece = v[start : start + _WINDOW].hex(" ")
    return piece if piece else "(end)"


def describe_difference(a: Buffer, b: Buffer, what: str = "") -> str | None:
    """None when equal, else a few lines: the first differing offset, both lengths and
    a 32-byte hex window of each side starting a little before that offset."""
    at = first_difference(a, b)
    if at is None:
        return None
    va, vb = memoryview(a).cast("B"), memoryview(b).cast("B")
    start = max(0, at - 8)
    head = f"{what}: " if what else ""
    lines = [
        f"{head}buffers differ at offset {at} ({at:#x}); lengths {len(va)} and {len(vb)}",
        f"  got  @{start:#x}: {_hex(va, start)}",
        f"  want @{start:#x}: {_hex(vb, start)}",
    ]
    return "\n".join(lines)


def assert_bytes_equal(got: Buffer, want: Buffer, what: str = "") -> None:
    """Raise AssertionError unless ``got == want``, naming the first differing offset,
    both lengths and a short hex window of each side (never a diff of the buffers)."""
    __tracebackhide__ = True
    msg = describe_difference(got, want, what)
    if msg is not None:
        raise AssertionError(msg)
