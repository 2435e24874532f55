"""`cdpctl verify` reports a map history whose invariants are broken although every file
checksum holds (``MapHistory.check`` on a read-only open), and nothing for a sound one."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.config import MapSettings, Settings
from cdp.verify import verify_maps, verify_volume_dir
from cdp.volume import Volume
from mapengine import Columns, DeltaMap, MapHistory, MapUsageError
from mapengine.storage import MANIFEST, decode_manifest, decode_map, encode_manifest, encode_map

SIZE = 1 << 20


def _volume(tmp: Path) -> Path:
    """A closed volume with a few sealed windows, merged maps and a full map."""

    async def main() -> None:
        maps = replace(MapSettings(), l0_max_writes=8, fanout=2, full_every=4)
        s = replace(Settings(), store=tmp / "store", maps=maps)
        vol = Volume.create(tmp / "v", "v", SIZE, s)
        rng = random.Random(3)
        for _ in range(150):
            off = rng.randrange(0, SIZE - 8192)
            r = vol.write(off, rng.randbytes(rng.randrange(1, 8192)))
            if r is not None:
                await r
        await vol.flush()
        vol.close()

    asyncio.run(main())
    return tmp / "v"


def _rows(mdir: Path) -> tuple[dict[str, object], list[list[object]]]:
    body = decode_manifest((mdir / MANIFEST).read_bytes(), "MANIFEST")
    return body, body["maps"]  # type: ignore[return-value]


def _write_manifest(mdir: Path, body: dict[str, object]) -> None:
    body["gen"] = int(body["gen"]) + 1  # type: ignore[call-overload]
    (mdir / MANIFEST).write_bytes(encode_manifest(body))


def _seq_outside_window(mdir: Path) -> str:
    """Rewrite the first L0 window with its seqs moved past its window: every checksum
    is right, the window's entries are not."""
    body, rows = _rows(mdir)
    row = next(r for r in rows if r[1] == "L" and r[2] == 0)
    p = mdir / str(row[0])
    m = decode_map(p.read_bytes(), str(p))
    c = m.cols
    bad = DeltaMap(m.lo, m.hi, Columns(c.start, c.end, c.seq + 1000, c.loc, c.poff), flat=False)
    raw = encode_map(bad, "L", 0)
    p.write_bytes(raw)
    row[-1] = len(raw)
    _write_manifest(mdir, body)
    return str(row[0])


def _merged_map_lost(mdir: Path) -> str:
    """Drop the newest level-1 map from the manifest: its windows lose their merge."""
    body, rows = _rows(mdir)
    row = [r for r in rows if r[1] == "L" and r[2] == 1][-1]
    rows.remove(row)
    _write_manifest(mdir, body)
    return "level-1 maps"


def test_sound_maps_report_no_invariant_problem(tmp_path: Path) -> None:
    vdir = _volume(tmp_path)
    n, problems = verify_maps(vdir / "maps", None)
    assert n > 3 and problems == []
    assert verify_volume_dir(vdir)["ok"]
    with MapHistory.open(vdir / "maps", readonly=True) as h:
        assert h.check() == []
        assert {"L0", "L1", "F"} <= {k for k, v in h.stats()["maps"].items() if v}


@pytest.mark.parametrize("breakage", [_seq_outside_window, _merged_map_lost])
def test_broken_invariant_is_reported_by_verify(tmp_path: Path, breakage: Callable[[Path], str]) -> None:
    vdir = _volume(tmp_path)
    mdir = vdir / "maps"
    before = sorted(p.name for p in mdir.iterdir())
    named = breakage(mdir)
    files = sorted(p.name for p in mdir.iterdir())
    _, problems = verify_maps(mdir, None)
    assert problems, "a broken invariant went unreported"
    assert all(p["what"] == "maps" and p["reason"].startswith("invariant: ") for p in problems)
    assert any(named in p["reason"] for p in problems), problems
    rep = verify_volume_dir(vdir)
    assert not rep["ok"] and any(p["reason"].startswith("invariant: ") for p in rep["problems"])
    assert sorted(p.name for p in mdir.iterdir()) == files == before  # read-only: nothing touched


def test_readonly_history_refuses_writes(tmp_path: Path) -> None:
    vdir = _volume(tmp_path)
    files = {p.name: p.read_bytes() for p in (vdir / "maps").iterdir()}
    h = MapHistory.open(vdir / "maps", readonly=True)
    sealed = h.sealed_seq
    h.add_write(h.last_seq + 1, 0, 4096, 0)
    with pytest.raises(MapUsageError, match="read-only"):
        h.seal()
    h.close()
    assert {p.name: p.read_bytes() for p in (vdir / "maps").iterdir()} == files
    with MapHistory.open(vdir / "maps", readonly=True) as h:
        assert h.sealed_seq == sealed
