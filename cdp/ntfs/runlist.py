"""Runlists (mapping pairs): which clusters hold a non-resident attribute.

A runlist is a sequence of ``header, length, offset`` triples: the header's low nibble
is the byte count of the run length, its high nibble that of the *signed, relative* LCN
offset (0 = a sparse run, no clusters). A 0 header ends the list. Decoding is lazy: the
catalog stores the raw bytes and only restore decodes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from cdp.errors import Corruption


class Run(NamedTuple):
    """``length`` clusters starting at virtual cluster ``vcn``; ``lcn`` None = sparse."""

    vcn: int
    lcn: int | None
    length: int


def decode_runs(pairs: bytes, lowest_vcn: int = 0, max_lcn: int | None = None) -> list[Run]:
    """Decode mapping pairs into runs. Raises Corruption on a truncated list, a
    negative LCN or (with *max_lcn*) a run past the volume end. Cost: O(len(pairs))."""
    runs: list[Run] = []
    pos = 0
    vcn = lowest_vcn
    lcn = 0
    n = len(pairs)
    while pos < n:
        header = pairs[pos]
        if header == 0:
            break
        len_size = header & 0x0F
        off_size = header >> 4
        end = pos + 1 + len_size + off_size
        if len_size == 0 or len_size > 8 or off_size > 8 or end > n:
            raise Corruption(f"runlist: bad mapping pair header {header:#04x} at byte {pos}")
        length = int.from_bytes(pairs[pos + 1 : pos + 1 + len_size], "little", signed=True)
        if length <= 0:
            raise Corruption(f"runlist: run of {length} clusters at byte {pos}")
        if off_size:
            lcn += int.from_bytes(pairs[pos + 1 + len_size : end], "little", signed=True)
            if lcn < 0 or (max_lcn is not None and lcn + length > max_lcn):
                raise Corruption(f"runlist: run at cluster {lcn} (+{length}) is outside the volume")
            runs.append(Run(vcn, lcn, length))
        else:
            runs.append(Run(vcn, None, length))
        vcn += length
        pos = end
    return runs


def encode_runs(runs: Iterable[tuple[int | None, int]]) -> bytes:
    """Encode ``(lcn or None, length)`` runs as mapping pairs (tests and fixtures)."""
    out = bytearray()
    prev = 0
    for lcn, length in runs:
        lb = _signed_bytes(length)
        if lcn is None:
            out.append(len(lb))
            out += lb
            continue
        ob = _signed_bytes(lcn - prev)
        prev = lcn
        out.append(len(ob) << 4 | len(lb))
        out += lb + ob
    out.append(0)
    return bytes(out)


def _signed_bytes(v: int) -> bytes:
    n = 1
    while not -(1 << (8 * n - 1)) <= v < (1 << (8 * n - 1)):
        n += 1
    return v.to_bytes(n, "little", signed=True)


def read_runs(
    read: Callable[[int, int], bytes], runs: list[Run], cluster_size: int, size: int,
    base: int = 0, chunk: int = 4 << 20,
) -> Iterable[tuple[int, bytes]]:
    """Yield ``(file offset, bytes)`` pieces of a non-resident stream of *size* bytes:
    sparse runs and clusters past the runlist read as zeros. Cost: one read per run
    piece (at most *chunk* bytes each)."""
    pos = 0
    for r in runs:
        if pos >= size:
            return
        start = r.vcn * cluster_size
        if start > pos:  # a gap in the runlist: zeros
            gap = min(start, size) - pos
            yield pos, bytes(gap)
            pos += gap
            if pos >= size:
                return
        run_bytes = min(r.length * cluster_size, size - start)
        done = pos - start
        while done < run_bytes:
            n = min(chunk, run_bytes - done)
            if r.lcn is None:
                yield pos, bytes(n)
            else:
                yield pos, read(base + r.lcn * cluster_size + done, n)
            done += n
            pos += n
    if pos < size:
        yield pos, bytes(size - pos)
