"""Failover then failback at the volume level (docs/REPLICATION.md): the new primary's
records after the common point land on the old primary rebased (seq + d, REWIND
targets, clamped times, a colliding marker id renumbered) behind a REWIND to the
common point; both read identical at the head and at every marker of the new primary,
the old primary's divergent point stays readable, also after reopen."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from cdp.replication.protocol import OpenRequest
from cdp.replication.target import (
    Role,
    become_replica,
    failover,
    load_role,
    rebase_records,
    save_role,
    tip,
)
from cdp.volume import Volume
from tests.unit.test_volume_replica import SIZE, _drive, _ship, settings


def test_failback_rebases_and_keeps_the_divergent_point(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path)
        rng = random.Random(7)
        a = Volume.create(tmp_path / "a", "vol0", SIZE, s)
        b = Volume.create(tmp_path / "b", "rep0", SIZE, s)
        await _drive(a, rng, 60)
        one = await a.snapshot("one")
        await _drive(a, rng, 30)
        save_role(b.path, Role("replica", a.uuid, 1, "a"))
        await _ship(a, b, rng)
        fork = b.journal.last_seq
        # failover at "one"; the new primary writes and marks
        role = await failover(b)
        assert role.epochs == [[1, 1, 0], [2, fork + 1, 0]]
        await b.rewind(one.seq)
        await _drive(b, rng, 20)
        await b.snapshot("after")
        # the old primary diverges meanwhile, with a marker of the same id
        await _drive(a, rng, 25)
        adiv = await a.snapshot("adiv")
        div = a.read(0, SIZE)
        assert adiv.id == b.markers[-1].id
        a_last = a.journal.last_seq
        req = OpenRequest("vol0", a.uuid, SIZE, 2, b.journal.last_seq, fork)
        await become_replica(a, req, min(fork, a_last), "b")
        ra = load_role(a)
        d = a_last + 1 - fork
        assert ra.role == "replica" and ra.epochs[-1] == [2, a_last + 2, d]
        # the common point is reported as the sender has it: comparable
        crc = int.from_bytes(b.journal.read_stored(fork)[4:8], "little")
        assert tip(a, ra) == (fork, b.journal.time_of_seq(fork), crc)
        recs = list(b.journal.scan_stored(fork + 1))
        mid = len(recs) // 2
        for part in (recs[:mid], recs[mid:]):
            await a.apply_stored(rebase_records(a, ra, part))
        assert a.journal.last_seq == b.journal.last_seq + d
        assert tip(a, ra) == (b.journal.last_seq, 0, 0)
        assert ra.marker_ids == [[adiv.id, adiv.id + 1]]
        for x in (a, b):
            x.close()
        a = Volume.open(tmp_path / "a", s)
        b = Volume.open(tmp_path / "b", s)
        try:
            assert a.read(0, SIZE) == b.read(0, SIZE)
            for label in ("one", "after"):
                assert a.read(0, SIZE, a.resolve_point(label)) == b.read(0, SIZE, b.resolve_point(label))
            assert a.read(0, SIZE, a.resolve_point("adiv")) == div  # the divergent point
            assert a.resolve_point("adiv") == adiv.seq
        finally:
            a.close()
            b.close()

    asyncio.run(main())
