"""Catalog formats 5 to 8: the packed ``stat`` BLOB (golden bytes, every layout round
trip) and the in-place migration of a real format 4, 5, 6 and 7 catalog, every
query compared with what the format 4 code answered on it
(:mod:`tests.unit.catalog_format4_fixture`; the format 5 one, ``catalog_format5.sql``,
holds the same markers, written by the format 5 code at e92a497, whose answers were
those of format 4; formats 6 and 7 likewise, at 581d28a and 04eb791)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp.catalog.db import Catalog
from cdp.catalog.model import (
    STAT_FIELDS,
    Entry,
    StartTimes,
    pack_stat,
    pack_stats,
    restat,
    stat5_to_6,
    stat5_to_8,
    stat7_to_8,
    unpack_stat,
    unpack_stat7,
)
from cdp.errors import Corruption
from tests.unit.catalog_format4_fixture import (
    FORMAT4_ANSWERS,
    FORMAT4_SQL,
    VERSIONS,
    answers,
    index,
    load_format4,
)

FORMAT5_SQL = Path(__file__).parent / "catalog_format5.sql"
#: the same markers written by the format 6 code (581d28a); pinned: never regenerate it
FORMAT6_SQL = Path(__file__).parent / "catalog_format6.sql"
#: the same markers written by the format 7 code (04eb791); pinned: never regenerate it
FORMAT7_SQL = Path(__file__).parent / "catalog_format7.sql"

# ---------------------------------------------------------------------- golden bytes

#: seq 3, parent 64, size 5, alloc 8, crtime 10**17, mtime 10**17 + 1 (ctime = atime =
#: mtime: left out), attrs 0x20, resident, flags 0, no streams, backup_ns 1000: format 8
#: with backup_ns the start version's time (left out)
GOLDEN_STAT = bytes.fromhex(
    "48"                    # sig: SIG_CRTIME | SIG_RESIDENT; size, alloc u32
    "45"                    # sig2: seq u8 (1), attrs u8 (1 << 2), flags absent, parent u8 (1 << 6)
    "03"                    # seq
    "20"                    # attrs
    "40"                    # parent 64
    "05000000"              # size 5
    "08000000"              # alloc 8
    "01008a5d78456301"      # mtime 10**17 + 1
    "00008a5d78456301"      # crtime 10**17
)
#: the same fields in formats 6 and 7 (no sig2; seq, attrs, flags, parent u32)
GOLDEN_STAT7 = bytes.fromhex(
    "48"                    # sig: SIG_CRTIME | SIG_RESIDENT; parent, size, alloc u32
    "03000000"              # seq
    "20000000"              # attrs
    "00000000"              # flags
    "40000000"              # parent 64
    "05000000"              # size 5
    "08000000"              # alloc 8
    "01008a5d78456301"      # mtime 10**17 + 1
    "00008a5d78456301"      # crtime 10**17
)
#: the same fields in format 5 (backup_ns always stored after mtime, sig bit 0x80 clear)
GOLDEN_STAT5 = bytes.fromhex("48030000002000000000000000400000000500000008000000"
                             "01008a5d78456301" "e803000000000000" "00008a5d78456301")
FIELDS = (3, 64, 5, 8, 10**17, 10**17 + 1, 10**17 + 1, 10**17 + 1, 0x20, 1, 0, "", 1000)


def test_golden_stat_blob() -> None:
    blob = pack_stat(*FIELDS, 1000)
    assert blob == GOLDEN_STAT and len(blob) == 29
    assert unpack_stat(blob, 1000) == FIELDS
    # backup_ns not the start version's time (or not known): stored, sig bit 0x80
    other = pack_stat(*FIELDS[:-1], 1000, 999)
    assert other == pack_stat(*FIELDS) == (bytes([0xC8]) + GOLDEN_STAT[1:21]
                                           + bytes.fromhex("e803000000000000") + GOLDEN_STAT[21:])
    assert len(other) == 37 and unpack_stat(other, 999) == FIELDS


def test_format_7_stat_blobs_packed_again_as_format_8() -> None:
    """Formats 6 and 7 (the same bytes) read by :func:`unpack_stat7`, and re-packed (the
    migration, or an offline read) into the same fields: 12 bytes less here."""
    assert unpack_stat7(GOLDEN_STAT7, 1000) == FIELDS
    assert stat7_to_8(GOLDEN_STAT7) == GOLDEN_STAT
    with_backup = bytes([0xC8]) + GOLDEN_STAT5[1:]  # format 6/7 with backup_ns stored
    assert unpack_stat7(with_backup) == FIELDS
    assert stat7_to_8(with_backup) == pack_stat(*FIELDS)
    for bad in (b"", GOLDEN_STAT7[:-1], GOLDEN_STAT7 + b"\xff"):
        with pytest.raises(Corruption):
            stat7_to_8(bad)


def test_format_5_stat_blobs_read_as_format_8() -> None:
    assert stat5_to_6(GOLDEN_STAT5) == bytes([0xC8]) + GOLDEN_STAT5[1:]
    assert stat5_to_8(GOLDEN_STAT5) == pack_stat(*FIELDS)
    assert unpack_stat(stat5_to_8(GOLDEN_STAT5)) == FIELDS
    assert restat(GOLDEN_STAT5, 1000) == GOLDEN_STAT
    assert restat(GOLDEN_STAT5, 7) == pack_stat(*FIELDS)
    assert restat(GOLDEN_STAT5, None) == pack_stat(*FIELDS)


def test_a_row_without_backup_ns_takes_its_start_versions_time() -> None:
    times = StartTimes(lambda: [(1, 1000), (2, 2000)])
    e = Entry.from_row((1, "", "/", "a", 2, 0, 2, 64, 0, GOLDEN_STAT, b""), times)
    assert e.backup_ns == 2000
    listed = Entry.from_dir_rows("/", [(1, "", "a", 1, 0, 1, 64, 0, GOLDEN_STAT)], times)[0]
    assert listed.backup_ns == 1000
    with pytest.raises(Corruption):  # a version the catalog does not hold
        Entry.from_row((1, "", "/", "a", 3, 0, 3, 64, 0, GOLDEN_STAT, b""), times)


def test_golden_stat_blob_every_optional_part() -> None:
    streams = '[{"name": "s", "size": 3}]'
    blob = pack_stat(0xFFFFFFFF, 1 << 40, -1, 1 << 32, 0, 7, 8, 9, 0xFFFFFFFF, 0, 0x8000,
                     streams, -5)
    want = (bytes([0xBF, 0x2F])  # sig2: seq u32, attrs u32, flags u16, parent by sig (i64)
            + struct.pack("<IIH", 0xFFFFFFFF, 0xFFFFFFFF, 0x8000)
            + struct.pack("<qqq", 1 << 40, -1, 1 << 32)
            + struct.pack("<qq", 7, -5)
            + struct.pack("<qqq", 0, 8, 9)
            + streams.encode())
    assert blob == want
    assert unpack_stat(blob) == (0xFFFFFFFF, 1 << 40, -1, 1 << 32, 0, 7, 8, 9, 0xFFFFFFFF, 0,
                                 0x8000, streams, -5)


def test_a_stat_blob_that_does_not_decode_is_corruption() -> None:
    times = StartTimes(lambda: [(1, 1000)])
    for bad in (b"", GOLDEN_STAT[:1], GOLDEN_STAT[:-1], bytes([0x3F]) + GOLDEN_STAT[1:],
                GOLDEN_STAT[:1] + b"\xff" + GOLDEN_STAT[2:], GOLDEN_STAT + b"\xff", GOLDEN_STAT5):
        with pytest.raises(Corruption):
            unpack_stat(bad)
        with pytest.raises(Corruption):
            Entry.from_row((1, "", "/", "a", 1, 0, 1, 64, 0, bad, b""), times)


def test_a_field_out_of_its_range_does_not_pack() -> None:
    with pytest.raises(struct.error):
        pack_stat(1 << 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, "", 0)  # seq is u32
    with pytest.raises(struct.error):
        pack_stat(0, 1 << 63, 0, 0, 0, 0, 0, 0, 0, 0, 0, "", 0)  # as SQLite's INTEGER


I64 = st.integers(-(1 << 63), (1 << 63) - 1)
U32 = st.integers(0, 0xFFFFFFFF)
TIME = st.one_of(st.just(0), st.just(1_700_000_000 * 10**9), I64)
#: ``streams`` as the catalog writes it: "" or a JSON list (``to_dict`` parses it)
STREAMS = st.one_of(st.just(""), st.lists(st.tuples(st.text(), I64)).map(
    lambda xs: json.dumps([{"name": n, "size": z} for n, z in xs])))


@given(st.tuples(U32, I64, I64, I64, TIME, TIME, TIME, TIME, U32, st.integers(0, 1), U32,
                 STREAMS, I64))
def test_every_stat_round_trips(fields: tuple[Any, ...]) -> None:
    times = StartTimes(lambda: [(1, fields[-1])])
    for blob in (pack_stat(*fields), pack_stat(*fields, fields[-1])):
        assert unpack_stat(blob, fields[-1]) == fields
        e = Entry.from_row((1, "p1", "/d", "n", 1, 0, 1, 7, 0, blob, b"loc"), times)
        assert tuple(getattr(e, f) for f in STAT_FIELDS) == fields
        listed = Entry.from_dir_rows("/d", [(1, "p1", "n", 1, 0, 1, 7, 0, blob)], times)[0]
        assert listed.to_dict() == e.to_dict()
    assert len(pack_stat(*fields, fields[-1])) == len(pack_stat(*fields)) - 8


# ---------------------------------------------------------------------- a real format 4 catalog


def test_the_pinned_catalog_is_format_4() -> None:
    text = FORMAT4_SQL.read_text()
    assert "INSERT INTO \"meta\" VALUES('format','4');" in text
    assert "CREATE VIEW entries AS SELECT" in text and "backup_ns INTEGER NOT NULL" in text


@pytest.mark.parametrize("old", [4, 5, 6, 7])
def test_an_old_format_read_offline_answers_as_format_4_did(tmp_path: Path, old: int) -> None:
    path = tmp_path / "catalog.sqlite"
    _load(path, {4: FORMAT4_SQL, 5: FORMAT5_SQL, 6: FORMAT6_SQL, 7: FORMAT7_SQL}[old])
    # cdpctl offline: not migrated; each stat packed in format 8 as it is read
    ro = Catalog(path, readonly=True)
    try:
        assert answers(ro, VERSIONS) == json.loads(FORMAT4_ANSWERS.read_text())
    finally:
        ro.close()
    assert f"'format','{old}'" in "\n".join(sqlite3.connect(path).iterdump())


def _goes_on(cat: Catalog, path: Path) -> None:
    """A fifth marker on top of the migrated rows (the same MFT as at the fourth: every
    entry touched), then the catalog reopened (nothing more to migrate)."""
    asyncio.run(index(cat, VERSIONS + 1, gen=VERSIONS))
    cat.close()
    again = Catalog(path)
    before = [e.to_dict() for e in again.list_dir("/Docs", VERSIONS)]
    assert before and [e.to_dict() for e in again.list_dir("/Docs", VERSIONS + 1)] == [
        d | {"reference": VERSIONS + 1} for d in before]
    again.close()


def test_format_4_migrated_answers_every_query_as_before(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "catalog.sqlite"
    load_format4(path)
    want = json.loads(FORMAT4_ANSWERS.read_text())
    with caplog.at_level(logging.INFO, logger="cdp.catalog"):
        cat = Catalog(path)
    assert "catalog format 4 migrated to 8 (stat fields packed)" in caplog.text
    assert cat.reader.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "8"
    cols = [r[1] for r in cat.reader.execute("PRAGMA table_info(file_entries)")]
    assert cols == ["id", "part", "dir_id", "name_id", "start", "end", "ref", "record", "is_dir",
                    "stat", "location"]
    assert cat.reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert answers(cat, VERSIONS) == want
    _goes_on(cat, path)


def test_the_pinned_format_5_catalog_stores_every_backup_ns() -> None:
    text = FORMAT5_SQL.read_text()
    assert "INSERT INTO \"meta\" VALUES('format','5');" in text
    assert "CREATE INDEX entries_start ON file_entries (start)" in text


def test_format_5_migrated_answers_every_query_as_before(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "catalog.sqlite"
    _load(path, FORMAT5_SQL)
    old = dict(sqlite3.connect(path).execute("SELECT id, stat FROM file_entries"))
    with caplog.at_level(logging.INFO, logger="cdp.catalog"):
        cat = Catalog(path)
    assert "catalog format 5 migrated to 8 (backup times left out of stat" in caplog.text
    assert cat.reader.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "8"
    assert cat.reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    ix = {r[0] for r in cat.reader.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "entries_start" not in ix and "entries_end" not in ix and "entries_deleted" in ix
    # every row's backup_ns was its start version's time: 8 bytes less each than in
    # format 8 with backup_ns stored; and format 8's widths take 7 to 15 bytes off
    new = dict(cat.reader.execute("SELECT id, length(stat) FROM file_entries"))
    assert new == {i: len(stat5_to_8(b)) - 8 for i, b in old.items()}
    assert all(7 <= len(b) - 8 - new[i] <= 15 for i, b in old.items())
    assert answers(cat, VERSIONS) == json.loads(FORMAT4_ANSWERS.read_text())
    _goes_on(cat, path)


@pytest.mark.parametrize("old", [6, 7])
def test_format_6_and_7_migrated_answer_every_query_as_before(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, old: int) -> None:
    """Format 8 packs each row's ``stat`` again (:func:`stat7_to_8`): the same fields in
    fewer bytes, the rest of each row (its id included) as it was, ``entries_record`` on
    ``(record)`` (format 6: ``(part, record)``); every query (``changed_between`` of every
    pair included) answers as before, and the catalog goes on."""
    path = tmp_path / "catalog.sqlite"
    sql = {6: FORMAT6_SQL, 7: FORMAT7_SQL}[old]
    _load(path, sql)
    text = sql.read_text()
    assert f"INSERT INTO \"meta\" VALUES('format','{old}');" in text
    assert ("CREATE INDEX entries_record ON file_entries (part, record)" in text) == (old == 6)
    rows = "SELECT * FROM file_entries ORDER BY id"
    before = sqlite3.connect(path).execute(rows).fetchall()
    with caplog.at_level(logging.INFO, logger="cdp.catalog"):
        cat = Catalog(path)
    assert f"catalog format {old} migrated to 8 (stat re-packed" in caplog.text
    assert cat.reader.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "8"
    assert cat.reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    ix = dict(cat.reader.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
    assert ix["entries_record"].endswith("ON file_entries (record)")
    after = cat.reader.execute(rows).fetchall()
    assert [(*r[:9], stat7_to_8(r[9]), r[10]) for r in before] == after
    assert sum(len(r[9]) for r in after) < sum(len(r[9]) for r in before)
    assert answers(cat, VERSIONS) == json.loads(FORMAT4_ANSWERS.read_text())
    _goes_on(cat, path)


def test_queries_by_record_use_entries_record(tmp_path: Path) -> None:
    """A record's rows (``visible``, ``dir_info``: the diff of a marker) are found
    through ``entries_record`` on the record alone, not by a scan of the rows."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    for v in range(1, VERSIONS + 1):
        asyncio.run(index(cat, v))
    plan = " ".join(str(r) for r in cat.reader.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM file_entries WHERE part = ? AND record IN (?, ?)"
        " AND start <= ?", ("", 64, 65, 1)))
    assert "entries_record" in plan and "SCAN" not in plan.replace("SCAN CONSTANT", "")
    cat.close()


