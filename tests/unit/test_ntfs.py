"""NTFS reader against real images (mkntfs + ntfs-3g) checked with The Sleuth Kit, plus
single records inline as hex for edge cases."""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cdp.catalog.indexer import compute
from cdp.catalog.rules import Resolver, states_of
from cdp.errors import Corruption
from cdp.ntfs.mft import NtfsVolume, merge_extensions
from cdp.ntfs.partition import find_ntfs
from cdp.ntfs.record import FileRecord
from cdp.ntfs.runlist import decode_runs, encode_runs
from tests.conftest import require_tool
from tests.helpers import assert_bytes_equal
from tools.ntfs_fixture import fls_entries, ils_allocated, make_image, set_ads

# MFT record 66 of a fresh image: "small.txt" with a hard link "link.txt" (two
# $FILE_NAME), resident $DATA "hi" and an alternate data stream "secret" = "ads data".
# Bytes 0..543 as on disk (update sequence 0x0008 still in place at 510), zeros after;
# bytes 1022..1023 hold the update sequence number too.
RECORD_66 = bytes.fromhex(
    "46494c4530000300000000000000000001000200380001002002000000040000000000000000000006000000"
    "420000000800000000000000100000004800000000000000000000003000000018000000c88f8a16297add01"
    "fe968a16297add0188a28a16297add01c88f8a16297add012000000000000000000000000000000030000000"
    "70000000000000000000030054000000180001000500000000000500c88f8a16297add01c88f8a16297add01"
    "c88f8a16297add01c88f8a16297add0108000000000000000000000000000000200000000000000009007300"
    "6d0061006c006c002e00740078007400180000003000000070000000000000000000040052000000180001004000"
    "000000000100c88f8a16297add01fe968a16297add01fe968a16297add01c88f8a16297add01080000000000"
    "00000200000000000000200000000000000008006c0069006e006b002e007400780074000000200000005000"
    "000068000000000000000000010050000000180000000100048014000000240000000000000034000000010200"
    "000000000520000000200200000102000000000005200000002002000002001c000100000000031400ff011f00"
    "0101000000000001000000008000000020000000000000000000020002000000180000006869ffff0000000080"
    "0000003000000000061800000005000800000028000800730065006300720065007400000000006164732064"
    "617461ffffffff00000000"
)


def record_66() -> bytearray:
    rec = bytearray(1024)
    rec[: len(RECORD_66)] = RECORD_66
    rec[1022:1024] = b"\x08\x00"
    return rec


def file_reader(path: Path) -> Callable[[int, int], bytes]:
    fd = os.open(path, os.O_RDONLY)

    def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return read


# ------------------------------------------------------------------ single records


def test_inline_record_two_names_resident_data_and_stream() -> None:
    r = FileRecord.from_bytes(bytes(record_66()), 66)
    assert r.damaged is None and r.in_use and not r.is_dir
    assert r.sequence == 1
    assert [(n.parent, n.name, n.namespace) for n in r.preferred_names()] == [
        (5, "small.txt", 0), (64, "link.txt", 0)]
    assert r.data is not None and r.data.resident and r.data.content == b"hi" and r.size == 2
    assert [(s.name, s.size, s.content) for s in r.streams] == [("secret", 8, b"ads data")]
    assert r.times is not None and r.times[0] == 0x01DD7A29168A8FC8


def test_fixup_mismatch_is_reported_not_raised() -> None:
    rec = record_66()
    rec[1022] ^= 0xFF  # a torn write: the second sector is from another generation
    r = FileRecord.from_bytes(bytes(rec), 66)
    assert r.damaged is not None and "fixup" in r.damaged


@pytest.mark.parametrize(
    ("offset", "value", "why"),
    [
        (0x38 + 4, struct.pack("<I", 0x1000), "bad length"),  # $SI length past the record
        (0x38 + 4, struct.pack("<I", 0x13), "bad length"),  # not a multiple of 8
        (0x14, struct.pack("<H", 0x3F0), "past the record"),  # first attribute near the end
        (4, struct.pack("<H", 0x3FE), "update sequence"),  # USA offset past the record
    ],
)
def test_bad_structure_is_damaged(offset: int, value: bytes, why: str) -> None:
    rec = record_66()
    rec[offset : offset + len(value)] = value
    r = FileRecord.from_bytes(bytes(rec), 66)
    assert r.damaged is not None and why in r.damaged, r.damaged


def test_free_and_blank_records() -> None:
    rec = record_66()
    rec[0x16] = 0  # flags: not in use
    r = FileRecord.from_bytes(bytes(rec), 66)
    assert not r.in_use and r.damaged is None
    assert FileRecord.from_bytes(bytes(1024), 7).damaged is None
    baad = FileRecord.from_bytes(b"BAAD" + bytes(1020), 7)
    assert baad.damaged is not None


