"""Journal compaction: segments rewritten with only their live records (and live chunks),
same seqs and timestamps, records found by seq; crash at every step leaves the old or
the new segment; golden bytes of elided records and chunk entries."""

from __future__ import annotations

import asyncio
import os
import random
import threading

import pytest
from crc32c import crc32c

from cdp.errors import PointError
from cdp.journal import (
    CrashSimFS,
    Journal,
    ManualClock,
    OsFileLayer,
    build_compacted,
    verify_journal,
)
from cdp.journal.format import (
    CHUNK_ENTRY,
    CHUNK_ENTRY_SIZE,
    RECORD_HEADER_SIZE,
    SEGMENT_COMPACTED,
    Compression,
    decode_record,
    encode_record,
    header_problem,
)

D = "/j"
T0 = 1_700_000_000_000_000_000


def _journal(fs: CrashSimFS) -> Journal:
    return Journal.open(D, segment_bytes=256 << 10, fs=fs, clock=ManualClock(T0, tick=1))


def _fill(j: Journal, rng: random.Random) -> dict[int, tuple[int, bytes]]:
    """Small writes, 1 MiB chunked writes, markers and zeroes over several segments."""
    recs: dict[int, tuple[int, bytes]] = {}
    for i in range(60):
        if i % 10 == 3:
            data = rng.randbytes(1 << 20)
        else:
            data = rng.randbytes(rng.choice((512, 4096, 20000)))
        seq, loc = j.append_write(i * 4096, data)
        recs[seq] = (loc, data)
        if i % 7 == 0:
            j.append_marker(i, f"m{i}")
        if i % 9 == 0:
            j.append_zero(0, 8192)
    j.sync()
    return recs


def _live_plan(recs: dict[int, tuple[int, bytes]], rng: random.Random) -> dict[int, list[tuple[int, int]]]:
    live: dict[int, list[tuple[int, int]]] = {}
    for seq, (_loc, data) in recs.items():
        r = rng.random()
        if r < 0.4:
            continue  # dead
        if len(data) > 65536 and r < 0.7:
            a = rng.randrange(0, len(data) - 4096)
            live[seq] = [(a, 4096)]  # one chunk (or two) of the 16 stays
        else:
            live[seq] = [(0, len(data))]
    return live


def _check(j: Journal, recs: dict[int, tuple[int, bytes]], live: dict[int, list[tuple[int, int]]],
           times: dict[int, int]) -> None:
    gone = [(s.first_seq, s.last_seq) for s in j.segments() if s.compacted]
    for seq, (loc, data) in recs.items():
        for a, n in live.get(seq, []):
            assert j.read_slice(seq, loc, a, n) == data[a : a + n]
        if seq not in live and any(a <= seq <= b for a, b in gone):
            with pytest.raises(PointError):
                j.read_slice(seq, loc, 0, min(len(data), 100))
            with pytest.raises(PointError):
                j.read_payload(seq, loc)
    for seq, ts in times.items():
        assert j.time_of_seq(seq) == ts
        assert j.seq_at_time(ts) == seq


def test_compact_keeps_live_bytes_and_seqs() -> None:
    fs = CrashSimFS()
    rng = random.Random(1)
    j = _journal(fs)
    recs = _fill(j, rng)
    times = {s: j.time_of_seq(s) for s in range(1, j.last_seq + 1)}
    live = _live_plan(recs, rng)
    before = j.stats().file_bytes
    sealed = [s for s in j.segments() if s.sealed]
    assert len(sealed) >= 3
    done = 0
    for s in sealed:
        prep = j.compact_segment(s.first_seq, live)
        if prep is not None:
            done += 1
            assert prep.new_size < prep.old_size
    assert done >= 2
    after = j.stats().file_bytes
    assert after < before * 0.8
    assert sum(s.compacted for s in j.segments()) == done
    _check(j, recs, live, times)
    # every record still scans (stubs included), in order
    assert [r.seq for r in j.scan()] == list(range(1, j.last_seq + 1))
    j.close()
    rep = verify_journal(D, fs=fs)
    assert rep.ok, rep.problems
    j = _journal(fs)
    _check(j, recs, live, times)
    # compacting again with the same live set changes nothing
    for s in sealed:
        assert j.compact_segment(s.first_seq, live) is None
    # a second round with less live data shrinks further
    live2 = {k: v for k, v in live.items() if k % 2}
    for s in sealed:
        j.compact_segment(s.first_seq, live2)
    _check(j, recs, live2, times)
    j.close()
    assert verify_journal(D, fs=fs).ok


