"""Journal behaviour: append/read, rollover, time index, recovery, corruption, group
commit, ENOSPC. Real journal on CrashSimFS (in memory) or the real file system."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
from pathlib import Path

import pytest

from cdp.errors import ConfigError, Corruption, NotFound, PointError, StoreFull, UsageError
from cdp.journal import (
    CrashSimFS,
    Journal,
    ManualClock,
    RecordKind,
    verify_journal,
)
from cdp.journal.format import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, index_name, segment_name

T0 = 1_700_000_000_000_000_000
D = "/store/vol0/journal"


def rnd(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def mk(fs: CrashSimFS | None = None, clock: ManualClock | None = None, **kw: object) -> Journal:
    return Journal.open(D, fs=fs or CrashSimFS(), clock=clock or ManualClock(T0, tick=1),
                        **kw)  # type: ignore[arg-type]


def seg_path(first: int) -> str:
    return f"{D}/{segment_name(first)}"


def test_empty_journal() -> None:
    fs = CrashSimFS()
    j = mk(fs)
    assert (j.first_seq, j.last_seq, j.durable_seq) == (1, 0, 0)
    assert j.seq_at_time(T0 * 2) == 0
    assert list(j.scan()) == []
    assert fs.exists(seg_path(1))
    with pytest.raises(NotFound):
        j.read_payload(1, SEGMENT_HEADER_SIZE)
    with pytest.raises(PointError):
        j.time_of_seq(1)
    j.close()


def test_all_kinds_round_trip_on_disk(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j")
    data = os.urandom(5000)
    b = j.append_write(0, b"\0" * 65536, init=True)
    a = j.append_write(8192, data)
    c = j.append_zero(4096, 1 << 33)
    d = j.append_marker(17, "before upgrade ✓")
    e = j.append_rewind(2)
    f = j.append_error(5, 100, 200, "primary write failed")
    assert [x[0] for x in (b, a, c, d, e, f)] == [1, 2, 3, 4, 5, 6]

    def check(j: Journal) -> None:
        assert j.read_payload(*a) == data
        rb = j.read_record(*b)
        assert rb.kind == RecordKind.INIT and rb.payload == b"\0" * 65536
        assert rb.compression == 1 and rb.stored_length < 65536
        rc = j.read_record(*c)
        assert (rc.kind, rc.offset, rc.length, rc.payload) == (RecordKind.ZERO, 4096, 1 << 33, b"")
        rd = j.read_record(*d)
        assert (rd.kind, rd.marker_id, rd.label) == (RecordKind.MARKER, 17, "before upgrade ✓")
        re_ = j.read_record(*e)
        assert (re_.kind, re_.target_seq) == (RecordKind.REWIND, 2)
        rf = j.read_record(*f)
        assert (rf.kind, rf.error_code, rf.offset, rf.length, rf.message) == (
            RecordKind.ERROR, 5, 100, 200, "primary write failed")
        assert [r.seq for r in j.scan()] == [1, 2, 3, 4, 5, 6]
        assert [r.loc for r in j.scan(4)] == [d[1], e[1], f[1]]

    check(j)  # from the buffer
    j.sync()
    check(j)  # from the file
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.recovery.ok and j.recovery.dropped_bytes == 0
    assert j.last_seq == j.durable_seq == 6
    check(j)
    st = j.stats()
    assert st.records == 6 and st.raw_bytes > st.stored_bytes
    j.close()
    rep = verify_journal(tmp_path / "j")
    assert rep.ok and rep.records == 6
    assert rep.to_dict()["problems"] == []


def test_compression_only_when_it_saves() -> None:
    j = mk()
    s2, l2 = j.append_write(0, b"xy" * 2048)
    s1, l1 = j.append_write(0, os.urandom(4096))
    s3, l3 = j.append_write(0, b"x" * 100)  # too small to try
    assert j.read_record(s1, l1).compression == 0
    assert j.read_record(s2, l2).compression == 1
    assert j.read_record(s3, l3).stored_length == 100
    assert l3 - l1 == RECORD_HEADER_SIZE + 4096


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        mk(sync="sometimes")
    with pytest.raises(ConfigError):
        mk(segment_bytes=100)
    j = mk()
    with pytest.raises(UsageError):
        j.append_write(-1, b"x")
    with pytest.raises(UsageError):
        j.append_rewind(5)
    seq, loc = j.append_write(0, b"abc")
    with pytest.raises(Corruption, match="seq 1"):
        j.read_record(seq, loc + 1)
    with pytest.raises(Corruption):
        j.read_record(seq, 10**9)


def test_rollover_naming_sidecars_and_sealed_segments_unchanged() -> None:
    fs = CrashSimFS()
    j = mk(fs, segment_bytes=4096)
    locs = [j.append_write(i, rnd(i, 700)) for i in range(40)]
    j.sync()
    infos = j.segments()
    assert len(infos) > 5
    for a, b in itertools.pairwise(infos):
        assert b.first_seq == a.last_seq + 1 and a.sealed
        assert a.bytes <= 4096
        assert fs.exists(f"{D}/{index_name(a.first_seq)}")
    assert infos[0].name == segment_name(1)
    sealed = {i.name: bytes(fs.raw(f"{D}/{i.name}")) for i in infos[:-1]}
    for i in range(40, 60):
        j.append_write(i, rnd(-i, 700))
    j.close()
    j = mk(fs, segment_bytes=4096)
    for name, data in sealed.items():
        assert bytes(fs.raw(f"{D}/{name}")) == data
    for i, (seq, loc) in enumerate(locs):
        assert j.read_payload(seq, loc) == rnd(i, 700)
    assert j.last_seq == 60 and j.recovery.ok
    # a record larger than a segment gets a segment of its own
    s, loc = j.append_write(0, os.urandom(9000))
    assert j.read_payload(s, loc)[:10] and j.segments()[-1].records == 1
    j.close()
    assert verify_journal(D, fs=fs).ok


def test_clock_backwards_and_time_index_across_rollover_and_reopen() -> None:
    fs = CrashSimFS()
    clock = ManualClock(T0)
    j = mk(fs, clock, segment_bytes=4096)
    rng = random.Random(3)
    times = []
    for i in range(300):
        clock.advance(rng.choice([-5000, -1, 0, 1, 10, 1000, 1000]))
        seq, _ = j.append_write(i, rnd(i, rng.randint(1, 400)))
        times.append(j.time_of_seq(seq))
    assert times == sorted(times)

    def check(j: Journal) -> None:
        for s in range(1, len(times) + 1):
            assert j.time_of_seq(s) == times[s - 1]
        probes = [times[0] - 1, *times, times[-1] + 1, *(t + 1 for t in times[::7])]
        for ns in probes:
            want = sum(1 for t in times if t <= ns)
            assert j.seq_at_time(ns) == want, ns

    check(j)
    j.close()
    j = mk(fs, clock, segment_bytes=4096)
    check(j)
    # a stepped-back clock after reopen still cannot go below the last timestamp
    clock.set(T0 - 10**12)
    seq, _ = j.append_zero(0, 512)
    assert j.time_of_seq(seq) == times[-1]
    j.close()
    # sidecars missing or damaged: rebuilt by a scan, same answers
    names = [n for n in fs.listdir(D) if n.endswith(".idx")]
    assert names
    fs.unlink(f"{D}/{names[0]}")
    fs.raw(f"{D}/{names[1]}")[70] ^= 1
    j = mk(fs, clock, segment_bytes=4096)
    assert index_name(1) in j.recovery.rebuilt_indexes
    times.append(times[-1])
    check(j)
    assert j.repairs, (names, j.recovery)  # damaged entries rebuilt when first needed
    j.close()


def _durable_journal(n: int, size: int = 100) -> tuple[CrashSimFS, list[tuple[int, int]]]:
    fs = CrashSimFS()
    j = mk(fs)
    locs = [j.append_write(i * 512, rnd(i, size)) for i in range(n)]
    j.close()
    return fs, locs


def test_torn_tail_every_byte_position() -> None:
    fs0, locs = _durable_journal(4)
    full = bytes(fs0.raw(seg_path(1)))
    last_loc = locs[-1][1]
    for cut in range(last_loc, len(full)):
        fs = CrashSimFS()
        fs.makedirs(D)
        fd = fs.open_append(seg_path(1))
        fs.write(fd, full[:cut])
        fs.fdatasync(fd)
        fs.fsync_dir(D)
        j = mk(fs)
        rep = j.recovery
        assert j.last_seq == 3 and rep.ok
        assert rep.dropped_bytes == cut - last_loc
        assert rep.dropped_records == (1 if cut > last_loc else 0)
        assert [r.payload for r in j.scan()] == [rnd(i, 100) for i in range(3)]
        seq, loc = j.append_write(7, b"after")
        assert (seq, loc) == (4, last_loc)
        j.close()
        j = mk(fs)
        assert j.read_payload(4, loc) == b"after" and j.recovery.dropped_bytes == 0
        j.close()
        assert verify_journal(D, fs=fs).ok


def test_torn_trailing_garbage_is_dropped() -> None:
    fs, _locs = _durable_journal(3)
    fs.raw(seg_path(1)).extend(b"\0" * 5000)
    j = mk(fs)
    assert j.last_seq == 3 and j.recovery.dropped_bytes == 5000 and j.recovery.ok
    j.close()


@pytest.mark.parametrize("where", [0, 4, 8, 9, 10, 13, 17, 30, 41, 48, 60, 147])
def test_bit_flip_in_durable_part_is_reported_not_truncated(where: int) -> None:
    fs, locs = _durable_journal(6)
    bad_seq, bad_loc = locs[2]
    fs.raw(seg_path(1))[bad_loc + where] ^= 0x04
    rep = verify_journal(D, fs=fs)
    assert not rep.ok
    assert [(p.segment, p.offset, p.seq) for p in rep.problems] == [
        (segment_name(1), bad_loc, bad_seq)]
    j = mk(fs)
    assert j.last_seq == 6 and j.recovery.dropped_bytes == 0
    assert [(p.segment, p.offset, p.seq) for p in j.recovery.problems] == [
        (segment_name(1), bad_loc, bad_seq)]
    with pytest.raises(Corruption) as exc:
        j.read_payload(bad_seq, bad_loc)
    msg = str(exc.value)
    assert segment_name(1) in msg and f"offset {bad_loc}" in msg and f"seq {bad_seq}" in msg
    for i, (seq, loc) in enumerate(locs):
        if seq != bad_seq:
            assert j.read_payload(seq, loc) == rnd(i, 100)
    with pytest.raises(Corruption):
        list(j.scan())
    assert [r.seq for r in j.scan(4)] == [4, 5, 6]
    seq, loc = j.append_write(0, b"still works")
    j.close()
    j = mk(fs)
    assert j.read_payload(seq, loc) == b"still works" and not j.recovery.ok
    j.close()


def test_bit_flip_in_sealed_segment() -> None:
    fs = CrashSimFS()
    j = mk(fs, segment_bytes=4096)
    locs = [j.append_write(i, rnd(i, 500)) for i in range(30)]
    j.close()
    seq, loc = locs[1]  # in the first (sealed) segment
    fs.raw(seg_path(1))[loc + 60] ^= 0x80
    rep = verify_journal(D, fs=fs)
    assert [(p.segment, p.offset, p.seq) for p in rep.problems] == [(segment_name(1), loc, seq)]
    j = mk(fs, segment_bytes=4096)
    with pytest.raises(Corruption, match=f"seq {seq}"):
        j.read_payload(seq, loc)
    assert j.read_payload(*locs[0]) == rnd(0, 500)
    assert j.read_payload(*locs[29]) == rnd(29, 500)
    j.close()


def test_flip_in_last_record_of_last_segment_counts_as_torn() -> None:
    fs, locs = _durable_journal(3)
    fs.raw(seg_path(1))[locs[2][1] + 50] ^= 1
    j = mk(fs)
    assert j.last_seq == 2 and j.recovery.dropped_records == 1 and j.recovery.ok
    j.close()


async def test_group_commit_shares_fdatasyncs() -> None:
    fs = CrashSimFS()
    j = mk(fs, sync="always")
    n_writers, n_writes = 32, 20
    base = fs.fdatasync_count

    async def writer(w: int) -> None:
        for i in range(n_writes):
            seq, _ = j.append_write(w * 4096, f"{w}:{i}".encode() * 50)
            await j.commit()
            assert j.durable_seq >= seq
            if i % 3 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(writer(w) for w in range(n_writers)))
    syncs = fs.fdatasync_count - base
    commits = n_writers * n_writes
    assert j.durable_seq == j.last_seq == commits
    assert syncs < commits / 4, (syncs, commits)
    j.close()


async def test_commit_covers_everything_appended_before_it_and_survives_crash() -> None:
    fs = CrashSimFS()
    j = mk(fs, segment_bytes=8192)
    committed: list[int] = []

    async def writer(w: int) -> None:
        rng = random.Random(w)
        for _ in range(30):
            seq, _ = j.append_write(w, os.urandom(rng.randint(1, 1500)))
            if rng.random() < 0.5:
                await j.commit()
                committed.append(seq)
            else:
                await asyncio.sleep(0)

    await asyncio.gather(*(writer(w) for w in range(8)))
    expect = {r.seq: r.payload for r in j.scan()}
    top = max(committed)
    # no final commit: crash now; every committed record (and all before it) survives
    fs.crash(torn=True)
    j2 = mk(fs, segment_bytes=8192)
    assert j2.last_seq >= top
    got = {r.seq: r.payload for r in j2.scan()}
    assert all(got[s] == expect[s] for s in got)
    j2.close()
    assert verify_journal(D, fs=fs).ok


def test_uncommitted_rollover_lost_cleanly_on_crash() -> None:
    fs = CrashSimFS()
    j = mk(fs, segment_bytes=4096)
    for i in range(5):
        j.append_write(i, rnd(i, 500))
    j.sync()
    for i in range(30):  # rolls over twice, nothing synced
        j.append_write(i, rnd(100 + i, 500))
    j._flush()
    fs.crash(torn=True)
    j2 = mk(fs, segment_bytes=4096)
    assert j2.last_seq >= 5 and j2.recovery.ok  # a torn write may have kept a few more
    want = [rnd(i, 500) for i in range(5)] + [rnd(100 + i, 500) for i in range(30)]
    assert [r.payload for r in j2.scan()] == want[: j2.last_seq]
    j2.append_write(0, b"c")
    j2.close()
    assert verify_journal(D, fs=fs).ok


def test_torn_sealed_segment_followed_by_empty_segment_becomes_tail() -> None:
    fs = CrashSimFS()
    j = mk(fs, segment_bytes=4096)
    for i in range(3):
        j.append_write(i, rnd(i, 500))
    j.sync()
    for i in range(10):
        j.append_write(i, rnd(100 + i, 500))
    j._flush()
    # the new segment's name reached the disk, the old segment's tail did not
    fs.fsync_dir(D)
    fs.crash(torn=False)
    j2 = mk(fs, segment_bytes=4096)
    assert j2.last_seq == 3 and j2.recovery.ok
    assert j2.recovery.removed_segments
    j2.close()
    assert verify_journal(D, fs=fs).ok


def test_enospc_raises_storefull_and_keeps_journal_consistent() -> None:
    fs = CrashSimFS(capacity=60_000)
    j = mk(fs, segment_bytes=32768, buffer_bytes=4096)
    ok: list[tuple[int, int, bytes]] = []
    with pytest.raises(StoreFull):
        for i in range(1000):
            data = random.Random(i).randbytes(700 if i % 5 else 300_000 if i > 40 else 900)
            seq, loc = j.append_write(i, data)
            ok.append((seq, loc, data))
    assert j.last_seq == len(ok)
    for seq, loc, data in ok:
        assert j.read_payload(seq, loc) == data
    try:
        j.sync()
        assert j.durable_seq == len(ok)
    except StoreFull:
        pass  # the buffered tail could not reach the disk either
    fs.crash()
    fs.capacity = None
    j2 = mk(fs, segment_bytes=32768)
    assert j2.recovery.ok
    for r in j2.scan():
        seq, loc, data = ok[r.seq - 1]
        assert (r.loc, r.payload) == (loc, data)
    j2.close()
    assert verify_journal(D, fs=fs).ok


def test_enospc_on_large_direct_write_leaves_no_partial_record() -> None:
    fs = CrashSimFS(capacity=200_000)
    j = mk(fs)
    _s1, l1 = j.append_write(0, rnd(1, 1000))
    with pytest.raises(StoreFull):
        j.append_write(0, os.urandom(300_000))
    assert j.last_seq == 1
    s2, l2 = j.append_write(0, rnd(2, 1000))
    j.sync()
    assert (s2, l2) == (2, l1 + RECORD_HEADER_SIZE + 1000)
    assert fs.size(seg_path(1)) == l2 + RECORD_HEADER_SIZE + 1000
    j.close()
    assert verify_journal(D, fs=fs).ok


async def test_failed_fdatasync_refuses_further_work() -> None:
    fs = CrashSimFS()
    j = mk(fs)
    j.append_write(0, b"x")
    fs.fail_fdatasync = errno.EIO
    with pytest.raises(OSError):
        await j.commit()
    fs.fail_fdatasync = None
    with pytest.raises(OSError):
        j.append_write(0, b"y")
    j.close()


def test_verify_names_gap_and_header_damage() -> None:
    fs = CrashSimFS()
    j = mk(fs, segment_bytes=4096)
    for i in range(30):
        j.append_write(i, rnd(i, 700))
    j.close()
    fs.raw(seg_path(1))[3] ^= 0xFF
    rep = verify_journal(D, fs=fs)
    assert not rep.ok and rep.problems[0].offset == 0 and rep.problems[0].seq == 1
    d = rep.to_dict()
    assert d["ok"] is False and d["records"] == 30


class _SlowSyncFS(CrashSimFS):
    """fdatasync takes 50 ms (in the worker thread)."""

    def fdatasync(self, fd: int) -> None:
        import time

        time.sleep(0.05)
        super().fdatasync(fd)


async def test_sync_runs_off_the_event_loop_and_appends_keep_flowing() -> None:
    fs = _SlowSyncFS()
    j = mk(fs)
    s1, _ = j.append_write(0, b"first")
    task = asyncio.ensure_future(j.commit())
    await asyncio.sleep(0.01)  # the loop runs while the sync is in flight
    assert not task.done()
    s2, l2 = j.append_write(0, b"during")  # appends do not wait for the sync
    assert j.read_payload(s2, l2) == b"during"
    late = asyncio.ensure_future(j.commit())  # joins the next sync
    await task
    assert j.durable_seq >= s1
    await late
    assert j.durable_seq >= s2
    j.close()


def test_verify_missing_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        verify_journal(tmp_path / "nope")


async def test_buffer_reaches_the_os_without_a_commit() -> None:
    fs = CrashSimFS()
    j = mk(fs)
    _seq, loc = j.append_write(0, b"idle")
    assert fs.size(seg_path(1)) == loc  # still in the user-space buffer
    await asyncio.sleep(0.15)
    assert fs.size(seg_path(1)) == loc + RECORD_HEADER_SIZE + 4
    assert j.durable_seq == 0  # handed to the OS, not synced
    j.close()
