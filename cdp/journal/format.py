"""Journal on-disk format: constants, header structs, record encode/decode.

The byte-by-byte specification is ``docs/FORMATS.md`` (section "Journal"); golden-bytes
tests pin it. Every constant marked *on disk* is written into files and must never
change; retired values are never reused.
"""

from __future__ import annotations

import functools
import struct
import sys
from array import array
from dataclasses import dataclass
from enum import IntEnum

import lz4.block
import numpy as np
import numpy.typing as npt
from crc32c import crc32c

from cdp.errors import Corruption, PointError

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
#: the open segment's index as a clean close left it (docs/FORMATS.md, "Clean close")
CLOSED_SUFFIX = ".closed"

# ---------------------------------------------------------------------------------------
# Record header (48 bytes)
# ---------------------------------------------------------------------------------------

#: on disk, never change: b"CDPR" read as a little-endian u32
RECORD_MAGIC = 0x52504443
RECORD_MAGIC_BYTES = b"CDPR"
#: on disk, never change: record format version written by this code for records without
#: a chunk table. Version 2 added chunked payloads (``Compression.CHUNKED``); version 1
#: records are still read.
RECORD_VERSION = 2
#: on disk, never change: version written for chunked records. Version 3 = version 2 plus
#: a granule CRC table after the chunk table (4 KiB reads check 4 KiB, not 64 KiB).
CHUNKED_VERSION = 3
#: on disk, never change: record versions this code reads
RECORD_VERSIONS = frozenset((1, 2, 3))
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

