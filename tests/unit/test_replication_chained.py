"""Chained failback (docs/REPLICATION.md "Failover and failback"): A -> B, B fails
over, fails back to A (A a replica, B's records stored at seq + d), A fails over again
and fails back to B: the newest common point is found through the two epoch tables
(the same records carry other seqs on the two sides), B rewinds to it and receives only
A's records since; with B's newest common point expired by its retention, the walk goes
back to the newest point B still has. Real sockets, one process."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from cdp.journal import RecordKind
from cdp.replication.protocol import OpenRequest
from cdp.replication.source import ReplicationSource
from cdp.replication.target import common_point, failback_point, failover, load_role
from cdp.retention.service import attach_retention
from cdp.volume import Volume
from tests.unit.test_replication_stream import SECRET, _target
from tests.unit.test_volume_replica import SIZE, _drive, settings

NS = 1_000_000_000


def _source(vol: Volume, port: int, as_name: str) -> ReplicationSource:
    """What ``cdpctl replicate start`` attaches (cdp.ops.replication._source)."""
    role = load_role(vol)
    src = ReplicationSource(vol, "127.0.0.1", port, SECRET, as_name=as_name,
                            lineage=role.lineage, epoch=role.epoch,
                            fork_seq=role.epochs[-1][1] - 1 if role.epoch > 1 else 0,
                            epochs=role.epochs)
    vol.attach(src)
    src.start()
    return src


async def _stream(src: Volume, dst: Volume, port: int) -> int:
    """Stream ``src`` into ``dst`` until caught up; the bytes sent."""
    rep = _source(src, port, dst.name)
    await rep.wait_acked(src.journal.last_seq, timeout=60)
    rep.stop()
    await asyncio.sleep(0.05)
    return rep.sent_bytes


def _same(a: Volume, b: Volume, *labels: str) -> None:
    assert a.read(0, SIZE) == b.read(0, SIZE)
    for label in labels:
        assert a.read(0, SIZE, a.resolve_point(label)) == b.read(0, SIZE, b.resolve_point(label)), label


def test_common_point_by_epoch_tables() -> None:
    """A's table after one failback ([2, R+1, d]) and its own epoch 3; B's own
    epochs 1 and 2: the newest shared record is B's last epoch-2 record A holds."""
    a = [[1, 1, 0], [2, 111, 11], [3, 151, 0]]  # A got B's 101..139 at 112..150
    b = [[1, 1, 0], [2, 101, 0]]  # B failed over at 100, wrote 101..160

    def anything(lo: int, hi: int) -> int | None:
        return hi

    assert common_point(a, 150, b, 160, anything) == (150, 139)
    assert common_point(a, 110, b, 160, anything) == (100, 100)  # only epoch 1 shared
    # B can only rewind to 120 or older: walk back
    assert common_point(a, 150, b, 160, lambda lo, hi: min(hi, 120) if lo <= 120 else None) \
        == (131, 120)
    assert common_point(a, 150, [[1, 1, 0]], 0, anything) == (0, 0)


def test_second_failback_on_top_of_a_first(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path)
        rng = random.Random(12)
        a = Volume.create(tmp_path / "a", "vol0", SIZE, s)
        b = Volume.create(tmp_path / "b", "vol0", SIZE, s)
        vols_a, vols_b = {"vol0": a}, {"vol0": b}
        sa, pa = await _target(vols_a)
        sb, pb = await _target(vols_b)
        try:
            await _drive(a, rng, 40)
            await a.snapshot("one")
            await _stream(a, b, pb)
            # B fails over, writes; A diverges meanwhile
            await failover(b)
            await _drive(b, rng, 20)
            await b.snapshot("b1")
            await _drive(a, rng, 10)
            # failback 1: B -> A (A becomes a replica, B's records at seq + d)
            await _stream(b, a, pa)
            ra = load_role(a)
            assert ra.role == "replica" and ra.epochs[-1][2] > 0
            _same(a, b, "one", "b1")
            # A fails over (epoch 3) and writes; B keeps writing a little (fenced)
            await failover(a)
            assert load_role(a).epoch == 3
            fork_a = load_role(a).epochs[-1][1] - 1  # A's numbering: B's last record + d
            common_b = fork_a - ra.epochs[-1][2]  # the same record in B's numbering
            assert b.journal.read_stored(common_b)[32:] == a.journal.read_stored(fork_a)[32:]
            await _drive(a, rng, 15)
            await a.snapshot("a3")
            await _drive(b, rng, 5)
            bdiv = b.read(0, SIZE)
            b_last = b.journal.last_seq
            # failback 2: A -> B, on top of the first
            sent = await _stream(a, b, pb)
            rb = load_role(b)
            assert rb.role == "replica" and rb.epoch == 3
            assert rb.epochs[-1] == [3, b_last + 2, b_last + 1 - fork_a]  # REWIND at b_last + 1
            raw = b.journal.read_stored(b_last + 1)
            assert raw[9] == RecordKind.REWIND and int.from_bytes(raw[48:56], "little") == common_b
            _same(a, b, "one", "b1", "a3")
            assert b.read(0, SIZE, b_last) == bdiv  # B's divergent point stays
            raw = sum(len(r) for r in a.journal.scan_stored(load_role(a).epochs[-1][1]))
            assert sent < raw + (64 << 10), (sent, raw)  # only A's records since the fork
            # and the stream goes on
            await _drive(a, rng, 10)
            await _stream(a, b, pb)
            _same(a, b, "a3")
        finally:
            for srv in (sa, sb):
                srv.close()
                await srv.wait_closed()
            a.close()
            b.close()

    asyncio.run(main())


def test_failback_walks_back_when_the_newest_common_point_expired(tmp_path: Path) -> None:
    """The old primary's retention expired the newest common point: the failback
    rewinds it to the newest point it kept (a kept marker) and the new primary sends
    everything after that one."""
    async def main() -> None:
        s = settings(tmp_path)
        rng = random.Random(13)
        a = Volume.create(tmp_path / "a", "vol0", SIZE, s)
        b = Volume.create(tmp_path / "b", "vol0", SIZE, s)
        sa, pa = await _target({"vol0": a})
        sb, pb = await _target({"vol0": b})
        try:
            await _drive(a, rng, 30)
            kept = await a.snapshot("kept")
            ret = attach_retention(a)
            ret.keep_marker(kept.id, -1)
            await _drive(a, rng, 30)
            await _stream(a, b, pb)
            fork = b.journal.last_seq
            await failover(b)
            await _drive(b, rng, 20)
            await _drive(a, rng, 20)  # A diverges, then expires all but its kept marker
            ret.set_policy(tiers=["all 1s"])
            await ret.gc(now_ns=a.journal.time_of_seq(a.journal.last_seq) + NS)
            assert not a.maps.resolvable(fork)
            req = OpenRequest("vol0", load_role(b).lineage, SIZE, 2, b.journal.last_seq, fork,
                              tuple((e[0], e[1], e[2]) for e in load_role(b).epochs))
            assert failback_point(a, req) == (kept.seq, kept.seq)
            await _stream(b, a, pa)
            _same(a, b, "kept")
            assert load_role(a).epochs[-1][1] == a.journal.last_seq - (
                b.journal.last_seq - kept.seq) + 1
        finally:
            for srv in (sa, sb):
                srv.close()
                await srv.wait_closed()
            a.close()
            b.close()

    asyncio.run(main())
