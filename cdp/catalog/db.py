"""The catalog file: SQLite in WAL mode, key/value shaped (docs/FORMATS-catalog.md).

Design notes
------------
* Key = (directory path, name, start version) — the unique index ``entries_key``;
  the value is the rest of the row. Directory listings at a version are one range scan
  of that index (``dir = ?`` then a filter on start/end).
* Two connections: the background indexer writes a whole version in one transaction
  on ``writer`` (it may yield to the event loop between batches), queries read on
  ``reader`` and see only committed versions (WAL snapshot isolation). A version
  exists for readers exactly when its ``versions`` row is committed.
* Everything runs on one thread (the daemon's event loop, or cdpctl offline).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.catalog.model import COLUMNS, Entry
from cdp.catalog.rules import DirInfo, Plan
from cdp.errors import Corruption

#: catalog schema version stored in meta("format"); bump on an incompatible change
CATALOG_FORMAT = 1
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
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    part TEXT NOT NULL, dir TEXT NOT NULL, name TEXT NOT NULL,
    start INTEGER NOT NULL, "end" INTEGER NOT NULL, ref INTEGER NOT NULL,
    record INTEGER NOT NULL, seq INTEGER NOT NULL, parent INTEGER NOT NULL,
    is_dir INTEGER NOT NULL, size INTEGER NOT NULL, alloc INTEGER NOT NULL,
    crtime INTEGER NOT NULL, mtime INTEGER NOT NULL, ctime INTEGER NOT NULL,
    atime INTEGER NOT NULL, attrs INTEGER NOT NULL, resident INTEGER NOT NULL,
    flags INTEGER NOT NULL, location BLOB NOT NULL, streams TEXT NOT NULL,
    backup_ns INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS entries_key ON entries (dir, name, start);
CREATE INDEX IF NOT EXISTS entries_record ON entries (part, record, start);
CREATE INDEX IF NOT EXISTS entries_start ON entries (start);
CREATE INDEX IF NOT EXISTS entries_end ON entries ("end") WHERE "end" > 0;
CREATE TABLE IF NOT EXISTS damaged (
    version INTEGER NOT NULL, part TEXT NOT NULL, record INTEGER NOT NULL, reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS damaged_version ON damaged (version);
"""

_SEL = "SELECT id, " + ", ".join(f'"{c}"' for c in COLUMNS) + " FROM entries"
_VIS = '"start" <= ? AND ("end" = 0 OR "end" > ?)'
_INS = ("INSERT INTO entries (" + ", ".join(f'"{c}"' for c in COLUMNS) + ") VALUES ("
        + ", ".join("?" * len(COLUMNS)) + ")")


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

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "marker": f"marker{self.version}", "seq": self.seq,
                "time_ns": self.time_ns, "kind": self.kind, "ntfs": self.ntfs,
                "parts": self.parts, "stats": self.stats, "note": self.note}


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


