"""Golden bytes: the journal's on-disk format exactly as docs/FORMATS.md shows it."""

from __future__ import annotations

import os
import random

import pytest

from cdp.errors import Corruption
from cdp.journal import CrashSimFS, Journal, ManualClock, RecordKind, verify_journal
from cdp.journal.format import (
    CHUNK_SIZE,
    CHUNKED_VERSION,
    GRANULE_SIZE,
    RECORD_HEADER_SIZE,
    RECORD_VERSION,
    SEGMENT_HEADER_SIZE,
    Compression,
    check_segment_header,
    chunk_payload,
    decode_record,
    encode_data_record,
    encode_record,
    marker_payload,
    pack_segment_header,
    parse_segment_name,
    segment_name,
)
from tests.helpers import assert_bytes_equal

T0 = 1_700_000_000_000_000_000

# the worked example of FORMATS.md: WRITE seq 1 at volume offset 4096 of b"hello"
GOLDEN_WRITE = bytes.fromhex(
    "43445052" "9d9c6890"              # magic "CDPR", crc32c
    "02" "01" "00" "00" "05000000"      # version 2, kind WRITE, no compression, flags, stored 5
    "0100000000000000"                  # seq 1
    "00002a36fe9c9717"                  # timestamp 1700000000000000000 ns
    "0010000000000000"                  # offset 4096
    "0500000000000000"                  # length 5
    "68656c6c6f"                        # payload "hello"
)
GOLDEN_SEGMENT_HEADER = bytes.fromhex(
    "4344504a53454700" "0100" "2000" "00000000" "0100000000000000" "00000000" "df5e3077"
)
GOLDEN_MARKER = bytes.fromhex(
    "43445052" "fb3fd82a" "02" "03" "00" "00" "11000000"
    "0200000000000000" "01002a36fe9c9717" "0000000000000000" "0000000000000000"
    "0100000000000000" "0700" "6e696768746c79"
)
# FORMATS.md's chunked example: WRITE seq 3 at 1 MiB of 65536 zero bytes + b"!"
CHUNKED_DATA = bytes(CHUNK_SIZE) + b"!"
GOLDEN_CHUNKED = bytes.fromhex(
    "43445052" "29458e15"              # magic, crc32c of header bytes 8..47 + chunk table
    "02" "01" "02" "00" "24010000"      # version 2, WRITE, compression 2 CHUNKED, stored 292
    "0300000000000000"                  # seq 3
    "02002a36fe9c9717"                  # timestamp T0 + 2
    "0000100000000000"                  # offset 1 MiB
    "0100010000000000"                  # length 65537
    "0b010000" "01" "000000" "33d12f2c"  # chunk 0: stored 267, lz4, reserved, crc32c
    "01000000" "00" "000000" "8c5eab80"  # chunk 1: stored 1, none, reserved, crc32c
    "1f000100" + "ff" * 256 + "e750000000000000"[:14]  # chunk 0: lz4 block of 64 KiB zeros
    + "21"                              # chunk 1: "!"
)
# version 3 (written for chunked records since): the same record with a granule table
# after the chunk table; the raw chunk 1 has a CRC per 4 KiB granule instead of one
GOLDEN_CHUNKED_V3 = bytes.fromhex(
    "43445052" "99b5214b"              # magic, crc32c of header bytes 8..47 + both tables
    "03" "01" "02" "00" "a4010000"      # version 3, WRITE, compression 2 CHUNKED, stored 420
    "0300000000000000"                  # seq 3
    "02002a36fe9c9717"                  # timestamp T0 + 2
    "0000100000000000"                  # offset 1 MiB
    "0100010000000000"                  # length 65537
    "0b010000" "01" "000000" "33d12f2c"  # chunk 0: stored 267, lz4, reserved, crc32c
    "01000000" "00" "000000" "00000000"  # chunk 1: stored 1, none, reserved, crc 0 (raw)
    + "00" * 64                         # granule slots of chunk 0: compressed, all 0
    + "8c5eab80" + "00" * 60            # chunk 1: granule 0 = crc32c("!"), the rest 0
    + "1f000100" + "ff" * 256 + "e750000000000000"[:14]  # chunk 0: lz4 block
    + "21"                              # chunk 1: "!"
)
# version 1 (the first release's format; still read): the same two records
GOLDEN_WRITE_V1 = bytes.fromhex(
    "43445052" "4ef1d823" "01" "01" "00" "00" "05000000" "0100000000000000"
    "00002a36fe9c9717" "0010000000000000" "0500000000000000" "68656c6c6f"
)
GOLDEN_MARKER_V1 = bytes.fromhex(
    "43445052" "52b8a3a1" "01" "03" "00" "00" "11000000"
    "0200000000000000" "01002a36fe9c9717" "0000000000000000" "0000000000000000"
    "0100000000000000" "0700" "6e696768746c79"
)


