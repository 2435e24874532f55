"""The tier task's waits: an upload thread waiting out a slow ``rate`` (``_Pacer``) returns
at once on ``TierService.stop()`` and sends nothing, so cdpd's shutdown never waits for
it; a busy volume's uploaded segments are dropped locally in fewer, larger steps. No S3
call is sent: a stub client answers the listing and records any PUT."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cdp.config import JournalSettings, Settings, TierSettings
from cdp.errors import CdpError
from cdp.tier.service import YIELD_RATE, TierService, _sqlite_snapshot
from cdp.volume import Volume

KiB = 1 << 10
MiB = 1 << 20


class StubS3:
    """Answers the batch's listing (an empty bucket); records any PUT."""

    def __init__(self) -> None:
        self.listed = threading.Event()
        self.puts: list[str] = []

    def list_objects(self, bucket: str, prefix: str) -> list[Any]:
        self.listed.set()
        return []

    def put_object(self, bucket: str, key: str, *args: Any, **kw: Any) -> Any:
        self.puts.append(key)
        raise AssertionError("nothing is sent after stop()")

    def put_multipart(self, bucket: str, key: str, *args: Any, **kw: Any) -> Any:
        self.puts.append(key)
        raise AssertionError("nothing is sent after stop()")


def test_a_paced_upload_stops_at_once_when_the_tier_stops(tmp_path: Path) -> None:
    # rate 4 KiB/s and 1 MiB segments: the first PUT would wait ~4 minutes for its tokens
    s = replace(Settings(), store=tmp_path / "store",
                journal=replace(JournalSettings(), segment_bytes=MiB),
                tier=TierSettings(url="s3://b/p", rate=4 * KiB))
    vol = Volume.create(tmp_path / "store" / "volumes" / "vol0", "vol0", 64 * MiB, s)
    s3 = StubS3()
    svc = TierService(vol, s.tier, s3=s3, autostart=False)  # type: ignore[arg-type]
    vol.attach(svc)

    async def main() -> None:
        for i in range(12):
            r = vol.write(i * 256 * KiB, os.urandom(256 * KiB))
            if r is not None:
                await r
        await vol.flush()
        vol.journal.sync()
        assert vol.journal.sealed_segments()
        up = asyncio.ensure_future(svc.upload_now())
        while not s3.listed.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # the upload thread hashes, then waits for its tokens
        svc.stop()
        with pytest.raises(CdpError, match="stopping"):
            # a bound only so a regression fails instead of hanging for minutes
            await asyncio.wait_for(up, 60)

    try:
        asyncio.run(main())
    finally:
        vol.close()
    assert s3.puts == []



def test_a_busy_volume_defers_dropping_uploaded_segments(tmp_path: Path) -> None:
    """While the journal appends YIELD_RATE or more, the task drops uploaded segments
    only once DROP_BUSY_BYTES of them wait; a quieter volume drops at once."""
    s = replace(Settings(), store=tmp_path / "store", tier=TierSettings(url="s3://b/p"))
    vol = Volume.create(tmp_path / "store" / "volumes" / "vol0", "vol0", 64 * MiB, s)
    svc = TierService(vol, s.tier, s3=StubS3(), autostart=False)  # type: ignore[arg-type]
    try:
        assert svc._drop_now()  # no look before: drop
        now, got = time.monotonic(), vol.journal.appended_bytes
        svc._drop_mark = (now - 1.0, got - 2 * YIELD_RATE)  # busy since the last look
        assert not svc._drop_now()  # nothing near DROP_BUSY_BYTES waits: deferred
        svc._drop_mark = (time.monotonic() - 1.0, vol.journal.appended_bytes)  # quiet
        assert svc._drop_now()
    finally:
        vol.close()


def test_catalog_snapshot_is_consistent_and_leaves_no_file(tmp_path: Path) -> None:
    """The catalog goes up as a consistent copy taken in memory: rows still in the WAL
    of an open writer are in it, and nothing is written beside the catalog."""
    db = tmp_path / "catalog.sqlite"
    w = sqlite3.connect(db)
    w.execute("pragma journal_mode=wal")
    w.execute("create table t(a integer, b blob)")
    w.executemany("insert into t values (?, ?)", [(i, os.urandom(64)) for i in range(5000)])
    w.commit()
    before = sorted(p.name for p in tmp_path.iterdir())
    snap = _sqlite_snapshot(db)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    w.close()
    assert snap is not None
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(snap)
    c = sqlite3.connect(copy)
    try:
        assert c.execute("pragma integrity_check").fetchone() == ("ok",)
        assert c.execute("select count(*), sum(a) from t").fetchone() == (5000, sum(range(5000)))
    finally:
        c.close()
