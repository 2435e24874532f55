"""Proxy mode without a network: a ProxyVolume over a primary file. Initial copy (with
concurrent host writes), write ordering, DRL marking and lazy cleaning, primary and
journal failures, crash reconciliation, rewind of the primary."""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cdp.config import MapSettings, RetentionSettings, Settings, VolumeSpec
from cdp.errors import Corruption, StoreFull
from cdp.journal import RecordKind
from cdp.proxy.base import ERR_CRASH_RECONCILE, ERR_JOURNAL_GAP, ERR_PRIMARY_WRITE
from cdp.proxy.drl import read_drl
from cdp.proxy.primary import FilePrimary
from cdp.proxy.volume import CLEAN_IDLE_TICKS, ProxyVolume
from cdp.store import Store
from cdp.volume import Volume
from tests.helpers import assert_bytes_equal

MiB = 1 << 20
SIZE = 8 * MiB
REGION = 256 << 10


def settings(tmp: Path) -> Settings:
    return replace(
        Settings(),
        store=tmp / "store",
        maps=replace(MapSettings(), l0_max_writes=64, fanout=4, full_every=4),
        volumes=(),
    )


def make_primary(path: Path, size: int = SIZE, seed: int = 0, fill: float = 0.5) -> bytearray:
    """A primary with random data in about *fill* of its 64 KiB pieces (rest zeros)."""
    rng = random.Random(seed)
    model = bytearray(size)
    for p in range(0, size, 64 << 10):
        if rng.random() < fill:
            model[p : p + (64 << 10)] = rng.randbytes(64 << 10)
    path.write_bytes(model)
    return model


async def live_read(vol: Volume, offset: int, length: int) -> bytes:
    """vol.read of the live volume: bytes at once (a proxy volume's page-cache hit) or
    an awaitable (anything else), as the BlockDevice contract allows."""
    r = vol.read(offset, length)
    if inspect.isawaitable(r):
        r = await r
    return bytes(r)


def journal_image(vol: Volume, seq: int | None = None) -> bytes:
    return Volume.read(vol, 0, vol.size, seq)