def test_record_golden_bytes() -> None:
    assert RECORD_VERSION == 2
    assert encode_record(1, 1, T0, 4096, 5, b"hello") == GOLDEN_WRITE
    assert len(GOLDEN_WRITE) == RECORD_HEADER_SIZE + 5
    assert encode_record(1, 1, T0, 4096, 5, b"hello", version=1) == GOLDEN_WRITE_V1


def test_chunked_golden_bytes() -> None:
    """Version 2 chunked records (written before version 3) encode and decode as pinned."""
    assert len(GOLDEN_CHUNKED) == RECORD_HEADER_SIZE + 24 + 267 + 1 == 340
    got = encode_record(1, 3, T0 + 2, 1 << 20, len(CHUNKED_DATA),
                        chunk_payload(CHUNKED_DATA, version=2), Compression.CHUNKED, version=2)
    assert got == GOLDEN_CHUNKED
    rec = decode_record(GOLDEN_CHUNKED[:48], GOLDEN_CHUNKED[48:], 85, "x", 3)
    assert (rec.kind, rec.seq, rec.offset, rec.length, rec.compression, rec.stored_length) == (
        RecordKind.WRITE, 3, 1 << 20, CHUNK_SIZE + 1, Compression.CHUNKED, 292)
    assert_bytes_equal(rec.payload, CHUNKED_DATA)


def test_chunked_v3_golden_bytes() -> None:
    assert CHUNKED_VERSION == 3 and GRANULE_SIZE == 4096
    assert len(GOLDEN_CHUNKED_V3) == RECORD_HEADER_SIZE + 2 * (12 + 64) + 267 + 1 == 468
    got = encode_data_record(1, 3, T0 + 2, 1 << 20, CHUNKED_DATA)
    assert got == GOLDEN_CHUNKED_V3
    rec = decode_record(GOLDEN_CHUNKED_V3[:48], GOLDEN_CHUNKED_V3[48:], 85, "x", 3)
    assert (rec.kind, rec.seq, rec.offset, rec.length, rec.compression, rec.stored_length) == (
        RecordKind.WRITE, 3, 1 << 20, CHUNK_SIZE + 1, Compression.CHUNKED, 420)
    assert_bytes_equal(rec.payload, CHUNKED_DATA)


def test_v3_raw_chunk_granules_are_checked() -> None:
    """A flip in any 4 KiB granule of a raw chunk, or in the granule table, is damage."""
    data = os.urandom(2 * CHUNK_SIZE + 5000)  # three raw chunks, the last of 5000 bytes
    rec = encode_data_record(1, 1, T0, 0, data)
    head, stored = rec[:48], rec[48:]
    assert_bytes_equal(decode_record(head, stored, 32, "x", 1).payload, data)
    tsize = 3 * (12 + 64)
    for pos, why in ((tsize + CHUNK_SIZE + 4096 * 7 + 3, "chunk 1"),
                     (tsize + 2 * CHUNK_SIZE + 4097, "chunk 2"),
                     (3 * 12 + 64 + 4 * 5, r"x: bad checksum$")):
        bad = bytearray(stored)
        bad[pos] ^= 4
        with pytest.raises(Corruption, match=why):
            decode_record(head, bytes(bad), 32, "x", 1)


def test_marker_golden_bytes() -> None:
    got = encode_record(3, 2, T0 + 1, 0, 0, marker_payload(1, "nightly"))
    assert got == GOLDEN_MARKER
    got = encode_record(3, 2, T0 + 1, 0, 0, marker_payload(1, "nightly"), version=1)
    assert got == GOLDEN_MARKER_V1


def test_segment_header_golden_bytes() -> None:
    assert pack_segment_header(1) == GOLDEN_SEGMENT_HEADER
    assert len(GOLDEN_SEGMENT_HEADER) == SEGMENT_HEADER_SIZE
    assert check_segment_header(GOLDEN_SEGMENT_HEADER, 1) is None
    assert check_segment_header(GOLDEN_SEGMENT_HEADER, 2) is not None


def test_segment_names() -> None:
    assert segment_name(1) == "00000000000000000001.seg"
    assert parse_segment_name("00000000000000000001.seg") == 1
    assert parse_segment_name("00000000000000000001.idx") is None
    assert parse_segment_name("x.seg") is None


def test_writer_produces_golden_file() -> None:
    fs = CrashSimFS()
    j = Journal.open("/j", fs=fs, clock=ManualClock(T0, tick=1))
    assert j.append_write(4096, b"hello") == (1, SEGMENT_HEADER_SIZE)
    assert j.append_marker(1, "nightly") == (2, 85)
    assert j.append_write(1 << 20, CHUNKED_DATA) == (3, 85 + len(GOLDEN_MARKER))
    j.sync()
    assert bytes(fs.raw("/j/" + segment_name(1))) == (
        GOLDEN_SEGMENT_HEADER + GOLDEN_WRITE + GOLDEN_MARKER + GOLDEN_CHUNKED_V3)
    j.close()


