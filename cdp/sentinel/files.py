"""File evidence of the sentinel, read-only over the file catalog: what changed between
two points of a volume (catalog views) that looks like ransomware, and the first write
of it. See docs/SENTINEL.md ("File evidence").

Design notes
------------
* **Candidates from the catalog diff.** The records opened or closed between the two
  versions (plus the records of on-demand overlays), as ``cdpctl files-diff`` finds them:
  a record seen on both sides with the same sequence number (NTFS: the MFT record's;
  ext: the inode's generation) is one file (modified and/or renamed); otherwise its old
  names are deletions and its new names additions. Cost: O(records changed), one
  indexed catalog lookup per 500 records.
* **Content turned low → high entropy.** For a file modified (or renamed) on both sides,
  and for a new file that replaces a deleted one of the same name plus an extension
  (``a.docx`` deleted, ``a.docx.locked`` added), the first :data:`HEAD` bytes are read at
  both points and their byte-histogram entropy compared: below ``entropy_bits`` - 1
  before (and not all zeros), at or above ``entropy_bits`` after. Where the bytes are
  depends on the file system: NTFS (:class:`_Part`): resident bytes, or the first run
  of the catalog's stored runlist; ext2/3/4 (:class:`_ExtPart`): the catalog stores no
  data places for ext files, so the inode is read at each point (its generation must
  match the entry's) and its extents give the bytes; inline files are the catalog's
  stored bytes. Cost: two 4 KiB reads per candidate file (ext: plus one inode read and
  its extent tree per side, and the superblock and group descriptors once per point).
* **First suspicious write.** The volume ranges of those files' data (the old and new
  clusters for in-place encryption, the new file's clusters for a replacement) and their
  metadata (the MFT record, or the inode in its inode table) are matched against the
  journal's WRITE records between the two points; the first write over the data whose
  bytes are high entropy, or over the metadata (any bytes: the page cache may flush a
  rename or a new name before the data), is the file's first suspicious write. Cost: one
  journal scan of the interval (records only, payloads of the matching writes),
  O(records · log ranges).
"""

from __future__ import annotations

import asyncio
import fnmatch
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cdp.errors import CdpError
from cdp.ext4.fs import Ext4
from cdp.ext4.inode import Inode
from cdp.journal import RecordKind
from cdp.sentinel.signals import LOW_GAP, entropy_bits

#: bytes of a file's head whose entropy is compared at both points
HEAD = 4096
#: bytes of a suspect file's data whose writes are matched (its first write)
DATA_LIMIT = 1 << 20
Reader = Callable[[int, int], bytes]
#: a catalog entry (``cdp.catalog.model.Entry``: ``part, dir, name, path, record, seq,
#: is_dir, same_state(), stream()``); the sentinel does not import the catalog (services
#: are independent, docs/ARCHITECTURE.md): the store hands it the catalog's views
Entry = Any


class View(Protocol):
    """What the sentinel reads of a catalog view (``cdp.catalog.indexer.View``)."""

    catalog: Any  # changed_between(a, b)
    version: int | None
    seq: int
    parts: list[dict[str, Any]]

    def overlay_records(self) -> set[tuple[str, int]]: ...

    def entries_of(self, part: str, records: set[int]) -> dict[int, list[Any]]: ...


class FileCatalog(Protocol):
    """The volume's file catalog as the sentinel uses it (``CatalogService``)."""

    version_hooks: list[Callable[[Any, Any], None]]

    async def view(self, point: str) -> Any: ...

    async def head_views(self) -> tuple[Any, Any] | None: ...


def reader_at(vol: Any, seq: int) -> Reader:
    """``read(offset, length)`` of *vol* as of *seq* (reads past the end are zeros)."""
    size = vol.size

    def read(offset: int, length: int) -> bytes:
        if offset >= size or length <= 0:
            return bytes(max(length, 0))
        n = min(length, size - offset)
        data = bytes(vol.read(offset, n, seq))
        return data if n == length else data + bytes(length - n)

    return read


@dataclass
class Suspect:
    """One file whose content turned from low to high entropy."""

    path: str  # the name before (the original)
    new_path: str  # the name after (== path when encrypted in place, unrenamed)
    how: str  # "in place" or "replaced"
    #: volume byte ranges whose first high-entropy write starts the attack on this file
    ranges: list[tuple[int, int]] = field(default_factory=list)
    #: ranges (the MFT record, the inode) where any write counts
    meta: list[tuple[int, int]] = field(default_factory=list)
    first_seq: int = 0
    first_ns: int = 0


