"""Journal on-disk format: constants, header structs, record encode/decode.

The byte-by-byte specification is ``docs/FORMATS.md`` (section "Journal"); golden-bytes
tests pin it. Every constant marked *on disk* is written into files and must never
change; retired values are never reused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import lz4.block
from crc32c import crc32c

from cdp.errors import Corruption

# ---------------------------------------------------------------------------------------
# Segment file header (32 bytes)
# ---------------------------------------------------------------------------------------

#: on disk, never change: first 8 bytes of every segment file
SEGMENT_MAGIC = b"CDPJSEG\x00"
#: on disk, never change: segment format version written by this code
SEGMENT_VERSION = 1
#: magic(8s) version(H) header_size(H) flags(I) first_seq(Q) reserved(I) crc(I)
SEGMENT_HEADER = struct.Struct("<8sHHIQII")
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size  # 32
SEGMENT_SUFFIX = ".seg"
INDEX_SUFFIX = ".idx"

# ---------------------------------------------------------------------------------------
# Record header (48 bytes)
# ---------------------------------------------------------------------------------------

#: on disk, never change: b"CDPR" read as a little-endian u32
RECORD_MAGIC = 0x52504443
RECORD_MAGIC_BYTES = b"CDPR"
#: on disk, never change: record format version written by this code
RECORD_VERSION = 1
#: magic(I) crc(I) | version(B) kind(B) compression(B) flags(B) stored(I) seq(Q) ts(Q)
#: offset(Q) length(Q).  The CRC covers byte 8 up to the end of the payload.
RECORD_HEADER = struct.Struct("<IIBBBBIQQQQ")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 48
#: the first 8 bytes (magic, crc) and the CRC-covered remainder of the header
RECORD_PREFIX = struct.Struct("<II")
RECORD_TAIL = struct.Struct("<BBBBIQQQQ")
CRC_START = 8

#: largest stored payload a record may carry (bounded so a damaged length field is
#: recognised as damage instead of causing a huge read)
MAX_PAYLOAD = 1 << 30


class RecordKind(IntEnum):
    """Record kinds. On disk, never change; retired numbers are never reused."""

    WRITE = 1
    ZERO = 2
    MARKER = 3
    REWIND = 4
    ERROR = 5
    INIT = 6


class Compression(IntEnum):
    """Payload compression. On disk, never change."""

    NONE = 0
    LZ4 = 1  # lz4 block format, no size prefix; raw size is the header's length


KIND_VALUES = frozenset(int(k) for k in RecordKind)
DATA_KINDS = frozenset((int(RecordKind.WRITE), int(RecordKind.INIT)))

#: MARKER payload: marker_id(Q) label_len(H) label(utf-8)
MARKER_PAYLOAD = struct.Struct("<QH")
#: REWIND payload: target_seq(Q)
REWIND_PAYLOAD = struct.Struct("<Q")
#: ERROR payload: code(I) message_len(H) message(utf-8)
ERROR_PAYLOAD = struct.Struct("<IH")
MAX_TEXT = 0xFFFF


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record is ``first_seq``."""
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def index_name(first_seq: int) -> str:
    """File name of the index sidecar of segment ``first_seq``."""
    return f"{first_seq:020d}{INDEX_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """First seq encoded in a segment file name, or None if ``name`` is not a segment."""
    if len(name) != 20 + len(SEGMENT_SUFFIX) or not name.endswith(SEGMENT_SUFFIX):
        return None
    stem = name[:20]
    return int(stem) if stem.isdigit() else None


def pack_segment_header(first_seq: int) -> bytes:
    """The 32-byte header that starts segment ``first_seq``."""
    body = SEGMENT_HEADER.pack(
        SEGMENT_MAGIC, SEGMENT_VERSION, SEGMENT_HEADER_SIZE, 0, first_seq, 0, 0
    )
    return body[:28] + struct.pack("<I", crc32c(body[:28]))


def check_segment_header(data: bytes, first_seq: int) -> str | None:
    """None if ``data`` is a valid header for segment ``first_seq``, else the reason."""
    if len(data) < SEGMENT_HEADER_SIZE:
        return "segment header truncated"
    magic, version, hsize, _flags, fseq, _res, crc = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        return "bad segment magic"
    if crc != crc32c(data[:28]):
        return "bad segment header checksum"
    if version != SEGMENT_VERSION or hsize != SEGMENT_HEADER_SIZE:
        return f"unsupported segment version {version}"
    if fseq != first_seq:
        return f"segment header says first seq {fseq}, name says {first_seq}"
    return None


@dataclass(slots=True)
class Record:
    """One decoded journal record.

    ``payload`` is the decoded (decompressed) payload: the data of WRITE/INIT, the raw
    payload bytes of MARKER/REWIND/ERROR, ``b""`` for ZERO. Kind-specific fields are
    filled for their kind and None otherwise.
    """

    kind: RecordKind
    seq: int
    timestamp_ns: int
    offset: int
    length: int
    flags: int
    payload: bytes
    loc: int
    compression: int = 0
    stored_length: int = 0
    marker_id: int | None = None
    label: str | None = None
    target_seq: int | None = None
    error_code: int | None = None
    message: str | None = None


def encode_record(
    kind: int,
    seq: int,
    timestamp_ns: int,
    offset: int,
    length: int,
    payload: bytes,
    compression: int = 0,
    flags: int = 0,
) -> bytes:
    """Full record bytes (header + stored payload) exactly as the writer lays them out.

    ``payload`` is the *stored* payload (already compressed when ``compression`` is LZ4).
    Used by tests and tools; the writer inlines the same packing on its hot path.
    """
    tail = RECORD_TAIL.pack(
        RECORD_VERSION, kind, compression, flags, len(payload), seq, timestamp_ns, offset, length
    )
    crc = crc32c(payload, crc32c(tail))
    return RECORD_PREFIX.pack(RECORD_MAGIC, crc) + tail + payload


def marker_payload(marker_id: int, label: str) -> bytes:
    """MARKER payload bytes."""
    raw = label.encode("utf-8")
    if len(raw) > MAX_TEXT:
        raise ValueError("marker label longer than 65535 bytes")
    return MARKER_PAYLOAD.pack(marker_id, len(raw)) + raw


def error_payload(code: int, message: str) -> bytes:
    """ERROR payload bytes (message cut to 65535 bytes of UTF-8)."""
    raw = message.encode("utf-8")[:MAX_TEXT]
    return ERROR_PAYLOAD.pack(code, len(raw)) + raw


def header_problem(
    version: int, kind: int, comp: int, stored: int, length: int
) -> str | None:
    """Structural check of a header's fields (everything but CRC and seq)."""
    if version != RECORD_VERSION:
        return f"unsupported record version {version}"
    if kind not in KIND_VALUES:
        return f"unknown record kind {kind}"
    if stored > MAX_PAYLOAD:
        return f"stored length {stored} too large"
    if comp == Compression.LZ4:
        if kind not in DATA_KINDS:
            return "compressed payload on a non-data record"
        if stored >= length:
            return "compressed payload not smaller than raw"
    elif comp != Compression.NONE:
        return f"unknown compression {comp}"
    elif kind in DATA_KINDS and stored != length:
        return "data record length differs from stored length"
    if kind == RecordKind.ZERO and stored:
        return "ZERO record with payload"
    return None


