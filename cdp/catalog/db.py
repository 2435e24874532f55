"""The catalog file: SQLite in WAL mode, key/value shaped (docs/FORMATS.md ("File catalog")).

Design notes
------------
* Key = (directory path, name, start version) — the unique index ``entries_key``;
  the value is the rest of the row. Directory listings at a version are one range scan
  of that index (``dir = ?`` then a filter on start/end).
* Format 4: directory paths and names are stored once (tables ``dirs`` and ``names``);
  a row of ``file_entries`` holds their ids, and the view ``entries`` joins them back,
  so every query reads ``entries`` with the columns of format 3. Why: with every file
  modified at every marker a row repeated its path and name (and ``entries_key`` and
  ``entries_lname`` did again): 241 bytes per file version at 1M versions, 175 with
  the ids (tools/bench scale-wide); and ``find`` with a pattern that starts with a
  wildcard globs the distinct names (200k for 10M versions), not every row. A
  listing's rows come in name-id order and are sorted by name (one directory's
  visible entries).
* Format 5: the fields no query filters or sorts on (seq, parent, size, alloc, the four
  times, attrs, resident, flags, streams, backup_ns) are one ``stat`` BLOB
  (:func:`~cdp.catalog.model.pack_stat`: a ``sig`` byte chooses one of 64 fixed
  ``struct`` layouts; sizes that fit take 4 bytes, times equal to mtime none). Why: an
  insert binds 7 values instead of 19 (binding is ~0.1 us a value, and SQLite builds a
  22-column record), and a row is smaller. What stays columns: what a query filters,
  joins or updates (``part``, the ids, ``start``, ``end``, ``ref``, ``record``,
  ``is_dir``) and ``location`` (variable, and no listing reads it). SQL cannot look
  inside ``stat``: a query that must filter on a packed field (none today) would
  unpack it in Python or get its column back in a new format.
* Format 6: a row's ``backup_ns`` is its start version's time (the marker's) unless
  said otherwise (``stat``'s ``SIG_BACKUP`` bit): readers take it from ``versions``
  (:class:`~cdp.catalog.model.StartTimes`, a dict refreshed on a miss), 8 bytes less a
  row. ``diff`` between two versions (:meth:`Catalog.changed_between`) needs no index
  on ``start``: rows are only appended, one version after the other, so ids grow with
  ``start`` and the rows opened in (a, b] are an id range (a binary search over the
  rowid finds its ends); of the rows closed there, only deletions (``end > ref``) need
  an index (``entries_deleted``): a row closed with ``ref = end`` was replaced by a
  newer version of its record opened at ``end``, or (the planner refused that version
  a name another record claimed) the version's ``damaged`` rows name the record.
  Measured: 157.8 → 120.4 bytes per file version (scale-wide, 20k files x 50 markers).
* Format 7: ``entries_record`` is on ``(record)`` alone: every query through it names a
  record and reads the row, which holds ``part`` (one byte less an index entry: ~1.1
  bytes per file version).
* Format 8: ``stat`` has a second signature byte, ``sig2``: seq, attrs, flags and parent
  each take the width their value needs (0: left out; u8, u16, u32), two bits each. Why:
  at 10M file versions SQLite's varints grow with the catalog (row ids, record numbers
  and name ids take a byte more than at 1M in the row and in each index), and an NTFS
  row's seq (1 byte of 4 used), attrs (1-2 of 4), flags (often 0) and parent (a
  directory's record, often under 65,536) held 16 bytes of which ~4 carry information:
  11 bytes less a row in the scale-wide catalog (seq 1, attrs 0x20, flags 0, parent
  ~2,000), 1 byte less an ext4 row (random generation, extent flag: both u32).
  Formats 5 to 7 are packed again by the migration (one copy of the rows) or, read
  offline, row by row as they are read.
* Two connections: the background indexer writes a whole version in one transaction
  on ``writer`` (it may yield to the event loop between batches), queries read on
  ``reader`` and see only committed versions (WAL snapshot isolation). A version
  exists for readers exactly when its ``versions`` row is committed.
* Everything runs on one thread (the daemon's event loop, or cdpctl offline).
* Listings (``list_dir``, ``subtree(full=False)``) fetch only the columns a listing shows (no
  ``location``): turning SQLite values into Python objects is most of their cost (~1 ms
  per column per 10k rows; format 5 fetches 9 columns and unpacks ``stat`` with one
  precompiled Struct and one itemgetter a row). Their entries carry ``location = b""``
  (and ``parent = -1``, ``flags = 0``, as before format 5); :meth:`Catalog.at_path` and
  :meth:`Catalog.history` load whole rows.
* ``find`` by name globs ``names`` (the index ``names_lname`` on ``lower(name)``: a
  glob with a literal prefix becomes an index range plus the glob itself), then takes
  the matching names' rows through ``entries_name``.
* Writes: WAL with ``synchronous = NORMAL`` (a commit does not fsync; checkpoints do),
  so a bulk first index pays no syncs per transaction and ``synchronous = OFF`` would
  buy nothing but a weaker checkpoint. The catalog is derived data (rebuilt from the
  journal's markers), but it is kept crash-safe anyway. Automatic checkpoints are off
  on the writer; :meth:`Catalog.checkpoint` runs after every version, in a worker
  thread (a first full index leaves tens of MB in the WAL).
* Inserts: a new row's directory and name ids are resolved in Python (a per-transaction
  cache; unknown ones looked up 500 a query, new ones inserted, sorted, with the next ids, a
  batch in one statement over ``json_each`` of a JSON array: ~1 us a name less than
  ``executemany``; ``ensure_ascii=False``, so a name SQLite cannot store fails as a
  bound one does) and
  its versions are literals of the statement, so SQLite binds 7 plain values a row
  (format 4: 19).
  A first full index (``file_entries`` empty: :meth:`Catalog.bulk_begin`) drops the
  indexes of :data:`BULK_INDEXES`, inserts, and builds them once at the end, in a
  worker thread, before the same COMMIT: ~1.5 us a row to build them all vs ~3 us of
  upkeep while inserting (tools/bench/ext4_bench). Readers keep their snapshot (with
  the indexes); a crash or a rollback leaves the catalog as it was. The writer's page
  cache is :data:`BULK_CACHE_KIB` (32 MiB) until that COMMIT, then SQLite's 2 MiB again:
  the index builds sort in it instead of spilling (200k inodes: ~1.4 → ~1.1 us a row).
  A first ext4 index hands its new rows column-wise (``Plan.rows``, a
  :class:`~cdp.catalog.rules.NewRows`): each batch is one ``executemany`` over the
  columns, its ``stat`` packed with numpy (:func:`~cdp.catalog.model.pack_stats`), the
  partition a literal of the statement (six bound values a row). ``synchronous``
  stays ``NORMAL``: the WAL commit does not fsync, so ``OFF`` would save nothing here.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

from cdp.catalog.model import (
    COLUMNS,
    STAT_FIELDS,
    Entry,
    StartTimes,
    pack_stat,
    restat,
    stat5_to_8,
    stat7_to_8,
    unpack_stat,
)
from cdp.catalog.rules import DirInfo, NewRows, Plan
from cdp.errors import Corruption

log = logging.getLogger("cdp.catalog")

#: catalog schema version stored in meta("format"); bump on a schema change; never reuse
#: a number. 1: first version; 2: adds the ``entries_lname`` index (find by name); 3:
#: the file-system kind (``versions.fs``, ``"fs"`` in each ``parts`` object) and the
#: ``entries_dirs`` index (ext4 diffs find the known directories); 4: paths and names
#: stored once (``dirs``, ``names``, ``file_entries`` and the view ``entries``); 5: the
#: fields no query filters on packed into ``file_entries.stat`` (:func:`pack_stat`); 6:
#: ``stat`` leaves out a backup_ns equal to its start version's time, ``entries_start``
#: dropped (rows started in a range of versions are a range of ids), ``entries_end``
#: replaced by ``entries_deleted`` (only the rows closed without a newer version),
#: ``entries_record`` without ``start`` (a record's rows come in id order: start order);
#: 7: ``entries_record`` is ``(record)`` (every query that uses it names the record and
#: reads the row, which holds ``part``: one byte less an index entry); 8: ``stat`` has a
#: second signature byte giving seq, attrs, flags and parent each the width its value
#: needs (0 left out, u8, u16, u32: :func:`~cdp.catalog.model.pack_stat`).
#: Formats 1 to 7 are migrated in place when opened for writing (:func:`_migrate`).
CATALOG_FORMAT = 8
CATALOG_FILE = "catalog.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,   -- the marker number
    seq INTEGER NOT NULL,          -- the marker's journal seq
    time_ns INTEGER NOT NULL,      -- the marker's time (the backup time)
    kind TEXT NOT NULL,            -- full | diff | none
    ntfs INTEGER NOT NULL,         -- NTFS file systems found
    parts TEXT NOT NULL,           -- JSON: one object per file system (see FORMATS)
    stats TEXT NOT NULL,           -- JSON: records, added, modified, deleted, touched, ...
    note TEXT NOT NULL DEFAULT '',
    fs TEXT NOT NULL DEFAULT ''    -- format 3: the kinds found, in parts order ("ntfs,ext4")
);
CREATE TABLE IF NOT EXISTS dirs (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS names (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE INDEX IF NOT EXISTS names_lname ON names (lower(name));
CREATE TABLE IF NOT EXISTS file_entries (
    id INTEGER PRIMARY KEY,
    part TEXT NOT NULL, dir_id INTEGER NOT NULL, name_id INTEGER NOT NULL,
    start INTEGER NOT NULL, "end" INTEGER NOT NULL, ref INTEGER NOT NULL,
    record INTEGER NOT NULL, is_dir INTEGER NOT NULL,
    stat BLOB NOT NULL,            -- formats 5, 6: the fields no query filters on, packed
    location BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS entries_key ON file_entries (dir_id, name_id, start);
CREATE INDEX IF NOT EXISTS entries_name ON file_entries (name_id);
CREATE INDEX IF NOT EXISTS entries_record ON file_entries (record);
CREATE INDEX IF NOT EXISTS entries_deleted ON file_entries ("end") WHERE "end" > ref;
CREATE INDEX IF NOT EXISTS entries_dirs ON file_entries (part, record) WHERE is_dir = 1;
CREATE VIEW IF NOT EXISTS entries AS SELECT
    e.id AS id, e.part AS part, d.path AS dir, n.name AS name, e.start AS start,
    e."end" AS "end", e.ref AS ref, e.record AS record, e.is_dir AS is_dir, e.stat AS stat,
    e.location AS location, e.dir_id AS dir_id, e.name_id AS name_id
    FROM file_entries e JOIN dirs d ON d.id = e.dir_id JOIN names n ON n.id = e.name_id;
CREATE TABLE IF NOT EXISTS damaged (
    version INTEGER NOT NULL, part TEXT NOT NULL, record INTEGER NOT NULL, reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS damaged_version ON damaged (version);
"""

