"""The catalog's version rules (start version / end version / reference flag), case by
case, on hand-made MFT records written through the real planner and SQLite catalog."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cdp.catalog.db import Catalog
from cdp.catalog.indexer import Computed, View, persist
from cdp.catalog.model import Entry
from cdp.catalog.rules import Plan, Resolver, make_plan
from cdp.ntfs.attribute import DataStream, FileName
from cdp.ntfs.record import FileRecord

ROOT = 5


def rec(number: int, names: list[tuple[int, str]], *, seq: int = 1, size: int = 0,
        mtime: int = 1, is_dir: bool = False, in_use: bool = True) -> FileRecord:
    r = FileRecord(number, seq, (1 if in_use else 0) | (2 if is_dir else 0))
    r.names = [FileName(parent, 0, 1, name, is_dir, size) for parent, name in names]
    r.times = (10**17, 10**17 + mtime, 10**17, 10**17)
    r.data = None if is_dir else DataStream("", True, size, size, 0, content=b"x" * size)
    return r


def free(number: int, seq: int = 2) -> FileRecord:
    return FileRecord(number, seq, 0)


class Harness:
    def __init__(self, path: Path) -> None:
        self.cat = Catalog(path / "catalog.sqlite")

    def step(self, version: int, records: list[FileRecord]) -> Plan:
        """Catalog *version* from the records that changed (the MFT diff's output)."""
        cat = self.cat
        base = cat.last_version()
        new = {r.number: r for r in records}
        if base is None:
            plan = make_plan("", new, {}, Resolver("", new), version * 1000)
        else:
            bv = base.version
            old = cat.visible("", new, bv)
            plan = make_plan("", new, old, Resolver("", new, lambda n: cat.dir_info("", n, bv)),
                             version * 1000, lambda d: cat.subtree(d, bv))
        c = Computed("full" if base is None else "diff", parts=[{"name": ""}], plans=[plan])
        asyncio.run(persist(cat, c, version, version * 10, version * 1000))
        return plan

    def rows(self, path: str) -> list[tuple[int, int, int]]:
        d, _, n = path.rpartition("/")
        return [(e.start, e.end, e.ref) for e in self.cat.history(d or "/", n)]

    def listing(self, version: int, directory: str = "/") -> list[str]:
        return [e.name for e in View(self.cat, version).list_dir(directory)]

    def tree(self, version: int) -> list[str]:
        return [e.path for e in View(self.cat, version).walk("/")]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def initial(h: Harness) -> None:
    h.step(1, [rec(64, [(ROOT, "Reports")], is_dir=True), rec(65, [(64, "Q3.xlsx")], size=100),
               rec(66, [(ROOT, "a.txt")], size=5), rec(67, [(64, "sub")], is_dir=True),
               rec(68, [(67, "deep.txt")], size=7)])


def test_first_marker_full_index(h: Harness) -> None:
    initial(h)
    assert h.rows("/Reports/Q3.xlsx") == [(1, 0, 1)]  # start 1, end 0 (current), ref 1
    assert h.tree(1) == ["/Reports", "/a.txt", "/Reports/Q3.xlsx", "/Reports/sub", "/Reports/sub/deep.txt"]
    assert h.cat.list_dir("/Reports", 1)[0].backup_ns == 1000  # the marker's time


def test_modified_closes_old_moves_ref_and_opens_new(h: Harness) -> None:
    initial(h)
    p = h.step(2, [rec(65, [(64, "Q3.xlsx")], size=120, mtime=2)])
    assert len(p.modified) == 1 and len(p.added) == 1
    assert h.rows("/Reports/Q3.xlsx") == [(1, 2, 2), (2, 0, 2)]
    assert [e.size for e in View(h.cat, 1).list_dir("/Reports") if e.name == "Q3.xlsx"] == [100]
    assert [e.size for e in View(h.cat, 2).list_dir("/Reports") if e.name == "Q3.xlsx"] == [120]


def test_timestamp_only_change_is_a_modification(h: Harness) -> None:
    initial(h)
    h.step(2, [rec(66, [(ROOT, "a.txt")], size=5, mtime=9)])
    assert h.rows("/a.txt") == [(1, 2, 2), (2, 0, 2)]


def test_unchanged_in_changed_block_only_moves_ref(h: Harness) -> None:
    initial(h)
    p = h.step(2, [rec(66, [(ROOT, "a.txt")], size=5)])
    assert len(p.touched) == 1 and not p.added and not p.modified
    assert h.rows("/a.txt") == [(1, 0, 2)]


def test_added(h: Harness) -> None:
    initial(h)
    h.step(2, [rec(70, [(ROOT, "new.txt")], size=3)])
    assert h.rows("/new.txt") == [(2, 0, 2)]
    assert "new.txt" not in h.listing(1) and "new.txt" in h.listing(2)


def test_deleted_sets_end_keeps_ref_adds_nothing(h: Harness) -> None:
    initial(h)
    h.step(2, [rec(66, [(ROOT, "a.txt")], size=5)])  # seen at 2
    p = h.step(3, [free(66)])
    assert len(p.deleted) == 1 and not p.added
    assert h.rows("/a.txt") == [(1, 3, 2)]  # end 3, ref left at 2: deleted (ref < end)
    assert "a.txt" in h.listing(2) and "a.txt" not in h.listing(3)


def test_sequence_change_is_delete_plus_add(h: Harness) -> None:
    initial(h)
    h.step(2, [rec(66, [(ROOT, "a.txt")], seq=2, size=5)])  # record reused, same name
    assert h.rows("/a.txt") == [(1, 2, 1), (2, 0, 2)]


def test_rename_closes_old_path_opens_new(h: Harness) -> None:
    initial(h)
    h.step(2, [rec(66, [(ROOT, "b.txt")], size=5)])
    assert h.rows("/a.txt") == [(1, 2, 1)]
    assert h.rows("/b.txt") == [(2, 0, 2)]


def test_moved_directory_rekeys_its_subtree(h: Harness) -> None:
    initial(h)
    h.step(2, [rec(71, [(ROOT, "Archive")], is_dir=True),
               rec(64, [(71, "Reports-old")], is_dir=True)])  # only these records changed
    assert h.tree(2) == ["/Archive", "/a.txt", "/Archive/Reports-old", "/Archive/Reports-old/Q3.xlsx",
                         "/Archive/Reports-old/sub", "/Archive/Reports-old/sub/deep.txt"]
    assert h.rows("/Reports/sub/deep.txt") == [(1, 2, 1)]
    assert h.rows("/Archive/Reports-old/sub/deep.txt") == [(2, 0, 2)]
    assert h.tree(1)[0] == "/Reports"  # the old version is untouched


def test_hard_links_are_entries_each(h: Harness) -> None:
    initial(h)
    h.step(2, [rec(66, [(ROOT, "a.txt"), (64, "a-link.txt")], size=5)])
    assert h.rows("/a.txt") == [(1, 0, 2)] and h.rows("/Reports/a-link.txt") == [(2, 0, 2)]
    h.step(3, [rec(66, [(ROOT, "a.txt")], size=5)])
    assert h.rows("/Reports/a-link.txt") == [(2, 3, 2)]


def test_damaged_record_changes_nothing_and_is_reported(h: Harness) -> None:
    initial(h)
    bad = rec(65, [(64, "Q3.xlsx")], size=999)
    bad.damaged = "fixup mismatch in sector 1"
    p = h.step(2, [bad, rec(66, [(ROOT, "a.txt")], size=6)])
    assert p.damaged == [(65, "fixup mismatch in sector 1")]
    assert h.rows("/Reports/Q3.xlsx") == [(1, 0, 1)]
    assert h.rows("/a.txt") == [(1, 2, 2), (2, 0, 2)]
    assert h.cat.damaged(2) == [{"part": "", "record": 65, "reason": "fixup mismatch in sector 1"}]


def test_parent_loop_is_damaged_rest_catalogued(h: Harness) -> None:
    p = h.step(1, [rec(80, [(81, "x")], is_dir=True), rec(81, [(80, "y")], is_dir=True),
                   rec(82, [(80, "in-loop.txt")]), rec(83, [(ROOT, "fine.txt")])])
    assert {r for r, _ in p.damaged} == {80, 81, 82}
    assert h.tree(1) == ["/fine.txt"]


def test_orphans_and_duplicate_names(h: Harness) -> None:
    p = h.step(1, [rec(90, [(200, "lost.txt")]), rec(91, [(ROOT, "dup")]), rec(92, [(ROOT, "dup")])])
    assert "/$OrphanFiles/lost.txt" in h.tree(1)
    assert [r for r, _ in p.damaged] == [92]


def test_restore_identification_from_start_end_ref(h: Harness) -> None:
    """The entry to restore for a version v is the one with start <= v < end (or end 0);
    ref tells a replaced version (ref == end) from a deleted one (ref < end)."""
    initial(h)
    h.step(2, [rec(66, [(ROOT, "a.txt")], size=6, mtime=2)])
    h.step(3, [free(66)])
    hist: list[Entry] = h.cat.history("/", "a.txt")
    states = ["current" if e.end == 0 else "replaced" if e.ref == e.end else "deleted" for e in hist]
    assert states == ["replaced", "deleted"]
    assert [e.size for v in (1, 2) for e in [h.cat.at_path("/", "a.txt", v)] if e] == [5, 6]
    assert h.cat.at_path("/", "a.txt", 3) is None
