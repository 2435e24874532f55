"""Retention on a real volume in real time (a policy in seconds): after gc every
retained point reads back byte-identical to a model replay, expired points are refused
with PointError naming the nearest retained points, the journal shrinks to at most 1.2x
the bytes the retained points need; kept markers survive; store cap in both modes."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.config import JournalSettings, MapSettings, RetentionSettings, Settings, parse_config
from cdp.errors import ConfigError, PointError, StoreFull
from cdp.journal import verify_journal
from cdp.retention.policy import policy_points
from cdp.retention.service import attach_retention, retention_of
from cdp.volume import Volume

SIZE = 1 << 20
BS = 4096


def settings(tmp: Path, tiers: list[str], **kw: object) -> Settings:
    from cdp.config import parse_tiers

    return replace(
        Settings(),
        store=tmp / "store",
        journal=replace(JournalSettings(), segment_bytes=256 << 10),
        maps=replace(MapSettings(), l0_max_writes=32, fanout=4, full_every=4),
        retention=replace(RetentionSettings(), tiers=parse_tiers(tiers, "t"), compact_below=0.9,
                          compact_rate=0, **kw),  # type: ignore[arg-type]
    )


async def _writes(vol: Volume, rng: random.Random, model: bytearray, seconds: float,
                  states: dict[int, bytes]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(8):
            await _write_one(vol, rng, model, states)
        await asyncio.sleep(0.05)


async def _write_one(vol: Volume, rng: random.Random, model: bytearray,
                     states: dict[int, bytes]) -> None:
    off = rng.randrange(0, SIZE // BS // 4) * BS  # a small hot region: overwrites
    data = rng.randbytes(BS)
    r = vol.write(off, data)
    if r is not None:
        await r
    model[off : off + BS] = data
    states[vol.head_seq] = bytes(model)


def _needed(vol: Volume) -> int:
    return sum(int((c.end - c.start).sum()) for c in vol.maps.live_fragments())


def test_gc_real_time_policy(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path, ["all 2s", "1s 4s"])
        vol = Volume.create(tmp_path / "v", "v", SIZE, s)
        attach_retention(vol)
        rng = random.Random(5)
        model = bytearray(SIZE)
        states: dict[int, bytes] = {0: bytes(SIZE)}
        await _writes(vol, rng, model, 2.5, states)
        m_keep = await vol.snapshot("keepme")
        states[m_keep.seq] = bytes(model)
        retention_of(vol).keep_marker(m_keep.id, -1)
        m_fade = await vol.snapshot("")
        states[m_fade.seq] = bytes(model)
        # 6.5 s: m_fade then lies past both tiers (2 s + 4 s). At 5 s it sat in the 1 s
        # band and was kept whenever a stall (a loaded machine) made it the last point of
        # its second.
        await _writes(vol, rng, model, 6.5, states)
        # The 2 s "all" tier must hold points to check even when a loaded machine starves
        # this loop (its 50 ms sleeps stretched to seconds: checked came out 7): a last
        # burst of 16 writes without sleeps, right before the clock is read.
        for _ in range(16):
            await _write_one(vol, rng, model, states)
        # The policy is applied as of the last write: under load the flush below (or the
        # scheduler) can take seconds, and a gc that read the clock after it found almost
        # nothing in the 2 s "all" tier (checked came out 3).
        now_ns = time.time_ns()
        await vol.flush()
        before = vol.journal.stats().file_bytes
        r = await retention_of(vol).gc(now_ns=now_ns)
        assert r["expired_seqs"] > 0 and r["segments_compacted"] > 0
        after = vol.journal.stats().file_bytes
        assert after < before
        assert r["bytes_after"] < r["bytes_before"]
        need = _needed(vol)
        ratio = after / need
        print(f"journal {before} -> {after} bytes; retained points need {need}; ratio {ratio:.3f}")
        assert ratio <= 1.2
        retained = set(vol.maps.retained)
        ka = vol.maps.keep_after
        assert m_keep.seq in retained
        checked = expired = 0
        for seq, want in states.items():
            if seq == 0 or seq in retained or seq >= ka:
                got = vol.read(0, SIZE, seq)
                assert got == want, seq
                assert vol.resolve_point(f"@{seq}") == seq
                checked += 1
            else:
                expired += 1
                with pytest.raises(PointError, match=r"expired by retention.*nearest retained"):
                    vol.resolve_point(f"@{seq}")
                with pytest.raises(PointError):
                    vol.read(0, BS, seq)
        assert checked > 10 and expired > 10
        assert vol.resolve_point("keepme") == m_keep.seq
        with pytest.raises(PointError):
            vol.resolve_point(m_fade.name)  # unlabelled markers fade with their tier
        vol.close()
        assert verify_journal(tmp_path / "v" / "journal").ok
        vol = Volume.open(tmp_path / "v", s)
        attach_retention(vol)
        for seq in [*sorted(retained)[:5], ka, vol.head_seq]:
            assert vol.read(0, SIZE, seq) == states.get(seq, states[max(k for k in states if k <= seq)])
        vol.close()

    asyncio.run(main())


def test_policy_points_bands() -> None:
    from cdp.config import parse_tiers

    ns = 1_000_000_000
    now = 1000 * ns
    # one write per second: seq k at time k seconds
    def at(t: int) -> int:
        return max(0, min(1000, t // ns))

    pts, ka = policy_points(parse_tiers(["all 10s", "10s 100s"], "t"), now, at, 1000)
    assert ka == 990
    # the last point of each 10 s interval between ages 10 s and 110 s
    assert sorted(pts) == [b - 1 for b in range(900, 1000, 10)]
    pts, ka = policy_points(parse_tiers(["1m 1h"], "t"), now, at, 1000)
    assert ka == 1000 and 959 in pts


def test_config_validation() -> None:
    s = parse_config({"retention": {"tiers": ["all 20s", "10s 60s"], "on_full": "refuse",
                                    "max_store_bytes": "1GiB", "compact_below": 0.5},
                      "volume": [{"name": "a", "size": "1MiB",
                                  "retention": {"tiers": ["all 1h"]}},
                                 {"name": "b", "size": "1MiB"}]})
    assert s.retention_for("b").on_full == "refuse"
    assert [t.text for t in s.retention_for("a").tiers] == ["all 1h"]
    assert s.retention_for("a").max_store_bytes == 1 << 30
    for bad, msg in [
        ({"tiers": ["1h 2d", "all 48h"]}, "only be the first"),
        ({"tiers": ["1d 2d", "1h 48h"]}, "finer"),
        ({"tiers": ["often 2d"]}, "duration"),
        ({"tiers": "all 48h"}, "list"),
        ({"on_full": "panic"}, "on_full"),
        ({"compact_below": 2}, "compact_below"),
        ({"bogus": 1}, "unknown key"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_config({"retention": bad})


def test_store_cap_refuse_and_expire(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path, ["all 1s", "1s 2s"], max_store_bytes=2 << 20, on_full="refuse")
        vol = Volume.create(tmp_path / "r", "r", SIZE, s)
        attach_retention(vol)
        rng = random.Random(1)
        with pytest.raises(StoreFull):
            for i in range(2000):
                vol.write((i % 64) * BS, rng.randbytes(BS))
        assert retention_of(vol).over_cap
        await vol.flush()
        n = vol.head_seq
        # the refused write was not journalled; the others read back
        assert vol.read(0, BS) is not None and vol.head_seq == n
        vol.close()

        s = settings(tmp_path, ["all 1s", "1s 2s"], max_store_bytes=2 << 20, on_full="expire")
        vol = Volume.create(tmp_path / "e", "e", SIZE, s)
        attach_retention(vol)
        model = bytearray(SIZE)
        for i in range(1500):
            d = rng.randbytes(BS)
            off = (i % 64) * BS
            vol.write(off, d)  # never refused
            model[off : off + BS] = d
        await vol.flush()
        assert retention_of(vol).check_cap()
        r = await retention_of(vol).gc()
        assert r["emergency_rounds"] >= 1
        assert retention_of(vol).warning and "cap" in retention_of(vol).warning
        assert retention_of(vol).store_bytes() < 2 << 20
        assert vol.read(0, SIZE) == bytes(model)  # the head is never expired
        vol.close()

    asyncio.run(main())


async def _write_block(vol: Volume, rng: random.Random, model: bytearray) -> tuple[int, bytes]:
    """One random 4 KiB write, mirrored into *model*; returns (offset, data)."""
    off = rng.randrange(0, SIZE // BS) * BS
    data = rng.randbytes(BS)
    r = vol.write(off, data)
    if r is not None:
        await r
    model[off : off + BS] = data
    return off, data


def test_io_during_gc_is_neither_lost_nor_misread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc rewrites the maps in a worker thread and compacts segments: writes, markers and
    reads at the head and at retained points keep going on the loop meanwhile, and
    nothing written during gc is lost (also after a reopen)."""
    import threading

    from mapengine import RetainJob

    held = threading.Event()
    go = threading.Event()
    build = RetainJob.build

    def slow_build(job: RetainJob) -> None:
        held.set()
        assert go.wait(60)  # the loop writes, snapshots and reads meanwhile
        build(job)

    monkeypatch.setattr(RetainJob, "build", slow_build)

    async def main() -> None:
        s = settings(tmp_path, ["all 1s"])
        vol = Volume.create(tmp_path / "v", "v", SIZE, s)
        attach_retention(vol)
        rng = random.Random(7)
        model = bytearray(SIZE)
        states: dict[int, bytes] = {0: bytes(SIZE)}
        await _writes(vol, rng, model, 2.0, states)
        old = vol.head_seq
        await asyncio.sleep(1.1)  # everything so far is older than the all tier
        gc = asyncio.get_running_loop().create_task(retention_of(vol).gc())
        while not held.is_set():
            await asyncio.sleep(0.001)
        assert vol.maps.retaining
        for i in range(200):  # more than an L0 window (32): seals wait for the retain
            await _write_block(vol, rng, model)
            if i % 50 == 0:
                assert vol.read(0, SIZE) == bytes(model)
                assert vol.read(0, SIZE, old) == states[old]
        m = await vol.snapshot("during-gc")
        states[m.seq] = bytes(model)
        go.set()
        while not gc.done():  # compaction: keep writing and reading
            off, data = await _write_block(vol, rng, model)
            assert vol.read(off, BS) == data
            await asyncio.sleep(0)
        res = await gc
        assert res["segments_compacted"] > 0 and not vol.maps.retaining
        assert vol.read(0, SIZE) == bytes(model)
        assert vol.read(0, SIZE, m.seq) == states[m.seq]
        for _ in range(40):  # the held-back seals happen after the retain
            data = rng.randbytes(BS)
            vol.write(0, data)
            model[0:BS] = data
        await vol.flush()
        vol.maps._check()
        assert vol.read(0, SIZE) == bytes(model)
        vol.close()
        assert verify_journal(tmp_path / "v" / "journal").ok
        vol = Volume.open(tmp_path / "v", s)
        attach_retention(vol)
        assert vol.read(0, SIZE) == bytes(model)
        assert vol.read(0, SIZE, m.seq) == states[m.seq]
        vol.close()

    asyncio.run(main())