async def drive(vol: Volume, model: bytearray, rng: random.Random, n: int, conc: int = 16) -> None:
    """n random writes/zeroes, up to *conc* in flight, each in its own 16 KiB slot:
    concurrent overlapping writes have no defined order (NBD), so the model could not
    predict them (test_overlapping_writes_... checks that both sides agree on one)."""
    sem = asyncio.Semaphore(conc)
    slots = rng.sample(range(vol.size // 16384), n)

    async def one() -> None:
        async with sem:
            off = slots.pop() * 16384 + rng.choice([0, 512, 4096])
            ln = rng.choice([512, 4096, 8192, 3 * 4096 - 512]) if off % 16384 else 16384
            if rng.random() < 0.1:
                model[off : off + ln] = bytes(ln)
                r = vol.zero(off, ln)
            else:
                data = rng.randbytes(ln)
                model[off : off + ln] = data
                r = vol.write(off, data)
            if r is not None:
                await r

    # the model is updated in submission order = journal order (same event loop step)
    await asyncio.gather(*(one() for _ in range(n)))


def open_store(tmp: Path) -> Store:
    return Store.open(settings(tmp))


def create_proxy_volume(store: Store, name: str, size: int, primary: str, **kw: Any) -> ProxyVolume:
    """A proxy volume over *primary* (keyword arguments: the VolumeSpec's proxy keys)."""
    vol = store.create_volume(VolumeSpec(name, size, "proxy", primary, **kw))
    assert isinstance(vol, ProxyVolume)
    return vol


def test_initial_copy_then_io_keeps_primary_and_journal_equal(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    model = make_primary(prim)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), drl_region=REGION)
        assert isinstance(vol, ProxyVolume) and vol.size == SIZE
        seen: list[tuple[int, int]] = []
        copied = await vol.wait_initial_copy(lambda d, t, w: seen.append((d, t)))
        assert seen and seen[-1] == (SIZE, SIZE)
        assert 0 < copied <= SIZE
        init_seq = vol.head_seq
        assert_bytes_equal(journal_image(vol), bytes(model))
        kinds = {r.kind for r in vol.journal.scan()}
        assert kinds == {RecordKind.INIT}
        rng = random.Random(5)
        await drive(vol, model, rng, 300)
        await vol.flush()
        assert_bytes_equal(prim.read_bytes(), bytes(model))
        assert_bytes_equal(journal_image(vol), bytes(model))
        assert_bytes_equal(await live_read(vol, 4096, 8192), bytes(model[4096 : 4096 + 8192]))
        # time zero is still the original primary
        assert journal_image(vol, init_seq) != bytes(model)
        st = vol.status()
        assert st["mode"] == "proxy" and st["proxy"]["initial_copy"]["done"]
        assert st["proxy"]["drl"]["dirty_regions"] > 0
        # the cleaner clears regions once both sides are durable
        vol._last_clean = 0
        vol._kick()  # regions written this tick are not idle yet
        while "clean" in vol._bg:
            await asyncio.sleep(0.01)
        assert vol.drl.dirty_count > 0
        vol._tick_no += CLEAN_IDLE_TICKS + 1
        vol._last_clean = 0
        vol._kick()
        while "clean" in vol._bg:
            await asyncio.sleep(0.01)
        await vol._drl_commit_all()
        assert vol.drl.dirty_count == 0
        assert read_drl(vol.path / "drl")["dirty"] == []
        store.close()

    asyncio.run(main())


def test_host_writes_during_initial_copy_are_neither_lost_nor_overwritten(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    model = make_primary(prim, fill=1.0, seed=3)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), drl_region=64 << 10,
                                  copy_rate=16 * MiB)  # ~0.5 s: host writes land meanwhile
        copy = asyncio.get_running_loop().create_task(vol.wait_initial_copy())
        await asyncio.sleep(0.05)
        rng = random.Random(9)
        await drive(vol, model, rng, 200, conc=8)
        await copy
        assert vol.status()["proxy"]["initial_copy"]["done"]
        assert_bytes_equal(journal_image(vol), bytes(model))
        await vol.flush()
        assert_bytes_equal(prim.read_bytes(), bytes(model))
        # every INIT of a region precedes the host writes into it
        first_write: dict[int, int] = {}
        for rec in vol.journal.scan():
            r = rec.offset // (64 << 10)
            if rec.kind in (RecordKind.WRITE, RecordKind.ZERO):
                first_write.setdefault(r, rec.seq)
            elif rec.kind == RecordKind.INIT:
                assert r not in first_write or first_write[r] > rec.seq
        store.close()

    asyncio.run(main())


