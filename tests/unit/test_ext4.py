"""ext2/3/4 reader against real images (``mkfs -d`` from a source tree, htree indexes by
``e2fsck -fD``) checked with The Sleuth Kit (``fls -r -p``, ``icat``, ``istat``) and the
source tree itself, plus damaged copies for the error paths."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdp.errors import Corruption
from cdp.ext4 import Ext4, Superblock, find_ext4
from cdp.ext4.defs import (
    EXT4_EXTENT_HEADER,
    RO_COMPAT_METADATA_CSUM,
    SUPERBLOCK_OFFSET,
)
from cdp.ext4.group import descriptor_blocks
from tests.conftest import require_tool
from tools.ext4_fixture import (
    FRAG_PIECES,
    FRAG_STRIDE,
    SLOW_TARGET,
    debugfs,
    fls_entries,
    icat,
    istat_size,
    mkfs,
    populate_sample,
)

Reader = Callable[[int, int], bytes]

# name -> (mkfs kind, options): the default ext4 (64bit, metadata_csum, extents, flex_bg,
# huge_file, dir_index) at 4 KiB and 1 KiB blocks, the older crc16 descriptor checksums
# (uninit_bg) and 32-byte descriptors, ext3 and ext2 (block maps), inline data, meta_bg
# (48 groups of 1024 blocks: three meta groups), 128-byte inodes, and a revision 0 ext2
# (no features at all: no file types in directory entries, no htree)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "ext4": ("ext4", ["-b", "4096"]),
    "ext4-1k": ("ext4", ["-b", "1024"]),
    "ext4-nocsum": ("ext4", ["-O", "^metadata_csum,^64bit,uninit_bg"]),
    "ext3": ("ext3", []),
    "ext2": ("ext2", []),
    "inline": ("ext4", ["-O", "inline_data"]),
    "meta_bg": ("ext4", ["-O", "meta_bg,^resize_inode", "-g", "1024"]),
    "ext4-128": ("ext4", ["-I", "128"]),
    "ext2-rev0": ("ext2", ["-r", "0"]),
}
EXTENTS = {"ext4", "ext4-1k", "ext4-nocsum", "inline", "meta_bg", "ext4-128"}


def file_reader(path: Path) -> Reader:
    fd = os.open(path, os.O_RDONLY)

    def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return read


def open_fs(path: Path, offset: int = 0) -> Ext4:
    return Ext4.open(file_reader(path), offset, path.stat().st_size - offset)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("ext4src") / "src"
    populate_sample(src)
    return src


_images: dict[str, Path] = {}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Iterator[Callable[[str], Path]]:
    require_tool("mkfs.ext4", "e2fsck", "fls", "icat", "istat", "debugfs")
    root = tmp_path_factory.mktemp("ext4img")

    def get(name: str) -> Path:
        if name not in _images:
            kind, opts = CONFIGS[name]
            _images[name] = mkfs(root / f"{name}.img", 48 << 20, source, kind=kind, options=opts)
        return _images[name]

    yield get
    _images.clear()


def _by_path(fs: Ext4) -> dict[str, int]:
    return {w.path: w.ino for w in fs.walk()}


# ------------------------------------------------------------------ real images


@pytest.mark.parametrize("config", list(CONFIGS))
def test_walk_matches_fls_and_the_source(images: Callable[[str], Path], source: Path, config: str) -> None:
    img = images(config)
    fs = open_fs(img)
    errors: list[tuple[str, str]] = []
    walked = list(fs.walk(errors))
    assert errors == [] and fs.notes == []
    ours = {(w.path, w.ino) for w in walked}
    theirs = {(p, i) for p, i, _t in fls_entries(img)}
    assert ours == theirs
    kinds = {"r": "file", "d": "dir", "l": "symlink"}
    fls_kind = {p: kinds[t[-1]] for p, _i, t in fls_entries(img)}
    assert {w.path: w.kind for w in walked} == fls_kind
    in_source = {"/" + str(p.relative_to(source)) for p in source.rglob("*")}
    assert {w.path for w in walked} - {"/lost+found"} == in_source
    for w in walked:
        st = (source / w.path[1:]).lstat() if w.path != "/lost+found" else None
        if st is not None and w.kind == "file":
            assert w.size == st.st_size or (config == "inline" and w.path == "/sparse.bin"), w.path
            assert w.times[1] // 1_000_000_000 == int(st.st_mtime), w.path


@pytest.mark.parametrize("config", list(CONFIGS))
def test_contents_match_the_source_and_icat(images: Callable[[str], Path], source: Path, config: str) -> None:
    img = images(config)
    fs = open_fs(img)
    walked = {w.path: w for w in fs.walk()}
    for path, w in walked.items():
        if w.kind == "file":
            data = fs.read_file(w.inode)
            if config == "inline" and path == "/sparse.bin":
                # mke2fs -d with inline_data loses this file's trailing hole (and maps
                # block 0): the image, not the source, is the truth -> icat below
                continue
            assert data == (source / path[1:]).read_bytes(), path
        elif w.kind == "symlink":
            assert os.fsdecode(fs.readlink(w.inode)) == os.readlink(source / path[1:]), path
    # (not fragmented.bin: The Sleuth Kit 4.11 gives up on its tree of extents with holes,
    # "fs_attr_add_run: No filler entry"; the source is its oracle)
    for path in ("/hello.txt", "/large.bin", "/sparse.bin", "/medium", "/tiny", "/slow-link",
                 "/a/b/c/deep.txt"):
        w = walked[path]
        assert fs.read_file(w.inode) == icat(img, w.ino), path
        assert w.size == istat_size(img, w.ino), path
    # partial reads cut at the size
    w = walked["/large.bin"]
    src = (source / "large.bin").read_bytes()
    assert fs.read_file(w.inode, 4000, 10_000) == src[4000:14_000]
    assert fs.read_file(w.inode, len(src) - 5, 100) == src[-5:]
    assert fs.read_file(w.inode, len(src) + 1) == b""


@pytest.mark.parametrize("config", list(CONFIGS))
def test_table_scan_equals_single_inode_reads(images: Callable[[str], Path], config: str) -> None:
    """The vectorised scan and the one-inode parser agree field by field."""
    fs = open_fs(images(config))
    scanned = [x for chunk in fs.scan(chunk_inodes=100) for x in chunk]
    assert len(scanned) > 2000 and all(x.in_use and x.damaged is None for x in scanned)
    assert {x.number: x for x in scanned} == {n: fs.inode(n) for n in (x.number for x in scanned)}
    assert fs.read_inodes(x.number for x in scanned[:500]) == {x.number: x for x in scanned[:500]}


def test_extreme_fields_decode_alike(images: Callable[[str], Path], tmp_path: Path) -> None:
    """A size past 2**63 and times past 2174 (epoch bits 2 and 3): the numpy scan and
    the one-inode parser agree (found by the fuzzer: a signed int64 size)."""
    buf = _copy(images, "ext4-nocsum", tmp_path)
    fs = Ext4.open(_mem(buf), 0, len(buf))
    big, late = _by_path(fs)["/a/with space"], _by_path(fs)["/hello.txt"]
    struct.pack_into("<I", buf, fs.inode_offset(big) + 0x6C, 0x80000001)  # i_size_high
    off = fs.inode_offset(late)  # (times numpy cannot hold go through the one-inode parser)
    struct.pack_into("<I", buf, off + 0x84, 0xFFFFFFFF)  # i_ctime_extra: epoch 3, max ns
    struct.pack_into("<I", buf, off + 0x88, 2 | 5 << 2)  # i_mtime_extra: epoch 2, 5 ns
    struct.pack_into("<I", buf, off + 0x0C, 0x80000000)  # i_ctime: the most negative
    fs = Ext4.open(_mem(buf), 0, len(buf))
    x, y = fs.inode(big), fs.inode(late)
    assert x.size == 0x80000001 << 32 | len("space\n")
    assert y.ctime == (-(1 << 31) + (3 << 32)) * 1_000_000_000 + (0xFFFFFFFF >> 2)
    assert y.mtime % 1_000_000_000 == 5 and y.mtime // 1_000_000_000 >= 2 << 32
    scanned = {i.number: i for chunk in fs.scan() for i in chunk}
    assert scanned[big] == x and scanned[late] == y
    # with columns (a first index): the slow inodes come whole; a time beyond int64
    # leaves its chunk without columns (the index then scans again, every inode whole)
    columns: list[Any] = []
    lean = {i.number: i for chunk in fs.scan(columns=columns) for i in chunk}
    assert lean[late] == y and None in columns


@pytest.mark.parametrize("config", ["ext4", "ext3", "inline"])
def test_table_scan_with_columns(images: Callable[[str], Path], config: str) -> None:
    """With a *columns* list the scan gives every used inode's fields as numpy columns
    (field by field what the tuples hold) and, whole, only the inodes a first index
    needs whole: directories, symlinks, inline data, damaged ones."""
    fs = open_fs(images(config))
    every = {x.number: x for chunk in fs.scan(chunk_inodes=100) for x in chunk}
    columns: list[Any] = []
    whole = {x.number: x for chunk in fs.scan(chunk_inodes=100, columns=columns) for x in chunk}
    assert columns and None not in columns
    cols = [np.concatenate([c[f] for c in columns]).tolist() for f in range(15)]
    assert [tuple(r) for r in zip(*cols, strict=True)] == [x[:15] for x in every.values()]
    assert whole == {n: x for n, x in every.items()
                     if x.is_dir or x.is_symlink or x.has_inline_data or x.damaged}
    assert any(x.is_dir for x in whole.values()) and len(whole) < len(every)


@pytest.mark.parametrize("config", ["ext4", "ext4-1k", "ext3", "inline"])
def test_hard_links_and_symlinks(images: Callable[[str], Path], config: str) -> None:
    fs = open_fs(images(config))
    by = _by_path(fs)
    ino = by["/hello.txt"]
    assert by["/a/hardlink.txt"] == ino == by["/big/zz-hardlink"]
    assert fs.inode(ino).links == 3
    fast, slow = fs.inode(by["/fast-link"]), fs.inode(by["/slow-link"])
    assert fs.is_fast_symlink(fast) and fs.file_runs(fast) == []
    assert fs.readlink(fast) == b"hello.txt"
    assert not fs.is_fast_symlink(slow) and fs.readlink(slow) == SLOW_TARGET.encode()
    if config == "inline":
        assert slow.has_inline_data and fs.file_runs(slow) == []
    else:
        assert len(fs.file_runs(slow)) == 1
    with pytest.raises(Corruption):
        fs.readlink(ino)


@pytest.mark.parametrize("config", ["ext4", "ext4-1k", "ext4-nocsum", "ext3", "ext2"])
def test_sparse_file_runs_skip_the_holes(images: Callable[[str], Path], config: str) -> None:
    fs = open_fs(images(config))
    sp = fs.inode(_by_path(fs)["/sparse.bin"])
    runs = fs.file_runs(sp)
    assert sp.size == 5 << 20
    covered = [(r.file_off, r.file_off + r.length) for r in runs]
    assert all(not r.uninit for r in runs)
    # the data lies inside the runs; the runs cover only a few blocks around it
    assert any(a <= 1 << 20 and b >= (1 << 20) + 5000 for a, b in covered)
    assert any(a <= 3 << 20 and b >= (3 << 20) + 100 for a, b in covered)
    assert sum(r.length for r in runs) <= 4 * 4096 + 4096
    assert fs.read_file(sp, 0, 1 << 20) == bytes(1 << 20)
    assert fs.data_ranges(sp) == [(r.vol_off, r.vol_off + -(-r.length // fs.block_size) * fs.block_size)
                                  for r in runs]


@pytest.mark.parametrize("config", ["ext4", "ext4-1k", "meta_bg", "ext3"])
def test_fragmented_file_needs_a_deep_extent_tree(images: Callable[[str], Path], config: str) -> None:
    fs = open_fs(images(config))
    f = fs.inode(_by_path(fs)["/fragmented.bin"])
    runs = fs.file_runs(f)
    assert len(runs) == FRAG_PIECES
    assert [r.file_off for r in runs] == [i * FRAG_STRIDE for i in range(FRAG_PIECES)]
    if config in EXTENTS:
        depth = EXT4_EXTENT_HEADER.unpack_from(f.i_block)[3]
        assert depth == (1 if fs.block_size == 4096 else 2)
    else:
        assert not f.has_extents


@pytest.mark.parametrize("config", ["ext4", "ext4-nocsum", "ext2", "inline", "ext2-rev0"])
def test_htree_directory_is_listed_whole(images: Callable[[str], Path], source: Path, config: str) -> None:
    fs = open_fs(images(config))
    big = fs.inode(_by_path(fs)["/big"])
    assert big.is_htree == (config != "ext2-rev0")
    names = sorted(e.name for e in fs.read_dir(big))
    assert names == sorted(p.name for p in (source / "big").iterdir())
    dots = fs.read_dir(big, dots=True)
    assert [(e.name, e.ino) for e in dots[:2]] == [(".", big.number), ("..", 2)]
    kinds = {e.kind for e in fs.read_dir(big)}
    assert kinds == ({"unknown"} if config == "ext2-rev0" else {"file"})


def test_features_as_configured(images: Callable[[str], Path]) -> None:
    want = {  # config: (kind, desc_size, metadata_csum, gdt_csum, meta_bg, inode_size)
        "ext4": ("ext4", 64, True, False, False, 256),
        "ext4-nocsum": ("ext4", 32, False, True, False, 256),
        "ext3": ("ext3", 32, False, False, False, 256),
        "ext2": ("ext2", 32, False, False, False, 256),
        "meta_bg": ("ext4", 64, True, False, True, 256),
        "ext4-128": ("ext4", 64, True, False, False, 128),
        "ext2-rev0": ("ext2", 32, False, False, False, 128),
    }
    for config, (kind, ds, mc, gc, mb, isz) in want.items():
        sb = open_fs(images(config)).sb
        assert (sb.kind, sb.desc_size, sb.metadata_csum, sb.gdt_csum, sb.meta_bg, sb.inode_size) == (
            kind, ds, mc, gc, mb, isz), config
    fs = open_fs(images("inline"))
    by = _by_path(fs)
    assert fs.inode(by["/tiny"]).has_inline_data and fs.inode(by["/emptydir"]).has_inline_data
    assert fs.read_dir(by["/emptydir"]) == []
    assert [e.name for e in fs.read_dir(by["/emptydir"], dots=True)] == [".", ".."]
    fs128 = open_fs(images("ext4-128"))
    w = fs128.inode(_by_path(fs128)["/hello.txt"])
    assert w.crtime == 0 and w.mtime % 1_000_000_000 == 0  # no room for crtime or ns


def test_meta_bg_descriptors_are_found_per_meta_group(images: Callable[[str], Path]) -> None:
    fs = open_fs(images("meta_bg"))
    sb = fs.sb
    assert sb.meta_bg and sb.group_count > sb.descs_per_block  # several meta groups
    for g in (0, sb.descs_per_block, sb.group_count - 1):
        primary, backups = descriptor_blocks(sb, g)
        first = g // sb.descs_per_block * sb.descs_per_block
        assert primary == sb.group_first_block(first) + (1 if sb.has_super(first) else 0)
        assert len(backups) == 2
    assert all(gd.source == "primary" and not gd.damaged for gd in fs.groups)


# ------------------------------------------------------------------ the marker diff's needs


def test_inode_tables_and_inodes_in(images: Callable[[str], Path]) -> None:
    fs = open_fs(images("ext4"))
    exts = fs.inode_table_extents()
    isz = fs.inode_size
    covered = sorted(n for s, e, f in exts for n in range(f, f + (e - s) // isz))
    assert covered == list(range(1, fs.inode_count + 1))
    assert len(exts) < len(fs.groups) or len(fs.groups) == 1  # flex_bg tables merged
    ino = _by_path(fs)["/hello.txt"]
    off = fs.inode_offset(ino)
    block = off // 4096 * 4096
    hit = fs.inodes_in([(block, block + 4096)])
    assert ino in hit and len(hit) == 4096 // isz
    assert fs.inodes_in([(off, off + 1)]) == [ino]
    assert fs.inodes_in([(0, 4096)]) == []
    assert fs.inodes_in([]) == []
    got = fs.read_inodes([*hit, 0, fs.inode_count + 5])
    assert set(got) == set(hit) and got[ino].is_reg and got[ino].links == 3


def _changed_blocks(a: Path, b: Path, block: int = 4096) -> list[tuple[int, int]]:
    x = np.fromfile(a, np.uint8).reshape(-1, block)
    y = np.fromfile(b, np.uint8).reshape(-1, block)
    return [(int(i) * block, (int(i) + 1) * block) for i in np.nonzero((x != y).any(axis=1))[0]]


def test_a_change_touches_few_inodes(images: Callable[[str], Path], tmp_path: Path) -> None:
    base = images("ext4")
    after = tmp_path / "after.img"
    shutil.copyfile(base, after)
    before = _by_path(open_fs(base))
    debugfs(after, "write /etc/hostname /a/newfile", "sif /big/entry-01000- mtime 20300101000000")
    fs = open_fs(after)
    now = _by_path(fs)
    new = now["/a/newfile"]
    touched = fs.inodes_in(_changed_blocks(base, after))
    assert new in touched and now["/big/entry-01000-"] in touched
    assert len(touched) <= 64 < fs.inode_count // 20
    parsed = fs.read_inodes(touched)
    assert parsed[now["/big/entry-01000-"]].mtime // 1_000_000_000 == 1893456000
    assert before.keys() | {"/a/newfile"} == now.keys()
    # the directory that gained the name: its blocks are among the changed ranges
    changed = _changed_blocks(base, after)
    a_dir = fs.data_ranges(now["/a"])
    assert any(s < ce and cs < e for s, e in a_dir for cs, ce in changed)


def test_uninitialised_extents_read_as_zeros(images: Callable[[str], Path], tmp_path: Path) -> None:
    img = tmp_path / "falloc.img"
    shutil.copyfile(images("ext4"), img)
    debugfs(img, "write /etc/hostname /prealloc", "fallocate /prealloc 0 9", "sif /prealloc size 30000")
    fs = open_fs(img)
    f = fs.inode(_by_path(fs)["/prealloc"])
    runs = fs.file_runs(f)
    assert any(r.uninit for r in runs) and not runs[0].uninit
    data = fs.read_file(f)
    host = Path("/etc/hostname").read_bytes()
    assert data[: len(host)] == host and data[4096:] == bytes(30000 - 4096)
    assert data == icat(img, f.number)


# ------------------------------------------------------------------ partitions


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_partitioned_disk(images: Callable[[str], Path], tmp_path: Path, label: str) -> None:
    require_tool("sfdisk")
    a, b = images("ext4"), images("ext2")
    disk = tmp_path / "disk.img"
    first = 2048
    second = first + a.stat().st_size // 512 + 2048
    with open(disk, "wb") as f:
        f.truncate((second + b.stat().st_size // 512 + 2048) * 512)
    script = (f"label: {label}\n"
              f"start={first}, size={a.stat().st_size // 512}, type=L\n"
              f"start={second}, size={b.stat().st_size // 512}, type=L\n")
    subprocess.run(["sfdisk", "-q", str(disk)], input=script, text=True, check=True,
                   capture_output=True)
    with open(disk, "r+b") as f:
        for img, lba in ((a, first), (b, second)):
            f.seek(lba * 512)
            f.write(img.read_bytes())
    read = file_reader(disk)
    parts = find_ext4(read, disk.stat().st_size)
    assert [(p.name, p.offset) for p in parts] == [("p1", first * 512), ("p2", second * 512)]
    for p, lba in zip(parts, (first, second), strict=True):
        fs = Ext4.open(read, p.offset, p.size)
        assert {(w.path, w.ino) for w in fs.walk()} == {(q, i) for q, i, _t in fls_entries(disk, lba)}
        hello = fs.inode(_by_path(fs)["/hello.txt"])
        assert fs.read_file(hello) == b"hello, ext4\n"
        assert all(r.vol_off >= p.offset for r in fs.file_runs(hello))
        lo, _hi, _first = fs.inode_table_extents()[0]
        assert p.offset <= lo < p.offset + p.size
        assert fs.inodes_in([(lo, lo + 512)]) == list(range(1, 512 // fs.inode_size + 1))
    # the whole disk is no file system; a whole-disk file system is one "" partition
    assert find_ext4(file_reader(a), a.stat().st_size) == [("", 0, a.stat().st_size)]
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(1 << 20))
    assert find_ext4(file_reader(blank), 1 << 20) == []


# ------------------------------------------------------------------ damage


def _copy(images: Callable[[str], Path], config: str, tmp_path: Path) -> bytearray:
    return bytearray(images(config).read_bytes())


def _mem(buf: bytearray) -> Reader:
    return lambda o, n: bytes(buf[o : o + n])


def test_primary_superblock_damaged_uses_the_backup(images: Callable[[str], Path], tmp_path: Path) -> None:
    for config in ("ext4-1k", "ext3"):  # (the 4 KiB image has one group: no backup)
        buf = _copy(images, config, tmp_path)
        buf[SUPERBLOCK_OFFSET + 0x20] ^= 0xFF  # s_blocks_per_group: the checksum fails
        fs = Ext4.open(_mem(buf), 0, len(buf))
        assert fs.notes and "backup in group 1" in fs.notes[0]
        assert fs.sb.block_group_nr == 1
        assert "/big/entry-00007-nnnnnnn" in _by_path(fs)
        buf[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + 1024] = bytes(1024)  # gone entirely
        assert "/hello.txt" in _by_path(Ext4.open(_mem(buf), 0, len(buf)))
        sbo = fs.sb.block_size * (fs.sb.blocks_per_group + fs.sb.first_data_block)
        buf[sbo : sbo + 1024] = bytes(1024)
        with pytest.raises(Corruption, match="superblock"):
            Ext4.open(_mem(buf), 0, len(buf))


@pytest.mark.parametrize("config", ["ext4-1k", "ext4-nocsum"])  # crc32c, crc16
def test_group_descriptor_damaged_uses_its_backup(images: Callable[[str], Path], tmp_path: Path, config: str) -> None:
    buf = _copy(images, config, tmp_path)
    fs = Ext4.open(_mem(buf), 0, len(buf))
    primary, backups = descriptor_blocks(fs.sb, 0)
    pos = primary * fs.block_size + 0x8  # group 0's bg_inode_table_lo
    buf[pos] ^= 0x01
    fs2 = Ext4.open(_mem(buf), 0, len(buf))
    assert fs2.groups[0].source.startswith("backup") and "checksum" in fs2.notes[0]
    assert fs2.groups[0].inode_table == fs.groups[0].inode_table
    assert _by_path(fs2) == _by_path(fs)
    for b in backups:  # and when every copy is bad, the group's inodes are unreadable
        buf[b * fs.block_size + 0x8] ^= 0x01
    fs3 = Ext4.open(_mem(buf), 0, len(buf))
    assert fs3.groups[0].damaged and fs3.inode(2).damaged
    errors: list[tuple[str, str]] = []
    assert list(fs3.walk(errors)) == [] and errors and errors[0][0] == "/"


def test_inode_checksum_mismatch_is_reported_per_inode(images: Callable[[str], Path], tmp_path: Path) -> None:
    buf = _copy(images, "ext4", tmp_path)
    fs = Ext4.open(_mem(buf), 0, len(buf))
    assert fs.sb.feature_ro_compat & RO_COMPAT_METADATA_CSUM
    ino = _by_path(fs)["/a/with space"]
    buf[fs.inode_offset(ino) + 0x10] ^= 0x40  # i_mtime
    fs = Ext4.open(_mem(buf), 0, len(buf))
    assert fs.inode(ino).damaged == "inode checksum mismatch"
    errors: list[tuple[str, str]] = []
    paths = {w.path for w in fs.walk(errors)}
    assert "/a/with space" not in paths and "/a/b/c/deep.txt" in paths
    assert errors == [("/a/with space", f"entry names inode {ino}, which is damaged (inode checksum mismatch)")]
    with pytest.raises(Corruption):
        list(fs.walk())
    with pytest.raises(Corruption):
        fs.file_runs(ino)


def test_extent_tree_loop_and_bad_blocks(images: Callable[[str], Path], tmp_path: Path) -> None:
    buf = _copy(images, "ext4-nocsum", tmp_path)  # no checksums: the structure checks act
    fs = Ext4.open(_mem(buf), 0, len(buf))
    frag = fs.inode(_by_path(fs)["/fragmented.bin"])
    root = fs.inode_offset(frag.number) + 0x28
    # an index entry of the root names a tree block; point that block's first index
    # entry back at itself: a loop
    leaf = struct.unpack_from("<I", buf, root + 12 + 4)[0]
    bs = fs.block_size
    assert EXT4_EXTENT_HEADER.unpack_from(buf, leaf * bs)[3] == 1  # an index node
    struct.pack_into("<I", buf, leaf * bs + 12 + 4, leaf)
    fs = Ext4.open(_mem(buf), 0, len(buf))
    with pytest.raises(Corruption, match="a loop"):
        fs.file_runs(frag.number)
    struct.pack_into("<I", buf, leaf * bs + 12 + 4, fs.sb.blocks_count + 10)
    with pytest.raises(Corruption, match="outside"):
        Ext4.open(_mem(buf), 0, len(buf)).file_runs(frag.number)
    struct.pack_into("<H", buf, root + 4, 0xFFFF)  # eh_max beyond the 4 that fit in i_block
    with pytest.raises(Corruption, match="extent header"):
        Ext4.open(_mem(buf), 0, len(buf)).read_file(frag.number)


def test_bad_directory_record(images: Callable[[str], Path], tmp_path: Path) -> None:
    buf = _copy(images, "ext4-nocsum", tmp_path)
    fs = Ext4.open(_mem(buf), 0, len(buf))
    a = fs.inode(_by_path(fs)["/a"])
    first = fs.file_runs(a)[0].vol_off
    struct.pack_into("<H", buf, first + 12 + 4, 7)  # ".." rec_len: not a multiple of 4
    fs = Ext4.open(_mem(buf), 0, len(buf))
    with pytest.raises(Corruption, match="bad directory record"):
        fs.read_dir(a.number)
    errors: list[tuple[str, str]] = []
    paths = {w.path for w in fs.walk(errors)}
    assert "/a" in paths and not any(p.startswith("/a/") for p in paths)
    assert errors[0][0] == "/a" and "/big/zz-hardlink" in paths
    # with metadata_csum, the same damage is a checksum mismatch
    buf = _copy(images, "ext4", tmp_path)
    fs = Ext4.open(_mem(buf), 0, len(buf))
    a = fs.inode(_by_path(fs)["/a"])
    buf[fs.file_runs(a)[0].vol_off + 30] ^= 1
    with pytest.raises(Corruption, match="checksum"):
        Ext4.open(_mem(buf), 0, len(buf)).read_dir(a.number)


@pytest.mark.parametrize(("field", "fmt", "value", "why"), [
    (0x18, "<I", 20, "block size"),  # s_log_block_size
    (0x28, "<I", 1 << 30, "inodes per group"),
    (0x20, "<I", 3, "blocks per group"),
    (0x00, "<I", 0xFFFFFFFF, "inodes in"),  # s_inodes_count past groups * per group
    (0x58, "<H", 100, "inode size"),
    (0xFE, "<H", 48, "descriptor size"),
    (0x04, "<I", 0xFFFFFFF0, "larger than its volume"),  # s_blocks_count_lo
])
def test_absurd_superblock_counts(images: Callable[[str], Path], tmp_path: Path, field: int,
                                  fmt: str, value: int, why: str) -> None:
    # the counts are checked before the checksum (64bit for the descriptor size; no
    # metadata_csum for the size against the volume, which only Ext4.open checks)
    buf = _copy(images, "ext4" if why == "descriptor size" else "ext4-nocsum", tmp_path)
    struct.pack_into(fmt, buf, SUPERBLOCK_OFFSET + field, value)
    with pytest.raises(Corruption, match=why):
        Superblock.from_bytes(bytes(buf[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + 1024]))
        Ext4.open(_mem(buf), 0, len(buf))  # the count passes alone, not against the volume


def test_truncated_volume_and_short_reads(images: Callable[[str], Path]) -> None:
    data = images("ext4").read_bytes()
    with pytest.raises(Corruption, match="larger than its volume"):
        Ext4.open(_mem(bytearray(data)), 0, len(data) // 2)
    with pytest.raises(Corruption, match="short read"):
        Ext4.open(_mem(bytearray(data[: len(data) // 2])))  # no size: the end is probed
    with pytest.raises(Corruption, match="not an ext"):
        Ext4.open(_mem(bytearray(len(data))), 0, len(data))
