"""The catalog's performance structure (no timings): planning and writing are split
into many steps that yield to the event loop, ``find`` by name uses the name index,
listings use the key index, and catalogs of formats 1 to 3 are migrated (format 4:
test_catalog_format5.py)."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import sqlite3
from pathlib import Path

import pytest

from cdp.catalog.db import CATALOG_FORMAT, Catalog, glob_prefix, prefix_end
from cdp.catalog.indexer import Computed, persist
from cdp.catalog.model import Entry
from cdp.catalog.rules import Plan, Resolver, make_plan, plan_steps
from cdp.ntfs.attribute import DataStream, FileName
from cdp.ntfs.record import FileRecord

ROOT = 5


def rec(number: int, parent: int, name: str, *, is_dir: bool = False, size: int = 3) -> FileRecord:
    r = FileRecord(number, 1, 1 | (2 if is_dir else 0))
    r.names = [FileName(parent, 0, 1, name, is_dir, size)]
    r.times = (10**17, 10**17 + number, 10**17, 10**17)
    r.data = None if is_dir else DataStream("", True, size, size, 0, content=b"x" * size)
    return r


def tree(n: int) -> dict[int, FileRecord]:
    """*n* files in directories of 100 (names with mixed case)."""
    out: dict[int, FileRecord] = {}
    dirs = n // 100 + 1
    for d in range(dirs):
        out[64 + d] = rec(64 + d, ROOT, f"Dir{d:03d}", is_dir=True)
    for i in range(n):
        num = 64 + dirs + i
        out[num] = rec(num, 64 + i // 100, f"{'Q3' if i % 7 == 0 else 'File'}-{i:05d}.TXT")
    return out


def entry_rows(plan: Plan) -> list[tuple[object, ...]]:
    return [e.values() for e in plan.added]


def test_planning_is_split_into_many_steps_with_the_same_result() -> None:
    new = tree(5000)
    whole = make_plan("", new, {}, Resolver("", new), 7)
    plan = Plan("", records=len(new))
    steps = list(plan_steps(plan, new, {}, Resolver("", new), 7, chunk=100))
    assert len(steps) >= len(new) // 100
    assert steps == sorted(steps) and steps[-1] == len(new)
    assert entry_rows(plan) == entry_rows(whole) and len(plan.added) == len(new)
    assert plan.damaged == whole.damaged == []


def test_moved_directory_subtree_is_planned_in_steps(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.sqlite")
    new = tree(1000)
    first = make_plan("", new, {}, Resolver("", new), 1)
    asyncio.run(persist(cat, Computed("full", parts=[{"name": ""}], plans=[first]), 1, 1, 1))
    moved = {64: rec(64, ROOT, "Moved", is_dir=True)}
    old = cat.visible("", moved, 1)
    plan = Plan("", records=1)
    steps = list(plan_steps(plan, moved, old, Resolver("", moved, lambda n: cat.dir_info("", n, 1)),
                            2, lambda d: cat.subtree(d, 1), chunk=10))
    assert len(steps) >= 100 // 10  # the 100 files below the moved directory, 10 a step
    assert sorted(e.dir for e in plan.added) == ["/"] + ["/Moved"] * 100


def test_writes_are_split_into_batches(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.sqlite")
    new = tree(3000)
    plan = make_plan("", new, {}, Resolver("", new), 1)
    steps = asyncio.run(persist(cat, Computed("full", parts=[{"name": ""}], plans=[plan]), 1, 1, 1,
                                batch=100))
    assert steps >= len(plan.added) // 100
    assert cat.reader.execute("SELECT count(*) FROM entries").fetchone()[0] == len(plan.added)


@pytest.fixture
def filled(tmp_path: Path) -> Catalog:
    cat = Catalog(tmp_path / "catalog.sqlite")
    new = tree(2000)
    plan = make_plan("", new, {}, Resolver("", new), 1)
    asyncio.run(persist(cat, Computed("full", parts=[{"name": ""}], plans=[plan]), 1, 1, 1))
    return cat


def plan_of(cat: Catalog, q: str, args: tuple[object, ...]) -> str:
    return " | ".join(str(r[3]) for r in cat.reader.execute("EXPLAIN QUERY PLAN " + q, args))


@pytest.mark.parametrize("pattern", ["q3*", "Q3-0007?.txt", "file-0001[0-4].txt", "dir00*", "q3-00000.txt"])
def test_find_with_a_literal_prefix_uses_the_name_index(filled: Catalog, pattern: str) -> None:
    q, args = filled.glob_query(pattern, on_path=False)
    assert "names_lname" in plan_of(filled, q, args)
    everything = filled.reader.execute("SELECT name, dir, start FROM entries").fetchall()
    want = sorted((d, n, s) for n, d, s in everything if fnmatch.fnmatchcase(n.lower(), pattern.lower()))
    got = [(e.dir, e.name, e.start) for e in filled.glob(pattern, on_path=False)]
    assert got == want and got


def test_find_without_a_prefix_still_matches_everything(filled: Catalog) -> None:
    q, args = filled.glob_query("*-0001?.txt", on_path=False)
    p = plan_of(filled, q, args)  # format 4: a scan of the distinct names, not of the rows
    assert "SCAN names" in p and "entries_name (name_id=?)" in p and "SCAN e" not in p
    got = [e.name for e in filled.glob("*-0001?.txt", on_path=False)]
    assert len(got) == 10
    assert len(list(filled.glob("*", on_path=False))) == 2000 + 21


def test_glob_prefix_ranges() -> None:
    assert glob_prefix("q3*x") == "q3" and glob_prefix("[ab]*") == "" and glob_prefix("abc") == "abc"
    assert prefix_end("q3") == "q4" and prefix_end("") is None
    assert prefix_end("a\U0010ffff") is None
    assert prefix_end("a\ud7ff") == "a\ue000"


def test_listing_is_one_range_of_the_key_index(filled: Catalog) -> None:
    from cdp.catalog.db import _VIS

    q = f"{filled._dsel} WHERE dir = ? AND {_VIS} ORDER BY name"  # what list_dir runs
    p = plan_of(filled, q, ("/Dir001", 1, 1))
    # format 4: one range of the key (directory id, name id, start), then the visible
    # rows sorted by name (the key orders names by id); no scan
    assert "entries_key (dir_id=?)" in p and "SCAN" not in p
    rows = filled.list_dir("/Dir001", 1)
    assert [e.name for e in rows] == sorted(e.name for e in rows) and len(rows) == 100
    full = {e.name: e for e in filled.subtree("/Dir001", 1)}
    for e in rows:  # listing columns match the whole rows
        d, f = e.to_dict(), full[e.name].to_dict()
        assert d == f


#: a format 1 catalog (pinned): the entries table and its indexes, no ``entries_lname``,
#: no ``entries_dirs``, no ``versions.fs``
FORMAT_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE versions (
    version INTEGER PRIMARY KEY, seq INTEGER NOT NULL, time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL, ntfs INTEGER NOT NULL, parts TEXT NOT NULL, stats TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE entries (
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
CREATE UNIQUE INDEX entries_key ON entries (dir, name, start);
CREATE INDEX entries_record ON entries (part, record, start);
CREATE INDEX entries_start ON entries (start);
CREATE INDEX entries_end ON entries ("end") WHERE "end" > 0;
CREATE TABLE damaged (
    version INTEGER NOT NULL, part TEXT NOT NULL, record INTEGER NOT NULL, reason TEXT NOT NULL
);
CREATE INDEX damaged_version ON damaged (version);
INSERT INTO meta VALUES ('format', '1');
INSERT INTO versions VALUES (1, 10, 1000, 'full', 1, '[{"name": ""}]', '{}', '');
INSERT INTO versions VALUES (2, 20, 2000, 'diff', 1, '[{"name": ""}]', '{}', '');
INSERT INTO entries VALUES (1, '', '/', 'Docs', 1, 0, 2, 64, 1, 5, 1, 0, 0, 1, 2, 3, 4, 16, 1, 0, X'', '', 1000);
INSERT INTO entries VALUES (2, '', '/Docs', 'a.txt', 1, 2, 2, 65, 1, 64, 0, 5, 8, 1, 2, 3, 4, 32, 1, 0, X'68656c6c6f', '', 1000);
INSERT INTO entries VALUES (3, '', '/Docs', 'a.txt', 2, 0, 2, 65, 1, 64, 0, 6, 8, 1, 5, 3, 4, 32, 1, 0, X'68656c6c6f21', '', 2000);
INSERT INTO entries VALUES (4, '', '/Docs', 'B.txt', 2, 0, 2, 66, 1, 64, 0, 9, 4096, 1, 5, 3, 4, 32, 0, 0, X'00000000000000000400110864', '[{"name": "s", "size": 3}]', 2000);
"""