# FORMATS.md's clean-close example: the .closed sidecar a clean close leaves beside the
# golden segment above (its three records, 618 bytes)
GOLDEN_CLOSED = bytes.fromhex(
    "4344504a434c5300" "0100" "0000"    # magic "CDPJCLS\0", version 1, flags 0
    "03000000" "0100000000000000"       # count 3, first_seq 1
    "6a02000000000000"                  # data_end 618 (the segment's size)
    "00002a36fe9c9717" "02002a36fe9c9717"  # first_ts T0, last_ts T0 + 2
    "1700010000000000"                  # raw_bytes 65559 (5 + 17 + 65537)
    "06e4aeb6" "c733f3b4"               # entries_crc, header_crc
    "00002a36fe9c9717" "01002a36fe9c9717" "02002a36fe9c9717"  # timestamps
    "2000000000000000" "5500000000000000" "9600000000000000"  # offsets 32, 85, 150
    "0585fb9a"                          # data_crc: CRC32C of the segment's 618 bytes
)


def test_clean_close_writes_the_golden_sidecar() -> None:
    from crc32c import crc32c

    from cdp.journal.format import closed_name
    from cdp.journal.segment import clean_tail

    fs = CrashSimFS()
    j = Journal.open("/j", fs=fs, clock=ManualClock(T0, tick=1))
    j.append_write(4096, b"hello")
    j.append_marker(1, "nightly")
    j.append_write(1 << 20, CHUNKED_DATA)
    j.close()
    seg = bytes(fs.raw("/j/" + segment_name(1)))
    assert len(seg) == 618 and crc32c(seg) == 0x9AFB8505
    assert bytes(fs.raw("/j/" + closed_name(1))) == GOLDEN_CLOSED
    tail = clean_tail(fs, "/j", 1)
    assert tail is not None and list(tail.offs) == [32, 85, 150] and tail.count == 3


def test_version_1_segment_is_read_and_appended_to() -> None:
    """A store written by version 1 (one-block payloads of any size, whole-payload CRC)
    opens, reads (whole and sliced), verifies, and continues with version 2 records."""
    import lz4.block

    big = bytes(i % 251 for i in range(200_000))
    packed = lz4.block.compress(big, store_size=False)
    big_v1 = encode_record(1, 3, T0 + 2, 0, len(big), packed, Compression.LZ4, version=1)
    fs = CrashSimFS()
    fs.makedirs("/j")
    fd = fs.open_append("/j/" + segment_name(1))
    fs.write(fd, GOLDEN_SEGMENT_HEADER + GOLDEN_WRITE_V1 + GOLDEN_MARKER_V1 + big_v1)
    fs.fdatasync(fd)
    fs.fsync_dir("/j")
    j = Journal.open("/j", fs=fs, clock=ManualClock(T0 + 10))
    assert j.recovery.ok and j.last_seq == 3
    assert j.read_payload(1, 32) == b"hello"
    assert j.read_record(2, 85).label == "nightly"
    loc3 = 85 + len(GOLDEN_MARKER_V1)
    assert_bytes_equal(j.read_payload(3, loc3), big)
    assert j.read_slice(3, loc3, 150_000, 4096) == big[150_000:154_096]
    assert j.read_slice(1, 32, 1, 3) == b"ell"
    seq, loc = j.append_write(0, big)
    assert j.read_record(seq, loc).compression == Compression.CHUNKED
    j.close()
    assert verify_journal("/j", fs=fs).ok
    j = Journal.open("/j", fs=fs)
    assert [r.payload for r in j.scan()][2:] == [big, big]
    j.close()


