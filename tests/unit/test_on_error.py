"""``--on-error zero|skip-file|stop`` (issue 28, item 13): a record failing its
checksum stops an image by default; with ``zero`` the damaged piece (to the journal's
4 KiB granule) is zeroed, the rest written, and every damaged range reported."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cdp.config import Settings
from cdp.errors import Corruption, UsageError
from cdp.ops import run_op
from cdp.outputs import DamageMap, salvage_read
from cdp.store import Store

MIB = 1 << 20


def _settings(tmp: Path) -> Settings:
    return replace(Settings(), store=tmp / "store", volumes=())


def _op(store: Store, op: str, **args: Any) -> Any:
    return asyncio.run(run_op(store, op, args))


def _damaged_store(tmp: Path) -> tuple[Settings, bytes, int]:
    """A volume with three incompressible 256 KiB writes, one byte of the middle one's
    stored data flipped on disk; returns (settings, the volume's content, flipped offset)."""
    s = _settings(tmp)
    store = Store.open(s)
    content = bytearray(4 * MIB)
    rng = random.Random(7)
    try:
        _op(store, "volume_create", name="v", size="4MiB")
        vol = store.volume("v")

        async def fill() -> None:
            for off in (0, MIB, 2 * MIB):
                data = rng.randbytes(256 << 10)
                content[off : off + len(data)] = data
                w = vol.write(off, data)
                if w is not None:
                    await w
            await vol.snapshot()

        asyncio.run(fill())
    finally:
        store.close()
    hit = MIB + 100_000  # inside the middle write
    needle = bytes(content[hit : hit + 64])
    for seg in sorted((s.store / "volumes" / "v" / "journal").glob("*.seg")):
        raw = bytearray(seg.read_bytes())
        i = raw.find(needle)
        if i >= 0:
            raw[i] ^= 0xFF
            seg.write_bytes(bytes(raw))
            break
    else:
        raise AssertionError("the written data was not found in the journal")
    return s, bytes(content), hit


def test_image_stops_by_default_and_zero_maps_the_damage(tmp_path: Path) -> None:
    s, content, hit = _damaged_store(tmp_path)
    store = Store.open(s)
    try:
        out = tmp_path / "v.img"
        with pytest.raises(Corruption):
            _op(store, "image", volume="v", at="marker1", output=str(out))
        assert not out.exists()
        with pytest.raises(UsageError, match="skip-file is for restore"):
            _op(store, "image", volume="v", at="marker1", output=str(out), on_error="skip-file")
        r = _op(store, "image", volume="v", at="marker1", output=str(out), on_error="zero")
        (d,) = r["damaged"]
        assert d["offset"] == d["source_offset"] <= hit < d["offset"] + d["length"]
        assert d["length"] == 4096 and d["offset"] % 4096 == 0, d  # one 4 KiB granule lost
        assert "bad checksum" in d["reason"] and "seq 2" in d["reason"], d
        assert r["damaged_bytes"] == d["length"]
        img = out.read_bytes()
        lo, hi = d["offset"], d["offset"] + d["length"]
        assert img[lo:hi] == bytes(hi - lo)
        assert img[:lo] == content[:lo] and img[hi:] == content[hi:]
    finally:
        store.close()


def test_salvage_read_keeps_what_reads_and_maps_what_does_not() -> None:
    bad = range(8192, 12288)

    def read(offset: int, length: int) -> bytes:
        if any(o in bad for o in range(offset, offset + length)):
            raise Corruption(f"bad bytes at {offset}")
        return b"x" * length

    dm = DamageMap()
    data = salvage_read(read, 4000, 12000, 100, dm)
    assert data == b"x" * 4192 + bytes(4096) + b"x" * 3712
    assert dm.ranges == [{"offset": 100 + 8192 - 4000, "length": 4096, "source_offset": 8192,
                          "reason": "bad bytes at 8192"}]


@pytest.mark.parametrize("batch", [12 << 10, 76 << 10, 8 << 20])
def test_image_of_random_histories_equals_the_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     batch: int) -> None:
    """The image reads extents into two batch buffers (raw records in place, anything
    else through the journal and copied) and joins adjacent data: for random histories
    (4 KiB and odd-sized writes, lz4-compressible and random data, zeroes, writes that
    cross batch boundaries) the image at each marker is the volume's content there."""
    from cdp.ops import volumes

    monkeypatch.setattr(volumes, "IMAGE_BATCH", batch)
    slow = volumes._write_items

    def write_late(*args: Any) -> None:
        time.sleep(0.003)  # the loop fills the other buffer meanwhile: not this one
        slow(*args)

    monkeypatch.setattr(volumes, "_write_items", write_late)
    s = _settings(tmp_path)
    store = Store.open(s)
    rng = random.Random(batch)
    size = 3 * MIB
    model = bytearray(size)
    points: list[tuple[str, bytes]] = []
    try:
        _op(store, "volume_create", name="v", size="3MiB")
        vol = store.volume("v")

        async def fill() -> None:
            for _ in range(4):
                for _ in range(60):
                    n = rng.choice((4096, 512 * rng.randrange(1, 40), 4096 * rng.randrange(1, 80)))
                    off = rng.randrange(0, (size - n) // 512) * 512
                    r = rng.random()
                    if r < 0.15:
                        vol.zero(off, n)
                        model[off : off + n] = bytes(n)
                        continue
                    data = rng.randbytes(n) if r < 0.75 else bytes([rng.randrange(256)]) * n
                    model[off : off + n] = data
                    w = vol.write(off, data)
                    if w is not None:
                        await w
                m = await vol.snapshot()
                points.append((m.name, bytes(model)))

        asyncio.run(fill())
        for name, want in points:
            out = tmp_path / f"{name}.img"
            r = _op(store, "image", volume="v", at=name, output=str(out))
            assert r["damaged"] == []
            assert out.read_bytes() == want, name
    finally:
        store.close()
