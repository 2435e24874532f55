"""Catalog entries: one file name of one file, valid over a span of versions.

Terminology (docs/FILES.md): a *version* is a marker number; an entry is visible at
version ``v`` when ``start <= v`` and (``end == 0`` or ``v < end``). ``ref`` (the
reference flag) is the newest version at which the file was seen present: when an
entry is closed, ``ref == end`` means it was replaced by a newer version of the same
file, ``ref < end`` that it was deleted (or renamed away).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from operator import itemgetter
from typing import Any

import numpy as np

from cdp.errors import Corruption
from cdp.ntfs.attribute import DataStream, stream_from_location
from cdp.ntfs.defs import filetime_to_ns

#: column order of the ``entries`` table after ``id`` (docs/FORMATS.md ("File catalog"))
COLUMNS = (
    "part", "dir", "name", "start", "end", "ref", "record", "seq", "parent", "is_dir",
    "size", "alloc", "crtime", "mtime", "ctime", "atime", "attrs", "resident", "flags",
    "location", "streams", "backup_ns",
)


#: the per-version stat fields packed into the ``stat`` BLOB of catalog format 5, in
#: :data:`COLUMNS` order (docs/FORMATS.md ("Packed stat")); no query filters or sorts on them
STAT_FIELDS = ("seq", "parent", "size", "alloc", "crtime", "mtime", "ctime", "atime", "attrs",
               "resident", "flags", "streams", "backup_ns")

# The ``stat`` BLOB (format 8; docs/FORMATS.md ("Packed stat")): ``sig u8, sig2 u8``, then
# ``seq, attrs, flags`` (each as wide as its two bits of ``sig2`` say: absent (0), u8, u16
# or u32), ``parent`` (i64 when its ``sig`` bit is set, else as wide as its ``sig2`` bits
# say), ``size, alloc`` (each u32, or i64 when its ``sig`` bit is set), ``mtime i64``,
# ``backup_ns i64`` (only when ``sig`` bit 0x80 is set; absent, it is the time of the row's
# start version, ``versions.time_ns``), then ``crtime, ctime, atime`` (i64 each, only those
# whose ``sig`` bit is set: an absent one equals mtime), then ``streams`` in UTF-8 to the
# end; ``sig`` bit 0x40 is ``resident``. Formats 5 to 7 had no ``sig2`` and ``seq, attrs,
# flags, parent`` always u32 (``parent`` i64 by its bit): :func:`stat7_to_8`. Never change
# these numbers: they are the stored format.
SIG_PARENT64, SIG_SIZE64, SIG_ALLOC64 = 0x01, 0x02, 0x04
SIG_CRTIME, SIG_CTIME, SIG_ATIME = 0x08, 0x10, 0x20
SIG_RESIDENT = 0x40
#: format 6: ``backup_ns`` stored (else the start version's time)
SIG_BACKUP = 0x80
#: ``sig`` bits that choose the layout (128 layouts)
SIG_LAYOUT = 0xBF
#: format 8: the ``sig2`` bits of seq, attrs, flags and parent (shifted: 0, 2, 4, 6); each
#: pair is a width code (:data:`W_ABSENT` ... :data:`W_U32`); parent's is 0 when ``sig``
#: says i64
W_ABSENT, W_U8, W_U16, W_U32 = 0, 1, 2, 3
_WFMT = ("", "B", "H", "I")
_U32 = 0xFFFFFFFF


def _parts(key: int) -> list[tuple[str, str]]:
    """Layout *key* (``sig | sig2 << 8``) as ``(name, struct code)`` fields in stored
    order (an absent field is not among them)."""
    sig, sig2 = key & SIG_LAYOUT, key >> 8
    fields: list[tuple[str, str]] = [("sig", "B"), ("sig2", "B")]
    for i, name in enumerate(("seq", "attrs", "flags")):
        code = _WFMT[(sig2 >> (2 * i)) & 3]
        if code:
            fields.append((name, code))
    fields.append(("parent", "q" if sig & SIG_PARENT64 else _WFMT[(sig2 >> 6) & 3]))
    fields.append(("size", "q" if sig & SIG_SIZE64 else "I"))
    fields.append(("alloc", "q" if sig & SIG_ALLOC64 else "I"))
    fields.append(("mtime", "q"))
    if sig & SIG_BACKUP:
        fields.append(("backup_ns", "q"))
    for bit, name in ((SIG_CRTIME, "crtime"), (SIG_CTIME, "ctime"), (SIG_ATIME, "atime")):
        if sig & bit:
            fields.append((name, "q"))
    return [f for f in fields if f[1]]


_ORDER = ("seq", "attrs", "flags", "parent", "size", "alloc", "crtime", "mtime", "ctime",
          "atime", "backup_ns")
_ZERO = (0,)


class _Layouts(dict[int, tuple[int, Callable[[bytes], tuple[Any, ...]],
                               Callable[[tuple[Any, ...]], tuple[Any, ...]]]]):
    """Layout by key ``sig | sig2 << 8`` (the blob's first two bytes as they are; the
    resident bit chooses nothing): ``(size, unpack_from, get)``; ``get(unpack_from(blob)
    + (0,))`` is ``(seq, attrs, flags, parent, size, alloc, crtime, mtime, ctime, atime,
    backup_ns)`` (a field left out is the 0 appended; backup_ns, when left out, repeats
    mtime: the reader replaces it). Built when first used (8,192 possible, a few used)."""

    def __missing__(self, key: int) -> tuple[int, Callable[[bytes], tuple[Any, ...]],
                                             Callable[[tuple[Any, ...]], tuple[Any, ...]]]:
        fields = _parts(key & ~SIG_RESIDENT)
        s = struct.Struct("<" + "".join(c for _, c in fields))
        where = {name: i for i, (name, _) in enumerate(fields)}
        zero = len(fields)  # index of the 0 appended to the tuple
        mt = where["mtime"]
        idx = [where.get(n, zero) for n in _ORDER[:6]]
        idx += [where.get(n, mt) for n in _ORDER[6:10]]
        idx.append(where.get("backup_ns", mt))
        self[key] = out = (s.size, s.unpack_from, itemgetter(*idx))
        return out


#: ``(size, unpack_from, get)`` by the blob's first two bytes (``blob[0] | blob[1] << 8``)
LAYOUTS = _Layouts()


class _Packers(dict[int, tuple[Callable[..., bytes], Callable[[tuple[Any, ...]], tuple[Any, ...]]]]):
    """Packer by key ``sig | sig2 << 8`` (resident bit clear): the layout's
    ``Struct.pack`` and the getter that picks its values out of ``(sig, sig2, seq, attrs,
    flags, parent, size, alloc, mtime, backup_ns, crtime, ctime, atime)``."""

    def __missing__(self, key: int) -> tuple[Callable[..., bytes], Callable[[tuple[Any, ...]], tuple[Any, ...]]]:
        fields = _parts(key)
        pos = {"sig": 0, "sig2": 1, "seq": 2, "attrs": 3, "flags": 4, "parent": 5, "size": 6,
               "alloc": 7, "mtime": 8, "backup_ns": 9, "crtime": 10, "ctime": 11, "atime": 12}
        s = struct.Struct("<" + "".join(c for _, c in fields))
        self[key] = out = (s.pack, itemgetter(*(pos[n] for n, _ in fields)))
        return out


PACKERS = _Packers()


def pack_stat(seq: int, parent: int, size: int, alloc: int, crtime: int, mtime: int,
              ctime: int, atime: int, attrs: int, resident: int, flags: int, streams: str,
              backup_ns: int, start_ns: int | None = None) -> bytes:
    """The ``stat`` BLOB (format 8) of these fields (:data:`STAT_FIELDS` order);
    *start_ns* is the time of the row's start version: a ``backup_ns`` equal to it is
    left out (8 bytes; the reader takes it from ``versions``), else (or with None) it is
    stored. Raises ``struct.error`` for a value outside its field (seq, attrs, flags:
    u32; the rest: i64, as SQLite's INTEGER). Hot path of an insert: the layout is found
    with a few integer tests and packed by one precompiled Struct (~2 us)."""
    if (parent | size | alloc) >> 32:  # one of them negative or above u32
        sig = ((0 if 0 <= parent <= _U32 else SIG_PARENT64) | (0 if 0 <= size <= _U32 else SIG_SIZE64)
               | (0 if 0 <= alloc <= _U32 else SIG_ALLOC64))
    else:
        sig = 0
    if crtime != mtime:
        sig |= SIG_CRTIME
    if ctime != mtime:
        sig |= SIG_CTIME
    if atime != mtime:
        sig |= SIG_ATIME
    if backup_ns != start_ns:
        sig |= SIG_BACKUP
    if (seq | attrs | flags) >> 32:  # one of them negative (x >> 32 is -1) or above u32
        raise struct.error(f"seq, attrs, flags are u32: {seq}, {attrs}, {flags}")
    # each width code: W_ABSENT, W_U8, W_U16, W_U32 for 0, u8, u16, u32 (bools added)
    sig2 = ((seq > 0) + (seq > 0xFF) + (seq > 0xFFFF)
            | ((attrs > 0) + (attrs > 0xFF) + (attrs > 0xFFFF)) << 2
            | ((flags > 0) + (flags > 0xFF) + (flags > 0xFFFF)) << 4
            | (0 if sig & SIG_PARENT64 else ((parent > 0) + (parent > 0xFF) + (parent > 0xFFFF)) << 6))
    pack, pick = PACKERS[sig | sig2 << 8]
    blob = pack(*pick((sig | SIG_RESIDENT if resident else sig, sig2, seq, attrs, flags, parent,
                       size, alloc, mtime, backup_ns, crtime, ctime, atime)))
    return blob + streams.encode() if streams else blob


def _stat_dtype(key: int) -> np.dtype[Any]:
    """Layout *key* (``sig | sig2 << 8``, resident bit clear) as a packed little-endian
    numpy record, its fields named as :func:`pack_stats` fills them (the same bytes as its
    Struct)."""
    np_code = {"B": "u1", "H": "<u2", "I": "<u4", "q": "<i8"}
    fields = _parts(key)
    dt = np.dtype([(n, np_code[c]) for n, c in fields])
    assert dt.itemsize == LAYOUTS[key][0]
    return dt


#: numpy record by ``sig | sig2 << 8`` (built when first used)
_STAT_DTYPES: dict[int, np.dtype[Any]] = {}
_I64_MAX = (1 << 63) - 1


def _widths(col: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The width code (:data:`W_ABSENT` ... :data:`W_U32`) of each value of a u32 column,
    as uint16."""
    return (col > 0).astype(np.uint16) + (col > 0xFF) + (col > 0xFFFF)


def pack_stats(seq: Iterable[int], parent: Iterable[int], size: Iterable[int],
               alloc: Iterable[int], crtime: Iterable[int], mtime: Iterable[int],
               ctime: Iterable[int], atime: Iterable[int], attrs: Iterable[int],
               resident: Iterable[int], flags: Iterable[int], backup_ns: int,
               start_ns: int | None = None) -> list[bytes]:
    """:func:`pack_stat` of many rows at once (column-wise: one sequence per field, all
    of one length), for rows without ``streams`` that share one *backup_ns*: the same
    bytes, row by row. The layouts are filled with numpy, one record array per layout
    found (the rows of a file system share a few), then cut into one ``bytes`` a row.
    A value outside its field (or beyond i64) makes it pack row by row, so it raises
    what :func:`pack_stat` raises. Cost: ~0.4 us a row (numpy) vs ~2 us."""
    try:
        cols = [np.asarray(c, dtype=np.int64) for c in (seq, parent, size, alloc, crtime, mtime,
                                                        ctime, atime, attrs, resident, flags)]
    except OverflowError:  # beyond i64: pack_stat raises struct.error for it
        cols = []
    if cols:
        seq_a, parent_a, size_a, alloc_a, crt, mt, cht, at, attrs_a, res, flags_a = cols
        if any(bool(((c < 0) | (c > _U32)).any()) for c in (seq_a, attrs_a, flags_a)):
            cols = []
    if not cols:
        return [pack_stat(sq, pa, sz, al, cr, mt_, ch, a, at_, rs, fl, "", backup_ns, start_ns)
                for sq, pa, sz, al, cr, mt_, ch, a, at_, rs, fl in zip(
                    seq, parent, size, alloc, crtime, mtime, ctime, atime, attrs, resident, flags,
                    strict=True)]
    n = len(seq_a)
    sig = np.zeros(n, dtype=np.uint16)
    for col, bit in ((parent_a, SIG_PARENT64), (size_a, SIG_SIZE64), (alloc_a, SIG_ALLOC64)):
        sig |= np.where((col < 0) | (col > _U32), bit, 0).astype(np.uint16)
    for col, bit in ((crt, SIG_CRTIME), (cht, SIG_CTIME), (at, SIG_ATIME)):
        sig |= np.where(col != mt, bit, 0).astype(np.uint16)
    if backup_ns != start_ns:
        sig |= SIG_BACKUP
    p64 = (sig & SIG_PARENT64) != 0
    sig2 = (_widths(seq_a) | _widths(attrs_a) << 2 | _widths(flags_a) << 4
            | np.where(p64, 0, _widths(np.where(p64, 0, parent_a)) << 6).astype(np.uint16))
    key = sig | sig2 << 8
    stored = (sig | np.where(res != 0, SIG_RESIDENT, 0)).astype(np.uint8)
    sig2_b = sig2.astype(np.uint8)
    found = np.unique(key).tolist()
    out: list[bytes] = [b""] * n
    named = {"seq": seq_a, "attrs": attrs_a, "flags": flags_a, "parent": parent_a, "size": size_a,
             "alloc": alloc_a, "mtime": mt, "crtime": crt, "ctime": cht, "atime": at}
    for k in found:
        dt = _STAT_DTYPES.get(k)
        if dt is None:
            dt = _STAT_DTYPES[k] = _stat_dtype(k)
        idx = None if len(found) == 1 else np.nonzero(key == k)[0]
        rec = np.empty(n if idx is None else len(idx), dtype=dt)
        for name in dt.names or ():
            if name == "sig":
                rec[name] = stored if idx is None else stored[idx]
            elif name == "sig2":
                rec[name] = sig2_b if idx is None else sig2_b[idx]
            elif name == "backup_ns":
                rec[name] = backup_ns
            else:
                col = named[name]
                rec[name] = col if idx is None else col[idx]
        buf, w = rec.tobytes(), dt.itemsize
        blobs = [buf[o : o + w] for o in range(0, len(buf), w)]
        if idx is None:
            return blobs
        for j, b in zip(idx.tolist(), blobs, strict=True):
            out[j] = b
    return out


def _layout7(sig: int) -> tuple[struct.Struct, Callable[[tuple[Any, ...]], tuple[Any, ...]]]:
    """The Struct of format 5-7 layout *sig* and the getter that turns its tuple into
    ``(seq, attrs, flags, parent, size, alloc, crtime, mtime, ctime, atime, backup_ns)``."""
    fmt = "<BIII" + "".join("q" if sig & b else "I" for b in (SIG_PARENT64, SIG_SIZE64, SIG_ALLOC64))
    fmt += "q"
    idx = [1, 2, 3, 4, 5, 6]
    nxt = 8
    if sig & SIG_BACKUP:
        fmt += "q"
        backup = 8
        nxt = 9
    else:
        backup = 7
    for bit in (SIG_CRTIME, SIG_CTIME, SIG_ATIME):
        if sig & bit:
            fmt += "q"
            idx.append(nxt)
            nxt += 1
        else:
            idx.append(7)
    crt, cht, at = idx[6:]
    order = [*idx[:6], crt, 7, cht, at, backup]
    return struct.Struct(fmt), itemgetter(*order)


#: format 5-7 layout by ``sig`` (read only by :func:`stat7_to_8`)
LAYOUTS7 = tuple(_layout7(s & SIG_LAYOUT) for s in range(256))


def unpack_stat7(blob: bytes, start_ns: int = 0) -> tuple[Any, ...]:
    """The fields of a format 6 or 7 ``stat`` BLOB in :data:`STAT_FIELDS` order, backup_ns
    *start_ns* when the blob leaves it out. Raises Corruption."""
    sig = blob[0] if blob else 0
    s, get = LAYOUTS7[sig]
    try:
        seq, attrs, flags, parent, size, alloc, crt, mt, cht, at, bns = get(s.unpack_from(blob))
        streams = blob[s.size:].decode() if len(blob) > s.size else ""
    except (struct.error, UnicodeDecodeError) as err:
        raise Corruption(f"catalog: a format 7 stat blob of {len(blob)} bytes does not decode: {err}") from None
    return (seq, parent, size, alloc, crt, mt, cht, at, attrs, 1 if sig & SIG_RESIDENT else 0,
            flags, streams, bns if sig & SIG_BACKUP else start_ns)


def stat7_to_8(blob: bytes) -> bytes:
    """A format 6 or 7 ``stat`` in format 8: the same fields, backup_ns left out exactly
    when it was (migration, and a format 6/7 catalog read offline). Raises Corruption.
    Cost: ~3 us."""
    seq, parent, size, alloc, crt, mt, cht, at, attrs, res, flags, streams, bns = unpack_stat7(blob)
    stored = bool(blob[0] & SIG_BACKUP)
    return pack_stat(seq, parent, size, alloc, crt, mt, cht, at, attrs, res, flags, streams,
                     bns if stored else 0, None if stored else 0)


def stat5_to_6(blob: bytes) -> bytes:
    """A format 5 ``stat`` as format 6 reads it: the same bytes with ``SIG_BACKUP`` set
    (format 5 always stores backup_ns where format 6's bit says it is). Cost: one copy."""
    return bytes((blob[0] | SIG_BACKUP,)) + blob[1:] if blob else blob


def stat5_to_8(blob: bytes) -> bytes:
    """A format 5 ``stat`` in format 8 (backup_ns stored; offline reads)."""
    return stat7_to_8(stat5_to_6(blob))


def restat(blob: bytes, start_ns: int | None) -> bytes:
    """A format 5 ``stat`` in format 8, backup_ns left out when it equals *start_ns*
    (the row's start version's time; migration). Raises Corruption."""
    seq, parent, size, alloc, crt, mt, cht, at, attrs, res, flags, streams, bns = unpack_stat7(stat5_to_6(blob))
    return pack_stat(seq, parent, size, alloc, crt, mt, cht, at, attrs, res, flags, streams, bns, start_ns)


def unpack_stat(blob: bytes, start_ns: int = 0) -> tuple[Any, ...]:
    """The fields of a ``stat`` BLOB (format 8) in :data:`STAT_FIELDS` order, backup_ns
    *start_ns* when the blob leaves it out. Raises Corruption when it does not hold its
    layout."""
    try:
        sig = blob[0]
        size, unpack, get = LAYOUTS[sig | blob[1] << 8]
        seq, attrs, flags, parent, sz, alloc, crt, mt, cht, at, bns = get(unpack(blob) + _ZERO)
        streams = blob[size:].decode() if len(blob) > size else ""
    except (struct.error, UnicodeDecodeError, IndexError) as err:
        raise Corruption(f"catalog: a stat blob of {len(blob)} bytes does not decode: {err}") from None
    return (seq, parent, sz, alloc, crt, mt, cht, at, attrs, 1 if sig & SIG_RESIDENT else 0,
            flags, streams, bns if sig & SIG_BACKUP else start_ns)


class StartTimes(dict[int, int]):
    """``{version: versions.time_ns}``: the backup time of a format 6 row whose ``stat``
    leaves it out (its start version's). A version not in it is looked up again with
    *load* (the versions committed since), once; still missing, it is a Corruption."""

    def __init__(self, load: Callable[[], Iterable[tuple[int, int]]] | None = None) -> None:
        super().__init__()
        self._load = load

    def __missing__(self, version: int) -> int:
        if self._load is not None:
            self.update(self._load())
            if version in self:
                return dict.__getitem__(self, version)
        raise Corruption(f"catalog: version {version} is not catalogued: an entry's backup time is unknown")


#: no versions known (entries whose ``stat`` holds its backup_ns)
NO_TIMES = StartTimes()


class Entry:
    """One row of the catalog (``id`` 0 = not stored yet)."""

    __slots__ = ("id", *COLUMNS)

    id: int
    part: str
    dir: str
    name: str
    start: int
    end: int
    ref: int
    record: int
    seq: int
    parent: int
    is_dir: int
    size: int
    alloc: int
    crtime: int
    mtime: int
    ctime: int
    atime: int
    attrs: int
    resident: int
    flags: int
    location: bytes
    streams: str
    backup_ns: int

    def __init__(self, *values: Any, id: int = 0) -> None:
        self.id = id
        (self.part, self.dir, self.name, self.start, self.end, self.ref, self.record, self.seq,
         self.parent, self.is_dir, self.size, self.alloc, self.crtime, self.mtime, self.ctime,
         self.atime, self.attrs, self.resident, self.flags, self.location, self.streams,
         self.backup_ns) = values

    def _set_stat(self, blob: bytes, times: Mapping[int, int]) -> None:
        """Set the :data:`STAT_FIELDS` from a ``stat`` BLOB (:func:`unpack_stat`;
        ``start`` set first: a blob without backup_ns takes ``times[start]``). Cost:
        ~0.8 us (three C calls; no field by field decoding)."""
        try:
            sig = blob[0]
            size, unpack, get = LAYOUTS[sig | blob[1] << 8]
            (self.seq, self.attrs, self.flags, self.parent, self.size, self.alloc, self.crtime,
             self.mtime, self.ctime, self.atime, self.backup_ns) = get(unpack(blob) + _ZERO)
            self.streams = blob[size:].decode() if len(blob) > size else ""
        except (struct.error, UnicodeDecodeError, IndexError) as err:
            raise Corruption(f"catalog: entry {self.id}: its stat blob of {len(blob)} bytes "
                             f"does not decode: {err}") from None
        self.resident = 1 if sig & SIG_RESIDENT else 0
        if not sig & SIG_BACKUP:
            self.backup_ns = times[self.start]

    @classmethod
    def from_row(cls, row: tuple[Any, ...], times: Mapping[int, int] = NO_TIMES) -> Entry:
        """From ``SELECT id, part, dir, name, start, "end", ref, record, is_dir, stat,
        location`` (``Catalog``'s whole-row query; ``stat`` unpacked; *times*: the
        versions' times, for a ``stat`` without backup_ns). Cost: one tuple unpack and
        :meth:`_set_stat`."""
        e = cls.__new__(cls)
        e.id, e.part, e.dir, e.name, e.start, e.end, e.ref, e.record, e.is_dir, blob, e.location = row
        e._set_stat(blob, times)
        return e

    @classmethod
    def from_list_row(cls, row: tuple[Any, ...], times: Mapping[int, int] = NO_TIMES) -> Entry:
        """From a listing query (``Catalog.list_dir``, ``subtree(full=False)``):
        the columns of :meth:`from_row` but ``location`` (left b""; ``parent`` and
        ``flags``, which a listing does not show, are left -1 and 0, as before format 5)."""
        e = cls.__new__(cls)
        e.id, e.part, e.dir, e.name, e.start, e.end, e.ref, e.record, e.is_dir, blob = row
        e._set_stat(blob, times)
        e.location, e.parent, e.flags = b"", -1, 0
        return e

    @classmethod
    def from_dir_rows(cls, directory: str, rows: Iterable[tuple[Any, ...]],
                      times: Mapping[int, int] = NO_TIMES) -> list[Entry]:
        """From a listing of one *directory* (``Catalog.list_dir``): the listing columns
        but ``dir`` (it is *directory*, not fetched), as :meth:`from_list_row`. Cost:
        one tuple unpack and one ``stat`` unpack a row, in one loop (no call per row)."""
        new = cls.__new__
        layouts, zero = LAYOUTS, _ZERO
        out: list[Entry] = []
        append = out.append
        for row in rows:
            e = new(cls)
            e.id, e.part, e.name, e.start, e.end, e.ref, e.record, e.is_dir, blob = row
            try:
                sig = blob[0]
                size, unpack, get = layouts[sig | blob[1] << 8]
                (e.seq, e.attrs, e.flags, e.parent, e.size, e.alloc, e.crtime, e.mtime, e.ctime,
                 e.atime, e.backup_ns) = get(unpack(blob) + zero)
                e.streams = blob[size:].decode() if len(blob) > size else ""
            except (struct.error, UnicodeDecodeError, IndexError) as err:
                raise Corruption(f"catalog: entry {e.id}: its stat blob of {len(blob)} bytes "
                                 f"does not decode: {err}") from None
            e.resident = 1 if sig & SIG_RESIDENT else 0
            if not sig & SIG_BACKUP:
                e.backup_ns = times[e.start]
            e.dir, e.location, e.parent, e.flags = directory, b"", -1, 0
            append(e)
        return out

    def values(self) -> tuple[Any, ...]:
        return (self.part, self.dir, self.name, self.start, self.end, self.ref, self.record,
                self.seq, self.parent, self.is_dir, self.size, self.alloc, self.crtime,
                self.mtime, self.ctime, self.atime, self.attrs, self.resident, self.flags,
                self.location, self.streams, self.backup_ns)

    @property
    def path(self) -> str:
        return join(self.dir, self.name)

    @property
    def key(self) -> tuple[str, str]:
        return (self.dir, self.name)

    def same_state(self, other: Entry) -> bool:
        """The claim's "unchanged": the four timestamps and the size are equal."""
        return (self.size == other.size and self.mtime == other.mtime and self.crtime == other.crtime
                and self.ctime == other.ctime and self.atime == other.atime)

    def stream(self) -> DataStream:
        """The unnamed data stream as stored (resident bytes or runlist)."""
        return stream_from_location("", bool(self.resident), self.size, self.alloc, self.flags,
                                    self.location)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``files``, ``find``...). Cost: ~1.5 us (a listing's rows each
        take one: the path is joined inline)."""
        d, name = self.dir, self.name
        return {
            "path": "/" + name if d == "/" else f"{d}/{name}", "dir": d, "name": name,
            "type": "dir" if self.is_dir else "file",
            "size": self.size, "allocated": self.alloc,
            "record": self.record, "sequence": self.seq,
            "created_ns": self.crtime, "modified_ns": self.mtime,
            "changed_ns": self.ctime, "accessed_ns": self.atime,
            "attributes": self.attrs, "resident": bool(self.resident),
            "streams": json.loads(self.streams) if self.streams else [],
            "start_version": self.start, "end_version": self.end, "reference": self.ref,
            "backup_ns": self.backup_ns,
        }

    def __repr__(self) -> str:
        return f"Entry({self.path!r} rec={self.record}-{self.seq} v{self.start}..{self.end or ''} ref={self.ref})"


def join(directory: str, name: str) -> str:
    return "/" + name if directory == "/" else f"{directory}/{name}"


def split(path: str) -> tuple[str, str]:
    """``/a/b/c`` → (``/a/b``, ``c``); ``/c`` → (``/``, ``c``)."""
    path = "/" + path.strip("/")
    d, _, n = path.rpartition("/")
    return (d or "/", n)


def ft(v: int) -> int:
    """FILETIME → ns since the Unix epoch (0 stays 0)."""
    return filetime_to_ns(v) if v else 0