def test_version_2_chunked_records_are_read_sliced_and_verified() -> None:
    """A store written by version 2 (chunked records with one CRC per chunk) opens, reads
    whole and sliced (a damaged chunk fails only its slices), verifies, and continues
    with version 3 chunked records in the same segment."""
    data = os.urandom(3 * CHUNK_SIZE + 100)
    v2 = encode_record(1, 4, T0 + 3, 0, len(data), chunk_payload(data, version=2),
                       Compression.CHUNKED, version=2)
    assert v2[8] == 2
    fs = CrashSimFS()
    fs.makedirs("/j")
    fd = fs.open_append("/j/" + segment_name(1))
    fs.write(fd, GOLDEN_SEGMENT_HEADER + GOLDEN_WRITE + GOLDEN_MARKER + GOLDEN_CHUNKED + v2)
    fs.fdatasync(fd)
    fs.fsync_dir("/j")
    j = Journal.open("/j", fs=fs, clock=ManualClock(T0 + 10))
    assert j.recovery.ok and j.last_seq == 4
    loc3 = 85 + len(GOLDEN_MARKER)
    loc4 = loc3 + len(GOLDEN_CHUNKED)
    assert_bytes_equal(j.read_payload(3, loc3), CHUNKED_DATA)
    assert j.read_slice(3, loc3, CHUNK_SIZE - 2, 3) == b"\0\0!"
    for _ in range(2):  # table read, then remembered
        assert j.read_slice(4, loc4, CHUNK_SIZE + 4096, 4096) == data[CHUNK_SIZE + 4096 :][:4096]
    assert_bytes_equal(j.read_payload(4, loc4), data)
    seq, loc = j.append_write(1 << 20, data)
    assert j.read_record(seq, loc).compression == Compression.CHUNKED
    j.close()
    assert fs.raw("/j/" + segment_name(1))[loc + 8] == CHUNKED_VERSION
    assert verify_journal("/j", fs=fs).ok
    j = Journal.open("/j", fs=fs)
    assert [r.payload for r in j.scan()][2:] == [CHUNKED_DATA, data, data]
    j.close()
    # damage in chunk 2 of the version 2 record: only slices needing it fail
    fs.raw("/j/" + segment_name(1))[loc4 + 48 + 4 * 12 + 2 * CHUNK_SIZE + 9] ^= 1
    rep = verify_journal("/j", fs=fs)
    assert [(p.seq, p.reason) for p in rep.problems] == [(4, "bad checksum in chunk 2")]
    j = Journal.open("/j", fs=fs)
    assert j.read_slice(4, loc4, 4096, 4096) == data[4096:8192]
    with pytest.raises(Corruption, match="chunk 2"):
        j.read_slice(4, loc4, 2 * CHUNK_SIZE + 4096, 4096)
    j.close()


def test_decode_golden_and_reject_flips() -> None:
    rec = decode_record(GOLDEN_WRITE[:48], GOLDEN_WRITE[48:], 32, "x", 1)
    assert (rec.kind, rec.seq, rec.timestamp_ns, rec.offset, rec.payload) == (
        RecordKind.WRITE, 1, T0, 4096, b"hello")
    m = decode_record(GOLDEN_MARKER[:48], GOLDEN_MARKER[48:], 85, "x", 2)
    assert (m.marker_id, m.label) == (1, "nightly")
    for golden in (GOLDEN_WRITE, GOLDEN_WRITE_V1):
        for i in range(len(golden)):
            bad = bytearray(golden)
            bad[i] ^= 0x10
            with pytest.raises(Corruption):
                decode_record(bytes(bad[:48]), bytes(bad[48:53]), 32, "x", 1)


@pytest.mark.parametrize("golden, tables", [(GOLDEN_CHUNKED, 24), (GOLDEN_CHUNKED_V3, 152)])
def test_chunked_flips_are_caught_and_name_the_chunk(golden: bytes, tables: int) -> None:
    for i in range(len(golden)):
        bad = bytearray(golden)
        bad[i] ^= 0x01
        with pytest.raises(Corruption) as exc:
            decode_record(bytes(bad[:48]), bytes(bad[48:]), 85, "x", 3)
        if i >= 48 + tables + 267:
            assert str(exc.value) == "x: bad checksum in chunk 1"
        elif i >= 48 + tables:
            assert str(exc.value) == "x: bad checksum in chunk 0"
        else:  # header or chunk table: the record CRC
            assert "chunk" not in str(exc.value) or "table" in str(exc.value)


def test_granules_ok_agrees_with_one_crc_per_granule() -> None:
    """:func:`granules_ok` (composed per chunk for long spans) gives the verdict of one
    crc32c per granule, for spans starting anywhere in a chunk, ending in a short last
    granule or not, intact or with one bit flipped anywhere."""
    from array import array

    from crc32c import crc32c

    from cdp.journal.format import GRANULE_SIZE, GRANULES, SPAN_COMPOSE_MIN, granules_ok

    rng = random.Random(7)
    for trial in range(120):
        n = rng.randrange(1, 40 * 65536)
        data = rng.randbytes(n)
        gr = array("I", [0] * (((n + 65535) // 65536) * GRANULES))
        for g in range(0, n, GRANULE_SIZE):
            gr[g // GRANULE_SIZE] = crc32c(data[g : g + GRANULE_SIZE])
        ng = (n + GRANULE_SIZE - 1) // GRANULE_SIZE
        a = rng.randrange(ng) if trial % 2 else rng.randrange(max(1, ng - SPAN_COMPOSE_MIN))
        b = rng.randint(a + 1, ng)
        span = data[a * GRANULE_SIZE : b * GRANULE_SIZE]
        assert granules_ok(span, gr, a)
        bad = bytearray(span)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        assert not granules_ok(bytes(bad), gr, a)
