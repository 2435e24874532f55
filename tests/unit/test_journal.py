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
from tests.helpers import assert_bytes_equal

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
        assert rb.kind == RecordKind.INIT
        assert_bytes_equal(rb.payload, b"\0" * 65536)
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
    with pytest.raises(ConfigError):
        mk(segment_records=0)
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


def test_segment_records_bounds_the_open_segment_and_recovery_scans_only_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment is sealed at segment_records records (however few bytes they take), so
    open scans at most that many: sealed segments open from their sidecar headers, and
    after a clean close the open one from its ``.closed`` sidecar (nothing scanned)."""
    import cdp.journal.recovery as recovery

    fs = CrashSimFS()
    j = mk(fs, segment_records=10)
    locs = [j.append_write(i, rnd(i, 50)) for i in range(35)]
    j.close()
    infos = j.segments()
    assert [(i.first_seq, i.records, i.sealed) for i in infos] == [
        (1, 10, True), (11, 10, True), (21, 10, True), (31, 5, False)]
    for i in infos[:-1]:
        assert fs.exists(f"{D}/{index_name(i.first_seq)}")
    scanned: list[int] = []
    real_scan = recovery.scan_segment

    def scan(fs_: object, d: str, first: int, deep: bool = False) -> object:
        scanned.append(first)
        return real_scan(fs_, d, first, deep)  # type: ignore[arg-type]

    monkeypatch.setattr(recovery, "scan_segment", scan)
    j = mk(fs, segment_records=10)
    assert scanned == [] and j.recovery.ok and j.last_seq == 35
    for i, (seq, loc) in enumerate(locs):
        assert j.read_payload(seq, loc) == rnd(i, 50)
    # the bound applies to the segment recovery handed back as the open one
    for i in range(35, 41):
        j.append_write(i, rnd(i, 50))
    assert [i.records for i in j.segments()] == [10, 10, 10, 10, 1]
    j.sync()
    fs.crash()  # no clean close: the open segment is scanned, and only it
    j = mk(fs, segment_records=10)
    assert scanned == [41] and j.recovery.ok and j.last_seq == 41
    j.close()
    assert verify_journal(D, fs=fs).ok


def test_scan_meta_is_scan_without_data_payloads_and_still_checks_every_byte() -> None:
    fs = CrashSimFS()
    j = mk(fs, segment_records=4)
    j.append_write(0, rnd(1, 3000))
    j.append_write(4096, b"\0" * 4096, init=True)  # lz4
    j.append_write(8192, rnd(2, 300_000))  # chunked
    j.append_zero(0, 8192)
    j.append_marker(7, "m")
    j.append_rewind(2)
    j.append_error(5, 0, 512, "eio")
    j.close()
    j = mk(fs, segment_records=4)
    full, meta = list(j.scan()), list(j.scan_meta())
    assert len(full) == len(meta) == 7
    for a, b in zip(full, meta, strict=True):
        if a.kind in (RecordKind.WRITE, RecordKind.INIT):
            assert a.payload and b.payload == b""
            b.payload = a.payload
        assert a == b
    seq, loc = full[2].seq, full[2].loc  # a byte of a chunk of the sealed chunked record
    j.close()
    fs.raw(seg_path(1))[loc + RECORD_HEADER_SIZE + 200_000] ^= 1
    j = mk(fs, segment_records=4)
    assert j.recovery.ok  # a sealed segment: opened from its sidecar
    with pytest.raises(Corruption, match=f"seq {seq}"):
        list(j.scan_meta())
    assert [r.seq for r in j.scan_meta(4)] == [4, 5, 6, 7]
    j.close()


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


# ------------------------------------------------------------------ chunked records, slices

CH = 64 << 10


def _mixed(n: int, seed: int) -> bytes:
    """Half the 4 KiB blocks compressible, half random: chunks of both kinds."""
    rng = random.Random(seed)
    return b"".join(bytes(4096) if rng.random() < 0.5 else rng.randbytes(4096)
                    for _ in range(n // 4096 + 1))[:n]


class _CountingFS(CrashSimFS):
    read_bytes = 0

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        got = super().pread(fd, size, offset)
        self.read_bytes += len(got)
        return got


class _Cache:
    def __init__(self) -> None:
        self.d: dict[tuple[int, int], bytes] = {}
        self.puts: list[tuple[int, int]] = []

    def get(self, key: tuple[int, int]) -> bytes | None:
        return self.d.get(key)

    def put(self, key: tuple[int, int], data: bytes) -> None:
        self.d[key] = data
        self.puts.append(key)


def test_read_slice_buffered_file_and_reopen() -> None:
    fs = CrashSimFS()
    j = mk(fs)
    data = {  # sizes around the chunk boundary, buffered (< 256 KiB) and direct
        s: _mixed(s, s) for s in (1, 4096, CH - 1, CH, CH + 1, 3 * CH + 17, 1 << 20)}
    locs = {s: j.append_write(s, d) for s, d in data.items()}
    probes = [(0, 1), (1, 3), (CH - 5, 10), (CH, 4096), (CH - 1, 2), (5000, CH + 10)]

    def check(j: Journal) -> None:
        for s, d in data.items():
            seq, loc = locs[s]
            rec = j.read_record(seq, loc)
            assert rec.payload == d
            assert rec.compression == 2 if s > CH else rec.compression in (0, 1)
            assert j.read_slice(seq, loc, 0, s) == d
            for poff, n in probes:
                if poff + n <= s:
                    assert j.read_slice(seq, loc, poff, n) == d[poff : poff + n]
            assert j.read_slice(seq, loc, s, 0) == b""
            with pytest.raises(UsageError):
                j.read_slice(seq, loc, s - 1, 2)
            with pytest.raises(UsageError):
                j.read_slice(seq, loc, -1, 1)
            for past in (s, s + CH):  # at the end, and in a chunk past the last one
                with pytest.raises(UsageError):
                    j.read_slice(seq, loc, past, 1)
                with pytest.raises(UsageError):
                    j.read_slice_view(seq, loc, past, 1)

    check(j)  # records partly still in the user-space buffer
    j.sync()
    check(j)
    j.close()
    j = mk(fs)
    check(j)
    j.close()
    assert verify_journal(D, fs=fs).ok


def test_read_slice_touches_only_overlapping_chunks() -> None:
    fs = _CountingFS()
    j = mk(fs)
    d = os.urandom(1 << 20)
    seq, loc = j.append_write(0, d)
    j.sync()
    cache = _Cache()
    fs.read_bytes = 0
    assert j.read_slice(seq, loc, 5 * CH + 100, 4096, cache=cache) == d[5 * CH + 100 :][:4096]
    assert cache.puts == [(seq, 5)] and len(cache.d[(seq, 5)]) == CH
    # header + table (one small read, then remembered) and the one chunk
    assert fs.read_bytes <= RECORD_HEADER_SIZE + 4096 + CH
    assert j.read_slice(seq, loc, 7 * CH - 10, 20, cache=cache) == d[7 * CH - 10 : 7 * CH + 10]
    assert cache.puts == [(seq, 5), (seq, 6), (seq, 7)]
    # served from the cache: no further reads at all
    fs.read_bytes = 0
    cache.puts.clear()
    assert_bytes_equal(j.read_slice(seq, loc, 6 * CH, 2 * CH, cache=cache), d[6 * CH : 8 * CH])
    assert cache.puts == [] and fs.read_bytes == 0
    # without a cache: the remembered tables, then only the one 4 KiB granule of the raw
    # chunk (version 3: a CRC per granule), not the whole chunk
    assert j.read_slice(seq, loc, 15 * CH + 1, 10) == d[15 * CH + 1 : 15 * CH + 11]
    assert fs.read_bytes == 4096
    fs.read_bytes = 0
    assert j.read_slice(seq, loc, 14 * CH + 4000, 200) == d[14 * CH + 4000 : 14 * CH + 4200]
    assert fs.read_bytes == 8192
    # a one-block record is cached as its one chunk
    s2, l2 = j.append_write(0, b"abcdef" * 1000)
    assert j.read_slice(s2, l2, 10, 5, cache=cache) == (b"abcdef" * 1000)[10:15]
    assert cache.puts == [(s2, 0)] and cache.d[(s2, 0)] == b"abcdef" * 1000
    j.close()


def test_small_slices_of_one_granule_read_it_once() -> None:
    """A client reading 1 KiB at a time: one pread (and CRC) per 4 KiB granule."""
    fs = _CountingFS()
    j = mk(fs)
    d = os.urandom(1 << 20)
    seq, loc = j.append_write(0, d)
    j.sync()
    j.read_slice(seq, loc, 0, 1)  # header + tables, remembered
    fs.read_bytes = 0
    for off in range(3 * CH, 3 * CH + 8 * 4096, 1024):
        assert j.read_slice(seq, loc, off, 1024) == d[off : off + 1024]
    assert fs.read_bytes == 8 * 4096
    # another record between two reads of the same granule: read again, still right
    s2, l2 = j.append_write(1 << 20, d[::-1])
    j.sync()
    j.read_slice(s2, l2, 0, 1)
    fs.read_bytes = 0
    assert j.read_slice(seq, loc, 5000, 100) == d[5000:5100]
    assert j.read_slice(s2, l2, 5000, 100) == d[::-1][5000:5100]
    assert j.read_slice(seq, loc, 5100, 100) == d[5100:5200]
    assert fs.read_bytes == 3 * 4096
    j.close()


def test_multi_chunk_slice_without_cache_reads_only_its_granules() -> None:
    """The one-pass readers (export, image) read a slice over several raw chunks as one
    pread of the granules it overlaps: no decode, nothing cached, and a damaged granule
    still fails the slice with the chunk named."""
    fs = _CountingFS()
    j = mk(fs)
    d = os.urandom(1 << 20)
    seq, loc = j.append_write(0, d)
    j.sync()
    fs.read_bytes = 0
    # first read: header + tables (remembered), then the span itself
    assert_bytes_equal(j.read_slice(seq, loc, 2 * CH, 3 * CH), d[2 * CH : 5 * CH])
    assert fs.read_bytes <= RECORD_HEADER_SIZE + 4096 + 16 * (12 + 64) + 3 * CH
    fs.read_bytes = 0
    assert_bytes_equal(j.read_slice(seq, loc, 0, 1 << 20), d)
    assert fs.read_bytes == 1 << 20
    fs.read_bytes = 0
    # unaligned ends: the granules around them, nothing more
    assert_bytes_equal(j.read_slice(seq, loc, 3 * CH - 100, CH + 200),
                       d[3 * CH - 100 : 4 * CH + 100])
    assert fs.read_bytes == CH + 2 * 4096
    j.append_write(1 << 20, d)  # the damaged record is not the tail (recovery keeps it)
    j.close()
    fs.raw(seg_path(1))[_chunk_pos(fs, loc, 4) + 5000] ^= 0x01
    j = mk(fs)
    assert_bytes_equal(j.read_slice(seq, loc, 0, 4 * CH), d[: 4 * CH])
    with pytest.raises(Corruption, match="chunk 4"):
        j.read_slice(seq, loc, 3 * CH, 2 * CH)
    j.close()


def _chunk_pos(fs: CrashSimFS, loc: int, i: int) -> int:
    """File offset of chunk i of the chunked record at loc in segment 1."""
    import struct

    raw = fs.raw(seg_path(1))
    length = struct.unpack_from("<Q", raw, loc + 40)[0]
    n = (length + CH - 1) // CH
    per = 12 + 64 if raw[loc + 8] >= 3 else 12  # version 3: + the granule table
    pos = loc + RECORD_HEADER_SIZE + per * n
    for k in range(i):
        pos += struct.unpack_from("<I", raw, loc + RECORD_HEADER_SIZE + 12 * k)[0]
    return pos


def test_chunk_flip_fails_only_slices_touching_that_chunk() -> None:
    fs = CrashSimFS()
    j = mk(fs)
    d = _mixed(1 << 20, 5)
    locs = [j.append_write(i << 20, d) for i in range(3)]
    j.close()
    seq, loc = locs[1]
    fs.raw(seg_path(1))[_chunk_pos(fs, loc, 9) + 7] ^= 0x20
    rep = verify_journal(D, fs=fs)
    assert [(p.segment, p.offset, p.seq, p.reason) for p in rep.problems] == [
        (segment_name(1), loc, seq, "bad checksum in chunk 9")]
    j = mk(fs)
    assert [(p.offset, p.seq, p.reason) for p in j.recovery.problems] == [
        (loc, seq, "bad checksum in chunk 9")]
    assert j.last_seq == 3 and j.recovery.dropped_bytes == 0
    for i in range(16):
        if i == 9:
            with pytest.raises(Corruption) as exc:
                j.read_slice(seq, loc, i * CH + 100, 4096)
            msg = str(exc.value)
            assert (f"{segment_name(1)} offset {loc} seq {seq}" in msg
                    and "chunk 9" in msg), msg
        else:
            assert_bytes_equal(j.read_slice(seq, loc, i * CH, CH), d[i * CH : (i + 1) * CH])
    with pytest.raises(Corruption, match="chunk 9"):
        j.read_slice(seq, loc, 8 * CH, 2 * CH + 1)
    with pytest.raises(Corruption, match="chunk 9"):
        j.read_payload(seq, loc)
    for s, lc in (locs[0], locs[2]):
        assert_bytes_equal(j.read_payload(s, lc), d)
    j.close()


@pytest.mark.parametrize("where", [4, 12, 40, 48, 48 + 12 * 3 + 5, 48 + 12 * 16 - 1])
def test_header_or_chunk_table_flip_fails_every_slice(where: int) -> None:
    fs = CrashSimFS()
    j = mk(fs)
    d = os.urandom(1 << 20)
    locs = [j.append_write(i << 20, d) for i in range(3)]
    j.close()
    seq, loc = locs[1]
    fs.raw(seg_path(1))[loc + where] ^= 0x01
    rep = verify_journal(D, fs=fs)
    assert [(p.offset, p.seq) for p in rep.problems] == [(loc, seq)]
    j = mk(fs)
    assert [(p.offset, p.seq) for p in j.recovery.problems] == [(loc, seq)]
    for i in (0, 7, 15):
        with pytest.raises(Corruption, match=f"offset {loc} seq {seq}"):
            j.read_slice(seq, loc, i * CH, 10)
    assert j.read_slice(*locs[2], 3, 5) == d[3:8]
    j.close()


def test_torn_chunked_tail_in_header_table_boundaries_and_chunks() -> None:
    fs0 = CrashSimFS()
    j = mk(fs0)
    small = [j.append_write(i, rnd(i, 100)) for i in range(2)]
    big = _mixed(3 * CH + 500, 9)
    _seq, last_loc = j.append_write(0, big)
    j.close()
    full = bytes(fs0.raw(seg_path(1)))
    # every cut inside the header and chunk table, around every chunk boundary, and a
    # stride through the chunks (every byte of 200 KiB would take minutes)
    n_table = RECORD_HEADER_SIZE + 12 * 4
    bounds = [_chunk_pos(fs0, last_loc, i) for i in range(1, 4)] + [len(full)]
    cuts = sorted({*range(last_loc, last_loc + n_table + 2),
                   *range(last_loc + n_table, len(full), 31),
                   *(c + k for c in bounds for k in range(-2, 3) if c + k < len(full))})
    for cut in cuts:
        fs = CrashSimFS()
        fs.makedirs(D)
        fd = fs.open_append(seg_path(1))
        fs.write(fd, full[:cut])
        fs.fdatasync(fd)
        fs.fsync_dir(D)
        j = mk(fs)
        rep = j.recovery
        assert j.last_seq == 2 and rep.ok
        assert rep.dropped_bytes == cut - last_loc
        assert rep.dropped_records == (1 if cut > last_loc else 0)
        seq, loc = j.append_write(7, big)
        assert (seq, loc) == (3, last_loc)
        j.close()
        assert verify_journal(D, fs=fs).ok
        j = mk(fs)
        assert [j.read_payload(*x) for x in small] == [rnd(0, 100), rnd(1, 100)]
        assert j.read_slice(3, last_loc, CH - 2, 5) == big[CH - 2 : CH + 3]
        j.close()


def test_flip_in_chunk_of_last_record_counts_as_torn() -> None:
    fs = CrashSimFS()
    j = mk(fs)
    j.append_write(0, b"first")
    _seq, loc = j.append_write(0, os.urandom(1 << 20))
    j.close()
    fs.raw(seg_path(1))[_chunk_pos(fs, loc, 12) + 3] ^= 0x01
    j = mk(fs)
    assert j.last_seq == 1 and j.recovery.dropped_records == 1 and j.recovery.ok
    j.close()


def test_huge_chunked_record_uses_many_iovecs(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j")
    d = os.urandom(80 << 20)  # 1280 chunks: more than one writev's worth of iovecs
    seq, loc = j.append_write(0, d)
    j.sync()
    assert j.read_slice(seq, loc, (70 << 20) + 3, 9000) == d[(70 << 20) + 3 :][:9000]
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.recovery.ok
    assert_bytes_equal(j.read_payload(seq, loc), d)
    j.close()
    assert verify_journal(tmp_path / "j").ok


def test_fill_pattern_chunks_share_one_decoded_copy_and_damage_still_fails() -> None:
    """Chunks that compress to a few bytes (a fill pattern) are decoded once for all
    records with the same stored bytes; a damaged copy still fails its reads."""
    from unittest import mock

    import lz4.block

    fs = CrashSimFS()
    j = mk(fs)
    fill = b"\x55" * (1 << 20)
    other = b"\x66" * (1 << 20)
    locs = [j.append_write(i << 20, fill) for i in range(3)] + [j.append_write(3 << 20, other)]
    j.close()
    seq2, loc2 = locs[2]
    fs.raw(seg_path(1))[_chunk_pos(fs, loc2, 4) + 5] ^= 0x08
    j = mk(fs)
    real = lz4.block.decompress
    with mock.patch.object(lz4.block, "decompress", side_effect=real) as dec:
        for _ in range(2):  # tables first, then the fast path
            for s, lc in locs[:2]:
                for i in range(16):
                    assert j.read_slice(s, lc, i * CH + 8, 4096) == fill[:4096]
        assert j.read_slice(*locs[3], 5 * CH, 4096) == other[:4096]
        assert dec.call_count <= 4  # not once per chunk read
    assert j.read_slice(seq2, loc2, 3 * CH, 4096) == fill[:4096]
    for _ in range(2):
        with pytest.raises(Corruption, match="chunk 4"):
            j.read_slice(seq2, loc2, 4 * CH, 4096)
    j.close()


@pytest.mark.parametrize("reopen", [False, True])
def test_one_block_records_read_whole_and_damage_still_fails(reopen: bool) -> None:
    """A slice of a one-block record (raw or lz4, up to one chunk) reads right from the
    file whether or not the segment's offsets are in memory; a flipped byte in one is
    Corruption naming it, and the records around it stay readable."""
    fs = CrashSimFS()
    j = mk(fs, segment_bytes=1 << 20)
    recs = []
    for i, n in enumerate([512, 4096, 20000, 65536, 4096, 4096]):
        d = rnd(i, n) if i % 2 else bytes([i]) * n  # raw and lz4-compressed payloads
        recs.append((*j.append_write(i << 16, d), d))
    for i in range(40):  # later segments, so the first one is sealed
        j.append_write(0, rnd(100 + i, 65536))
    if reopen:
        j.close()
        j = mk(fs, segment_bytes=1 << 20)
    else:
        j._flush()
    for seq, loc, d in recs:
        assert j.read_slice(seq, loc, 0, len(d)) == d
        assert j.read_slice(seq, loc, 100, 300) == d[100:400]
        assert j.read_slice(seq, loc, len(d) - 1, 1) == d[-1:]
    with pytest.raises(UsageError):
        j.read_slice(recs[1][0], recs[1][1], 4000, 200)
    for k in (1, 2):  # raw, then lz4
        seq, loc, d = recs[k]
        fs.raw(seg_path(1))[loc + RECORD_HEADER_SIZE + 10] ^= 0x04
        with pytest.raises(Corruption, match=f"offset {loc} seq {seq}"):
            j.read_slice(seq, loc, 0, 16)
    for seq, loc, d in (recs[0], recs[3], recs[4]):
        assert_bytes_equal(j.read_slice(seq, loc, 0, len(d)), d)
    j.close()


def test_writeback_is_started_on_every_appended_byte_once(tmp_path: Path) -> None:
    """Every WRITEBACK_BYTES handed to the OS, the journal asks it to start writing
    them out (sync_file_range): contiguous ranges from the segment header on, restarting
    in each new segment; on the real file system the call succeeds."""
    from cdp.journal.fs import OsFileLayer
    from cdp.journal.writer import WRITEBACK_BYTES

    class Recording(OsFileLayer):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[int, int, int]] = []

        def start_writeback(self, fd: int, offset: int, length: int) -> None:
            self.calls.append((fd, offset, length))
            super().start_writeback(fd, offset, length)

    fs = Recording()
    j = Journal.open(tmp_path / "j", segment_bytes=24 << 20, fs=fs)
    d = os.urandom(1 << 20)
    for i in range(40):
        j.append_write(i << 20, d)
        j.append_write(0, d[:4096])  # small ones go through the buffer
    j.close()
    assert len(fs.calls) >= 4
    per_fd: dict[int, list[tuple[int, int]]] = {}
    for fd, off, n in fs.calls:
        assert n >= WRITEBACK_BYTES
        per_fd.setdefault(fd, []).append((off, n))
    assert len(per_fd) == 2  # two segments
    for ranges in per_fd.values():
        assert ranges[0][0] == SEGMENT_HEADER_SIZE
        for (a, n), (b, _) in itertools.pairwise(ranges):
            assert a + n == b
    assert verify_journal(str(tmp_path / "j")).problems == []


# ------------------------------------------------------------------ pipelined group commit


class _OverlapFS(CrashSimFS):
    """fdatasync takes 40 ms; records how many run at once and on which handles."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.guard = threading.Lock()
        self.running: list[int] = []
        self.max_running = 0
        self.shared_handle = False
        self.fail_after: dict[int, int] = {}  # call number -> errno raised after the sleep
        self.calls = 0

    def fdatasync(self, fd: int) -> None:
        import time

        with self.guard:
            self.calls += 1
            n = self.calls
            self.shared_handle |= fd in self.running
            self.running.append(fd)
            self.max_running = max(self.max_running, len(self.running))
        try:
            time.sleep(0.04)
            if n in self.fail_after:
                raise OSError(self.fail_after[n], os.strerror(self.fail_after[n]))
            super().fdatasync(fd)
        finally:
            with self.guard:
                self.running.remove(fd)