_VIS = '"start" <= ? AND ("end" = 0 OR "end" > ?)'
#: the ``stat`` of a row: the column (format 5), or packed by :func:`pack_stat` from
#: the columns of a format 1-4 catalog read offline without being migrated
_STAT5 = "stat"
def _stat_expr(table: str = "") -> str:
    """SQL packing the stat columns of a format 1-4 row (of *table*, e.g. ``"o."``)."""
    return "cdp_stat(" + ", ".join(f'{table}"{c}"' for c in STAT_FIELDS) + ")"


_STAT_OLD = _stat_expr()
_GLOB_SPECIAL = "*?["
#: a new row: the ids are resolved in Python, the versions are literals of the statement
#: (see :meth:`Catalog.write_plan`); seven bound values
_INS = ('INSERT INTO file_entries (part, dir_id, name_id, start, "end", ref, record, is_dir, '
        'stat, location) VALUES (?, ?, ?, {v}, 0, {v}, ?, ?, ?, ?)')
#: a new row written column-wise (:class:`~cdp.catalog.rules.NewRows`): the partition
#: is a literal as well (an SQL string: quotes doubled); six bound values
_INS_COLS = ('INSERT INTO file_entries (part, dir_id, name_id, start, "end", ref, record, is_dir, '
             'stat, location) VALUES ({p}, ?, ?, {v}, 0, {v}, ?, ?, ?, ?)')
