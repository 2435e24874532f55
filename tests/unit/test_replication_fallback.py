"""The changed() fallback (docs/REPLICATION.md "Fallback"): when the source's retention
expired the points after the target's last seq, the source sends what changed up to the
next point it still has instead of the expired records; the replica equals the source at
that point, at every later kept point and at the head, and the points of the gap read as
expired there. Over a real loopback socket, in one process."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from cdp.errors import PointError
from cdp.replication import target
from cdp.replication.source import ReplicationSource
from cdp.retention.service import attach_retention
from cdp.volume import Volume
from tests.unit.test_replication_stream import SECRET, _run, _target
from tests.unit.test_volume_replica import SIZE, _drive

NS = 1_000_000_000


async def _expire_before(src: Volume, seq: int) -> None:
    """Run the source's gc so that every point before ``seq`` expires (kept markers
    stay), with policy ``all 1s`` and the clock 1 s after ``seq``'s time."""
    ret = attach_retention(src)
    ret.set_policy(tiers=["all 1s"])
    await ret.gc(now_ns=src.journal.time_of_seq(seq) + NS)
    assert src.maps.keep_after == seq


async def _overwrites(vol: Volume, rng: random.Random, n: int) -> None:
    """Writes that mostly overwrite one small area (much history, few changed bytes)."""
    for _ in range(n):
        off = rng.randrange(0, 64) * 4096
        r = vol.write(off, rng.randbytes(4096))
        if r is not None:
            await r


async def _caught_up(rep: ReplicationSource, seq: int) -> None:
    """Wait until ``seq`` is acknowledged; while a fallback is on, status says so."""
    for _ in range(3000):
        st = rep.status()
        if st["reason"] is not None:
            assert st["state"] == "catching-up" and st["reason"].startswith("fallback: ")
        if rep.acked_seq >= seq:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(rep.status())


def _reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split(": ", 1)[1] for r in caplog.records
            if "fallback: " in r.getMessage()]


