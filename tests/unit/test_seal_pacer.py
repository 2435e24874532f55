"""Time-based seals of many volumes share one budget of event-loop time
(:class:`cdp.volume.SealPacer`): the most overdue first, none held past the limit, a
one-volume store sealed on time. Fake volumes and a fake clock: no timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cdp.config import MapSettings, Settings
from cdp.volume import SealPacer, Volume


@dataclass
class FakeVolume:
    due_at: float  # when its time-based seal falls due
    interval: float = 5.0
    seal_seconds: float = 0.0
    settings: Any = field(default_factory=lambda: Settings(maps=MapSettings(seal_interval=5.0)))

    def seal_overdue(self, now: float | None = None) -> float:
        assert now is not None
        return now - self.due_at


def vols(*due: float) -> list[Volume]:
    return [cast(Volume, FakeVolume(d)) for d in due]


def test_one_volume_is_sealed_when_due() -> None:
    p = SealPacer()
    [v] = vols(10.0)
    assert p.due([v], now=9.0) == []
    assert p.due([v], now=10.0) == [v]


def test_seals_are_spread_by_the_loop_time_they_cost() -> None:
    p = SealPacer()
    vs = vols(*[0.0] * 64)
    first = p.due(vs, now=1.0)
    assert 0 < len(first) < 64  # the burst credit, not all 64 at once
    for v in first:  # each seal took 50 ms of the loop
        cast(FakeVolume, v).seal_seconds += 0.05
        cast(FakeVolume, v).due_at = 1.0 + 5.0
    second = p.due(vs, now=2.0)
    assert len(second) == 1  # in debt: only the most overdue one (one per tick at least)
    assert not set(map(id, second)) & set(map(id, first))


def test_most_overdue_first_and_none_held_past_the_limit() -> None:
    p = SealPacer()
    p.credit = -100.0  # a loop fully spent on seals
    a, b, c, d = vols(0.0, -70.0, -65.0, -10.0)
    # the most overdue (one per tick at least), and the other one overdue by 12 intervals
    assert p.due([a, b, c, d], now=0.0) == [b, c]
    p.credit = 0.012  # enough for two guesses of 5 ms: the three most overdue
    p._last = 0.0
    p._started = {}
    assert p.due([a, b, c, d], now=0.0) == [b, c, d]


def test_only_the_paced_seals_are_charged() -> None:
    p = SealPacer()
    busy, idle = vols(1e9, 0.0)  # busy: seals by size, never due by time
    assert p.due([busy, idle], now=1.0) == [idle]
    cast(FakeVolume, busy).seal_seconds += 10.0  # size-based seals: not the pacer's
    cast(FakeVolume, idle).seal_seconds += 0.004
    cast(FakeVolume, idle).due_at = 2.0
    assert p.due([busy, idle], now=2.0) == [idle] and p.credit > 0


def test_a_volume_tells_how_overdue_its_seal_is_and_ticks_without_sealing(tmp_path: Path) -> None:
    from dataclasses import replace

    from cdp.config import VolumeSpec
    from cdp.store import Store

    st = replace(Settings(), store=tmp_path / "store",
                 maps=replace(MapSettings(), l0_max_writes=1000, seal_interval=5.0))
    s = Store.open(st)
    try:
        v = s.create_volume(VolumeSpec("v", 1 << 20))
        t = time.monotonic()
        assert v.seal_overdue(t) == float("-inf")  # nothing unsealed
        v.write(0, b"x" * 4096)
        assert -5.5 < v.seal_overdue(t) <= 0 and v.seal_overdue(t + 6) > 0
        v.tick(seal=False)  # outside an event loop a seal would happen at once
        assert v.maps.sealed_seq < v.maps.last_seq
        spent = v.seal_seconds
        v.seal()
        assert v.maps.sealed_seq == v.maps.last_seq and v.seal_seconds > spent
    finally:
        s.close()
