"""A replica volume fed a source's stored records (``Volume.apply_stored``) has the same
journal, markers and rewinds, and reads identical at every marker and at the head, also
after reopen."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.config import MapSettings, Settings
from cdp.errors import UsageError
from cdp.markers import Marker
from cdp.volume import Volume, VolumeService

SIZE = 4 << 20


def settings(tmp: Path) -> Settings:
    return replace(Settings(), store=tmp / "store",
                   maps=replace(MapSettings(), l0_max_writes=16, fanout=4, full_every=4))


async def _drive(vol: Volume, rng: random.Random, n: int) -> None:
    for _ in range(n):
        ln = rng.choice((512, 4096, 4096, 70_000, 300_000))
        off = rng.randrange(0, SIZE - ln) & ~511
        if rng.random() < 0.1:
            r = vol.zero(off, ln)
        else:
            d = rng.randbytes(ln) if rng.random() < 0.7 else bytes(ln // 2) + rng.randbytes(ln - ln // 2)
            r = vol.write(off, d)
        if r is not None:
            await r


async def _ship(src: Volume, dst: Volume, rng: random.Random) -> None:
    """Feed every record the replica lacks, in batches of random size."""
    batch: list[bytes] = []
    for raw in src.journal.scan_stored(dst.journal.last_seq + 1):
        batch.append(raw)
        if len(batch) >= rng.randrange(1, 40):
            assert await dst.apply_stored(batch) == dst.journal.last_seq
            batch = []
    if batch:
        await dst.apply_stored(batch)


def _same(src: Volume, dst: Volume) -> None:
    assert dst.journal.last_seq == src.journal.last_seq
    assert dst.markers == src.markers
    assert dst.read(0, SIZE) == src.read(0, SIZE)
    for m in src.markers:
        assert dst.read(0, SIZE, m.seq) == src.read(0, SIZE, m.seq), m
        assert dst.resolve_point(m.name) == src.resolve_point(m.name)
    for a, b in zip(src.journal.scan(), dst.journal.scan(), strict=True):
        assert (a.seq, a.timestamp_ns, a.kind, a.offset, a.length) == (
            b.seq, b.timestamp_ns, b.kind, b.offset, b.length)


class _Seen(VolumeService):
    def __init__(self) -> None:
        self.markers: list[Marker] = []
        self.rewinds: list[tuple[int, int]] = []
        self.records = 0

    def on_record(self, vol: Volume, kind: object, seq: int, offset: int, length: int,
                  payload: object) -> None:
        self.records += 1

    def on_marker(self, vol: Volume, marker: Marker) -> None:
        self.markers.append(marker)

    def on_rewind(self, vol: Volume, seq: int, target_seq: int) -> None:
        self.rewinds.append((seq, target_seq))


def test_replica_reads_identical_at_every_marker_and_head(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path)
        src = Volume.create(tmp_path / "src", "src", SIZE, s)
        dst = Volume.create(tmp_path / "dst", "dst", SIZE, s)
        seen = _Seen()
        dst.attach(seen)
        rng = random.Random(7)
        for phase in range(4):
            await _drive(src, rng, 30)
            await src.snapshot(f"phase{phase}")
            await _drive(src, rng, 5)
            if phase == 2:
                await src.rewind(src.markers[0].seq)
                await _drive(src, rng, 10)
            await _ship(src, dst, rng)
            _same(src, dst)
        assert [m.id for m in seen.markers] == [m.id for m in src.markers]
        assert len(seen.rewinds) == 1 and seen.rewinds[0][1] == src.markers[0].seq
        assert seen.records == src.journal.last_seq
        assert dst.journal.durable_seq == dst.journal.last_seq
        # a marker taken on the replica itself after this would continue the ids
        assert dst._next_marker_id == src._next_marker_id
        src.close()
        dst.close()
        src2 = Volume.open(tmp_path / "src", s)
        dst2 = Volume.open(tmp_path / "dst", s)
        _same(src2, dst2)
        await _drive(src2, rng, 20)
        await src2.snapshot("after-reopen")
        await _ship(src2, dst2, rng)
        _same(src2, dst2)
        src2.close()
        dst2.close()

    asyncio.run(main())


def test_replica_refuses_out_of_order_records(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path)
        src = Volume.create(tmp_path / "src", "src", SIZE, s)
        dst = Volume.create(tmp_path / "dst", "dst", SIZE, s)
        await _drive(src, random.Random(1), 6)
        recs = list(src.journal.scan_stored())
        await dst.apply_stored(recs[:2])
        with pytest.raises(UsageError):
            await dst.apply_stored([recs[3]])
        assert dst.journal.last_seq == 2
        await dst.apply_stored(recs[2:])
        _same(src, dst)
        src.close()
        dst.close()

    asyncio.run(main())
