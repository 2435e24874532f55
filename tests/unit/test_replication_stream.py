"""Source service and target pump over a real loopback socket, in one process: the
replica catches up from the journal, follows live writes, markers and rewinds, resumes
after a restart of either side, and refuses a wrong secret or another lineage."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.config import MapSettings
from cdp.replication import source, target
from cdp.replication.protocol import (
    Authenticated,
    Opened,
    OpenRequest,
    SourceConnection,
    TargetConnection,
)
from cdp.replication.source import ReplicationSource
from cdp.replication.target import Listener, listen, load_role
from cdp.volume import Volume
from tests.unit.test_volume_replica import SIZE, _drive, _same, settings

SECRET = b"0123456789abcdef0123456789abcdef"


async def _target(vols: dict[str, Volume], secret: bytes = SECRET) -> tuple[Listener, int]:
    """A replica listener on a free loopback port, as cdpd's; ``close()`` ends its streams."""
    def lookup(req: OpenRequest) -> Volume | None:
        return vols.get(req.volume)

    return await listen("127.0.0.1", 0, secret, lookup)


def _run(tmp: Path, body: Callable[[Volume, Volume], Awaitable[None]]) -> None:
    async def main() -> None:
        s = settings(tmp)
        src = Volume.create(tmp / "src", "vol0", SIZE, s)
        dst = Volume.create(tmp / "dst", "vol0", SIZE, s)
        try:
            await body(src, dst)
        finally:
            src.close()
            dst.close()

    asyncio.run(main())


def test_catch_up_then_live_stream_and_restart(tmp_path: Path) -> None:
    async def body(src: Volume, dst: Volume) -> None:
        rng = random.Random(3)
        await _drive(src, rng, 40)  # history before replication starts: catch-up
        await src.snapshot("before")
        server, port = await _target({"vol0": dst})
        rep = ReplicationSource(src, "127.0.0.1", port, SECRET)
        src.attach(rep)
        rep.start()
        await rep.wait_acked(src.journal.last_seq)
        _same(src, dst)
        assert load_role(dst).role == "replica" and load_role(dst).lineage == src.uuid
        for i in range(3):  # live
            await _drive(src, rng, 25)
            await src.snapshot(f"live{i}")
            if i == 1:
                await src.rewind(src.markers[0].seq)
        await rep.wait_acked(src.journal.last_seq)
        _same(src, dst)
        st = rep.status()
        assert st["lag_records"] == 0 and st["lag_seconds"] == 0 and st["sent_bytes"] > 0
        # the target goes away, writes go on, it comes back: resumed, nothing twice
        server.close()
        await server.wait_closed()
        rep.stop()
        await _drive(src, rng, 20)
        assert rep.status()["lag_records"] > 0
        server, port2 = await _target({"vol0": dst})
        rep2 = ReplicationSource(src, "127.0.0.1", port2, SECRET)
        src.attach(rep2)
        rep2.start()
        await rep2.wait_acked(src.journal.last_seq)
        _same(src, dst)
        rep2.stop()
        server.close()
        await server.wait_closed()

    _run(tmp_path, body)


def test_wrong_secret_and_other_lineage_refused(tmp_path: Path) -> None:
    async def body(src: Volume, dst: Volume) -> None:
        await _drive(src, random.Random(4), 5)
        server, port = await _target({"vol0": dst})
        bad = ReplicationSource(src, "127.0.0.1", port, b"x" * 32)
        bad.start()
        for _ in range(500):
            if bad.state == "refused":
                break
            await asyncio.sleep(0.01)
        assert bad.status()["state"] == "refused" and bad.refused is not None
        assert bad.refused[0] == "auth"
        assert dst.journal.last_seq == 0 and not (dst.path / "replica.json").exists()
        good = ReplicationSource(src, "127.0.0.1", port, SECRET)
        good.start()
        await good.wait_acked(src.journal.last_seq)
        good.stop()
        # another volume (another lineage) may not stream into this replica
        other = ReplicationSource(src, "127.0.0.1", port, SECRET, lineage="someone-else")
        other.start()
        for _ in range(500):
            if other.state == "refused":
                break
            await asyncio.sleep(0.01)
        assert other.refused is not None and other.refused[0] == "lineage"
        server.close()
        await server.wait_closed()

    _run(tmp_path, body)


