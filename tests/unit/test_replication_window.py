"""The window of recent records (cdp/replication/window.py): the journal hands it every
record exactly as stored; the stream's reader serves what it holds without a journal
read, falls back to the journal for what it dropped, and still ships only durable
records; the window exists only while a stream runs."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from cdp.journal import Journal
from cdp.replication.source import RecordReader, ReplicationSource
from cdp.replication.window import RecordWindow
from cdp.volume import Volume
from tests.unit.test_replication_stream import SECRET, _run, _target
from tests.unit.test_volume_replica import SIZE, _drive, _same, settings


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The seqs read from the journal: by ``read_stored``, or in a run of several by
    ``read_stored_run`` (a run of one is a ``read_stored``)."""
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
        if len(reads) == before:
            reads.extend(range(first, first + len(out)))
        return out

    monkeypatch.setattr(Journal, "read_stored", counting)
    monkeypatch.setattr(Journal, "read_stored_run", counting_run)
    return reads


def _every_kind(j: Journal, rng: random.Random) -> None:
    """Records of every shape the writer stores: small, lz4, direct (>= 256 KiB),
    chunked (small and direct, raw and lz4 chunks), zero, marker, rewind, error."""
    for n in (512, 4096, 70_000, 300_000, 2_500_000):
        j.append_write(0, rng.randbytes(n))
        j.append_write(n, bytes(n // 2) + rng.randbytes(n - n // 2))
        j.append_write(2 * n, bytes(n))
    j.append_write(0, rng.randbytes(1_100_000), init=True)
    j.append_zero(4096, 1 << 20)
    j.append_marker(1, "m1")
    j.append_rewind(3)
    j.append_error(5, 0, 4096, "bad")


def test_the_journal_hands_over_each_record_as_stored(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "a", segment_bytes=8 << 20)
    win = RecordWindow.attach(j, 64 << 20, "s")
    assert win is not None and j.on_stored is win
    _every_kind(j, random.Random(1))
    j.sync()
    assert (win.first, win.last) == (1, j.last_seq)
    for seq in range(1, j.last_seq + 1):
        assert win.get(seq) == j.read_stored(seq)
    # append_stored (a replica that replicates on) hands over the same bytes
    k = Journal.open(tmp_path / "b", segment_bytes=8 << 20)
    win2 = RecordWindow.attach(k, 64 << 20, "s")
    assert win2 is not None
    for raw in j.scan_stored(1):
        k.append_stored(raw)
    assert [win2.get(s) for s in range(1, k.last_seq + 1)] == list(j.scan_stored(1))
    win._check()
    win2._check()
    j.close()
    k.close()


def test_window_keeps_what_is_still_to_be_read_within_its_cap() -> None:
    w = RecordWindow(10_000)
    w.first = 5
    for seq in range(5, 9):  # 4 x 2,000 bytes: taken
        assert w.add(seq, bytes([seq]) * 2000)
        w._check()
    w.passed("b", 6)  # reader b is past 5
    w.passed("a", 7)  # a is past 6 too, but b still needs it: the slowest holds the front
    assert (w.first, w.last) == (5, 8)  # nothing dropped before room is needed
    assert w.add(9, bytes(3000))  # room made: 5 (every reader is past it) goes, not 6
    assert (w.first, w.last, w.nbytes) == (6, 9, 9000)
    assert not w.add(10, bytes(3000))  # does not fit, b still needs 6: the run closes
    assert not w.open and not w.add(11, b"x")  # closed: even what would fit waits
    assert w.get(5) is None and w.get(10) is None and w.get(6) == bytes([6]) * 2000
    w.passed("b", 9)
    assert (w.first, len(w)) == (6, 4) and not w.add(12, b"x")  # still closed
    w.forget("a")  # a's session ended: b alone decides
    w.passed("b", 10)  # the closed run read whole: emptied
    assert len(w) == 0 and w.open
    assert w.add(20, b"y") and (w.first, w.last) == (20, 20)  # a new run
    assert not w.add(21, bytes(20_000)) and not w.open  # too large: the run closes
    w.passed("b", 22)
    assert len(w) == 0 and not w.add(22, bytes(20_000))  # alone and too large: not kept
    assert w.add(23, b"z") and (w.first, w.last) == (23, 23)
    w._check()


def test_reader_serves_the_window_without_a_journal_read_and_falls_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        vol = Volume.create(tmp_path / "v", "vol0", SIZE, settings(tmp_path))
        j = vol.journal
        rng = random.Random(3)
        for i in range(10):  # before the window: only in the journal
            vol.write(i * 8192, rng.randbytes(4096))
        win = RecordWindow.attach(j, 100_000, "s")
        assert win is not None
        for i in range(60):  # more than the window takes: it closes after ~100 KB
            vol.write(i * 8192, rng.randbytes(rng.choice((4096, 70_000))))
        await j.commit()
        run = range(win.first, win.last + 1)
        assert win.first == 11 and not win.open and 1 < len(run) < 50
        want = list(j.scan_stored(1))
        reads = _count_reads(monkeypatch)
        # the run: served from memory, no journal read at all
        r = RecordReader(j, win)
        assert r.read(win.first, 1 << 30, win.last) == want[10:win.last]
        assert reads == [] and r.window_hits == len(run) and r.journal_reads == 0
        assert win.open and len(win) == 0  # the closed run read whole: emptied, reopened
        # another reader from the start (a reconnect): those records went from memory
        # and the ones the window never took come from the journal, same bytes
        r.close()
        r = RecordReader(j, win)
        out: list[bytes] = []
        seq = 1
        while seq <= j.last_seq:
            frame = r.read(seq, 80_000, j.last_seq)
            out += frame
            seq += len(frame)
        assert out == want and sorted(reads) == list(range(1, j.last_seq + 1))
        # the window emptied, so the next record starts a new run; only durable ones
        vol.write(0, rng.randbytes(4096))
        assert (win.first, win.last) == (j.last_seq, j.last_seq) > (j.durable_seq,) * 2
        assert r.read(j.last_seq, 1 << 20, j.last_seq) == []
        await j.commit()
        got = r.read(j.last_seq, 1 << 20, j.last_seq)
        assert len(reads) == j.last_seq - 1 and r.window_hits == 1  # from memory
        assert got == [j.read_stored(j.last_seq)]
        win._check()
        vol.close()

    asyncio.run(body())


def test_window_only_while_a_stream_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No replication: the journal keeps nothing. Two streams share one window; it goes
    with the last one; a stream that keeps up reads nothing back from the journal."""
    async def body(src: Volume, dst: Volume) -> None:
        j = src.journal
        rng = random.Random(4)
        await _drive(src, rng, 20)
        assert j.on_stored is None
        server, port = await _target({"vol0": dst})
        rep = ReplicationSource(src, "127.0.0.1", port, SECRET)
        src.attach(rep)
        rep.start()
        await rep.wait_acked(j.last_seq)  # catch-up: from the journal
        assert isinstance(j.on_stored, RecordWindow)
        assert rep._reader.journal_reads == j.last_seq
        reads = _count_reads(monkeypatch)
        for _ in range(5):  # live, the stream keeps up: every record from memory
            await _drive(src, rng, 10)
            await rep.wait_acked(j.last_seq)
        await src.snapshot("m")
        await rep.wait_acked(j.last_seq)
        _same(src, dst)
        assert reads == []
        assert rep._reader.window_hits == 51 and rep._reader.journal_reads == 20
        assert j.on_stored.open and len(j.on_stored) == 51  # kept until room is needed
        off = ReplicationSource(src, "127.0.0.1", port, SECRET, ship_window=0)
        assert RecordWindow.attach(j, 0, off) is None  # no window: read everything back
        rep.stop()
        await asyncio.sleep(0.05)
        assert j.on_stored is None
        server.close()
        await server.wait_closed()

    _run(tmp_path, body)


@pytest.mark.parametrize("seed", range(8))
def test_random_appends_and_readers_keep_the_invariants(seed: int) -> None:
    """Seeded stress: whatever the interleaving of appends and readers, the window holds
    an unbroken run within its cap, never anything a reader is past while others need
    nothing older, and ``get`` gives a record's exact bytes or None."""
    rng = random.Random(seed)
    w = RecordWindow(rng.choice((5000, 20_000, 100_000)))
    rec = {}
    last = 0
    pos = {"a": 1, "b": 1}
    for _ in range(3000):
        op = rng.random()
        if op < 0.5:
            last += 1
            rec[last] = rng.randbytes(rng.choice((10, 700, 4000, 30_000)))
            w((last), (memoryview(rec[last]),) if rng.random() < 0.5 else (rec[last],))
        elif op < 0.9:
            who = rng.choice(("a", "b"))
            pos[who] = min(last + 1, pos[who] + rng.randrange(0, 6))
            for s in range(pos[who], min(last, pos[who] + 3) + 1):
                assert w.get(s) in (None, rec[s])
            w.passed(who, pos[who])
        else:
            who = rng.choice(("a", "b"))
            w.forget(who)
            pos[who] = rng.randrange(1, last + 2)  # reconnects from an older seq
        w._check()
        if len(w):
            assert w.last <= last and all(w.get(s) == rec[s] for s in range(w.first, w.last + 1))