def test_runlists() -> None:
    pairs = encode_runs([(100, 8), (None, 4), (50, 2), (400, 1)])
    runs = decode_runs(pairs)
    assert [(r.vcn, r.lcn, r.length) for r in runs] == [
        (0, 100, 8), (8, None, 4), (12, 50, 2), (14, 400, 1)]
    assert encode_runs([(100, 8)]) == bytes.fromhex("11086400")  # 1-byte length, 1-byte LCN
    assert encode_runs([(200, 8)]) == bytes.fromhex("2108c80000")  # LCN 200 needs 2 signed bytes
    with pytest.raises(Corruption):
        decode_runs(pairs, max_lcn=300)  # a run past the volume end
    with pytest.raises(Corruption):
        decode_runs(bytes.fromhex("3108"))  # truncated
    with pytest.raises(Corruption):
        decode_runs(bytes.fromhex("2108f0ff00"))  # LCN goes negative


# ------------------------------------------------------------------ real images


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("mkntfs", "ntfs-3g", "fls", "icat", "ils")
    path = tmp_path_factory.mktemp("ntfs") / "t.img"

    def populate(m: Path) -> None:
        (m / "Reports" / "2024" / "deep").mkdir(parents=True)
        (m / "Reports" / "Q3.xlsx").write_bytes(os.urandom(70_000))
        (m / "small.txt").write_text("hi")
        os.link(m / "small.txt", m / "Reports" / "link.txt")
        set_ads(m / "small.txt", "secret", b"ads data")
        (m / "A long name, with spaces and ünïcode.txt").write_bytes(b"z" * 5000)
        (m / "empty").write_bytes(b"")
        with open(m / "sparse.bin", "wb") as f:  # a hole in the middle
            f.write(b"head")
            f.seek(3 << 20)
            f.write(b"tail")
        (m / "frag-a.bin").write_bytes(b"".join(bytes([i]) * 8192 for i in range(60)))
        (m / "frag-b.bin").write_bytes(os.urandom(100_000))
        for i in range(300):
            (m / "Reports" / "2024" / "deep" / f"n{i:03d}.txt").write_text(str(i) * i)

    return make_image(path, 64 << 20, populate)


def scan(read: Callable[[int, int], bytes], base: int = 0) -> tuple[NtfsVolume, dict[int, FileRecord]]:
    nv = NtfsVolume(read, base)
    raw: dict[int, FileRecord] = {}
    for chunk in nv.scan():
        for r in chunk:
            raw[r.number] = r
    return nv, merge_extensions(raw)


def paths_of(records: dict[int, FileRecord]) -> dict[str, FileRecord]:
    res = Resolver("", records)
    out = {}
    for r in records.values():
        for e in states_of(r, "", res, 0):
            out[e.path.lstrip("/")] = r
    return out


def test_boot_sector_and_mft(image: Path) -> None:
    nv, recs = scan(file_reader(image))
    assert nv.boot.cluster_size == 4096 and nv.record_size == 1024
    assert nv.extents[0].first == 0 and nv.extents[0].offset == nv.boot.mft_lcn * 4096
    assert nv.record_count >= max(recs) + 1
    assert all(not r.damaged for r in recs.values())


def test_full_scan_matches_fls_and_ils(image: Path) -> None:
    _nv, recs = scan(file_reader(image))
    ours = paths_of(recs)
    fls = [r for r in fls_entries(image) if not r["deleted"]]
    names = {str(r["path"]): r for r in fls if r["stream"] is None and ":" not in str(r["path"])}
    # fls shows metafiles without an unnamed $DATA ($Secure, $Extend/$Quota...) only as
    # "name:$INDEX"; user files must match exactly
    assert {p for p in ours if not p.startswith("$")} == {p for p in names if not p.startswith("$")}
    assert set(names) <= set(ours)
    for p, r in names.items():
        assert ours[p].number == r["record"], p
        assert ours[p].is_dir == (r["type"] == "d"), p
    sizes = ils_allocated(image)
    for p, rec in ours.items():
        if not rec.is_dir and not p.startswith("$"):
            assert rec.size == sizes[rec.number], p
    streams = {(str(r["path"]), str(r["stream"])) for r in fls if r["stream"]}
    assert ("small.txt", "secret") in streams
    assert {(p, s.name) for p, rec in ours.items() for s in rec.streams if not p.startswith("$")} == {
        (p, s) for p, s in streams if not p.startswith("$")}


def test_stream_bytes_match_icat(image: Path) -> None:
    read = file_reader(image)
    nv, recs = scan(read)
    ours = paths_of(recs)
    for p in ("Reports/Q3.xlsx", "small.txt", "sparse.bin", "frag-a.bin", "frag-b.bin", "empty",
              "A long name, with spaces and ünïcode.txt", "Reports/2024/deep/n299.txt"):
        rec = ours[p]
        assert rec.data is not None
        icat = subprocess.run(["icat", str(image), str(rec.number)], capture_output=True, check=True).stdout
        assert_bytes_equal(nv.read_stream(rec.data), icat, p)
    sparse = ours["sparse.bin"].data
    assert sparse is not None and sparse.size == (3 << 20) + 4
    assert nv.read_stream(ours["small.txt"].streams[0]) == b"ads data"


