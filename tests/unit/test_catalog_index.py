"""The catalog's performance structure (no timings): planning and writing are split
into many steps that yield to the event loop, ``find`` by name uses the name index,
listings use the key index, and a format 1 catalog is migrated."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import sqlite3
from pathlib import Path

import pytest

from cdp.catalog.db import CATALOG_FORMAT, Catalog, glob_prefix, prefix_end
from cdp.catalog.indexer import Computed, persist
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
    assert "entries_lname" in plan_of(filled, q, args)
    everything = filled.reader.execute("SELECT name, dir, start FROM entries").fetchall()
    want = sorted((d, n, s) for n, d, s in everything if fnmatch.fnmatchcase(n.lower(), pattern.lower()))
    got = [(e.dir, e.name, e.start) for e in filled.glob(pattern, on_path=False)]
    assert got == want and got


def test_find_without_a_prefix_still_matches_everything(filled: Catalog) -> None:
    got = [e.name for e in filled.glob("*-0001?.txt", on_path=False)]
    assert len(got) == 10
    assert len(list(filled.glob("*", on_path=False))) == 2000 + 21


def test_glob_prefix_ranges() -> None:
    assert glob_prefix("q3*x") == "q3" and glob_prefix("[ab]*") == "" and glob_prefix("abc") == "abc"
    assert prefix_end("q3") == "q4" and prefix_end("") is None
    assert prefix_end("a\U0010ffff") is None
    assert prefix_end("a\ud7ff") == "a\ue000"


def test_listing_is_one_range_of_the_key_index(filled: Catalog) -> None:
    from cdp.catalog.db import _LSEL, _VIS

    q = f"{_LSEL} WHERE dir = ? AND {_VIS} ORDER BY name"
    p = plan_of(filled, q, ("/Dir001", 1, 1))
    assert "entries_key (dir=?)" in p and "TEMP B-TREE" not in p
    rows = filled.list_dir("/Dir001", 1)
    assert [e.name for e in rows] == sorted(e.name for e in rows) and len(rows) == 100
    full = {e.name: e for e in filled.subtree("/Dir001", 1)}
    for e in rows:  # listing columns match the whole rows
        d, f = e.to_dict(), full[e.name].to_dict()
        assert d == f


def test_format_1_catalog_is_migrated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP INDEX entries_lname")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'format'")
    db.commit()
    db.close()
    with caplog.at_level(logging.INFO, logger="cdp.catalog"):
        cat = Catalog(path)
    assert "migrated" in caplog.text
    assert cat.reader.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == str(CATALOG_FORMAT)
    names = {r[0] for r in cat.reader.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "entries_lname" in names


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
    assert "catalog format 2 migrated to 3" in caplog.text
    assert CATALOG_FORMAT == 3
    assert cat.reader.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "3"
    vs = cat.versions()
    assert [v.fs for v in vs] == ["ntfs", "ntfs,ntfs", ""]
    assert [[p["fs"] for p in v.parts] for v in vs] == [["ntfs"], ["ntfs", "ntfs"], []]
    assert vs[0].to_dict()["fs"] == ["ntfs"] and vs[0].parts[0]["serial"] == "00ab"
    names = {r[0] for r in cat.reader.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"entries_lname", "entries_dirs"} <= names
    # a new version records its kinds; reopening is a no-op
    cat.begin()
    cat.finish_version(4, 40, 4000, "full", [{"name": "p1", "fs": "ext4"}, {"name": "p2", "fs": "ntfs"}], [])
    cat.close()
    again = Catalog(path)
    last = again.last_version()
    assert last is not None and last.fs == "ext4,ntfs" and last.ntfs == 1
    row = again.reader.execute("SELECT fs, ntfs FROM versions WHERE version = 4").fetchone()
    assert row == ("ext4,ntfs", 1)
