"""Uploads give way to a busy volume (cdp.tier.service._Yield): while the journal appends
at YIELD_RATE or more, each PUT is followed by a pause proportional to how much busier
the volume is (at most YIELD_SHARE times the PUT), never past the lag limit the caller
gives; a quiet volume's uploads never pause. A fake clock: no timing."""

from __future__ import annotations

import pytest

from cdp.tier.service import YIELD_LAG, YIELD_RATE, YIELD_SHARE, _Yield


class Clock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        self.slept += s


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, appended: list[int], stopping: bool = False) -> _Yield:
    return _Yield(lambda: appended[0], lambda: stopping, clock=clock.monotonic, sleep=clock.sleep)


def put(clock: Clock, appended: list[int], seconds: float, rate: float) -> None:
    """A PUT of ``seconds`` while the volume appends ``rate`` bytes/s."""
    clock.t += seconds
    appended[0] += int(rate * seconds)


def test_pause_grows_with_how_busy_the_volume_is_quiet_one_never_waits(clock: Clock) -> None:
    appended = [0]
    y = make(clock, appended)
    y.reset()
    y.step()  # the first PUT of a batch goes at once
    assert clock.slept == 0
    put(clock, appended, 0.1, YIELD_RATE / 2)  # quiet: no pause
    y.step()
    assert clock.slept == 0
    put(clock, appended, 0.1, YIELD_RATE * 2)  # twice YIELD_RATE: twice as long as the PUT
    y.step()
    assert clock.slept == pytest.approx(0.2)
    # what the volume appended during the pause does not count against the next PUT
    put(clock, appended, 0.1, YIELD_RATE / 2)
    y.step()
    assert clock.slept == pytest.approx(0.2)
    put(clock, appended, 0.1, YIELD_RATE * 4)  # four times: four times as long
    y.step()
    assert clock.slept == pytest.approx(0.6)
    put(clock, appended, 0.1, YIELD_RATE * 100)  # far busier: at most YIELD_SHARE times
    y.step()
    assert clock.slept == pytest.approx(0.6 + 0.1 * YIELD_SHARE)
    assert y.paused == pytest.approx(clock.slept) and y.total == pytest.approx(clock.slept)


def test_pauses_never_go_past_the_lag_limit(clock: Clock) -> None:
    appended = [0]
    y = make(clock, appended)
    y.reset()
    y.step()
    # sustained ingest: PUTs of 1 s of one segment whose lag limit comes 20 s from now
    due = clock.t + 20.0
    for _ in range(100):
        put(clock, appended, 1.0, YIELD_RATE * 10)
        y.step(due - clock.t)
    # the pauses stopped at the limit (20 s less the PUTs' own time), then full speed
    assert 10.0 < clock.slept <= 20.0
    assert clock.t - 100.0 == pytest.approx(100.0 + clock.slept)
    before = clock.slept
    put(clock, appended, 1.0, YIELD_RATE * 10)
    y.step(-1.0)  # a segment past its lag limit: never paused for
    assert clock.slept == before
    put(clock, appended, 1.0, YIELD_RATE * 10)
    y.step()  # the default room is the lag limit itself
    assert clock.slept == pytest.approx(before + YIELD_SHARE)
    assert YIELD_SHARE < YIELD_LAG


def test_a_stopping_tier_does_not_wait(clock: Clock) -> None:
    appended = [0]
    y = make(clock, appended, stopping=True)
    y.reset()
    y.step()
    put(clock, appended, 1.0, YIELD_RATE * 10)
    y.step()
    assert clock.slept == 0
