"""The tier service and disaster recovery against the real test RGW (no fake): sealed
segments and state go up, each batch ends with a generation manifest naming only
whole objects with their sha256; a store recovered from the bucket alone reads
byte-identical at every uploaded marker; a tampered object is refused."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.config import JournalSettings, MapSettings, Settings, TierSettings
from cdp.errors import Corruption, RemoteRefused, RemoteUnreachable, UsageError
from cdp.tier import recover
from cdp.tier.manifest import Manifest, generation_key
from cdp.tier.recover import recover_store
from cdp.tier.s3 import S3
from cdp.tier.service import TierService, newest_manifest
from cdp.volume import Volume
from tests.helpers import assert_bytes_equal
from tests.s3.fault_proxy import FaultProxy
from tests.s3.rgw import Rgw

SIZE = 8 << 20
MiB = 1 << 20


def settings(tmp: Path, url: str, **tier: object) -> Settings:
    return replace(Settings(), store=tmp / "store",
                   journal=replace(JournalSettings(), segment_bytes=1 * MiB),
                   maps=replace(MapSettings(), l0_max_writes=64, fanout=4, full_every=4),
                   tier=replace(TierSettings(url=url), **tier))  # type: ignore[arg-type]


async def _write(vol: Volume, rng: random.Random, n: int) -> None:
    for _ in range(n):
        ln = rng.choice((4096, 65536, 200_000))
        off = rng.randrange(0, SIZE - ln) & ~4095
        if rng.random() < 0.1:
            r = vol.zero(off, ln)
        else:
            half = ln // 2
            r = vol.write(off, rng.randbytes(half) + bytes(ln - half))
        if r is not None:
            await r
    await vol.flush()


def _open(tmp: Path, url: str, s3: S3) -> tuple[Volume, TierService]:
    s = settings(tmp, url)
    vol = Volume.create(tmp / "store" / "volumes" / "vol0", "vol0", SIZE, s)
    svc = TierService(vol, s.tier, s3=s3, autostart=False)
    vol.attach(svc)
    return vol, svc


def test_upload_then_recover_is_identical(tmp_path: Path, s3: S3, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/site1"

    async def go() -> None:
        vol, svc = _open(tmp_path, url, s3)
        rng = random.Random(7)
        images: dict[int, bytes] = {}
        for i in range(4):
            await _write(vol, rng, 40)
            m = await vol.snapshot(f"m{i}")
            images[m.seq] = vol.read(0, SIZE, m.seq)
        vol.journal.sync()  # seal durably everything rolled so far
        gen = await svc.upload_now()
        assert gen == 1
        man = svc.manifest
        assert man is not None and man.segments
        sealed = vol.journal.sealed_segments()
        assert [s.first_seq for s in man.segments] == [s.first_seq for s in sealed]
        assert man.last_seq == sealed[-1].last_seq
        # every named object is whole, with the sha256 the manifest says
        for key, size, sha in man.objects():
            h = s3.head(s3_bucket, key)
            assert (h.size, h.sha256) == (size, sha), key
        seg = man.segments[0]
        body = s3.get_object(s3_bucket, seg.key)
        assert hashlib.sha256(body).hexdigest() == seg.sha256
        # nothing new: no new generation; more writes: the next one
        assert await svc.upload_now() == 1
        await _write(vol, rng, 30)
        m = await vol.snapshot("late")
        images[m.seq] = vol.read(0, SIZE, m.seq)
        vol.journal.sync()
        assert await svc.upload_now() == 2
        st = svc.status()
        assert st["state"] == "idle" and st["uploaded_segments"] == len(svc.manifest.segments)
        assert st["pending_segments"] == 0 and st["last_error"] is None
        last = svc.manifest.last_seq
        vol.close()

        dest = tmp_path / "recovered"
        seen: list[int] = []
        rep = await asyncio.to_thread(recover_store, s3, url, dest,
                                      lambda d, t, w: seen.append(d))
        assert rep.volumes["vol0"]["last_seq"] == last and seen and seen[-1] == rep.bytes
        rs = settings(tmp_path / "r", url)
        rvol = Volume.open(dest / "volumes" / "vol0", replace(rs, store=dest))
        try:
            assert rvol.journal.last_seq == last
            kept = [s for s in images if s <= last]
            assert kept and [m.seq for m in rvol.markers] == kept
            for seq in kept:
                assert_bytes_equal(rvol.read(0, SIZE, seq), images[seq], f"point {seq}")
        finally:
            rvol.close()
        with pytest.raises(UsageError, match="not empty"):
            recover_store(s3, url, dest)

    asyncio.run(go())


def test_tampered_object_is_refused_by_recovery(tmp_path: Path, s3: S3, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/p"

    async def go() -> None:
        vol, svc = _open(tmp_path, url, s3)
        await _write(vol, random.Random(3), 60)
        vol.journal.sync()
        await svc.upload_now()
        assert svc.manifest is not None
        seg = svc.manifest.segments[0]
        vol.close()
        data = bytearray(s3.get_object(s3_bucket, seg.key))
        data[100] ^= 1
        s3.put_object(s3_bucket, seg.key, bytes(data))  # behind cdp's back
        with pytest.raises(Corruption, match=seg.key):
            recover_store(s3, url, tmp_path / "rec")
        # a partial recovery never looks complete: no store.json, no temporary file left
        assert not (tmp_path / "rec" / "store.json").exists()
        assert not [p for p in (tmp_path / "rec").rglob("*") if p.name.endswith(".tmp")]

    asyncio.run(go())


def test_recovery_in_small_parts_is_identical(tmp_path: Path, s3: S3, s3_bucket: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects of many parts (64 KiB ranged GETs, 8 at once: parts arrive out of order
    and are hashed in order) recover byte-identical, with progress up to every byte; a
    segment tampered in one of its middle parts is refused and nothing is installed."""
    monkeypatch.setattr(recover, "PART", 64 << 10)
    url = f"s3://{s3_bucket}/parts"

    async def go() -> tuple[dict[int, bytes], int]:
        vol, svc = _open(tmp_path, url, s3)
        rng = random.Random(11)
        images: dict[int, bytes] = {}
        for i in range(3):
            await _write(vol, rng, 40)
            m = await vol.snapshot(f"m{i}")
            images[m.seq] = vol.read(0, SIZE, m.seq)
        vol.journal.sync()
        await svc.upload_now()
        assert svc.manifest is not None
        assert max(o.size for o in svc.manifest.segments) > 8 * (64 << 10)
        last = svc.manifest.last_seq
        vol.close()
        return images, last

    images, last = asyncio.run(go())
    dest = tmp_path / "rec"
    seen: list[tuple[int, int]] = []
    rep = recover_store(s3, url, dest, lambda d, t, w: seen.append((d, t)))
    assert seen[-1] == (rep.bytes, rep.bytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    rvol = Volume.open(dest / "volumes" / "vol0", replace(settings(tmp_path / "r", url), store=dest))
    try:
        assert rvol.journal.last_seq == last
        for seq, image in images.items():
            if seq <= last:
                assert_bytes_equal(rvol.read(0, SIZE, seq), image, f"point {seq}")
    finally:
        rvol.close()

    man = newest_manifest(s3, s3_bucket, "parts/", "vol0")
    assert man is not None
    seg = max(man.segments, key=lambda o: o.size)
    data = bytearray(s3.get_object(s3_bucket, seg.key))
    data[len(data) // 2] ^= 1
    s3.put_object(s3_bucket, seg.key, bytes(data))  # behind cdp's back
    with pytest.raises(Corruption, match=seg.key):
        recover_store(s3, url, tmp_path / "rec2")
    assert not (tmp_path / "rec2" / "store.json").exists()
    left = [p.name for p in (tmp_path / "rec2").rglob("*") if p.is_file()]
    assert not [n for n in left if n.endswith(".tmp")]


def test_restart_reuses_objects_and_manifest(tmp_path: Path, s3: S3, s3_bucket: str) -> None:
    """A new service (cdpd restarted) starts from the newest manifest in the bucket and
    writes no segment key twice."""
    url = f"s3://{s3_bucket}/r"

    async def go() -> None:
        vol, svc = _open(tmp_path, url, s3)
        await _write(vol, random.Random(5), 60)
        vol.journal.sync()
        await svc.upload_now()
        sent = svc.sent_bytes
        assert sent > 0
        svc2 = TierService(vol, svc.settings, s3=s3, autostart=False)
        assert await svc2.upload_now() == 1
        assert svc2.sent_bytes == 0
        vol.close()

    asyncio.run(go())


def test_restart_reuses_unnamed_objects_found_by_listing(tmp_path: Path, s3: S3,
                                                         s3_bucket: str) -> None:
    """Segment objects a crash left unnamed (their batch's manifest never written) are
    found by one listing and reused after a HEAD each (same key, same size and
    sha256); a segment whose object is not listed is uploaded without a HEAD."""
    url = f"s3://{s3_bucket}/u"

    async def go() -> None:
        vol, svc = _open(tmp_path, url, s3)
        await _write(vol, random.Random(6), 60)
        vol.journal.sync()
        assert await svc.upload_now() == 1
        man = svc.manifest
        assert man is not None and len(man.segments) >= 2
        # the crash: no manifest (and one segment object never written)
        gone = man.segments[0]
        s3.delete_objects(s3_bucket, [generation_key("u/", "vol0", 1), gone.key])
        heads: list[str] = []

        def count(params: dict[str, object], **kw: object) -> None:
            heads.append(str(params.get("Key")))

        s3.client.meta.events.register("provide-client-params.s3.HeadObject", count)
        svc2 = TierService(vol, svc.settings, s3=s3, autostart=False)
        assert await svc2.upload_now() == 1
        assert svc2.manifest is not None
        assert [o.key for o in svc2.manifest.segments] == [o.key for o in man.segments]
        assert svc2.sent_bytes == gone.size
        assert sorted(heads) == sorted(o.key for o in man.segments[1:])
        vol.close()

    asyncio.run(go())


def test_unreachable_and_refused_states(tmp_path: Path, rgw: Rgw, s3_bucket: str,
                                        s3_fault_proxy: FaultProxy) -> None:
    url = f"s3://{s3_bucket}/f"
    bad = rgw.s3(endpoint=s3_fault_proxy.endpoint, max_attempts=2, connect_timeout=1.0,
                 read_timeout=2.0)

    async def go() -> None:
        vol, svc = _open(tmp_path, url, bad)
        rng = random.Random(9)
        await _write(vol, rng, 40)
        vol.journal.sync()
        s3_fault_proxy.set_mode("drop")
        with pytest.raises(RemoteUnreachable):
            await svc.upload_now()
        st = svc.status()
        assert st["state"] == "unreachable" and st["last_error"] and st["pending_segments"] > 0
        await _write(vol, rng, 20)  # ingest goes on
        s3_fault_proxy.set_mode("pass")
        assert await svc.upload_now() == 1
        assert svc.status()["state"] == "idle"
        vol.close()

    asyncio.run(go())
    wrong = Rgw(rgw.endpoint, rgw.access_key, "not-the-secret").s3(max_attempts=1)

    async def refused() -> None:
        vol, svc = _open(tmp_path / "2", url + "2", wrong)
        await _write(vol, random.Random(1), 40)
        vol.journal.sync()
        with pytest.raises(RemoteRefused):
            await svc.upload_now()
        assert svc.status()["state"] == "refused"
        vol.close()

    asyncio.run(refused())


def _open_segments(vol: Volume) -> int:
    """Descriptors of this process open on the volume's segment files."""
    n = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        n += str(target).startswith(str(vol.path)) and target.suffix == ".seg"
    return n


async def _until(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > end:
            return False
        await asyncio.sleep(0.05)
    return True


def test_batch_hashes_ahead_and_a_failed_or_cancelled_batch_closes_it(
        tmp_path: Path, rgw: Rgw, s3_bucket: str, s3_fault_proxy: FaultProxy) -> None:
    """A batch hashes each segment while the one before it is sent: the manifest names
    every segment in seq order all the same, and a batch that fails (store unreachable)
    or is cancelled (cdpd stopping) closes the segment it opened ahead."""
    url = f"s3://{s3_bucket}/ahead"
    bad = rgw.s3(endpoint=s3_fault_proxy.endpoint, max_attempts=1, connect_timeout=1.0,
                 read_timeout=1.0)

    async def go() -> None:
        vol, svc = _open(tmp_path, url, bad)
        await _write(vol, random.Random(11), 80)
        vol.journal.sync()
        sealed = [i.first_seq for i in vol.journal.sealed_segments()]
        assert len(sealed) >= 3
        base = _open_segments(vol)  # the journal's own (the open segment)
        s3_fault_proxy.set_mode("drop", match="PUT")
        with pytest.raises(RemoteUnreachable):
            await svc.upload_now()
        assert await _until(lambda: _open_segments(vol) == base), "a failed batch left a segment open"
        s3_fault_proxy.set_mode("delay", delay=5.0, match="PUT")
        task = asyncio.create_task(svc.upload_now())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _until(lambda: _open_segments(vol) == base), "a cancelled batch left a segment open"
        s3_fault_proxy.set_mode("pass")
        assert await svc.upload_now() >= 1
        m = svc.manifest
        assert m is not None and [o.first_seq for o in m.segments] == sealed
        assert all(a.last_seq < b.first_seq for a, b in itertools.pairwise(m.segments))
        vol.close()

    asyncio.run(go())


def test_manifest_roundtrip_and_checks(tmp_path: Path, s3: S3, s3_bucket: str) -> None:
    m = Manifest(generation=3, volume="v", volume_uuid="u", size=4096, last_seq=0,
                 created_ns=1)
    data = m.encode()
    assert Manifest.decode(data, "x") == m
    bad = data.replace(b'"size": 4096', b'"size": 8192')
    with pytest.raises(Corruption, match="checksum"):
        Manifest.decode(bad, "x")
    s3.put_object(s3_bucket, generation_key("q/", "v", 3), data)
    s3.put_object(s3_bucket, generation_key("q/", "v", 4), bad)  # damaged newest: skipped
    got = newest_manifest(s3, s3_bucket, "q/", "v")
    assert got is not None and got.generation == 3


@pytest.mark.parametrize("locked", [False, True])
def test_gc_deletes_only_unreferenced_and_never_locked(
        tmp_path: Path, s3: S3, s3_bucket: str, s3_locked_bucket: str, locked: bool) -> None:
    bucket = s3_locked_bucket if locked else s3_bucket
    url = f"s3://{bucket}/g"

    async def go() -> None:
        s = settings(tmp_path, url, object_lock_days=1 if locked else 0)
        vol = Volume.create(tmp_path / "store" / "volumes" / "vol0", "vol0", SIZE, s)
        svc = TierService(vol, s.tier, s3=s3, autostart=False)
        vol.attach(svc)
        rng = random.Random(12)
        for want in (1, 2, 3):
            while await svc.upload_now() < want:  # until a segment or a marker is new
                await _write(vol, rng, 30)
                await vol.snapshot()
                vol.journal.sync()
        assert svc.manifest is not None and svc.manifest.generation == 3
        # a stray segment object (a compaction's replaced file, a crash's leftover)
        stray = "g/volumes/vol0/segments/00000000000000000001-deadbeefdeadbeef"
        from datetime import UTC, datetime, timedelta
        s3.put_object(bucket, stray, b"old", retain_until=(datetime.now(UTC) + timedelta(days=1))
                      if locked else None)
        r = await svc.gc()
        named = {k for k, _s, _h in svc.manifest.objects()}
        for key in named:
            s3.head(bucket, key)  # every object the newest generation names is still there
        left = {o.key for o in s3.list_objects(bucket, "g/")}
        if locked:
            assert r["deleted"] == 0 and r["locked"] >= 2 and stray in left  # gen 1's state + stray
            assert svc.gc_locked == r["locked"]
        else:
            assert r["deleted"] >= 2 and r["locked"] == 0 and stray not in left
            assert not any("/state/000000000001/" in k for k in left)
        vol.close()

    asyncio.run(go())


def test_upload_after_holds_young_segments(tmp_path: Path, s3: S3, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/young"

    async def go() -> None:
        s = settings(tmp_path, url, upload_after=3600.0)
        vol = Volume.create(tmp_path / "store" / "volumes" / "vol0", "vol0", SIZE, s)
        svc = TierService(vol, s.tier, s3=s3, autostart=False)
        vol.attach(svc)
        await _write(vol, random.Random(6), 60)
        vol.journal.sync()
        assert await svc.upload_now() == 0  # every sealed segment is younger than an hour
        st = svc.status()
        assert st["pending_segments"] > 0 and st["uploaded_segments"] == 0
        assert 0 <= st["oldest_pending_age_seconds"] < 3600
        svc.settings = replace(svc.settings, upload_after=0.0)
        assert await svc.upload_now() == 1
        vol.close()

    asyncio.run(go())