async def test_a_commit_arriving_during_a_sync_starts_its_own_at_once() -> None:
    fs = _OverlapFS()
    j = mk(fs)
    waves = []
    for w in range(6):  # each wave of commits arrives while the previous sync runs
        j.append_write(w * 4096, rnd(w, 4000))
        waves.append(asyncio.ensure_future(j.commit()))
        await asyncio.sleep(0.01)
    await asyncio.gather(*waves)
    assert j.durable_seq == j.last_seq == 6
    assert fs.max_running >= 2 and not fs.shared_handle
    n = fs.calls
    # a batch of concurrent committers still shares one fdatasync
    for w in range(20):
        j.append_write(w * 4096, b"x" * 100)
    await asyncio.gather(*(j.commit() for _ in range(20)))
    assert fs.calls == n + 1 and j.durable_seq == j.last_seq
    j.close()
    j = mk(fs)
    assert j.last_seq == 26 and j.recovery.ok
    j.close()


async def test_syncs_in_flight_are_bounded_and_all_commits_are_durable() -> None:
    fs = _OverlapFS()
    j = mk(fs, segment_bytes=16384)  # rollovers: sealing runs under the sync lock
    committed: list[int] = []

    async def writer(w: int) -> None:
        for i in range(8):
            seq, _ = j.append_write(w * 4096, rnd(w * 100 + i, 900))
            await j.commit()
            committed.append(seq)
            await asyncio.sleep(0.003 * (w % 4))

    await asyncio.gather(*(writer(w) for w in range(12)))
    assert 2 <= fs.max_running <= 4 + 1  # SYNCS_IN_FLIGHT, plus a sealing fdatasync
    assert not fs.shared_handle
    assert j.durable_seq == j.last_seq == max(committed) == 96
    fs.crash(torn=True)
    j2 = mk(fs, segment_bytes=16384)
    assert j2.last_seq == 96 and j2.recovery.ok
    j2.close()
    assert verify_journal(D, fs=fs).ok