_dir_of, _name_of = attrgetter("dir"), attrgetter("name")


def _selects(stat: str) -> tuple[str, str, str]:
    """The whole-row, listing and one-directory listing SELECTs (``Entry.from_row``,
    ``from_list_row``, ``from_dir_rows``) with *stat* as the ``stat`` column. A listing
    leaves out ``location``, and a one-directory listing ``dir`` too (the argument)."""
    head = 'SELECT id, part, dir, name, start, "end", ref, record, is_dir, '
    return (f"{head}{stat}, location FROM entries", f"{head}{stat} FROM entries",
            f'SELECT id, part, name, start, "end", ref, record, is_dir, {stat} FROM entries')
#: the writer's page cache while a first full index is written (KiB; SQLite's default is
#: 2,000): the index builds sort in it, and the transaction's pages stay in it
BULK_CACHE_KIB = 32768
#: the indexes a first full index builds once its rows are in (:meth:`Catalog.bulk_begin`)
BULK_INDEXES = ("entries_key", "entries_name", "entries_record", "entries_deleted", "entries_dirs",
                "names_lname")


@dataclass(frozen=True)
class Version:
    """A catalogued marker."""

    version: int
    seq: int
    time_ns: int
    kind: str
    ntfs: int
    parts: list[dict[str, Any]]
    stats: dict[str, Any]
    note: str
    fs: str = ""  # the file-system kinds found, in parts order ("ntfs", "ext4,ntfs"...)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "marker": f"marker{self.version}", "seq": self.seq,
                "time_ns": self.time_ns, "kind": self.kind, "ntfs": self.ntfs,
                "fs": self.fs.split(",") if self.fs else [],
                "parts": self.parts, "stats": self.stats, "note": self.note}