def test_no_initial_copy_time_zero_reads_zeros(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        assert await vol.wait_initial_copy() == 0
        await vol.write(MiB, b"x" * 4096)
        assert vol.head_seq == 1
        assert Volume.read(vol, 0, 8192, 0) == bytes(8192)
        assert await live_read(vol, MiB, 4096) == b"x" * 4096
        store.close()

    asyncio.run(main())


def test_overlapping_writes_reach_the_primary_in_journal_order(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        # many writers hammer the same 64 KiB with different patterns, all in flight
        aws = []
        for i in range(64):
            off = (i % 7) * 4096
            aws.append(vol.write(off, bytes([i]) * 32768))
        await asyncio.gather(*aws)
        await vol.flush()
        assert_bytes_equal(prim.read_bytes()[:65536], journal_image(vol)[:65536])
        store.close()

    asyncio.run(main())


def test_contiguous_writes_of_one_turn_are_one_pwritev_in_journal_order(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        await vol.write(0, b"w" * 4096)  # the region's DRL bit: durable from now on
        calls: list[tuple[str, int, int]] = []
        p = vol.primary
        assert isinstance(p, FilePrimary)
        real_pwrite, real_pwritev = p.pwrite, p.pwritev

        def pwrite(data: bytes, offset: int) -> None:
            calls.append(("pwrite", offset, len(data)))
            real_pwrite(data, offset)

        def pwritev(bufs: list[bytes], offset: int) -> None:
            calls.append(("pwritev", offset, sum(len(b) for b in bufs)))
            real_pwritev(bufs, offset)

        p.pwrite, p.pwritev = pwrite, pwritev  # type: ignore[method-assign]
        # one turn: a run of 8 writes that continue each other, then an overlapping
        # write, then one elsewhere; nothing awaited before all are submitted
        aws = [vol.write(i * 4096, bytes([i + 1]) * 4096) for i in range(8)]
        aws.append(vol.write(2048, b"o" * 4096))
        aws.append(vol.write(100 * 4096, b"e" * 4096))
        assert all(not asyncio.iscoroutine(a) for a in aws)  # the fast path: futures
        await asyncio.gather(*[a for a in aws if a is not None])
        assert calls == [("pwritev", 0, 8 * 4096), ("pwrite", 2048, 4096), ("pwrite", 100 * 4096, 4096)]
        await vol.flush()
        assert_bytes_equal(prim.read_bytes(), journal_image(vol))
        assert prim.read_bytes()[2048:6144] == b"o" * 4096  # the later write won on both sides
        store.close()

    asyncio.run(main())


def test_fua_writes_are_durable_on_both_sides_one_flush_per_batch(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        await vol.write(0, b"w" * 4096)
        p = vol.primary
        assert isinstance(p, FilePrimary)
        flushes: list[int] = []
        real_flush = p.flush

        def flush() -> None:
            flushes.append(1)
            real_flush()

        p.flush = flush  # type: ignore[method-assign]
        aws = [vol.write(i * 8192, b"f" * 4096, fua=True) for i in range(4)]
        await asyncio.gather(*[a for a in aws if a is not None])
        assert flushes == [1]  # the four FUA writes of one turn: one primary flush
        assert vol.journal.durable_seq == vol.head_seq  # and their records are durable
        store.close()

    asyncio.run(main())


def test_live_reads_from_the_page_cache_answer_at_once_else_through_threads(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    model = make_primary(prim, seed=9, fill=1.0)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        assert vol.read(MiB, 4096) == model[MiB : MiB + 4096]  # read once: now cached
        r = vol.read(MiB, 4096)
        assert isinstance(r, bytes) and r == model[MiB : MiB + 4096]
        fd = os.open(prim, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the cached pages
            assert isinstance(vol.primary, FilePrimary)
            assert vol.primary.pread_cached(3 * MiB, 4096) is None  # a miss, as wanted
        finally:
            os.close(fd)
        assert await live_read(vol, 3 * MiB + 100, 70000) == model[3 * MiB + 100 : 3 * MiB + 70100]
        store.close()

    asyncio.run(main())


def test_primary_read_error_is_eio_and_counted(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        flaky = FlakyPrimary(vol.primary)
        vol.primary = flaky  # type: ignore[assignment]
        flaky.fail = True
        with pytest.raises(Corruption, match="primary read failed"):
            await live_read(vol, 4096, 4096)
        assert vol.status()["proxy"]["primary_errors"] == 1
        flaky.fail = False
        assert await live_read(vol, 4096, 4096) == bytes(4096)
        store.close()

    asyncio.run(main())


class FlakyPrimary:
    """Wraps a primary: pwrite and pread fail with EIO while ``fail`` is set."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fail = False
        self.size = inner.size
        self.kind = "flaky"

    def pwrite(self, data: bytes, offset: int) -> None:
        if self.fail:
            raise OSError(errno.EIO, "injected")
        self.inner.pwrite(data, offset)

    def pread(self, offset: int, length: int) -> bytes:
        if self.fail:
            raise OSError(errno.EIO, "injected")
        return bytes(self.inner.pread(offset, length))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_primary_write_error_is_eio_with_error_record_and_catch_up(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    model = make_primary(prim, seed=4)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), drl_region=REGION)
        await vol.wait_initial_copy()
        flaky = FlakyPrimary(vol.primary)
        vol.primary = flaky  # type: ignore[assignment]
        flaky.fail = True
        with pytest.raises(Corruption):
            await vol.write(1000 * 512, b"y" * 8192)
        flaky.fail = False
        errs = [r for r in vol.journal.scan() if r.kind == RecordKind.ERROR]
        assert errs and errs[0].error_code == ERR_PRIMARY_WRITE
        assert vol.status()["proxy"]["catchup_pending_regions"] == 1
        await vol._catchup_run()
        assert vol.status()["proxy"]["catchup_pending_regions"] == 0
        assert_bytes_equal(journal_image(vol), bytes(model), "journal")
        assert_bytes_equal(prim.read_bytes(), bytes(model), "primary")
        store.close()

    asyncio.run(main())


def test_journal_failure_acks_primary_degrades_and_catches_up(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    model = make_primary(prim, seed=6)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), drl_region=REGION)
        await vol.wait_initial_copy()
        real = vol.journal.append_write

        def full(*a: Any, **k: Any) -> Any:
            raise StoreFull("journal: no space left (test)")

        vol.journal.append_write = full  # type: ignore[method-assign]
        data = b"z" * 16384
        await vol.write(2 * MiB, data)  # acknowledged: the primary has it
        model[2 * MiB : 2 * MiB + 16384] = data
        st = vol.status()["proxy"]
        assert st["degraded"] and st["journal_errors"] == 1 and st["catchup_pending_regions"] == 1
        assert vol.block_status(0, SIZE) == [(SIZE, 0)]
        assert_bytes_equal(prim.read_bytes(), bytes(model))
        assert journal_image(vol) != bytes(model)
        await vol._catchup_run()  # still full: stays degraded
        assert vol.status()["proxy"]["degraded"]
        vol.journal.append_write = real  # type: ignore[method-assign]
        await vol._catchup_run()
        st = vol.status()["proxy"]
        assert not st["degraded"] and st["catchup_pending_regions"] == 0
        assert_bytes_equal(journal_image(vol), bytes(model))
        gap = [r for r in vol.journal.scan() if r.kind == RecordKind.ERROR]
        assert gap[-1].error_code == ERR_JOURNAL_GAP and gap[-1].offset == 2 * MiB
        store.close()

    asyncio.run(main())


def test_ack_both_fails_the_host_when_the_journal_fails(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), ack="both", initial_copy=False)
        await vol.write(0, b"a" * 4096)
        assert vol.journal.durable_seq == vol.head_seq  # "both": durable before the reply

        async def broken() -> None:
            raise StoreFull("journal: no space left (test)")

        vol.journal.commit = broken  # type: ignore[method-assign]
        with pytest.raises(StoreFull):
            await vol.write(4096, b"b" * 4096)
        store.close()

    asyncio.run(main())


def crash(vol: ProxyVolume) -> None:
    """Drop the volume without any of close()'s work (a kill -9 after the OS has the
    bytes handed to it so far)."""
    vol.journal._flush()
    for t in list(vol._bg.values()):
        t.cancel()
    vol._stop_workers()
    os.close(vol.journal._fd)
    assert vol.primary is not None
    vol.primary.close()
    vol.drl.close()
    vol.maps.close()


def test_crash_reconcile_primary_wins_and_drl_is_clean(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    model = make_primary(prim, seed=8)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), drl_region=REGION)
        assert isinstance(vol, ProxyVolume)
        await vol.wait_initial_copy()
        await drive(vol, model, random.Random(2), 100)
        await vol.flush()
        # writes the journal never got (lost from its buffer in the crash)
        vol.primary.pwrite(b"L" * 70000, 3 * MiB + 100)  # type: ignore[union-attr]
        vol.drl.mark(vol.drl.regions_of(3 * MiB + 100, 70000))
        vol.drl.sync()
        model[3 * MiB + 100 : 3 * MiB + 70100] = b"L" * 70000
        dirty = vol.drl.dirty_count
        crash(vol)
        os.close(store._lock_fd)  # the dead process's lock goes with it
        store._lock_fd = -1
        store.volumes.clear()

        store2 = open_store(tmp_path)
        v2 = store2.volume("p")
        assert isinstance(v2, ProxyVolume)
        rep = v2.status()["proxy"]["reconcile"]
        assert rep["dirty_regions"] == dirty and rep["differing_regions"] >= 1
        assert rep["direction"] == "primary->journal"
        assert v2.drl.dirty_count == 0 and read_drl(v2.path / "drl")["dirty"] == []
        assert_bytes_equal(journal_image(v2), bytes(model), "journal")
        assert_bytes_equal(prim.read_bytes(), bytes(model), "primary")
        assert v2.journal.durable_seq == v2.head_seq
        errs = [r for r in v2.journal.scan() if r.kind == RecordKind.ERROR]
        assert errs and all(e.error_code == ERR_CRASH_RECONCILE for e in errs)
        store2.close()

    asyncio.run(main())


def test_rewind_rewrites_only_differing_bytes_and_reads_see_target(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    model = make_primary(prim, seed=10)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), drl_region=REGION)
        await vol.wait_initial_copy()
        await drive(vol, model, random.Random(1), 50)
        m = await vol.snapshot("mid")
        target = bytes(model)
        await drive(vol, model, random.Random(2), 50)
        await vol.flush()
        steps: list[int] = []
        seq = await vol.rewind(m.seq, progress=lambda d, t, w: steps.append(d))
        assert seq == vol.head_seq and steps
        assert_bytes_equal(prim.read_bytes(), target)
        assert_bytes_equal(await live_read(vol, 0, SIZE), target)
        st = vol.status()["proxy"]["rewind"]
        assert st["finished"] and 0 < st["rewritten"] <= st["total"]
        # and rewind the rewind
        await vol.rewind(seq - 1)
        assert_bytes_equal(prim.read_bytes(), bytes(model))
        store.close()

    asyncio.run(main())


def test_interrupted_rewind_is_completed_at_open(tmp_path: Path) -> None:
    prim = tmp_path / "primary.img"
    model = make_primary(prim, seed=12)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), drl_region=REGION)
        assert isinstance(vol, ProxyVolume)
        await vol.wait_initial_copy()
        m = await vol.snapshot("before")
        target = bytes(model)
        await drive(vol, model, random.Random(3), 60)
        await vol.flush()

        async def boom(start: int, end: int) -> int:
            raise asyncio.CancelledError  # the process dies mid-rewrite

        vol._rewrite = boom  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await vol.rewind(m.seq)
        assert vol.drl.rewind_from
        crash(vol)
        os.close(store._lock_fd)
        store._lock_fd = -1
        store.volumes.clear()
        store2 = open_store(tmp_path)
        v2 = store2.volume("p")
        assert v2.status()["proxy"]["reconcile"]["direction"].startswith("journal->primary")
        assert_bytes_equal(prim.read_bytes(), target, "primary")
        assert_bytes_equal(journal_image(v2), target, "journal")
        store2.close()

    asyncio.run(main())


def proxy_settings(tmp: Path, prim: Path, **retention: Any) -> Settings:
    """One proxy volume "p" over *prim* (no initial copy), created at Store.open."""
    return replace(settings(tmp), volumes=(VolumeSpec("p", 0, "proxy", str(prim), initial_copy=False),),
                   retention=replace(RetentionSettings(), **retention))


def test_proxy_writes_seal_in_the_background_not_on_the_loop(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of host writes past l0_max_writes seals the live window as a mirror volume
    does (a task waits for the journal's group commit, then seals): the write path never
    runs the blocking Volume.seal, whose journal fdatasync would stall the event loop."""
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))
    blocking: list[int] = []
    real_seal = Volume.seal

    def seal(self: Volume) -> None:
        blocking.append(self.head_seq)
        real_seal(self)

    async def main() -> None:
        s = proxy_settings(tmp_path, prim)
        store = Store.open(s)
        vol = store.volume("p")
        l0 = s.maps.l0_max_writes
        monkeypatch.setattr(Volume, "seal", seal)
        rng = random.Random(4)
        for _ in range(2 * l0 + l0 // 2):  # never 4 windows behind: no fallback to a blocking seal
            await vol.write(rng.randrange(SIZE // 4096) * 4096, rng.randbytes(4096))
        await vol.flush()
        for _ in range(1000):
            if vol.maps.sealed_seq >= l0:
                break
            await asyncio.sleep(0.01)
        assert vol.maps.sealed_seq >= l0  # sealed, in the background
        assert blocking == []
        monkeypatch.undo()
        store.close()

    asyncio.run(main())


def test_refuse_mode_store_cap_refuses_proxy_host_writes(tmp_path: Path) -> None:
    """docs/RETENTION.md: with on_full = "refuse" host writes fail with StoreFull (ENOSPC)
    while the store is over its cap, in proxy mode too (as test_retention checks for a
    mirror volume); a refused write reaches neither the journal nor the primary."""
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))

    async def main() -> None:
        store = Store.open(proxy_settings(tmp_path, prim, max_store_bytes=2 << 20, on_full="refuse"))
        vol = store.volume("p")
        rng = random.Random(1)
        with pytest.raises(StoreFull):
            for i in range(2000):
                await vol.write((i % 64) * 4096, rng.randbytes(4096))
        n = vol.head_seq
        with pytest.raises(StoreFull):
            await vol.write(SIZE - 4096, b"R" * 4096)
        assert vol.head_seq == n  # not journalled
        await vol.flush()
        assert prim.read_bytes()[SIZE - 4096:] == bytes(4096)  # not on the primary either
        assert journal_image(vol) == prim.read_bytes()
        store.close()

    asyncio.run(main())
