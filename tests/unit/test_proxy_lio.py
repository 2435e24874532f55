"""The writer's batched pwrites (cdp.proxy.lio): one lio_listio for the writes of a
turn that overlap nothing else in it; anything overlapping keeps queue order."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest

from cdp.proxy import lio
from cdp.proxy.primary import FilePrimary
from tests.helpers import assert_bytes_equal
from tests.unit.test_proxy import SIZE, create_proxy_volume, journal_image, open_store

pytestmark = pytest.mark.skipif(not lio.available, reason="needs glibc's lio_listio")


def _record_lio_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, int]]]:
    """Every ``WriteList.write`` call from now on, as its ``(offset, length)`` items."""
    calls: list[list[tuple[int, int]]] = []
    real = lio.WriteList.write

    def write(self: lio.WriteList, items: list[tuple[bytes | bytearray, int]]) -> list[int]:
        calls.append([(off, len(d)) for d, off in items])
        return real(self, items)

    monkeypatch.setattr(lio.WriteList, "write", write)
    return calls


def test_write_list_writes_each_item_and_reports_errors(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(1 << 20))
    fd = os.open(path, os.O_RDWR)
    try:
        wl = lio.WriteList(fd)
        items: list[tuple[bytes | bytearray, int]] = [
            (b"a" * 4096, 8192), (bytearray(b"b" * 100), 5), (b"c" * 512, (1 << 20) - 512),
        ]
        assert wl.write(items) == [0, 0, 0]
        for data, off in items:
            assert os.pread(fd, len(data), off) == bytes(data)
    finally:
        os.close(fd)
    ro = os.open(path, os.O_RDONLY)
    try:
        assert lio.WriteList(ro).write([(b"x", 0), (b"y", 10)]) == [errno.EBADF, errno.EBADF]
    finally:
        os.close(ro)


def test_disjoint() -> None:
    assert lio.disjoint([(0, 4096), (4096, 10), (9000, 1)])  # touching is not overlapping
    assert not lio.disjoint([(8192, 4096), (0, 4096), (12000, 10)])
    assert lio.disjoint([])




def test_a_turn_of_disjoint_writes_is_one_lio_call_runs_kept_whole(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))
    calls = _record_lio_calls(monkeypatch)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        await asyncio.gather(*[vol.write(r, b"w") for r in range(0, SIZE, 1 << 20)])  # DRL bits durable
        calls.clear()
        rng = random.Random(3)
        slots = rng.sample(range(SIZE // 8192), 20)
        aws = [vol.write(s * 8192, rng.randbytes(4096)) for s in slots]
        aws += [vol.write(SIZE - 3 * 4096 + i * 4096, bytes([i + 1]) * 4096) for i in range(3)]  # a run
        await asyncio.gather(*aws)
        assert len(calls) == 1 and len(calls[0]) == 21  # 20 writes + the run as one item
        assert (SIZE - 3 * 4096, 3 * 4096) in calls[0]
        await vol.flush()
        assert_bytes_equal(prim.read_bytes(), journal_image(vol))
        store.close()

    asyncio.run(main())


def test_a_turn_with_overlapping_writes_goes_one_by_one_in_queue_order(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))
    calls = _record_lio_calls(monkeypatch)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        await vol.write(0, b"w" * 4096)
        p = vol.primary
        assert isinstance(p, FilePrimary)
        order: list[int] = []
        real_pwrite = p.pwrite

        def pwrite(data: bytes, offset: int) -> None:
            order.append(offset)
            real_pwrite(data, offset)

        monkeypatch.setattr(p, "pwrite", pwrite)
        aws = [vol.write(40960, b"a" * 4096), vol.write(8192, b"x" * 4096),
               vol.write(40960 + 2048, b"b" * 4096), vol.write(90000, b"y" * 10)]
        await asyncio.gather(*aws)
        assert calls == []  # an overlap in the turn: no lio call
        assert order == [40960, 8192, 40960 + 2048, 90000]  # queue (= journal) order
        data = prim.read_bytes()
        assert data[40960:43008] == b"a" * 2048 and data[43008:47104] == b"b" * 4096
        await vol.flush()
        assert_bytes_equal(data, journal_image(vol))
        store.close()

    asyncio.run(main())


def test_a_write_the_lio_call_failed_is_redone_alone_and_fails_alone(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(SIZE))

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        await vol.write(0, b"w" * 4096)
        p = vol.primary
        assert isinstance(p, FilePrimary)
        real = lio.WriteList.write

        def write(self: lio.WriteList, items: list[tuple[bytes | bytearray, int]]) -> list[int]:
            res = real(self, items)
            return [errno.EIO if off == 8192 else (-1 if off == 20480 else r) for (_, off), r in zip(items, res, strict=True)]

        real_pwrite = p.pwrite

        def pwrite(data: bytes, offset: int) -> None:
            if offset == 8192:
                raise OSError(errno.EIO, "injected")
            real_pwrite(data, offset)

        monkeypatch.setattr(lio.WriteList, "write", write)
        monkeypatch.setattr(p, "pwrite", pwrite)
        aws = [vol.write(o, bytes([o // 4096]) * 4096) for o in (4096 * 50, 8192, 20480)]
        res = await asyncio.gather(*aws, return_exceptions=True)
        assert res[0] is None and res[2] is None
        assert isinstance(res[1], Exception) and "primary write failed" in str(res[1])
        assert vol.primary_errors == 1
        data = prim.read_bytes()
        assert data[20480:24576] == bytes([5]) * 4096  # "short": finished by a pwrite
        store.close()

    asyncio.run(main())


def test_a_turn_with_a_zero_goes_one_by_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prim = tmp_path / "primary.img"
    prim.write_bytes(b"\xff" * SIZE)
    calls = _record_lio_calls(monkeypatch)

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        await vol.write(0, b"w" * 4096)
        aws = [vol.write(8192, b"a" * 4096), vol.zero(65536, 8192), vol.write(1 << 20, bytearray(b"b" * 4096))]
        await asyncio.gather(*[a for a in aws if a is not None])
        assert calls == []
        data = prim.read_bytes()
        assert data[8192:12288] == b"a" * 4096 and data[65536:73728] == bytes(8192)
        assert data[1 << 20 : (1 << 20) + 4096] == b"b" * 4096
        store.close()

    asyncio.run(main())