async def test_a_failed_sync_fails_the_syncs_running_beside_it() -> None:
    fs = _OverlapFS()
    j = mk(fs)
    j.append_write(0, b"a")
    await j.commit()
    fs.fail_after[fs.calls + 1] = errno.EIO
    j.append_write(0, b"b")
    first = asyncio.ensure_future(j.commit())  # fails after 40 ms
    await asyncio.sleep(0.02)
    j.append_write(0, b"c")
    second = asyncio.ensure_future(j.commit())  # the next one, beside it: must not succeed
    for fut in (first, second):
        with pytest.raises(OSError):
            await fut
    assert j.durable_seq == 1
    with pytest.raises(OSError):
        j.append_write(0, b"d")


def test_sealed_index_arrays_are_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27: the (timestamp, offset) arrays of sealed segments kept in memory are
    bounded by INDEX_CACHE_BYTES as well as by count (a segment of small records holds
    millions); the segment used last always stays, and answers stay right."""
    import cdp.journal.reader as reader

    monkeypatch.setattr(reader, "INDEX_CACHE_BYTES", 16 * 40)  # about two segments' worth
    fs = CrashSimFS()
    clock = ManualClock(T0)
    j = mk(fs, clock, segment_bytes=4096)
    times = []
    for i in range(400):
        clock.advance(1000)
        seq, _ = j.append_write(i, rnd(i, 64))
        times.append(j.time_of_seq(seq))
    j.close()
    j = mk(fs, clock, segment_bytes=4096)
    assert len(j.segments()) > 8

    def held() -> int:
        return sum(16 * len(s.offs) for s in j._loaded.values()
                   if s.state == reader.SEALED and s.offs is not None)

    for s in range(1, len(times) + 1):
        assert j.time_of_seq(s) == times[s - 1]
        sealed = [g for g in j._loaded.values() if g.state == reader.SEALED]
        assert held() <= reader.INDEX_CACHE_BYTES or len(sealed) == 1
    assert j.seq_at_time(times[10]) == 11
    j.close()


def test_read_slice_into_agrees_with_read_slice() -> None:
    """The one-pass readers' buffer path (``read_slice_into``: stored raw granules read
    into the caller's buffer, checked by composed CRCs) gives read_slice's bytes or
    declines, over records of every form (raw and lz4 chunks, one-block, a short last
    granule, buffered and synced); a damaged granule makes it decline for the slices
    that touch it, and read_slice then raises the error it always raised."""
    from cdp.journal.format import SPAN_COMPOSE_MIN

    rng = random.Random(23)
    fs = CrashSimFS()
    j = mk(fs)
    recs: dict[tuple[int, int], bytes] = {}
    for i, n in enumerate((4096, 5000, CH, 3 * CH + 4096 * 3 + 17, 1 << 20, (1 << 20) - 100,
                           40 * CH)):
        # chunk by chunk random (stored raw) or zeroes (lz4)
        d = b"".join(rng.randbytes(CH) if n <= CH or rng.random() < 0.7 else bytes(CH)
                     for _ in range(n // CH + 1))[:n]
        recs[j.append_write(i << 22, d)] = d
    for i, d in enumerate((bytes(8000), b"ab" * 3000)):  # one-block records stored lz4
        recs[j.append_write((i + 20) << 22, d)] = d

    def probe(j: Journal, must_serve: bool) -> int:
        served = 0
        for (seq, loc), d in recs.items():
            n = len(d)
            spans = [(0, n), (0, min(n, 4096)), (CH, min(n, 4 * CH) - CH)]
            for _ in range(30):
                a = rng.randrange(0, n)
                if rng.random() < 0.7:
                    a &= -4096
                b = rng.choice((n, min(n, a + rng.randrange(1, 70) * 4096), rng.randrange(a, n) + 1))
                spans.append((a, b - a))
            for poff, ln in spans:
                if ln <= 0:
                    continue
                out = memoryview(bytearray(ln))
                if j.read_slice_into(seq, loc, poff, out):
                    assert_bytes_equal(bytes(out), d[poff : poff + ln])
                    served += 1
                else:
                    assert_bytes_equal(j.read_slice(seq, loc, poff, ln), d[poff : poff + ln])
        if must_serve:
            assert served > 50
        return served

    probe(j, False)  # records still buffered: may decline, never wrong
    j.sync()
    probe(j, True)
    (s1, l1), d1 = next((k, v) for k, v in recs.items() if len(v) == 5000)  # one-block, raw
    out = memoryview(bytearray(5000))
    assert j.read_slice_into(s1, l1, 0, out) and bytes(out) == d1
    out = memoryview(bytearray(100))
    assert j.read_slice_into(s1, l1, 4000, out) and bytes(out) == d1[4000:4100]
    j.append_write(0, b"tail")  # the damaged record is not the tail (recovery keeps it)
    j.close()
    (seq, loc), d = max(recs.items(), key=lambda kv: len(kv[1]))
    raw_chunks = [c for c in range(len(d) // CH) if d[c * CH : (c + 1) * CH] != bytes(CH)]
    c = raw_chunks[len(raw_chunks) // 2]
    fs.raw(seg_path(1))[_chunk_pos(fs, loc, c) + 3 * 4096 + 11] ^= 0x04
    fs.raw(seg_path(1))[l1 + RECORD_HEADER_SIZE + 4500] ^= 0x10  # the one-block record
    j = mk(fs)
    for poff, ln in ((0, 5000), (4000, 100), (0, 10)):
        assert not j.read_slice_into(s1, l1, poff, memoryview(bytearray(ln)))
        with pytest.raises(Corruption, match=f"seq {s1}"):
            j.read_slice(s1, l1, poff, ln)
    for poff, ln in ((0, len(d) & -4096), (c * CH, CH), ((c - 1) * CH, 2 * CH),
                     (c * CH + 3 * 4096, 4096)):
        assert ln // 4096 >= 1
        out = memoryview(bytearray(ln))
        assert not j.read_slice_into(seq, loc, poff, out)
        with pytest.raises(Corruption, match=f"chunk {c}"):
            j.read_slice(seq, loc, poff, ln)
    # a long span of raw chunks away from the damage: still served, checked by composition
    ln = SPAN_COMPOSE_MIN * 4096
    far = next(k * CH for k in range(len(d) // CH - ln // CH)
               if abs(k - c) > ln // CH and d[k * CH : k * CH + ln].count(0) < ln // 2
               and all(d[m * CH : (m + 1) * CH] != bytes(CH) for m in range(k, k + ln // CH)))
    out = memoryview(bytearray(ln))
    assert j.read_slice_into(seq, loc, far, out)
    assert_bytes_equal(bytes(out), d[far : far + ln])
    j.close()