#: the ``entries`` table of format 3 (pinned) with the same rows: what format 4 migrates
FORMAT_3 = (FORMAT_1.replace("('format', '1')", "('format', '3')")
            .replace("note TEXT NOT NULL DEFAULT ''\n);",
                     "note TEXT NOT NULL DEFAULT '',\n    fs TEXT NOT NULL DEFAULT ''\n);")
            .replace("'{}', '');", "'{}', '', 'ntfs');")
            .replace("CREATE TABLE damaged",
                     "CREATE INDEX entries_lname ON entries (lower(name));\n"
                     "CREATE INDEX entries_dirs ON entries (part, record) WHERE is_dir = 1;\n"
                     "CREATE TABLE damaged"))

#: the objects of a format 6 catalog (golden: a change here is a format change; format 5
#: changed ``file_entries``' columns, not format 4's objects; format 6 dropped
#: ``entries_start`` and replaced ``entries_end`` by ``entries_deleted``)
FORMAT_6_OBJECTS = {
    ("table", "meta"), ("table", "versions"), ("table", "dirs"), ("table", "names"),
    ("table", "file_entries"), ("table", "damaged"), ("view", "entries"),
    ("index", "names_lname"), ("index", "entries_key"), ("index", "entries_name"),
    ("index", "entries_record"), ("index", "entries_deleted"),
    ("index", "entries_dirs"), ("index", "damaged_version"),
}