class Catalog:
    """The file catalog of one volume (``VOLUME_DIR/catalog.sqlite``)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._writer: sqlite3.Connection | None = None
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
        except sqlite3.Error as e:
            raise Corruption(f"{path}: cannot read the catalog: {e}") from None

    @property
    def writer(self) -> sqlite3.Connection:
        if self._writer is None:
            if self.readonly:
                raise Corruption("catalog opened read-only")
            w = _connect(self.path, False)
            w.execute("PRAGMA journal_mode = WAL")
            w.execute("PRAGMA synchronous = NORMAL")
            w.executescript(SCHEMA)
            self._writer = w
        return self._writer

    def close(self) -> None:
        self.reader.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ versions

    def versions(self) -> list[Version]:
        """Every catalogued marker, oldest first. Cost: O(versions)."""
        rows = self.reader.execute(
            "SELECT version, seq, time_ns, kind, ntfs, parts, stats, note FROM versions ORDER BY version"
        ).fetchall()
        return [Version(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), json.loads(r[6]), r[7]) for r in rows]

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
            q = (f"{_SEL} WHERE part = ? AND record IN ({','.join('?' * len(batch))}) AND {_VIS}")
            for row in self.reader.execute(q, (part, *batch, version, version)):
                e = Entry.from_row(row)
                out.setdefault(e.record, []).append(e)
        return out

    def all_visible(self, part: str, version: int) -> dict[int, list[Entry]]:
        """Every entry of partition *part* visible at *version*, by record."""
        out: dict[int, list[Entry]] = {}
        for row in self.reader.execute(f"{_SEL} WHERE part = ? AND {_VIS}", (part, version, version)):
            e = Entry.from_row(row)
            out.setdefault(e.record, []).append(e)
        return out

    def dir_info(self, part: str, record: int, version: int) -> DirInfo | None:
        """(parent, name, sequence) of directory *record* at *version*."""
        r = self.reader.execute(
            f'SELECT parent, name, seq FROM entries WHERE part = ? AND record = ? AND is_dir = 1 AND {_VIS} LIMIT 1',
            (part, record, version, version),
        ).fetchone()
        return None if r is None else (r[0], r[1], r[2])

    def list_dir(self, directory: str, version: int) -> list[Entry]:
        """Entries directly in *directory* at *version*. Cost: one index range scan over
        the directory's entries of all versions."""
        q = f"{_SEL} WHERE dir = ? AND {_VIS}"
        return [Entry.from_row(r) for r in self.reader.execute(q, (directory, version, version))]

    def subtree(self, directory: str, version: int) -> list[Entry]:
        """Entries anywhere below *directory* at *version* (index range on dir)."""
        if directory == "/":
            q = f"{_SEL} WHERE {_VIS}"
            return [Entry.from_row(r) for r in self.reader.execute(q, (version, version))]
        q = f"{_SEL} WHERE (dir = ? OR (dir >= ? AND dir < ?)) AND {_VIS}"
        args = (directory, directory + "/", directory + "0", version, version)
        return [Entry.from_row(r) for r in self.reader.execute(q, args)]

    def at_path(self, directory: str, name: str, version: int) -> Entry | None:
        r = self.reader.execute(f"{_SEL} WHERE dir = ? AND name = ? AND {_VIS}",
                                (directory, name, version, version)).fetchone()
        if r is None:
            r = self.reader.execute(
                f"{_SEL} WHERE dir = ? COLLATE NOCASE AND name = ? COLLATE NOCASE AND {_VIS} LIMIT 1",
                (directory, name, version, version)).fetchone()
        return None if r is None else Entry.from_row(r)

    def history(self, directory: str, name: str) -> list[Entry]:
        """Every entry ever catalogued at a path, oldest first (case-insensitive
        fallback when the exact path is unknown)."""
        rows = self.reader.execute(f'{_SEL} WHERE dir = ? AND name = ? ORDER BY start',
                                   (directory, name)).fetchall()
        if not rows:
            rows = self.reader.execute(
                f"{_SEL} WHERE dir = ? COLLATE NOCASE AND name = ? COLLATE NOCASE ORDER BY start",
                (directory, name)).fetchall()
        return [Entry.from_row(r) for r in rows]

    def glob(self, pattern: str, *, on_path: bool) -> Iterator[Entry]:
        """Entries (all versions) whose name — or full path with *on_path* — matches
        a glob, case-insensitively. Cost: a scan of the entries table."""
        pat = pattern.lower()
        if on_path:
            q = (f"{_SEL} WHERE lower(CASE dir WHEN '/' THEN '/' || name ELSE dir || '/' || name END)"
                 " GLOB ? ORDER BY dir, name, start")
        else:
            q = f"{_SEL} WHERE lower(name) GLOB ? ORDER BY dir, name, start"
        for r in self.reader.execute(q, (pat,)):
            yield Entry.from_row(r)

    def changed_between(self, a: int, b: int) -> set[tuple[str, int]]:
        """(part, record) of entries opened or closed in versions (a, b]."""
        lo, hi = min(a, b), max(a, b)
        rows = self.reader.execute(
            'SELECT part, record FROM entries WHERE ("start" > ? AND "start" <= ?) '
            'OR ("end" > ? AND "end" <= ?)', (lo, hi, lo, hi))
        return {(r[0], r[1]) for r in rows}

    def damaged(self, version: int) -> list[dict[str, Any]]:
        rows = self.reader.execute("SELECT part, record, reason FROM damaged WHERE version = ?", (version,))
        return [{"part": r[0], "record": r[1], "reason": r[2]} for r in rows]

    # ------------------------------------------------------------------ writes

    def begin(self) -> None:
        self.writer.execute("BEGIN IMMEDIATE")

    def rollback(self) -> None:
        if self._writer is not None and self._writer.in_transaction:
            self._writer.execute("ROLLBACK")

    def write_plan(self, plan: Plan, version: int, start: int = 0, batch: int | None = None) -> int:
        """Write part of *plan* (inside :meth:`begin`): rows ``[start, start+batch)`` of
        the concatenated modified/deleted/touched/added lists. Returns the next start
        (== total when done). Cost: one indexed update or insert per row."""
        w = self.writer
        groups: list[tuple[str, list[Entry]]] = [
            ("modified", plan.modified), ("deleted", plan.deleted),
            ("touched", plan.touched), ("added", plan.added)]
        total = sum(len(g) for _, g in groups)
        stop = total if batch is None else min(total, start + batch)
        pos = 0
        for kind, rows in groups:
            lo, hi = max(start - pos, 0), min(stop - pos, len(rows))
            if lo < hi:
                part = rows[lo:hi]
                if kind == "modified":
                    w.executemany('UPDATE entries SET "end" = ?, ref = ? WHERE id = ?',
                                  [(version, version, e.id) for e in part])
                elif kind == "deleted":
                    w.executemany('UPDATE entries SET "end" = ? WHERE id = ?',
                                  [(version, e.id) for e in part])
                elif kind == "touched":
                    w.executemany("UPDATE entries SET ref = ? WHERE id = ?",
                                  [(version, e.id) for e in part])
                else:
                    vals = []
                    for e in part:
                        e.start, e.end, e.ref = version, 0, version
                        vals.append(e.values())
                    w.executemany(_INS, vals)
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
        w.execute("INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  (version, seq, time_ns, kind, len(parts), json.dumps(parts), json.dumps(stats), note))
        w.execute("COMMIT")