#: on disk, never change: raw bytes per chunk of a chunked (v2) data payload. WRITE and
#: INIT payloads longer than this are stored as a chunk table plus independently
#: checksummed and compressed chunks; shorter ones as one block.
CHUNK_SIZE = 64 << 10
#: chunk table entry: stored_length(I) compression(B) reserved(3x) crc(I)
CHUNK_ENTRY = struct.Struct("<IB3xI")
CHUNK_ENTRY_SIZE = CHUNK_ENTRY.size  # 12
#: on disk, never change (v3): raw bytes per granule of a chunk stored uncompressed;
#: each granule has its own CRC32C in the record's granule table
GRANULE_SIZE = 4 << 10
#: granule CRC slots per chunk in the granule table (v3)
GRANULES = CHUNK_SIZE // GRANULE_SIZE  # 16
#: bytes of the granule table per chunk (v3): GRANULES u32 CRCs
GRANULE_TABLE_SIZE = 4 * GRANULES  # 64
#: largest WRITE/INIT payload a record may carry: its chunked form (tables included)
#: must fit MAX_PAYLOAD even when no chunk compresses
MAX_DATA = MAX_PAYLOAD - (CHUNK_ENTRY_SIZE + GRANULE_TABLE_SIZE) * (MAX_PAYLOAD // CHUNK_SIZE)


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
    CHUNKED = 2  # (v2) chunk table + chunks, each with its own compression and CRC
    ELIDED = 3  # (v2) removed by compaction: a record without payload, or a chunk entry
    #             with no stored bytes; reading it raises PointError (expired data)


#: segment header flags bit: the segment was rewritten by compaction (records are found
#: through the index sidecar by seq; locations handed out before no longer apply)
SEGMENT_COMPACTED = 1


KIND_VALUES = frozenset(int(k) for k in RecordKind)
DATA_KINDS = frozenset((int(RecordKind.WRITE), int(RecordKind.INIT)))

#: MARKER payload: marker_id(Q) label_len(H) label(utf-8)
MARKER_PAYLOAD = struct.Struct("<QH")
#: REWIND payload: target_seq(Q)
REWIND_PAYLOAD = struct.Struct("<Q")
#: ERROR payload: code(I) message_len(H) message(utf-8)
ERROR_PAYLOAD = struct.Struct("<IH")
MAX_TEXT = 0xFFFF
#: payloads (and chunks) shorter than this are never compressed
LZ4_MIN = 256


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record is ``first_seq``."""
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def index_name(first_seq: int) -> str:
    """File name of the index sidecar of segment ``first_seq``."""
    return f"{first_seq:020d}{INDEX_SUFFIX}"


def closed_name(first_seq: int) -> str:
    """File name of the clean-close sidecar of (open) segment ``first_seq``."""
    return f"{first_seq:020d}{CLOSED_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """First seq encoded in a segment file name, or None if ``name`` is not a segment."""
    if len(name) != 20 + len(SEGMENT_SUFFIX) or not name.endswith(SEGMENT_SUFFIX):
        return None
    stem = name[:20]
    return int(stem) if stem.isdigit() else None


def pack_segment_header(first_seq: int, flags: int = 0) -> bytes:
    """The 32-byte header that starts segment ``first_seq``."""
    body = SEGMENT_HEADER.pack(
        SEGMENT_MAGIC, SEGMENT_VERSION, SEGMENT_HEADER_SIZE, flags, first_seq, 0, 0
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
    #: the payload (or some chunks of it) was removed by compaction; ``payload`` is b""
    elided: bool = False


def encode_record(
    kind: int,
    seq: int,
    timestamp_ns: int,
    offset: int,
    length: int,
    payload: bytes,
    compression: int = 0,
    flags: int = 0,
    version: int | None = None,
) -> bytes:
    """Full record bytes (header + stored payload) exactly as the writer lays them out.

    ``payload`` is the *stored* payload (already compressed when ``compression`` is LZ4,
    table + chunks when it is CHUNKED). Used by tests and tools; the writer inlines the
    same packing on its hot path. For CHUNKED the CRC covers only the header and the
    chunk table (+ the granule table in version 3; each chunk carries its own CRC(s)).
    ``version`` defaults to what the writer uses (3 for CHUNKED, else 2).
    """
    if version is None:
        version = CHUNKED_VERSION if compression == Compression.CHUNKED else RECORD_VERSION
    tail = RECORD_TAIL.pack(
        version, kind, compression, flags, len(payload), seq, timestamp_ns, offset, length
    )
    covered = payload
    if compression == Compression.CHUNKED:
        covered = payload[: table_size(version, length)]
    crc = crc32c(covered, crc32c(tail))
    return RECORD_PREFIX.pack(RECORD_MAGIC, crc) + tail + payload


def chunk_count(length: int) -> int:
    """Number of chunks of a chunked payload of ``length`` raw bytes."""
    return (length + CHUNK_SIZE - 1) // CHUNK_SIZE


def table_size(version: int, length: int) -> int:
    """Bytes of the tables of a chunked payload of ``length`` raw bytes: the chunk table,
    plus (version 3) the granule table."""
    per = CHUNK_ENTRY_SIZE + GRANULE_TABLE_SIZE if version >= 3 else CHUNK_ENTRY_SIZE
    return per * chunk_count(length)


def pack_granule_crcs(chunk: bytes | bytearray | memoryview, out: bytearray, pos: int) -> None:
    """Write the CRC32C of each 4 KiB granule of a raw ``chunk`` into ``out`` at ``pos``
    (u32 each, the slots past its last granule left as they are: zero)."""
    n = len(chunk)
    mv = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
    crcs = list(map(crc32c, [mv[g : g + GRANULE_SIZE] for g in range(0, n, GRANULE_SIZE)]))
    struct.pack_into(f"<{len(crcs)}I", out, pos, *crcs)


def chunk_payload(data: bytes | bytearray | memoryview, version: int = CHUNKED_VERSION) -> bytes:
    """Stored form (chunk table [+ granule table] + chunks) of a data payload, each chunk
    lz4-compressed exactly when that makes it strictly smaller (no adaptive back-off)."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    count = chunk_count(n)
    table = bytearray(table_size(version, n))
    gbase = CHUNK_ENTRY_SIZE * count
    parts: list[bytes | memoryview] = []
    for i in range(count):
        c: bytes | memoryview = mv[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
        comp = 0
        if len(c) >= LZ4_MIN:
            packed = lz4.block.compress(c, store_size=False)
            if len(packed) < len(c):
                c, comp = packed, 1
        if version >= 3 and comp == 0:
            CHUNK_ENTRY.pack_into(table, CHUNK_ENTRY_SIZE * i, len(c), comp, 0)
            pack_granule_crcs(c, table, gbase + GRANULE_TABLE_SIZE * i)
        else:
            CHUNK_ENTRY.pack_into(table, CHUNK_ENTRY_SIZE * i, len(c), comp, crc32c(c))
        parts.append(c)
    return bytes(table) + b"".join(parts)


def encode_data_record(
    kind: int, seq: int, timestamp_ns: int, offset: int, data: bytes, flags: int = 0
) -> bytes:
    """A WRITE/INIT record as the writer without compression back-off lays it out:
    chunked (version 3) above CHUNK_SIZE, else one block (version 2, lz4 when it saves).
    For tests and tools."""
    n = len(data)
    if n > CHUNK_SIZE:
        return encode_record(kind, seq, timestamp_ns, offset, n, chunk_payload(data),
                             Compression.CHUNKED, flags)
    if n >= LZ4_MIN:
        packed = lz4.block.compress(data, store_size=False)
        if len(packed) < n:
            return encode_record(kind, seq, timestamp_ns, offset, n, packed, Compression.LZ4,
                                 flags)
    return encode_record(kind, seq, timestamp_ns, offset, n, data, 0, flags)


class ChunkTable:
    """A parsed, structurally checked chunk table of a record of ``length`` raw bytes.

    Chunk ``i`` holds raw bytes ``[i*CHUNK_SIZE, min((i+1)*CHUNK_SIZE, length))`` and is
    stored at ``starts[i] .. starts[i+1]`` counted from the end of the record header
    (the tables start at 0). ``comps[i]``/``crcs[i]`` are its compression and CRC.
    Version 3: ``granules[GRANULES*i + g]`` is the CRC of granule g of chunk i when it is
    stored raw (its ``crcs[i]`` is 0); None for version 2.
    """

    __slots__ = ("comps", "count", "crcs", "granules", "length", "starts")

    def __init__(self, length: int, starts: list[int], comps: list[int], crcs: list[int],
                 granules: array[int] | None = None):
        self.length = length
        self.count = len(comps)
        self.starts = starts
        self.comps = comps
        self.crcs = crcs
        self.granules = granules

    def raw_size(self, i: int) -> int:
        """Raw (decoded) bytes of chunk ``i``."""
        return min(CHUNK_SIZE, self.length - i * CHUNK_SIZE)


def parse_chunk_table(table: bytes | memoryview, length: int, stored: int,
                      version: int) -> ChunkTable | str:
    """Check and parse the tables (chunk table, and the granule table of version 3) of a
    chunked record whose header says ``length`` raw and ``stored`` stored bytes; the
    reason as a string if they are inconsistent."""
    count = chunk_count(length)
    tsize = table_size(version, length)
    if len(table) != tsize:
        return "chunk table truncated"
    esize = CHUNK_ENTRY_SIZE * count
    granules: array[int] | None = None
    if version >= 3:
        granules = array("I")
        granules.frombytes(table[esize:tsize])
        if _BIG_ENDIAN:
            granules.byteswap()
    pos = tsize
    starts = [pos]
    comps: list[int] = []
    crcs: list[int] = []
    last = count - 1
    for i, (slen, comp, crc) in enumerate(CHUNK_ENTRY.iter_unpack(table[:esize])):
        raw = CHUNK_SIZE if i < last else length - last * CHUNK_SIZE
        if granules is not None:
            used = (raw + GRANULE_SIZE - 1) // GRANULE_SIZE if comp == Compression.NONE else 0
            if any(granules[GRANULES * i + used : GRANULES * (i + 1)]):
                return f"chunk {i} has granule CRCs it cannot use"
            if comp == Compression.NONE and crc:
                return f"raw chunk {i} with a chunk CRC (version 3 uses granule CRCs)"
        if comp == Compression.NONE:
            if slen != raw:
                return f"chunk {i} stored length {slen} differs from raw {raw}"
        elif comp == Compression.LZ4:
            if slen >= raw:
                return f"compressed chunk {i} not smaller than raw"
        elif comp == Compression.ELIDED:
            if slen or crc:
                return f"elided chunk {i} with stored bytes"
        else:
            return f"chunk {i} has unknown compression {comp}"
        pos += slen
        starts.append(pos)
        comps.append(comp)
        crcs.append(crc)
    if pos != stored:
        return f"chunks add up to {pos} bytes, header says {stored}"
    return ChunkTable(length, starts, comps, crcs, granules)


_BIG_ENDIAN = sys.byteorder == "big"


def chunk_ok(data: bytes | memoryview, table: ChunkTable, i: int) -> bool:
    """True when the stored bytes ``data`` of chunk ``i`` match their CRC(s): the chunk
    CRC, or for a raw chunk of a version 3 record every granule CRC."""
    gr = table.granules
    if gr is None or table.comps[i] != Compression.NONE:
        return bool(crc32c(data) == table.crcs[i])
    mv = data if isinstance(data, memoryview) else memoryview(data)
    got = array("I", [crc32c(mv[g : g + GRANULE_SIZE]) for g in range(0, len(mv), GRANULE_SIZE)])
    base = GRANULES * i
    return got == gr[base : base + len(got)]  # one C comparison (half the cost of a loop)


def first_bad_chunk(stored: memoryview, table: ChunkTable) -> int | None:
    """The first chunk of a chunked record's stored payload ``stored`` (tables included,
    as ``table.starts`` counts) whose bytes do not match their CRC(s), or None: the
    check of :func:`chunk_ok` for every chunk, in fewer calls.

    Design notes: a raw 64 KiB chunk of a version 3 record carries 16 granule CRCs, and
    16 ``crc32c`` calls of 4 KiB cost ~3.5 times one call over the chunk (per call and
    unrolled-loop costs: ~210 against ~60 µs per MiB here). CRC32C composes: for the
    CRCs ``a`` of bytes A and ``b`` of B, ``crc(A + B) = M(len B) a ^ b`` with ``M(n)``
    the GF(2)-linear advance of the register over n zero bytes (zlib's crc32_combine).
    So the granule CRCs of a full raw chunk give the CRC of the whole chunk,
    ``XOR_g M(4096 (15 - g)) crc_g``, computed for all the record's full raw chunks at
    once from 16 x 4 byte tables (:func:`_advance_tables`, built once, 64 KiB), and one
    ``crc32c`` per chunk compares it with its bytes. The same bytes pass and fail as
    with the per-granule check, up to a CRC collision (2^-32 per damaged chunk, the
    strength of a chunk's CRC); the granule CRCs themselves are covered by the record
    CRC. Other chunks (lz4, elided, the last one when short, version 2) go through
    :func:`chunk_ok`. Cost: one CRC pass over the payload plus O(chunks) table lookups.
    """
    st = table.starts
    gr = table.granules
    comps = table.comps
    n = table.count
    full: list[int] = []
    if gr is not None:
        full = [i for i in range(n)
                if comps[i] == Compression.NONE and st[i + 1] - st[i] == CHUNK_SIZE]
    good: dict[int, bool] = {}
    if len(full) > 1:
        tabs = _advance_tables()
        g = np.frombuffer(gr, dtype=np.uint32).reshape(n, GRANULES)[full]
        by = g.astype("<u4").view(np.uint8).reshape(len(full), GRANULES, 4)
        # (numpy's stubs have no overload of ufunc.reduce for an axis: ignored below)
        want = np.bitwise_xor.reduce(  # type: ignore[call-overload]
            tabs[_SHIFTS, _BYTES, by].reshape(len(full), -1), axis=1)
        got = np.array([crc32c(stored[st[i] : st[i + 1]]) for i in full], dtype=np.uint32)
        good = dict(zip(full, (want == got).tolist(), strict=True))
    for i in range(n):
        ok = good.get(i)
        if ok is None:
            ok = chunk_ok(stored[st[i] : st[i + 1]], table, i)
        if not ok:
            return i
    return None


#: fewest full granules :func:`granules_ok` checks by composition (fewer: one call each)
SPAN_COMPOSE_MIN = 32


def granules_ok(data: bytes | memoryview, granules: array[int], first: int) -> bool:
    """True when ``data``, consecutive stored raw granules of a version 3 record starting
    at granule slot ``first`` (``GRANULES * chunk + granule``; every granule full but
    perhaps the last, the record's end), matches the granule CRCs ``granules[first:]``.

    Same verdict as one ``crc32c`` per granule, up to a CRC collision (2^-32 per damaged
    chunk), in fewer calls: a span of at least :data:`SPAN_COMPOSE_MIN` full granules is
    cut at chunk boundaries and each piece's CRC is composed from its granule CRCs as in
    :func:`first_bad_chunk` (numpy, the same tables) and compared with one ``crc32c`` of
    the piece (a short last granule is checked on its own). Cost: one CRC pass over the
    bytes, one call per chunk, ~20 µs of numpy; shorter spans one call per granule.
    """
    mv = data if isinstance(data, memoryview) else memoryview(data)
    n = len(mv)
    full = n >> 12
    if full < SPAN_COMPOSE_MIN:
        k = first
        for g in range(0, n, GRANULE_SIZE):
            if crc32c(mv[g : g + GRANULE_SIZE]) != granules[k]:
                return False
            k += 1
        return True
    stop = first + full
    if n > full * GRANULE_SIZE and crc32c(mv[full * GRANULE_SIZE :]) != granules[stop]:
        return False
    shift, starts, bounds = _span_pieces(first & (GRANULES - 1), full)
    by = np.frombuffer(granules, dtype=np.uint32)[first:stop].astype("<u4").view(np.uint8).reshape(full, 4)
    t = _advance_tables()[shift, _LANES, by]
    vals = t[:, 0] ^ t[:, 1] ^ t[:, 2] ^ t[:, 3]
    want = np.bitwise_xor.reduceat(vals, starts)
    return bool(want.tolist() == [crc32c(mv[a:b]) for a, b in bounds])


@functools.lru_cache(maxsize=64)
def _span_pieces(lead: int, full: int) -> tuple[npt.NDArray[np.intp], list[int], list[tuple[int, int]]]:
    """For :func:`granules_ok`: a span of ``full`` granules whose first is granule
    ``lead`` of its chunk, cut at chunk boundaries: per granule how many granules follow
    it in its piece (a column), each piece's first granule, each piece's byte bounds."""
    idx = np.arange(lead, lead + full)
    shift = np.minimum((idx | (GRANULES - 1)) + 1, lead + full) - 1 - idx
    cut = list(range(GRANULES - lead, full, GRANULES))
    starts = [0, *cut]
    ends = [*cut, full]
    bounds = [(a * GRANULE_SIZE, b * GRANULE_SIZE) for a, b in zip(starts, ends, strict=True)]
    return shift[:, None], starts, bounds


_ADVANCE: npt.NDArray[np.uint32] | None = None
#: for the granules of a full chunk: how many granules follow each one, and byte lanes
_SHIFTS = (GRANULES - 1 - np.arange(GRANULES))[None, :, None]
_BYTES = np.arange(4)[None, None, :]
_LANES = np.arange(4)[None, :]


def _advance_tables() -> npt.NDArray[np.uint32]:
    """``T[k, b, v]``: the CRC32C register ``v << 8b`` advanced over ``k`` granules of
    zero bytes (``M(4096 k)`` above), u32, shape (GRANULES, 4, 256); built on first use
    from ``crc32c`` itself (``M(n) x = crc32c(zeros(n), x) ^ crc32c(zeros(n), 0)``,
    linear in ``x``). Cost once: 512 CRCs of up to 60 KiB (a few ms)."""
    global _ADVANCE
    if _ADVANCE is None:
        basis = np.zeros((GRANULES, 32), dtype=np.uint32)
        for k in range(GRANULES):
            z = bytes(GRANULE_SIZE * k)
            c0 = crc32c(z, 0)
            basis[k] = [crc32c(z, 1 << j) ^ c0 for j in range(32)]
        bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.uint32)  # (256, 8)
        # T[k, b, v] = XOR over the bits j of v of basis[k, 8b + j]
        sel = bits[None, None, :, :] * basis.reshape(GRANULES, 4, 1, 8)
        _ADVANCE = np.bitwise_xor.reduce(sel, axis=3)  # type: ignore[call-overload]
    return _ADVANCE


def decode_chunk(data: bytes | memoryview, table: ChunkTable, index: int, where: str) -> bytes:
    """Check chunk ``index``'s CRC(s) and decompress it; Corruption naming ``where`` and
    the chunk; PointError for a chunk removed by compaction."""
    comp = table.comps[index]
    raw = table.raw_size(index)
    if comp == Compression.ELIDED:
        raise PointError(f"{where}: chunk {index} was expired by retention")
    if not chunk_ok(data, table, index):
        raise Corruption(f"{where}: bad checksum in chunk {index}")
    if comp == Compression.LZ4:
        try:
            out: bytes = lz4.block.decompress(data, uncompressed_size=raw)
        except Exception as exc:
            raise Corruption(f"{where}: lz4 chunk {index} does not decode ({exc})") from None
        if len(out) != raw:
            raise Corruption(f"{where}: lz4 chunk {index} decodes to {len(out)} bytes, not {raw}")
        return out
    return bytes(data)


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
    if version not in RECORD_VERSIONS:
        return f"unsupported record version {version}"
    if kind not in KIND_VALUES:
        return f"unknown record kind {kind}"
    if stored > MAX_PAYLOAD:
        return f"stored length {stored} too large"
    if comp == Compression.CHUNKED:
        if version < 2:
            return "chunked payload in a version 1 record"
        if kind not in DATA_KINDS:
            return "chunked payload on a non-data record"
        if length <= CHUNK_SIZE:
            return "chunked payload of one chunk or less"
        tsize = table_size(version, length)
        if not tsize <= stored <= tsize + length:
            return "chunked stored length does not fit the raw length"
    elif comp == Compression.ELIDED:
        if version < 2 or kind not in DATA_KINDS:
            return "elided payload on a non-data or version 1 record"
        if stored:
            return "elided record with payload"
        return None
    elif comp == Compression.LZ4:
        if kind not in DATA_KINDS:
            return "compressed payload on a non-data record"
        if stored >= length:
            return "compressed payload not smaller than raw"
    elif comp != Compression.NONE:
        return f"unknown compression {comp}"
    elif kind in DATA_KINDS and stored != length:
        return "data record length differs from stored length"
    if version >= 2 and kind in DATA_KINDS and length > CHUNK_SIZE and comp != Compression.CHUNKED:
        return "data payload over one chunk is not chunked"
    if kind == RecordKind.ZERO and stored:
        return "ZERO record with payload"
    return None


def covered_size(comp: int, length: int, stored: int, version: int) -> int:
    """Stored payload bytes the record CRC covers: all of them, or for CHUNKED records
    only the tables (chunk table, + granule table in version 3). May exceed ``stored``
    for a damaged header."""
    if comp == Compression.CHUNKED:
        if length > MAX_PAYLOAD:
            return MAX_PAYLOAD + 1
        return table_size(version, length)
    return stored


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
    CRC, header structure, expected ``seq`` (when given), a chunk's CRC (naming the
    chunk) or payload structure.
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
    cov = covered_size(comp, length, slen, version)
    if cov > slen:
        raise Corruption(f"{where}: bad checksum (chunk table larger than the record)")
    covered = stored if cov == slen else memoryview(stored)[:cov]
    if crc != crc32c(covered, crc32c(header[CRC_START:RECORD_HEADER_SIZE])):
        raise Corruption(f"{where}: bad checksum")
    bad = header_problem(version, kind, comp, slen, length)
    if bad:
        raise Corruption(f"{where}: {bad}")
    if seq is not None and rseq != seq:
        raise Corruption(f"{where}: record holds seq {rseq}, expected {seq}")
    rec = Record(RecordKind(kind), rseq, ts, off, length, flags, b"", loc, comp, slen)
    if comp == Compression.ELIDED:
        rec.elided = True
    elif comp == Compression.CHUNKED:
        rec.payload = decode_chunks(stored, length, where, version)
        rec.elided = not rec.payload
    else:
        rec.payload = decode_payload(kind, comp, length, stored, where, rec)
    return rec


def decode_chunks(stored: bytes | memoryview, length: int, where: str, version: int) -> bytes:
    """Raw payload of a chunked record from its stored bytes (tables + chunks), every
    chunk CRC-checked; Corruption names the first bad chunk."""
    mv = memoryview(stored)
    table = parse_chunk_table(mv[: table_size(version, length)], length, len(mv), version)
    if isinstance(table, str):
        raise Corruption(f"{where}: {table}")
    st = table.starts
    parts = [
        decode_chunk(mv[st[i] : st[i + 1]], table, i, where)
        for i in range(table.count) if table.comps[i] != Compression.ELIDED
    ]
    if len(parts) != table.count:
        return b""  # some chunks were removed by compaction: the rest checked, no payload
    return b"".join(parts)
