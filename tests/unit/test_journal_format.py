"""Golden bytes: the journal's on-disk format exactly as docs/FORMATS.md shows it."""

from __future__ import annotations

import pytest

from cdp.errors import Corruption
from cdp.journal import CrashSimFS, Journal, ManualClock, RecordKind
from cdp.journal.format import (
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    check_segment_header,
    decode_record,
    encode_record,
    marker_payload,
    pack_segment_header,
    parse_segment_name,
    segment_name,
)

T0 = 1_700_000_000_000_000_000

# the worked example of FORMATS.md: WRITE seq 1 at volume offset 4096 of b"hello"
GOLDEN_WRITE = bytes.fromhex(
    "43445052" "4ef1d823"              # magic "CDPR", crc32c
    "01" "01" "00" "00" "05000000"      # version, kind WRITE, no compression, flags, stored 5
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
    "43445052" "52b8a3a1" "01" "03" "00" "00" "11000000"
    "0200000000000000" "01002a36fe9c9717" "0000000000000000" "0000000000000000"
    "0100000000000000" "0700" "6e696768746c79"
)


def test_record_golden_bytes() -> None:
    assert encode_record(1, 1, T0, 4096, 5, b"hello") == GOLDEN_WRITE
    assert len(GOLDEN_WRITE) == RECORD_HEADER_SIZE + 5


def test_marker_golden_bytes() -> None:
    got = encode_record(3, 2, T0 + 1, 0, 0, marker_payload(1, "nightly"))
    assert got == GOLDEN_MARKER


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
    j = Journal.open("/j", fs=fs, clock=ManualClock(T0))
    assert j.append_write(4096, b"hello") == (1, SEGMENT_HEADER_SIZE)
    j.sync()
    assert bytes(fs.raw("/j/" + segment_name(1))) == GOLDEN_SEGMENT_HEADER + GOLDEN_WRITE
    j.close()


def test_decode_golden_and_reject_flips() -> None:
    rec = decode_record(GOLDEN_WRITE[:48], GOLDEN_WRITE[48:], 32, "x", 1)
    assert (rec.kind, rec.seq, rec.timestamp_ns, rec.offset, rec.payload) == (
        RecordKind.WRITE, 1, T0, 4096, b"hello")
    m = decode_record(GOLDEN_MARKER[:48], GOLDEN_MARKER[48:], 85, "x", 2)
    assert (m.marker_id, m.label) == (1, "nightly")
    for i in range(len(GOLDEN_WRITE)):
        bad = bytearray(GOLDEN_WRITE)
        bad[i] ^= 0x10
        with pytest.raises(Corruption):
            decode_record(bytes(bad[:48]), bytes(bad[48:53]), 32, "x", 1)