def _connect(path: Path, readonly: bool, *, any_thread: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode; with *any_thread* usable from another thread
    than its creator's (one thread at a time: the caller sees to it)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=not any_thread)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


class Catalog:
    """The file catalog of one volume (``VOLUME_DIR/catalog.sqlite``)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._writer: sqlite3.Connection | None = None
        # the writer's intern caches (path or name -> id), valid inside one transaction
        self._dir_ids: dict[str, int] = {}
        self._name_ids: dict[str, int] = {}
        self._complete: set[str] = set()  # tables whose every row is in its cache
        self._bulk_sql: list[str] = []  # the indexes :meth:`bulk_begin` dropped
        self._json_each = False  # the writer's SQLite has json_each (set with the writer)
        self._bulk_cache = False  # bulk_begin raised the writer's cache_size
        if not readonly:
            w = self.writer
            fmt = w.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if fmt is None:
                w.execute("INSERT INTO meta VALUES ('format', ?)", (str(CATALOG_FORMAT),))
            elif int(fmt[0]) != CATALOG_FORMAT:
                raise Corruption(f"{path}: unsupported catalog format {fmt[0]}")
        try:
            self.reader = _connect(path, readonly)
            self.reader.execute("SELECT 1 FROM versions LIMIT 1")
            cols = {r[1] for r in self.reader.execute("PRAGMA table_info(versions)")}
            kind = self.reader.execute(
                "SELECT type FROM sqlite_master WHERE name = 'entries'").fetchone()
        except sqlite3.Error as e:
            raise Corruption(f"{path}: cannot read the catalog: {e}") from None
        # a format 1/2 catalog read offline (not migrated): every file system was NTFS
        self._fs_col = "fs" if "fs" in cols else "''"
        # format 4 and later: ``entries`` is a view over file_entries, dirs and names; a
        # format 1-3 catalog read offline (not migrated) has the table, with format 4's columns
        self._v4 = kind is not None and kind[0] == "view"
        # format 5: the stat fields packed in ``stat``; a format 1-4 catalog read offline
        # (not migrated) has them as columns, packed per row as they are read
        ecols = {r[1] for r in self.reader.execute("PRAGMA table_info(entries)")}
        try:
            fmt = self.reader.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.Error:
            fmt = None
        self._format = int(fmt[0]) if fmt is not None and str(fmt[0]).isdigit() else CATALOG_FORMAT
        stat = _STAT5
        if ecols and "stat" not in ecols:
            self.reader.create_function("cdp_stat", len(STAT_FIELDS), pack_stat, deterministic=True)
            stat = _STAT_OLD
        elif self._format in (5, 6, 7):  # format 8 packed as it reads (format 5: backup_ns always there)
            conv = stat5_to_8 if self._format == 5 else stat7_to_8
            self.reader.create_function("cdp_stat8", 1, conv, deterministic=True)
            stat = "cdp_stat8(stat)"
        self._stat = stat
        #: the versions' times: the backup_ns of the rows whose ``stat`` leaves it out
        self._times = StartTimes(
            lambda: self.reader.execute("SELECT version, time_ns FROM versions").fetchall())
        self._sel, self._lsel, self._dsel = _selects(stat)

    @property
    def writer(self) -> sqlite3.Connection:
        if self._writer is None:
            if self.readonly:
                raise Corruption("catalog opened read-only")
            # any thread: :meth:`bulk_end` builds the indexes in a worker thread
            w = _connect(self.path, False, any_thread=True)
            w.execute("PRAGMA journal_mode = WAL")
            w.execute("PRAGMA synchronous = NORMAL")
            # no checkpoint inside COMMIT (it would copy the whole WAL of a full index
            # while holding the event loop): :meth:`checkpoint` runs after each version
            w.execute("PRAGMA wal_autocheckpoint = 0")
            old = _old_format(w)
            if old is not None:
                _migrate(w, self.path, old)
            w.executescript(SCHEMA)
            self._json_each = _has_json_each(w)
            self._writer = w
        return self._writer

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (PASSIVE: never waits for readers; what
        it cannot copy is copied next time). Opens its own connection, so it may run in
        a worker thread while the event loop goes on (SQLite works without the GIL)."""
        if self.readonly:
            return
        conn = _connect(self.path, False)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def close(self) -> None:
        self.reader.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ versions

    def versions(self) -> list[Version]:
        """Every catalogued marker, oldest first. Cost: O(versions)."""
        rows = self.reader.execute(
            f"SELECT version, seq, time_ns, kind, ntfs, parts, stats, note, {self._fs_col}"
            " FROM versions ORDER BY version").fetchall()
        out = []
        for r in rows:
            parts = json.loads(r[5])
            fs = r[8]
            if self._fs_col != "fs":
                for p in parts:
                    p.setdefault("fs", "ntfs")
                fs = ",".join(p["fs"] for p in parts)
            out.append(Version(r[0], r[1], r[2], r[3], r[4], parts, json.loads(r[6]), r[7], fs))
        return out

    def last_version(self) -> Version | None:
        v = self.versions()
        return v[-1] if v else None

    # ------------------------------------------------------------------ reads at a version

    def visible(self, part: str, records: Iterable[int], version: int) -> dict[int, list[Entry]]:
        """Entries of *records* visible at *version*, by record. Cost: one indexed
        lookup per record (batched 500 a query)."""
        out: dict[int, list[Entry]] = {}
        recs = sorted(set(records))
        for i in range(0, len(recs), 500):
            batch = recs[i : i + 500]
            q = (f"{self._sel} WHERE part = ? AND record IN ({','.join('?' * len(batch))}) AND {_VIS}")
            for row in self.reader.execute(q, (part, *batch, version, version)):
                e = Entry.from_row(row, self._times)
                out.setdefault(e.record, []).append(e)
        return out

    def all_visible(self, part: str, version: int) -> dict[int, list[Entry]]:
        """Every entry of partition *part* visible at *version*, by record."""
        out: dict[int, list[Entry]] = {}
        for row in self.reader.execute(f"{self._sel} WHERE part = ? AND {_VIS}", (part, version, version)):
            e = Entry.from_row(row, self._times)
            out.setdefault(e.record, []).append(e)
        return out

    def dir_info(self, part: str, record: int, version: int) -> DirInfo | None:
        """(parent, name, sequence) of directory *record* at *version*."""
        r = self.reader.execute(
            f'SELECT name, {self._stat} FROM entries WHERE part = ? AND record = ? AND is_dir = 1'
            f' AND {_VIS} LIMIT 1', (part, record, version, version),
        ).fetchone()
        if r is None:
            return None
        st = unpack_stat(r[1])
        return (st[1], r[0], st[0])  # parent, name, seq

    def dirs(self, part: str, version: int) -> Iterator[Entry]:
        """Every directory entry of *part* visible at *version*, lazily (whole rows: an
        ext directory's ``location`` holds its block ranges). Cost: one range of
        ``entries_dirs`` over the part's directories of all versions."""
        q = f"{self._sel} WHERE part = ? AND is_dir = 1 AND {_VIS}"
        for r in self.reader.execute(q, (part, version, version)):
            yield Entry.from_row(r, self._times)

    def names_in(self, part: str, directory: str, version: int) -> set[tuple[str, int]]:
        """``(name, record)`` of the entries of *part* directly in *directory* at
        *version*. Cost: one range scan of ``entries_key``, as :meth:`list_dir`, two
        columns a row."""
        q = f"SELECT name, record FROM entries WHERE dir = ? AND part = ? AND {_VIS}"
        return set(self.reader.execute(q, (directory, part, version, version)))

    def list_dir(self, directory: str, version: int) -> list[Entry]:
        """Entries directly in *directory* at *version*, by name (listing columns only:
        ``location`` is empty). Cost: one range scan of ``entries_key`` over the
        directory's entries of all versions, one row read per visible entry, and a
        sort of the visible ones by name (format 4: the key holds name ids)."""
        q = f"{self._dsel} WHERE dir = ? AND {_VIS} ORDER BY name"
        return Entry.from_dir_rows(directory, self.reader.execute(q, (directory, version, version)),
                                   self._times)

    def subtree(self, directory: str, version: int, *, full: bool = True) -> list[Entry]:
        """Entries anywhere below *directory* at *version* (index range on dir; whole
        rows, or with ``full=False`` the listing columns only, see :meth:`list_dir`)."""
        sel, make = (self._sel, Entry.from_row) if full else (self._lsel, Entry.from_list_row)
        times = self._times
        if directory == "/":
            q = f"{sel} WHERE {_VIS}"
            return [make(r, times) for r in self.reader.execute(q, (version, version))]
        q = f"{sel} WHERE (dir = ? OR (dir >= ? AND dir < ?)) AND {_VIS}"
        args = (directory, directory + "/", directory + "0", version, version)
        return [make(r, times) for r in self.reader.execute(q, args)]

    def at_path(self, directory: str, name: str, version: int) -> Entry | None:
        r = self.reader.execute(f"{self._sel} WHERE dir = ? AND name = ? AND {_VIS}",
                                (directory, name, version, version)).fetchone()
        if r is None:
            r = self.reader.execute(
                f"{self._sel} WHERE dir = ? COLLATE NOCASE AND name = ? COLLATE NOCASE AND {_VIS} LIMIT 1",
                (directory, name, version, version)).fetchone()
        return None if r is None else Entry.from_row(r, self._times)

    def history(self, directory: str, name: str) -> list[Entry]:
        """Every entry ever catalogued at a path, oldest first (case-insensitive
        fallback when the exact path is unknown)."""
        rows = self.reader.execute(f'{self._sel} WHERE dir = ? AND name = ? ORDER BY start',
                                   (directory, name)).fetchall()
        if not rows:
            rows = self.reader.execute(
                f"{self._sel} WHERE dir = ? COLLATE NOCASE AND name = ? COLLATE NOCASE ORDER BY start",
                (directory, name)).fetchall()
        return [Entry.from_row(r, self._times) for r in rows]

    def glob_query(self, pattern: str, *, on_path: bool) -> tuple[str, tuple[Any, ...]]:
        """The SQL of :meth:`glob` and its arguments. A name glob with a literal prefix
        (``q3*``) adds ``lower(name) >= 'q3' AND lower(name) < 'q4'``, a range of
        ``entries_lname`` the glob implies (so the result is the same)."""
        pat = pattern.lower()
        if self._v4 and not on_path:
            return self._glob_names(pat)
        if on_path:
            q = (f"{self._sel} WHERE lower(CASE dir WHEN '/' THEN '/' || name ELSE dir || '/' || name END)"
                 " GLOB ? ORDER BY dir, name, start")
            return q, (pat,)
        prefix = glob_prefix(pat)
        end = prefix_end(prefix)
        if end is not None:
            q = (f"{self._sel} WHERE lower(name) >= ? AND lower(name) < ? AND lower(name) GLOB ?"
                 " ORDER BY dir, name, start")
            return q, (prefix, end, pat)
        if prefix:
            q = f"{self._sel} WHERE lower(name) >= ? AND lower(name) GLOB ? ORDER BY dir, name, start"
            return q, (prefix, pat)
        return f"{self._sel} WHERE lower(name) GLOB ? ORDER BY dir, name, start", (pat,)

    def _glob_names(self, pat: str) -> tuple[str, tuple[Any, ...]]:
        """Format 4 name glob: the matching names (a range of ``names_lname`` when the
        pattern has a literal prefix, else a scan of the distinct names), then their
        rows through ``entries_name``."""
        prefix = glob_prefix(pat)
        end = prefix_end(prefix)
        if end is not None:
            sub = ("SELECT id FROM names WHERE lower(name) >= ? AND lower(name) < ?"
                   " AND lower(name) GLOB ?")
            args: tuple[Any, ...] = (prefix, end, pat)
        elif prefix:
            sub, args = "SELECT id FROM names WHERE lower(name) >= ? AND lower(name) GLOB ?", (prefix, pat)
        else:
            sub, args = "SELECT id FROM names WHERE lower(name) GLOB ?", (pat,)
        return f"{self._sel} WHERE name_id IN ({sub}) ORDER BY dir, name, start", args

    def glob(self, pattern: str, *, on_path: bool) -> Iterator[Entry]:
        """Entries (all versions) whose name — or full path with *on_path* — matches
        a glob, case-insensitively. Cost: a name glob with a literal prefix is a range
        of ``entries_lname`` (plus a sort of the matches); otherwise a scan of the
        entries table (format 4: of the distinct names)."""
        q, args = self.glob_query(pattern, on_path=on_path)
        for r in self.reader.execute(q, args):
            yield Entry.from_row(r, self._times)

    def changed_between(self, a: int, b: int) -> set[tuple[str, int]]:
        """(part, record) of entries opened or closed in versions (a, b]. Format 6: the
        rows opened are a range of ids (:meth:`_first_id_after`); a row closed is a
        deletion (``end > ref``: the index ``entries_deleted``) or was replaced by a
        newer version of the same record (``ref = end``), opened at its ``end``, so
        among the rows opened, unless the newer version's name was claimed by another
        record (the version's ``damaged`` rows say which: those records are checked
        through ``entries_record``). Cost: O(log rows) id lookups plus the rows opened
        and deleted in the range."""
        lo, hi = min(a, b), max(a, b)
        if self._format >= 6:
            return self._changed_between6(lo, hi)
        table = "file_entries" if self._v4 else "entries"
        rows = self.reader.execute(
            f'SELECT part, record FROM {table} WHERE ("start" > ? AND "start" <= ?) '
            'OR ("end" > ? AND "end" <= ?)', (lo, hi, lo, hi))
        return {(r[0], r[1]) for r in rows}

    def _first_id_after(self, version: int) -> int:
        """An id *i* such that every row with ``start <= version`` has an id below *i*
        and every other row an id of at least *i* (rows are only ever appended, a
        version's after the versions before it: ids grow with ``start``). Cost: a
        binary search, O(log rows) rowid lookups."""
        r = self.reader
        lo, hi = r.execute("SELECT min(id), max(id) FROM file_entries").fetchone()
        if lo is None:
            return 0
        a, b = int(lo), int(hi) + 1  # the answer is in [a, b]
        while a < b:
            m = (a + b) // 2  # m <= hi: a row at or after m exists
            i, start = r.execute("SELECT id, start FROM file_entries WHERE id >= ? ORDER BY id LIMIT 1",
                                 (m,)).fetchone()
            if start > version:
                b = m
            else:
                a = int(i) + 1
        return a

    def _changed_between6(self, lo: int, hi: int) -> set[tuple[str, int]]:
        r = self.reader
        out = set(r.execute("SELECT part, record FROM file_entries WHERE id >= ? AND id < ?",
                            (self._first_id_after(lo), self._first_id_after(hi))))
        out.update(r.execute('SELECT part, record FROM file_entries WHERE "end" > ref '
                             'AND "end" > ? AND "end" <= ?', (lo, hi)))
        # a record whose newer version lost its name to another record (damaged): its
        # closed row is in the range when some row of it ended there
        out.update(r.execute(
            "SELECT DISTINCT d.part, d.record FROM damaged d WHERE d.version > ? AND d.version <= ?"
            " AND EXISTS (SELECT 1 FROM file_entries e WHERE e.part = d.part AND e.record = d.record"
            ' AND e."end" > ? AND e."end" <= ?)', (lo, hi, lo, hi)))
        return out

    def damaged(self, version: int) -> list[dict[str, Any]]:
        rows = self.reader.execute("SELECT part, record, reason FROM damaged WHERE version = ?", (version,))
        return [{"part": r[0], "record": r[1], "reason": r[2]} for r in rows]

    # ------------------------------------------------------------------ writes

    def begin(self) -> None:
        self.writer.execute("BEGIN IMMEDIATE")
        self._forget()

    def rollback(self) -> None:
        if self._writer is not None and self._writer.in_transaction:
            self._writer.execute("ROLLBACK")
        self._forget()
        self._cache_back()

    def _cache_back(self) -> None:
        """The writer's page cache back to SQLite's default after a bulk index (the
        pages above it are freed)."""
        if self._bulk_cache and self._writer is not None:
            self._writer.execute("PRAGMA cache_size = -2000")
            self._bulk_cache = False

    def _forget(self) -> None:
        """Drop the intern caches (ids given in a rolled-back transaction are gone; a
        new transaction may follow another writer's)."""
        self._dir_ids, self._name_ids = {}, {}
        self._complete = set()
        self._bulk_sql = []

    def bulk_begin(self) -> bool:
        """Inside :meth:`begin`, before a first full index: when ``file_entries`` is
        empty, drop :data:`BULK_INDEXES` so the rows go in without index upkeep
        (:meth:`bulk_end` builds each index once, sorted: about half the cost of an
        insert that keeps them; a crash or :meth:`rollback` leaves the catalog as it
        was, with its indexes, since it is one transaction). Returns whether it did.
        Readers keep their committed snapshot, indexes included. Cost: O(1)."""
        w = self.writer
        if w.execute("SELECT 1 FROM file_entries LIMIT 1").fetchone() is not None:
            return False
        # the index builds sort in memory, and the new pages stay in the cache (2 MiB by
        # default: a 200k-inode index spilled; -20 % of its index build), until COMMIT
        w.execute(f"PRAGMA cache_size = -{BULK_CACHE_KIB}")
        self._bulk_cache = True
        for ix in BULK_INDEXES:
            row = w.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?",
                            (ix,)).fetchone()
            if row is not None:
                self._bulk_sql.append(row[0])
                w.execute(f"DROP INDEX {ix}")
        # interning then needs no lookups while these tables hold only what it added
        for table in ("dirs", "names"):
            if w.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None:
                self._complete.add(table)
        return True

    def bulk_end(self) -> None:
        """Build the indexes :meth:`bulk_begin` dropped (still inside the transaction;
        a unique key violated fails here, as its insert would have). SQLite releases
        the GIL while it works, so the indexer runs this in a worker thread. Cost:
        O(rows log rows) in C, ~1.5 us per row for all of them."""
        w = self.writer
        for sql in self._bulk_sql:
            w.execute(sql)
        self._bulk_sql = []

    def _intern(self, table: str, col: str, ids: dict[str, int], values: Iterable[str]) -> None:
        """Give every one of *values* its id in *table* (``dirs.path``, ``names.name``)
        in *ids*: known ones are looked up (500 a query), new ones inserted with the next
        ids. Cost: O(values not cached yet)."""
        # sorted: the UNIQUE index takes them in order, and the ids follow name order, so
        # the indexes on name ids are built from nearly sorted keys (a first index:
        # bulk_end ~30 % cheaper)
        missing = sorted({v for v in values if v not in ids})
        if not missing:
            return
        w = self.writer
        if table not in self._complete:
            for i in range(0, len(missing), 500):
                chunk = missing[i : i + 500]
                q = f"SELECT {col}, id FROM {table} WHERE {col} IN ({','.join('?' * len(chunk))})"
                ids.update(w.execute(q, chunk))
            missing = [v for v in missing if v not in ids]
            if not missing:
                return
        top = w.execute(f"SELECT max(id) FROM {table}").fetchone()[0] or 0
        new_ids = range(top + 1, top + 1 + len(missing))
        if self._json_each:  # one statement: no Python binding per row (half the cost)
            w.execute(f"INSERT INTO {table} (id, {col}) SELECT ? + key, value FROM json_each(?)",
                      (top + 1, json.dumps(missing, ensure_ascii=False)))
        else:
            w.executemany(f"INSERT INTO {table} (id, {col}) VALUES (?, ?)",
                          zip(new_ids, missing, strict=True))
        ids.update(zip(missing, new_ids, strict=True))

    def write_plan(self, plan: Plan, version: int, start: int = 0, batch: int | None = None,
                   time_ns: int | None = None) -> int:
        """Write part of *plan* (inside :meth:`begin`): rows ``[start, start+batch)`` of
        the concatenated modified/deleted/touched/added lists. Returns the next start
        (== total when done). *time_ns*: the version's time, as :meth:`finish_version`
        will write it (a new row whose backup_ns equals it leaves it out of ``stat``;
        None: every row keeps its own). Cost: one indexed update or insert per row (an
        insert also looks up, or adds, its directory and name: cached for the
        transaction)."""
        w = self.writer
        # a first index's new rows may come column-wise (plan.rows): no Entry per row
        new: list[Entry] | NewRows = plan.rows if plan.rows is not None else plan.added
        groups: list[tuple[str, list[Entry] | NewRows]] = [
            ("modified", plan.modified), ("deleted", plan.deleted),
            ("touched", plan.touched), ("added", new)]
        total = sum(len(g) for _, g in groups)
        stop = total if batch is None else min(total, start + batch)
        pos = 0
        for kind, rows in groups:
            lo, hi = max(start - pos, 0), min(stop - pos, len(rows))
            if lo >= hi:
                pass
            elif not isinstance(rows, list):  # column-wise new rows
                dirs, names = rows.keys(lo, hi)
                self._intern("dirs", "path", self._dir_ids, dirs)
                self._intern("names", "name", self._name_ids, names)
                # the partition is a literal too: six bound values a row
                part_sql = "'" + rows.part.replace("'", "''") + "'"
                w.executemany(_INS_COLS.format(v=int(version), p=part_sql), rows.insert_rows(
                    lo, hi, version, self._dir_ids, self._name_ids, time_ns))
            else:
                part = rows[lo:hi]
                if kind == "modified":
                    w.executemany('UPDATE file_entries SET "end" = ?, ref = ? WHERE id = ?',
                                  [(version, version, e.id) for e in part])
                elif kind == "deleted":
                    w.executemany('UPDATE file_entries SET "end" = ? WHERE id = ?',
                                  [(version, e.id) for e in part])
                elif kind == "touched":
                    w.executemany("UPDATE file_entries SET ref = ? WHERE id = ?",
                                  [(version, e.id) for e in part])
                else:
                    for e in part:
                        e.start = e.ref = version
                        e.end = 0
                    # intern the paths and names first (a diff's are mostly known)
                    dids, nids, pack = self._dir_ids, self._name_ids, pack_stat
                    self._intern("dirs", "path", dids, map(_dir_of, part))
                    self._intern("names", "name", nids, map(_name_of, part))
                    w.executemany(_INS.format(v=int(version)),
                                  [(e.part, dids[e.dir], nids[e.name], e.record, e.is_dir,
                                    pack(e.seq, e.parent, e.size, e.alloc, e.crtime, e.mtime,
                                         e.ctime, e.atime, e.attrs, e.resident, e.flags,
                                         e.streams, e.backup_ns, time_ns), e.location) for e in part])
            pos += len(rows)
        return stop

    def finish_version(self, version: int, seq: int, time_ns: int, kind: str,
                       parts: list[dict[str, Any]], plans: list[Plan], note: str = "",
                       extra: dict[str, Any] | None = None) -> None:
        """Write the version row and damaged records, then COMMIT (the version becomes
        visible to readers atomically)."""
        w = self.writer
        stats: dict[str, Any] = {}
        for p in plans:
            for k, v in p.counts().items():
                stats[k] = stats.get(k, 0) + v
            w.executemany("INSERT INTO damaged VALUES (?, ?, ?, ?)",
                          [(version, p.part, r, why) for r, why in p.damaged])
        stats.update(extra or {})
        kinds = [str(p.get("fs", "ntfs")) for p in parts]
        w.execute("INSERT OR REPLACE INTO versions (version, seq, time_ns, kind, ntfs, parts, stats,"
                  " note, fs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (version, seq, time_ns, kind, kinds.count("ntfs"), json.dumps(parts),
                   json.dumps(stats), note, ",".join(kinds)))
        w.execute("COMMIT")
        self._cache_back()