def _load(path: Path, sql: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(sql.read_text())
    db.close()


def test_a_new_catalog_answers_as_format_4_did(tmp_path: Path) -> None:
    """The same markers catalogued by the current code from scratch: the same answers."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    for v in range(1, VERSIONS + 1):
        asyncio.run(index(cat, v))
    assert answers(cat, VERSIONS) == json.loads(FORMAT4_ANSWERS.read_text())
    cat.close()


def _changed_by_scan(cat: Catalog, a: int, b: int) -> set[tuple[str, int]]:
    """changed_between as formats 1-5 answered it: every row, by its start and end."""
    lo, hi = min(a, b), max(a, b)
    return set(cat.reader.execute(
        'SELECT part, record FROM file_entries WHERE ("start" > ? AND "start" <= ?) '
        'OR ("end" > ? AND "end" <= ?)', (lo, hi, lo, hi)))


def test_changed_between_finds_a_modified_record_whose_new_name_was_claimed(tmp_path: Path) -> None:
    """Format 6 finds closed rows through the rows opened at their end: a record modified
    at a marker where another record claims its name (damaged) opens no row, and is
    still found (through the version's damaged rows)."""
    from cdp.catalog.indexer import Computed, persist
    from cdp.catalog.rules import Plan, Resolver, plan_steps
    from tests.unit.catalog_format4_fixture import _rec

    cat = Catalog(tmp_path / "catalog.sqlite")
    gens = {1: {64: _rec(64, 5, "D", is_dir=True), 101: _rec(101, 64, "x.txt"),
                102: _rec(102, 64, "y.txt"), 103: _rec(103, 64, "z.txt")},
            2: {64: _rec(64, 5, "D", is_dir=True), 100: _rec(100, 64, "x.txt", size=9),
                101: _rec(101, 64, "x.txt", size=7), 102: _rec(102, 64, "y.txt", size=8)},
            3: {64: _rec(64, 5, "D", is_dir=True), 100: _rec(100, 64, "x.txt", size=9)}}
    for v, new in gens.items():
        base = cat.last_version()
        plan = Plan("", records=len(new))
        if base is None:
            steps = plan_steps(plan, new, {}, Resolver("", new), v * 10)
        else:
            bv = base.version
            old = cat.visible("", set(new) | set(cat.all_visible("", bv)), bv)
            steps = plan_steps(plan, new, old, Resolver("", new, lambda r, bv=bv: cat.dir_info("", r, bv)),
                               v * 10, lambda d, bv=bv: cat.subtree(d, bv))
        for _ in steps:
            pass
        asyncio.run(persist(cat, Computed("full" if base is None else "diff", parts=[{"name": "", "fs": "ntfs"}],
                                          plans=[plan], parsed=len(new)), v, v, v * 10))
    assert any("claims the name" in d["reason"] and d["record"] == 101 for d in cat.damaged(2))
    for a in range(4):
        for b in range(4):
            assert cat.changed_between(a, b) == _changed_by_scan(cat, a, b), (a, b)
    assert ("", 101) in cat.changed_between(1, 2)
    cat.close()


ROW = st.tuples(U32, I64, I64, I64, TIME, TIME, TIME, TIME, U32, st.integers(0, 1), U32)


@given(st.lists(ROW, max_size=40), I64, st.one_of(st.none(), I64), st.booleans())
def test_stats_packed_column_wise_are_the_row_by_row_bytes(
        rows: list[tuple[int, ...]], backup_ns: int, start_ns: int | None, same: bool) -> None:
    """``pack_stats`` (a first ext4 index packs its rows' ``stat`` with numpy) gives
    exactly ``pack_stat``'s bytes, row by row, whichever layouts the rows need."""
    start = backup_ns if same else start_ns
    want = [pack_stat(*r, "", backup_ns, start) for r in rows]
    cols = list(zip(*rows, strict=True)) if rows else [()] * 11
    assert pack_stats(*cols, backup_ns, start) == want
    assert pack_stats(*(np.asarray(c, dtype=np.int64) for c in cols), backup_ns, start) == want


def test_stats_out_of_their_range_do_not_pack_column_wise() -> None:
    """A value ``pack_stat`` refuses is refused the same way (struct.error)."""
    ok = (1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 10)
    for bad in ((1 << 32, *ok[1:]), (ok[0], 1 << 63, *ok[2:]), (*ok[:8], -1, *ok[9:])):
        with pytest.raises(struct.error):
            pack_stats(*zip(ok, bad, strict=True), 0)
