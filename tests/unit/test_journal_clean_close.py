"""A clean close leaves the open segment's index and CRC (``.closed``, docs/FORMATS.md
"Clean close"); the next open takes the segment from it without a scan only when the
file is byte for byte what it describes, and removes it. Anything else (garbage
appended, bytes cut off or changed, a crash after a reopen, a sidecar left by an older
version or of a segment no longer last) is scanned as before and found as before."""

from __future__ import annotations

import random

import pytest

import cdp.journal.recovery as recovery
from cdp.journal import CrashSimFS, Journal, ManualClock, verify_journal
from cdp.journal.format import closed_name, index_name, segment_name
from cdp.journal.segment import SegmentScan, clean_tail, scan_segment

T0 = 1_700_000_000_000_000_000
D = "/store/vol0/journal"


def rnd(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def mk(fs: CrashSimFS, **kw: object) -> Journal:
    return Journal.open(D, fs=fs, clock=ManualClock(T0, tick=1), **kw)  # type: ignore[arg-type]


@pytest.fixture
def scanned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first seqs of the segments recovery scans (record by record)."""
    out: list[int] = []
    real = recovery.scan_segment

    def scan(fs: object, d: str, first: int, deep: bool = False) -> SegmentScan:
        out.append(first)
        return real(fs, d, first, deep)  # type: ignore[arg-type]

    monkeypatch.setattr(recovery, "scan_segment", scan)
    return out


def closed_journal(n: int = 12, **kw: object) -> tuple[CrashSimFS, list[tuple[int, int]]]:
    """A journal of *n* records (random sizes, some compressible, a marker) closed
    cleanly; returns the file system and the (seq, loc) of each WRITE."""
    fs = CrashSimFS()
    j = mk(fs, **kw)
    locs = []
    for i in range(n):
        locs.append(j.append_write(i * 4096, rnd(i, 64 + 97 * i) if i % 3 else bytes(3000)))
        if i == 4:
            j.append_marker(1, "m")
    j.close()
    return fs, locs


def check_reads(j: Journal, locs: list[tuple[int, int]]) -> None:
    for i, (seq, loc) in enumerate(locs):
        assert j.read_payload(seq, loc) == (rnd(i, 64 + 97 * i) if i % 3 else bytes(3000))


def test_clean_close_reopens_from_its_sidecar_exactly_as_a_scan_would(
        scanned: list[int]) -> None:
    fs, locs = closed_journal()
    last = segment_name(1)
    assert fs.exists(f"{D}/{closed_name(1)}")
    trusted = clean_tail(fs, D, 1)
    scan = scan_segment(fs, D, 1)
    assert trusted is not None
    for f in ("count", "raw_bytes", "valid_end", "last_ts", "flags", "size", "torn_at"):
        assert getattr(trusted, f) == getattr(scan, f), f
    assert list(trusted.ts) == list(scan.ts) and list(trusted.offs) == list(scan.offs)
    scanned.clear()
    j = mk(fs)
    assert scanned == [] and j.recovery.ok and j.recovery.dropped_bytes == 0
    assert j.last_seq == 13 and j.durable_seq == 13
    assert not fs.exists(f"{D}/{closed_name(1)}")  # consumed by the open
    check_reads(j, locs)
    assert j.time_of_seq(13) == T0 + 12 and j.seq_at_time(T0 + 5) == 6
    assert [i.records for i in j.segments()] == [13] and j.segments()[0].name == last
    seq, loc = j.append_write(0, b"after")
    j.close()
    j = mk(fs)
    assert scanned == [] and j.read_payload(seq, loc) == b"after" and j.last_seq == 14
    j.close()
    assert verify_journal(D, fs=fs).ok


def test_garbage_appended_after_a_clean_close_is_scanned_and_cut_off(
        scanned: list[int]) -> None:
    fs, locs = closed_journal()
    size = len(fs.raw(f"{D}/{segment_name(1)}"))
    fs.raw(f"{D}/{segment_name(1)}").extend(b"\xde\xad\xbe\xef" * 100)
    assert any(closed_name(1) in n for n in verify_journal(D, fs=fs).notes)
    j = mk(fs)
    assert scanned == [1]
    assert j.last_seq == 13 and j.recovery.ok and j.recovery.dropped_bytes == 400
    assert j.recovery.truncated_at == size
    check_reads(j, locs)
    seq, loc = j.append_write(1, b"next")
    assert loc == size
    j.close()
    j = mk(fs)
    assert j.read_payload(seq, loc) == b"next"
    j.close()


@pytest.mark.parametrize("where", ["header", "middle", "last", "cut"])
def test_bytes_changed_after_a_clean_close_are_found_as_a_scan_finds_them(
        where: str, scanned: list[int]) -> None:
    fs, locs = closed_journal()
    data = fs.raw(f"{D}/{segment_name(1)}")
    if where == "header":
        data[20] ^= 1
    elif where == "middle":  # damage inside the durable part: reported, not cut
        data[locs[5][1] + 60] ^= 1
    elif where == "last":  # the very last record: indistinguishable from a torn write
        data[locs[-1][1] + 60] ^= 1
    else:
        del data[-7:]
    j = mk(fs)
    assert scanned == [1]
    if where == "middle":
        assert [(p.segment, p.offset, p.seq) for p in j.recovery.problems] == [
            (segment_name(1), locs[5][1], locs[5][0])]
        assert j.last_seq == 13
    elif where == "header":
        assert not j.recovery.ok
    else:
        assert j.recovery.ok and j.recovery.dropped_records == 1 and j.last_seq == 12
    j.close()
    if where in ("middle", "header"):  # damage is never indexed: the next open scans again
        assert not fs.exists(f"{D}/{closed_name(1)}")
        scanned.clear()
        j = mk(fs)
        assert scanned == [1] and not j.recovery.ok
        j.close()


def test_a_damaged_sidecar_is_scanned_past(scanned: list[int]) -> None:
    fs, _locs = closed_journal()
    fs.raw(f"{D}/{closed_name(1)}")[70] ^= 1  # an entry
    j = mk(fs)
    assert scanned == [1] and j.recovery.ok and j.last_seq == 13
    assert not fs.exists(f"{D}/{closed_name(1)}")
    j.close()


async def test_a_crash_after_a_clean_reopen_scans_and_keeps_what_was_committed(
        scanned: list[int]) -> None:
    fs, locs = closed_journal()
    j = mk(fs)
    more = [j.append_write(i, rnd(100 + i, 500)) for i in range(5)]
    await j.commit()
    j.append_write(9, b"never committed")
    fs.crash(torn=True)
    j = mk(fs)
    assert scanned == [1] and j.recovery.ok
    assert j.last_seq in (18, 19)  # the uncommitted one may or may not have reached the disk
    check_reads(j, locs)
    for i, (seq, loc) in enumerate(more):
        assert j.read_payload(seq, loc) == rnd(100 + i, 500)
    j.close()
    assert verify_journal(D, fs=fs).ok


def test_a_sidecar_an_older_version_left_behind_is_not_trusted(scanned: list[int]) -> None:
    """An older cdp neither reads nor removes ``.closed``: after it appended to the
    segment, the sidecar of the close before describes a shorter file."""
    fs, _locs = closed_journal()
    stale = bytes(fs.raw(f"{D}/{closed_name(1)}"))
    j = mk(fs)
    seq, loc = j.append_write(5, b"by the older version")
    j.close()
    fs.raw(f"{D}/{closed_name(1)}")[:] = stale
    scanned.clear()
    j = mk(fs)
    assert scanned == [1] and j.last_seq == seq and j.read_payload(seq, loc) == (
        b"by the older version")
    j.close()


def test_a_sidecar_of_a_segment_no_longer_last_is_removed_unread(scanned: list[int]) -> None:
    fs, _locs = closed_journal(segment_records=20)
    stale = bytes(fs.raw(f"{D}/{closed_name(1)}"))
    j = mk(fs, segment_records=20)
    for i in range(10):  # seals segment 1 at 20 records, opens segment 21
        j.append_write(i, rnd(i, 100))
    j.close()
    assert [s.first_seq for s in j.segments()] == [1, 21]
    fd = fs.open_append(f"{D}/{closed_name(1)}")
    fs.write(fd, stale)
    fs.fdatasync(fd)
    fs.close(fd)
    scanned.clear()
    j = mk(fs, segment_records=20)
    assert scanned == [] and j.recovery.ok and j.last_seq == 23
    assert not fs.exists(f"{D}/{closed_name(1)}") and fs.exists(f"{D}/{index_name(1)}")
    j.close()
    assert fs.exists(f"{D}/{closed_name(21)}") and not fs.exists(f"{D}/{closed_name(1)}")
