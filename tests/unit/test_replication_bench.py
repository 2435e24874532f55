"""replication_bench's ``--tmpfs`` control rows cannot fill /dev/shm: every fio run is
capped by bytes (not ``time_based``, under which fio ignores byte limits), and the runs
of one store pair together stay under a share of the free space."""

from __future__ import annotations

from typing import Any

import pytest

from tools.bench import replication_bench as rb


@pytest.mark.parametrize("free_gib", [1, 23, 400])
@pytest.mark.parametrize("pairs", [1, 2, 3])
def test_tmpfs_runs_stay_under_the_share_of_free_space(free_gib: int, pairs: int) -> None:
    free = free_gib << 30
    cap = rb.tmpfs_run_cap(free, pairs)
    runs = 1 + 2 * pairs  # apply + on/off pairs, each kept by the source and the target
    assert 2 * runs * cap <= rb.TMPFS_SHARE * free
    assert cap <= rb.TMPFS_RUN_CAP


def test_capped_runs_are_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake(*args: Any) -> dict[str, float]:
        calls.append(args)
        return {"iops": 1.0, "MBps": 1.0, "ios": 1.0}

    monkeypatch.setattr(rb, "fio", fake)
    rb._fio("nbd://x", "1m", 8, 512 << 20)
    rb._fio("nbd://x", "1m", 8, None)
    (_u, rw, bs, _d, _j, runtime, _s, extra), uncapped = calls
    assert (rw, bs, runtime) == ("write", "1M", 0)  # 0: not time_based
    assert extra == (f"--io_size={512 << 20}", "--runtime=8")
    assert uncapped[5] == 8 and len(uncapped) == 7


@pytest.mark.parametrize("free_gib", [1, 23, 400])
@pytest.mark.parametrize("runs", [1, 2])
def test_control_store_runs_stay_under_the_share_of_free_space(free_gib: int,
                                                               runs: int) -> None:
    """``--control-store``: the target keeps one copy of each apply run there."""
    free = free_gib << 30
    cap = rb.control_run_cap(free, runs)
    assert runs * cap <= rb.TMPFS_SHARE * free
    assert cap <= rb.TMPFS_RUN_CAP
