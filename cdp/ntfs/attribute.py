"""Attribute values the catalog needs: names, timestamps, data streams, attribute lists.

Each function reads one attribute *value* at ``buf[pos:pos+length]`` (already checked to
lie inside its record) through the structs in :mod:`cdp.ntfs.defs`.
"""

from __future__ import annotations

from collections.abc import Callable

from cdp.errors import Corruption
from cdp.ntfs.defs import (
    ATTRIBUTE_FLAG_COMPRESSION_MASK,
    ATTRIBUTE_FLAG_ENCRYPTED,
    ATTRIBUTE_FLAG_SPARSE,
    ATTRIBUTE_LIST_ENTRY,
    DUP_FILE_NAME_INDEX_PRESENT,
    FILE_NAME_HEADER,
    MFT_SEGMENT_MASK,
)
from cdp.ntfs.names import decode_name
from cdp.ntfs.runlist import Run, decode_runs, read_runs

_FN_SIZE = FILE_NAME_HEADER.size
_fn_unpack = FILE_NAME_HEADER.unpack_from
_ale_unpack = ATTRIBUTE_LIST_ENTRY.unpack_from


class FileName:
    """One ``$FILE_NAME``: the name of the file in one parent directory."""

    __slots__ = ("is_dir", "name", "namespace", "parent", "parent_sequence", "size")

    def __init__(self, parent: int, parent_sequence: int, namespace: int, name: str,
                 is_dir: bool, size: int) -> None:
        self.parent = parent
        self.parent_sequence = parent_sequence
        self.namespace = namespace
        self.name = name
        self.is_dir = is_dir
        self.size = size

    def __repr__(self) -> str:
        return f"FileName({self.parent}-{self.parent_sequence}/{self.name!r} ns={self.namespace})"


def parse_file_name(buf: bytes | bytearray, pos: int, length: int) -> FileName:
    """A ``$FILE_NAME`` value. Raises Corruption if the name runs past the value."""
    if length < _FN_SIZE:
        raise Corruption(f"$FILE_NAME of {length} bytes is too short")
    f = _fn_unpack(buf, pos)
    nlen = f[9]
    if _FN_SIZE + 2 * nlen > length:
        raise Corruption("$FILE_NAME name runs past its attribute")
    name = decode_name(buf[pos + _FN_SIZE : pos + _FN_SIZE + 2 * nlen])
    ref = f[0]
    return FileName(ref & MFT_SEGMENT_MASK, ref >> 48, f[10], name,
                    bool(f[7] & DUP_FILE_NAME_INDEX_PRESENT), f[6])


class DataStream:
    """A ``$DATA`` attribute (the unnamed stream or an alternate data stream).

    Resident streams carry their bytes in :attr:`content`; non-resident ones carry their
    raw mapping pairs per fragment (``(lowest_vcn, pairs)``; a stream described by an
    attribute list has one fragment per extension record). Sizes come from the fragment
    with lowest VCN 0.
    """

    __slots__ = ("allocated", "content", "flags", "fragments", "name", "resident", "size")

    def __init__(self, name: str, resident: bool, size: int, allocated: int, flags: int,
                 content: bytes | None = None,
                 fragments: list[tuple[int, bytes]] | None = None) -> None:
        self.name = name
        self.resident = resident
        self.size = size
        self.allocated = allocated
        self.flags = flags
        self.content = content
        self.fragments = fragments if fragments is not None else []

    @property
    def compressed(self) -> bool:
        return bool(self.flags & ATTRIBUTE_FLAG_COMPRESSION_MASK)

    @property
    def sparse(self) -> bool:
        return bool(self.flags & ATTRIBUTE_FLAG_SPARSE)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & ATTRIBUTE_FLAG_ENCRYPTED)

    def runs(self, max_lcn: int | None = None) -> list[Run]:
        """All runs in VCN order (decodes every fragment). Raises Corruption."""
        out: list[Run] = []
        for vcn, pairs in sorted(self.fragments):
            out.extend(decode_runs(pairs, vcn, max_lcn))
        return out

    def location(self) -> bytes:
        """What the catalog stores: resident bytes, or fragments as
        ``u64 lowest_vcn, u16 length, pairs`` repeated (see docs/FORMATS.md ("File catalog"))."""
        if self.resident:
            return self.content or b""
        out = bytearray()
        for vcn, pairs in sorted(self.fragments):
            out += vcn.to_bytes(8, "little") + len(pairs).to_bytes(2, "little") + pairs
        return bytes(out)

    def merge(self, other: DataStream) -> None:
        """Add the fragments of the same stream found in an extension record."""
        self.fragments.extend(other.fragments)
        if other.fragments and other.fragments[0][0] == 0 and other.size:
            self.size, self.allocated, self.flags = other.size, other.allocated, other.flags

    def read(self, read: Callable[[int, int], bytes], cluster_size: int, max_lcn: int,
             base: int = 0) -> bytes:
        """The stream's bytes (exactly :attr:`size`; sparse runs read as zeros).
        Raises Corruption for compressed or encrypted streams and bad runlists."""
        if self.resident:
            return (self.content or b"")[: self.size]
        if self.compressed or self.encrypted:
            raise Corruption(f"stream {self.name or '$DATA'!r} is compressed or encrypted; "
                             "restore of such streams is not supported")
        out = bytearray(self.size)
        for off, piece in read_runs(read, self.runs(max_lcn), cluster_size, self.size, base):
            out[off : off + len(piece)] = piece
        return bytes(out)

    def __repr__(self) -> str:
        kind = "resident" if self.resident else f"{len(self.fragments)} fragment(s)"
        return f"DataStream({self.name!r}, {self.size} bytes, {kind})"


def stream_from_location(name: str, resident: bool, size: int, allocated: int, flags: int,
                         location: bytes) -> DataStream:
    """Inverse of :meth:`DataStream.location` (catalog values back to a stream)."""
    if resident:
        return DataStream(name, True, size, allocated, flags, content=location)
    frags: list[tuple[int, bytes]] = []
    pos = 0
    while pos + 10 <= len(location):
        vcn = int.from_bytes(location[pos : pos + 8], "little")
        n = int.from_bytes(location[pos + 8 : pos + 10], "little")
        frags.append((vcn, location[pos + 10 : pos + 10 + n]))
        pos += 10 + n
    return DataStream(name, False, size, allocated, flags, fragments=frags)


def parse_attribute_list(value: bytes | bytearray) -> list[tuple[int, int, int, str]]:
    """``$ATTRIBUTE_LIST`` entries as ``(type, lowest_vcn, segment number, name)``.
    Raises Corruption on an entry that runs past the value."""
    out: list[tuple[int, int, int, str]] = []
    pos = 0
    n = len(value)
    while pos + ATTRIBUTE_LIST_ENTRY.size <= n:
        typ, rlen, nlen, noff, vcn, ref, _inst = _ale_unpack(value, pos)
        if rlen < ATTRIBUTE_LIST_ENTRY.size or pos + rlen > n or noff + 2 * nlen > rlen:
            raise Corruption(f"$ATTRIBUTE_LIST entry at byte {pos} has bad length {rlen}")
        name = decode_name(value[pos + noff : pos + noff + 2 * nlen])
        out.append((typ, vcn, ref & MFT_SEGMENT_MASK, name))
        pos += rlen
    return out
