"""Zeros written ahead of the open segment (prefill) and the space after a segment's last
record: cut off at seal, close and open, never replayed (stale records of a file's
earlier life included), nothing a commit acknowledged lost."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from cdp.journal import CrashSimFS, Journal, ManualClock, verify_journal
from cdp.journal.format import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, index_name, segment_name
from cdp.journal.fs import Buffer, OsFileLayer

T0 = 1_700_000_000_000_000_000
D = "/store/vol0/journal"
MiB = 1 << 20


def rnd(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def mk(fs: CrashSimFS, **kw: object) -> Journal:
    return Journal.open(D, fs=fs, clock=ManualClock(T0, tick=1), **kw)  # type: ignore[arg-type]


def seg_path(first: int) -> str:
    return f"{D}/{segment_name(first)}"


def _wait_for(cond: object, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_prefill_writes_zeros_ahead_and_close_cuts_them_off(tmp_path: Path) -> None:
    d = tmp_path / "j"
    path = d / segment_name(1)
    j = Journal.open(d, prefill_bytes=4 * MiB)
    locs = [j.append_write(i * 4096, rnd(i, 4096)) for i in range(50)]
    j.sync()
    end = locs[-1][1] + RECORD_HEADER_SIZE + 4096
    _wait_for(lambda: os.path.getsize(path) >= 4 * MiB)
    with open(path, "rb") as f:
        f.seek(end)
        assert not any(f.read())  # zeros after the last record
    locs += [j.append_write(i * 4096, rnd(i, 4096)) for i in range(50, 1200)]  # past 4 MiB
    j.sync()
    for i, (seq, loc) in enumerate(locs):
        assert j.read_payload(seq, loc) == rnd(i, 4096)
    end = locs[-1][1] + RECORD_HEADER_SIZE + 4096
    j.close()
    assert os.path.getsize(path) == end  # a closed segment ends at its last record
    j = Journal.open(d)
    assert j.recovery.ok and j.recovery.dropped_bytes == 0 and j.last_seq == 1200
    assert [r.payload for r in j.scan()] == [rnd(i, 4096) for i in range(1200)]
    j.close()
    assert verify_journal(d).ok


def test_no_prefill_while_commits_are_large(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = Journal.open(d, prefill_bytes=4 * MiB)
    for i in range(6):  # 1 MiB per sync: zeros first would double the bytes written
        j.append_write(i * MiB, rnd(i, MiB))
        j.sync()
    time.sleep(0.2)
    assert os.path.getsize(d / segment_name(1)) == j.segments()[0].bytes
    for i in range(300):  # then small commits: it starts
        j.append_write(i * 4096, rnd(i, 4096))
        j.sync()
    _wait_for(lambda: os.path.getsize(d / segment_name(1)) > j.segments()[0].bytes + MiB)
    j.close()
    assert os.path.getsize(d / segment_name(1)) == j.segments()[0].bytes


def test_default_prefill_is_on_for_the_real_file_system_only(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j")
    assert j._prefill > 0
    j.close()
    j = mk(CrashSimFS())
    assert j._prefill == 0
    j.close()


def test_sealed_segments_end_at_their_last_record(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = Journal.open(d, segment_bytes=3 * MiB, prefill_bytes=2 * MiB)
    for i in range(2000):  # about 8 MiB: two rollovers
        j.append_write(i * 4096, rnd(i, 4096))
        if i % 50 == 0:
            j.sync()
    j.sync()
    segs = j.segments()
    assert len(segs) >= 3
    for s in segs[:-1]:
        assert s.sealed and os.path.getsize(d / s.name) == s.bytes
    j.close()
    rep = verify_journal(d)
    assert rep.ok and not rep.notes


class _SlowFillFS(OsFileLayer):
    """The filler's 1 MiB zero pwrites take 20 ms each: appends overtake it."""

    def pwrite(self, fd: int, data: Buffer, offset: int) -> None:
        if len(data) == MiB and not any(data):
            time.sleep(0.02)
        super().pwrite(fd, data, offset)


