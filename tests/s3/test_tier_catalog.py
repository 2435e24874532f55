"""The file catalog over history the S3 tier dropped locally, against the real test RGW:
a marker whose records live only in the bucket is catalogued (an MFT diff on NTFS, an
inode and directory diff on ext4) with its reads planned ahead (the records each step
needs fetched in one round of coalesced GETs), not one fetch-and-rerun per record. The
test counts the GETs (``TierService.fetches``) of the same diff without the plan (one
record at a time, as before) and with it, and checks the catalogued listing."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cdp.catalog.db import CATALOG_FILE
from cdp.catalog.indexer import compute
from cdp.catalog.service import changed_to, fetching, reader_at, service_for
from cdp.journal.tiered import CACHE_DIR
from cdp.tier.s3 import S3
from cdp.tier.service import TierService
from cdp.volume import Volume
from tests.conftest import require_tool
from tests.s3.test_tier_service import settings
from tools.ext4_fixture import mkfs

MiB = 1 << 20
FS = 8 * MiB  # the file system, at the start of the volume
SIZE = 16 * MiB  # the rest: filler that rolls the segments past the markers
FILES = 240


def _ntfs_images(tmp: Path) -> tuple[bytes, bytes, set[str]]:
    """An NTFS image, and the same file system after some files were rewritten, added
    and deleted; the names in /docs afterwards."""
    from tools.ntfs_fixture import make_image, mounted

    def populate(m: Path) -> None:
        (m / "docs").mkdir()
        for i in range(FILES):
            (m / "docs" / f"f{i}.txt").write_text(f"file {i}\n" * 30)

    a = make_image(tmp / "a.img", FS, populate)
    b = tmp / "b.img"
    shutil.copyfile(a, b)
    names = {f"f{i}.txt" for i in range(FILES)}
    with mounted(b) as m:
        for i in range(0, FILES, 3):
            (m / "docs" / f"f{i}.txt").write_text(f"file {i}, second version\n" * 40)
        for i in range(1, FILES, 10):
            (m / "docs" / f"f{i}.txt").unlink()
            names.discard(f"f{i}.txt")
        for i in range(20):
            (m / "docs" / f"new{i}.txt").write_text("new\n")
            names.add(f"new{i}.txt")
    return a.read_bytes(), b.read_bytes(), names


def _ext4_images(tmp: Path) -> tuple[bytes, bytes, set[str]]:
    """As :func:`_ntfs_images` for ext4 (changed in place with debugfs: same UUID)."""
    src = tmp / "src"
    (src / "docs").mkdir(parents=True)
    for i in range(FILES):
        (src / "docs" / f"f{i}.txt").write_text(f"file {i}\n" * 30)
    a = mkfs(tmp / "a.img", FS, src)
    b = tmp / "b.img"
    shutil.copyfile(a, b)
    names = {f"f{i}.txt" for i in range(FILES)}
    new = tmp / "new.txt"
    new.write_text("new\n" * 500)
    cmds = ["cd /docs"]
    for i in range(0, FILES, 3):
        cmds += [f"rm f{i}.txt", f"write {new} f{i}.txt"]
    for i in range(1, FILES, 10):
        cmds.append(f"rm f{i}.txt")
        names.discard(f"f{i}.txt")
    for i in range(20):
        cmds.append(f"write {new} new{i}.txt")
        names.add(f"new{i}.txt")
    (tmp / "cmds").write_text("\n".join(cmds) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(tmp / "cmds"), str(b)], check=True,
                   capture_output=True, timeout=120)
    return a.read_bytes(), b.read_bytes(), names


async def _write_blocks(vol: Volume, img: bytes, old: bytes | None) -> None:
    """*img* in 4 KiB writes (one journal record each), only the blocks that differ
    from *old* (or are not zero)."""
    for off in range(0, len(img), 4096):
        blk = img[off : off + 4096]
        if (old is not None and old[off : off + 4096] == blk) or (old is None and not any(blk)):
            continue
        w = vol.write(off, blk)
        if w is not None:
            await w
    await vol.flush()


def _reopen(tmp: Path, url: str, s3: S3) -> tuple[Volume, TierService, list[int]]:
    """The volume with an empty read cache, its tier, and a list counting the rounds
    (calls of the fetcher)."""
    cache = tmp / "store" / "volumes" / "vol0" / "journal" / CACHE_DIR
    for f in cache.iterdir():
        f.unlink()
    s = settings(tmp, url, local_cache_bytes=8 * MiB)
    vol = Volume.open(tmp / "store" / "volumes" / "vol0", s)
    svc = TierService(vol, s.tier, s3=s3, autostart=False)
    vol.attach(svc)
    rounds: list[int] = []

    async def fetch(ranges: list[tuple[int, int, int]]) -> None:
        rounds.append(len(ranges))
        await svc.fetch(ranges)

    vol.journal.remote = fetch
    return vol, svc, rounds


@pytest.mark.parametrize("kind", ["ntfs", "ext4"])
def test_catalog_diff_over_dropped_history_plans_its_reads(
        tmp_path: Path, s3: S3, s3_bucket: str, kind: str) -> None:
    if kind == "ntfs":
        require_tool("mkntfs", "ntfs-3g")
        make: Callable[[Path], tuple[bytes, bytes, set[str]]] = _ntfs_images
    else:
        require_tool("mkfs.ext4", "debugfs")
        make = _ext4_images
    img0, img1, names = make(tmp_path)
    url = f"s3://{s3_bucket}/catalog-{kind}"

    async def build() -> tuple[int, int]:
        s = settings(tmp_path, url)
        vol = Volume.create(tmp_path / "store" / "volumes" / "vol0", "vol0", SIZE, s)
        svc = TierService(vol, s.tier, s3=s3, autostart=False)
        vol.attach(svc)
        try:
            await _write_blocks(vol, img0, None)
            m0 = await vol.snapshot("m0")
            c = await service_for(vol).catalog_marker(m0)  # local: a full index
            assert c is not None and c.kind == "full"
            await _write_blocks(vol, img1, img0)
            m1 = await vol.snapshot("m1")
            rng = random.Random(1)
            for off in range(FS, SIZE, 256 << 10):  # roll past the marker
                w = vol.write(off, rng.randbytes(256 << 10))
                if w is not None:
                    await w
            await vol.flush()
            vol.journal.sync()
            assert await svc.upload_now() >= 1
            assert svc.drop_uploaded() > 0
            return m0.seq, m1.seq
        finally:
            vol.close()

    async def unplanned(seq: int) -> tuple[int, int, int]:
        """The diff at *seq* as it ran before: a miss, a fetch of that record, a rerun."""
        vol, svc, rounds = _reopen(tmp_path, url, s3)
        try:
            cat = service_for(vol).catalog
            base = cat.last_version()
            c = await fetching(vol, lambda: compute(reader_at(vol, seq), vol.size, cat, base,
                                                    changed_to(vol, seq), 1))
            assert c.kind == "diff", c.note
            return svc.fetches, len(rounds), c.changed_records
        finally:
            vol.close()

    async def planned(seq: int) -> tuple[int, int, set[str]]:
        vol, svc, rounds = _reopen(tmp_path, url, s3)
        try:
            catsvc = service_for(vol)
            m1 = next(m for m in vol.markers if m.seq == seq)
            c = await catsvc.catalog_marker(m1)
            assert c is not None and c.kind == "diff", c and c.note
            gets, n = svc.fetches, len(rounds)
            view = await catsvc.view(f"@{seq}")
            listed = {e.name for e in view.list_dir("/docs")}
            return gets, n, listed
        finally:
            vol.close()

    async def full(seq: int) -> tuple[int, int, set[str]]:
        """A full index at *seq* (the catalog lost): the whole MFT or every inode table
        and directory, planned as well."""
        (tmp_path / "store" / "volumes" / "vol0" / CATALOG_FILE).unlink()
        vol, svc, rounds = _reopen(tmp_path, url, s3)
        try:
            catsvc = service_for(vol)
            c = await catsvc.catalog_marker(next(m for m in vol.markers if m.seq == seq))
            assert c is not None and c.kind == "full", c and c.note
            view = await catsvc.view(f"@{seq}")
            return svc.fetches, len(rounds), {e.name for e in view.list_dir("/docs")}
        finally:
            vol.close()

    _seq0, seq1 = asyncio.run(build())
    gets_before, rounds_before, changed = asyncio.run(unplanned(seq1))
    gets_after, rounds_after, listed = asyncio.run(planned(seq1))
    gets_full, rounds_full, listed_full = asyncio.run(full(seq1))
    print(f"{kind}: diff of {changed} changed records over dropped history: "
          f"{gets_before} GETs in {rounds_before} rounds unplanned, "
          f"{gets_after} GETs in {rounds_after} rounds planned; "
          f"full index: {gets_full} GETs in {rounds_full} rounds")
    assert listed == names and listed_full == names
    assert rounds_after <= 8 and rounds_full <= 8, (rounds_after, rounds_full)
    assert gets_after * 4 <= gets_before, (gets_before, gets_after)
