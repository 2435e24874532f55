"""Corruption rig: damage one file of a stopped store (bit flips, zeroed ranges,
truncation) in journal segments, map files, the manifest, the catalog and the markers
file, then check that

* ``cdpctl verify`` (offline, and through the daemon when it starts) exits 6 and names
  the damaged file;
* cdpd starts: over NBD, every 64 KiB of the volume either reads back exactly what was
  written or fails with EIO — never different bytes; when the damage keeps the volume
  from opening (maps, manifest, markers file), cdpd refuses that volume with a line
  naming the damage, lists it as damaged in ``cdpctl status``, and still serves the
  store's other volume (``vol1``) in full;
* ``cdpctl verify --repair`` rebuilds maps, markers and catalog from the journal (the
  store then verifies clean and reads back exactly), and reports journal damage as not
  repairable instead of dropping it.
"""

from __future__ import annotations

import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdp.targets.nbd.client import NbdClient, NbdClientError
from tools.harness import Cdpd
from tools.torture.model import BLOCK, content, decode

MiB = 1 << 20
SIZE = 32 * MiB
VOL1 = '\n[[volume]]\nname = "vol1"\nsize = "4MiB"\n'
CASES = ("journal-flip", "journal-zero", "journal-truncate", "map-flip", "map-zero",
         "map-truncate", "manifest-flip", "manifest-zero", "catalog-zero", "catalog-garbage",
         "markers-garbage")


@dataclass
class Case:
    kind: str
    file: Path
    detected: bool = False
    named: bool = False
    daemon_started: bool = False
    eio_chunks: int = 0
    good_chunks: int = 0
    wrong_chunks: int = 0
    repaired: bool = False
    repair_output: str = ""
    vol0_refused: bool = False  # the damaged volume was refused with a clear error
    others_served: bool = False  # vol1 read back exactly while vol0 was damaged