def test_ingest_pace_full_speed_while_idle_budget_while_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default pacing: compact_rate while the volume's host writes exceed
    compact_busy_writes per second, unthrottled (0) below; busy 0 = always the rate."""
    from types import SimpleNamespace
    from typing import Any

    import cdp.retention.service as svc

    now = [100.0]
    monkeypatch.setattr("cdp.retention.service.time.monotonic", lambda: now[0])
    vol = SimpleNamespace(bytes_written=0)
    v: Any = vol  # a volume as IngestPace reads it: its write counter
    pace = svc.IngestPace(v, 64 << 20, 16 << 20)
    assert pace() == 64 << 20  # busy until the first window says otherwise
    now[0] += 0.5
    vol.bytes_written += 1 << 20  # 2 MiB/s: light ingest
    assert pace() == 0.0
    now[0] += 0.1
    vol.bytes_written += 100 << 20
    assert pace() == 0.0  # the window is not over yet: the last verdict holds
    now[0] += 0.2
    assert pace() == 64 << 20  # ~101 MiB in 0.3 s: busy
    assert svc.IngestPace(v, 64 << 20, 0)() == 64 << 20  # busy 0: always the budget
    assert svc.IngestPace(v, 0, 16 << 20)() == 0  # rate 0: never throttled


def test_pacer_follows_a_changing_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pacer sleeps bytes / rate while the budget is set, not at all while it is 0."""
    import cdp.journal.compact as cmp

    now = [10.0]
    slept: list[float] = []
    monkeypatch.setattr("cdp.journal.compact.time.monotonic", lambda: now[0])

    def sleep(s: float) -> None:
        slept.append(round(s, 6))
        now[0] += s

    monkeypatch.setattr("cdp.journal.compact.time.sleep", sleep)
    rate = [1000.0]
    p = cmp.Pacer(rate_fn=lambda: rate[0])
    p.step(500)
    p.step(500)
    rate[0] = 0.0
    p.step(10**9)
    rate[0] = 1000.0
    p.step(100)
    assert slept == [0.5, 0.5, 0.1]