def test_compact_refuses_a_live_chunk_that_is_gone() -> None:
    fs = CrashSimFS()
    j = _journal(fs)
    rng = random.Random(2)
    recs = _fill(j, rng)
    big = next(s for s, (_l, d) in recs.items() if len(d) > 65536)
    first = max(s.first_seq for s in j.segments() if s.sealed and s.first_seq <= big)
    live = {s: [(0, len(d))] for s, (_l, d) in recs.items()}
    live[big] = [(0, 100)]
    j.compact_segment(first, live)
    live[big] = [(0, 1 << 20)]
    from cdp.errors import Corruption

    with pytest.raises(Corruption, match="already elided"):
        j.compact_segment(first, live)
    assert not [n for n in fs.listdir(D) if n.endswith(".tmp")]


class _Boom(Exception):
    pass


class _StepFS(CrashSimFS):
    """Raises at the n-th mutating call (write, fdatasync, rename, unlink, fsync_dir)."""

    def __init__(self) -> None:
        super().__init__()
        self.arm = -1

    def _step(self) -> None:
        if self.arm == 0:
            raise _Boom()
        if self.arm > 0:
            self.arm -= 1

    def write(self, fd, data):  # type: ignore[no-untyped-def]
        self._step()
        return super().write(fd, data)

    def fdatasync(self, fd):  # type: ignore[no-untyped-def]
        self._step()
        return super().fdatasync(fd)

    def rename(self, src, dst):  # type: ignore[no-untyped-def]
        self._step()
        return super().rename(src, dst)

    def fsync_dir(self, directory):  # type: ignore[no-untyped-def]
        self._step()
        return super().fsync_dir(directory)


def test_crash_at_every_step_of_a_compaction() -> None:
    n = 0
    outcomes = set()
    while True:
        fs = _StepFS()
        rng = random.Random(3)
        j = _journal(fs)
        recs = _fill(j, rng)
        times = {s: j.time_of_seq(s) for s in range(1, j.last_seq + 1)}
        live = _live_plan(recs, rng)
        first = next(s.first_seq for s in j.segments() if s.sealed)
        fs.arm = n
        try:
            j.compact_segment(first, live)
            finished = True
        except _Boom:
            finished = False
        fs.arm = -1
        fs.crash()
        j = _journal(fs)
        seg = j.segments()[0]
        outcomes.add(seg.compacted)
        # whatever state survived, every live byte reads back and every seq keeps its time
        _check(j, recs, live if seg.compacted else {s: [(0, len(d))] for s, (_l, d) in recs.items()},
               times)
        j.close()
        assert verify_journal(D, fs=fs).ok
        if finished:
            break
        n += 1
    assert outcomes == {False, True}
    assert n >= 5


def test_golden_elided_record_and_chunk() -> None:
    # a WRITE of 4096 bytes at offset 8192, seq 7, fully elided: 48 bytes, no payload
    full = encode_record(1, 7, T0, 8192, 4096, b"x" * 4096)
    tail = full[8:RECORD_HEADER_SIZE]
    stub_tail = bytes([2, 1, int(Compression.ELIDED), 0]) + (0).to_bytes(4, "little") + tail[8:]
    stub = b"CDPR" + crc32c(stub_tail).to_bytes(4, "little") + stub_tail
    assert stub.hex() == (
        "43445052" "4f25e1ff" "02" "01" "03" "00" "00000000"
        "0700000000000000" "00002a36fe9c9717" "0020000000000000" "0010000000000000"
    )
    from cdp.journal.compact import _stub

    assert _stub(1, 0, 7, T0, 8192, 4096) == stub  # what compaction writes
    rec = decode_record(stub[:48], b"", 32, "here", 7)
    assert rec.elided and rec.payload == b"" and rec.length == 4096
    assert header_problem(2, 1, 3, 0, 4096) is None
    assert header_problem(2, 3, 3, 0, 0) is not None  # only data records are elided
    assert header_problem(1, 1, 3, 0, 4096) is not None
    # an elided chunk entry: stored_length 0, compression 3, crc 0
    ent = bytearray(CHUNK_ENTRY_SIZE)
    CHUNK_ENTRY.pack_into(ent, 0, 0, int(Compression.ELIDED), 0)
    assert ent.hex() == "00000000" "03000000" "00000000"
    assert SEGMENT_COMPACTED == 1


