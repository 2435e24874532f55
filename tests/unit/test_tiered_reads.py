"""Reads of tiered history (issue 26 step 3) without S3: segments dropped locally, a
fetcher that serves their bytes from saved copies; every marker's image identical."""

from __future__ import annotations

import asyncio
import inspect
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cdp.config import JournalSettings, Settings
from cdp.errors import Corruption
from cdp.exports import PointInTimeDevice
from cdp.journal import NotLocal
from cdp.ops import run_op
from cdp.store import Store

MIB = 1 << 20


def _settings(tmp: Path) -> Settings:
    return replace(Settings(), store=tmp / "store", volumes=(),
                   journal=JournalSettings(segment_bytes=256 << 10))


async def _fill(store: Store) -> list[int]:
    await run_op(store, "volume_create", {"name": "v", "size": "4MiB"})
    vol = store.volume("v")
    rng = random.Random(3)
    marks = []
    for round_ in range(4):
        for _ in range(12):
            off = rng.randrange(0, 4 * MIB - 65536, 4096)
            data = rng.randbytes(rng.choice((4096, 20000, 65536))) if round_ % 2 else (
                bytes([round_ + 1]) * 8192)
            w = vol.write(off, data)
            if w is not None:
                await w
        m = await vol.snapshot(f"m{round_}")
        marks.append(m.id)
    await vol.flush()
    return marks


def _image(store: Store, tmp: Path, mark: int, name: str) -> bytes:
    out = tmp / name
    asyncio.run(run_op(store, "image", {"volume": "v", "at": f"marker{mark}",
                                        "output": str(out)}))
    return out.read_bytes()


def test_images_identical_after_drop(tmp_path: Path) -> None:
    store = Store.open(_settings(tmp_path))
    try:
        marks = asyncio.run(_fill(store))
        vol = store.volume("v")
        j = vol.journal
        jdir = tmp_path / "store" / "volumes" / "v" / "journal"
        before = {m: _image(store, tmp_path, m, f"before{m}.raw") for m in marks}
        sealed = [s for s in j.segments() if s.sealed]
        assert len(sealed) >= 3
        copies = {s.first_seq: (jdir / s.name).read_bytes() for s in sealed}
        local0 = j.local_bytes()
        for s in sealed:
            j.drop_segment(s.first_seq)
        assert j.local_bytes() < local0
        store.close()  # reopen: the journal comes back with its dropped segments
        store = Store.open(_settings(tmp_path))
        vol = store.volume("v")
        j = vol.journal
        assert j.dropped_segments() == [s.first_seq for s in sealed]
        assert j.local_bytes() < local0
        # no fetcher: a clear NotLocal naming `cdpctl tier status`, not a traceback
        with pytest.raises(NotLocal, match="cdpctl tier status"):
            _image(store, tmp_path, marks[0], "nofetch.raw")
        fetched: list[tuple[int, int, int]] = []

        async def fetch(ranges: list[tuple[int, int, int]]) -> None:
            fetched.extend(ranges)
            for first, off, n in ranges:
                j.cache_put(first, off, copies[first][off : off + n])

        j.remote = fetch
        for m in marks:
            assert _image(store, tmp_path, m, f"after{m}.raw") == before[m]
        assert fetched
        # an export read returns an awaitable on a miss, bytes when local
        j.set_cache_bytes(0)
        store.close()
        store = Store.open(_settings(tmp_path))
        vol = store.volume("v")
        j = vol.journal
        assert j.cache_stats() == (0, 0, 0)
        j.remote = fetch
        seq = vol.resolve_point(f"marker{marks[0]}")
        dev = PointInTimeDevice(vol, seq, f"marker{marks[0]}")
        got: Any = dev.read(0, 4 * MIB)
        assert inspect.isawaitable(got)
        assert asyncio.run(got) == before[marks[0]]
        assert dev.read(0, 4 * MIB) == before[marks[0]]
        assert j.cache_stats()[0] > 0
    finally:
        store.close()