def _objects(cat: Catalog) -> set[tuple[str, str]]:
    return {(t, n) for t, n in cat.reader.execute("SELECT type, name FROM sqlite_master")
            if not n.startswith("sqlite_")}


@pytest.mark.parametrize("old", [1, 3])
def test_old_catalog_is_migrated_to_format_8(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             old: int) -> None:
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.executescript(FORMAT_1 if old == 1 else FORMAT_3)
    want = db.execute("SELECT id, part, dir, name, start, \"end\", ref, record, seq, parent, is_dir,"
                      " size, alloc, crtime, mtime, ctime, atime, attrs, resident, flags, location,"
                      " streams, backup_ns FROM entries ORDER BY id").fetchall()
    db.close()
    ro = Catalog(path, readonly=True)  # cdpctl offline on a catalog not migrated yet
    assert [e.path for e in ro.list_dir("/Docs", 2)] == ["/Docs/B.txt", "/Docs/a.txt"]
    assert [e.name for e in ro.glob("*.TXT", on_path=False)] == ["B.txt", "a.txt", "a.txt"]
    ro.close()
    with caplog.at_level(logging.INFO, logger="cdp.catalog"):
        cat = Catalog(path)
    assert f"catalog format {old} migrated to 8" in caplog.text
    assert CATALOG_FORMAT == 8
    assert cat.reader.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "8"
    assert _objects(cat) == FORMAT_6_OBJECTS
    assert cat.reader.execute("SELECT sql FROM sqlite_master WHERE name = 'entries_record'"
                              ).fetchone()[0].endswith("ON file_entries (record)")
    # formats 5 and 6: the stat fields come back from the packed ``stat`` (Entry.from_row;
    # format 6: a backup_ns equal to its start version's time left out, read from versions)
    got = [(e.id, *e.values()) for e in (Entry.from_row(r, cat._times) for r in cat.reader.execute(
        f"{cat._sel} ORDER BY id"))]
    assert got == want
    assert cat.reader.execute("SELECT path FROM dirs ORDER BY id").fetchall() == [("/",), ("/Docs",)]
    assert cat.reader.execute("SELECT name FROM names ORDER BY id").fetchall() == [
        ("B.txt",), ("Docs",), ("a.txt",)]
    assert [v.fs for v in cat.versions()] == ["ntfs", "ntfs"]
    assert [e.path for e in cat.list_dir("/Docs", 2)] == ["/Docs/B.txt", "/Docs/a.txt"]
    assert [(e.start, e.end, e.size) for e in cat.history("/Docs", "a.txt")] == [(1, 2, 5), (2, 0, 6)]
    assert [e.name for e in cat.glob("*.TXT", on_path=False)] == ["B.txt", "a.txt", "a.txt"]
    assert cat.changed_between(1, 2) == {("", 65), ("", 66)}
    cat.close()
    Catalog(path).close()  # opened again: nothing more to migrate
    assert _objects(Catalog(path, readonly=True)) == FORMAT_6_OBJECTS