def test_real_files_and_tmp_cleanup(tmp_path: os.PathLike[str]) -> None:
    d = os.path.join(tmp_path, "j")
    j = Journal.open(d, segment_bytes=64 << 10, clock=ManualClock(T0, tick=1))
    rng = random.Random(4)
    recs = {}
    for i in range(40):
        data = rng.randbytes(8192)
        recs[j.append_write(i * 8192, data)[0]] = data
    j.sync()
    segs = [s for s in j.segments() if s.sealed]
    live = {s: [(0, 8192)] for s in recs if s % 3 == 0}
    for s in segs:
        j.compact_segment(s.first_seq, live)
    j.close()
    with open(os.path.join(d, "00000000000000000001.seg.compact.tmp"), "wb") as f:
        f.write(b"junk")
    j = Journal.open(d, segment_bytes=64 << 10)
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]
    assert [r.seq for r in j.scan()] == list(range(1, 41))
    for r in j.scan():
        if r.seq in live:
            assert r.payload == recs[r.seq]
        elif any(s.first_seq <= r.seq <= s.last_seq for s in segs):
            assert r.elided
    j.close()
    assert verify_journal(d).ok


def test_rate_paces_a_small_segment_and_stop_ends_the_wait(tmp_path: os.PathLike[str]) -> None:
    """A segment smaller than the pacing step still honours ``rate`` (it did not: the
    budget was checked every 1 MiB only), and setting ``stop`` ends a paced compaction
    at once with Interrupted, its temp files removed."""
    import time

    from cdp.errors import Interrupted

    d = os.path.join(tmp_path, "j")
    j = Journal.open(d, segment_bytes=64 << 10, clock=ManualClock(T0, tick=1))
    rng = random.Random(6)
    for i in range(20):
        j.append_write(i * 8192, rng.randbytes(8192))
    j.sync()
    seg = next(s for s in j.segments() if s.sealed)
    live = {seg.first_seq: [(0, 8192)]}
    t0 = time.monotonic()
    prep = build_compacted(j.compact_source(seg.first_seq), live, rate=seg.bytes / 0.5)
    assert time.monotonic() - t0 >= 0.45  # read ~seg.bytes at seg.bytes per 0.5 s
    assert j.compact_commit(prep)
    seg2 = next(s for s in j.segments() if s.sealed and s.first_seq > seg.first_seq)
    stop = threading.Event()
    got: list[BaseException] = []

    def work() -> None:
        try:
            build_compacted(j.compact_source(seg2.first_seq), {}, rate=100.0, stop=stop)
        except BaseException as e:
            got.append(e)

    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.2)
    stop.set()
    t.join(10)  # at 100 B/s the segment would take ten minutes
    assert not t.is_alive() and len(got) == 1 and isinstance(got[0], Interrupted), got
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]
    j.close()
    assert verify_journal(d).ok


class _SlowRenameFS(OsFileLayer):
    """Real files; the rename of a compacted segment holds its worker thread until the
    test lets it go (so reads can run while the old file is already replaced)."""

    def __init__(self) -> None:
        self.renamed = threading.Event()
        self.go = threading.Event()

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        if dst.endswith(".seg"):
            self.renamed.set()
            assert self.go.wait(30)


