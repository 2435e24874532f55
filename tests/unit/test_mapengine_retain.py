"""MapHistory.retain: what stays resolvable, what is dropped, names, persistence and
crash safety (an interruption at every step of the rewrite leaves the old or new state)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mapengine import MapExpired, MapHistory, MapUsageError, MergePolicy
from mapengine.storage import FileOps

POL = MergePolicy(fanout=2, l0_max_writes=4, full_every=4)


def _history(d: str | None) -> MapHistory:
    """40 writes of 8 bytes cycling over [0, 32), sealed every 4 writes."""
    h = MapHistory.open(d, policy=POL)
    for seq in range(1, 41):
        a = (seq * 8) % 32
        if h.add_write(seq, a, a + 8, loc=seq * 100):
            h.seal()
    h.seal()
    return h


def _snap(h: MapHistory, points: list[int]) -> dict[int, list[tuple[int, ...]]]:
    return {p: [tuple(e) for e in h.resolve(p, 0, 32)] for p in points}


def test_retain_keeps_points_and_drops_the_rest(tmp_path: Path) -> None:
    h = _history(str(tmp_path))
    before = _snap(h, [10, 20, 30, 35, 36, 40])
    res = h.retain([10, 20], keep_after=30)
    assert res.retained == [10, 20]
    assert res.keep_after == 30
    assert _snap(h, [10, 20, 30, 35, 36, 40]) == before
    # each write covers 8 bytes; 4 writes per 32 bytes: between retained points only the
    # newest of each slot survives
    assert res.dropped_bytes > 0
    assert set(res.dropped_loc.tolist()) == {q * 100 for q in res.dropped_seq.tolist()}
    for p in (5, 11, 19, 21, 29):
        assert not h.resolvable(p)
        with pytest.raises(MapExpired):
            h.resolve(p, 0, 32)
        with pytest.raises(MapExpired):
            h.changed(p, 40)
    assert h.changed(10, 20) != []
    h._check()
    names = sorted(os.listdir(tmp_path))
    assert any(n.endswith("-r1.map") for n in names)
    h.close()
    h2 = MapHistory.open(str(tmp_path), policy=POL)
    assert h2.retained == [10, 20] and h2.keep_after == 30
    assert _snap(h2, [10, 20, 30, 35, 40]) == {p: before[p] for p in (10, 20, 30, 35, 40)}
    h2._check()
    # an expired point cannot come back, keep_after never moves back
    with pytest.raises(MapExpired):
        h2.retain([15], keep_after=30)
    h2._broken = False
    res2 = h2.retain([20], keep_after=10)
    assert res2.keep_after == 30 and res2.retained == [20]
    assert not h2.resolvable(10)
    h2.close()


def test_live_fragments_shrink_to_what_points_reference() -> None:
    h = _history(None)
    total = sum(int((c.end - c.start).sum()) for c in h.live_fragments())
    assert total == 40 * 8
    res = h.retain([], keep_after=40)
    live = sum(int((c.end - c.start).sum()) for c in h.live_fragments())
    assert live == 32  # the head: 4 slots of 8 bytes
    assert res.dropped_bytes == 40 * 8 - 32


def test_rewind_targets_are_retained() -> None:
    h = MapHistory.open(None, policy=POL)
    for seq in range(1, 11):
        h.add_write(seq, 0, 8, loc=seq)
    h.add_rewind(11, 3)  # state(11) == state(3)
    for seq in range(12, 20):
        h.add_write(seq, 8, 16, loc=seq)
    h.seal()
    want = [tuple(e) for e in h.resolve(19, 0, 16)]
    res = h.retain([], keep_after=15)
    assert 3 in res.retained  # the rewind target the head depends on
    assert [tuple(e) for e in h.resolve(19, 0, 16)] == want
    assert h.resolve(3, 0, 8)[0].seq == 3
    with pytest.raises(MapExpired):
        h.resolve(7, 0, 8)
    h._check()


class _Crash(Exception):
    pass


class _CrashAt(FileOps):
    def __init__(self, at: int) -> None:
        self.at = at
        self.n = 0

    def hook(self, point: str, name: str) -> None:
        if self.n == self.at:
            raise _Crash(f"{point} {name}")
        self.n += 1


def test_crash_at_every_step_leaves_old_or_new_state(tmp_path: Path) -> None:
    base = tmp_path / "base"
    h = _history(str(base))
    pts = [1, 5, 10, 20, 30, 40]
    old = _snap(h, pts)
    h.close()
    at = 0
    saw_new = False
    while True:
        d = tmp_path / f"run{at}"
        shutil.copytree(base, d)
        fs = _CrashAt(at)
        h = MapHistory.open(str(d), policy=POL, fs=fs)
        fs.n = 0
        try:
            h.retain([10, 20], keep_after=30)
        except _Crash:
            with pytest.raises(MapUsageError):
                h.add_write(41, 0, 8, loc=1)
            h.close()
            h = MapHistory.open(str(d), policy=POL)
            if h.keep_after:
                saw_new = True
                assert _snap(h, [10, 20, 30, 40]) == {p: old[p] for p in (10, 20, 30, 40)}
            else:
                assert _snap(h, pts) == old
            h._check()
            leftovers = {n for n in os.listdir(d) if n.endswith(".tmp")}
            assert not leftovers
            h.close()
            at += 1
            continue
        try:
            h.close()  # keeps the head (maps/HEAD): more steps to crash at
        except _Crash:  # the retain is committed; the head is rebuilt at the next open
            h = MapHistory.open(str(d), policy=POL)
            assert h.keep_after == 30
            assert _snap(h, [10, 20, 30, 40]) == {p: old[p] for p in (10, 20, 30, 40)}
            h._check()
            assert not {n for n in os.listdir(d) if n.endswith(".tmp")}
            h.close()
            at += 1
            continue
        break
    assert at > 10 and saw_new