def test_a_new_catalog_has_the_format_8_objects(tmp_path: Path) -> None:
    """Format 8 has format 6's objects; ``entries_record`` is on the record alone (format 7)."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    assert _objects(cat) == FORMAT_6_OBJECTS
    assert cat.reader.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "8"
    assert cat.reader.execute("SELECT sql FROM sqlite_master WHERE name = 'entries_record'"
                              ).fetchone()[0].endswith("ON file_entries (record)")


def _index_sql(cat: Catalog) -> set[tuple[str, str]]:
    return set(cat.reader.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                                  " AND sql IS NOT NULL"))


def test_first_full_index_builds_its_indexes_once_its_rows_are_in(tmp_path: Path) -> None:
    schema = _index_sql(Catalog(tmp_path / "empty.sqlite"))
    cat = Catalog(tmp_path / "catalog.sqlite")
    new = tree(1500)
    plan = make_plan("", new, {}, Resolver("", new), 1)
    asyncio.run(persist(cat, Computed("full", parts=[{"name": ""}], plans=[plan]), 1, 1, 1, batch=200))
    # the same indexes as a new catalog's, and every row reachable through them
    assert _index_sql(cat) == schema and _objects(cat) == FORMAT_6_OBJECTS
    assert cat.reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(cat.list_dir("/Dir003", 1)) == 100 and len(list(cat.glob("q3*", on_path=False))) == 215
    # not empty any more: a second version keeps its indexes while it writes
    cat.begin()
    assert not cat.bulk_begin()
    cat.rollback()
    # a second version naming known directories and names reuses their ids
    more = {9000: rec(9000, 64, "File-00101.TXT", size=9), 9001: rec(9001, 64, "new.txt")}
    plan2 = make_plan("", more, {}, Resolver("", more, lambda n: cat.dir_info("", n, 1)), 2)
    asyncio.run(persist(cat, Computed("diff", parts=[{"name": ""}], plans=[plan2]), 2, 2, 2))
    assert cat.reader.execute("SELECT count(*) FROM dirs").fetchone()[0] == 16  # "/" and 15 dirs
    assert cat.reader.execute("SELECT count(*) FROM names WHERE name = 'File-00101.TXT'").fetchone()[0] == 1
    assert [e.name for e in cat.list_dir("/Dir000", 2)][-2:] == ["Q3-00098.TXT", "new.txt"]
    assert cat.reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize("json_each", [True, False])
def test_interned_names_come_back_exactly(tmp_path: Path, json_each: bool) -> None:
    odd = ['quote"s', "back\\slash", "new\nline", "ünïcödé ☃", "123", "[1]", "null", " spaced ",
           "tab\there", "€uro", "\U0001f600"]
    cat = Catalog(tmp_path / "catalog.sqlite")
    assert cat._json_each  # this SQLite has the JSON functions; False: the fallback
    cat._json_each = json_each
    new = {64: rec(64, ROOT, "D i r", is_dir=True)}
    new.update({100 + i: rec(100 + i, 64, name) for i, name in enumerate(odd)})
    plan = make_plan("", new, {}, Resolver("", new), 1)
    asyncio.run(persist(cat, Computed("full", parts=[{"name": ""}], plans=[plan]), 1, 1, 1))
    assert [e.name for e in cat.list_dir("/D i r", 1)] == sorted(odd)
    # a second version: known names reused, a new one added
    more = {200: rec(200, 64, "null"), 201: rec(201, ROOT, "[1]"), 202: rec(202, ROOT, "x\ty")}
    plan2 = make_plan("", more, {}, Resolver("", more, lambda n: cat.dir_info("", n, 1)), 2)
    asyncio.run(persist(cat, Computed("diff", parts=[{"name": ""}], plans=[plan2]), 2, 2, 2))
    assert [e.name for e in cat.list_dir("/", 2)] == ["D i r", "[1]", "x\ty"]
    assert cat.reader.execute("SELECT count(*) FROM names").fetchone()[0] == len(odd) + 2
    assert cat.reader.execute("SELECT typeof(name) FROM names WHERE name = '123'").fetchone() == ("text",)


def test_a_first_index_rolled_back_leaves_the_indexes(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.sqlite")
    schema = _index_sql(cat)
    new = tree(300)
    plan = make_plan("", new, {}, Resolver("", new), 1)

    class Boom(Exception):
        pass

    def fail() -> None:
        raise Boom

    cat.bulk_end = fail  # type: ignore[method-assign]
    with pytest.raises(Boom):
        asyncio.run(persist(cat, Computed("full", parts=[{"name": ""}], plans=[plan]), 1, 1, 1))
    assert _index_sql(cat) == schema and cat.versions() == []
    assert cat.reader.execute("SELECT count(*) FROM file_entries").fetchone()[0] == 0
    assert cat.reader.execute("SELECT count(*) FROM names").fetchone()[0] == 0
    del cat.bulk_end  # the catalog writes the same version again, from scratch
    asyncio.run(persist(cat, Computed("full", parts=[{"name": ""}], plans=[plan]), 1, 1, 1))
    assert _index_sql(cat) == schema
    assert len(cat.list_dir("/Dir001", 1)) == 100


def test_a_first_index_cancelled_while_its_indexes_build_waits_then_rolls_back(tmp_path: Path) -> None:
    import threading
    import time

    cat = Catalog(tmp_path / "catalog.sqlite")
    schema = _index_sql(cat)
    new = tree(300)
    plan = make_plan("", new, {}, Resolver("", new), 1)
    real = cat.bulk_end
    started, done = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        time.sleep(0.3)
        real()
        done.set()

    cat.bulk_end = slow  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.create_task(persist(cat, Computed("full", parts=[{"name": ""}], plans=[plan]),
                                           1, 1, 1))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done.is_set()  # the thread was done with the connection before the rollback

    asyncio.run(main())
    assert _index_sql(cat) == schema and cat.versions() == []
    assert cat.reader.execute("SELECT count(*) FROM file_entries").fetchone()[0] == 0


def test_gc_pause_freezes_per_step_and_releases_at_the_end() -> None:
    import gc

    from cdp.catalog.indexer import gc_paused, gc_step

    assert gc.get_freeze_count() == 0
    with gc_paused():
        with gc_paused():
            keep = [[i] for i in range(1000)]
            gc_step()
            assert gc.get_freeze_count() >= 1000
        assert gc.get_freeze_count() >= 1000  # the outer block still runs
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    del keep


#: the ``versions`` table and ``meta`` of format 2, as written before format 3 (pinned)
FORMAT_2_VERSIONS = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE versions (
    version INTEGER PRIMARY KEY, seq INTEGER NOT NULL, time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL, ntfs INTEGER NOT NULL, parts TEXT NOT NULL, stats TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
INSERT INTO meta VALUES ('format', '2');
INSERT INTO versions VALUES (1, 10, 1000, 'full', 1, '[{"name": "", "offset": 0, "serial": "00ab"}]',
                             '{"records": 3}', '');
INSERT INTO versions VALUES (2, 20, 2000, 'full', 2,
                             '[{"name": "p1", "offset": 1048576}, {"name": "p2", "offset": 9437184}]', '{}', '');
INSERT INTO versions VALUES (3, 30, 3000, 'none', 0, '[]', '{}', 'no NTFS file system found');
"""