def test_reads_during_an_async_commit_see_old_then_new_file(tmp_path: os.PathLike[str]) -> None:
    d = os.path.join(tmp_path, "j")
    fs = _SlowRenameFS()
    j = Journal.open(d, segment_bytes=64 << 10, fs=fs, clock=ManualClock(T0, tick=1))
    rng = random.Random(5)
    recs: dict[int, tuple[int, bytes]] = {}
    for i in range(40):
        data = rng.randbytes(8192)
        seq, loc = j.append_write(i * 8192, data)
        recs[seq] = (loc, data)
    j.sync()
    seg = next(s for s in j.segments() if s.sealed)
    live = {s: [(0, 8192)] for s in recs if s % 3 == 0}
    prep = build_compacted(j.compact_source(seg.first_seq), live)

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(j.compact_commit_async(prep))
        while not fs.renamed.is_set():  # the loop stays free while the worker renames
            await asyncio.sleep(0.001)
        # the new file is in place, the switch has not happened: every record of the
        # segment, dead ones included, still reads from the old file
        for s in range(seg.first_seq, seg.last_seq + 1):
            loc, data = recs[s]
            assert j.read_slice(s, loc, 0, 8192) == data
        fs.go.set()
        assert await task
        for s in range(seg.first_seq, seg.last_seq + 1):
            loc, data = recs[s]
            if s in live:
                assert j.read_slice(s, loc, 0, 8192) == data
            else:
                with pytest.raises(PointError):
                    j.read_slice(s, loc, 0, 100)

    asyncio.run(run())
    assert next(x.compacted for x in j.segments())
    j.close()
    assert verify_journal(d).ok


# ---------------------------------------------------------------- the fast path (#27)

def _small_history(d: str, n: int = 300) -> tuple[Journal, dict[int, tuple[int, bytes]]]:
    """4 KiB writes (runs of them live and dead), a 200 KiB write now and then (dead:
    only its header is read), markers and a long ERROR (a big non-data record)."""
    j = Journal.open(d, segment_bytes=1 << 20, clock=ManualClock(T0, tick=1))
    rng = random.Random(8)
    recs: dict[int, tuple[int, bytes]] = {}
    for i in range(n):
        data = rng.randbytes(200 << 10 if i % 50 == 7 else 4096)
        seq, loc = j.append_write(i * 4096, data)
        recs[seq] = (loc, data)
        if i % 40 == 5:
            j.append_marker(i, f"m{i}")
        if i % 90 == 11:
            j.append_error(5, 0, 4096, "primary write failed: " + "x" * 2000)
    j.sync()
    return j, recs


def _runs_live(recs: dict[int, tuple[int, bytes]]) -> dict[int, list[tuple[int, int]]]:
    """Live in runs of 5 of every 12 seqs (so copies and stubs alternate in runs)."""
    return {s: [(0, len(d))] for s, (_l, d) in recs.items() if s % 12 < 5 and len(d) == 4096}


def _record_at(d: str, first_seq: int, seq: int) -> int:
    """File offset of record *seq* in segment *first_seq* (by a scan of the headers)."""
    with open(os.path.join(d, f"{first_seq:020d}.seg"), "rb") as f:
        data = f.read()
    off = 32
    while off < len(data):
        slen = int.from_bytes(data[off + 12 : off + 16], "little")
        if int.from_bytes(data[off + 16 : off + 24], "little") == seq:
            return off
        off += RECORD_HEADER_SIZE + slen
    raise AssertionError(f"seq {seq} not in segment {first_seq}")


def _flip(d: str, first_seq: int, at: int) -> None:
    path = os.path.join(d, f"{first_seq:020d}.seg")
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))


def test_fast_path_keeps_every_live_byte_and_every_record(tmp_path: os.PathLike[str]) -> None:
    """Runs of copied records and stubs, big dead records read only as headers, a big
    ERROR record copied whole: the compacted journal reads back and verifies."""
    d = os.path.join(tmp_path, "j")
    j, recs = _small_history(d)
    live = _runs_live(recs)
    times = {s: j.time_of_seq(s) for s in range(1, j.last_seq + 1)}
    sealed = [s for s in j.segments() if s.sealed]
    before = j.stats().file_bytes
    assert sum(j.compact_segment(s.first_seq, live) is not None for s in sealed) == len(sealed)
    assert j.stats().file_bytes < before * 0.5
    _check(j, recs, live, times)
    kinds = [(r.seq, r.kind) for r in j.scan()]
    assert [s for s, _k in kinds] == list(range(1, j.last_seq + 1))
    assert sum(1 for _s, k in kinds if k == 5) == 4  # every ERROR record kept
    j.close()
    rep = verify_journal(d)
    assert rep.ok, rep.problems