def test_tampered_tier_bytes_fail_cleanly(tmp_path: Path) -> None:
    store = Store.open(_settings(tmp_path))
    try:
        marks = asyncio.run(_fill(store))
        vol = store.volume("v")
        j = vol.journal
        jdir = tmp_path / "store" / "volumes" / "v" / "journal"
        m0 = _image(store, tmp_path, marks[0], "m0.raw")
        seq0 = vol.resolve_point(f"marker{marks[0]}")
        first = next(s for s in j.segments() if s.sealed)
        assert first.last_seq >= seq0
        stored = j.read_stored(seq0 - 1)  # the last write before marker 0: live there
        bad = bytearray((jdir / first.name).read_bytes())
        at = bytes(bad).find(stored)
        assert at > 0
        bad[at + len(stored) - 7] ^= 0x5A  # the tier's object overwritten behind cdp's back
        copies = {s.first_seq: (jdir / s.name).read_bytes() for s in j.segments() if s.sealed}
        copies[first.first_seq] = bytes(bad)
        for f in copies:
            j.drop_segment(f)
        store.close()
        store = Store.open(_settings(tmp_path))
        vol = store.volume("v")
        j = vol.journal

        async def fetch(ranges: list[tuple[int, int, int]]) -> None:
            for f, off, n in ranges:
                j.cache_put(f, off, copies[f][off : off + n])

        j.remote = fetch
        with pytest.raises(Corruption):
            _image(store, tmp_path, marks[0], "m0-after.raw")
        out = tmp_path / "m0-zero.raw"
        r = asyncio.run(run_op(store, "image", {"volume": "v", "at": f"marker{marks[0]}",
                                                "output": str(out), "on_error": "zero"}))
        assert r["damaged_bytes"] > 0
        got = out.read_bytes()
        for d in r["damaged"]:
            got = got[: d["offset"]] + m0[d["offset"] : d["offset"] + d["length"]] + got[
                d["offset"] + d["length"]:]
        assert got == m0  # everything but the damaged granules is the point's data
    finally:
        store.close()


def test_catalog_of_a_marker_over_dropped_history_fetches_it(tmp_path: Path) -> None:
    """A marker taken when the NTFS metadata lives only in the tier is catalogued (the
    catalog fetches what it needs and runs again), not recorded as "no file system"."""
    from tests.conftest import require_tool
    from tools.ntfs_fixture import make_image

    require_tool("mkntfs", "ntfs-3g")

    def populate(m: Path) -> None:
        (m / "docs").mkdir()
        for i in range(20):
            (m / "docs" / f"f{i}.txt").write_text(f"file {i}\n" * 50)

    img = make_image(tmp_path / "ntfs.img", 8 * MIB, populate).read_bytes()
    settings = replace(_settings(tmp_path), journal=JournalSettings(segment_bytes=16 << 10))
    store = Store.open(settings)
    try:
        async def fill() -> None:
            await run_op(store, "volume_create", {"name": "v", "size": "8MiB"})
            vol = store.volume("v")
            for off in range(0, len(img), 256 << 10):
                w = vol.write(off, img[off : off + (256 << 10)])
                if w is not None:
                    await w
            await vol.snapshot("before")
            await vol.flush()

        asyncio.run(fill())
        vol = store.volume("v")
        j = vol.journal
        jdir = tmp_path / "store" / "volumes" / "v" / "journal"
        sealed = [s for s in j.segments() if s.sealed]
        assert sealed
        copies = {s.first_seq: (jdir / s.name).read_bytes() for s in sealed}
        for s in sealed:
            j.drop_segment(s.first_seq)
        store.close()  # reopen: no descriptor of a dropped file is left open
        store = Store.open(settings)
        vol = store.volume("v")
        j = vol.journal
        fetched: list[tuple[int, int, int]] = []

        async def fetch(ranges: list[tuple[int, int, int]]) -> None:
            fetched.extend(ranges)
            for first, off, n in ranges:
                j.cache_put(first, off, copies[first][off : off + n])

        j.remote = fetch

        async def mark_and_list() -> Any:
            await vol.snapshot("after")
            from cdp.catalog.service import service_for

            svc = service_for(vol)
            await svc.idle()
            assert svc.last_error is None, svc.last_error
            return await run_op(store, "files", {"volume": "v", "at": "after",
                                                 "path": "/docs"})

        r = asyncio.run(mark_and_list())
        assert sorted(e["name"] for e in r["entries"]) == sorted(f"f{i}.txt" for i in range(20))
        assert r["from_catalog"] and fetched
    finally:
        store.close()