def test_format_2_catalog_gains_the_file_system_kind(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.executescript(FORMAT_2_VERSIONS)
    db.close()
    ro = Catalog(path, readonly=True)  # cdpctl offline on a catalog not migrated yet
    assert [v.fs for v in ro.versions()] == ["ntfs", "ntfs,ntfs", ""]
    ro.close()
    with caplog.at_level(logging.INFO, logger="cdp.catalog"):
        cat = Catalog(path)
    assert "catalog format 2 migrated to 8" in caplog.text
    assert CATALOG_FORMAT == 8
    assert cat.reader.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "8"
    vs = cat.versions()
    assert [v.fs for v in vs] == ["ntfs", "ntfs,ntfs", ""]
    assert [[p["fs"] for p in v.parts] for v in vs] == [["ntfs"], ["ntfs", "ntfs"], []]
    assert vs[0].to_dict()["fs"] == ["ntfs"] and vs[0].parts[0]["serial"] == "00ab"
    names = {r[0] for r in cat.reader.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"names_lname", "entries_dirs"} <= names
    # a new version records its kinds; reopening is a no-op
    cat.begin()
    cat.finish_version(4, 40, 4000, "full", [{"name": "p1", "fs": "ext4"}, {"name": "p2", "fs": "ntfs"}], [])
    cat.close()
    again = Catalog(path)
    last = again.last_version()
    assert last is not None and last.fs == "ext4,ntfs" and last.ntfs == 1
    row = again.reader.execute("SELECT fs, ntfs FROM versions WHERE version = 4").fetchone()
    assert row == ("ext4,ntfs", 1)
