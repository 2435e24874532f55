"""The catalog's version rules, as a pure planner (no I/O).

Given the catalog entries visible at the base version for a set of records (NTFS MFT
records, or ext4 inodes with their names), and the parsed records at the target point, :func:`make_plan` decides for every entry (claim of
the catalog design, docs/FILES.md):

* **modified** (a timestamp or the size differs): the old entry gets ``end`` = current
  version and its reference flag ``ref`` = current version; a new entry starts at the
  current version (``end`` 0 = still current);
* **unchanged** but in a changed block: only ``ref`` moves to the current version;
* **added**: a new entry;
* **deleted** (not in use, or the record's sequence number changed): ``end`` =
  current version, ``ref`` is *not* moved, no new entry;
* **renamed / moved**: the entry at the old path is closed like a deletion and one at
  the new path is opened; a moved directory re-keys its whole subtree.

Damaged records (bad fixups, bad attributes, parent loops) change nothing and are
reported.

The planner is a generator (:func:`plan_steps`) that stops after every
:data:`PLAN_CHUNK` records (and every chunk of a moved directory's subtree) so the
indexer can yield to the event loop between steps; :func:`make_plan` runs it to the
end in one go.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cdp.catalog.model import Entry, join
from cdp.errors import Corruption
from cdp.ntfs.defs import (
    FILE_FILE_NAME_INDEX_PRESENT,
    FILE_RECORD_SEGMENT_IN_USE,
    FILETIME_UNIX_EPOCH,
    ROOT_DIRECTORY_RECORD,
)
from cdp.ntfs.record import FileRecord

#: records planned between two steps of :func:`plan_steps` (~1-3 ms of work)
PLAN_CHUNK = 256

#: what the catalog knows of a directory record: (parent record, name, sequence)
DirInfo = tuple[int, str, int]
ORPHANS = "$OrphanFiles"


class ParentLoop(Corruption):
    """A chain of parent references that comes back to itself."""


class Resolver:
    """Directory paths at the target point: from the parsed records when the directory
    is among them, else from the catalog at the base version (``old_dir``). Parents
    that are missing, not directories, or reused (sequence mismatch) make orphans,
    listed under ``$OrphanFiles``. Cost: O(depth) per new directory, memoised."""

    #: the root directory's record (inode) number, the one path known without lookup
    root_number = ROOT_DIRECTORY_RECORD

    def __init__(self, prefix: str, new: Mapping[int, Any],
                 old_dir: Callable[[int], DirInfo | None] | None = None) -> None:
        self.root = prefix or "/"
        self.orphans = join(self.root, ORPHANS)
        self._new = new
        self._old_dir = old_dir
        self._memo: dict[int, tuple[str, int]] = {self.root_number: (self.root, 0)}

    def _new_info(self, rec: Any) -> tuple[int, int, str, int] | None:
        """(parent, parent sequence or 0, name, own sequence) of a parsed directory
        record, or None when it is not an in-use, undamaged directory with a name."""
        if not rec.in_use or rec.damaged or not rec.is_dir:
            return None
        names = rec.preferred_names()
        if not names:
            return None
        n = names[0]
        return (n.parent, n.parent_sequence, n.name, rec.sequence)

    def _info(self, number: int) -> tuple[int, int, str, int] | None:
        """(parent, parent sequence or 0, name, own sequence) of a directory record."""
        rec = self._new.get(number)
        if rec is not None:
            return self._new_info(rec)
        if self._old_dir is None:
            return None
        d = self._old_dir(number)
        if d is None:
            return None
        return (d[0], 0, d[1], d[2])

    def dir_path(self, number: int, sequence: int = 0) -> str:
        """The path of directory record *number* (expected *sequence*, 0 = any).
        Raises ParentLoop."""
        hit = self._memo.get(number)
        if hit is None:
            chain: list[tuple[int, tuple[int, int, str, int] | None]] = []
            seen: set[int] = set()
            cur = number
            while cur not in self._memo:
                if cur in seen:
                    raise ParentLoop(f"parent references of record {number} loop through record {cur}")
                seen.add(cur)
                info = self._info(cur)
                chain.append((cur, info))
                if info is None:
                    break
                cur = info[0]
            for num, info in reversed(chain):
                if info is None:
                    self._memo[num] = (self.orphans, -1)
                    continue
                parent, pseq, name, seq = info
                ppath, pseq_actual = self._memo[parent]
                if pseq_actual == -1 or (pseq and pseq_actual and pseq != pseq_actual):
                    ppath = self.orphans
                self._memo[num] = (join(ppath, name), seq)
            hit = self._memo[number]
        path, seq = hit
        if seq == -1 or (sequence and seq and sequence != seq):
            return self.orphans
        return path


def states_of(rec: FileRecord, part: str, resolver: Resolver, backup_ns: int) -> list[Entry]:
    """The catalog entries (one per name) of an in-use record at the target point.
    Raises Corruption (damaged record, parent loop). Hot path of a full index: one
    Entry per name, times converted inline (FILETIME → ns, 0 stays 0)."""
    if rec.damaged:
        raise Corruption(rec.damaged)
    flags = rec.flags
    if not flags & FILE_RECORD_SEGMENT_IN_USE or rec.number == ROOT_DIRECTORY_RECORD:
        return []
    names = rec.names
    if len(names) != 1:
        if not names:
            return []
        names = rec.preferred_names()
    t = rec.times
    if t is None:
        crt = mt = cht = at = 0
    else:
        c0, m0, ch0, a0 = t
        crt = (c0 - FILETIME_UNIX_EPOCH) * 100 if c0 else 0
        mt = (m0 - FILETIME_UNIX_EPOCH) * 100 if m0 else 0
        cht = (ch0 - FILETIME_UNIX_EPOCH) * 100 if ch0 else 0
        at = (a0 - FILETIME_UNIX_EPOCH) * 100 if a0 else 0
    d = rec.data
    is_dir = 1 if flags & FILE_FILE_NAME_INDEX_PRESENT else 0
    if d is not None:
        if d.resident:
            size, alloc, resident, dflags, loc = d.size, d.allocated, 1, d.flags, d.content or b""
        else:
            size, alloc, resident, dflags, loc = d.size, d.allocated, 0, d.flags, d.location()
    else:
        size, alloc, resident, dflags, loc = 0, 0, 1, 0, b""
    streams = json.dumps([{"name": s.name, "size": s.size} for s in rec.streams]) if rec.streams else ""
    dir_path = resolver.dir_path
    number, seq, fattrs = rec.number, rec.sequence, rec.file_attributes
    return [Entry(part, dir_path(n.parent, n.parent_sequence), n.name, 0, 0, 0, number,
                  seq, n.parent, is_dir, size, alloc, crt, mt, cht, at,
                  fattrs, resident, dflags, loc, streams, backup_ns)
            for n in names]


#: states(record, part, resolver, backup_ns) -> the record's entries at the target
States = Callable[[Any, str, Resolver, int], list[Entry]]


class NewRows(Protocol):
    """New entries held column-wise (a first index's: :class:`Plan.rows`), so that they
    are written without an :class:`Entry` per row."""

    #: the partition of every row
    part: str

    def __len__(self) -> int: ...

    def entries(self) -> list[Entry]:
        """Every row as an Entry (``start`` = ``ref`` = the version written, else 0)."""
        ...

    def keys(self, lo: int, hi: int) -> tuple[list[str], list[str]]:
        """The directory paths and the names of rows ``[lo, hi)``."""
        ...

    def insert_rows(self, lo: int, hi: int, version: int, dir_ids: Mapping[str, int],
                    name_ids: Mapping[str, int], start_ns: int | None) -> Iterable[tuple[Any, ...]]:
        """Rows ``[lo, hi)`` as ``(dir_id, name_id, record, is_dir, stat, location)``
        (``stat`` as :func:`~cdp.catalog.model.pack_stat` packs it, with
        *start_ns* the version's time), written at *version*."""
        ...


@dataclass(repr=False)
class Plan:
    """What one version changes in one partition. The new entries are :attr:`added`;
    a first index may hold them column-wise instead (:attr:`rows`, written as they are;
    reading :attr:`added` turns them into Entries, once)."""

    part: str
    modified: list[Entry] = field(default_factory=list)  # closed, ref moved (new entry added)
    deleted: list[Entry] = field(default_factory=list)  # closed, ref not moved
    touched: list[Entry] = field(default_factory=list)  # only ref moved
    damaged: list[tuple[int, str]] = field(default_factory=list)  # (record, reason)
    records: int = 0  # records examined
    #: new entries (start = version), column-wise: written without an Entry per row
    rows: NewRows | None = None
    _added: list[Entry] = field(default_factory=list)

    @property
    def added(self) -> list[Entry]:
        """The new entries (start = version), in order (:attr:`rows` turned into
        Entries first, when there are some: O(rows) once)."""
        if self.rows is not None:
            self._added.extend(self.rows.entries())
            self.rows = None
        return self._added

    def added_count(self) -> int:
        return len(self._added) + (len(self.rows) if self.rows is not None else 0)

    def closed_ids(self) -> set[int]:
        return {e.id for e in self.modified} | {e.id for e in self.deleted}

    def counts(self) -> dict[str, int]:
        return {"records": self.records, "added": self.added_count(), "modified": len(self.modified),
                "deleted": len(self.deleted), "touched": len(self.touched),
                "damaged": len(self.damaged)}


def make_plan(
    part: str,
    new: Mapping[int, Any],
    old: Mapping[int, list[Entry]],
    resolver: Resolver,
    backup_ns: int,
    subtree: Callable[[str], Iterable[Entry]] | None = None,
    *,
    reset: bool = False,
    states_fn: States | None = None,
) -> Plan:
    """Apply the version rules to records *new* (parsed at the target) against *old*
    (entries visible at the base, by record). *subtree(dir)* lists base entries under a
    directory path (for moved directories). *reset* (a reformatted file system): every
    old entry is deleted, every new one added. *states_fn* turns a parsed record into its
    entries (default :func:`states_of`, NTFS). Cost: O(records + entries touched)."""
    plan = Plan(part, records=len(new))
    for _ in plan_steps(plan, new, old, resolver, backup_ns, subtree, reset=reset, states_fn=states_fn):
        pass
    return plan


def plan_steps(
    plan: Plan,
    new: Mapping[int, Any],
    old: Mapping[int, list[Entry]],
    resolver: Resolver,
    backup_ns: int,
    subtree: Callable[[str], Iterable[Entry]] | None = None,
    *,
    reset: bool = False,
    chunk: int = PLAN_CHUNK,
    states_fn: States | None = None,
) -> Iterator[int]:
    """:func:`make_plan` into *plan*, one step at a time: yields the records planned so
    far after every *chunk* records, then once per *chunk* entries of each moved
    directory's subtree. The caller may do other work between steps (nothing of the
    inputs may change meanwhile). The rules know no file system: *states_fn* (default
    :func:`states_of`, NTFS records; :func:`cdp.catalog.ext4index.states_of_inode` for
    ext4) gives a record's entries at the target."""
    part = plan.part
    state_of = states_of if states_fn is None else states_fn
    keys: set[tuple[str, str]] = set()
    moved_dirs: list[str] = []
    added, damaged = plan.added, plan.damaged

    def add(e: Entry) -> None:
        k = (e.dir, e.name)
        if k in keys:
            damaged.append((e.record, f"a second record claims the name {e.path!r}"))
            return
        keys.add(k)
        added.append(e)

    numbers = sorted(set(new) | set(old)) if reset else sorted(new)
    if not old:  # a first index: every entry is added (add() inlined, the hot path)
        for i in range(0, len(numbers), chunk):
            for num in numbers[i : i + chunk]:
                try:
                    states = state_of(new[num], part, resolver, backup_ns)
                except Corruption as err:
                    damaged.append((num, str(err)))
                    continue
                for s in states:
                    k = (s.dir, s.name)
                    if k in keys:
                        damaged.append((s.record, f"a second record claims the name {s.path!r}"))
                    else:
                        keys.add(k)
                        added.append(s)
            yield min(i + chunk, len(numbers))
        return
    for i in range(0, len(numbers), chunk):
        for num in numbers[i : i + chunk]:
            rec = new.get(num)
            olds = old.get(num)
            try:
                states = state_of(rec, part, resolver, backup_ns) if rec is not None else []
            except Corruption as err:
                damaged.append((num, str(err)))
                continue
            if not olds:  # nothing catalogued for this record: everything is new
                for s in states:
                    add(s)
                continue
            if reset or (states and olds[0].seq != states[0].seq):
                plan.deleted.extend(olds)
                for s in states:
                    add(s)
                continue
            by_key = {e.key: e for e in olds}
            for s in states:
                e = by_key.pop(s.key, None)
                if e is None:
                    add(s)
                elif e.same_state(s):
                    plan.touched.append(e)
                    keys.add(s.key)
                else:
                    plan.modified.append(e)
                    add(s)
            for e in by_key.values():
                plan.deleted.append(e)
                if e.is_dir and states and states[0].is_dir:
                    moved_dirs.append(e.path)
        yield min(i + chunk, len(numbers))
    if subtree is not None and moved_dirs:
        done = {e.id for e in plan.deleted}
        for old_path in moved_dirs:
            below = list(subtree(old_path))
            for j in range(0, len(below), chunk):
                for e in below[j : j + chunk]:
                    if e.record in new or e.id in done:
                        continue
                    done.add(e.id)
                    try:
                        ndir = resolver.dir_path(e.parent)
                    except Corruption as err:
                        damaged.append((e.record, str(err)))
                        continue
                    if ndir == e.dir:
                        continue
                    plan.deleted.append(e)
                    moved = Entry(*e.values())
                    moved.dir = ndir
                    moved.backup_ns = backup_ns
                    add(moved)
                yield len(numbers)
