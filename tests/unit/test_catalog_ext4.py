"""The catalog on ext2/3/4 images (no appliance): the full index equals ``fls -r -p``,
a marker diff after changes made through fuse2fs re-parses only what changed and
equals a full index of the changed image, directory renames re-key the subtree, hard
links are one entry per name, reused inodes are a deletion plus an addition."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from cdp.catalog import ext4index
from cdp.catalog.db import Catalog, Version
from cdp.catalog.ext4index import merge_ranges, overlaps, pack_ranges, unpack_ranges
from cdp.catalog.indexer import Computed, compute, find_filesystems, persist
from cdp.catalog.model import Entry
from cdp.ntfs.names import exact
from tests.conftest import require_tool
from tools.ext4_fixture import debugfs, fls_entries, mkfs, mounted, populate_sample

Reader = Callable[[int, int], bytes]


def file_reader(path: Path) -> Reader:
    data = path.read_bytes()  # a snapshot: the image may change after

    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return read


def changed_blocks(a: Path, b: Path, block: int = 4096) -> list[tuple[int, int]]:
    x = np.fromfile(a, np.uint8).reshape(-1, block)
    y = np.fromfile(b, np.uint8).reshape(-1, block)
    return [(int(i) * block, (int(i) + 1) * block) for i in np.nonzero((x != y).any(axis=1))[0]]


def index(cat: Catalog, img: Path, version: int, base: Version | None = None,
          before: Path | None = None) -> Computed:
    size = img.stat().st_size
    changed = None
    if before is not None:
        ranges = changed_blocks(before, img)

        def changed(base_seq: int, start: int, end: int) -> list[tuple[int, int]]:
            return [(max(s, start), min(e, end)) for s, e in ranges if s < end and e > start]

    c = asyncio.run(compute(file_reader(img), size, cat, base, changed, version * 1000))
    asyncio.run(persist(cat, c, version, version, version * 1000))
    return c


def catalog_rows(cat: Catalog, version: int) -> set[tuple[str, int]]:
    return {(e.path, e.record) for e in cat.subtree("/", version)}


def fls_rows(img: Path) -> set[tuple[str, int]]:
    return {(p, ino) for p, ino, _t in fls_entries(img)}


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("mkfs.ext4", "e2fsck", "fls", "debugfs")
    root = tmp_path_factory.mktemp("ext4cat")
    src = root / "src"
    populate_sample(src, big_dir=600)
    return mkfs(root / "base.img", 32 << 20, src)


def _general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every full index take the general path, not the first-index one (its
    reference in the equality tests)."""
    full = ext4index.Ext4Indexer.full

    async def general(self: ext4index.Ext4Indexer, old: dict[int, list[Entry]],
                      reset: bool) -> AsyncIterator[None]:
        async for _ in full(self, old or {0: []}, reset):  # not empty: not the first-index loop
            yield None

    monkeypatch.setattr(ext4index.Ext4Indexer, "full", general)


def test_ranges_helpers() -> None:
    r = merge_ranges([(10, 20), (0, 5), (15, 30), (30, 31), (40, 50)])
    assert r == [(0, 5), (10, 31), (40, 50)]
    starts = [s for s, _ in r]
    assert overlaps([(4, 6)], starts, r) and overlaps([(35, 41)], starts, r)
    assert not overlaps([(5, 10), (31, 40), (50, 60)], starts, r)
    assert unpack_ranges(pack_ranges(r)) == r
    # the FORMATS.md example: block 1234 of 4 KiB of a file system at 1 MiB (golden bytes)
    start = (1 << 20) + 1234 * 4096
    assert pack_ranges([(start, start + 4096)]).hex(" ") == "00 20 5d 00 00 00 00 00 00 30 5d 00 00 00 00 00"


