"""ext2/3/4 at a marker: the inode and directory diff (or full index) of one file system.

Design notes
------------
* The NTFS rules carry over unchanged (:mod:`cdp.catalog.rules`); what differs is
  where names live. An NTFS record holds its names; an ext4 inode holds none: its names
  are entries in its parents' directory blocks. So the planner's "record" here is an
  :class:`InodeNames`: the inode parsed at the target plus every ``(directory inode,
  name)`` naming it there. A hard link is one inode with several names (one entry
  each), as an NTFS record with several ``$FILE_NAME``\\ s.
* A diff against the base version reads only:

  1. the inodes whose bytes lie in the changed ranges (``changed ∩ inode tables``,
     :meth:`~cdp.ext4.fs.Ext4.inodes_in`);
  2. the directories that may list other names than at the base: known directories
     (the catalog's directory rows, whose ``location`` holds their block ranges) whose
     blocks changed, the root's (it has no row), and every directory among the changed
     inodes (the kernel writes a directory's inode, mtime and ctime, with every entry
     it adds or removes, so this alone would find them; the block ranges make it not
     depend on that);
  3. the inodes a name was added to or removed from in those directories (the
     difference of their listings at the base, from the catalog, and at the target).

  An inode's names at the target are then its base names in unchanged directories
  plus its names in the re-read ones. Cost: O(changed inodes + entries of changed
  directories), plus one query over the known directories' rows (no inode reads).
* The superblock and group descriptors: their changes matter only when the geometry
  changes (a resize); the fingerprint (:func:`fingerprint`: UUID, block and inode
  counts, inode table places) is compared at every marker, and a different one makes a
  full index. The count of their changed bytes is reported (``stats.sb_gdt_changed``).
* Orphans (unlinked while open, on the superblock's orphan list) have no links: they
  are not in use, so not listed, as ``fls`` does not list them outside ``$OrphanFiles``.
* A generation number (``i_generation``) that differs from the catalogued one is an
  inode reused for another file: a deletion plus an addition (NTFS: the sequence
  number).
* Over history the S3 tier dropped, each step hands the bytes it is about to read to
  :attr:`Ext4Indexer.prefetch` first (the inode tables' used parts, the changed
  inodes, the directories' blocks, the inodes named): one round of GETs per step
  rather than one per record (:mod:`cdp.catalog.indexer`'s notes).
* A first index (nothing catalogued) never builds an :class:`Entry` per name: the scan
  hands its numpy columns (:meth:`Ext4.scan` with *columns*) and builds tuples only for
  the inodes needed whole (directories, symlinks, inline data, damaged ones);
  :meth:`Ext4Indexer._first` plans column-wise (the listing flattened to (inode,
  directory, name) columns, sorted by inode with numpy; Python loops only over the odd
  names) and keeps per name its inode number, directory path and name;
  :class:`Ext4Rows` packs each written batch's ``stat`` with numpy from the columns.
  Same rows, same bytes, same damaged reports as the general path (tests hold them
  equal). ~7-8 us of CPU per inode in all (20k image), ~4 of it SQLite's. Its numpy
  passes are whole-file-system steps: at 200k inodes the longest holds the event loop
  ~160-200 ms of CPU (the per-name loop it replaced: ~80 ms; before this round: ~250).
* Nothing ext4-specific is stored but a directory's block ranges (``location``, see
  docs/FORMATS.md): the inode tables' places are recomputed per point, as XFS's inode
  chunks would have to be.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np

from cdp.catalog.db import Catalog, Version
from cdp.catalog.model import Entry, join, pack_stats
from cdp.catalog.rules import DirInfo, Plan, Resolver, plan_steps
from cdp.errors import Corruption
from cdp.ext4.defs import EXT4_INLINE_DATA_FL, EXT4_ROOT_INO, S_IFDIR, S_IFLNK, S_IFMT
from cdp.ext4.directory import RawEntry
from cdp.ext4.fs import Ext4
from cdp.ext4.inode import Inode, InodeColumns
from cdp.partition import Partition

#: a directory's ``location``: its volume byte ranges, ``(start u64le, end u64le)*``
RANGE = struct.Struct("<QQ")
#: directories read between two yields
DIR_CHUNK = 64
#: the kinds of inode whose catalog entry has a ``location`` (block ranges, link target)
_LOCATED = (S_IFDIR, S_IFLNK)
_new_entry = Entry.__new__


class InodeNames(NamedTuple):
    """The planner's record for ext4: an inode at the target, its names there
    (``(directory inode, name)``) and its ``location``. A tuple, so that a full index
    builds one per inode with a single C call (``tuple.__new__``)."""

    inode: Inode
    names: list[tuple[int, str]]
    location: bytes = b""

    @property
    def number(self) -> int:
        return self.inode.number

    # what the Resolver asks of a directory record
    @property
    def in_use(self) -> bool:
        return self.inode.in_use

    @property
    def damaged(self) -> str | None:
        return self.inode.damaged

    @property
    def is_dir(self) -> bool:
        return self.inode.is_dir

    @property
    def sequence(self) -> int:
        return self.inode.generation


#: the scan's columns (:data:`~cdp.ext4.inode.InodeColumns`) a first index's rows are
#: packed from: mode, size, flags, atime, ctime, mtime, crtime, generation, blocks
_ROW_FIELDS = (1, 4, 6, 7, 8, 9, 10, 12, 13)
_I64_MAX = (1 << 63) - 1
_parent_of, _name_of = itemgetter(0), itemgetter(1)  # of (directory inode, name)
_entry_name, _entry_ino = itemgetter(0), itemgetter(1)  # of a RawEntry (name, inode, type)


class Ext4Rows:
    """A first index's new entries, column-wise (:class:`~cdp.catalog.rules.NewRows`):
    per row the inode number, its directory's path and ``(directory inode, name)``; the
    located rows' ``location`` by row; the stat fields come from the scan's numpy
    columns (*cols*: the used inodes' numbers, ascending, then the :data:`_ROW_FIELDS`),
    or from the inodes' tuples when there are none. :meth:`insert_rows` packs a batch's
    ``stat`` with one numpy pass (:func:`~cdp.catalog.model.pack_stats`): the same
    bytes as :func:`~cdp.catalog.model.pack_stat` of :func:`states_of_inode`'s
    entries. Cost: ~0.4 us a row less than an Entry each."""

    def __init__(self, part: str, backup_ns: int, numbers: list[int], dirs: list[str],
                 pn: list[tuple[int, str]], locs: dict[int, bytes], inodes: dict[int, Inode],
                 cols: tuple[np.ndarray, ...] | None) -> None:
        self.part = part
        self.backup_ns = backup_ns
        self.numbers = numbers
        self.dirs = dirs
        self.pn = pn
        self.locs = locs
        self.cols = cols
        #: the inodes, kept only when there are no columns to read the rows' fields from
        self.inodes = inodes if cols is None else None
        self.version = 0  # set when written: the new entries' start and ref

    def __len__(self) -> int:
        return len(self.numbers)

    def keys(self, lo: int, hi: int) -> tuple[list[str], list[str]]:
        return self.dirs[lo:hi], list(map(_name_of, self.pn[lo:hi]))

    def _fields(self, lo: int, hi: int) -> tuple[Any, ...] | None:
        """Rows ``[lo, hi)``'s (mode, size, flags, atime, ctime, mtime, crtime,
        generation, alloc) as int64 arrays, or None when there are no columns or a
        value does not fit (then the tuples are read, and pack_stat judges it)."""
        if self.cols is None:
            return None
        allnum, *cols = self.cols
        p = np.searchsorted(allnum, np.asarray(self.numbers[lo:hi], dtype=np.int64))
        mode, size, flags, atime, ctime, mtime, crtime, gen, blocks = (c[p] for c in cols)
        if len(p) and (int(size.max()) > _I64_MAX or int(blocks.max()) >= 1 << 54):
            return None
        return mode, size.astype(np.int64), flags, atime, ctime, mtime, crtime, gen, blocks * 512

    def _tuple_fields(self, lo: int, hi: int) -> tuple[Any, ...]:
        assert self.inodes is not None or self.cols is not None
        if self.inodes is None:  # a value beyond int64: the columns cannot say it
            raise OverflowError("an inode field does not fit in 64 bits")
        inos = [self.inodes[n] for n in self.numbers[lo:hi]]
        if not inos:
            return ((),) * 9
        c = list(zip(*inos, strict=True))
        return c[1], c[4], c[6], c[7], c[8], c[9], c[10], c[12], [b * 512 for b in c[13]]

    def insert_rows(self, lo: int, hi: int, version: int, dir_ids: Mapping[str, int],
                    name_ids: Mapping[str, int], start_ns: int | None) -> Iterable[tuple[Any, ...]]:
        self.version = version
        f = self._fields(lo, hi)
        if f is None:
            f = self._tuple_fields(lo, hi)
        mode, size, flags, atime, ctime, mtime, crtime, gen, alloc = f
        pn = self.pn[lo:hi]
        locs = [b""] * (hi - lo)
        resident = [0] * (hi - lo)
        is_dir = [1 if m & S_IFMT == S_IFDIR else 0 for m in
                  (mode.tolist() if isinstance(mode, np.ndarray) else mode)]
        for r in range(bisect.bisect_left(self._loc_rows, lo), bisect.bisect_left(self._loc_rows, hi)):
            row = self._loc_rows[r]
            locs[row - lo] = self.locs[row]
            resident[row - lo] = 0 if is_dir[row - lo] else 1
        stat = pack_stats(gen, list(map(_parent_of, pn)), size, alloc, crtime, mtime, ctime, atime,
                          mode, resident, flags, self.backup_ns, start_ns)
        return zip(map(dir_ids.__getitem__, self.dirs[lo:hi]),
                   map(name_ids.__getitem__, map(_name_of, pn)), self.numbers[lo:hi], is_dir,
                   stat, locs, strict=True)

    @property
    def _loc_rows(self) -> list[int]:
        rows = getattr(self, "_loc_sorted", None)
        if rows is None:
            rows = self._loc_sorted = sorted(self.locs)
        return rows

    def entries(self) -> list[Entry]:
        n = len(self.numbers)
        f = self._fields(0, n)
        if f is None:
            f = self._tuple_fields(0, n)
        cols = [c.tolist() if isinstance(c, np.ndarray) else c for c in f]
        part, v, bns, locs = self.part, self.version, self.backup_ns, self.locs
        out = []
        for r, (num, dpath, (parent, name), mode, size, flags, atime, ctime, mtime, crtime, gen,
                alloc) in enumerate(zip(self.numbers, self.dirs, self.pn, *cols, strict=True)):
            is_dir = 1 if mode & S_IFMT == S_IFDIR else 0
            loc = locs.get(r, b"")
            out.append(Entry(part, dpath, name, v, 0, v, num, gen, parent, is_dir, size, alloc,
                             crtime, mtime, ctime, atime, mode, 1 if loc and not is_dir else 0,
                             flags, loc, "", bns))
        return out


class InodeResolver(Resolver):
    """Directory paths for ext4: the root is inode 2; a directory's (parent, name) at
    the target is its one name there (directories have no hard links)."""

    root_number = EXT4_ROOT_INO

    def _new_info(self, rec: Any) -> tuple[int, int, str, int] | None:
        if not rec.in_use or rec.damaged or not rec.is_dir or not rec.names:
            return None
        parent, name = min(rec.names)
        return (parent, 0, name, 0)


def pack_ranges(ranges: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(RANGE.pack(s, e) for s, e in ranges)


def unpack_ranges(loc: bytes) -> list[tuple[int, int]]:
    n = len(loc) // RANGE.size
    return [RANGE.unpack_from(loc, i * RANGE.size) for i in range(n)]


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``[start, end)`` ranges covering *ranges*."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def overlaps(a: Iterable[tuple[int, int]], starts: list[int], ranges: list[tuple[int, int]]) -> bool:
    """Whether a range of *a* meets one of *ranges* (sorted and disjoint, as
    :func:`merge_ranges` gives; *starts*: their starts). Cost: O(len(a) log
    len(ranges))."""
    for s, e in a:
        i = bisect.bisect_left(starts, e) - 1  # the last range starting before e
        if i >= 0 and ranges[i][1] > s:
            return True
    return False


def states_of_inode(rec: InodeNames, part: str, resolver: Resolver, backup_ns: int) -> list[Entry]:
    """The catalog entries (one per name) of an inode at the target point; [] when it
    is free, an orphan (no links) or the root. Raises Corruption (damaged inode, parent
    loop). Columns: ``record`` the inode number, ``seq`` its generation, ``parent`` the
    directory's inode, ``size`` ``i_size``, ``alloc`` ``i_blocks`` * 512, ``attrs``
    ``i_mode``, ``flags`` ``i_flags``, ``resident`` 1 for inline data and fast symlinks
    (``location`` then holds the bytes), a directory's ``location`` its block ranges.
    Hot path of a full index: the inode's fields are unpacked once (no property calls)
    and one Entry is built per name (a single name: its slots set directly, ~0.3 us
    less than ``Entry(...)``)."""
    inode, names, loc = rec
    (number, mode, _uid, _gid, size, links, flags, atime, ctime, mtime, crtime, _dtime, gen,
     blocks, _acl, _i_block, _ibody, damaged) = inode
    if damaged:
        raise Corruption(f"inode {number}: {damaged}")
    if not mode or not links or number == EXT4_ROOT_INO or not names:
        return []
    dir_path = resolver.dir_path
    is_dir = 1 if mode & S_IFMT == S_IFDIR else 0
    resident = 1 if loc and not is_dir else 0
    alloc = blocks * 512
    if len(names) == 1:
        parent, name = names[0]
        e = _new_entry(Entry)
        e.id = e.start = e.end = e.ref = 0
        e.part, e.dir, e.name, e.record, e.seq, e.parent = part, dir_path(parent), name, number, gen, parent
        e.is_dir, e.size, e.alloc, e.crtime, e.mtime = is_dir, size, alloc, crtime, mtime
        e.ctime, e.atime, e.attrs, e.resident, e.flags = ctime, atime, mode, resident, flags
        e.location, e.streams, e.backup_ns = loc, "", backup_ns
        return [e]
    return [Entry(part, dir_path(parent), name, 0, 0, 0, number, gen, parent, is_dir, size,
                  alloc, crtime, mtime, ctime, atime, mode, resident, flags, loc, "", backup_ns)
            for parent, name in sorted(names)]


def fingerprint(p: Partition, fs: Ext4) -> dict[str, Any]:
    sb = fs.sb
    return {"name": p.name, "offset": p.offset, "size": p.size, "fs": fs.kind,
            "uuid": sb.uuid.hex(), "block_size": fs.block_size, "blocks": sb.blocks_count,
            "inodes": fs.inode_count, "inode_size": fs.inode_size,
            "needs_recovery": bool(sb.needs_recovery),
            "inode_tables": [[s - p.offset, e - s, f] for s, e, f in fs.inode_table_extents()]}


def same_fs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("offset", "fs", "uuid", "block_size", "blocks", "inodes", "inode_size", "inode_tables")
    return all(a.get(k) == b.get(k) for k in keys)


def _location(fs: Ext4, ino: Inode) -> bytes:
    """What an entry keeps of the inode: a directory's block ranges, the bytes of an
    inline file or fast symlink, else nothing. Raises Corruption."""
    if ino.is_dir:
        return pack_ranges(fs.data_ranges(ino))
    if ino.has_inline_data or fs.is_fast_symlink(ino):
        return fs.read_file(ino)
    return b""


class Ext4Indexer:
    """One ext file system at one point: the full index or the diff against a base.
    Each method is an async generator that yields after every chunk of work (the caller
    yields to the event loop there); the result is left in :attr:`plan`, :attr:`parsed`
    and :attr:`changed_records`."""

    def __init__(self, fs: Ext4, part: Partition, prefix: str, backup_ns: int, chunk: int) -> None:
        self.fs = fs
        self.part = part
        self.prefix = prefix
        self.backup_ns = backup_ns
        self.chunk = chunk
        self.plan = Plan(part.name)
        self.parsed = 0
        self.changed_records = 0
        self.sb_gdt_changed = 0
        #: told the volume byte ranges each step reads before it reads them, or None
        self.prefetch: Callable[[list[tuple[int, int]]], Awaitable[None]] | None = None

    async def _ahead(self, ranges: Callable[[], list[tuple[int, int]]]) -> None:
        """:attr:`prefetch` of ``ranges()`` (computed only when there is a prefetch)."""
        if self.prefetch is not None:
            await self.prefetch(merge_ranges(ranges()))

    def _inode_ranges(self, numbers: Iterable[int]) -> list[tuple[int, int]]:
        fs, isz = self.fs, self.fs.inode_size
        out = []
        for n in sorted(numbers):
            if 1 <= n <= fs.inode_count:
                a = fs.base + fs.inode_offset(n)
                out.append((a, a + isz))
        return out

    def _dir_ranges(self, dirs: Iterable[Inode]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for ino in dirs:
            try:
                out += self.fs.data_ranges(ino)
            except Corruption:
                pass  # reported when the directory is read
        return out

    def _table_ranges(self) -> list[tuple[int, int]]:
        """The used part of every inode table (what :meth:`Ext4.scan` reads)."""
        fs = self.fs
        out = []
        for gd in fs.groups:
            used = min(gd.used_inodes(fs.sb), fs.inode_count - gd.group * fs.inodes_per_group)
            if used > 0:
                a = fs.base + gd.inode_table * fs.block_size
                out.append((a, a + used * fs.inode_size))
        return out

    def _record(self, ino: Inode, names: list[tuple[int, str]]) -> InodeNames:
        loc = b""
        # only directories, symlinks and inline files keep a location (most inodes: none)
        if ((ino.mode & S_IFMT in _LOCATED or ino.flags & EXT4_INLINE_DATA_FL)
                and ino.in_use and not ino.damaged and names):
            try:
                loc = _location(self.fs, ino)
            except Corruption as e:
                self.plan.damaged.append((ino.number, str(e)))
        return InodeNames(ino, names, loc)

    async def _listings(self, dirs: dict[int, Inode],
                        out: dict[int, list[RawEntry]]) -> AsyncIterator[None]:
        """Fill *out* with ``{dir inode: [(name, inode, file type)]}`` of *dirs* at the
        target (the readable ones; the others are reported damaged and left out),
        yielding after every :data:`DIR_CHUNK` directories."""
        nums = sorted(dirs)
        read = self.fs.dir_entries
        await self._ahead(lambda: self._dir_ranges(dirs[d] for d in nums))
        for i in range(0, len(nums), DIR_CHUNK):
            for d in nums[i : i + DIR_CHUNK]:
                try:
                    out[d] = read(dirs[d])
                except Corruption as e:
                    self.plan.damaged.append((d, str(e)))
            yield None

    async def full(self, old: dict[int, list[Entry]], reset: bool) -> AsyncIterator[None]:
        """Scan every inode table, read every directory, plan against *old* (the base's
        entries when the file system was catalogued before). Cost: O(inodes + entries)."""
        fs = self.fs
        inodes: dict[int, Inode] = {}
        number = itemgetter(0)  # Inode.number
        await self._ahead(self._table_ranges)
        first = not old and not reset
        # a first index reads the scan's numpy columns: inodes holds only those needed
        # whole (directories, symlinks, inline data, damaged ones)
        columns: list[InodeColumns | None] = []
        for got in fs.scan(max(self.chunk, 1024), columns if first else None):
            # the scan returns only inodes that look used (non-zero mode and links)
            inodes.update(zip(map(number, got), got, strict=True))
            c = columns[-1] if first else None
            self.parsed += len(got) if c is None else len(c[0])
            yield None
        if None in columns:  # a value beyond int64 (times past 2262): every inode whole
            inodes, columns = {}, []
            for got in fs.scan(max(self.chunk, 1024)):
                inodes.update(zip(map(number, got), got, strict=True))
                yield None
        self.changed_records += fs.inode_count
        # i[1]: mode, i[17]: damaged (no property calls: this runs once per inode)
        dirs = {n: i for n, i in inodes.items() if i[1] & S_IFMT == S_IFDIR and not i[17]}
        listing: dict[int, list[RawEntry]] = {}
        async for _ in self._listings(dirs, listing):
            yield None
        if first:  # the names joined column-wise (no dict of names per inode)
            async for _ in self._first(inodes, listing, columns):
                yield None
            return
        names: dict[int, list[tuple[int, str]]] = {}
        todo = 0
        for d, entries in listing.items():
            for name, n, _type in entries:
                nm = names.get(n)
                if nm is None:
                    names[n] = [(d, name)]
                else:  # a hard link
                    nm.append((d, name))
            todo += len(entries)
            if todo >= 8 * self.chunk:  # (a 200k-inode index: ~90 ms in one go)
                todo = 0
                yield None
        new: dict[int, InodeNames] = {}
        record = self._record
        tnew = tuple.__new__
        for n, nm in names.items():
            found = inodes.get(n)
            if found is None:
                for d, name in nm:
                    self.plan.damaged.append((n, f"directory inode {d} names {name!r} "
                                                 f"with inode {n}, which is free"))
                continue
            # most inodes are regular files with no location: no _record call
            # (found[1]: mode, found[6]: flags)
            if found[1] & S_IFMT in _LOCATED or found[6] & EXT4_INLINE_DATA_FL:
                new[n] = record(found, nm)
            else:
                new[n] = tnew(InodeNames, (found, nm, b""))
        for n in old:  # catalogued inodes now free or nameless: deleted
            if n not in new:
                new[n] = InodeNames(inodes.get(n) or Inode(n), [])
        yield None
        self.plan.records = len(new)
        async for _ in self._plan(new, old, InodeResolver(self.prefix, new), None, reset):
            yield None

    async def _first(self, inodes: dict[int, Inode], listing: dict[int, list[RawEntry]],
                     columns: list[InodeColumns | None]) -> AsyncIterator[None]:
        """The plan of a first index (nothing catalogued): what :meth:`_plan` with
        :func:`states_of_inode` gives for ``old = {}`` (the same entries in the same
        order, the same damaged reports), held column-wise (:class:`Ext4Rows`, the
        plan's :attr:`~cdp.catalog.rules.Plan.rows`) and planned column-wise: the
        directory *listing* flattened into (inode, directory, name) columns, sorted by
        inode with numpy (a hard link's names by directory and name, as the general
        path sorts them), one path looked up per directory, the keys checked with one
        set; Python loops only over what is odd (free or damaged inodes, hard links,
        parent loops, a name claimed twice). *inodes*: the used inodes the scan gave
        whole (with *columns*: directories, symlinks, inline data, damaged ones; else
        every used inode). Cost: ~0.4 us per name, a few C passes."""
        plan = self.plan
        damaged = plan.damaged
        fs = self.fs
        cols = [c for c in columns if c is not None]
        allnum = (np.concatenate([c[0] for c in cols]) if cols
                  else np.fromiter(inodes, dtype=np.int64, count=len(inodes)))  # ascending
        e_name: list[str] = []
        e_ino: list[int] = []
        e_dir: list[int] = []
        todo = 0
        for d, entries in listing.items():  # directories in ascending order
            if entries:
                e_name += map(_entry_name, entries)
                e_ino += map(_entry_ino, entries)
                e_dir += [d] * len(entries)
                todo += len(entries)
                if todo >= 32 * self.chunk:  # a yield every ~8k names
                    todo = 0
                    yield None
        yield None
        ino = np.array(e_ino, dtype=np.int64)
        dirn = np.array(e_dir, dtype=np.int64)
        if len(allnum):
            p = np.searchsorted(allnum, ino)
            p[p == len(allnum)] = 0
            used = allnum[p] == ino
        else:
            used = np.zeros(len(ino), dtype=bool)
        yield None
        # the general path's order of names: the first appearance of each inode
        uniq, first_at = np.unique(ino, return_index=True)

        def rank(n: int) -> int:
            return int(first_at[int(np.searchsorted(uniq, n))])

        pre: list[tuple[int, int, int, str]] = []  # (rank, row, inode, reason)
        # the located records: directories, symlinks, inline files (few)
        cand = [n for n, i in inodes.items() if i[1] & S_IFMT in _LOCATED or i[6] & EXT4_INLINE_DATA_FL]
        named: dict[int, list[tuple[int, str]]] = {}
        for r in np.nonzero(np.isin(ino, np.array(cand, dtype=np.int64)))[0].tolist():
            named.setdefault(e_ino[r], []).append((e_dir[r], e_name[r]))
        located: dict[int, InodeNames] = {}
        for n in cand:
            nm = named.get(n)
            if nm is None:
                continue
            found = inodes[n]
            loc = b""
            if found.in_use and not found.damaged:
                try:
                    loc = _location(fs, found)
                except Corruption as e:
                    pre.append((rank(n), -1, n, str(e)))
            located[n] = InodeNames(found, nm, loc)
        for r in np.nonzero(~used)[0].tolist():  # names of free inodes
            n = e_ino[r]
            pre.append((rank(n), r, n, f"directory inode {e_dir[r]} names {e_name[r]!r} "
                                       f"with inode {n}, which is free"))
        pre.sort()
        damaged += [(n, why) for _k, _r, n, why in pre]
        yield None
        # rows in the general path's order: by inode, a hard link's names by (directory, name)
        at = np.nonzero(used)[0]
        order = at[np.argsort(ino[at], kind="stable")]
        s_ino = ino[order]
        plan.records = len(np.unique(s_ino))
        yield None
        multi = np.nonzero(s_ino[1:] == s_ino[:-1])[0]
        if len(multi):
            rows = order.tolist()
            done: set[int] = set()
            for j in multi.tolist():
                n = int(s_ino[j])
                if n in done:
                    continue
                done.add(n)
                a = int(np.searchsorted(s_ino, n))
                b = int(np.searchsorted(s_ino, n, side="right"))
                rows[a:b] = sorted(rows[a:b], key=lambda r: (e_dir[r], e_name[r]))
            order = np.array(rows, dtype=np.int64)
        s_dir = dirn[order]
        keep = s_ino != EXT4_ROOT_INO
        odd: list[tuple[int, int, str]] = []  # (inode, row, reason): reported in that order
        bad = {n: i[17] for n, i in inodes.items() if i[17]}
        if bad:
            gone = np.isin(s_ino, np.array(list(bad), dtype=np.int64))
            odd += [(n, -1, f"inode {n}: {bad[n]}") for n in np.unique(s_ino[gone]).tolist()]
            keep &= ~gone
        dir_path = InodeResolver(self.prefix, located).dir_path
        paths: dict[int, str] = {}
        loops: dict[int, str] = {}
        for d in np.unique(s_dir[keep]).tolist():
            try:
                paths[d] = dir_path(d)
            except Corruption as err:  # a parent loop
                loops[d] = str(err)
        if loops:  # an inode with a name in such a directory has no entry at all
            hit = np.isin(s_dir, np.array(list(loops), dtype=np.int64)) & keep
            for n in np.unique(s_ino[hit]).tolist():
                first = int(np.nonzero(hit & (s_ino == n))[0][0])
                odd.append((n, -1, loops[int(s_dir[first])]))
            keep &= ~np.isin(s_ino, s_ino[hit])
        yield None
        order = order[keep]
        numbers: list[int] = s_ino[keep].tolist()
        parents: list[int] = s_dir[keep].tolist()
        dirs = list(map(paths.__getitem__, parents))
        rnames = list(map(e_name.__getitem__, order.tolist()))
        yield None
        keys = list(zip(dirs, rnames, strict=True))
        if len(set(keys)) != len(keys):  # a name claimed twice: the lower inode keeps it
            seen: set[tuple[str, str]] = set()
            ok = []
            for r, key in enumerate(keys):
                if key in seen:
                    odd.append((numbers[r], r, f"a second record claims the name {join(*key)!r}"))
                else:
                    seen.add(key)
                    ok.append(r)
            numbers = [numbers[r] for r in ok]
            parents = [parents[r] for r in ok]
            dirs = [dirs[r] for r in ok]
            rnames = [rnames[r] for r in ok]
        del keys
        yield None
        odd.sort(key=lambda t: (t[0], t[1]))
        damaged += [(n, why) for n, _r, why in odd]
        pn = list(zip(parents, rnames, strict=True))
        allnum_cols = allnum if cols else None
        packed = None
        if allnum_cols is not None:
            packed = (allnum_cols, *(np.concatenate([c[f] for c in cols]) for f in _ROW_FIELDS))
        # the rows of the located inodes: their location (most rows: none)
        locs: dict[int, bytes] = {}
        for n, rec in located.items():
            if rec.location:
                a = bisect.bisect_left(numbers, n)
                for r in range(a, bisect.bisect_right(numbers, n, a)):
                    locs[r] = rec.location
        plan.rows = Ext4Rows(self.part.name, self.backup_ns, numbers, dirs, pn, locs, inodes, packed)
        yield None

    async def diff(self, catalog: Catalog, base: Version, ranges: list[tuple[int, int]]) -> AsyncIterator[None]:
        """The changed inodes and directories since *base* (``ranges``: the volume
        byte ranges that changed, from the map engine). Cost: see the design notes."""
        fs, part = self.fs, self.part
        ranges = merge_ranges(ranges)
        starts = [r[0] for r in ranges]
        sb_gdt = self._sb_gdt_ranges()
        self.sb_gdt_changed = sum(1 for r in sb_gdt if overlaps([r], starts, ranges))
        changed = set(fs.inodes_in(ranges))
        self.changed_records += len(changed)
        await self._ahead(lambda: self._inode_ranges(changed | {EXT4_ROOT_INO}))
        cur = fs.read_inodes(changed | {EXT4_ROOT_INO})
        yield None
        dir_path: dict[int, str] = {EXT4_ROOT_INO: self.prefix or "/"}
        todo: set[int] = set()
        for i, e in enumerate(catalog.dirs(part.name, base.version), 1):
            dir_path.setdefault(e.record, e.path)
            if overlaps(unpack_ranges(e.location), starts, ranges):
                todo.add(e.record)
            if i % (8 * self.chunk) == 0:
                yield None
        root = cur[EXT4_ROOT_INO]
        if root.in_use and root.is_dir and not root.damaged:
            try:
                if overlaps(fs.data_ranges(root), starts, ranges):
                    todo.add(EXT4_ROOT_INO)
            except Corruption as err:
                self.plan.damaged.append((EXT4_ROOT_INO, str(err)))
        todo |= {n for n in changed if n in dir_path}  # was a directory at the base
        todo |= {n for n, i in cur.items() if n in changed and i.in_use and i.is_dir}
        missing = todo - cur.keys()
        await self._ahead(lambda: self._inode_ranges(missing))
        cur.update(fs.read_inodes(missing))
        yield None
        dirs = {d: cur[d] for d in todo if d in cur and cur[d].in_use and cur[d].is_dir
                and not cur[d].damaged}
        listing: dict[int, list[RawEntry]] = {}
        async for _ in self._listings(dirs, listing):
            yield None
        # a directory gone (freed, or no longer a directory) lists nothing
        for d in todo:
            if d not in dirs and not (d in cur and cur[d].damaged):
                listing[d] = []
        relisted = set(listing)
        affected = set(changed) | relisted
        named: dict[int, list[tuple[int, str]]] = {}
        for d, entries in listing.items():
            for name, n, _type in entries:
                named.setdefault(n, []).append((d, name))
        for d in relisted:  # names added or removed: (name, inode) not in both listings
            p = dir_path.get(d)
            was = catalog.names_in(part.name, p, base.version) if p is not None else set()
            affected |= {n for _name, n in was.symmetric_difference(
                (name, ino) for name, ino, _type in listing[d])}
        affected.discard(EXT4_ROOT_INO)
        rest = affected - cur.keys()
        await self._ahead(lambda: self._inode_ranges(rest))
        cur.update(fs.read_inodes(rest))
        self.parsed += len(cur)
        yield None
        old = catalog.visible(part.name, affected, base.version)
        new: dict[int, InodeNames] = {}
        for n in sorted(affected):
            ino = cur.get(n) or Inode(n)
            nm = [(e.parent, e.name) for e in old.get(n, []) if e.parent not in relisted]
            nm += named.get(n, [])
            new[n] = self._record(ino, nm)
        self.plan.records = len(new)
        resolver = InodeResolver(self.prefix, new, _dir_lookup(catalog, part.name, base.version))
        async for _ in self._plan(new, old, resolver, lambda d: catalog.subtree(d, base.version), False):
            yield None

    async def _plan(self, new: dict[int, InodeNames], old: dict[int, list[Entry]],
                    resolver: Resolver, subtree: Callable[[str], list[Entry]] | None,
                    reset: bool) -> AsyncIterator[None]:
        for _ in plan_steps(self.plan, new, old, resolver, self.backup_ns, subtree, reset=reset,
                            chunk=self.chunk, states_fn=states_of_inode):
            yield None

    def _sb_gdt_ranges(self) -> list[tuple[int, int]]:
        """Volume byte ranges of the primary superblock and group descriptor blocks."""
        fs = self.fs
        base, bs = self.part.offset, fs.block_size
        out = [(base + 1024, base + 2048)]
        first = fs.sb.first_data_block + 1
        n = -(-len(fs.groups) * fs.sb.desc_size // bs)
        out.append((base + first * bs, base + (first + n) * bs))
        return out


def _dir_lookup(cat: Catalog, part: str, version: int) -> Callable[[int], DirInfo | None]:
    return lambda r: cat.dir_info(part, r, version)
