"""Power loss at every flush point (and at random points between them) of a recorded run.

A history of volume operations (writes, write-zeroes, FLUSH, markers, rewinds, seals
with merges) runs on a :class:`cdp.volume.Volume` whose journal lives on
:class:`cdp.journal.CrashSimFS` and whose map files go through :class:`SimMapOps`, a
mapengine ``FileOps`` that remembers what a power loss would keep. At every completed
flush, and at random moments in between, the *durable* state is captured (like
dm-log-writes replaying a log up to each flush mark): journal contents and names that
were fdatasync'd / fsync'd (optionally with torn unsynced tails), map files and
manifest whose write finished (removals not yet made durable by a directory fsync come
back). Each capture is then opened as a fresh volume and must hold exactly the durable
prefix: every write covered by a completed flush reads back, nothing newer than what
the journal kept is visible, the markers made durable are listed, and new writes are
accepted after the recovery.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cdp.config import MapSettings, Settings
from cdp.fsutil import write_file_atomic
from cdp.journal import CrashSimFS, Journal
from cdp.markers import load_markers
from cdp.volume import Volume, map_policy
from mapengine import MapHistory
from mapengine.storage import FileOps
from tools.torture.model import BLOCK, Model, check_blocks, check_exact, content


class SimMapOps(FileOps):
    """Real files, plus a record of removals a power loss would undo (an unlink is
    durable only after the next fsync of its directory)."""

    def __init__(self) -> None:
        self.undurable_removals: dict[str, bytes] = {}

    def remove(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                self.undurable_removals[path] = f.read()
        except OSError:
            pass
        super().remove(path)

    def hook(self, point: str, name: str) -> None:
        if point == "done":  # write_atomic fsynced the directory: removals are durable
            self.undurable_removals.clear()


def _capture_fs(fs: CrashSimFS, rng: random.Random, torn: bool) -> dict[str, bytes]:
    """What a power loss right now leaves of the journal files."""
    out: dict[str, bytes] = {}
    with fs._lock:  # the test double's own state; nothing else runs meanwhile
        for name, inode in fs._durable_names.items():
            data = inode.durable
            if torn and bytes(inode.data[: len(inode.durable)]) == inode.durable:
                tail = bytes(inode.data[len(inode.durable) :])
                if tail:
                    data = data + tail[: rng.randint(0, len(tail))]
            out[name] = bytes(data)
    return out


def _capture_dir(d: Path, undo: dict[str, bytes]) -> dict[str, bytes]:
    out = {str(p): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    out.update(undo)
    return out


class Capture:
    def __init__(self, label: str, fsfiles: dict[str, bytes], files: dict[str, bytes],
                 model_durable: np.ndarray, pending: dict[int, set[int]],
                 markers: dict[str, tuple[int, np.ndarray]], durable_seq: int) -> None:
        self.label = label
        self.fsfiles = fsfiles
        self.files = files
        self.durable = model_durable
        self.pending = pending
        self.markers = markers
        self.durable_seq = durable_seq


def _settings(vdir: Path) -> Settings:
    s = Settings()
    return replace(s, maps=MapSettings(l0_max_writes=16, seal_interval=3600, fanout=2,
                                       full_every=4, cache_bytes=1 << 20))


def open_volume(vdir: Path, fs: CrashSimFS, ops: FileOps, settings: Settings) -> Volume:
    """Volume.open with the journal on *fs* and the maps through *ops*."""
    meta = json.loads((vdir / "volume.json").read_text())
    markers, next_id = load_markers(vdir / "markers.json")
    journal = Journal.open(str(vdir / "journal"), segment_bytes=settings.journal.segment_bytes,
                           sync="flush", fs=fs)
    maps = MapHistory.open(vdir / "maps", policy=map_policy(settings.maps),
                           cache_bytes=settings.maps.cache_bytes, fs=ops)
    vol = Volume(vdir, meta["name"], int(meta["size"]), meta["uuid"], journal, maps, settings,
                 markers, next_id)
    vol._replay()
    return vol


async def _history(vdir: Path, settings: Settings, nblocks: int, steps: int,
                   rng: random.Random) -> tuple[list[Capture], int]:
    fs = CrashSimFS(seed=rng.randrange(1 << 30))
    ops = SimMapOps()
    vdir.mkdir(parents=True)
    write_file_atomic(vdir / "volume.json", json.dumps(
        {"format": 1, "name": "pl", "size": nblocks * BLOCK, "uuid": "0", "created_ns": 0}).encode())
    settings = replace(settings, journal=replace(settings.journal, segment_bytes=256 << 10))
    vol = open_volume(vdir, fs, ops, settings)
    model = Model(nblocks)
    since: list[tuple[int, int]] = []
    markers: dict[str, tuple[int, np.ndarray]] = {}
    caps: list[Capture] = []

    def capture(label: str) -> None:
        torn = rng.random() < 0.5
        caps.append(Capture(label, _capture_fs(fs, rng, torn), _capture_dir(vdir, ops.undurable_removals),
                            model.durable.copy(), {b: set(s) for b, s in model.pending.items()},
                            dict(markers), vol.journal.durable_seq))

    writes = 0
    for _ in range(steps):
        r = rng.random()
        if r < 0.70:
            n = rng.choice((1, 1, 2, 4, 16, 40))  # 40 blocks: a chunked record
            b0 = rng.randrange(0, nblocks - n + 1)
            gen = 0 if rng.random() < 0.05 else model.next_gen()
            for b in range(b0, b0 + n):
                model.issued(b, gen)
                since.append((b, gen))
            if gen == 0:
                w = vol.zero(b0 * BLOCK, n * BLOCK, False)
            else:
                w = vol.write(b0 * BLOCK, b"".join(content(b, gen) for b in range(b0, b0 + n)), False)
            if w is not None:
                await w
            writes += 1
        elif r < 0.85:
            await vol.flush()
            model.flushed(since)
            since = []
            capture("flush")
        elif r < 0.90:
            await vol.flush()
            model.flushed(since)
            since = []
            m = await vol.snapshot("")
            markers[m.name] = (m.seq, model.durable.copy())
            capture("marker")
        elif r < 0.93 and markers:
            await vol.flush()
            model.flushed(since)
            since = []
            name = rng.choice(list(markers))
            await vol.rewind(markers[name][0])
            model.settle(markers[name][1])
            capture("rewind")
        elif r < 0.96:
            vol.seal()  # a seal (and the merges due) between flushes
            capture("seal")
        else:
            capture("random")
    vol.close()
    return caps, writes


def _restore(vdir: Path, cap: Capture) -> CrashSimFS:
    shutil.rmtree(vdir)
    for name, data in cap.files.items():
        p = Path(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (vdir / "maps").mkdir(parents=True, exist_ok=True)
    fs = CrashSimFS()
    fs.makedirs(str(vdir / "journal"))
    for name, data in cap.fsfiles.items():
        fd = fs.open_append(name)
        fs.write(fd, data)
        fs.fdatasync(fd)
        fs.close(fd)
    fs.fsync_dir(str(vdir / "journal"))
    return fs


async def _check_capture(vdir: Path, cap: Capture, settings: Settings, nblocks: int,
                         res: dict[str, Any]) -> None:
    fs = _restore(vdir, cap)
    try:
        vol = open_volume(vdir, fs, FileOps(), settings)
    except Exception as e:
        res["lost"] += 1
        res["problems"].append(f"{cap.label}: open failed: {type(e).__name__}: {e}")
        return
    try:
        if vol.journal.last_seq < cap.durable_seq:
            res["lost"] += 1
            res["problems"].append(f"{cap.label}: journal ends @{vol.journal.last_seq} < durable @{cap.durable_seq}")
        model = Model(nblocks)
        model.durable = cap.durable
        model.pending = cap.pending
        data = vol.read(0, nblocks * BLOCK)
        r, _obs = check_blocks(model, data)
        res["writes_checked"] += r.checked
        res["lost"] += r.lost
        res["problems"].extend(f"{cap.label}: {d}" for d in r.details)
        listed = {m.name: m.seq for m in vol.markers}
        for name, (seq, state) in cap.markers.items():
            res["markers_checked"] += 1
            if listed.get(name) != seq:
                res["lost"] += 1
                res["problems"].append(f"{cap.label}: {name} @{seq} listed as {listed.get(name)}")
                continue
            r2 = check_exact(state, vol.read(0, nblocks * BLOCK, seq))
            res["lost"] += r2.lost
            res["problems"].extend(f"{cap.label}: {name}: {d}" for d in r2.details)
        # the recovered volume takes new writes and a flush
        w = vol.write(0, content(0, 1 << 40), False)
        if w is not None:
            await w
        await vol.flush()
        if vol.read(0, BLOCK) != content(0, 1 << 40):
            res["problems"].append(f"{cap.label}: write after recovery did not read back")
    except Exception as e:
        res["lost"] += 1
        res["problems"].append(f"{cap.label}: {type(e).__name__}: {e}")
    finally:
        try:
            vol.close()
        except Exception as e:
            res["problems"].append(f"{cap.label}: close: {type(e).__name__}: {e}")


def run_powerloss(histories: int, *, seed: int = 1, steps: int = 300, nblocks: int = 256,
                  log: Any = print) -> dict[str, Any]:
    """Record *histories* runs of *steps* operations; crash each at every capture."""
    rng = random.Random(seed)
    res: dict[str, Any] = {"histories": 0, "crashes": 0, "writes": 0, "writes_checked": 0,
                           "markers_checked": 0, "lost": 0, "problems": []}
    with tempfile.TemporaryDirectory(prefix="cdp-powerloss-") as tmp:
        for h in range(histories):
            vdir = Path(tmp) / f"h{h}" / "vol"
            settings = _settings(vdir)
            caps, writes = asyncio.run(_history(vdir, settings, nblocks, steps, rng))
            res["histories"] += 1
            res["writes"] += writes
            for cap in caps:
                res["crashes"] += 1
                asyncio.run(_check_capture(vdir, cap, settings, nblocks, res))
            shutil.rmtree(Path(tmp) / f"h{h}")
            log(f"history {h + 1}/{histories}: {len(caps)} crash points, lost {res['lost']}")
    res["problems"] = res["problems"][:50]
    return res


if __name__ == "__main__":  # quick manual run
    print(json.dumps(run_powerloss(2, seed=int(os.environ.get("SEED", "1"))), indent=1))
