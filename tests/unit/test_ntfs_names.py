"""NTFS names kept exact (issue 28, item 5): any UTF-16 unit sequence, lone surrogates
included, survives parse -> catalog (SQLite) -> output -> command line -> lookup."""

from __future__ import annotations

import os
import sqlite3
import struct

from hypothesis import given
from hypothesis import strategies as st

from cdp.ntfs.names import decode_name, exact, from_argv, shown, stored

# code units biased to the interesting ranges: surrogates and the reserved top of plane 16
_UNITS = st.lists(st.one_of(st.integers(1, 0xFFFF), st.integers(0xD800, 0xDFFF),
                            st.sampled_from([0xDBFF, 0xDFFF, 0xDBFF, 0xDC00])), max_size=12)


def _raw(units: list[int]) -> bytes:
    return struct.pack(f"<{len(units)}H", *units)


@given(_UNITS)
def test_units_round_trip_and_store_in_sqlite(units: list[int]) -> None:
    raw = _raw(units)
    s = decode_name(raw)
    e = exact(s)
    assert e.encode("utf-16-le", "surrogatepass") == raw
    assert stored(e) == s
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (name TEXT)")
    db.execute("INSERT INTO t VALUES (?)", (s,))  # no lone surrogate reaches SQLite
    assert db.execute("SELECT name FROM t").fetchone()[0] == s
    assert from_argv(os.fsdecode(e.encode("utf-8", "surrogatepass"))) == e
    assert "\n" not in shown(e)


@given(_UNITS, _UNITS)
def test_distinct_names_stay_distinct(a: list[int], b: list[int]) -> None:
    if a != b:
        assert decode_name(_raw(a)) != decode_name(_raw(b))


def test_ordinary_names_are_unchanged_and_the_reserved_range_is_escaped() -> None:
    for name in ("report.docx", "Grüße", "😀.txt", "a:b", "new\nline"):
        assert stored(name) == name == exact(name)
    assert stored("a\udc00") == "a\U0010fc00"
    assert stored("a\U0010fc00") == "a\U0010f7ff\U0010fc00"
    assert shown("a\udc00b") == "'a\\udc00b'"