def test_fallback_sends_changes_keeps_kept_points_and_shows_the_gap(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(src: Volume, dst: Volume) -> None:
        rng = random.Random(7)
        await _drive(src, rng, 30)
        kept1 = await src.snapshot("kept1")
        attach_retention(src).keep_marker(kept1.id, -1)
        await _drive(src, rng, 10)
        server, port = await _target({"vol0": dst})
        rep = ReplicationSource(src, "127.0.0.1", port, SECRET)
        src.attach(rep)
        rep.start()
        await rep.wait_acked(src.journal.last_seq)
        after = dst.journal.last_seq
        rep.stop()  # the target is away: history piles up and expires at the source
        server.close()
        await server.wait_closed()
        await _overwrites(src, rng, 300)
        kept2 = await src.snapshot("kept2")
        attach_retention(src).keep_marker(kept2.id, -1)
        await _overwrites(src, rng, 300)
        cut = src.journal.last_seq - 20
        await _drive(src, rng, 20)
        tail_bytes = sum(len(r) for r in src.journal.scan_stored(cut))
        await _expire_before(src, cut)
        assert not src.maps.resolvable(after + 1)
        sent_before = rep.sent_bytes

        server, port = await _target({"vol0": dst})
        rep.port = port
        rep.start()
        await _caught_up(rep, src.journal.last_seq)
        reasons = _reasons(caplog)
        assert len(reasons) == 2, reasons
        assert f"as of @{kept2.seq} " in reasons[0] and f"as of @{cut} " in reasons[1]
        st = rep.status()
        assert st["reason"] is None and st["lag_records"] == 0
        # the head, the kept markers and every point after the cut are the source's
        assert dst.journal.last_seq == src.journal.last_seq
        assert dst.read(0, SIZE) == src.read(0, SIZE)
        for p in (kept1.seq, kept2.seq, cut, cut + 7):
            assert dst.read(0, SIZE, p) == src.read(0, SIZE, p), p
        assert [m.label for m in dst.markers] == ["kept1", "kept2"]
        # the gap reads as expired, as at the source
        for p in (after + 1, after + 50, kept2.seq + 1, kept2.seq + 100):
            with pytest.raises(PointError, match="expired"):
                dst.read(0, SIZE, p)
        # what crossed the wire follows the changes (64 blocks), not the expired
        # history (600 writes of 4 KiB)
        fallback_bytes = rep.sent_bytes - sent_before - tail_bytes
        assert fallback_bytes < 600 * 4096 / 2, fallback_bytes
        rep.stop()
        server.close()
        await server.wait_closed()

    _run(tmp_path, body)


def test_fallback_across_a_rewind_and_after_an_interrupted_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewind in the expired span: the fallback rewinds the replica to 0 and sends
    the whole state. A stream cut inside a fallback resumes it (same process) or, from
    a source that no longer knows it, starts again from an empty volume: equal at the
    head either way."""
    async def body(src: Volume, dst: Volume) -> None:
        rng = random.Random(8)
        await _drive(src, rng, 30)
        server, port = await _target({"vol0": dst})
        rep = ReplicationSource(src, "127.0.0.1", port, SECRET)
        src.attach(rep)
        rep.start()
        await rep.wait_acked(src.journal.last_seq)
        after = dst.journal.last_seq
        rep.stop()
        server.close()
        await server.wait_closed()
        m = await src.snapshot("m")
        await _overwrites(src, rng, 200)
        await src.rewind(m.seq)
        await _drive(src, rng, 60)
        await _overwrites(src, rng, 200)
        cut = src.journal.last_seq - 5
        await _drive(src, rng, 5)
        await _expire_before(src, cut)

        # the link cut inside the fallback, twice (deterministically: the source's
        # next frame fails past ``limit``): the same source resumes its fallback
        slow = ReplicationSource(src, "127.0.0.1", port, SECRET, batch=1)
        src.attach(slow)
        limit = [after + 3]
        real = slow._next_batch

        def cut_link(nxt: int) -> list[bytes]:
            if nxt > limit[0]:
                raise ConnectionResetError("the link is cut (test)")
            return real(nxt)

        monkeypatch.setattr(slow, "_next_batch", cut_link)
        server, slow.port = await _target({"vol0": dst})
        slow.start()
        for k in range(2):
            for _ in range(12000):  # reconnects back off (1 s doubling): minutes at load
                if dst.journal.last_seq >= limit[0] and slow.state == "disconnected":
                    break
                await asyncio.sleep(0.01)
            assert dst.journal.last_seq == limit[0]
            st = slow.status()
            assert st["state"] == "disconnected" and "since @0" in st["reason"]
            fb = slow._fallback
            assert fb is not None and fb.after == m.seq  # the kept rewind target, as stored
            if k == 0:
                limit[0] = fb.first_piece + 2  # into the changed pieces
        slow.stop()
        server.close()
        await server.wait_closed()
        for _ in range(1000):  # the target's pump sees the connection end
            if dst.path not in target._streams:
                break
            await asyncio.sleep(0.01)
        assert "stopped inside" not in caplog.text
        assert len(_reasons(caplog)) == 1
        # a new source object knows nothing of it: rewinds the replica to 0, once there
        # are enough seqs after the target's for the whole state (it waits for them)
        server, port = await _target({"vol0": dst})
        rep = ReplicationSource(src, "127.0.0.1", port, SECRET)
        src.attach(rep)
        rep.start()
        for _ in range(500):
            if rep.status()["reason"]:
                break
            await asyncio.sleep(0.01)
        assert rep.status()["state"] == "catching-up" and rep.status()["reason"]
        await _drive(src, rng, 40)
        await _caught_up(rep, src.journal.last_seq)
        reasons = _reasons(caplog)
        assert "stopped inside an earlier fallback" in caplog.text
        assert len(reasons) == 2 and "the whole state as of @" in reasons[1]
        assert dst.read(0, SIZE) == src.read(0, SIZE)
        q = int(reasons[1].split("as of @")[1].split(" ")[0])
        assert dst.read(0, SIZE, q) == src.read(0, SIZE, q)
        rep.stop()
        server.close()
        await server.wait_closed()

    _run(tmp_path, body)