def decode_payload(
    kind: int, comp: int, length: int, stored: bytes, where: str, rec: Record | None = None
) -> bytes:
    """Decompress and structure-check a payload; Corruption (naming ``where``) if bad.

    When ``rec`` is given its kind-specific fields are filled.
    """
    if comp == Compression.LZ4:
        try:
            data: bytes = lz4.block.decompress(stored, uncompressed_size=length)
        except Exception as exc:
            raise Corruption(f"{where}: lz4 payload does not decode ({exc})") from None
        if len(data) != length:
            raise Corruption(f"{where}: lz4 payload decodes to {len(data)} bytes, not {length}")
        return data
    if kind == RecordKind.MARKER:
        n = len(stored)
        if n < MARKER_PAYLOAD.size:
            raise Corruption(f"{where}: MARKER payload truncated")
        mid, llen = MARKER_PAYLOAD.unpack_from(stored)
        if MARKER_PAYLOAD.size + llen != n:
            raise Corruption(f"{where}: MARKER label length {llen} does not fit payload")
        if rec is not None:
            rec.marker_id = mid
            rec.label = stored[MARKER_PAYLOAD.size :].decode("utf-8", "replace")
    elif kind == RecordKind.REWIND:
        if len(stored) != REWIND_PAYLOAD.size:
            raise Corruption(f"{where}: REWIND payload must be 8 bytes")
        if rec is not None:
            rec.target_seq = REWIND_PAYLOAD.unpack(stored)[0]
    elif kind == RecordKind.ERROR:
        n = len(stored)
        if n < ERROR_PAYLOAD.size:
            raise Corruption(f"{where}: ERROR payload truncated")
        code, mlen = ERROR_PAYLOAD.unpack_from(stored)
        if ERROR_PAYLOAD.size + mlen != n:
            raise Corruption(f"{where}: ERROR message length {mlen} does not fit payload")
        if rec is not None:
            rec.error_code = code
            rec.message = stored[ERROR_PAYLOAD.size :].decode("utf-8", "replace")
    return stored


def decode_record(header: bytes, stored: bytes, loc: int, where: str, seq: int | None) -> Record:
    """Check and decode one record from its 48 header bytes and stored payload.

    Raises Corruption naming ``where`` (segment, offset, seq) on any mismatch: magic,
    CRC, header structure, expected ``seq`` (when given) or payload structure.
    Cost: one CRC pass over the record plus decompression.
    """
    if len(header) < RECORD_HEADER_SIZE:
        raise Corruption(f"{where}: record header truncated")
    magic, crc, version, kind, comp, flags, slen, rseq, ts, off, length = (
        RECORD_HEADER.unpack_from(header)
    )
    if magic != RECORD_MAGIC:
        raise Corruption(f"{where}: bad record magic")
    if len(stored) != slen:
        raise Corruption(f"{where}: record truncated")
    if crc != crc32c(stored, crc32c(header[CRC_START:RECORD_HEADER_SIZE])):
        raise Corruption(f"{where}: bad checksum")
    bad = header_problem(version, kind, comp, slen, length)
    if bad:
        raise Corruption(f"{where}: {bad}")
    if seq is not None and rseq != seq:
        raise Corruption(f"{where}: record holds seq {rseq}, expected {seq}")
    rec = Record(RecordKind(kind), rseq, ts, off, length, flags, b"", loc, comp, slen)
    rec.payload = decode_payload(kind, comp, length, stored, where, rec)
    return rec
