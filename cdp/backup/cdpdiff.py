"""The ``.cdpdiff`` stream: the changed extents between two points, for piping.

Byte layout in docs/FORMATS.md (".cdpdiff stream"). In short (little-endian)::

    header   "CDPDIFF\\n" u32 version=1  u32 header_length  u64 volume_size
             u64 from_seq  u64 to_seq  16 bytes volume uuid
             u16 len(volume name) u16 len(from point) u16 len(to point) u16 0
             the three UTF-8 strings, zero padding to a multiple of 8
    records  u32 kind (1 DATA, 2 ZERO)  u32 flags=0  u64 offset  u64 length  [data]
    end      u32 kind=0xFFFFFFFF  u32 0  u64 records  u64 data_bytes  u64 zero_bytes
             32 bytes SHA-256 of every byte before this field

Writing costs one SHA-256 pass over the bytes written; reading the same.
"""

from __future__ import annotations

import hashlib
import struct
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cdp.errors import Corruption, UsageError

MAGIC = b"CDPDIFF\n"
VERSION = 1
KIND_DATA = 1
KIND_ZERO = 2
KIND_END = 0xFFFFFFFF
MAX_RECORD = 1 << 30  # longest DATA record a reader accepts

HEADER = struct.Struct("<8sIIQQQ16sHHHH")  # 64 bytes
RECORD = struct.Struct("<IIQQ")  # 24 bytes
END = struct.Struct("<IIQQQ")  # 32 bytes, then the 32-byte digest


@dataclass(frozen=True)
class Header:
    volume_size: int
    from_seq: int
    to_seq: int
    volume_uuid: str
    volume: str
    from_point: str
    to_point: str

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def encode_header(h: Header) -> bytes:
    """The header bytes for ``h`` (fixed part + strings + padding)."""
    strings = [s.encode("utf-8") for s in (h.volume, h.from_point, h.to_point)]
    for s in strings:
        if len(s) > 0xFFFF:
            raise UsageError("cdpdiff header string longer than 65535 bytes")
    body = b"".join(strings)
    length = HEADER.size + len(body)
    pad = -length % 8
    u = uuidlib.UUID(h.volume_uuid).bytes if h.volume_uuid else bytes(16)
    return HEADER.pack(
        MAGIC, VERSION, length + pad, h.volume_size, h.from_seq, h.to_seq, u,
        len(strings[0]), len(strings[1]), len(strings[2]), 0,
    ) + body + bytes(pad)


class Writer:
    """Produces a stream through ``out`` (any callable taking bytes), hashing as it goes.

    Records must come in increasing offset order without overlap (checked)."""

    def __init__(self, out: Callable[[bytes | memoryview], object], header: Header) -> None:
        self._out = out
        self._h = hashlib.sha256()
        self.size = header.volume_size
        self.records = 0
        self.data_bytes = 0
        self.zero_bytes = 0
        self.stream_bytes = 0
        self._pos = 0
        self._emit(encode_header(header))

    def _emit(self, b: bytes | memoryview) -> None:
        self._h.update(b)
        self.stream_bytes += len(b)
        self._out(b)

    def _check(self, offset: int, length: int) -> None:
        if length <= 0 or offset < self._pos or offset + length > self.size:
            raise UsageError(f"cdpdiff record [{offset}, {offset + length}) out of order or range")
        self._pos = offset + length

    def data(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        self._emit(RECORD.pack(KIND_DATA, 0, offset, len(data)))
        self._emit(data)
        self.records += 1
        self.data_bytes += len(data)

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self._emit(RECORD.pack(KIND_ZERO, 0, offset, length))
        self.records += 1
        self.zero_bytes += length

    def end(self) -> None:
        self._emit(END.pack(KIND_END, 0, self.records, self.data_bytes, self.zero_bytes))
        digest = self._h.digest()
        self.stream_bytes += len(digest)
        self._out(digest)


@dataclass(frozen=True)
class Record:
    kind: int  # KIND_DATA or KIND_ZERO
    offset: int
    length: int
    data: bytes | None


@dataclass(frozen=True)
class Totals:
    records: int
    data_bytes: int
    zero_bytes: int


class Reader:
    """Parses a stream from a binary file object. :meth:`records` yields the records and
    checks order, ranges, the end record's totals and the digest (Corruption if any is
    wrong; the error comes after the records read so far)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._h = hashlib.sha256()
        fixed = self._read(HEADER.size)
        magic, version, hlen, size, a, b, u, n1, n2, n3, _r = HEADER.unpack(fixed)
        if magic != MAGIC:
            raise Corruption("not a cdpdiff stream (bad magic)")
        if version != VERSION:
            raise Corruption(f"cdpdiff version {version} is not supported (this reader: {VERSION})")
        if hlen < HEADER.size + n1 + n2 + n3 or hlen % 8:
            raise Corruption("cdpdiff header length is inconsistent")
        rest = self._read(hlen - HEADER.size)
        try:
            name = rest[:n1].decode()
            fp = rest[n1 : n1 + n2].decode()
            tp = rest[n1 + n2 : n1 + n2 + n3].decode()
        except UnicodeDecodeError:
            raise Corruption("cdpdiff header strings are not UTF-8") from None
        self.header = Header(size, a, b, str(uuidlib.UUID(bytes=u)), name, fp, tp)
        self.totals: Totals | None = None

    def _read(self, n: int) -> bytes:
        b = self._f.read(n)
        if len(b) != n:
            raise Corruption("cdpdiff stream is truncated")
        self._h.update(b)
        return b

    def records(self) -> Iterator[Record]:
        pos = 0
        n = data_bytes = zero_bytes = 0
        size = self.header.volume_size
        while True:
            kind, flags, off, length = RECORD.unpack(self._read(RECORD.size))
            if kind == KIND_END:
                # the END record shares the first 24 bytes' layout: kind, flags, records,
                # data_bytes; then zero_bytes, then the digest of everything before it
                if flags:
                    raise Corruption("cdpdiff end record has non-zero flags")
                total_n, total_data = off, length
                (total_zero,) = struct.unpack("<Q", self._read(END.size - RECORD.size))
                want = self._h.digest()
                digest = self._f.read(32)
                if digest != want:
                    raise Corruption("cdpdiff checksum mismatch (the stream is damaged)")
                if (total_n, total_data, total_zero) != (n, data_bytes, zero_bytes):
                    raise Corruption("cdpdiff end record totals do not match its records")
                if self._f.read(1):
                    raise Corruption("cdpdiff stream has bytes after its end record")
                self.totals = Totals(n, data_bytes, zero_bytes)
                return
            if flags or kind not in (KIND_DATA, KIND_ZERO):
                raise Corruption(f"cdpdiff record {n}: unknown kind {kind} or flags {flags:#x}")
            if length <= 0 or off < pos or off + length > size or (kind == KIND_DATA and length > MAX_RECORD):
                raise Corruption(f"cdpdiff record {n}: range [{off}, {off + length}) out of order or range")
            pos = off + length
            n += 1
            if kind == KIND_DATA:
                data_bytes += length
                yield Record(kind, off, length, self._read(length))
            else:
                zero_bytes += length
                yield Record(kind, off, length, None)
