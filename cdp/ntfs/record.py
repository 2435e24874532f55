"""MFT file records: update sequence fixups, header, and the attributes we catalog.

Design notes
------------
* Hot path: a full index parses hundreds of thousands of records, so :func:`parse_chunk`
  applies the fixups of a whole chunk of records at once with numpy (one vectorised
  compare and copy per sector), skips free records without touching them in Python,
  and walks each used record's attributes with ``unpack_from`` on the shared buffer.
* A record that fails a check (bad fixup, attribute past the record end, bad lengths)
  comes back as a :class:`FileRecord` with :attr:`damaged` set; it never raises out of
  the scan.
* Runlists are kept as raw mapping pairs (decoded only on restore).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from cdp.errors import Corruption
from cdp.ntfs.attribute import DataStream, FileName, parse_attribute_list
from cdp.ntfs.defs import (
    ATTRIBUTE_LIST,
    DATA,
    DUP_FILE_NAME_INDEX_PRESENT,
    END,
    FILE_FILE_NAME_INDEX_PRESENT,
    FILE_NAME,
    FILE_RECORD_SEGMENT_HEADER,
    FILE_RECORD_SEGMENT_IN_USE,
    FILE_SIGNATURE,
    MFT_SEGMENT_MASK,
    NONRESIDENT_FORM,
    STANDARD_INFORMATION,
    STANDARD_INFORMATION_V1,
)
from cdp.ntfs.names import decode_name

_nonres_unpack = NONRESIDENT_FORM.unpack_from
_si_unpack = STANDARD_INFORMATION_V1.unpack_from
_SIGNATURE_U32 = int.from_bytes(FILE_SIGNATURE, "little")
_WANTED = frozenset({STANDARD_INFORMATION, FILE_NAME, DATA, ATTRIBUTE_LIST})


class FileRecord:
    """One parsed MFT record (with its extension records merged in, once merged).

    ``times`` = (creation, modification, MFT change, access) as FILETIME ticks from
    ``$STANDARD_INFORMATION``; ``data`` is the unnamed ``$DATA`` stream; ``streams``
    the alternate data streams; ``extensions`` the segment numbers an attribute list
    names (None when the record has no attribute list).
    """

    __slots__ = (
        "attribute_list",
        "base",
        "damaged",
        "data",
        "extensions",
        "file_attributes",
        "flags",
        "names",
        "number",
        "sequence",
        "streams",
        "times",
    )

    def __init__(self, number: int, sequence: int = 0, flags: int = 0, base: int = 0) -> None:
        self.number = number
        self.sequence = sequence
        self.flags = flags
        self.base = base
        self.names: list[FileName] = []
        self.times: tuple[int, int, int, int] | None = None
        self.file_attributes = 0
        self.data: DataStream | None = None
        self.streams: list[DataStream] = []
        self.extensions: list[int] | None = None
        self.attribute_list: DataStream | None = None  # when non-resident
        self.damaged: str | None = None

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FILE_RECORD_SEGMENT_IN_USE)

    @property
    def is_dir(self) -> bool:
        return bool(self.flags & FILE_FILE_NAME_INDEX_PRESENT)

    @property
    def base_number(self) -> int:
        return self.base & MFT_SEGMENT_MASK

    @property
    def size(self) -> int:
        if self.data is not None:
            return self.data.size
        return 0

    def preferred_names(self) -> list[FileName]:
        """The names to show: Win32/POSIX names (one per hard link), DOS 8.3 names only
        when the record has nothing else. Deduplicated by (parent, name)."""
        good = [n for n in self.names if n.namespace != 2] or self.names
        seen: set[tuple[int, str]] = set()
        out = []
        for n in good:
            k = (n.parent, n.name)
            if k not in seen:
                seen.add(k)
                out.append(n)
        return out

    def merge(self, ext: FileRecord) -> None:
        """Take the attributes of extension record *ext* (same base)."""
        self.names.extend(ext.names)
        if self.times is None and ext.times is not None:
            self.times, self.file_attributes = ext.times, ext.file_attributes
        if ext.data is not None:
            if self.data is None:
                self.data = ext.data
            else:
                self.data.merge(ext.data)
        for s in ext.streams:
            mine = next((m for m in self.streams if m.name == s.name), None)
            if mine is None:
                self.streams.append(s)
            else:
                mine.merge(s)

    @classmethod
    def from_bytes(cls, data: bytes, number: int, bytes_per_sector: int = 512) -> FileRecord:
        """Parse one record (fixups applied to a copy). Never raises for bad content:
        free records come back not in use, damaged ones with :attr:`damaged` set."""
        buf = bytearray(data)
        rec = cls(number)
        if len(buf) < FILE_RECORD_SEGMENT_HEADER.size or buf[:4] != FILE_SIGNATURE:
            if any(buf[:4]):
                rec.damaged = f"bad signature {bytes(buf[:4])!r}"
            return rec
        try:
            apply_fixups(buf, 0, len(buf), bytes_per_sector)
            _parse_into(rec, buf, 0, len(buf))
        except Corruption as e:
            rec.damaged = str(e)
        return rec

    def __repr__(self) -> str:
        names = ",".join(n.name for n in self.preferred_names())
        return (f"FileRecord({self.number}-{self.sequence} {names!r} flags={self.flags:#x}"
                f"{' damaged: ' + self.damaged if self.damaged else ''})")


def apply_fixups(buf: bytearray, off: int, size: int, bytes_per_sector: int) -> None:
    """Check and undo the update sequence of the record at ``buf[off:off+size]``.
    Raises Corruption when a sector's last two bytes do not match the sequence number."""
    usa_off = buf[off + 4] | buf[off + 5] << 8
    usa_cnt = buf[off + 6] | buf[off + 7] << 8
    sectors = size // bytes_per_sector
    if usa_cnt != sectors + 1 or usa_off < 42 or usa_off + 2 * usa_cnt > size or usa_off & 1:
        raise Corruption(f"update sequence array ({usa_off}, {usa_cnt}) does not fit the record")
    usn = buf[off + usa_off : off + usa_off + 2]
    for i in range(sectors):
        end = off + (i + 1) * bytes_per_sector
        if buf[end - 2 : end] != usn:
            raise Corruption(f"fixup mismatch in sector {i} (torn or damaged record)")
        p = off + usa_off + 2 + 2 * i
        buf[end - 2 : end] = buf[p : p + 2]


