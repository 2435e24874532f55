"""The changed pieces computed in columns equal the per-extent walk they replaced.

``reference_pieces`` is the implementation ``cdp.backup.changes`` had before the pieces
were computed in numpy (two resolves per candidate range as Extent lists, a walk building
a Piece per cell, ``append_piece`` joining): kept here as the reference. Random histories
on real Volumes (writes, rewrites of the same bytes, zeroes (NBD trim and write-zeroes
are both ``Volume.zero``), rewinds, markers, and an unsealed live tail), random pairs of
points (origin and head included), ranges at and between the volume's edges; the
columnar diff, forced for every range, forbidden for every range, and at its default
threshold, gives the same pieces, totals and merged ranges. ``resolve_columns`` gives
``resolve``'s extents.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdp.backup.changes as changes
from cdp.backup.changes import (
    DATA,
    ZERO,
    Piece,
    append_piece,
    diff_columns,
    diff_pieces,
    merged_ranges,
    totals,
)
from cdp.config import MapSettings, Settings
from cdp.ops.backup import compute_piece_columns, compute_pieces
from cdp.volume import Volume

SIZE = 1 << 21


def reference_pieces(vol: Any, seq_a: int, seq_b: int, start: int = 0,
                     end: int | None = None) -> list[Piece]:
    """The per-extent walk (the implementation before the columnar one)."""
    end = vol.size if end is None else end
    out: list[Piece] = []
    for s, e in vol.changed(seq_a, seq_b, start, end):
        ea = vol.extents(s, e, seq_a)
        eb = vol.extents(s, e, seq_b)
        i = j = 0
        pos = s
        while pos < e:
            x, y = ea[i], eb[j]
            stop = min(x.end, y.end, e)
            same = (x.loc < 0 and y.loc < 0) or (
                x.seq == y.seq and x.loc == y.loc and x.poff - x.start == y.poff - y.start)
            if not same:
                if y.loc < 0:
                    p = Piece(pos, stop, ZERO)
                else:
                    p = Piece(pos, stop, DATA, y.seq, y.loc, y.poff + (pos - y.start))
                append_piece(out, p)
            pos = stop
            if x.end <= stop:
                i += 1
            if y.end <= stop:
                j += 1
    return out


async def _history(vol: Volume, rng: random.Random, steps: int) -> list[int]:
    points = [0]
    model = bytearray(SIZE)
    for _ in range(steps):
        for _ in range(rng.randrange(1, 10)):
            big = rng.random() < 0.2
            ln = rng.randrange(1, SIZE // 2 if big else 40_000)
            edge = rng.random()
            off = 0 if edge < 0.1 else SIZE - ln if edge < 0.2 else rng.randrange(0, SIZE - ln)
            r = rng.random()
            if r < 0.25:
                vol.zero(off, ln)
                model[off : off + ln] = bytes(ln)
            elif r < 0.35:  # the same bytes again: a new source, the same content
                vol.write(off, bytes(model[off : off + ln]))
            else:
                data = rng.randbytes(ln)
                vol.write(off, data)
                model[off : off + ln] = data
        if rng.random() < 0.15 and len(points) > 1:
            await vol.rewind(rng.choice(points))
        points.append((await vol.snapshot()).seq)
    for _ in range(rng.randrange(0, 4)):  # an unsealed tail at the head
        off = rng.randrange(0, SIZE - 5000)
        vol.write(off, rng.randbytes(rng.randrange(1, 5000)))
    points.append(vol.head_seq)
    return points


def _ranges(rng: random.Random) -> list[tuple[int, int]]:
    out = [(0, SIZE), (0, rng.randrange(1, SIZE)), (rng.randrange(0, SIZE), SIZE)]
    a = rng.randrange(0, SIZE - 1)
    out.append((a, rng.randrange(a + 1, SIZE + 1)))
    return out


def _all_ways(vol: Volume, a: int, b: int, s: int, e: int) -> None:
    ref = reference_pieces(vol, a, b, s, e)
    for threshold in (0, changes._COLUMNS_FROM, 1 << 62):
        old = changes._COLUMNS_FROM
        changes._COLUMNS_FROM = threshold
        try:
            got = diff_pieces(vol, a, b, s, e)
            cols = diff_columns(vol, a, b, s, e)
        finally:
            changes._COLUMNS_FROM = old
        assert got == ref, (a, b, s, e, threshold)
        assert cols.totals() == totals(ref)
        assert cols.ranges() == merged_ranges(ref)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_columns_equal_the_walk(seed: int) -> None:
    rng = random.Random(seed)

    async def go(tmp: Path) -> None:
        st_ = replace(Settings(), store=tmp / "store",
                      maps=replace(MapSettings(), l0_max_writes=rng.choice([4, 8, 64]),
                                   fanout=4, full_every=rng.choice([4, 8])))
        vol = Volume.create(tmp / "v", "v", SIZE, st_)
        try:
            points = await _history(vol, rng, rng.randrange(2, 12))
            pairs = [(0, vol.head_seq), (vol.head_seq, 0)]
            pairs += [(rng.choice(points), rng.choice(points)) for _ in range(4)]
            for a, b in pairs:
                for s, e in _ranges(rng):
                    _all_ways(vol, a, b, s, e)
                    for p in (a, b):
                        if p:
                            cols = vol.maps.resolve_columns(p, s, e).extents()
                            assert cols == vol.maps.resolve(p, s, e)
            whole = reference_pieces(vol, 0, vol.head_seq)
            nop = lambda *a: None  # noqa: E731
            assert await compute_pieces(vol, 0, vol.head_seq, nop) == whole
            assert (await compute_piece_columns(vol, 0, vol.head_seq, nop)).totals() == totals(whole)
        finally:
            vol.close()

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(go(Path(d)))


@pytest.mark.parametrize("seed", range(3))
def test_columns_equal_the_walk_across_windows(seed: int, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """compute_pieces joins pieces across its windows as the walk did."""
    import cdp.ops.backup as ob

    monkeypatch.setattr(ob, "WINDOW", 1 << 16)
    monkeypatch.setattr(changes, "_COLUMNS_FROM", 0)
    rng = random.Random(seed)

    async def go() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, replace(
            Settings(), store=tmp_path / "store",
            maps=replace(MapSettings(), l0_max_writes=8, fanout=4, full_every=4)))
        try:
            points = await _history(vol, rng, 6)
            for a, b in [(0, vol.head_seq), (points[1], points[-2])]:
                ref = reference_pieces(vol, a, b)
                assert await compute_pieces(vol, a, b, lambda *x: None) == ref
        finally:
            vol.close()

    asyncio.run(go())


def test_changed_op_output_is_the_walks(tmp_path: Path) -> None:
    """The changed operation (cdpctl changed, --kinds) reports the walk's totals, merged
    ranges and pieces."""
    from types import SimpleNamespace

    from cdp.ops.backup import changed

    rng = random.Random(7)

    async def go() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, replace(
            Settings(), store=tmp_path / "store",
            maps=replace(MapSettings(), l0_max_writes=8, fanout=4, full_every=4)))
        try:
            points = await _history(vol, rng, 8)
            a = next(p for p in points
                     if {q.kind for q in reference_pieces(vol, p, vol.head_seq)} == {DATA, ZERO})
            store = SimpleNamespace(volume=lambda name=None: vol)
            r = await changed(store, {"from": f"@{a}", "kinds": True},  # type: ignore[arg-type]
                              lambda *a: None)
            ref = reference_pieces(vol, a, vol.head_seq)
            assert {k: r[k] for k in totals(ref)} == totals(ref)
            assert r["ranges"] == [{"offset": s, "length": e - s} for s, e in merged_ranges(ref)]
            assert r["ranges_count"] == len(r["ranges"])
            assert r["pieces"] == [
                {"offset": p.start, "length": p.length, "kind": "data" if p.kind == DATA else "zero"}
                for p in ref]
        finally:
            vol.close()

    asyncio.run(go())