#: the indexes of the format 1-3 ``entries`` table and of the format 4 ``file_entries``
#: (dropped when it is rebuilt; ``names_lname`` is on ``names``, which stays)
_OLD_INDEXES = ("entries_key", "entries_name", "entries_record", "entries_start", "entries_end",
                "entries_lname", "entries_dirs", "entries_deleted")


def _has_json_each(w: sqlite3.Connection) -> bool:
    """Whether this SQLite has the JSON functions (built in since 3.38; usually
    compiled in before)."""
    try:
        w.execute("SELECT count(*) FROM json_each('[]')").fetchone()
    except sqlite3.OperationalError:
        return False
    return True


def _old_format(w: sqlite3.Connection) -> int | None:
    """The format of a catalog older than :data:`CATALOG_FORMAT`, else None (a new
    file, or the current or a newer format)."""
    if w.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
        return None
    fmt = w.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    if fmt is None or not str(fmt[0]).isdigit() or int(fmt[0]) >= CATALOG_FORMAT:
        return None
    return int(fmt[0])


def _migrate(w: sqlite3.Connection, path: Path, old: int) -> None:
    """Upgrade a format 1 to 7 catalog to :data:`CATALOG_FORMAT` in one transaction.
    Before the schema script runs: the old rows' table
    (formats 1-3: ``entries``, formats 4 to 7: ``file_entries``, its view dropped) loses
    its indexes and is renamed away, the current schema is created, formats 1-3 intern every distinct directory path and
    name (formats 4 and 5 have them), the rows are copied with their ids (``id`` kept:
    format 6 relies on ids growing with ``start``, as they were appended) and their stat
    fields packed (:func:`pack_stat`; format 5: :func:`restat`, given the start version's
    time; formats 6 and 7: :func:`stat7_to_8`; a Python function of the statement), the
    old table dropped (its pages are free pages of the file, reused by the versions that
    follow); formats 1 and 2
    also gain ``versions.fs`` and give every file system of their versions its kind
    (NTFS, the only one they knew). Cost: O(rows), ~2 us a row (the packing), once."""
    w.create_function("cdp_stat", len(STAT_FIELDS) + 1, pack_stat, deterministic=True)
    w.create_function("cdp_restat", 2, restat, deterministic=True)
    w.create_function("cdp_stat8", 1, stat7_to_8, deterministic=True)
    w.execute("BEGIN IMMEDIATE")
    try:
        for ix in _OLD_INDEXES:
            w.execute(f"DROP INDEX IF EXISTS {ix}")
        if old >= 4:
            w.execute("DROP VIEW IF EXISTS entries")
            w.execute("ALTER TABLE file_entries RENAME TO entries_old")
        elif w.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries'").fetchone() is None:
            w.execute("CREATE TABLE entries_old (" + ", ".join(("id", *COLUMNS)) + ")")
        else:
            w.execute("ALTER TABLE entries RENAME TO entries_old")
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                w.execute(stmt)
        start_ns = "(SELECT v.time_ns FROM versions v WHERE v.version = o.start)"
        if old >= 6:
            stat = "cdp_stat8(o.stat)"
        elif old == 5:
            stat = f"cdp_restat(o.stat, {start_ns})"
        else:
            stat = "cdp_stat(" + ", ".join(f'o."{c}"' for c in STAT_FIELDS) + f", {start_ns})"
        cols = 'o.id, o.part, {d}, {n}, o.start, o."end", o.ref, o.record, o.is_dir, ' + stat + ", o.location"
        ins = ('INSERT INTO file_entries (id, part, dir_id, name_id, start, "end", ref, record, '
               "is_dir, stat, location) SELECT ")
        if old >= 4:
            w.execute(ins + cols.format(d="o.dir_id", n="o.name_id") + " FROM entries_old o ORDER BY o.id")
        else:
            w.execute("INSERT INTO dirs (path) SELECT DISTINCT dir FROM entries_old ORDER BY dir")
            w.execute("INSERT INTO names (name) SELECT DISTINCT name FROM entries_old ORDER BY name")
            w.execute(ins + cols.format(d="d.id", n="n.id") + " FROM entries_old o"
                      " JOIN dirs d ON d.path = o.dir JOIN names n ON n.name = o.name ORDER BY o.id")
        w.execute("DROP TABLE entries_old")
        vcols = {r[1] for r in w.execute("PRAGMA table_info(versions)")}
        if "fs" not in vcols:
            w.execute("ALTER TABLE versions ADD COLUMN fs TEXT NOT NULL DEFAULT ''")
            rows = w.execute("SELECT version, parts FROM versions").fetchall()
            for version, parts_json in rows:
                parts = json.loads(parts_json)
                for p in parts:
                    p.setdefault("fs", "ntfs")
                w.execute("UPDATE versions SET parts = ?, fs = ? WHERE version = ?",
                          (json.dumps(parts), ",".join(p["fs"] for p in parts), version))
        w.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(CATALOG_FORMAT),))
        w.execute("COMMIT")
    except BaseException:
        w.execute("ROLLBACK")
        raise
    what = {7: "stat re-packed", 6: "stat re-packed, entries_record on the record alone",
            5: "backup times left out of stat, indexes for diff replaced",
            4: "stat fields packed", 3: "paths and names stored once, stat fields packed"}.get(
        old, "file-system kind added, paths and names stored once, stat fields packed")
    log.info("%s: catalog format %d migrated to %d (%s)", path, old, CATALOG_FORMAT, what)


def glob_prefix(pattern: str) -> str:
    """The literal characters a glob starts with (up to its first ``*``, ``?`` or
    ``[``)."""
    for i, ch in enumerate(pattern):
        if ch in _GLOB_SPECIAL:
            return pattern[:i]
    return pattern


def prefix_end(prefix: str) -> str | None:
    """A string greater than every string starting with *prefix* and smaller than
    every other string greater than *prefix* (for a ``>= prefix AND < end`` range):
    *prefix* with its last character incremented (code point order = UTF-8 byte order,
    SQLite's BINARY collation). None for an empty prefix or one ending in U+10FFFF."""
    if not prefix or ord(prefix[-1]) >= 0x10FFFF:
        return None
    nxt = ord(prefix[-1]) + 1
    if 0xD800 <= nxt <= 0xDFFF:  # surrogates cannot be stored: skip past them
        nxt = 0xE000
    return prefix[:-1] + chr(nxt)
