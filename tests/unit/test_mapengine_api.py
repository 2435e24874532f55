"""Map engine API: contracts, errors, merge accounting, examples from the docs."""

from __future__ import annotations

import doctest
import random
from pathlib import Path

import numpy as np
import pytest

import mapengine.history
from mapengine import (
    HOLE_LOC,
    ZERO_LOC,
    Columns,
    DeltaMap,
    Extent,
    MapCorruption,
    MapError,
    MapHistory,
    MapUsageError,
    MergePolicy,
    build_l0,
    merge,
)


def test_docstring_examples() -> None:
    assert doctest.testmod(mapengine.history).failed == 0


def test_error_classes_inherit_builtins() -> None:
    assert issubclass(MapCorruption, MapError) and issubclass(MapCorruption, OSError)
    assert issubclass(MapUsageError, MapError) and issubclass(MapUsageError, ValueError)
    e = MapCorruption("/x/F-1.map", "bad")
    assert e.path == "/x/F-1.map" and "F-1.map" in str(e)


def test_usage_errors() -> None:
    h = MapHistory.open(None)
    h.add_write(5, 0, 10, 1)
    with pytest.raises(MapUsageError):
        h.add_write(5, 0, 10, 1)  # seq not increasing
    with pytest.raises(MapUsageError):
        h.add_zero(4, 0, 10)
    with pytest.raises(MapUsageError):
        h.note_seq(3)
    with pytest.raises(MapUsageError):
        h.add_write(6, 10, 5, 1)  # bad range
    with pytest.raises(MapUsageError):
        h.add_write(6, -1, 5, 1)
    with pytest.raises(MapUsageError):
        h.add_write(6, 0, 5, -7)  # bad loc
    with pytest.raises(MapUsageError):
        h.resolve(6, 0, 10)  # beyond last_seq
    with pytest.raises(MapUsageError):
        h.resolve(5, 10, 0)
    with pytest.raises(MapUsageError):
        h.changed(0, 9)
    with pytest.raises(MapUsageError):
        h.add_rewind(6, 6)  # target must be before the rewind
    with pytest.raises(ValueError):  # MapUsageError is a ValueError
        MergePolicy(fanout=1)
    assert h.last_seq == 5  # failed calls changed nothing


def test_resolve_basics_and_holes() -> None:
    h = MapHistory.open(None)
    assert h.resolve(0, 0, 100) == [Extent(0, 100, 0, HOLE_LOC, 0)]
    h.add_write(1, 10, 20, 7)
    h.add_zero(2, 15, 30)
    h.note_seq(3)
    assert h.resolve(3, 0, 40) == [
        Extent(0, 10, 0, HOLE_LOC, 0),
        Extent(10, 15, 1, 7, 0),
        Extent(15, 30, 2, ZERO_LOC, 0),
        Extent(30, 40, 0, HOLE_LOC, 0),
    ]
    assert h.resolve(1, 12, 14) == [Extent(12, 14, 1, 7, 2)]
    assert h.resolve(3, 5, 5) == []
    h.seal()
    assert h.sealed_seq == 3
    assert h.resolve(1, 12, 14) == [Extent(12, 14, 1, 7, 2)]


def test_split_keeps_source_with_larger_poff() -> None:
    h = MapHistory.open(None)
    h.add_write(1, 0, 100, 50)
    h.add_write(2, 40, 60, 90)
    assert h.resolve(2, 0, 100) == [
        Extent(0, 40, 1, 50, 0),
        Extent(40, 60, 2, 90, 0),
        Extent(60, 100, 1, 50, 60),
    ]


def test_rewind_is_metadata_and_chains() -> None:
    h = MapHistory.open(None, policy=MergePolicy(fanout=2, l0_max_writes=2, full_every=4))
    h.add_write(1, 0, 10, 1)
    h.add_write(2, 0, 10, 2)
    h.add_rewind(3, 1)  # back to after write 1
    assert h.sealed_seq == 3
    assert h.resolve(3, 0, 10) == [Extent(0, 10, 1, 1, 0)]
    h.add_write(4, 5, 10, 4)
    h.add_rewind(5, 2)  # rewind the rewind
    assert h.resolve(5, 0, 10) == [Extent(0, 10, 2, 2, 0)]
    assert h.resolve(4, 0, 10) == [Extent(0, 5, 1, 1, 0), Extent(5, 10, 4, 4, 0)]
    h.add_rewind(6, 4)  # to a point after an earlier rewind
    assert h.resolve(6, 0, 10) == h.resolve(4, 0, 10)
    assert h.changed(6, 4) == []
    assert h.changed(5, 6) == [(0, 10)]
    assert h.changed(1, 3) == []
    h._check()