def build_store(work: Path, seed: int) -> tuple[Path, np.ndarray]:
    """A stopped store with vol0 (several segments, maps of every level, markers and a
    catalog); returns the store and the generation of every block at the end."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    cd = Cdpd(work, size=f"{SIZE // MiB}MiB", segment_bytes="1MiB", l0_max_writes=32,
              extra_config=VOL1).start()
    with NbdClient.connect(cd.uri("vol1")) as c:  # the undamaged neighbour
        c.pwrite(_vol1_bytes(), 0)
        c.flush()
    nblocks = SIZE // BLOCK
    state = np.zeros(nblocks, dtype=np.int64)
    gen = 0
    with NbdClient.connect(cd.uri("vol0")) as c:
        for step in range(6):
            for _ in range(300):
                n = rng.choice((1, 2, 8, 32))
                b0 = rng.randrange(0, nblocks - n)
                gen += 1
                g = gen * 3 + 1  # never a multiple of 3: incompressible, findable bytes
                c.pwrite(b"".join(content(b, g) for b in range(b0, b0 + n)), b0 * BLOCK)
                state[b0 : b0 + n] = g
            c.flush()
            cd.cdpctl("snapshot", "-V", "vol0", "--label", f"s{step}")
    r = cd.cdpctl("verify", check=False)
    assert r.returncode == 0, r.stdout
    assert cd.stop() == 0
    return cd.store, state


def _vol1_bytes() -> bytes:
    return b"".join(content(b, 7) for b in range((4 * MiB) // BLOCK))


def _damage(kind: str, store: Path, state: np.ndarray, rng: random.Random) -> Path:
    vdir = store / "volumes" / "vol0"
    segs = sorted((vdir / "journal").glob("*.seg"))
    maps = sorted((vdir / "maps").glob("*.map"))
    if kind.startswith("journal"):
        f = segs[rng.randrange(0, max(1, len(segs) - 1))]  # a sealed segment if there is one
        raw = bytearray(f.read_bytes())
        # a block header of the final state, so the damage is visible at the head
        live = [b for b in range(len(state)) if state[b]]
        rng.shuffle(live)
        pos = -1
        for b in live:
            pos = raw.find(struct.pack("<QQ", b, int(state[b])))
            if pos > 0:
                break
        assert pos > 0
        if kind == "journal-flip":
            raw[pos + 100] ^= 1 << rng.randrange(8)
        elif kind == "journal-zero":
            raw[pos + 16 : pos + 16 + 512] = bytes(512)
        else:
            del raw[pos + 64 :]
        f.write_bytes(bytes(raw))
        return f
    if kind.startswith("map"):
        f = max(maps, key=lambda p: p.stat().st_size)
        raw = bytearray(f.read_bytes())
        if kind == "map-flip":
            raw[rng.randrange(64, len(raw))] ^= 1 << rng.randrange(8)
        elif kind == "map-zero":
            o = rng.randrange(64, len(raw) - 16)
            raw[o : o + 256] = bytes(len(raw[o : o + 256]))
        else:
            del raw[len(raw) // 2 :]
        f.write_bytes(bytes(raw))
        return f
    if kind.startswith("manifest"):
        f = vdir / "maps" / "MANIFEST"
        raw = bytearray(f.read_bytes())
        if kind == "manifest-flip":
            raw[rng.randrange(0, len(raw))] ^= 1 << rng.randrange(8)
        else:
            raw[:] = bytes(len(raw))
        f.write_bytes(bytes(raw))
        return f
    if kind.startswith("catalog"):
        f = vdir / "catalog.sqlite"
        raw = bytearray(f.read_bytes())
        if kind == "catalog-zero":  # the header page: not a database any more
            raw[0:100] = bytes(100)
        else:  # b-tree pages: integrity_check finds them
            for p in range(1, len(raw) // 4096):
                o = p * 4096
                raw[o : o + 64] = bytes(rng.randrange(256) for _ in range(64))
        f.write_bytes(bytes(raw))
        return f
    f = vdir / "markers.json"
    f.write_text('{"format": 1, "next_id": 7, "markers": [{"id": 1')
    return f


def _read_all(cd: Cdpd, state: np.ndarray, case: Case) -> None:
    step = 64 << 10
    with NbdClient.connect(cd.uri("vol0"), timeout=60) as c:
        for off in range(0, SIZE, step):
            try:
                data = c.pread(off, step)
            except NbdClientError:
                case.eio_chunks += 1
                continue
            b0 = off // BLOCK
            ok = all(decode(b0 + i, data[i * BLOCK : (i + 1) * BLOCK]) == int(state[b0 + i])
                     for i in range(step // BLOCK))
            if ok:
                case.good_chunks += 1
            else:
                case.wrong_chunks += 1


def run_case(kind: str, pristine: Path, state: np.ndarray, work: Path, seed: int) -> Case:
    rng = random.Random(seed)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cd = Cdpd(work, size=f"{SIZE // MiB}MiB", segment_bytes="1MiB", l0_max_writes=32,
              extra_config=VOL1)
    shutil.copytree(pristine, cd.store)
    f = _damage(kind, cd.store, state, rng)
    case = Case(kind, f)
    r = cd.cdpctl("verify", check=False)
    case.detected = r.returncode == 6
    case.named = f.name in r.stdout
    try:
        cd.start(timeout=60)
        case.daemon_started = True
    except RuntimeError:
        case.daemon_started = False
    if case.daemon_started:
        r2 = cd.cdpctl("verify", check=False)
        case.detected = case.detected and r2.returncode == 6 and f.name in r2.stdout
        with NbdClient.connect(cd.uri("vol1"), timeout=60) as c:
            case.others_served = c.pread(0, 4 * MiB) == _vol1_bytes()
        st = cd.cdpctl("status", "--json", check=False)
        if '"damaged"' in st.stdout:  # vol0 did not open: refused, never served
            s0 = cd.cdpctl("status", "-V", "vol0", check=False)
            case.vol0_refused = s0.returncode == 6 and "damaged" in s0.stderr
            try:
                with NbdClient.connect(cd.uri("vol0"), timeout=10):
                    case.vol0_refused = False
            except NbdClientError:
                pass
        else:
            _read_all(cd, state, case)
        cd.stop()
    r3 = cd.cdpctl("verify", "--repair", check=False)
    case.repair_output = r3.stdout + r3.stderr
    if kind.startswith("journal"):
        # not repairable; must say so and keep reporting it
        case.repaired = r3.returncode == 6 and "NOT repaired" in r3.stdout
    else:
        case.repaired = r3.returncode == 0
        if case.repaired:
            cd.start(timeout=60)
            after = Case(kind, f)
            _read_all(cd, state, after)
            case.repaired = after.good_chunks == SIZE // (64 << 10)
            cd.stop()
    return case


def run_corruption(work: Path, *, cases: int = len(CASES), seed: int = 1,
                   log: Any = print) -> dict[str, Any]:
    pristine, state = build_store(work / "pristine", seed)
    res: dict[str, Any] = {"cases": 0, "detected": 0, "named": 0, "silent": 0, "wrong_reads": 0,
                           "eio_chunks": 0, "repaired": 0, "volumes_refused": 0, "problems": [],
                           "by_kind": {}}
    for i in range(cases):
        kind = CASES[i % len(CASES)]
        c = run_case(kind, pristine, state, work / f"case{i}", seed + i)
        res["cases"] += 1
        res["detected"] += c.detected
        res["named"] += c.named
        res["silent"] += not c.detected
        res["wrong_reads"] += c.wrong_chunks
        res["eio_chunks"] += c.eio_chunks
        res["repaired"] += c.repaired
        res["volumes_refused"] += c.vol0_refused
        res["by_kind"][kind] = {"detected": c.detected, "named": c.named,
                                "daemon_started": c.daemon_started, "eio_chunks": c.eio_chunks,
                                "good_chunks": c.good_chunks, "wrong_chunks": c.wrong_chunks,
                                "vol0_refused": c.vol0_refused, "others_served": c.others_served,
                                "repaired": c.repaired}
        served = c.daemon_started and c.others_served and (c.good_chunks or c.vol0_refused)
        if not (c.detected and c.named and c.wrong_chunks == 0 and c.repaired and served):
            res["problems"].append(f"{kind}: {res['by_kind'][kind]}\n{c.repair_output[-800:]}")
        log(f"corruption {kind}: detected {c.detected} named {c.named} started "
            f"{c.daemon_started} vol0 refused {c.vol0_refused} vol1 served {c.others_served} "
            f"eio {c.eio_chunks} wrong {c.wrong_chunks} repaired {c.repaired}")
        shutil.rmtree(work / f"case{i}", ignore_errors=True)
    return res
