"""The qcow2 overlay writer against qemu-img: for random histories and several cluster
sizes (512 B: many L2 tables and refcount blocks; 2 MiB: partial last cluster), the
overlay is clean under ``qemu-img check`` and ``qemu-img compare`` with its backing
image(A) equals image(B); zero clusters carry zeroes, untouched clusters are absent."""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.backup import qcow2
from cdp.backup.changes import diff_pieces
from cdp.config import MapSettings, Settings
from cdp.ops.backup import _write_qcow2
from cdp.volume import Volume
from tests.conftest import require_tool

SIZE = 3 * (1 << 20) + 512 * 5  # not a multiple of any cluster size above 512


def _noop(done: int, total: int, what: str) -> None:
    return None


def _qemu(*args: str) -> str:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"qemu-img {' '.join(args)}: {r.stderr}{r.stdout}"
    return r.stdout


async def _history(vol: Volume, rng: random.Random) -> list[tuple[int, bytes]]:
    model = bytearray(SIZE)
    pts: list[tuple[int, bytes]] = [(0, bytes(SIZE))]
    for i in range(5):
        if i:  # the records so far reach the segment file (the buffer path reads them),
            await vol.flush()  # the last round's stay in the journal's buffer
        for _ in range(rng.randrange(3, 15)):
            off = rng.randrange(0, SIZE // 512) * 512
            ln = min(SIZE - off, rng.randrange(1, 600) * 512)
            if rng.random() < 0.25:
                vol.zero(off, ln)
                model[off : off + ln] = bytes(ln)
            else:
                d = rng.randbytes(ln)
                vol.write(off, d)
                model[off : off + ln] = d
        pts.append(((await vol.snapshot()).seq, bytes(model)))
    return pts


@pytest.mark.parametrize(("seed", "bits", "batch"), [
    (1, 9, 0), (2, 12, 0), (3, 16, 0), (4, 21, 0), (5, 16, 0),
    (6, 12, 20 << 10), (7, 16, 200 << 10),  # runs across many small batch buffers
])
def test_overlays_rebuild_b(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, bits: int,
                            batch: int) -> None:
    require_tool("qemu-img")
    if batch:
        import time

        from cdp.ops import backup

        monkeypatch.setattr(backup, "QCOW2_BATCH", batch)
        slow = qcow2.write_at

        def write_late(fd: int, items: list[tuple[int, bytes | memoryview]]) -> None:
            time.sleep(0.005)  # the loop fills the other buffer meanwhile: not this one
            slow(fd, items)

        monkeypatch.setattr(qcow2, "write_at", write_late)

    async def go() -> None:
        s = replace(Settings(), store=tmp_path / "store", maps=replace(MapSettings(), l0_max_writes=8))
        vol = Volume.create(tmp_path / "v", "v", SIZE, s)
        rng = random.Random(seed)
        pts = await _history(vol, rng)
        for i in range(3):
            (a, ia), (b, ib) = rng.sample(pts, 2)
            (tmp_path / f"a{i}.img").write_bytes(ia)
            (tmp_path / f"b{i}.img").write_bytes(ib)
            pieces = diff_pieces(vol, a, b)
            lay = qcow2.plan(vol, b, pieces, bits)
            out = tmp_path / f"d{i}.qcow2"
            await _write_qcow2(vol, b, lay, pieces, str(out), f"a{i}.img", "raw", _noop)
            assert out.stat().st_size == lay.file_size
            _qemu("check", str(out))
            _qemu("compare", str(out), str(tmp_path / f"b{i}.img"))
            m = json.loads(_qemu("map", "--output=json", str(out)))
            cs = lay.cluster_size
            own_data = sum(e["length"] for e in m if e["depth"] == 0 and e["data"])
            own_zero = sum(e["length"] for e in m if e["depth"] == 0 and not e["data"])
            tail = lay.clusters and lay.clusters[-1] == (SIZE - 1) // cs
            slack = cs - SIZE % cs if tail and SIZE % cs else 0
            assert own_data + own_zero + slack == len(lay.clusters) * cs
            assert abs(own_data - lay.data_clusters * cs) <= slack
        vol.close()

    asyncio.run(go())


def test_header_fields_and_layout(tmp_path: Path) -> None:
    lay = qcow2.Layout(10 << 30, 16, [0, 1, 8192, 8193, 163839], [True, False, True, True, False])
    assert lay.l1_size == 20 and lay.l2_tables == [0, 1, 19] and lay.data_clusters == 3
    assert lay.total_clusters == 1 + 1 + 1 + 1 + 3 + 3
    meta = dict(qcow2.metadata(lay, "base.img", "raw"))
    hdr = meta[0]
    (magic, version, bf_off, bf_len, bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nsnap, snap_off, incompat, compat, autoclear, rorder, hlen) = struct.unpack_from(
        ">4sIQIIQIIQQIIQQQQII", hdr)
    assert (magic, version, bits, size, crypt, l1_size, hlen, rorder) == (b"QFI\xfb", 3, 16, 10 << 30, 0, 20, 104, 4)
    assert (incompat, compat, autoclear, nsnap, snap_off) == (0, 0, 0, 0, 0)
    assert rt_off == lay.reftable_offset and rt_clusters == lay.reftable_clusters
    assert hdr[bf_off : bf_off + bf_len] == b"base.img"
    assert struct.unpack_from(">II", hdr, 104) == (0xE2792ACA, 3) and hdr[112:115] == b"raw"
    l1 = struct.unpack(">20Q", meta[l1_off])
    assert [i for i, e in enumerate(l1) if e] == [0, 1, 19] and all(e >> 63 for e in l1 if e)
    l2 = struct.unpack(">8192Q", meta[lay.l2_offset])
    assert l2[0] == lay.data_offset | 1 << 63 and l2[1] == 1 and not any(l2[2:])
    refblock = meta[lay.refblocks_offset]
    assert refblock == b"\x00\x01" * lay.total_clusters


def test_refcount_table_grows(tmp_path: Path) -> None:
    # 512-byte clusters: 256 refcounts per block, 64 blocks per table cluster
    n = 40_000
    lay = qcow2.Layout(n * 512, 9, list(range(n)), [True] * n)
    assert lay.refblocks * 256 >= lay.total_clusters
    assert lay.reftable_clusters * 64 >= lay.refblocks and lay.reftable_clusters >= 3


def test_export_of_a_damaged_chunk_fails_with_the_chunk_named(tmp_path: Path) -> None:
    """The export reads payloads into its buffers only when their CRCs match: a flipped
    byte in a raw chunk fails the export with the journal's error (segment, seq,
    chunk), no partial output is left, and the undamaged range still exports."""
    from cdp.errors import Corruption
    from cdp.ops import run_op
    from cdp.store import Store
    from tests.unit.test_on_error import MIB, _damaged_store

    require_tool("qemu-img")
    s, content, _hit = _damaged_store(tmp_path)
    store = Store.open(s)
    try:
        args = {"volume": "v", "from": "origin", "to": "marker1"}
        for output, fmt in ((str(tmp_path / "d.qcow2"), "qcow2"), (os.devnull, "qcow2"),
                            (str(tmp_path / "d.cdpdiff"), "cdpdiff")):
            with pytest.raises(Corruption, match=r"seq 2.*bad checksum in chunk \d"):
                asyncio.run(run_op(store, "export_diff", {**args, "output": output, "format": fmt}))
        assert not (tmp_path / "d.qcow2").exists() and not (tmp_path / "d.cdpdiff").exists()
        # the range before the damaged write exports, and rebuilds what it holds
        vol = store.volume("v")
        pieces = [p for p in diff_pieces(vol, 0, vol.resolve_point("marker1")) if p.end <= MIB]
        lay = qcow2.plan(vol, vol.resolve_point("marker1"), pieces, 16)
        ok = tmp_path / "ok.qcow2"
        asyncio.run(_write_qcow2(vol, vol.resolve_point("marker1"), lay, pieces, str(ok), None,
                                 "raw", _noop))
        raw = tmp_path / "ok.raw"
        _qemu("convert", "-O", "raw", str(ok), str(raw))
        assert raw.read_bytes()[:MIB] == content[:MIB]
    finally:
        store.close()
