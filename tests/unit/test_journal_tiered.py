"""Dropped (tiered) segments: drop_segment, tiered.json, the read cache, NotLocal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cdp.errors import Corruption, UsageError
from cdp.journal import Journal, NotLocal
from cdp.journal.tiered import TIERED_NAME, decode_tiered, encode_tiered


def _filled(path: Path, n: int = 40) -> tuple[Journal, list[tuple[int, int, bytes]]]:
    j = Journal.open(path, segment_bytes=4096)
    recs = []
    for i in range(n):
        data = os.urandom(700) if i % 2 else bytes([i]) * 512
        seq, loc = j.append_write(i * 4096, data)
        recs.append((seq, loc, data))
    j.sync()
    return j, recs


def _fetch_from(copy: dict[int, bytes], j: Journal, exc: NotLocal) -> None:
    for first, off, n in exc.ranges:
        j.cache_put(first, off, copy[first][off : off + n])


def test_tiered_json_golden() -> None:
    assert encode_tiered({5: 4000, 1: 4090}) == (
        b'{"format":1,"segments":[{"first_seq":1,"size":4090},{"first_seq":5,"size":4000}]}\n')
    assert decode_tiered(encode_tiered({7: 100}), "x") == {7: 100}
    with pytest.raises(Corruption):
        decode_tiered(b'{"format":2,"segments":[]}', "x")


def test_drop_read_through_cache_and_reopen(tmp_path: Path) -> None:
    j, recs = _filled(tmp_path)
    sealed = [s for s in j.segments() if s.sealed]
    assert len(sealed) >= 3
    copy: dict[int, bytes] = {}
    before = j.local_bytes()
    for s in sealed[:2]:
        copy[s.first_seq] = (tmp_path / s.name).read_bytes()
        assert j.drop_segment(s.first_seq) == s.bytes
        assert not (tmp_path / s.name).exists()
    assert j.local_bytes() == before - sum(s.bytes for s in sealed[:2])
    assert j.dropped_segments() == [s.first_seq for s in sealed[:2]]
    assert [s.local for s in j.segments()][:3] == [False, False, True]
    assert (tmp_path / TIERED_NAME).exists()
    seq, loc, data = recs[0]
    with pytest.raises(NotLocal) as ei:
        j.read_payload(seq, loc)
    assert ei.value.ranges[0][:2] == (sealed[0].first_seq, loc)
    _fetch_from(copy, j, ei.value)
    assert j.read_payload(seq, loc) == data
    assert j.cache_stats()[0] >= 1
    # a scan of a dropped segment needs its records too
    with pytest.raises(NotLocal):
        list(j.scan_stored(1))
    j.close()
    j = Journal.open(tmp_path, segment_bytes=4096)
    assert j.dropped_segments() == [s.first_seq for s in sealed[:2]]
    assert j.read_payload(seq, loc) == data  # the cache survives a reopen
    for seq, loc, data in recs:
        for _ in range(3):
            try:
                assert j.read_payload(seq, loc) == data
                break
            except NotLocal as exc:
                _fetch_from(copy, j, exc)
        else:
            raise AssertionError(f"seq {seq} never became readable")
    assert j.time_of_seq(recs[0][0]) > 0
    assert j.stats().records == len(recs)
    j.close()


def test_tampered_bytes_are_corruption(tmp_path: Path) -> None:
    j, recs = _filled(tmp_path)
    s = next(s for s in j.segments() if s.sealed)
    copy = bytearray((tmp_path / s.name).read_bytes())
    j.drop_segment(s.first_seq)
    seq, loc, _data = recs[1]
    with pytest.raises(NotLocal) as ei:
        j.read_payload(seq, loc)
    for first, off, n in ei.value.ranges:
        blob = bytearray(copy[off : off + n])
        blob[-5] ^= 0xFF
        j.cache_put(first, off, bytes(blob))
    with pytest.raises(Corruption):
        j.read_payload(seq, loc)
    j.close()


def test_cache_is_bounded(tmp_path: Path) -> None:
    j, recs = _filled(tmp_path)
    j.set_cache_bytes(2000)
    segs = [s for s in j.segments() if s.sealed]
    copy = {s.first_seq: (tmp_path / s.name).read_bytes() for s in segs}
    for s in segs:
        j.drop_segment(s.first_seq)
    for seq, loc, data in recs[: len(recs) // 2]:
        try:
            j.read_payload(seq, loc)
        except NotLocal as exc:
            _fetch_from(copy, j, exc)
        assert j.read_payload(seq, loc) == data
        assert j.cache_stats()[2] <= 2000
    assert sum(f.stat().st_size for f in (tmp_path / "cache").iterdir()) <= 2000
    j.close()


def test_drop_refuses_open_segment_and_compaction_skips(tmp_path: Path) -> None:
    j, _recs = _filled(tmp_path)
    with pytest.raises(UsageError):
        j.drop_segment(j.segments()[-1].first_seq)
    s = next(s for s in j.segments() if s.sealed)
    j.drop_segment(s.first_seq)
    assert j.compact_segment(s.first_seq, {}) is None
    assert not (tmp_path / s.name).exists()
    j.close()


def test_verify_counts_dropped_segments(tmp_path: Path) -> None:
    from cdp.journal import verify_journal

    j, recs = _filled(tmp_path)
    for s in [s for s in j.segments() if s.sealed][:2]:
        j.drop_segment(s.first_seq)
    j.close()
    rep = verify_journal(tmp_path)
    assert rep.ok, rep.problems
    assert rep.records == len(recs) and rep.first_seq == 1
    assert any("tiered" in n for n in rep.notes)
    (tmp_path / "00000000000000000001.idx").unlink()
    assert not verify_journal(tmp_path).ok


def test_leftover_file_of_a_listed_segment_is_removed_at_open(tmp_path: Path) -> None:
    j, recs = _filled(tmp_path)
    s = next(s for s in j.segments() if s.sealed)
    copy = (tmp_path / s.name).read_bytes()
    j.drop_segment(s.first_seq)
    j.close()
    (tmp_path / s.name).write_bytes(copy)  # as if cdpd crashed before the unlink
    j = Journal.open(tmp_path, segment_bytes=4096)
    assert not (tmp_path / s.name).exists()
    assert j.dropped_segments() == [s.first_seq]
    with pytest.raises(NotLocal):
        j.read_payload(recs[0][0], recs[0][1])
    j.close()


def test_drop_segments_off_the_loop_and_fetch_retry(tmp_path: Path) -> None:
    import asyncio

    from cdp.journal.tiered import fetch_retry, missing_records, readahead

    j, recs = _filled(tmp_path)
    sealed = [s for s in j.segments() if s.sealed]
    copy = {s.first_seq: (tmp_path / s.name).read_bytes() for s in sealed}
    calls: list[list[tuple[int, int, int]]] = []

    async def remote(ranges: list[tuple[int, int, int]]) -> None:
        calls.append(list(ranges))
        for first, off, n in ranges:
            j.cache_put(first, off, copy[first][off : off + n])

    async def go() -> None:
        freed = await j.drop_segments([s.first_seq for s in sealed[:-1]] + [sealed[0].first_seq])
        assert freed == sum(s.bytes for s in sealed[:-1])
        assert await j.drop_segments([sealed[0].first_seq]) == 0  # already dropped
        assert not any((tmp_path / s.name).exists() for s in sealed[:-1])
        # without a fetcher: NotLocal as before; with one, a plan fetches in one round
        seq, loc, data = recs[0]
        with pytest.raises(NotLocal):
            await fetch_retry(j, lambda: j.read_payload(seq, loc))
        j.remote = remote
        want = missing_records(j, [(s, lc) for s, lc, _d in recs], 1 << 20)
        assert len(want) > 3 and len({(f, o) for f, o, _n in want}) == len(want)

        def plan(missed: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
            return missed + missing_records(j, [(s, lc) for s, lc, _d in recs], 1 << 20)

        assert await fetch_retry(j, lambda: j.read_payload(seq, loc), plan) == data
        assert len(calls) == 1
        for s, lc, d in recs:  # the plan brought every record: no more fetches
            assert j.read_payload(s, lc) == d
        assert len(calls) == 1
        assert missing_records(j, [(s, lc) for s, lc, _d in recs], 1 << 20) == []
        # readahead: the record missed and those after it in its segment, bounded
        ahead = readahead(j, [(sealed[0].first_seq, 0, 32)], 10 << 10)
        assert ahead[0] == (sealed[0].first_seq, 0, 32)

    asyncio.run(go())
    j.close()
    j = Journal.open(tmp_path, segment_bytes=4096)
    assert j.dropped_segments() == [s.first_seq for s in sealed[:-1]]
    j.close()


def test_persist_never_writes_an_older_listing(tmp_path: Path) -> None:
    j, _recs = _filled(tmp_path)
    sealed = [s for s in j.segments() if s.sealed]
    j.drop_segment(sealed[0].first_seq)
    from cdp.journal.tiered import TieredFS, read_tiered

    fs = j._fs
    assert isinstance(fs, TieredFS)
    old = fs.snapshot()
    fs.switch(sealed[1].first_seq, sealed[1].bytes)
    new = fs.snapshot()
    fs.persist(*new, [])
    fs.persist(*old, [])  # a slower, older writer: ignored
    assert read_tiered(fs.base, str(tmp_path)) == new[1]
    j.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _dropped_one(tmp_path: Path) -> tuple[Journal, bytes, tuple[int, int, bytes], Any]:
    """A journal whose first sealed segment is dropped; its bytes; its second record
    (random, so a flipped byte fails its CRC); the TieredFS."""
    from cdp.journal.tiered import TieredFS

    j, recs = _filled(tmp_path)
    s = next(s for s in j.segments() if s.sealed)
    copy = (tmp_path / s.name).read_bytes()
    j.drop_segment(s.first_seq)
    fs = j._fs
    assert isinstance(fs, TieredFS)
    rec = recs[1]
    return j, copy, rec, fs


def _record_range(j: Journal, seq: int, loc: int) -> tuple[int, int, int]:
    with pytest.raises(NotLocal) as ei:
        j.read_payload(seq, loc)
    return ei.value.ranges[0]


def test_evicted_then_refetched_record_reads_the_new_file(tmp_path: Path) -> None:
    # a descriptor kept for a cached record must not outlive its file: after the record
    # leaves the cache and its name is given other bytes, a read sees those
    j, copy, (seq, loc, data), fs = _dropped_one(tmp_path)
    first, off, n = _record_range(j, seq, loc)
    bad = bytearray(copy[off : off + n])
    bad[-5] ^= 0xFF
    j.cache_put(first, off, bytes(bad))
    with pytest.raises(Corruption):  # read (and its descriptor kept) from the bad copy
        j.read_payload(seq, loc)
    assert (first, off) in fs._fds
    j.set_cache_bytes(0)  # evicted: file unlinked, descriptor closed
    assert not fs._fds and not (tmp_path / "cache").joinpath(f"{first:020d}-{off:020d}").exists()
    j.set_cache_bytes(1 << 20)
    j.cache_put(first, off, copy[off : off + n])  # fetched again: the good bytes
    assert j.read_payload(seq, loc) == data
    j.close()


def test_a_name_rewritten_by_a_fetch_is_read_anew(tmp_path: Path) -> None:
    # a fetch renames a new file over a cached record's name (write_cache_files, then
    # cache_index on the loop): reads after that use the new file, not a kept descriptor
    from cdp.journal.tiered import write_cache_files

    j, copy, (seq, loc, data), fs = _dropped_one(tmp_path)
    first, off, n = _record_range(j, seq, loc)
    bad = bytearray(copy[off : off + n])
    bad[-5] ^= 0xFF
    fs.cache_index(write_cache_files(fs.base, str(tmp_path), [(first, off, n)], off, bytes(bad)))
    with pytest.raises(Corruption):
        j.read_payload(seq, loc)
    assert (first, off) in fs._fds
    fs.cache_index(write_cache_files(fs.base, str(tmp_path), [(first, off, n)], off,
                                     copy[off : off + n]))
    assert j.read_payload(seq, loc) == data
    j.close()


def test_cached_descriptors_are_bounded_and_closed(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import cdp.journal.tiered as tiered

    monkeypatch.setattr(tiered, "CACHE_FDS", 3)
    before, kept = _open_fds(), tiered._KEPT[0]
    j, recs = _filled(tmp_path)
    segs = [s for s in j.segments() if s.sealed]
    copy = {s.first_seq: (tmp_path / s.name).read_bytes() for s in segs}
    for s in segs:
        j.drop_segment(s.first_seq)
    fs = j._fs
    assert isinstance(fs, tiered.TieredFS)
    for _ in range(2):
        for seq, loc, data in recs[:12]:
            try:
                j.read_payload(seq, loc)
            except NotLocal as exc:
                _fetch_from(copy, j, exc)
            assert j.read_payload(seq, loc) == data
            assert len(fs._fds) <= 3
    assert len(fs._fds) == 3
    j.close()
    assert not fs._fds and tiered._KEPT[0] == kept
    assert _open_fds() == before


def test_pread_over_several_cached_records(tmp_path: Path) -> None:
    # a read spanning records: filled in place from each record's file, short at the
    # first record missing, NotLocal when the first one is
    j, copy, _rec, fs = _dropped_one(tmp_path)
    seg = next(s for s in j.segments() if s.sealed)
    first = seg.first_seq
    recs = fs.records(first, 32, len(copy))
    assert len(recs) >= 4
    vfd = fs.open_read(str(tmp_path / seg.name))
    a0, a2 = recs[1][1], recs[3][1]
    with pytest.raises(NotLocal):
        fs.pread(vfd, a2 - a0, a0 + 3)
    for _f, a, n in recs[1:3]:
        j.cache_put(first, a, copy[a : a + n])
    assert fs.pread(vfd, a2 - a0 + 100, a0 + 3) == copy[a0 + 3 : a2]  # short at recs[3]
    buf = bytearray(a2 - a0 - 3)
    assert fs.pread_into(vfd, buf, a0 + 3) == len(buf) and bytes(buf) == copy[a0 + 3 : a2]
    fs.close(vfd)
    j.close()


def test_cached_descriptors_share_a_process_budget(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import cdp.journal.tiered as tiered

    kept = tiered._KEPT[0]
    monkeypatch.setattr(tiered, "CACHE_FDS_TOTAL", kept + 4)
    js = []
    for k in range(2):
        j, recs = _filled(tmp_path / str(k))
        segs = [s for s in j.segments() if s.sealed]
        copy = {s.first_seq: (tmp_path / str(k) / s.name).read_bytes() for s in segs}
        for s in segs:
            j.drop_segment(s.first_seq)
        for seq, loc, data in recs[:10]:
            try:
                j.read_payload(seq, loc)
            except NotLocal as exc:
                _fetch_from(copy, j, exc)
            assert j.read_payload(seq, loc) == data
            assert tiered._KEPT[0] <= kept + 4 + 1
        js.append(j)
    held = [j._fs._fds for j in js if isinstance(j._fs, tiered.TieredFS)]
    assert len(held) == 2 and tiered._KEPT[0] - kept == sum(len(f) for f in held)
    for j in js:
        j.close()
    assert tiered._KEPT[0] == kept
