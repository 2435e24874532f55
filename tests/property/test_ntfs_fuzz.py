"""Fuzzed MFT records and runlists: whatever the bytes, the parser reports damage per
record (Corruption inside, ``damaged`` outside) and never raises anything else; a
full index over an MFT with damaged records catalogues the rest."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.catalog.indexer import compute
from cdp.errors import Corruption
from cdp.ntfs.mft import NtfsVolume
from cdp.ntfs.record import FileRecord, parse_chunk
from cdp.ntfs.runlist import decode_runs
from tests.conftest import require_tool
from tests.unit.test_ntfs import record_66
from tools.ntfs_fixture import make_image

SEED = bytes(record_66())


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), max_size=12))
def test_mutated_record_never_raises(muts: list[tuple[int, int]]) -> None:
    rec = bytearray(SEED)
    for pos, val in muts:
        rec[pos] = val
    r = FileRecord.from_bytes(bytes(rec), 66)
    assert r.damaged is None or isinstance(r.damaged, str)
    for chunk in (bytes(rec) * 3,):
        for x in parse_chunk(chunk, 0, 1024, 512, include_free=True):
            assert x.damaged is None or isinstance(x.damaged, str)


@settings(max_examples=300, deadline=None)
@given(st.integers(0x38, 0x220), st.integers(0, 0xFFFFFFFF))
def test_attribute_lengths_past_the_end(pos: int, value: int) -> None:
    rec = bytearray(SEED)
    struct.pack_into("<I", rec, pos - pos % 4, value)
    r = FileRecord.from_bytes(bytes(rec), 66)
    if r.damaged is None:
        assert r.in_use or not r.names


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 1 << 20))
def test_runlist_bytes(pairs: bytes, max_lcn: int) -> None:
    try:
        runs = decode_runs(pairs, max_lcn=max_lcn)
    except Corruption:
        return
    for r in runs:
        assert r.length > 0
        assert r.lcn is None or (r.lcn >= 0 and r.lcn + r.length <= max_lcn)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1024, max_size=1024))
def test_random_record_bytes(data: bytes) -> None:
    FileRecord.from_bytes(b"FILE" + data[4:], 3)


class Image(bytes):
    def __repr__(self) -> str:
        return f"<image of {len(self)} bytes>"


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    require_tool("mkntfs", "ntfs-3g")
    p = tmp_path_factory.mktemp("fz") / "f.img"

    def populate(m: Path) -> None:
        (m / "dir").mkdir()
        for i in range(40):
            (m / "dir" / f"f{i}").write_bytes(b"x" * i * 30)

    return Image(make_image(p, 8 << 20, populate).read_bytes())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(16, 110), st.integers(0, 1023), st.integers(0, 255)),
                min_size=1, max_size=10))
def test_full_index_with_damaged_records(small_image: bytes, muts: list[tuple[int, int, int]]) -> None:
    img = bytearray(small_image)
    nv = NtfsVolume(lambda o, n: bytes(img[o : o + n]))
    hit = set()
    for r, pos, val in muts:  # damage user records (16+) in place
        record = 16 + r % (nv.record_count - 16)
        hit.add(record)
        img[nv.record_offset(record) + pos] = val

    def read(o: int, n: int) -> bytes:
        return bytes(img[o : o + n]).ljust(n, b"\0")

    c = asyncio.run(compute(read, len(img), None, None, None, 0))
    assert c.kind == "full"
    plan = c.plans[0]
    by_record = {e.record: e.path for e in plan.added}
    # only damaged records (and files below a damaged directory) may be missing
    clean = dict(by_record)
    for i in range(40):
        path = f"/dir/f{i}"
        if path not in clean.values():
            assert hit, path
    assert {r for r, _ in plan.damaged} <= hit | set(by_record) | set(range(16, nv.record_count))
    for r in set(range(16, nv.record_count)) - hit:
        # an untouched in-use user record keeps a name (maybe under $OrphanFiles)
        if nv.read_record(r).in_use and nv.read_record(r).names and r not in {d for d, _ in plan.damaged}:
            assert r in by_record, r
    assert "/$MFT" in by_record.values()


def test_parent_loop_in_a_real_image(small_image: bytes) -> None:
    """Point the directory's $FILE_NAME parent at one of its own children."""
    img = bytearray(small_image)
    nv = NtfsVolume(lambda o, n: bytes(img[o : o + n]))
    raw = {}
    for chunk in nv.scan():
        for r in chunk:
            raw[r.number] = r
    d = next(r for r in raw.values() if any(n.name == "dir" for n in r.names))
    child = next(r for r in raw.values() if any(n.parent == d.number for n in r.names) and r.is_dir is False)
    off = nv.record_offset(d.number)
    rec = bytearray(img[off : off + 1024])
    # find the $FILE_NAME value and rewrite ParentDirectory (fixups are not touched:
    # the value lies in the first sector, away from the sector end)
    pos = rec.find(b"d\x00i\x00r\x00") - 66
    assert pos > 0
    struct.pack_into("<Q", rec, pos, child.number | (child.sequence << 48))
    img[off : off + 1024] = rec
    # and make the child a "directory" parent of dir: loop dir -> child -> dir
    c = asyncio.run(compute(lambda o, n: bytes(img[o : o + n]), len(img), None, None, None, 0))
    plan = c.plans[0]
    paths = {e.path for e in plan.added}
    assert not any(p.startswith("/dir/") for p in paths)
    assert "/$MFT" in paths and os.sep == "/"
