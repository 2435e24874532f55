"""Stored records for replication: ``read_stored`` / ``scan_stored`` give a record's
bytes as the journal holds them, ``append_stored`` appends them verbatim on another
journal (same seq, timestamp, bytes), checked as recovery checks records."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cdp.errors import Corruption, NotFound, PointError, UsageError
from cdp.journal import Journal, ManualClock, build_compacted, verify_journal
from cdp.journal.format import (
    CHUNK_SIZE,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    Compression,
    RecordKind,
    chunk_ok,
    covered_size,
    encode_data_record,
    encode_record,
    first_bad_chunk,
    parse_chunk_table,
)

T0 = 1_700_000_000_000_000_000


def _open(d: Path, seg: int = 256 << 10, clock: ManualClock | None = None) -> Journal:
    return Journal.open(d, segment_bytes=seg, clock=clock or ManualClock(T0, tick=1))


def _fill(j: Journal, rng: random.Random) -> dict[int, bytes]:
    """Every kind and payload form: raw, lz4, chunked (v3), direct-write sizes."""
    data: dict[int, bytes] = {}
    for i in range(40):
        n = rng.choice((5, 512, 4096, 70_000, 300_000))
        d = rng.randbytes(n) if i % 3 else bytes(n // 2) + rng.randbytes(n - n // 2)
        seq, _loc = j.append_write(i * 4096, d, init=(i == 1))
        data[seq] = d
        if i % 6 == 0:
            j.append_marker(i, f"m{i}")
        if i % 7 == 0:
            j.append_zero(0, 1 << 33)
        if i == 20:
            j.append_rewind(5)
            j.append_error(5, 0, 512, "primary failed")
    return data


def _ship(src: Journal, dst: Journal, from_seq: int = 1) -> int:
    n = 0
    for raw in src.scan_stored(from_seq):
        dst.append_stored(raw)
        n += 1
    return n


def _segment_files(d: Path) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if n.endswith(".seg")}


def test_shipped_journal_is_byte_identical(tmp_path: Path) -> None:
    src = _open(tmp_path / "a")
    data = _fill(src, random.Random(1))
    dst = _open(tmp_path / "b", clock=ManualClock(T0 - 10**9, tick=1))
    assert _ship(src, dst) == src.last_seq
    assert dst.last_seq == src.last_seq and len(src.segments()) > 2
    for seq in range(1, src.last_seq + 1):
        assert dst.read_stored(seq) == src.read_stored(seq)
        assert dst.time_of_seq(seq) == src.time_of_seq(seq)
    for a, b in zip(src.scan(), dst.scan(), strict=True):
        assert (a.seq, a.timestamp_ns, a.kind, a.payload) == (b.seq, b.timestamp_ns, b.kind, b.payload)
    for seq, d in data.items():
        assert dst.read_slice(seq, _loc_of(dst, seq), 0, len(d)) == d
    last = src.last_seq
    src.sync()
    dst.sync()
    # the same records in the same order make the same segment files
    assert _segment_files(tmp_path / "a") == _segment_files(tmp_path / "b")
    dst.close()
    src.close()
    assert verify_journal(str(tmp_path / "b")).ok
    again = _open(tmp_path / "b")
    assert again.recovery.ok and again.last_seq == last
    again.close()


def _loc_of(j: Journal, seq: int) -> int:
    for r in j.scan(seq):
        return r.loc
    raise AssertionError(seq)


def test_read_stored_of_buffered_and_synced_records(tmp_path: Path) -> None:
    j = _open(tmp_path / "a")
    s1, _ = j.append_write(0, b"hello")
    assert j.read_stored(s1)[RECORD_HEADER_SIZE:] == b"hello"  # still in the buffer
    j.sync()
    raw = j.read_stored(s1)
    assert raw == encode_record(int(RecordKind.WRITE), 1, T0, 0, 5, b"hello")
    with pytest.raises(NotFound):
        j.read_stored(2)
    assert list(j.scan_stored(1)) == [raw]


def test_compacted_source_ships_elided_records(tmp_path: Path) -> None:
    src = _open(tmp_path / "a", seg=64 << 10)
    rng = random.Random(2)
    locs: dict[int, tuple[int, bytes]] = {}
    for i in range(30):
        d = rng.randbytes(rng.choice((4096, 200_000)))
        seq, loc = src.append_write(i * 4096, d)
        locs[seq] = (loc, d)
        if i % 10 == 0:
            src.append_marker(i, f"m{i}")
    src.sync()
    sealed = [s for s in src.segments() if s.sealed]
    first = sealed[0].first_seq
    seg_seqs = [s for s in locs if sealed[0].first_seq <= s <= sealed[0].last_seq]
    big = [s for s in seg_seqs if len(locs[s][1]) > 65536]
    # keep one chunk of the first big record, drop every other data record of the segment
    live = {big[0]: [(0, 4096)]} if big else {}
    prep = build_compacted(src.compact_source(first), live)
    assert src.compact_commit(prep)
    assert any(s.compacted for s in src.segments())
    dst = _open(tmp_path / "b")
    _ship(src, dst)
    assert dst.last_seq == src.last_seq
    elided = 0
    for a, b in zip(src.scan(), dst.scan(), strict=True):
        assert (a.seq, a.timestamp_ns, a.kind, a.elided, a.compression) == (
            b.seq, b.timestamp_ns, b.kind, b.elided, b.compression)
        elided += a.elided
        if a.elided and a.compression == Compression.ELIDED:
            with pytest.raises(PointError):
                dst.read_payload(b.seq, b.loc)
    assert elided >= 1
    if big:
        loc = _loc_of(dst, big[0])
        assert dst.read_slice(big[0], loc, 0, 4096) == locs[big[0]][1][:4096]
    dst.close()
    assert verify_journal(str(tmp_path / "b")).ok


def test_seq_gap_duplicate_and_older_time_refused(tmp_path: Path) -> None:
    src = _open(tmp_path / "a")
    for i in range(4):
        src.append_write(i * 512, b"x" * 512)
    recs = list(src.scan_stored())
    dst = _open(tmp_path / "b")
    with pytest.raises(UsageError, match="does not follow"):
        dst.append_stored(recs[1])  # seq 2 into an empty journal: a gap
    dst.append_stored(recs[0])
    with pytest.raises(UsageError, match="does not follow"):
        dst.append_stored(recs[0])  # again
    with pytest.raises(UsageError, match="does not follow"):
        dst.append_stored(recs[2])  # skips seq 2
    assert dst.last_seq == 1
    older = encode_record(int(RecordKind.WRITE), 2, T0 - 5, 0, 3, b"abc")
    with pytest.raises(UsageError, match="older"):
        dst.append_stored(older)
    for r in recs[1:]:
        dst.append_stored(r)
    assert dst.last_seq == 4


def test_damaged_records_refused_and_reported(tmp_path: Path) -> None:
    src = _open(tmp_path / "a")
    src.append_write(0, random.Random(3).randbytes(100_000))
    raw = src.read_stored(1)
    dst = _open(tmp_path / "b")
    for pos in (4, 20, RECORD_HEADER_SIZE + 2, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x40
        with pytest.raises(Corruption):
            dst.append_stored(bytes(bad))
    with pytest.raises(Corruption, match="after the record"):
        dst.append_stored(raw + b"\0")
    with pytest.raises(Corruption):
        dst.append_stored(raw[:-1])
    with pytest.raises(Corruption):
        dst.append_stored(b"junk")
    bad_marker = encode_record(int(RecordKind.MARKER), 1, T0, 0, 0, b"\1" * 8 + b"\5\0ab")
    with pytest.raises(Corruption, match="MARKER"):
        dst.append_stored(bad_marker)
    assert dst.last_seq == 0
    dst.append_stored(raw)
    assert dst.read_stored(1) == raw
    # damage on disk is reported by read_stored, not shipped (a record follows it, so
    # recovery keeps it as damage instead of cutting a torn tail)
    src.append_write(0, b"after")
    src.sync()
    src.close()
    seg = next(p for p in sorted((tmp_path / "a").iterdir()) if p.suffix == ".seg")
    b = bytearray(seg.read_bytes())
    b[32 + RECORD_HEADER_SIZE + 500] ^= 1
    seg.write_bytes(bytes(b))
    j = _open(tmp_path / "a")
    with pytest.raises(Corruption):
        j.read_stored(1)
    with pytest.raises(Corruption):
        list(j.scan_stored(1))


def test_read_stored_for_shipping_leaves_chunk_crcs_to_the_receiver(tmp_path: Path) -> None:
    """``read_stored(seq, chunks=False)`` gives the same bytes; damage inside a chunk is
    not its to find (the receiving ``append_stored`` refuses the record), damage to the
    header or tables still is."""
    src = _open(tmp_path / "a")
    data = _fill(src, random.Random(5))
    for seq in range(1, src.last_seq + 1):
        assert src.read_stored(seq, chunks=False) == src.read_stored(seq)
    big = max(data, key=lambda s: len(data[s]))
    src.append_write(0, b"after")
    src.sync()
    raw = src.read_stored(big)
    src.close()
    seg = next(p for p in sorted((tmp_path / "a").iterdir())
               if p.suffix == ".seg" and raw in p.read_bytes())
    b = bytearray(seg.read_bytes())
    at = b.find(raw)
    b[at + len(raw) - 100] ^= 1  # inside the last chunk
    seg.write_bytes(bytes(b))
    j = _open(tmp_path / "a")
    with pytest.raises(Corruption):
        j.read_stored(big)
    shipped = j.read_stored(big, chunks=False)
    assert shipped != raw and len(shipped) == len(raw)
    dst = _open(tmp_path / "b")
    for seq in range(1, big):
        dst.append_stored(j.read_stored(seq))
    with pytest.raises(Corruption, match="bad checksum in chunk"):
        dst.append_stored(shipped)
    assert dst.last_seq == big - 1
    b[at + 20] ^= 1  # the header: still found when shipping
    seg.write_bytes(bytes(b))
    j.close()
    j = _open(tmp_path / "a")
    with pytest.raises(Corruption):
        j.read_stored(big, chunks=False)


@pytest.mark.parametrize("n", [CHUNK_SIZE * 16, CHUNK_SIZE * 3 + 5000, CHUNK_SIZE + 1, 200_000])
def test_chunk_check_finds_the_first_damaged_chunk(n: int) -> None:
    """:func:`first_bad_chunk` (granule CRCs composed per chunk) agrees with the
    per-granule :func:`chunk_ok` on intact and damaged records of every chunk form."""
    rng = random.Random(n)
    half = bytes(n // 3) + rng.randbytes(n - n // 3)  # lz4 chunks, then raw ones
    for data in (rng.randbytes(n), half):
        rec = encode_data_record(int(RecordKind.WRITE), 1, T0, 0, data)
        v, slen = rec[8], RECORD_HEADER.unpack_from(rec)[6]
        stored = memoryview(rec)[RECORD_HEADER_SIZE:]
        table = parse_chunk_table(stored[:covered_size(Compression.CHUNKED, n, slen, v)], n,
                                  slen, v)
        assert not isinstance(table, str)
        assert first_bad_chunk(stored, table) is None
        for _ in range(40):
            bad = bytearray(stored)
            pos = rng.randrange(table.starts[0], len(bad))
            bad[pos] ^= 1 << rng.randrange(8)
            mv = memoryview(bytes(bad))
            want = next(i for i in range(table.count)
                        if not chunk_ok(mv[table.starts[i]:table.starts[i + 1]], table, i))
            assert first_bad_chunk(mv, table) == want


def test_append_stored_takes_views_of_large_records(tmp_path: Path) -> None:
    """The replica's records are views of the frame they came in: a large data record
    given as a view (of a bytearray, as the target's reused frame buffer) is appended
    byte for byte as from ``bytes``, checked the same (damage refused, nothing
    appended), and the buffer may take other bytes once the call returned."""
    src = _open(tmp_path / "a")
    rng = random.Random(7)
    for n in (300_000, 5, 1 << 20, 70_000):  # direct-write sizes, and small ones
        src.append_write(0, rng.randbytes(n))
    src.append_marker(1, "m")
    raws = [src.read_stored(s) for s in range(1, src.last_seq + 1)]
    dst = _open(tmp_path / "b")
    buf = bytearray(max(map(len, raws)) + 7)
    for i, raw in enumerate(raws):
        if i == 2:  # damage in the view: refused as from bytes, nothing appended
            bad = bytearray(raw)
            bad[len(raw) // 2] ^= 1
            buf[3 : 3 + len(raw)] = bad
            with pytest.raises(Corruption):
                dst.append_stored(memoryview(buf)[3 : 3 + len(raw)])
            assert dst.last_seq == i
        buf[3 : 3 + len(raw)] = raw
        dst.append_stored(memoryview(buf)[3 : 3 + len(raw)])
        buf[:] = bytes(len(buf))  # the caller reuses its buffer
    for s, raw in enumerate(raws, 1):
        assert dst.read_stored(s) == raw
    dst.close()
    src.close()
    assert verify_journal(str(tmp_path / "b")).ok
