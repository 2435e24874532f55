"""Catalog format 5: the packed ``stat`` BLOB (golden bytes, every layout round trip)
and the in-place migration of a real format 4 catalog, every query compared with what
the format 4 code answered on it (:mod:`tests.unit.catalog_format4_fixture`)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp.catalog.db import Catalog
from cdp.catalog.model import STAT_FIELDS, Entry, pack_stat, unpack_stat
from cdp.errors import Corruption
from tests.unit.catalog_format4_fixture import (
    FORMAT4_ANSWERS,
    FORMAT4_SQL,
    VERSIONS,
    answers,
    index,
    load_format4,
)

# ---------------------------------------------------------------------- golden bytes

#: seq 3, parent 64, size 5, alloc 8, crtime 10**17, mtime 10**17 + 1 (ctime = atime =
#: mtime: left out), attrs 0x20, resident, flags 0, no streams, backup_ns 1000
GOLDEN_STAT = bytes.fromhex(
    "48"                    # sig: SIG_CRTIME | SIG_RESIDENT; parent, size, alloc u32
    "03000000"              # seq
    "20000000"              # attrs
    "00000000"              # flags
    "40000000"              # parent 64
    "05000000"              # size 5
    "08000000"              # alloc 8
    "01008a5d78456301"      # mtime 10**17 + 1
    "e803000000000000"      # backup_ns 1000
    "00008a5d78456301"      # crtime 10**17
)

def test_golden_stat_blob() -> None:
    blob = pack_stat(3, 64, 5, 8, 10**17, 10**17 + 1, 10**17 + 1, 10**17 + 1, 0x20, 1, 0, "", 1000)
    assert blob == GOLDEN_STAT and len(blob) == 49
    assert unpack_stat(blob) == (3, 64, 5, 8, 10**17, 10**17 + 1, 10**17 + 1, 10**17 + 1, 0x20, 1,
                                 0, "", 1000)


def test_golden_stat_blob_every_optional_part() -> None:
    streams = '[{"name": "s", "size": 3}]'
    blob = pack_stat(0xFFFFFFFF, 1 << 40, -1, 1 << 32, 0, 7, 8, 9, 0xFFFFFFFF, 0, 0x8000,
                     streams, -5)
    want = (bytes([0x3F])
            + struct.pack("<III", 0xFFFFFFFF, 0xFFFFFFFF, 0x8000)
            + struct.pack("<qqq", 1 << 40, -1, 1 << 32)
            + struct.pack("<qq", 7, -5)
            + struct.pack("<qqq", 0, 8, 9)
            + streams.encode())
    assert blob == want
    assert unpack_stat(blob) == (0xFFFFFFFF, 1 << 40, -1, 1 << 32, 0, 7, 8, 9, 0xFFFFFFFF, 0,
                                 0x8000, streams, -5)


def test_a_stat_blob_that_does_not_decode_is_corruption() -> None:
    for bad in (b"", GOLDEN_STAT[:-1], bytes([0x3F]) + GOLDEN_STAT[1:], GOLDEN_STAT + b"\xff"):
        with pytest.raises(Corruption):
            unpack_stat(bad)
        with pytest.raises(Corruption):
            Entry.from_row((1, "", "/", "a", 1, 0, 1, 64, 0, bad, b""))


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
    blob = pack_stat(*fields)
    assert unpack_stat(blob) == fields
    e = Entry.from_row((1, "p1", "/d", "n", 1, 0, 1, 7, 0, blob, b"loc"))
    assert tuple(getattr(e, f) for f in STAT_FIELDS) == fields
    listed = Entry.from_dir_rows("/d", [(1, "p1", "n", 1, 0, 1, 7, 0, blob)])[0]
    assert listed.to_dict() == e.to_dict()


# ---------------------------------------------------------------------- a real format 4 catalog


def test_the_pinned_catalog_is_format_4() -> None:
    text = FORMAT4_SQL.read_text()
    assert "INSERT INTO \"meta\" VALUES('format','4');" in text
    assert "CREATE VIEW entries AS SELECT" in text and "backup_ns INTEGER NOT NULL" in text


def test_format_4_read_offline_answers_as_format_4_did(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    load_format4(path)
    ro = Catalog(path, readonly=True)  # cdpctl offline: not migrated, packed as it reads
    try:
        assert answers(ro, VERSIONS) == json.loads(FORMAT4_ANSWERS.read_text())
    finally:
        ro.close()
    assert "'format','4'" in "\n".join(sqlite3.connect(path).iterdump())


def test_format_4_migrated_answers_every_query_as_before(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "catalog.sqlite"
    load_format4(path)
    want = json.loads(FORMAT4_ANSWERS.read_text())
    with caplog.at_level(logging.INFO, logger="cdp.catalog"):
        cat = Catalog(path)
    assert "catalog format 4 migrated to 5 (stat fields packed)" in caplog.text
    assert cat.reader.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "5"
    cols = [r[1] for r in cat.reader.execute("PRAGMA table_info(file_entries)")]
    assert cols == ["id", "part", "dir_id", "name_id", "start", "end", "ref", "record", "is_dir",
                    "stat", "location"]
    assert cat.reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert answers(cat, VERSIONS) == want
    # the catalog goes on: a fifth marker on top of the migrated rows (the same MFT as
    # at the fourth: every entry touched), then reopened (nothing more to migrate)
    asyncio.run(index(cat, VERSIONS + 1, gen=VERSIONS))
    cat.close()
    again = Catalog(path)
    before = [e.to_dict() for e in again.list_dir("/Docs", VERSIONS)]
    assert before and [e.to_dict() for e in again.list_dir("/Docs", VERSIONS + 1)] == [
        d | {"reference": VERSIONS + 1} for d in before]
    again.close()


def test_a_new_catalog_answers_as_format_4_did(tmp_path: Path) -> None:
    """The same markers catalogued by the format 5 code from scratch: the same answers."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    for v in range(1, VERSIONS + 1):
        asyncio.run(index(cat, v))
    assert answers(cat, VERSIONS) == json.loads(FORMAT4_ANSWERS.read_text())
    cat.close()