def test_pipelined_frames_acked_only_when_durable_in_order(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small frames (one record or so each) keep several applies pending on the
    target: every ACK is cumulative, never decreasing and never beyond the replica's
    durable seq when sent; markers and rewinds among them still apply in order."""
    acks: list[tuple[int, int]] = []
    dsts: list[Volume] = []
    real_ack = TargetConnection.ack

    def ack(self: TargetConnection, durable_seq: int) -> None:
        acks.append((durable_seq, dsts[0].journal.durable_seq))
        real_ack(self, durable_seq)

    monkeypatch.setattr(TargetConnection, "ack", ack)
    depth: list[int] = []
    real_drain = target._drain

    async def drain(pending: deque[asyncio.Task[int]], acked: Callable[[int], None],
                    keep: int = 0) -> None:
        depth.append(len(pending))
        await real_drain(pending, acked, keep)

    monkeypatch.setattr(target, "_drain", drain)

    async def body(src: Volume, dst: Volume) -> None:
        dsts.append(dst)
        rng = random.Random(5)
        await _drive(src, rng, 60)
        server, port = await _target({"vol0": dst})
        rep = ReplicationSource(src, "127.0.0.1", port, SECRET, batch=1)
        src.attach(rep)
        rep.start()
        for i in range(3):
            await _drive(src, rng, 30)
            await src.snapshot(f"p{i}")
            if i == 1:
                await src.rewind(src.markers[0].seq)
        await rep.wait_acked(src.journal.last_seq)
        _same(src, dst)
        assert [m.seq for m in dst.markers] == [m.seq for m in src.markers]
        rep.stop()
        server.close()
        await server.wait_closed()

    _run(tmp_path, body)
    assert len(acks) > 10 and max(depth) > 1  # several frames were pending at once
    assert all(a <= d for a, d in acks)
    assert [a for a, _ in acks] == sorted(a for a, _ in acks)


def test_source_reconnects_after_the_target_resets_under_uvloop(tmp_path: Path) -> None:
    """On cdpd's loop (uvloop), a target that resets the connection while the source
    idles between heartbeats: the source reconnects by itself and goes on. (uvloop
    raises RuntimeError on a write to a closed transport; which write meets it first
    depends on timing, so every stream write now goes through ``wire.send``.)"""
    import uvloop

    async def main() -> None:
        s = settings(tmp_path)
        src = Volume.create(tmp_path / "src", "vol0", SIZE, s)
        dst = Volume.create(tmp_path / "dst", "vol0", SIZE, s)
        lst, port = await _target({"vol0": dst})
        rep = ReplicationSource(src, "127.0.0.1", port, SECRET)
        try:
            rng = random.Random(5)
            src.attach(rep)
            rep.start()
            await _drive(src, rng, 10)
            await rep.wait_acked(src.journal.last_seq)
            for _r, w in list(lst._streams.values()):
                w.transport.abort()  # a reset while the source idles between heartbeats
            await asyncio.sleep(2.5)
            await _drive(src, rng, 5)
            await rep.wait_acked(src.journal.last_seq)  # it came back by itself
            _same(src, dst)
            assert rep.status()["state"] == "streaming"
        finally:
            rep.stop()
            lst.close()
            await lst.wait_closed()
            src.close()
            dst.close()

    uvloop.run(main())


def test_large_writes_ship_per_commit_bytes_without_waiting_for_the_gap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a steady run of writes the stream starts a commit of its own once
    COMMIT_BYTES were appended beyond the last one, not only after COMMIT_GAP without a
    commit: with the gap and the idle rule made an hour, records still become durable
    and ship (issue #20: at 1 MiB writes the gap let ~70 MiB pile up per burst). Before,
    nothing after the first commit shipped here (no seal, no flush commits meanwhile)."""
    monkeypatch.setattr(source, "COMMIT_GAP", 3600.0)
    monkeypatch.setattr(source, "COMMIT_IDLE", 3600.0)
    monkeypatch.setattr(source, "COMMIT_BYTES", 256 << 10)

    async def main() -> None:
        s = replace(settings(tmp_path), maps=replace(
            MapSettings(), l0_max_writes=1 << 20, seal_interval=3600.0))
        src = Volume.create(tmp_path / "src", "vol0", SIZE, s)
        dst = Volume.create(tmp_path / "dst", "vol0", SIZE, s)
        server, port = await _target({"vol0": dst})
        rep = ReplicationSource(src, "127.0.0.1", port, SECRET)
        src.attach(rep)
        try:
            rep.start()
            rng = random.Random(6)
            for i in range(256):  # 1 MiB in 4 KiB writes, no flush: 4 x COMMIT_BYTES
                w = src.write(4096 * i, rng.randbytes(4096))
                if w is not None:
                    await w
                await asyncio.sleep(0)
            # at least 3 of the 4 thresholds crossed have been committed and shipped
            await rep.wait_acked(192, timeout=60)
            assert src.journal.durable_seq >= 192
            assert dst.read(0, 4096 * 192) == src.read(0, 4096 * 192)
        finally:
            rep.stop()
            server.close()
            await server.wait_closed()
            src.close()
            dst.close()

    asyncio.run(main())


def test_target_ends_a_stream_torn_inside_a_large_frame(tmp_path: Path) -> None:
    """A source that goes away inside a large frame (kill -9, a cut link) while the
    target reads that frame whole: the target refuses the torn frame and ends the
    stream, nothing of the frame applied, the volume free for the next stream."""
    async def body(src: Volume, dst: Volume) -> None:
        w = src.write(0, random.Random(9).randbytes(1 << 20))
        if w is not None:
            await w
        raw = src.journal.read_stored(1)
        server, port = await _target({"vol0": dst})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = SourceConnection(SECRET, peer="t")
        hand = ReplicationSource(src, "127.0.0.1", port, SECRET)  # its handshake pump only
        conn.start("torn")
        writer.write(conn.data_to_send())
        await hand._until(conn, reader, writer, Authenticated)
        conn.open("vol0", src.uuid, src.size, 1, 1, 0, [[1, 1, 0]])
        writer.write(conn.data_to_send())
        await hand._until(conn, reader, writer, Opened)
        conn.send_records(1, [raw])
        frame = conn.data_to_send()
        writer.write(frame[: len(frame) // 2])
        await writer.drain()
        writer.close()
        for _ in range(3000):
            if not server._streams:
                break
            await asyncio.sleep(0.01)
        assert not server._streams and dst.journal.last_seq == 0
        rep = ReplicationSource(src, "127.0.0.1", port, SECRET)  # the next stream is taken
        src.attach(rep)
        rep.start()
        await rep.wait_acked(1)
        _same(src, dst)
        rep.stop()
        server.close()
        await server.wait_closed()

    _run(tmp_path, body)
