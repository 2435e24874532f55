"""A qcow2 (version 3) overlay holding only the clusters that changed between two points.

Written directly from the qcow2 specification (QEMU's ``docs/interop/qcow2.txt``), with
the standard library: 64 KiB clusters (configurable), 16-bit refcounts, no compression,
no snapshots, no extended L2 entries. Layout, all cluster aligned::

    header cluster | L1 table | refcount table | refcount blocks | L2 tables | data

* guest clusters touched by a change that read as zeroes at the target point get an L2
  entry with only the "reads as zeroes" flag (bit 0, no host cluster): they take no
  space and hide the backing file;
* any other touched cluster is a data cluster holding the *whole* cluster at the
  target point (the untouched bytes of a partly changed cluster are equal at both
  points, so the backing file would have supplied the same bytes);
* untouched clusters are unallocated: reads fall through to the backing file.

Every host cluster has refcount 1 and the COPIED flag is set on L1/L2 entries, so
``qemu-img check`` finds no leaks or errors. The metadata is computed before any data
is written (two resolves per candidate range, no payload read), then data clusters are
streamed in guest order: one pass, sequential writes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cdp.backup.changes import DATA, Piece
from cdp.errors import UsageError

MAGIC = b"QFI\xfb"
VERSION = 3
HEADER_LENGTH = 104
REFCOUNT_ORDER = 4  # 16-bit refcounts
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
COPIED = 1 << 63
ZERO_FLAG = 1
DEFAULT_CLUSTER_BITS = 16

_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")


@dataclass
class Layout:
    """Where everything goes. ``clusters``: touched guest cluster indexes (ascending);
    ``is_data``: parallel flags (False: zero cluster)."""

    size: int
    cluster_bits: int
    clusters: list[int] = field(default_factory=list)
    is_data: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        cs = self.cluster_size
        self.l2_entries = cs // 8
        guest_clusters = -(-self.size // cs)
        self.l1_size = max(1, -(-guest_clusters // self.l2_entries))
        self.l1_clusters = -(-self.l1_size * 8 // cs)
        self.l2_tables = sorted({c // self.l2_entries for c in self.clusters})
        self.data_clusters = sum(self.is_data)
        refs_per_block = cs * 8 // (1 << REFCOUNT_ORDER)
        fixed = 1 + self.l1_clusters + len(self.l2_tables) + self.data_clusters
        rb = rt = 1
        while True:
            total = fixed + rt + rb
            need_rb = -(-total // refs_per_block)
            need_rt = -(-need_rb * 8 // cs)
            if need_rb == rb and need_rt == rt:
                break
            rb, rt = max(rb, need_rb), max(rt, need_rt)
        self.refblocks = rb
        self.reftable_clusters = rt
        self.total_clusters = fixed + rt + rb
        self.l1_offset = cs
        self.reftable_offset = self.l1_offset + self.l1_clusters * cs
        self.refblocks_offset = self.reftable_offset + rt * cs
        self.l2_offset = self.refblocks_offset + rb * cs
        self.data_offset = self.l2_offset + len(self.l2_tables) * cs

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def file_size(self) -> int:
        return self.total_clusters * self.cluster_size

    @property
    def zero_clusters(self) -> int:
        return len(self.clusters) - self.data_clusters


def plan(vol: Any, seq_b: int, pieces: list[Piece], cluster_bits: int = DEFAULT_CLUSTER_BITS) -> Layout:
    """Classify the guest clusters the pieces touch (data or zero at ``seq_b``).

    A cluster is a zero cluster when the pieces cover it completely with zeroes, or when
    they cover it partly with zeroes and ``seq_b`` resolves the whole cluster to zeroes
    or holes (one resolve of that cluster). Cost: O(pieces + touched clusters)."""
    if not 9 <= cluster_bits <= 21:
        raise UsageError(f"cluster size must be 512 B .. 2 MiB, got 2**{cluster_bits}")
    cs = 1 << cluster_bits
    size = vol.size
    clusters: list[int] = []
    is_data: list[bool] = []
    cur = -1
    covered = 0
    has_data = False

    def finish() -> None:
        if cur < 0:
            return
        length = min(cs, size - cur * cs)
        if has_data:
            data = True
        elif covered >= length:
            data = False
        else:
            data = any(e.loc >= 0 for e in vol.extents(cur * cs, cur * cs + length, seq_b))
        clusters.append(cur)
        is_data.append(data)

    for p in pieces:
        c0 = p.start // cs
        c1 = (p.end - 1) // cs
        d = p.kind == DATA
        if c0 != cur:
            finish()
            cur, covered, has_data = c0, 0, False
        if c1 == c0:
            covered += p.length
            has_data = has_data or d
            continue
        covered += (c0 + 1) * cs - p.start
        has_data = has_data or d
        finish()
        if c1 > c0 + 1:
            clusters.extend(range(c0 + 1, c1))
            is_data.extend([d] * (c1 - c0 - 1))
        cur, covered, has_data = c1, p.end - c1 * cs, d
    finish()
    return Layout(size, cluster_bits, clusters, is_data)


def metadata(lay: Layout, backing: str | None, backing_format: str | None) -> Iterator[tuple[int, bytes]]:
    """``(file offset, bytes)`` of every metadata structure (header, L1, refcounts, L2)."""
    cs = lay.cluster_size
    # header cluster: header, extensions, backing file name
    exts = b""
    if backing is not None and backing_format:
        fmt = backing_format.encode()
        exts += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
    exts += struct.pack(">II", EXT_END, 0)
    name = backing.encode() if backing is not None else b""
    if len(name) > 1023:
        raise UsageError("backing file name longer than 1023 bytes")
    name_off = HEADER_LENGTH + len(exts) if name else 0
    hdr = _HEADER.pack(
        MAGIC, VERSION, name_off, len(name), lay.cluster_bits, lay.size,
        0,  # crypt_method
        lay.l1_size, lay.l1_offset, lay.reftable_offset, lay.reftable_clusters,
        0, 0,  # no snapshots
        0, 0, 0,  # incompatible, compatible, autoclear features
        REFCOUNT_ORDER, HEADER_LENGTH,
    )
    assert len(hdr) == HEADER_LENGTH
    yield 0, hdr + exts + name
    # L2 tables, and L1 entries pointing at them
    l1 = [0] * lay.l1_size
    l2_index = {t: i for i, t in enumerate(lay.l2_tables)}
    for t, i in l2_index.items():
        l1[t] = (lay.l2_offset + i * cs) | COPIED
    yield lay.l1_offset, struct.pack(f">{lay.l1_size}Q", *l1)
    tables: dict[int, list[int]] = {}
    host = lay.data_offset
    for c, data in zip(lay.clusters, lay.is_data, strict=True):
        t, k = divmod(c, lay.l2_entries)
        tab = tables.get(t)
        if tab is None:
            tab = tables[t] = [0] * lay.l2_entries
        if data:
            tab[k] = host | COPIED
            host += cs
        else:
            tab[k] = ZERO_FLAG
    for t, tab in tables.items():
        yield lay.l2_offset + l2_index[t] * cs, struct.pack(f">{lay.l2_entries}Q", *tab)
    # refcounts: every host cluster is used exactly once
    refs_per_block = cs * 8 // (1 << REFCOUNT_ORDER)
    rt = [lay.refblocks_offset + i * cs for i in range(lay.refblocks)]
    yield lay.reftable_offset, struct.pack(f">{len(rt)}Q", *rt)
    left = lay.total_clusters
    for i in range(lay.refblocks):
        n = min(left, refs_per_block)
        yield lay.refblocks_offset + i * cs, b"\x00\x01" * n
        left -= n


def data_runs(lay: Layout, max_clusters: int) -> Iterator[tuple[int, int, int]]:
    """``(guest offset, file offset, clusters)`` of runs of consecutive data clusters
    (at most ``max_clusters`` each), in guest order = file order."""
    cs = lay.cluster_size
    host = lay.data_offset
    run_start = -1
    run_n = 0
    for c, data in zip(lay.clusters, lay.is_data, strict=True):
        if not data:
            continue
        if run_n and c == run_start + run_n and run_n < max_clusters:
            run_n += 1
            continue
        if run_n:
            yield run_start * cs, host, run_n
            host += run_n * cs
        run_start, run_n = c, 1
    if run_n:
        yield run_start * cs, host, run_n


def write_at(fd: int, items: list[tuple[int, bytes | memoryview]]) -> None:
    """pwrite every ``(offset, bytes)`` (blocking; for a worker thread)."""
    for off, buf in items:
        view = memoryview(buf)
        while view:
            n = os.pwrite(fd, view, off)
            view = view[n:]
            off += n