def test_fast_path_corrupt_live_record_in_a_run_is_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    """A flipped payload byte in a live record in the middle of a run of live records:
    compaction names it (segment, seq), writes nothing in place, and every other live
    record still reads back (nothing is lost, the damage is not hidden)."""
    from cdp.errors import Corruption

    d = os.path.join(tmp_path, "j")
    j, recs = _small_history(d)
    live = _runs_live(recs)
    seg = next(s for s in j.segments() if s.sealed)
    victim = next(s for s in range(seg.first_seq + 20, seg.last_seq) if s % 12 == 2 and s in live)
    j.close()
    _flip(d, seg.first_seq, _record_at(d, seg.first_seq, victim) + RECORD_HEADER_SIZE + 1000)
    j = Journal.open(d, segment_bytes=1 << 20)
    with pytest.raises(Corruption, match=f"seq {victim}: bad checksum"):
        j.compact_segment(seg.first_seq, live)
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]
    assert not next(s for s in j.segments() if s.first_seq == seg.first_seq).compacted
    for s, (loc, data) in recs.items():
        if seg.first_seq <= s <= seg.last_seq and s != victim:
            assert j.read_slice(s, loc, 0, len(data)) == data
    with pytest.raises(Corruption):
        j.read_slice(victim, recs[victim][0], 0, 4096)
    j.close()


def test_fast_path_dead_record_header_is_checked(tmp_path: os.PathLike[str]) -> None:
    """A dead record's payload is not read, but its header is: a flipped timestamp
    (which its stub would carry on under a fresh CRC) is a clear error."""
    from cdp.errors import Corruption

    d = os.path.join(tmp_path, "j")
    j, recs = _small_history(d)
    live = _runs_live(recs)
    seg = next(s for s in j.segments() if s.sealed)
    victim = next(s for s in range(seg.first_seq + 20, seg.last_seq) if s % 12 == 8 and s in recs)
    j.close()
    _flip(d, seg.first_seq, _record_at(d, seg.first_seq, victim) + 24)  # timestamp
    j = Journal.open(d, segment_bytes=1 << 20)
    with pytest.raises(Corruption, match=f"seq {victim}: damaged header"):
        j.compact_segment(seg.first_seq, live)
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]
    j.close()


def test_fast_path_corrupt_dead_payload_is_dropped_not_copied(tmp_path: os.PathLike[str]) -> None:
    """A flipped byte in the payload of a record nobody references: compaction no
    longer reads it (it used to fail the whole segment); the record becomes a stub,
    every live byte reads back and the journal verifies clean."""
    d = os.path.join(tmp_path, "j")
    j, recs = _small_history(d)
    live = _runs_live(recs)
    times = {s: j.time_of_seq(s) for s in range(1, j.last_seq + 1)}
    seg = next(s for s in j.segments() if s.sealed)
    victim = next(s for s in range(seg.first_seq + 20, seg.last_seq) if s % 12 == 8 and s in recs)
    j.close()
    _flip(d, seg.first_seq, _record_at(d, seg.first_seq, victim) + RECORD_HEADER_SIZE + 5)
    assert not verify_journal(d).ok
    j = Journal.open(d, segment_bytes=1 << 20)
    assert j.compact_segment(seg.first_seq, live) is not None
    _check(j, {s: v for s, v in recs.items() if seg.first_seq <= s <= seg.last_seq}, live, times)
    j.close()
    rep = verify_journal(d)
    assert rep.ok, rep.problems


def test_tail_crcs_match_crc32c() -> None:
    """The vectorised stub CRC (one table lookup per byte) equals crc32c per row."""
    import numpy as np

    from cdp.journal.compact import tail_crcs

    rng = np.random.default_rng(9)
    tails = rng.integers(0, 256, size=(500, 40), dtype=np.uint8)
    tails[0] = 0
    tails[1] = 255
    got = tail_crcs(tails)
    assert got.tolist() == [crc32c(bytes(r)) for r in tails]