def test_fragmented_file_matches_icat(tmp_path: Path) -> None:
    """Fill a small volume, free every other file, then write a file that can only go
    into the holes: its runlist has several runs, some with negative LCN offsets."""
    require_tool("mkntfs", "ntfs-3g", "icat")
    payload = os.urandom(400_000)

    def populate(m: Path) -> None:
        n = 0
        try:
            while True:
                (m / f"fill{n:04d}").write_bytes(b"f" * 16384)
                n += 1
        except OSError:  # full
            pass
        for i in range(0, n, 2):
            (m / f"fill{i:04d}").unlink()
        (m / "frag").write_bytes(payload)

    img = make_image(tmp_path / "frag.img", 16 << 20, populate)
    nv, recs = scan(file_reader(img))
    rec = paths_of(recs)["frag"]
    assert rec.data is not None
    runs = rec.data.runs()
    assert len(runs) > 1 and any(b.lcn is not None and a.lcn is not None and b.lcn < a.lcn
                                 for a, b in itertools.pairwise(runs))
    icat = subprocess.run(["icat", str(img), str(rec.number)], capture_output=True, check=True).stdout
    assert_bytes_equal(nv.read_stream(rec.data), payload, "our stream")
    assert_bytes_equal(icat, payload, "icat")


def test_records_in_changed_ranges(image: Path) -> None:
    nv, _ = scan(file_reader(image))
    e = nv.extents[0]
    # one 4 KiB block in the middle of the MFT holds records 4k..4k+3
    start = e.offset + 64 * 1024
    assert nv.records_in([(start, start + 4096)]) == [64, 65, 66, 67]
    assert nv.records_in([(start + 1, start + 2)]) == [64]
    assert nv.records_in([(0, 4096)]) == []  # the boot sector is not MFT


def _mbr_disk(path: Path, parts: list[tuple[Path, int]], gpt: bool = False) -> None:
    """A disk image holding the given NTFS images at the given sector offsets."""
    with open(path, "wb") as disk:
        end = max(lba * 512 + p.stat().st_size for p, lba in parts)
        disk.truncate(end + (1 << 20))
        mbr = bytearray(512)
        if gpt:
            mbr[446:462] = struct.pack("<B3sB3sII", 0, b"", 0xEE, b"", 1, 0xFFFFFFFF)
            header = bytearray(512)
            header[:92] = struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, 0,
                                      34, end // 512, bytes(16), 2, 128, 128, 0)
            disk.seek(512)
            disk.write(header)
            basic = bytes.fromhex("a2a0d0ebe5b9334487c068b6b72699c7")
            for i, (p, lba) in enumerate(parts):
                disk.seek(1024 + 128 * i)
                disk.write(struct.pack("<16s16sQQQ72s", basic, os.urandom(16), lba,
                                       lba + p.stat().st_size // 512 - 1, 0, b""))
        else:
            for i, (p, lba) in enumerate(parts):
                mbr[446 + 16 * i : 462 + 16 * i] = struct.pack(
                    "<B3sB3sII", 0, b"", 0x07, b"", lba, p.stat().st_size // 512)
        mbr[510:512] = b"\x55\xaa"
        disk.seek(0)
        disk.write(mbr)
        for p, lba in parts:
            disk.seek(lba * 512)
            disk.write(p.read_bytes())


@pytest.mark.parametrize("gpt", [False, True])
def test_partitions_each_catalogued_with_prefix(tmp_path: Path, gpt: bool) -> None:
    require_tool("mkntfs", "ntfs-3g")
    a = make_image(tmp_path / "a.img", 8 << 20, lambda m: (m / "on-a.txt").write_text("a"))
    b = make_image(tmp_path / "b.img", 8 << 20, lambda m: (m / "on-b.txt").write_text("b"))
    disk = tmp_path / "disk.img"
    _mbr_disk(disk, [(a, 2048), (b, 2048 + (16 << 20) // 512)], gpt=gpt)
    read = file_reader(disk)
    parts = find_ntfs(read, disk.stat().st_size)
    assert [(p.name, p.offset) for p in parts] == [("p1", 2048 * 512), ("p2", (1 << 20) + (16 << 20))]
    c = asyncio.run(compute(read, disk.stat().st_size, None, None, None, 0))
    paths = {e.path for plan in c.plans for e in plan.added}
    assert "/p1/on-a.txt" in paths and "/p2/on-b.txt" in paths
    assert "/p1/on-b.txt" not in paths


def test_no_ntfs(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(1 << 20))
    c = asyncio.run(compute(file_reader(blank), 1 << 20, None, None, None, 0))
    assert c.kind == "none" and "no NTFS" in c.note and not c.plans
