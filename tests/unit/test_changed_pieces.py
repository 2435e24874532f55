"""diff_pieces on real Volumes with random histories (writes, zeroes, markers, rewinds):
for random pairs of points, the pieces cover every byte that differs, nothing outside
them differs, ZERO pieces read as zeroes at the target and DATA pieces' sources hold
the target's bytes; rewinding back to a point reports nothing changed (tight, unlike the
map engine's superset). Also the NBD status runs and the x-cdp:changed meta context."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from cdp.backup.changes import (
    DATA,
    ZERO,
    Piece,
    align_ranges,
    diff_pieces,
    merged_ranges,
    status_runs,
    totals,
)
from cdp.config import MapSettings, Settings
from cdp.exports import CHANGED_PREFIX, PointInTimeDevice, VolumeDevice, sector_runs
from cdp.volume import Volume
from tests.helpers import assert_bytes_equal

SIZE = 1 << 20


def settings(tmp: Path) -> Settings:
    return replace(Settings(), store=tmp / "store",
                   maps=replace(MapSettings(), l0_max_writes=8, fanout=4, full_every=4))


async def _history(vol: Volume, rng: random.Random, steps: int) -> list[tuple[int, bytes]]:
    model = bytearray(SIZE)
    points: list[tuple[int, bytes]] = [(0, bytes(SIZE))]
    for _ in range(steps):
        for _ in range(rng.randrange(1, 12)):
            off = rng.randrange(0, SIZE - 70000)
            ln = rng.randrange(1, 70000)
            r = rng.random()
            if r < 0.2:
                vol.zero(off, ln)
                model[off : off + ln] = bytes(ln)
            elif r < 0.25:  # rewrite the same bytes: a change of source, same content
                vol.write(off, bytes(model[off : off + ln]))
            else:
                data = rng.randbytes(ln)
                vol.write(off, data)
                model[off : off + ln] = data
        if rng.random() < 0.15 and len(points) > 1:
            seq, img = rng.choice(points)
            await vol.rewind(seq)
            model[:] = img
        m = await vol.snapshot()
        points.append((m.seq, bytes(model)))
    return points


def _check(vol: Volume, a: int, ia: bytes, b: int, ib: bytes) -> list[Piece]:
    pieces = diff_pieces(vol, a, b)
    mask = bytearray(SIZE)
    last = 0
    for p in pieces:
        assert p.start >= last and p.end > p.start
        last = p.end
        mask[p.start : p.end] = b"\x01" * p.length
        if p.kind == ZERO:
            assert_bytes_equal(ib[p.start : p.end], bytes(p.length))
        else:
            assert_bytes_equal(vol.journal.read_slice(p.seq, p.loc, p.poff, p.length), ib[p.start : p.end])
    # outside the pieces nothing differs (checked per 64-byte block, then exactly)
    for off in range(0, SIZE, 4096):
        if ia[off : off + 4096] != ib[off : off + 4096]:
            for k in range(off, off + 4096):
                if ia[k] != ib[k]:
                    assert mask[k], f"byte {k} differs between @{a} and @{b} but is not reported"
    return pieces


@pytest.mark.parametrize("seed", range(8))
def test_random_histories_random_pairs(tmp_path: Path, seed: int) -> None:
    async def go() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path))
        rng = random.Random(seed)
        points = await _history(vol, rng, 10)
        for _ in range(8):
            (a, ia), (b, ib) = rng.choice(points), rng.choice(points)
            pieces = _check(vol, a, ia, b, ib)
            if a == b:
                assert pieces == []
            t = totals(pieces)
            assert t["changed_bytes"] == sum(e - s for s, e in merged_ranges(pieces))
        vol.close()

    asyncio.run(go())


def test_rewind_back_reports_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path))
        vol.write(0, b"a" * 8192)
        m1 = await vol.snapshot()
        vol.write(4096, b"b" * 100_000)
        vol.zero(200_000, 50_000)
        await vol.rewind(m1.seq)
        assert diff_pieces(vol, m1.seq, vol.head_seq) == []
        vol.zero(300_000, 4096)  # zeroes over a hole: a candidate, but not a change
        assert vol.changed(m1.seq, vol.head_seq) == [(300_000, 304_096)]
        assert diff_pieces(vol, m1.seq, vol.head_seq) == []
        # a write of identical bytes is a change of source: reported (documented)
        vol.write(0, b"a" * 512)
        assert merged_ranges(diff_pieces(vol, m1.seq, vol.head_seq)) == [(0, 512)]
        vol.close()

    asyncio.run(go())


def test_zero_over_hole_is_not_a_change_and_kinds(tmp_path: Path) -> None:
    async def go() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path))
        m0 = await vol.snapshot()
        vol.zero(0, 65536)  # zeroes over a hole: same content, same "source" (none)
        vol.write(131072, b"x" * 4096)
        m1 = await vol.snapshot()
        vol.zero(131072, 4096)
        m2 = await vol.snapshot()
        assert diff_pieces(vol, m0.seq, m1.seq) == [Piece(131072, 135168, DATA, *_src(vol, m1.seq, 131072))]
        assert diff_pieces(vol, m1.seq, m2.seq) == [Piece(131072, 135168, ZERO)]
        assert diff_pieces(vol, m0.seq, m2.seq) == []
        vol.close()

    asyncio.run(go())


def _src(vol: Volume, seq: int, off: int) -> tuple[int, int, int]:
    e = vol.extents(off, off + 1, seq)[0]
    return e.seq, e.loc, e.poff + off - e.start


def test_align_ranges() -> None:
    assert list(align_ranges([(1, 2), (600, 700), (1500, 1536)], 512, 1536)) == [(0, 1536)]
    assert list(align_ranges([(0, 512), (2048, 2049)], 512, 4096)) == [(0, 512), (2048, 2560)]
    assert list(align_ranges([], 512, 4096)) == []


def test_status_runs_and_meta_context(tmp_path: Path) -> None:
    async def go() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path))
        vol.write(4096, b"x" * 8192)
        m1 = await vol.snapshot()
        vol.write(65536, b"y" * 100)  # unaligned: widened to 512 in NBD answers
        vol.zero(4096, 4096)
        m2 = await vol.snapshot()
        runs = status_runs(vol, m1.seq, m2.seq, 0, SIZE)
        assert runs == [(4096, 0), (4096, 1), (65536 - 8192, 0), (512, 1), (SIZE - 66048, 0)]
        assert sum(n for n, _ in runs) == SIZE
        # a window in the middle, and nothing changed
        assert status_runs(vol, m1.seq, m2.seq, 8192, 4096) == [(4096, 0)]
        assert status_runs(vol, m2.seq, m2.seq, 0, 4096) == [(4096, 0)]

        pit = PointInTimeDevice(vol, m2.seq, "marker2")
        live = VolumeDevice(vol)
        name = CHANGED_PREFIX + "marker1"
        assert pit.match_meta_contexts(name, False) == [name]
        assert pit.match_meta_contexts(CHANGED_PREFIX + "marker9", False) == []
        assert pit.match_meta_contexts(CHANGED_PREFIX, False) == []
        listed = [CHANGED_PREFIX + "marker1", CHANGED_PREFIX + "marker2", CHANGED_PREFIX]
        assert pit.match_meta_contexts("x-cdp:", True) == listed
        assert pit.match_meta_contexts(CHANGED_PREFIX, True) == listed
        assert pit.meta_contexts() == live.meta_contexts() == ["base:allocation", *listed]
        assert pit.match_meta_contexts("base:", True) == ["base:allocation"]
        assert pit.match_meta_contexts("base:allocation", False) == ["base:allocation"]
        assert pit.match_meta_contexts("qemu:dirty-bitmap:x", False) == []
        assert pit.block_status(name, 0, SIZE) == runs
        assert pit.block_status("base:allocation", 0, 4096) == [(4096, 3)]
        vol.write(0, b"z" * 512)  # the live export is relative to now
        assert live.block_status(name, 0, 8192) == [(512, 1), (3584, 0), (4096, 1)]
        assert pit.block_status(name, 0, 8192) == [(4096, 0), (4096, 1)]
        pit.close()
        live.close()
        vol.close()

    asyncio.run(go())


def test_empty_meta_context_query_lists_changed_contexts_through_the_core(tmp_path: Path) -> None:
    """NBD_OPT_LIST_META_CONTEXT through the sans-I/O core on a real volume: the empty
    query lists base:allocation, one x-cdp:changed context per marker and the namespace
    entry, on the live export and on a point-in-time one; SET selects a listed marker
    context but never the namespace entry."""
    from cdp.exports import StoreExports
    from cdp.store import Store
    from cdp.targets.nbd.core import Ready, ServerConnection
    from cdp.targets.nbd.proto import U32, Opt, Rep
    from cdp.targets.testing.nbd_wire import FLAGS, go, meta, opt, option_replies

    async def go_() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path))
        store = cast(Store, SimpleNamespace(volumes={"v": vol}, volume=lambda name: vol))
        provider = StoreExports(store)
        vol.write(0, b"a" * 4096)
        await vol.snapshot()
        vol.write(100, b"b" * 3)
        await vol.snapshot("two")
        changed = [CHANGED_PREFIX + "marker1", CHANGED_PREFIX + "marker2", CHANGED_PREFIX]
        for export in ("v", "v@marker1", "v@two"):
            conn = ServerConnection(provider)
            conn.receive_data(FLAGS + opt(Opt.STRUCTURED_REPLY))
            for queries, want in [((), ["base:allocation", *changed]), (("x-cdp:",), changed),
                                  (("base:", "x-cdp:changed:"), ["base:allocation", *changed])]:
                conn.receive_data(meta(Opt.LIST_META_CONTEXT, export, *queries))
                conn.next_event()
                reps = option_replies(conn.data_to_send())
                reps = [r for r in reps if r[0] == Opt.LIST_META_CONTEXT]
                assert reps[-1][1] == Rep.ACK
                assert all(r[1] == Rep.META_CONTEXT and r[2][:4] == bytes(4) for r in reps[:-1])
                assert [r[2][4:].decode() for r in reps[:-1]] == want, (export, queries)
            conn.receive_data(meta(Opt.SET_META_CONTEXT, export, *changed) + go(export))
            ready = conn.next_event()
            assert isinstance(ready, Ready)
            assert ready.contexts == [(1, changed[0]), (2, changed[1])]
            replies = option_replies(conn.data_to_send())
            assert (Opt.SET_META_CONTEXT, Rep.META_CONTEXT, U32.pack(2) + changed[1].encode()) in replies
            ready.device.close()
        vol.close()

    asyncio.run(go_())


@pytest.mark.parametrize("seed", range(200))
def test_sector_runs_widen_data_to_whole_sectors(seed: int) -> None:
    """base:allocation answers: the same span; a HOLE|ZERO run only where every byte is a
    hole; every 512-byte sector (within the span) with a data byte reported as data,
    every one without reported as a hole; runs alternate."""
    rng = random.Random(seed)
    offset = rng.choice([0, 1, 511, 512, 4095, rng.randrange(0, 1 << 20)])
    runs = []
    flags = rng.choice([0, 3])
    for _ in range(rng.randrange(1, 12)):
        runs.append((rng.choice([1, 2, 100, 511, 512, 513, 1024, rng.randrange(1, 5000)]), flags))
        flags = 3 - flags
    span = sum(n for n, _ in runs)
    data = bytearray(span)
    pos = 0
    for n, f in runs:
        data[pos : pos + n] = (b"\1" if f == 0 else b"\0") * n
        pos += n
    out = sector_runs(runs, offset)
    assert sum(n for n, _ in out) == span and all(n > 0 for n, _ in out)
    assert all(a[1] != b[1] for a, b in itertools.pairwise(out))
    pos = 0
    for n, f in out:
        assert f in (0, 3)
        if f:
            assert not any(data[pos : pos + n])
        for sector in range((offset + pos) // 512, (offset + pos + n - 1) // 512 + 1):
            lo = max(0, sector * 512 - offset)
            hi = min(span, (sector + 1) * 512 - offset)
            assert (f == 0) == any(data[lo:hi]), (runs, offset, out, sector)
        pos += n