# hot-path views of the structures in defs (fewer fields, one call each):
# FILE_RECORD_SEGMENT_HEADER from SequenceNumber: SequenceNumber, FirstAttributeOffset,
# Flags, BaseFileRecordSegment
_hdr_fast = struct.Struct("<H2xHH8xQ").unpack_from
# ATTRIBUTE_RECORD_HEADER + Form.Resident: TypeCode RecordLength FormCode NameLength
# NameOffset Flags Instance ValueLength ValueOffset
_attr_fast = struct.Struct("<IIBBHHHIH").unpack_from
# FILE_NAME: ParentDirectory, Info.FileSize, Info.FileAttributes, FileNameLength, Flags
_fn_fast = struct.Struct("<Q40xqI4xBB").unpack_from
_u32 = struct.Struct("<I").unpack_from


def _parse_into(rec: FileRecord, buf: bytearray | bytes, off: int, size: int) -> None:
    """Fill *rec* from the fixed-up record at ``buf[off:off+size]``. Raises Corruption.
    Cost: ~one ``unpack_from`` per attribute plus one per wanted value."""
    seq, first, flags, base = _hdr_fast(buf, off + 16)
    rec.sequence = seq
    rec.flags = flags
    rec.base = base
    limit = off + size
    if first < 24 or first >= size:
        raise Corruption(f"first attribute offset {first} is outside the record")
    pos = off + first
    names = rec.names
    while True:
        if pos + 24 > limit:
            if pos + 4 <= limit and _u32(buf, pos)[0] == END:
                break
            raise Corruption("attributes run past the record end (no end marker)")
        typ, length, form, nlen, noff, aflags, _inst, vlen, voff = _attr_fast(buf, pos)
        if typ == END:
            break
        if length < 24 or length & 7 or pos + length > limit:
            raise Corruption(f"attribute {typ:#x} at {pos - off} has bad length {length}")
        if typ in _WANTED:
            if form == 0:
                if voff + vlen > length:
                    raise Corruption(f"attribute {typ:#x} value runs past the attribute")
                v = pos + voff
                if typ == FILE_NAME:
                    if vlen < 66:
                        raise Corruption("$FILE_NAME too short")
                    ref, fsize, fattrs, fnlen, ns = _fn_fast(buf, v)
                    if 66 + 2 * fnlen > vlen:
                        raise Corruption("$FILE_NAME name runs past its attribute")
                    names.append(FileName(
                        ref & MFT_SEGMENT_MASK, ref >> 48, ns,
                        decode_name(buf[v + 66 : v + 66 + 2 * fnlen]),
                        bool(fattrs & DUP_FILE_NAME_INDEX_PRESENT), fsize))
                elif typ == STANDARD_INFORMATION:
                    if vlen < 36:
                        raise Corruption("$STANDARD_INFORMATION too short")
                    c, m, ch, a, fa = _si_unpack(buf, v)
                    rec.times = (c, m, ch, a)
                    rec.file_attributes = fa
                elif typ == DATA:
                    s = DataStream(_attr_name(buf, pos, nlen, noff, length) if nlen else "",
                                   True, vlen, vlen, aflags, content=bytes(buf[v : v + vlen]))
                    if nlen:
                        rec.streams.append(s)
                    else:
                        rec.data = s
                else:
                    rec.extensions = [e[2] for e in parse_attribute_list(buf[v : v + vlen])]
            else:
                if length < 64:
                    raise Corruption(f"non-resident attribute {typ:#x} too short")
                low, _high, mpo, _cu, _r5, alloc, fsize, _valid = _nonres_unpack(buf, pos + 16)
                if mpo >= length or mpo < 64:
                    raise Corruption(f"attribute {typ:#x} mapping pairs offset {mpo} is bad")
                if low < 0 or fsize < 0 or alloc < 0:
                    raise Corruption(f"attribute {typ:#x} has negative sizes")
                pairs = bytes(buf[pos + mpo : pos + length])
                s = DataStream(_attr_name(buf, pos, nlen, noff, length), False,
                               fsize if low == 0 else 0, alloc if low == 0 else 0,
                               aflags, fragments=[(low, pairs)])
                if typ == DATA:
                    if nlen:
                        rec.streams.append(s)
                    else:
                        rec.data = s
                elif typ == ATTRIBUTE_LIST:
                    rec.attribute_list = s
                    rec.extensions = []
        pos += length