def test_seal_due_and_stats(tmp_path: Path) -> None:
    h = MapHistory.open(tmp_path, policy=MergePolicy(fanout=2, l0_max_writes=3, full_every=4))
    due = [h.add_write(s, s * 10, s * 10 + 10, s) for s in range(1, 4)]
    assert due == [False, False, True] and h.seal_due
    h.seal()
    assert not h.seal_due
    for s in range(4, 20):
        if h.add_write(s, (s % 5) * 10, (s % 5) * 10 + 10, s):
            h.seal()
    h.seal()
    st = h.stats()
    assert st["maps"]["L0"] == 7 and st["maps"]["L1"] == 3 and st["maps"]["F"] == 1
    assert st["disk_bytes"] > 0 and st["sealed_seq"] == 19 and st["entries"] > 0
    assert st["cache_bytes"] >= 0
    h._check()
    h.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "F-00000000000000000012.map" in names
    assert "L0-00000000000000000001-00000000000000000003.map" in names
    assert "L1-00000000000000000001-00000000000000000006.map" in names
    assert "MANIFEST" in names


def test_merge_accounts_dropped_bytes() -> None:
    a = build_l0(0, 2, Columns.from_lists([0, 50], [100, 60], [1, 2], [1000, 2000], [0, 0]))
    b = build_l0(2, 4, Columns.from_lists([20, 0], [40, 10], [3, 4], [3000, ZERO_LOC], [0, 0]))
    res = merge([a, b])
    res.map._check()
    assert res.map.flat and (res.map.lo, res.map.hi) == (0, 4)
    got = sorted(
        zip(
            res.dropped_seq.tolist(),
            res.dropped_poff.tolist(),
            res.dropped_len.tolist(),
            strict=True,
        )
    )
    # write 1 lost [0,10) to the zero, [20,40) to write 3, [50,60) to write 2
    assert got == [(1, 0, 10), (1, 20, 20), (1, 50, 10)]
    assert res.dropped_bytes == 40
    by = res.dropped_bytes_by(lambda seq, loc: loc // 1000)
    assert by == {1: 40}
    with pytest.raises(ValueError):
        merge([b, a])  # not adjacent in time


def test_merge_of_flat_maps_newest_wins() -> None:
    old = DeltaMap(0, 5, Columns.from_lists([0, 10], [10, 20], [1, 5], [1, 5], [0, 0]), True)
    new = DeltaMap(5, 9, Columns.from_lists([5], [15], [7], [7], [3]), True)
    r = merge([old, new])
    assert r.map.cols.extents() == [
        Extent(0, 5, 1, 1, 0),
        Extent(5, 15, 7, 7, 3),
        Extent(15, 20, 5, 5, 5),
    ]
    assert r.dropped_bytes == 10


def test_history_reports_merges() -> None:
    h = MapHistory.open(None, policy=MergePolicy(fanout=2, l0_max_writes=1, full_every=0))
    seen: list[tuple[str, int]] = []
    h.on_merge = lambda name, res: seen.append((name, res.dropped_bytes))
    for s in range(1, 5):
        h.add_write(s, 0, 10, s)
        h.seal()
    assert seen == [("L1", 10), ("L1", 10), ("L2", 10)]
    assert h.dropped_bytes_total == 30


def test_level1_from_kept_deltas_matches_a_real_merge() -> None:
    """Level-1 maps built from the windows' flat deltas (no on_merge) equal the merged
    maps a history with on_merge builds, and drop the same number of bytes."""
    pol = MergePolicy(fanout=3, l0_max_writes=4, full_every=9)
    fast = MapHistory.open(None, policy=pol)
    slow = MapHistory.open(None, policy=pol)
    slow.on_merge = lambda name, res: None
    rnd = random.Random(7)
    for s in range(1, 400):
        a = rnd.randrange(64) * 512
        b = a + rnd.randrange(1, 6) * 512
        for h in (fast, slow):
            due = h.add_zero(s, a, b) if s % 11 == 0 else h.add_write(s, a, b, s)
            if due:
                h.seal()
    fast._check()
    assert fast.dropped_bytes_total == slow.dropped_bytes_total > 0
    for k in (1, 2):
        mf = [r.load().cols for r in fast._epochs[0].levels.get(k, [])]
        ms = [r.load().cols for r in slow._epochs[0].levels.get(k, [])]
        assert len(mf) == len(ms) and (k == 2 or mf)
        for x, y in zip(mf, ms, strict=True):
            assert all(np.array_equal(u, v) for u, v in zip(x, y, strict=True))


def test_head_read_uses_columns_not_objects() -> None:
    h = MapHistory.open(None, policy=MergePolicy(l0_max_writes=64))
    for s in range(1, 1000):
        if h.add_write(s, (s * 4096 * 7) % (1 << 24), (s * 4096 * 7) % (1 << 24) + 4096, s):
            h.seal()
    h._check()
    for arr in (*h._head, *h._recent):
        assert isinstance(arr, np.ndarray) and arr.dtype == np.int64


def test_reopen_keeps_policy_shape(tmp_path: Path) -> None:
    h = MapHistory.open(tmp_path, policy=MergePolicy(fanout=3, l0_max_writes=2, full_every=9))
    for s in range(1, 30):
        if h.add_write(s, s, s + 5, s):
            h.seal()
    h.seal()
    before = [h.resolve(x, 0, 40) for x in range(30)]
    h.close()
    h = MapHistory.open(tmp_path, policy=MergePolicy(fanout=8, l0_max_writes=5))
    assert h.policy.fanout == 3 and h.policy.full_every == 9 and h.policy.l0_max_writes == 5
    assert [h.resolve(x, 0, 40) for x in range(30)] == before
    h._check()
