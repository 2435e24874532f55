"""Catalog entries: one file name of one file, valid over a span of versions.

Terminology (docs/FILES.md): a *version* is a marker number; an entry is visible at
version ``v`` when ``start <= v`` and (``end == 0`` or ``v < end``). ``ref`` (the
reference flag) is the newest version at which the file was seen present: when an
entry is closed, ``ref == end`` means it was replaced by a newer version of the same
file, ``ref < end`` that it was deleted (or renamed away).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from cdp.ntfs.attribute import DataStream, stream_from_location
from cdp.ntfs.defs import filetime_to_ns

#: column order of the ``entries`` table after ``id`` (docs/FORMATS.md ("File catalog"))
COLUMNS = (
    "part", "dir", "name", "start", "end", "ref", "record", "seq", "parent", "is_dir",
    "size", "alloc", "crtime", "mtime", "ctime", "atime", "attrs", "resident", "flags",
    "location", "streams", "backup_ns",
)


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

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Entry:
        """From ``SELECT id, <COLUMNS>``. Cost: one tuple unpack."""
        e = cls.__new__(cls)
        (e.id, e.part, e.dir, e.name, e.start, e.end, e.ref, e.record, e.seq, e.parent,
         e.is_dir, e.size, e.alloc, e.crtime, e.mtime, e.ctime, e.atime, e.attrs, e.resident,
         e.flags, e.location, e.streams, e.backup_ns) = row
        return e

    @classmethod
    def from_list_row(cls, row: tuple[Any, ...]) -> Entry:
        """From a listing query (``Catalog.list_dir``, ``subtree(full=False)``): every column but
        ``location``, ``parent`` and ``flags`` (left b"", -1 and 0)."""
        e = cls.__new__(cls)
        (e.id, e.part, e.dir, e.name, e.start, e.end, e.ref, e.record, e.seq, e.is_dir,
         e.size, e.alloc, e.crtime, e.mtime, e.ctime, e.atime, e.attrs, e.resident,
         e.streams, e.backup_ns) = row
        e.location, e.parent, e.flags = b"", -1, 0
        return e

    @classmethod
    def from_dir_rows(cls, directory: str, rows: Iterable[tuple[Any, ...]]) -> list[Entry]:
        """From a listing of one *directory* (``Catalog.list_dir``): the listing columns
        but ``dir`` (it is *directory*, not fetched), as :meth:`from_list_row`. Cost:
        one tuple unpack a row, in one loop (no call per row)."""
        new = cls.__new__
        out: list[Entry] = []
        append = out.append
        for row in rows:
            e = new(cls)
            (e.id, e.part, e.name, e.start, e.end, e.ref, e.record, e.seq, e.is_dir, e.size,
             e.alloc, e.crtime, e.mtime, e.ctime, e.atime, e.attrs, e.resident, e.streams,
             e.backup_ns) = row
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