@dataclass
class FileEvidence:
    """What changed between two points that looks like ransomware."""

    from_seq: int
    to_seq: int
    suspects: list[Suspect] = field(default_factory=list)
    #: files that gained an extension (renamed ``x`` → ``x.ext``, or replaced), by extension
    gained: Counter[str] = field(default_factory=Counter)
    renamed: int = 0
    deleted: int = 0
    added: int = 0
    modified: int = 0
    notes: list[str] = field(default_factory=list)
    #: every file change: {"change", "path", ["new_path"]}
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def note_dirs(self) -> int:
        return len({p.rpartition("/")[0] or "/" for p in self.notes})

    @property
    def churn(self) -> tuple[str, int]:
        """The extension most files gained and how many."""
        if not self.gained:
            return ("", 0)
        ext, n = self.gained.most_common(1)[0]
        return (ext, n)

    def summary(self) -> dict[str, Any]:
        ext, n = self.churn
        return {"from_seq": self.from_seq, "to_seq": self.to_seq,
                "encrypted_files": len(self.suspects),
                "encrypted_in_place": sum(1 for s in self.suspects if s.how == "in place"),
                "encrypted_replaced": sum(1 for s in self.suspects if s.how == "replaced"),
                "extension_churn": {"extension": ext, "files": n},
                "renamed": self.renamed, "deleted": self.deleted, "added": self.added,
                "modified": self.modified, "ransom_notes": len(self.notes),
                "ransom_note_dirs": self.note_dirs}


def file_score(suspect_files: int, ev: FileEvidence, min_files: int, note_dirs: int) -> float:
    """The file half of the score (1.0 = alert on its own): ``suspect_files / min_files``
    (files turned low → high entropy, accumulated over the slow window by the caller),
    plus 0.5 when ransom notes are in at least *note_dirs* directories, plus 0.5 when at
    least *min_files* files gained one same extension."""
    s = suspect_files / max(1, min_files)
    if note_dirs and ev.note_dirs >= note_dirs:
        s += 0.5
    if ev.churn[1] >= max(1, min_files):
        s += 0.5
    return s


def is_note(name: str, patterns: Iterable[str]) -> bool:
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns)