def test_appends_overtaking_the_filler_are_never_zeroed(tmp_path: Path) -> None:
    d = tmp_path / "j"
    fs = _SlowFillFS()
    j = Journal.open(d, fs=fs, prefill_bytes=8 * MiB, buffer_bytes=64 << 10)
    locs = []
    for i in range(3000):  # 12 MiB, written faster than the filler writes zeros
        locs.append(j.append_write(i * 4096, rnd(i, 4096)))
        if i % 100 == 0:
            j.sync()
    j.sync()
    for i, (seq, loc) in enumerate(locs):
        assert j.read_payload(seq, loc) == rnd(i, 4096)
    j.close()
    j = Journal.open(d, fs=fs)
    assert j.recovery.ok and j.recovery.dropped_bytes == 0 and j.last_seq == 3000
    assert [r.payload for r in j.scan()] == [rnd(i, 4096) for i in range(3000)]
    j.close()


@pytest.mark.parametrize("torn", [False, True])
def test_power_loss_with_prefill_keeps_every_commit(torn: bool) -> None:
    for seed in range(6):
        rng = random.Random(seed)
        fs = CrashSimFS(seed=seed)
        j = mk(fs, segment_bytes=3 * MiB, prefill_bytes=2 * MiB)
        payloads: dict[int, bytes] = {}
        durable = 0
        for i in range(rng.randrange(200, 900)):
            data = rnd(seed * 10_000 + i, rng.choice([512, 4096, 20_000]))
            seq, _loc = j.append_write(i * 4096, data)
            payloads[seq] = data
            if rng.random() < 0.1:
                j.sync()
                durable = j.last_seq
            if rng.random() < 0.02:
                time.sleep(0.005)  # let the filler run
        fs.crash(torn=torn)  # the filler may be mid-write: its handle is gone
        j2 = mk(fs, segment_bytes=3 * MiB)
        rep = j2.recovery
        assert rep.ok, rep.problems
        assert j2.last_seq >= durable
        assert [(r.seq, r.payload) for r in j2.scan()] == [
            (s, payloads[s]) for s in range(1, j2.last_seq + 1)]
        seq, loc = j2.append_write(0, b"after")
        j2.close()
        assert verify_journal(D, fs=fs).ok
        j3 = mk(fs, segment_bytes=3 * MiB)
        assert j3.read_payload(seq, loc) == b"after" and j3.recovery.dropped_bytes == 0
        j3.close()


def _two_segments(fs: CrashSimFS) -> tuple[Journal, list[tuple[int, int]]]:
    """A closed journal of two segments whose records all have the same stored size."""
    j = mk(fs, segment_bytes=8192)
    locs = [j.append_write(i * 4096, rnd(i, 1000)) for i in range(10)]
    j.close()
    return j, locs


@pytest.mark.parametrize("aligned", [True, False])
def test_stale_records_of_a_recycled_segment_are_never_replayed(aligned: bool) -> None:
    # A recycled file: segment 2 written over the bytes of an older segment file, whose
    # intact records (valid CRCs, seqs below segment 2's first) follow the new tail.
    fs = CrashSimFS()
    j, _locs = _two_segments(fs)
    segs = j.segments()
    assert len(segs) == 2
    second = segs[1].first_seq
    old = bytes(fs.raw(seg_path(1)))
    new = bytes(fs.raw(seg_path(second)))
    rec = RECORD_HEADER_SIZE + 1000
    assert (len(old) - SEGMENT_HEADER_SIZE) % rec == 0 and len(new) < len(old)
    if not aligned:
        new = new[:-300]  # the last new record torn
    fs.raw(seg_path(second))[:] = new + old[len(new) :]
    # the stale record right after the new tail is intact and has a plausible kind and size
    stale_at = len(new) if aligned else len(new) + 300
    assert old[stale_at : stale_at + 4] == b"CDPR"

    rep = verify_journal(D, fs=fs)
    assert rep.ok and rep.last_seq == (10 if aligned else 9)
    j = mk(fs, segment_bytes=8192)
    r = j.recovery
    assert r.ok and r.last_seq == (10 if aligned else 9)
    assert r.dropped_records == (0 if aligned else 1)
    assert r.truncated_segment == segment_name(second) and r.truncated_at == len(new) - (
        0 if aligned else rec - 300)
    assert [(x.seq, x.payload) for x in j.scan()] == [
        (i + 1, rnd(i, 1000)) for i in range(j.last_seq)]
    seq, loc = j.append_write(0, b"after")
    assert seq == j.last_seq
    j.close()
    j = mk(fs, segment_bytes=8192)
    assert j.recovery.ok and j.recovery.dropped_bytes == 0
    assert j.read_payload(seq, loc) == b"after"
    assert [x.seq for x in j.scan()] == list(range(1, seq + 1))
    j.close()


