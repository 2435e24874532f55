"""Fuzzed ext4 metadata: mutate the superblock, group descriptors, inodes, extent headers
and tree blocks, and directory blocks of real images; whatever the bytes, opening,
walking, listing and reading either work or raise :class:`Corruption` (inodes report
``damaged``) — never another exception, and never longer than a few seconds per
example (a wall-clock alarm fails the example).

Three images: ext4 with ``metadata_csum`` (mutations mostly meet a checksum), ext4
without checksums and with ``inline_data`` (mutations reach the structure checks), and
ext3 (block maps); all with 1 KiB blocks, so the fragmented file has a depth-2 extent
tree and the 300-entry directory is an htree."""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Iterator
from types import FrameType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.errors import Corruption
from cdp.ext4 import Ext4
from cdp.ext4.defs import EXT4_EXTENT_HEADER, EXT4_EXTENT_IDX
from cdp.ext4.group import descriptor_blocks
from tests.conftest import require_tool
from tools.ext4_fixture import mkfs, populate_sample

EXAMPLES = int(os.environ.get("CDP_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
#: wall-clock bound of one example (open + walk + read every file and directory)
EXAMPLE_SECONDS = 10.0

CONFIGS = {
    "csum": ("ext4", ["-b", "1024"]),
    "plain": ("ext4", ["-b", "1024", "-O", "^metadata_csum,^64bit,inline_data"]),
    "ext3": ("ext3", ["-b", "1024"]),
}
REGIONS = ("superblock", "descriptors", "inodes", "extents", "directories")


class Image:
    """A clean image in memory and the byte ranges of each kind of metadata in it."""

    def __init__(self, data: bytes) -> None:
        self.buf = bytearray(data)
        fs = Ext4.open(self.read, 0, len(data))
        bs = fs.block_size
        walked = list(fs.walk())
        self.regions: dict[str, list[tuple[int, int]]] = {r: [] for r in REGIONS}
        self.regions["superblock"] = [(1024, 2048)]
        for g in range(fs.sb.group_count):
            b = descriptor_blocks(fs.sb, g)[0]
            self.regions["descriptors"].append((b * bs, (b + 1) * bs))
        for w in [*walked, None]:
            ino = w.inode if w is not None else fs.inode(2)
            off = fs.inode_offset(ino.number)
            self.regions["inodes"].append((off, off + fs.inode_size))
            if ino.has_extents:  # the i_block root, and the tree blocks below it
                self.regions["extents"].append((off + 0x28, off + 0x28 + 60))
                self.regions["extents"] += [(b * bs, (b + 1) * bs) for b in _tree_blocks(fs, ino.i_block)]
            if ino.is_dir:
                self.regions["directories"] += fs.data_ranges(ino)
        if not self.regions["extents"]:  # ext3: fuzz the indirect blocks' i_block instead
            self.regions["extents"] = [(a + 0x28, a + 0x28 + 60) for a, _b in self.regions["inodes"]]
        self.files = len(walked)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"<ext4 image of {len(self.buf)} bytes>"


def _tree_blocks(fs: Ext4, i_block: bytes) -> list[int]:
    out: list[int] = []
    level = [i_block]
    while level:
        nxt = []
        for node in level:
            _m, entries, _max, depth, _g = EXT4_EXTENT_HEADER.unpack_from(node, 0)
            if depth == 0:
                continue
            for i in range(entries):
                _first, lo, hi, _u = EXT4_EXTENT_IDX.unpack_from(node, 12 + 12 * i)
                out.append(hi << 32 | lo)
                nxt.append(fs.read_block(hi << 32 | lo))
        level = nxt
    return out


_cache: dict[str, Image] = {}


@pytest.fixture(scope="module")
def image_of(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Image]]:
    require_tool("mkfs.ext4", "e2fsck")
    root = tmp_path_factory.mktemp("ext4fz")
    src = root / "src"
    populate_sample(src, big_dir=300)
    (src / "large.bin").write_bytes(os.urandom(20_000))  # keep the images small
    for name, (kind, opts) in CONFIGS.items():
        _cache[name] = Image(mkfs(root / f"{name}.img", 12 << 20, src, kind=kind, options=opts).read_bytes())
    yield _cache
    _cache.clear()


class Hung(Exception):
    """An example ran past EXAMPLE_SECONDS."""


def _alarm(_sig: int, _frame: FrameType | None) -> None:
    raise Hung(f"an example ran longer than {EXAMPLE_SECONDS} s")


def exercise(img: Image) -> int:
    """Everything a catalog would do with the file system; returns the names walked.
    Only Corruption may escape from the parser's calls."""
    try:
        fs = Ext4.open(img.read, 0, len(img.buf))
    except Corruption:
        return 0
    errors: list[tuple[str, str]] = []
    try:
        walked = list(fs.walk(errors))
    except Corruption:
        walked = []
    for w in walked:
        for call in (fs.file_runs, fs.data_ranges):
            try:
                call(w.inode)
            except Corruption:
                pass
        try:
            fs.read_file(w.inode, 0, 1 << 20)
            if w.kind == "symlink":
                fs.readlink(w.inode)
            if w.kind == "dir":
                fs.read_dir(w.inode, dots=True)
        except Corruption:
            pass
    for chunk in fs.scan(chunk_inodes=64):  # the vectorised scan agrees with single reads
        for x in chunk:
            assert fs.inode(x.number) == x
    lo, hi, _first = fs.inode_table_extents()[0] if fs.inode_table_extents() else (0, 0, 0)
    numbers = fs.inodes_in([(lo, hi)])
    for ino in fs.read_inodes(numbers[:4096]).values():
        assert ino.damaged is None or isinstance(ino.damaged, str)
    for n in (1, 2, 11, fs.inode_count):
        try:
            fs.inode(n)
        except Corruption:  # only for a number past the (fuzzed) inode count
            assert n > fs.inode_count
    return len(walked)


mutation = st.tuples(
    st.integers(0, 1 << 30),  # position (modulo the region)
    st.one_of(
        st.integers(0, 255).map(lambda v: bytes([v])),  # a byte
        st.sampled_from([0, 1, 2, 12, 0x7F, 0xFF, 0xFFFF, 0x8000, 0xF30A, 0x7FFFFFFF, 0xFFFFFFFF,
                         0x80000000]).map(lambda v: struct.pack("<I", v)),  # counts, lengths
    ),
)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("region", REGIONS)
@FUZZ
@given(data=st.data())
def test_mutated_metadata_parses_or_raises_corruption(
    image_of: dict[str, Image], config: str, region: str, data: st.DataObject,
) -> None:
    img = image_of[config]
    spans = img.regions[region]
    start, end = data.draw(st.sampled_from(spans), label="span")
    muts = data.draw(st.lists(mutation, min_size=1, max_size=8), label="mutations")
    saved: list[tuple[int, bytes]] = []
    for pos, value in muts:
        p = start + pos % max(end - start, 1)
        saved.append((p, bytes(img.buf[p : p + len(value)])))
        img.buf[p : p + len(value)] = value[: len(img.buf) - p]
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, EXAMPLE_SECONDS)
    try:
        exercise(img)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for p, b in reversed(saved):
            img.buf[p : p + len(b)] = b


@pytest.mark.parametrize("config", list(CONFIGS))
def test_clean_images_walk_whole(image_of: dict[str, Image], config: str) -> None:
    """The seeds are good: every name is walked (so the fuzzing starts from real trees)."""
    img = image_of[config]
    assert exercise(img) == img.files > 300
    assert all(img.regions[r] for r in REGIONS)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1024, max_size=1024), st.sampled_from([0, 1024, 2048]))
def test_random_superblock_bytes(data: bytes, where: int) -> None:
    """A superblock of random bytes (with the magic) at the start of a small volume."""
    buf = bytearray(64 << 10)
    buf[1024:2048] = data
    buf[1024 + 0x38 : 1024 + 0x3A] = b"\x53\xef"
    buf[where : where + 16] = bytes(16)
    try:
        fs = Ext4.open(lambda o, n: bytes(buf[o : o + n]), 0, len(buf))
    except Corruption:
        return
    try:
        list(fs.walk([]))
    except Corruption:
        pass