def _ext(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return ext.lower() if dot and stem else ""


def _gained(old: str, new: str) -> str:
    """The extension *new* adds to *old* (``a.doc`` → ``a.doc.locked``: ``locked``;
    ``a.doc`` → ``a.locked``: ``locked``), "" when it adds none."""
    if new.lower().startswith(old.lower() + "."):
        return new[len(old) + 1:].lower()
    e_new = _ext(new)
    if e_new and e_new != _ext(old) and new.rpartition(".")[0].lower() == old.rpartition(".")[0].lower():
        return e_new
    return ""


class _Part:
    """Reads of one NTFS partition's files through a point's reader (the data's place
    from the catalog's stored runlist; *read* is not needed to find it)."""

    def __init__(self, part: dict[str, Any]) -> None:
        self.offset = int(part["offset"])
        self.cluster = int(part.get("cluster_size") or 4096)
        self.record_size = int(part.get("record_size") or 1024)
        self.extents = [tuple(map(int, e)) for e in part.get("mft_extents") or []]

    def record_range(self, read: Reader, e: Entry) -> tuple[int, int] | None:
        """Volume byte range of *e*'s MFT record."""
        for first, count, off in self.extents:
            if first <= e.record < first + count:
                start = self.offset + off + (e.record - first) * self.record_size
                return (start, start + self.record_size)
        return None

    def head(self, read: Reader, e: Entry) -> bytes:
        """The first :data:`HEAD` bytes of *e*'s data ("" when unreadable)."""
        try:
            st = e.stream()
            n = min(HEAD, st.size)
            if st.resident:
                return bytes((st.content or b"")[:n])
            runs = st.runs()
        except (CdpError, ValueError):
            return b""
        if not runs or runs[0].vcn != 0 or runs[0].lcn is None or n <= 0:
            return b""
        n = min(n, runs[0].length * self.cluster)
        return read(self.offset + runs[0].lcn * self.cluster, n)

    def data_ranges(self, read: Reader, e: Entry, limit: int = DATA_LIMIT) -> list[tuple[int, int]]:
        """Volume byte ranges of *e*'s data (its first *limit* bytes)."""
        try:
            st = e.stream()
            if st.resident:
                return []
            out = []
            for r in st.runs():
                if r.lcn is None or r.vcn * self.cluster >= limit:
                    continue
                s = self.offset + r.lcn * self.cluster
                out.append((s, s + min(r.length * self.cluster, limit - r.vcn * self.cluster)))
            return out
        except (CdpError, ValueError):
            return []


class _ExtPart:
    """Reads of one ext2/3/4 file system's files through a point's reader. The catalog
    keeps no data places for ext files (an entry's ``record`` is the inode number,
    ``seq`` its generation), so the inode is read at the point: the file system is
    opened once per reader (the superblock and group descriptors), then one inode read
    and the extent tree per file. An inode whose generation differs from the entry's
    was reused for another file: nothing is read."""

    def __init__(self, part: dict[str, Any]) -> None:
        self.offset = int(part["offset"])
        self.size = int(part.get("size") or 0) or None
        self._fs: dict[int, tuple[Reader, Ext4 | None]] = {}

    def _open(self, read: Reader) -> Ext4 | None:
        got = self._fs.get(id(read))
        if got is None:
            try:
                fs: Ext4 | None = Ext4(read, self.offset, self.size)
            except CdpError:
                fs = None
            got = self._fs[id(read)] = (read, fs)  # the reader kept alive: its id stays unique
        return got[1]

    def _inode(self, read: Reader, e: Entry) -> tuple[Ext4, Inode] | None:
        fs = self._open(read)
        if fs is None:
            return None
        try:
            ino = fs.inode(e.record)
        except CdpError:
            return None
        if not ino.in_use or ino.damaged or ino.generation != e.seq:
            return None
        return fs, ino

    def record_range(self, read: Reader, e: Entry) -> tuple[int, int] | None:
        """Volume byte range of *e*'s inode in its inode table."""
        fs = self._open(read)
        if fs is None:
            return None
        try:
            start = self.offset + fs.inode_offset(e.record)
        except CdpError:
            return None
        return (start, start + fs.inode_size)

    def head(self, read: Reader, e: Entry) -> bytes:
        """The first :data:`HEAD` bytes of *e*'s data ("" when unreadable)."""
        if e.resident:  # inline data: the catalog holds the bytes
            return bytes(e.location[:HEAD])
        got = self._inode(read, e)
        if got is None:
            return b""
        fs, ino = got
        try:
            return fs.read_file(ino, 0, HEAD)
        except CdpError:
            return b""

    def data_ranges(self, read: Reader, e: Entry, limit: int = DATA_LIMIT) -> list[tuple[int, int]]:
        """Volume byte ranges of *e*'s data (its first *limit* bytes) at *read*'s point."""
        got = None if e.resident else self._inode(read, e)
        if got is None:
            return []
        fs, ino = got
        try:
            runs = fs.file_runs(ino)
        except CdpError:
            return []
        return [(r.vol_off, r.vol_off + min(r.length, limit - r.file_off))
                for r in runs if r.file_off < limit and not r.uninit]


def _part_reader(part: dict[str, Any]) -> _Part | _ExtPart | None:
    """The file reads of a catalogued file system by its kind (None: not sampled)."""
    kind = str(part.get("fs", "ntfs"))
    if kind == "ntfs":
        return _Part(part)
    if kind.startswith("ext"):
        return _ExtPart(part)
    return None


def _low(b: bytes, bits: float) -> bool:
    return bool(b) and any(b) and entropy_bits(b) < bits - LOW_GAP


def _high(b: bytes, bits: float) -> bool:
    return len(b) >= 512 and entropy_bits(b) >= bits


async def collect(va: View, vb: View, read_a: Reader, read_b: Reader, *,
                  entropy: float, notes: Iterable[str]) -> FileEvidence:
    """The file evidence between views *va* (before) and *vb* (after), read through
    *read_a* / *read_b* (the volume at each view's seq). Cost: see the design notes."""
    ev = FileEvidence(va.seq, vb.seq)
    cat = vb.catalog
    cand = cat.changed_between(va.version or 0, vb.version or 0)
    cand |= va.overlay_records() | vb.overlay_records()
    by_part: dict[str, set[int]] = {}
    for part, rec in cand:
        by_part.setdefault(part, set()).add(rec)
    parts = {p["name"]: p for p in vb.parts}
    note_pats = list(notes)
    n = 0
    for pname, recs in sorted(by_part.items()):
        fsr = _part_reader(parts[pname]) if pname in parts else None
        ea = va.entries_of(pname, recs)
        eb = vb.entries_of(pname, recs)
        gone: dict[tuple[str, str], Entry] = {}
        came: list[Entry] = []
        for r in sorted(set(ea) | set(eb)):
            n += 1
            if n % 256 == 0:
                await asyncio.sleep(0)
            a = [x for x in ea.get(r, []) if not x.is_dir]
            b = [x for x in eb.get(r, []) if not x.is_dir]
            if a and b and a[0].seq == b[0].seq:
                x, y = a[0], b[0]
                renamed = x.path != y.path
                changed = not x.same_state(y)
                if renamed:
                    ev.renamed += 1
                    g = _gained(x.name, y.name)
                    if g:
                        ev.gained[g] += 1
                    ev.changes.append({"change": "renamed", "path": x.path, "new_path": y.path})
                elif changed:
                    ev.modified += 1
                    ev.changes.append({"change": "modified", "path": y.path})
                if fsr is not None and (changed or renamed):
                    before, after = fsr.head(read_a, x), fsr.head(read_b, y)
                    if _low(before, entropy) and _high(after, entropy):
                        rr = fsr.record_range(read_b, x)
                        ev.suspects.append(Suspect(
                            x.path, y.path, "in place",
                            fsr.data_ranges(read_a, x) + fsr.data_ranges(read_b, y),
                            [rr] if rr else []))
                continue
            for x in a:
                gone[(x.dir, x.name.lower())] = x
            came.extend(b)
        for y in came:
            ev.added += 1
            if is_note(y.name, note_pats):
                ev.notes.append(y.path)
                ev.changes.append({"change": "added", "path": y.path, "note": True})
                continue
            ev.changes.append({"change": "added", "path": y.path})
            orig = None
            stem = y.name.rpartition(".")[0]
            while stem and orig is None:
                orig = gone.get((y.dir, stem.lower()))
                if orig is None and "." in stem:
                    stem = stem.rpartition(".")[0]
                else:
                    break
            if orig is None:
                continue
            g = _gained(orig.name, y.name)
            if g:
                ev.gained[g] += 1
            if fsr is not None:
                before, after = fsr.head(read_a, orig), fsr.head(read_b, y)
                if _low(before, entropy) and _high(after, entropy):
                    rr = fsr.record_range(read_b, y)
                    ev.suspects.append(Suspect(orig.path, y.path, "replaced",
                                               fsr.data_ranges(read_b, y), [rr] if rr else []))
        for x in gone.values():
            ev.deleted += 1
            ev.changes.append({"change": "deleted", "path": x.path})
    ev.changes.sort(key=lambda c: (c["path"], c["change"]))
    return ev


async def first_writes(vol: Any, ev: FileEvidence, entropy: float) -> None:
    """Set each suspect's ``first_seq``/``first_ns``: the first WRITE in
    (``from_seq``, ``to_seq``] over its data ranges whose overlapping bytes are high
    entropy, or over its MFT record (any bytes). Left 0 when none is found (the caller
    then falls back to ``from_seq + 1``). Cost: one journal scan of the interval."""
    idx: list[tuple[int, int, int, bool]] = []  # (start, end, suspect index, any write)
    for i, s in enumerate(ev.suspects):
        idx += [(a, b, i, False) for a, b in s.ranges]
        idx += [(a, b, i, True) for a, b in s.meta]
    if not idx:
        return
    idx.sort()
    starts = [t[0] for t in idx]
    maxlen = max(b - a for a, b, _, _ in idx)
    left = {i for _, _, i, _ in idx}
    j = vol.journal
    for k, r in enumerate(j.scan(ev.from_seq + 1)):
        if r.seq > ev.to_seq or not left:
            break
        if k % 256 == 255:
            await asyncio.sleep(0)
        if r.kind is not RecordKind.WRITE:
            continue
        w0, w1 = r.offset, r.offset + r.length
        lo = bisect_right(starts, w0 - maxlen)
        hi = bisect_right(starts, w1)
        for a, b, i, anyw in idx[lo:hi]:
            if i not in left or b <= w0 or a >= w1:
                continue
            if not anyw:
                o = max(a, w0) - w0
                piece = bytes(r.payload[o : o + min(512, min(b, w1) - max(a, w0))])
                if not _high(piece, entropy):
                    continue
            s = ev.suspects[i]
            s.first_seq, s.first_ns = r.seq, r.timestamp_ns
            left.discard(i)