def test_full_index_equals_fls(base_image: Path, tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.sqlite")
    c = index(cat, base_image, 1)
    assert c.kind == "full" and [p["fs"] for p in c.parts] == ["ext4"]
    assert c.plans[0].damaged == []
    assert catalog_rows(cat, 1) == fls_rows(base_image)
    v = cat.last_version()
    assert v is not None and v.fs == "ext4" and v.ntfs == 0
    hello = cat.at_path("/", "hello.txt", 1)
    links = {e.path for e in cat.subtree("/", 1) if hello is not None and e.record == hello.record}
    assert links == {"/hello.txt", "/a/hardlink.txt", "/big/zz-hardlink"}
    big = cat.at_path("/", "big", 1)
    assert big is not None and big.is_dir and unpack_ranges(big.location)  # its blocks


def _indexed_and_copied(base: Path, tmp: Path) -> tuple[Catalog, Version, Path]:
    """A catalog with *base* as version 1, and a copy of *base* to change (fuse2fs)."""
    require_tool("fuse2fs")
    cat = Catalog(tmp / "catalog.sqlite")
    index(cat, base, 1)
    v1 = cat.last_version()
    assert v1 is not None
    after = tmp / "after.img"
    shutil.copyfile(base, after)
    return cat, v1, after


def test_marker_diff_through_fuse2fs(base_image: Path, tmp_path: Path) -> None:
    cat, v1, after = _indexed_and_copied(base_image, tmp_path)
    with mounted(after) as m:
        with open(m / "hello.txt", "ab") as f:  # append (three names, one inode)
            f.write(b"more\n")
        os.truncate(m / "large.bin", 1000)
        os.rename(m / "a", m / "renamed-a")  # a directory: its subtree re-keyed
        os.rename(m / "tiny", m / "big" / "tiny-moved")
        os.unlink(m / "medium")
        os.link(m / "empty", m / "renamed-a" / "b" / "empty-link")
        (m / "new dir").mkdir()
        (m / "new dir" / "n.txt").write_bytes(b"new\n")
        for i in range(40):
            (m / "big" / f"added-{i:03d}").write_bytes(b"%d" % i)
        os.unlink(m / "big" / "entry-00007-nnnnnnn")
    c = index(cat, after, 2, v1, base_image)
    assert c.kind == "diff" and c.plans[0].damaged == []
    assert catalog_rows(cat, 2) == fls_rows(after)
    assert catalog_rows(cat, 1) == fls_rows(base_image)  # version 1 is untouched
    # the same state from a full index of the changed image, which parses far more
    full = Catalog(tmp_path / "full.sqlite")
    cf = index(full, after, 2)
    assert c.parsed * 4 < cf.parsed, (c.parsed, cf.parsed)  # ~50 changes of ~660 inodes
    def state(x: Catalog) -> set[tuple[object, ...]]:
        return {(e.path, e.record, e.seq, e.size, e.mtime, e.ctime, e.is_dir)
                for e in x.subtree("/", 2)}
    assert state(cat) == state(full)
    # the version rules: the renamed directory's old paths closed, not referenced
    old = cat.history("/a/b/c", "deep.txt")
    assert [(e.start, e.end) for e in old] == [(1, 2)] and old[0].ref < old[0].end
    assert [(e.start, e.end) for e in cat.history("/renamed-a/b/c", "deep.txt")] == [(2, 0)]
    h = cat.history("/", "hello.txt")
    assert [(e.start, e.end, e.ref) for e in h] == [(1, 2, 2), (2, 0, 2)]  # replaced
    assert h[1].size == len(b"hello, ext4\nmore\n")
    m = cat.history("/", "medium")
    assert [(e.start, e.end, e.ref) for e in m] == [(1, 2, 1)]  # deleted


def test_reused_inode_is_a_deletion_plus_an_addition(base_image: Path, tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.sqlite")
    index(cat, base_image, 1)
    v1 = cat.last_version()
    assert v1 is not None
    before = cat.at_path("/", "hello.txt", 1)
    assert before is not None
    after = tmp_path / "after.img"
    shutil.copyfile(base_image, after)
    debugfs(after, f"sif <{before.record}> generation {before.seq + 1}")
    index(cat, after, 2, v1, base_image)
    h = cat.history("/", "hello.txt")
    assert [(e.start, e.end, e.ref, e.seq) for e in h] == [(1, 2, 1, before.seq), (2, 0, 2, before.seq + 1)]


@pytest.mark.parametrize("kind,options", [("ext4", ["-O", "^metadata_csum,^64bit"]), ("ext2", [])])
def test_other_configurations(tmp_path: Path, kind: str, options: list[str]) -> None:
    require_tool("mkfs.ext4", "e2fsck", "fls", "fuse2fs")
    src = tmp_path / "src"
    populate_sample(src, big_dir=300)
    img = mkfs(tmp_path / "x.img", 32 << 20, src, kind=kind, options=options)
    cat = Catalog(tmp_path / "catalog.sqlite")
    c = index(cat, img, 1)
    assert [p["fs"] for p in c.parts] == [kind]
    assert catalog_rows(cat, 1) == fls_rows(img)
    v1 = cat.last_version()
    assert v1 is not None
    after = tmp_path / "after.img"
    shutil.copyfile(img, after)
    with mounted(after) as m:
        os.rename(m / "a" / "b", m / "b-up")
        (m / "big" / "x").write_bytes(b"x")
    c = index(cat, after, 2, v1, img)
    assert c.kind == "diff" and catalog_rows(cat, 2) == fls_rows(after)


def test_probe_finds_ext_and_ntfs_kinds(base_image: Path) -> None:
    read = file_reader(base_image)
    found = find_filesystems(read, base_image.stat().st_size)
    assert [(k, p.name) for k, p in found] == [("ext", "")]


def test_orphan_inode_is_not_a_live_file(base_image: Path, tmp_path: Path) -> None:
    """Unlinked while open: no name, no links, on the superblock's orphan list (what the
    kernel leaves at a point taken before the last close)."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    index(cat, base_image, 1)
    v1 = cat.last_version()
    e = cat.at_path("/a", "with space", 1)
    assert v1 is not None and e is not None
    after = tmp_path / "after.img"
    shutil.copyfile(base_image, after)
    debugfs(after, 'unlink "/a/with space"', f"sif <{e.record}> links_count 0",
            f"ssv last_orphan {e.record}")
    c = index(cat, after, 2, v1, base_image)
    assert c.plans[0].damaged == []
    assert cat.at_path("/a", "with space", 2) is None
    assert [(x.start, x.end, x.ref) for x in cat.history("/a", "with space")] == [(1, 2, 1)]
    assert catalog_rows(cat, 2) == fls_rows(after)  # fls lists it only under $OrphanFiles


def test_names_that_are_not_utf8_are_catalogued_exactly(base_image: Path, tmp_path: Path) -> None:
    """ext4 names are bytes: one that is not UTF-8 is catalogued (SQLite refuses the lone
    surrogates Python decodes it to, so the stored form escapes them) and comes back as
    the bytes on disk; the rest of the version is unaffected."""
    cat, v1, after = _indexed_and_copied(base_image, tmp_path)
    raw_dir, raw_file = b"latin1-\xe9t\xe9", b"bad-\xff\xfe-name.txt"
    with mounted(after) as m:
        d = os.path.join(os.fsencode(m), raw_dir)
        os.mkdir(d)
        with open(os.path.join(d, raw_file), "wb") as f:
            f.write(b"payload\n")
        (m / "plain.txt").write_bytes(b"plain\n")
    c = index(cat, after, 2, v1, base_image)
    assert c.plans[0].damaged == []
    rows = {exact(p): r for p, r in catalog_rows(cat, 2)}
    want = "/" + os.fsdecode(raw_dir) + "/" + os.fsdecode(raw_file)
    assert want in rows and "/plain.txt" in rows, sorted(rows)[:20]
    assert os.fsencode(want) == b"/" + raw_dir + b"/" + raw_file
    assert {exact(p) for p, _r in catalog_rows(cat, 2)} - {"/" + os.fsdecode(raw_dir), want,
                                                             "/plain.txt"} == \
        {exact(p) for p, _r in catalog_rows(cat, 1)}
    # a full index of the same image agrees
    full = Catalog(tmp_path / "full.sqlite")
    index(full, after, 2)
    assert catalog_rows(full, 2) == catalog_rows(cat, 2)


def test_a_first_index_plans_as_the_general_path(base_image: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A first index plans in its own loop (``Ext4Indexer._first``); the general path
    (``states_of_inode`` through ``plan_steps``) gives the same entries, in the same
    order, and the same damaged reports: on the sample image (hard links, symlinks, a
    600-entry htree directory) with an inode cleared while still named and an inode
    whose checksum is wrong."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    index(cat, base_image, 1)
    files = sorted(e.record for e in cat.subtree("/", 1) if not e.is_dir)
    cat.close()
    img = tmp_path / "x.img"
    shutil.copyfile(base_image, img)
    debugfs(img, f"clri <{files[3]}>", f"sif <{files[5]}> checksum 0x1234")
    size = img.stat().st_size
    fast = asyncio.run(compute(file_reader(img), size, None, None, None, 7)).plans[0]

    _general_path(monkeypatch)
    slow = asyncio.run(compute(file_reader(img), size, None, None, None, 7)).plans[0]
    assert len(fast.added) > 600
    assert [e.values() for e in fast.added] == [e.values() for e in slow.added]
    reasons = [why for _n, why in fast.damaged]
    assert any("which is free" in r for r in reasons) and any("checksum" in r for r in reasons)
    assert fast.damaged == slow.damaged
    assert fast.records == slow.records - 1  # the general path also planned record 0


def _stored(cat: Catalog) -> list[tuple[object, ...]]:
    """Every catalogued row as stored: the table's bytes, paths and names joined."""
    return cat.reader.execute(
        'SELECT e.id, e.part, d.path, n.name, e.start, e."end", e.ref, e.record, e.is_dir, '
        "e.stat, e.location FROM file_entries e JOIN dirs d ON d.id = e.dir_id "
        "JOIN names n ON n.id = e.name_id ORDER BY e.id").fetchall()


@pytest.mark.parametrize(("time_ns", "late", "odd"),
                         [(7, False, False), (8, False, False), (7, True, False), (7, False, True)])
def test_a_first_index_stores_the_general_paths_bytes(base_image: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      time_ns: int, late: bool, odd: bool) -> None:
    """A first index writes its rows column-wise (``Ext4Rows``: ``stat`` packed with
    numpy from the scan's columns, no Entry per row); the catalog it leaves holds the
    bytes the general path's Entries store (``pack_stat`` row by row): ``stat``,
    ``location``, ids, paths and names, with the backup time left out (the marker's
    time) or kept (another one). On the sample image with an inode cleared while still
    named, one whose checksum is wrong, a symlink and a hard link; *late*: also an mtime
    past 2174 (numpy leaves it to the one-inode parser); *odd*: also a second hard link in
    the same directory, a directory linked into itself and one whose only name is in
    itself (a parent loop for everything below it)."""
    img = tmp_path / "x.img"
    shutil.copyfile(base_image, img)
    cat = Catalog(tmp_path / "probe.sqlite")
    index(cat, img, 1)
    files = sorted(e.record for e in cat.subtree("/", 1) if not e.is_dir)
    cat.close()
    if odd:
        by = {e.path: e.record for e in Catalog(tmp_path / "probe.sqlite").subtree("/", 1)}
        b = by["/a/b"]
        live = next(r for p, r in by.items() if p.startswith("/a/") and r not in files[3:8:2])
        debugfs(img, f"ln <{live}> /a/0-second-link",  # listed last, sorted first
                f"ln <{b}> /a/b/up", "ln /a/b/c /a/b/c/again", "unlink /a/b/c")
    debugfs(img, f"clri <{files[3]}>", f"sif <{files[5]}> checksum 0x1234",
            *([f"sif <{files[7]}> mtime @-2147483648", f"sif <{files[7]}> mtime_extra 0x16"]
              if late else []))  # the most negative seconds, epoch 2, 5 ns: year ~2174
    size = img.stat().st_size
    fast = asyncio.run(compute(file_reader(img), size, None, None, None, 7))
    assert fast.plans[0].rows is not None  # the column-wise path
    if late:
        e = next(e for e in fast.plans[0].added if e.record == files[7])
        assert e.mtime == (-(1 << 31) + (2 << 32)) * 10**9 + 5
    fast_cat = Catalog(tmp_path / "fast.sqlite")
    asyncio.run(persist(fast_cat, fast, 1, 1, time_ns))
    _general_path(monkeypatch)
    slow = asyncio.run(compute(file_reader(img), size, None, None, None, 7))
    assert slow.plans[0].rows is None
    slow_cat = Catalog(tmp_path / "slow.sqlite")
    asyncio.run(persist(slow_cat, slow, 1, 1, time_ns))
    rows = _stored(fast_cat)
    assert len(rows) > 600 and any(r[10] for r in rows)  # located rows (directories, links)
    assert rows == _stored(slow_cat)
    assert fast.plans[0].damaged == slow.plans[0].damaged
    if odd:
        why = " ".join(r for _n, r in fast.plans[0].damaged)
        assert "loop through record" in why
        assert sum(1 for r in rows if r[2] == "/a" and r[7] == live) == 2  # two names in /a
        assert not any(r[3] == "deep.txt" for r in rows)  # below the loop
    # the rows as Entries (what an overlay or a test reads) after the write: as written
    assert [e.values() for e in fast.plans[0].added] == [e.values() for e in slow.plans[0].added]


def test_a_first_index_rows_keep_their_partitions_name(base_image: Path, tmp_path: Path) -> None:
    """The column-wise rows name their partition in the statement (a literal, not a bound
    value): a name with a quote is stored as it is."""
    c = asyncio.run(compute(file_reader(base_image), base_image.stat().st_size, None, None, None, 7))
    rows = c.plans[0].rows
    assert rows is not None
    c.plans[0].part = rows.part = "p'1"
    cat = Catalog(tmp_path / "catalog.sqlite")
    asyncio.run(persist(cat, c, 1, 1, 7))
    parts = cat.reader.execute("SELECT part, count(*) FROM file_entries GROUP BY part").fetchall()
    assert parts == [("p'1", len(rows))]


def test_a_first_index_with_a_time_beyond_int64_plans_as_the_general_path(
        base_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ctime past 2262 does not fit the scan's int64 columns: the first index scans
    again with every inode whole and plans the same entries as the general path."""
    img = tmp_path / "x.img"
    shutil.copyfile(base_image, img)
    cat = Catalog(tmp_path / "probe.sqlite")
    index(cat, img, 1)
    rec = next(e.record for e in cat.subtree("/", 1) if not e.is_dir)
    cat.close()
    debugfs(img, f"sif <{rec}> ctime_extra 0xFFFFFFFF")  # epoch 3
    size = img.stat().st_size
    fast = asyncio.run(compute(file_reader(img), size, None, None, None, 7)).plans[0]
    assert fast.rows is not None and fast.rows.cols is None  # type: ignore[attr-defined]
    _general_path(monkeypatch)
    slow = asyncio.run(compute(file_reader(img), size, None, None, None, 7)).plans[0]
    assert [e.values() for e in fast.added] == [e.values() for e in slow.added]
    assert max(e.ctime for e in fast.added) > (1 << 63)
