"""The .cdpdiff stream: golden bytes (docs/FORMATS.md (".cdpdiff stream")), round trip, and the
reader's refusals (bad magic/version, truncation, any flipped byte, bad order, trailing
bytes); apply_stream to a raw file (holes punched for zeroes, size checked)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
from pathlib import Path

import pytest

from cdp.backup.cdpdiff import KIND_DATA, KIND_ZERO, Header, Reader, Writer
from cdp.cli.apply import apply_stream
from cdp.errors import Corruption, UsageError
from tests.helpers import assert_bytes_equal

HDR = Header(1048576, 3, 7, "12345678-9abc-def0-1234-56789abcdef0", "vol0", "marker1", "marker2")

# header (64 bytes + "vol0marker1marker2" + 6 bytes padding = 88), DATA record (24 + 10),
# ZERO record (24), END (32 + 32-byte SHA-256): 210 bytes
GOLDEN = bytes.fromhex(
    "434450444946460a010000005800000000001000000000000300000000000000"
    "0700000000000000123456789abcdef0123456789abcdef00400070007000000"
    "766f6c306d61726b6572316d61726b6572320000000000000100000000000000"
    "00100000000000000a0000000000000068656c6c6f2c20636470020000000000"
    "000000000100000000000000020000000000ffffffff00000000020000000000"
    "00000a00000000000000000002000000000052b978f0e675b39c7ba0725adc24"
    "c4cf61d6f2af80740614a53fde88102c5ec3"
)


def _golden_stream() -> bytes:
    out: list[bytes | memoryview] = []
    w = Writer(out.append, HDR)
    w.data(4096, b"hello, cdp")
    w.zero(65536, 131072)
    w.end()
    return b"".join(bytes(x) for x in out)


def test_golden_bytes() -> None:
    b = _golden_stream()
    assert b == GOLDEN
    # the documented field positions
    assert b[:8] == b"CDPDIFF\n"
    assert struct.unpack_from("<IIQQQ", b, 8) == (1, 88, 1048576, 3, 7)
    assert struct.unpack_from("<HHHH", b, 56) == (4, 7, 7, 0)
    assert struct.unpack_from("<IIQQ", b, 88) == (KIND_DATA, 0, 4096, 10)
    assert struct.unpack_from("<IIQQ", b, 122) == (KIND_ZERO, 0, 65536, 131072)
    assert struct.unpack_from("<IIQQQ", b, 146) == (0xFFFFFFFF, 0, 2, 10, 131072)
    assert b[178:] == hashlib.sha256(b[:178]).digest()


def test_round_trip() -> None:
    rd = Reader(io.BytesIO(GOLDEN))
    assert rd.header == HDR
    recs = [(r.kind, r.offset, r.length, r.data) for r in rd.records()]
    assert recs == [(KIND_DATA, 4096, 10, b"hello, cdp"), (KIND_ZERO, 65536, 131072, None)]
    assert rd.totals is not None and (rd.totals.records, rd.totals.data_bytes, rd.totals.zero_bytes) == (2, 10, 131072)


def _read_all(b: bytes) -> None:
    for _ in Reader(io.BytesIO(b)).records():
        pass


def test_every_flipped_byte_is_refused() -> None:
    for i in range(len(GOLDEN)):
        bad = bytearray(GOLDEN)
        bad[i] ^= 0x01
        with pytest.raises(Corruption):
            _read_all(bytes(bad))


def test_truncation_trailing_bytes_version() -> None:
    for n in (0, 7, 64, 100, 150, 200, len(GOLDEN) - 1):
        with pytest.raises(Corruption, match=r"truncated|checksum"):
            _read_all(GOLDEN[:n])
    with pytest.raises(Corruption, match="after its end"):
        _read_all(GOLDEN + b"\x00")
    v2 = bytearray(GOLDEN)
    v2[8] = 2
    with pytest.raises(Corruption, match="version 2"):
        _read_all(bytes(v2))
    with pytest.raises(Corruption, match="magic"):
        _read_all(b"NOTADIFF" + GOLDEN[8:])


def test_writer_refuses_disorder_and_range() -> None:
    w = Writer(lambda b: None, HDR)
    w.data(100, b"x")
    with pytest.raises(UsageError):
        w.data(50, b"y")
    with pytest.raises(UsageError):
        w.zero(1048576 - 10, 11)
    with pytest.raises(UsageError):
        w.zero(200, 0)


def test_apply_to_file(tmp_path: Path) -> None:
    rng = random.Random(3)
    size = 1 << 20
    base = rng.randbytes(size)
    img = tmp_path / "a.img"
    img.write_bytes(base)
    out: list[bytes | memoryview] = []
    w = Writer(out.append, HDR)
    w.data(4096, b"hello, cdp")
    w.zero(65536, 131072)
    w.end()
    f = tmp_path / "d.cdpdiff"
    f.write_bytes(b"".join(bytes(x) for x in out))
    with open(f, "rb") as fh:
        r = apply_stream(fh, str(img), verify_first=True)
    assert r["records"] == 2 and r["data_bytes"] == 10 and r["zero_bytes"] == 131072
    want = bytearray(base)
    want[4096:4106] = b"hello, cdp"
    want[65536 : 65536 + 131072] = bytes(131072)
    assert_bytes_equal(img.read_bytes(), want)
    # the zeroed range became a hole (punched), so the file uses less space
    assert os.stat(img).st_blocks * 512 <= size - 131072 + 4096
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4096))
    with open(f, "rb") as fh, pytest.raises(UsageError, match="bytes"):
        apply_stream(fh, str(small), verify_first=True)
