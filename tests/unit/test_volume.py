"""Volume = journal + map history + markers, without a network: reads at any point equal
a replayed model, across seals, reopen (replay of unsealed records), rewinds."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.config import MapSettings, Settings
from cdp.errors import Corruption, NotFound, OutOfRange, PointError, UsageError
from cdp.journal import NotLocal
from cdp.store import Store
from cdp.volume import Volume

SIZE = 1 << 20


def settings(tmp: Path, l0: int = 16) -> Settings:
    return replace(
        Settings(),
        store=tmp / "store",
        maps=replace(MapSettings(), l0_max_writes=l0, fanout=4, full_every=4),
    )


async def _drive(vol: Volume, rng: random.Random, model: bytearray, n: int) -> None:
    for _ in range(n):
        off = rng.randrange(0, SIZE - 8192)
        ln = rng.randrange(1, 8192)
        if rng.random() < 0.1:
            r = vol.zero(off, ln)
            model[off : off + ln] = bytes(ln)
        else:
            data = rng.randbytes(ln)
            r = vol.write(off, data)
            model[off : off + ln] = data
        if r is not None:
            await r


def test_reads_match_model_at_every_marker_and_after_reopen(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path)
        vol = Volume.create(tmp_path / "v", "v", SIZE, s)
        rng = random.Random(1)
        model = bytearray(SIZE)
        snaps: list[tuple[int, bytes]] = []
        for _ in range(5):
            await _drive(vol, rng, model, 40)
            m = await vol.snapshot()
            snaps.append((m.id, bytes(model)))
        await _drive(vol, rng, model, 7)  # unsealed tail: replayed at reopen
        await vol.flush()
        assert vol.read(0, SIZE) == bytes(model)
        for mid, img in snaps:
            assert vol.read(0, SIZE, vol.resolve_point(f"marker{mid}")) == img
        vol.journal.sync()
        # simulate a crash: do not close (no final seal); reopen from disk
        vol.maps.close()
        vol.journal.close()
        vol2 = Volume.open(tmp_path / "v", s)
        assert vol2.read(0, SIZE) == bytes(model)
        for mid, img in snaps:
            assert vol2.read(0, SIZE, vol2.resolve_point(f"marker{mid}")) == img
        assert [m.id for m in vol2.markers] == [1, 2, 3, 4, 5]
        vol2.close()

    asyncio.run(main())


def test_rewind_chain(tmp_path: Path) -> None:
    async def main() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path))
        vol.write(0, b"a" * 4096)
        s_a = vol.head_seq
        vol.write(0, b"b" * 4096)
        s_b = vol.head_seq
        await vol.rewind(s_a)
        assert vol.read(0, 4096) == b"a" * 4096
        vol.write(4096, b"c" * 4096)
        r2 = await vol.rewind(s_b)  # back to before the first rewind
        assert vol.read(0, 8192) == b"b" * 4096 + bytes(4096)
        await vol.rewind(r2 - 1)  # undo the second rewind
        assert vol.read(0, 8192) == b"a" * 4096 + b"c" * 4096
        vol.close()
        vol = Volume.open(tmp_path / "v", settings(tmp_path))
        assert vol.read(0, 8192) == b"a" * 4096 + b"c" * 4096
        vol.close()

    asyncio.run(main())


def test_points_and_errors(tmp_path: Path) -> None:
    async def main() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path))
        with pytest.raises(PointError, match="before the first write"):
            vol.resolve_point("-1s")
        vol.write(0, b"x" * 512)
        t_mid = time.time_ns()
        await asyncio.sleep(0.01)
        vol.write(0, b"y" * 512)
        m = await vol.snapshot("after-y")
        assert vol.resolve_point("after-y") == m.seq
        assert vol.resolve_point(f"@{m.seq}") == m.seq
        assert vol.read(0, 512, vol.resolve_point(f"@{vol.resolve_point('now')}")) == b"y" * 512
        # a time resolves to the last record at or before it
        from datetime import datetime

        iso = datetime.fromtimestamp(t_mid / 1e9).isoformat()
        assert vol.read(0, 512, vol.resolve_point(iso)) == b"x" * 512
        with pytest.raises(NotFound, match="no marker7"):
            vol.resolve_point("marker7")
        with pytest.raises(NotFound, match="labelled 'nope'"):
            vol.resolve_point("nope")
        with pytest.raises(PointError, match="after now"):
            vol.resolve_point("@999")
        with pytest.raises(PointError, match="in the future"):
            vol.resolve_point("2999-01-01T00:00")
        with pytest.raises(PointError, match="before the first write"):
            vol.resolve_point("2001-01-01T00:00")
        with pytest.raises(OutOfRange):
            vol.read(SIZE - 10, 20)
        with pytest.raises(OutOfRange):
            vol.write(SIZE, b"z")
        with pytest.raises(UsageError):
            await vol.snapshot("marker3")
        vol.close()

    asyncio.run(main())


def test_store_lock_and_default_volumes(tmp_path: Path) -> None:
    from cdp.errors import StoreLocked

    s = settings(tmp_path)
    st = Store.open(s)
    assert list(st.volumes) == ["vol0"] and st.volumes["vol0"].size == 10 << 30
    with pytest.raises(StoreLocked, match="in use"):
        Store.open(s)
    st.close()
    st2 = Store.open(s)
    assert list(st2.volumes) == ["vol0"]
    st2.close()


def test_pause_holds_writes(tmp_path: Path) -> None:
    async def main() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path))
        vol.pause()
        r = vol.write(0, b"p" * 512)
        assert r is not None
        task = asyncio.ensure_future(r)
        await asyncio.sleep(0.05)
        assert not task.done() and vol.read(0, 512) == bytes(512)
        vol.resume()
        await task
        assert vol.read(0, 512) == b"p" * 512
        vol.close()

    asyncio.run(main())


def test_maps_never_name_records_the_journal_could_lose(tmp_path: Path) -> None:
    """Seals wait for the journal's group commit and seal only what it made durable;
    writes keep flowing meanwhile (no blocking sync on the I/O path)."""

    async def main() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path, l0=16))
        rng = random.Random(5)
        model = bytearray(SIZE)
        for i in range(400):
            await _drive(vol, rng, model, 1)
            assert vol.maps.sealed_seq <= vol.journal.durable_seq
            if i % 7 == 0:
                await asyncio.sleep(0)
        for _ in range(200):
            if vol._seal_task is None:
                break
            await asyncio.sleep(0.01)
        assert 0 < vol.maps.sealed_seq <= vol.journal.durable_seq
        assert vol.read(0, SIZE) == bytes(model)
        vol.close()

    asyncio.run(main())


def test_point_in_time_reads_use_resolved_regions_and_stay_exact(tmp_path: Path) -> None:
    """Reads of a past point are answered from a resolved 64 MiB region (bisect) and give
    exactly what the map hierarchy gives, also for unaligned and region-spanning reads."""

    async def main() -> None:
        vol = Volume.create(tmp_path / "v", "v", 128 << 20, settings(tmp_path, l0=32))
        rng = random.Random(9)
        model = bytearray(128 << 20)
        for _ in range(300):
            off = rng.randrange(0, (128 << 20) - 70000)
            ln = rng.randrange(1, 70000)
            data = rng.randbytes(ln)
            vol.write(off, data)
            model[off : off + ln] = data
        m = await vol.snapshot()
        snap = bytes(model)
        for _ in range(50):  # history moves on; the view must not
            off = rng.randrange(0, (128 << 20) - 4096)
            vol.write(off, b"\xee" * 4096)
        for _ in range(300):
            off = rng.randrange(0, (128 << 20) - 9000)
            ln = rng.randrange(1, 9000)
            assert vol.read(off, ln, m.seq) == snap[off : off + ln]
        assert vol.view_regions.used > 0
        edge = (64 << 20) - 100  # crosses the region boundary: resolved directly
        assert vol.read(edge, 200, m.seq) == snap[edge : edge + 200]
        vol.close()

    asyncio.run(main())


def test_sequential_small_live_reads_read_ahead_and_stay_exact(tmp_path: Path) -> None:
    """Issue 28's pipelined row: 1 KiB reads in order read the journal about once per
    64 KiB record chunk (not once per read), and stay exact while writes, zeroes and a rewind
    land between them, right ahead of the reader included."""
    async def main() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path, l0=64))
        rng = random.Random(7)
        model = bytearray(SIZE)
        big = rng.randbytes(SIZE // 2)
        vol.write(0, big)
        model[: SIZE // 2] = big
        for off in range(SIZE // 2, SIZE // 2 + 64 * 4096, 4096):  # records of 4 KiB
            d = rng.randbytes(4096)
            vol.write(off, d)
            model[off : off + 4096] = d
        vol.zero(SIZE // 2 + 70 * 4096, 3000)  # then a zeroed range and a hole
        model[SIZE // 2 + 70 * 4096 :][:3000] = bytes(3000)
        calls = 0
        real = vol.journal.read_slice

        def counting(*a: object, **k: object) -> bytes:
            nonlocal calls
            calls += 1
            return real(*a, **k)  # type: ignore[arg-type]

        vol.journal.read_slice = counting  # type: ignore[method-assign]
        for off in range(0, SIZE // 2, 1024):
            assert vol.read(off, 1024) == model[off : off + 1024]
        # the window grows 4, 8, ... 64 KiB: then one read per 64 KiB chunk, not 512 in all
        assert calls <= 2 * (SIZE // 2 // (64 << 10))
        calls = 0
        for off in range(SIZE // 2, SIZE // 2 + 64 * 4096, 1024):
            assert vol.read(off, 1024) == model[off : off + 1024]
        assert calls <= 64 + 1  # one per 4 KiB record, not 256
        mark = vol.head_seq
        before = bytes(model)
        # writes between reads: every read equals the model of its moment
        for off in range(0, SIZE - 1024, 1024):
            if rng.random() < 0.05:
                w = min(SIZE - 1, off + rng.randrange(0, 8192))
                ln = min(rng.randrange(1, 4096), SIZE - w)
                if rng.random() < 0.3:
                    vol.zero(w, ln)
                    model[w : w + ln] = bytes(ln)
                else:
                    d = rng.randbytes(ln)
                    vol.write(w, d)
                    model[w : w + ln] = d
            assert vol.read(off, 1024) == model[off : off + 1024], off
        await vol.rewind(mark)
        for off in range(0, SIZE, 1024):
            assert vol.read(off, 1024) == before[off : off + 1024], off
        assert vol.reads == 2 * (SIZE // 1024) + (SIZE // 2 + 64 * 4096) // 1024 - 1
        vol.close()

    asyncio.run(main())


def test_read_ahead_that_cannot_be_read_leaves_the_exact_read(tmp_path: Path) -> None:
    """A read-ahead window the journal cannot serve (a damaged granule past the read, a
    record only the tier holds) costs nothing: the read itself is served as before."""
    vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path))
    data = random.Random(3).randbytes(SIZE)
    vol.write(0, data)
    real = vol.journal.read_slice

    def failing(seq: int, loc: int, poff: int, length: int, **k: object) -> bytes:
        if length > 1024:
            raise (Corruption if poff < SIZE // 2 else NotLocal)("window unreadable")
        return real(seq, loc, poff, length, **k)  # type: ignore[arg-type]

    vol.journal.read_slice = failing  # type: ignore[method-assign]
    for off in range(0, SIZE, 1024):
        assert vol.read(off, 1024) == data[off : off + 1024]
    vol.close()


def test_reader_that_rewrites_what_it_reads_does_not_read_ahead_much(tmp_path: Path) -> None:
    """Read 4 KiB, write it back changed, read the next 4 KiB (an in-place filter): each
    write lands in the read-ahead window, so the window stays small and the journal
    is asked for about the bytes the host reads, not 64 KiB per read."""
    vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path, l0=4096))
    rng = random.Random(5)
    model = bytearray(rng.randbytes(SIZE))
    vol.write(0, bytes(model))
    asked = 0
    real = vol.journal.read_slice

    def counting(seq: int, loc: int, poff: int, length: int, **k: object) -> bytes:
        nonlocal asked
        asked += length
        return real(seq, loc, poff, length, **k)  # type: ignore[arg-type]

    vol.journal.read_slice = counting  # type: ignore[method-assign]
    n = 0
    for off in range(0, SIZE // 4, 4096):
        assert vol.read(off, 4096) == model[off : off + 4096]
        d = rng.randbytes(4096)
        vol.write(off, d)
        model[off : off + 4096] = d
        n += 4096
    assert asked <= 2 * n
    assert vol.read(0, SIZE) == model
    vol.close()
