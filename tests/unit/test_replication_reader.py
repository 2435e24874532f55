"""RecordReader: the records a stream ships are the journal's stored records, in seq
order, at least one per frame and then what fits the budget, only durable ones, and
each read once (the record read past a frame's budget is kept for the next frame)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.errors import Corruption
from cdp.journal import Journal, NotLocal
from cdp.journal.tiered import Range, fetch_missed, prefetch_limit, readahead
from cdp.replication.source import RecordReader
from cdp.volume import Volume
from tests.unit.test_volume_replica import SIZE, settings


def _volume(tmp: Path, sizes: list[int]) -> Volume:
    vol = Volume.create(tmp / "v", "vol0", SIZE, settings(tmp))
    rng = random.Random(7)
    for i, n in enumerate(sizes):  # incompressible: stored sizes follow the written ones
        vol.write((i * 65536) % (SIZE - n), rng.randbytes(n))
    return vol


def test_frames_follow_the_budget_and_read_each_record_once(tmp_path: Path,
                                                            monkeypatch: object) -> None:
    async def body() -> None:
        vol = _volume(tmp_path, [4096, 70_000, 4096, 300_000, 512, 4096, 70_000])
        j = vol.journal
        await j.commit()
        want = list(j.scan_stored(1))
        reads: list[int] = []
        orig = Journal.read_stored
        orig_run = Journal.read_stored_run

        def counting(self: Journal, seq: int, **kw: bool) -> bytes:
            reads.append(seq)
            return orig(self, seq, **kw)

        def counting_run(self: Journal, first: int, last: int, budget: int,
                         **kw: bool) -> list[bytes]:
            before = len(reads)
            out = orig_run(self, first, last, budget, **kw)
            if len(reads) == before:  # not a run of one, counted by read_stored
                reads.extend(range(first, first + len(out)))
            return out

        monkeypatch.setattr(Journal, "read_stored", counting)  # type: ignore[attr-defined]
        monkeypatch.setattr(Journal, "read_stored_run", counting_run)  # type: ignore[attr-defined]
        r = RecordReader(j)
        budget = 80_000
        got: list[bytes] = []
        seq = 1
        while seq <= j.last_seq:
            frame = r.read(seq, budget, j.last_seq)
            assert frame  # at least one, even one larger than the budget
            assert len(frame) == 1 or sum(map(len, frame)) <= budget
            got += frame
            seq += len(frame)
        assert got == want
        assert sorted(reads) == list(range(1, j.last_seq + 1))  # each read once
        vol.close()

    asyncio.run(body())


def test_only_durable_records_and_a_reader_that_moves_elsewhere(tmp_path: Path) -> None:
    async def body() -> None:
        vol = _volume(tmp_path, [4096] * 4)
        j = vol.journal
        await j.commit()
        vol.write(0, random.Random(8).randbytes(4096))  # not durable yet
        r = RecordReader(j)
        assert len(r.read(1, 6000, j.last_seq)) == 1  # the second is kept for later
        assert [len(x) for x in r.read(3, 1 << 20, j.last_seq)] == [len(j.read_stored(3)),
                                                                     len(j.read_stored(4))]
        assert r.read(2, 1 << 20, 2) == [j.read_stored(2)]  # kept one is not reused elsewhere
        assert j.durable_seq == 4 and r.read(5, 1 << 20, j.last_seq) == []
        await j.commit()
        assert r.read(5, 1 << 20, j.last_seq) == [j.read_stored(5)]
        vol.close()

    asyncio.run(body())


def test_reads_over_dropped_segments_fetch_what_they_miss(tmp_path: Path) -> None:
    """Tiered history: a record of a dropped segment raises NotLocal (none before it in
    the frame), the stream's fetch (``fetch_missed`` widened by ``readahead``) brings it
    and those that follow, and the frames are the records as stored before the drop."""
    async def body() -> None:
        j = Journal.open(tmp_path, segment_bytes=4096)
        rng = random.Random(9)
        for i in range(40):
            j.append_write(i * 4096, rng.randbytes(700) if i % 2 else bytes([i]) * 512)
        await j.commit()
        want = list(j.scan_stored(1))
        copy: dict[int, bytes] = {}
        for s in [s for s in j.segments() if s.sealed][:3]:
            copy[s.first_seq] = (tmp_path / s.name).read_bytes()
            j.drop_segment(s.first_seq)
        fetched: list[Range] = []

        async def remote(ranges: list[Range]) -> None:
            fetched.extend(ranges)
            for first, off, n in ranges:
                j.cache_put(first, off, copy[first][off : off + n])

        j.remote = remote
        r = RecordReader(j)
        got: list[bytes] = []
        missed: list[Range] | None = None
        seq = 1
        while seq <= j.last_seq:
            try:
                frame = r.read(seq, 2000, j.last_seq)
            except NotLocal as exc:
                missed = await fetch_missed(j, exc, missed,
                                            lambda rs: readahead(j, rs, prefetch_limit(j)))
                continue
            missed = None
            got += frame
            seq += len(frame)
        assert got == want
        assert fetched and {f for f, _o, _n in fetched} <= set(copy)
        j.close()

    asyncio.run(body())


def test_read_stored_run_gives_what_read_stored_gives(tmp_path: Path) -> None:
    """A run read in one pread holds the very records ``read_stored`` gives one by one,
    stays in its segment, in the file (not the open segment's buffer) and within the
    budget, and gives at least one record."""
    async def body() -> None:
        rng = random.Random(3)
        st = settings(tmp_path)  # segments of 1 MiB: runs meet segment ends
        st = replace(st, journal=replace(st.journal, segment_bytes=1 << 20))
        vol = Volume.create(tmp_path / "v", "vol0", SIZE, st)
        for i in range(60):
            n = rng.choice((512, 4096, 9000, 70_000))
            vol.write((i * 65536) % (SIZE - n), rng.randbytes(n))
        assert len(vol.journal.segments()) > 1
        j = vol.journal
        await j.commit()
        for i in range(5):  # a few appended after the commit: still in the buffer maybe
            vol.write(i * 4096, rng.randbytes(4096))
        want = {s: j.read_stored(s, chunks=False) for s in range(1, j.last_seq + 1)}
        for _ in range(300):
            first = rng.randint(1, j.last_seq)
            last = rng.randint(first, j.last_seq)
            budget = rng.choice((1, 5000, 20_000, 100_000, 1 << 22))
            got = j.read_stored_run(first, last, budget)
            assert got and got == [want[s] for s in range(first, first + len(got))]
            assert j.read_stored_run(first, last, budget, check=False) == got
            assert first + len(got) - 1 <= last
            assert len(got) == 1 or sum(map(len, got)) <= budget
        vol.close()

    asyncio.run(body())


def test_read_stored_run_leaves_crcs_to_the_target_only_when_asked(tmp_path: Path) -> None:
    """A damaged payload inside a run: Corruption with the check; without it (the
    source, whose target checks every byte) the run carries the bytes as they are."""
    async def body() -> None:
        vol = _volume(tmp_path, [4096] * 8)
        j = vol.journal
        await j.commit()
        want = [j.read_stored(s, chunks=False) for s in range(1, 9)]
        seg = next((tmp_path / "v" / "journal").glob("*.seg"))
        raw = bytearray(seg.read_bytes())
        at = raw.find(want[3]) + 48 + 100  # inside record 4's payload
        raw[at] ^= 0x01
        seg.write_bytes(bytes(raw))
        with pytest.raises(Corruption, match="seq 4"):
            j.read_stored_run(1, 8, 1 << 20)
        got = j.read_stored_run(1, 8, 1 << 20, check=False)
        assert len(got) >= 4 and got[3] != want[3] and got[:3] == want[:3]
        vol.close()

    asyncio.run(body())