def _attr_name(buf: bytearray | bytes, pos: int, nlen: int, noff: int, length: int) -> str:
    if not nlen:
        return ""
    if noff + 2 * nlen > length:
        raise Corruption("attribute name runs past the attribute")
    return decode_name(buf[pos + noff : pos + noff + 2 * nlen])


def parse_chunk(
    chunk: bytes | bytearray, first_number: int, record_size: int, bytes_per_sector: int,
    *, include_free: bool = False,
) -> Iterator[FileRecord]:
    """Parse the records of a chunk of MFT bytes (``len(chunk)`` a multiple of the
    record size). Yields in-use records (and, with *include_free*, free ones as
    not-in-use records). Cost: O(len(chunk)) numpy work + Python work per used record."""
    n = len(chunk) // record_size
    if n == 0:
        return
    buf = bytearray(chunk[: n * record_size])
    u32 = np.frombuffer(buf, dtype="<u4").reshape(n, record_size // 4)
    u16 = np.frombuffer(buf, dtype="<u2").reshape(n, record_size // 2)
    magic_ok = u32[:, 0] == _SIGNATURE_U32
    used = magic_ok & ((u16[:, 11] & FILE_RECORD_SEGMENT_IN_USE) != 0)
    idx = np.nonzero(used)[0]
    sectors = record_size // bytes_per_sector
    bad_fix = np.zeros(n, dtype=bool)
    slow = np.zeros(n, dtype=bool)
    if len(idx):
        usa_off = u16[idx, 2]
        usa_cnt = u16[idx, 3]
        uo = int(usa_off[0])
        uniform = (usa_off == uo) & (usa_cnt == sectors + 1)
        fast = idx[uniform]
        slow[idx[~uniform]] = True
        if len(fast) and uo >= 42 and not uo & 1 and uo + 2 * (sectors + 1) <= record_size:
            h = uo // 2
            usn = u16[fast, h]
            bad = np.zeros(len(fast), dtype=bool)
            for s in range(sectors):
                col = (s + 1) * bytes_per_sector // 2 - 1
                bad |= u16[fast, col] != usn
                u16[fast, col] = u16[fast, h + 1 + s]
            bad_fix[fast[bad]] = True
        elif len(fast):
            slow[fast] = True
    rows: list[int] = list(range(n)) if include_free else idx.tolist()
    used_l = used.tolist()
    bad_l = bad_fix.tolist()
    slow_l = slow.tolist()
    data: bytes | bytearray = buf if slow.any() else bytes(buf)
    for i in rows:
        number = first_number + i
        rec = FileRecord(number)
        if not used_l[i]:
            if include_free:
                if magic_ok[i]:
                    rec.sequence = int(u16[i, 8])
                elif any(buf[i * record_size : i * record_size + 4]):
                    rec.damaged = "bad signature"
                yield rec
            continue
        off = i * record_size
        try:
            if bad_l[i]:
                raise Corruption("fixup mismatch (torn or damaged record)")
            if slow_l[i]:
                apply_fixups(buf, off, record_size, bytes_per_sector)
            _parse_into(rec, data, off, record_size)
        except Corruption as e:
            rec.damaged = str(e)
            rec.flags = FILE_RECORD_SEGMENT_IN_USE
            rec.sequence = int(u16[i, 8])
        yield rec