@pytest.mark.parametrize("ahead", ["zeros", "stale"])
def test_sealed_segment_with_space_written_ahead_is_cut_at_open(ahead: str) -> None:
    # a crash after the rollover but before the sealing sync cut the space off: segment 2
    # (sealed, no sidecar) is followed by zeros or stale records, segment 3 by its records
    fs = CrashSimFS()
    j = mk(fs, segment_bytes=8192)
    locs = [j.append_write(i * 4096, rnd(i, 1000)) for i in range(20)]
    j.close()
    segs = j.segments()
    assert len(segs) >= 3
    second = segs[1].first_seq
    size = fs.size(seg_path(second))
    rec = RECORD_HEADER_SIZE + 1000
    extra = bytes(5000) if ahead == "zeros" else bytes(fs.raw(seg_path(1)))[
        SEGMENT_HEADER_SIZE + 2 * rec :]  # intact records of seqs 3.. (below its first)
    assert extra
    fs.raw(seg_path(second)).extend(extra)
    fs.unlink(f"{D}/{index_name(second)}")
    rep = verify_journal(D, fs=fs)
    assert rep.ok and any("written ahead" in n for n in rep.notes)
    j = mk(fs, segment_bytes=8192)
    assert j.recovery.ok and fs.size(seg_path(second)) == size
    assert index_name(second) in j.recovery.rebuilt_indexes
    for i, (seq, loc) in enumerate(locs):
        assert j.read_payload(seq, loc) == rnd(i, 1000)
    j.close()
    assert verify_journal(D, fs=fs).ok


def test_sealed_segment_missing_records_before_zeros_is_still_damage() -> None:
    fs = CrashSimFS()
    j = mk(fs, segment_bytes=8192)
    locs = [j.append_write(i * 4096, rnd(i, 1000)) for i in range(20)]
    j.close()
    second = j.segments()[1].first_seq
    last_in_second = j.segments()[2].first_seq - 1
    raw = fs.raw(seg_path(second))
    cut = dict(locs)[last_in_second]
    raw[cut:] = bytes(len(raw) - cut)  # its last record zeroed: not written-ahead space
    fs.unlink(f"{D}/{index_name(second)}")
    assert not verify_journal(D, fs=fs).ok
    j = mk(fs, segment_bytes=8192)
    assert not j.recovery.ok
    assert any(p.segment == segment_name(second) for p in j.recovery.problems)
    j.close()


def test_a_store_of_the_golden_bytes_opens_prefills_and_reads_back(tmp_path: Path) -> None:
    """Segments as the writer before prefill left them (the golden bytes of
    docs/FORMATS.md, ending at their last record) open, take appends over written zeros,
    and read back, on the real file system with the default prefill."""
    from tests.unit.test_journal_format import (
        GOLDEN_CHUNKED,
        GOLDEN_MARKER,
        GOLDEN_SEGMENT_HEADER,
        GOLDEN_WRITE,
    )

    d = tmp_path / "j"
    d.mkdir()
    path = d / segment_name(1)
    path.write_bytes(GOLDEN_SEGMENT_HEADER + GOLDEN_WRITE + GOLDEN_MARKER + GOLDEN_CHUNKED)
    j = Journal.open(d)
    assert j.recovery.ok and j.recovery.dropped_bytes == 0 and j.last_seq == 3
    locs = []
    for i in range(300):
        locs.append(j.append_write(i * 4096, rnd(i, 4096)))
        j.sync()
    _wait_for(lambda: os.path.getsize(path) > j.segments()[0].bytes + MiB)
    assert j.read_payload(1, 32) == b"hello" and j.read_record(2, 85).label == "nightly"
    j.close()
    raw = path.read_bytes()
    assert raw.startswith(GOLDEN_SEGMENT_HEADER + GOLDEN_WRITE + GOLDEN_MARKER + GOLDEN_CHUNKED)
    assert len(raw) == locs[-1][1] + RECORD_HEADER_SIZE + 4096
    assert verify_journal(d).ok
    j = Journal.open(d)
    assert [r.payload for r in j.scan()][3:] == [rnd(i, 4096) for i in range(300)]
    j.close()
