"""Uploads give way to a busy volume (cdp.tier.service._Yield): while the journal appends
at YIELD_RATE or more, each PUT is followed by a pause as long as it took, within a
budget per batch; a quiet volume's uploads never pause. A fake clock: no timing."""

from __future__ import annotations

import pytest

from cdp.tier.service import YIELD_MAX, YIELD_RATE, _Yield


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


def test_busy_volume_halves_the_upload_time_quiet_one_never_waits(clock: Clock) -> None:
    appended = [0]
    y = make(clock, appended)
    y.reset()
    y.step()  # the first PUT of a batch goes at once
    assert clock.slept == 0
    put(clock, appended, 0.1, YIELD_RATE / 2)  # quiet: no pause
    y.step()
    assert clock.slept == 0
    put(clock, appended, 0.1, YIELD_RATE * 4)  # busy: a pause as long as the PUT
    y.step()
    assert clock.slept == pytest.approx(0.1)
    assert y.paused == pytest.approx(0.1) and y.total == pytest.approx(0.1)
    # what the volume appended during the pause does not count against the next PUT
    put(clock, appended, 0.1, YIELD_RATE / 2)
    y.step()
    assert clock.slept == pytest.approx(0.1)


def test_pauses_are_bounded_per_batch(clock: Clock) -> None:
    appended = [0]
    y = make(clock, appended)
    y.reset()
    y.step()
    for _ in range(100):  # sustained ingest: 100 PUTs of 1 s
        put(clock, appended, 1.0, YIELD_RATE * 10)
        y.step()
    assert clock.slept == pytest.approx(YIELD_MAX)  # then full speed
    y.reset()  # the next batch gets a budget again
    y.step()
    put(clock, appended, 1.0, YIELD_RATE * 10)
    y.step()
    assert clock.slept == pytest.approx(YIELD_MAX + 1.0)
    assert y.total == pytest.approx(YIELD_MAX + 1.0)


def test_a_stopping_tier_does_not_wait(clock: Clock) -> None:
    appended = [0]
    y = make(clock, appended, stopping=True)
    y.reset()
    y.step()
    put(clock, appended, 1.0, YIELD_RATE * 10)
    y.step()
    assert clock.slept == 0
