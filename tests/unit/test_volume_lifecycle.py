"""Volume delete and resize (issue 28, item 4) through the operations layer, and the
size limits of create and resize at their exact boundary."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cdp.config import MapSettings, Settings
from cdp.errors import NotFound, OutOfRange, UsageError
from cdp.ops import run_op
from cdp.store import Store
from cdp.units import parse_size
from cdp.volume import MAX_VOLUME_SIZE

MIB = 1 << 20


def _settings(tmp: Path) -> Settings:
    return replace(Settings(), store=tmp / "store", volumes=(),
                   maps=replace(MapSettings(), l0_max_writes=16, fanout=4, full_every=4))


def _op(store: Store, op: str, **args: Any) -> Any:
    return asyncio.run(run_op(store, op, args))


def test_max_size_is_the_last_sector_below_2_63() -> None:
    assert MAX_VOLUME_SIZE == (1 << 63) - 512
    assert parse_size(str(MAX_VOLUME_SIZE)) == MAX_VOLUME_SIZE  # exact, no float rounding


def test_create_size_limits_at_the_boundary(tmp_path: Path) -> None:
    store = Store.open(_settings(tmp_path))
    try:
        with pytest.raises(UsageError, match=r"too large.*2\^63"):
            _op(store, "volume_create", name="big", size=str(MAX_VOLUME_SIZE + 512))
        with pytest.raises(UsageError, match="multiple of 512"):
            _op(store, "volume_create", name="odd", size="1000")
        r = _op(store, "volume_create", name="max", size=str(MAX_VOLUME_SIZE))
        assert r["size"] == MAX_VOLUME_SIZE

        async def last_sector() -> None:
            vol = store.volume("max")
            end = MAX_VOLUME_SIZE
            w = vol.write(end - 512, b"\xab" * 512)
            if w is not None:
                await w
            m = await vol.snapshot()
            assert vol.read(end - 1024, 1024) == bytes(512) + b"\xab" * 512
            assert vol.read(end - 512, 512, m.seq) == b"\xab" * 512
            assert vol.block_status(end - 1024, 1024) == [(512, 3), (512, 0)]
            assert vol.changed(0, m.seq) == [(end - 512, end)]
            with pytest.raises(OutOfRange):
                vol.read(end - 512, 513)

        asyncio.run(last_sector())
    finally:
        store.close()


def test_grow_is_recorded_and_old_points_read_zeros_past_the_old_size(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    store = Store.open(s)
    try:
        _op(store, "volume_create", name="v", size="1MiB")
        vol = store.volume("v")

        async def before() -> int:
            w = vol.write(MIB - 4, b"tail")
            if w is not None:
                await w
            return (await vol.snapshot("before")).seq

        seq = asyncio.run(before())
        vol.read(0, MIB, seq)  # caches the point's region, resolved up to the old end
        with pytest.raises(UsageError, match=r"shrinking.*refused"):
            _op(store, "volume_resize", volume="v", size="512KiB")
        with pytest.raises(UsageError, match="too large"):
            _op(store, "volume_resize", volume="v", size=str(MAX_VOLUME_SIZE + 512))
        r = _op(store, "volume_resize", volume="v", size="4MiB")
        assert r == {"volume": "v", "old_size": MIB, "size": 4 * MIB, "changed": True, "seq": seq}
        assert _op(store, "volume_resize", volume="v", size="4MiB")["changed"] is False
        # the point before the resize: its bytes, then zeros up to the new size
        assert vol.read(MIB - 4, 4, seq) == b"tail"
        assert vol.read(MIB - 4, 3 * MIB + 4, seq) == b"tail" + bytes(3 * MIB)

        async def after() -> None:
            w = vol.write(3 * MIB, b"new")
            if w is not None:
                await w
            await vol.flush()

        asyncio.run(after())
        assert vol.read(3 * MIB, 3) == b"new"
        assert vol.read(3 * MIB, 3, seq) == bytes(3)
    finally:
        store.close()
    meta = json.loads((s.store / "volumes" / "v" / "volume.json").read_text())
    assert meta["size"] == 4 * MIB
    assert [(c["from"], c["to"], c["seq"]) for c in meta["resizes"]] == [(MIB, 4 * MIB, seq)]
    store = Store.open(s)
    try:
        vol = store.volume("v")
        assert vol.size == 4 * MIB and vol.read(3 * MIB, 3) == b"new"
    finally:
        store.close()


def test_delete_refusals_and_force(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    store = Store.open(s)
    try:
        _op(store, "volume_create", name="v", size="1MiB")
        vol = store.volume("v")
        asyncio.run(vol.snapshot("keep me"))
        _op(store, "retention_keep", volume="v", marker="marker1", keep="30d")
        with pytest.raises(UsageError, match=r"kept markers \(marker1\).*--force"):
            _op(store, "volume_delete", name="v")
        _op(store, "retention_keep", volume="v", marker="marker1", keep="none")
        vol.connections += 1  # an open NBD/iSCSI connection
        with pytest.raises(UsageError, match=r"1 open connection.*--force"):
            _op(store, "volume_delete", name="v")
        r = _op(store, "volume_delete", name="v", force=True)
        assert r["deleted"] and r["freed_bytes"] > 0 and "warning" not in r
        assert vol.closed and "v" not in store.volumes
        with pytest.raises(NotFound):
            store.volume("v")
        with pytest.raises(NotFound):
            _op(store, "volume_delete", name="v")
        assert not (s.store / "volumes" / "v").exists()
        assert list((s.store / "deleted").iterdir()) == []
        _op(store, "volume_create", name="v", size="2MiB")  # the name is free again
        assert store.volume("v").head_seq == 0
    finally:
        store.close()


def test_a_delete_cut_short_is_finished_at_the_next_open(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    store = Store.open(s)
    _op(store, "volume_create", name="v", size="1MiB")
    store.delete_volume("v")  # moved out of service, files not yet removed (a crash here)
    store.close()
    assert len(list((s.store / "deleted").iterdir())) == 1
    store = Store.open(s)
    try:
        assert list((s.store / "deleted").iterdir()) == [] and not store.volumes
    finally:
        store.close()


def test_delete_of_a_configured_volume_warns(tmp_path: Path) -> None:
    from cdp.config import VolumeSpec

    s = replace(_settings(tmp_path), volumes=(VolumeSpec("cfg", MIB),))
    store = Store.open(s)
    try:
        r = _op(store, "volume_delete", name="cfg")
        assert "create it again" in r["warning"]
    finally:
        store.close()


def test_a_damaged_volume_can_be_deleted(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    store = Store.open(s)
    _op(store, "volume_create", name="bad", size="1MiB")
    store.close()
    (s.store / "volumes" / "bad" / "volume.json").write_text("{not json")
    store = Store.open(s)
    try:
        assert "bad" in store.damaged
        r = _op(store, "volume_delete", name="bad")
        assert r["deleted"] and r["last_seq"] is None
        assert "bad" not in store.damaged and not (s.store / "volumes" / "bad").exists()
    finally:
        store.close()
