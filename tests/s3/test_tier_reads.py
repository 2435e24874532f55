"""Reads of tiered history against the real test RGW (issue 26 step 3): uploaded
segments dropped locally, every marker read byte-identical through ranged GETs and the
bounded read cache; a tiered object overwritten behind cdp's back fails the read of
what it holds (Corruption), never serves it."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from cdp.errors import Corruption
from cdp.journal import NotLocal
from cdp.journal.tiered import missing_records
from cdp.tier.s3 import S3
from cdp.tier.service import TierService
from cdp.volume import Volume
from tests.helpers import assert_bytes_equal
from tests.s3.test_tier_service import SIZE, _write, settings


def _reopen(tmp: Path, url: str, s3: S3, **tier: object) -> tuple[Volume, TierService]:
    s = settings(tmp, url, **tier)
    vol = Volume.open(tmp / "store" / "volumes" / "vol0", s)
    svc = TierService(vol, s.tier, s3=s3, autostart=False)
    vol.attach(svc)
    return vol, svc


async def _history(tmp: Path, url: str, s3: S3) -> dict[int, bytes]:
    s = settings(tmp, url)
    vol = Volume.create(tmp / "store" / "volumes" / "vol0", "vol0", SIZE, s)
    svc = TierService(vol, s.tier, s3=s3, autostart=False)
    vol.attach(svc)
    rng = random.Random(11)
    images: dict[int, bytes] = {}
    try:
        for i in range(4):
            await _write(vol, rng, 40)
            m = await vol.snapshot(f"m{i}")
            images[m.seq] = vol.read(0, SIZE, m.seq)
        vol.journal.sync()
        assert await svc.upload_now() == 1
    finally:
        vol.close()
    return images


def test_dropped_segments_read_identical(tmp_path: Path, s3: S3, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/reads"

    async def go() -> None:
        images = await _history(tmp_path, url, s3)
        vol, svc = _reopen(tmp_path, url, s3, local_cache_bytes=3 << 20)
        try:
            await svc.refresh()
            j = vol.journal
            before = j.local_bytes()
            assert svc.status()["cache_hit_ratio"] is None
            freed = svc.drop_uploaded()
            assert freed > 0 and j.local_bytes() == before - freed
            sealed = j.sealed_segments()
            assert [s.local for s in sealed] == [False] * (len(sealed) - 1) + [True]
            assert not any((vol.path / "journal" / s.name).exists() for s in sealed[:-1])
            first = min(images)
            locs = [(e.seq, e.loc) for e in vol.extents(0, SIZE, first) if e.loc >= 0]
            need = len(missing_records(j, locs, 1 << 40))  # all it needs: the cache is empty
            for seq, img in images.items():
                assert_bytes_equal(await vol.read_async(0, SIZE, seq), img, f"point {seq}")
                assert j.cache_stats()[2] <= 3 << 20  # the cache stays bounded
                if seq == first:
                    # each record it needs is fetched once, though the cache holds a
                    # fraction of them: nothing the read already used is fetched again
                    assert svc.fetched_records == need > 0, (svc.fetched_records, need)
            st = svc.status()
            assert st["local_bytes"] == j.local_bytes() and st["local_bytes"] < before
            assert st["cache_hit_ratio"] is not None and svc.fetches > 0
            # prefetch: a read's missing records come in coalesced GETs, not one each
            # (3.9 records per GET measured; records of one GET are of one segment)
            assert svc.fetched_records >= 3 * svc.fetches, (svc.fetched_records, svc.fetches)
            assert st["dropped_segments"] == len(sealed) - 1
        finally:
            vol.close()
        # the drop survives a reopen; a journal without fetcher says what to do
        vol, svc = _reopen(tmp_path, url, s3)
        try:
            vol.journal.remote = None
            seq = min(images)
            with pytest.raises(NotLocal, match="cdpctl tier status"):
                vol.read(0, SIZE, seq)
            vol.journal.remote = svc.fetch
            assert_bytes_equal(await vol.read_async(0, SIZE, seq), images[seq], "reopened")
        finally:
            vol.close()

    asyncio.run(go())


def test_tampered_tiered_object_fails_the_read(tmp_path: Path, s3: S3, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/tamper"

    async def go() -> None:
        images = await _history(tmp_path, url, s3)
        vol, svc = _reopen(tmp_path, url, s3)
        try:
            await svc.refresh()
            assert svc.manifest is not None
            seg = svc.manifest.segments[0]
            svc.drop_uploaded()
            seq = min(images)  # the first marker: the first segment's records are live there
            data = bytearray(s3.get_object(s3_bucket, seg.key))
            for i in range(4096, len(data), 4096):
                data[i] ^= 0xA5
            s3.put_object(s3_bucket, seg.key, bytes(data))  # behind cdp's back
            with pytest.raises(Corruption):
                await vol.read_async(0, SIZE, seq)
            # records of the other (intact) objects still read as before
            last = max(images)
            ok = 0
            for off in range(0, SIZE, 1 << 20):
                try:
                    got = await vol.read_async(off, 1 << 20, last)
                except Corruption:
                    continue
                assert_bytes_equal(got, images[last][off : off + (1 << 20)], f"@{off}")
                ok += 1
            assert ok > 0
        finally:
            vol.close()

    asyncio.run(go())
