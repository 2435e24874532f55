"""Kill -9 loop: a real cdpd under writers, markers, rewinds, catalog diffs and map
merges, killed with SIGKILL at a random moment, restarted and checked.

Per run: writers (our NBD client, :mod:`tools.torture.writer`) write their own blocks
of ``vol0`` and record what every completed FLUSH covered; fio writes ``vol1`` with
``--verify``; the controller quiesces the writers now and then and does the phase's
action (a marker, a rewind to an earlier marker, a new NTFS state on ``ntfs0`` plus a
marker, which makes the catalog diff the MFT, or ``cdpctl gc --now`` when it exists);
a timer kills cdpd at a random moment. After the restart:

* every block of ``vol0`` is what the last completed flush left there or a later write
  (nothing acknowledged before a completed flush is lost);
* every reported marker is still listed at its seq, and ``vol0@markerN`` of up to two
  of them holds exactly the state the model recorded when it was taken;
* ``cdpctl verify`` is clean (the same command a user runs);
* the last complete fio run verifies (``fio --verify_only``);
* the catalog of ``ntfs0`` lists only markers that exist, at their seqs, and catches up
  with all of them.

Small maps (``l0_max_writes = 64``, fanout 4, a full map every 8 windows) make seals and
merges happen every few dozen writes, so every phase also kills during map merges.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdp.admin import AdminClient
from cdp.errors import CdpError
from cdp.targets.nbd.client import NbdClient
from tools.harness import Cdpd
from tools.torture.model import BLOCK, Model, check_blocks, check_exact
from tools.torture.writer import Gate, Writer

MiB = 1 << 20
PHASES = ("writes", "markers", "rewind", "catalog", "gc")


@dataclass
class Totals:
    runs: int = 0
    kills: int = 0
    writes: int = 0  # NBD write requests sent by our writers
    flushes: int = 0
    blocks_checked: int = 0  # flushed, acknowledged 4 KiB blocks read back after a kill
    pit_blocks_checked: int = 0  # blocks of marker views compared exactly
    markers_checked: int = 0
    rewinds: int = 0
    fio_verified: int = 0
    catalog_versions_checked: int = 0
    verify_clean: int = 0
    lost: int = 0
    problems: list[str] = field(default_factory=list)
    phases: Counter[str] = field(default_factory=Counter)
    restart_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("phases", "restart_seconds")}
        d["phases"] = dict(self.phases)
        rs = self.restart_seconds
        d["restart_seconds_max"] = round(max(rs), 2) if rs else None
        d["restart_seconds_mean"] = round(sum(rs) / len(rs), 2) if rs else None
        return d


def _ntfs_images(work: Path, size: int) -> list[bytes]:
    """Two NTFS file systems with different files (writing one over the other changes
    the MFT, so the next marker's catalog diff has work to do)."""
    from tools.ntfs_fixture import make_image

    out = []
    for k in range(2):
        def populate(mnt: Path, k: int = k) -> None:
            for i in range(40 + 30 * k):
                d = mnt / f"dir{i % 4}"
                d.mkdir(exist_ok=True)
                (d / f"file{k}-{i}.txt").write_bytes(os.urandom(100 + 1000 * (i % 5)))
        p = make_image(work / f"ntfs{k}.img", size, populate)
        out.append(p.read_bytes())
        p.unlink()
    return out


class KillLoop:
    def __init__(
        self, work: Path, *, seed: int = 1, size_mib: int = 64, writers: int = 4,
        fio: bool = True, ntfs: bool = True, phases: tuple[str, ...] = PHASES,
        log: Any = print,
    ) -> None:
        self.work = work
        self.rng = random.Random(seed)
        self.seed = seed
        self.size = size_mib * MiB
        self.nwriters = writers
        self.use_fio = fio and shutil.which("fio") is not None
        self.use_ntfs = ntfs and shutil.which("mkntfs") is not None and shutil.which("ntfs-3g") is not None
        self.phases = tuple(p for p in phases if p != "catalog" or self.use_ntfs)
        self.log = log
        self.model = Model(self.size // BLOCK)
        self.totals = Totals()
        self.cdpd: Cdpd | None = None
        self.markers: dict[str, tuple[int, np.ndarray]] = {}  # reported: name -> (seq, state)
        self.ntfs_markers: dict[str, int] = {}
        self.ntfs_imgs: list[bytes] = []
        self.ntfs_state = 0
        self.fio_ok_seed: int | None = None
        self.has_gc = False
        self.peak_rss_kib = 0
        self._inflight: np.ndarray | None = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        extra = '\n[[volume]]\nname = "vol1"\nsize = "16MiB"\n'
        self.cdpd = Cdpd(self.work, size=f"{self.size // MiB}MiB", segment_bytes="4MiB",
                         l0_max_writes=64, extra_config=extra).start()
        if self.use_ntfs:
            self.ntfs_imgs = _ntfs_images(self.work, 16 * MiB)
            img = self.work / "ntfs-init.img"
            img.write_bytes(self.ntfs_imgs[0])
            self.cdpd.cdpctl("volume", "create", "ntfs0", "--size", "16MiB", "--from-image", str(img))
            img.unlink()
        r = self.cdpd.cdpctl("gc", "--help", check=False)
        self.has_gc = r.returncode == 0  # retention/compaction: kill during `gc --now`

    def _admin(self, op: str, args: dict[str, Any]) -> Any:
        assert self.cdpd is not None
        c = AdminClient(self.cdpd.store / "cdpd.sock")
        try:
            return c.call(op, args)
        finally:
            c.close()

    # ------------------------------------------------------------------ one run

    def run_once(self) -> None:
        cd = self.cdpd
        assert cd is not None and cd.proc is not None
        t = self.totals
        phase = self.rng.choice(self.phases)
        if phase == "gc" and not self.has_gc:
            phase = "writes"  # hook: `cdpctl gc --now` not present in this build
        t.phases[phase] += 1
        t.runs += 1
        gate = Gate(self.nwriters)
        per = self.model.nblocks // self.nwriters
        ws = [Writer(cd.uri("vol0"), self.model, range(i * per, (i + 1) * per), gate,
                     self.rng.randrange(1 << 30)) for i in range(self.nwriters)]
        for w in ws:
            w.start()
        for w in ws:
            w.connected.wait(30)
        fio = self._start_fio() if self.use_fio else None
        pid = cd.proc.pid
        killed = threading.Event()
        delay = self.rng.uniform(0.3, 3.0)

        def kill() -> None:
            killed.set()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(delay, kill)
        timer.start()
        try:
            while not killed.is_set():
                time.sleep(self.rng.uniform(0.02, 0.25))
                if killed.is_set() or phase == "writes":
                    continue
                alive = lambda: sum(1 for w in ws if w.is_alive())  # noqa: E731
                if not gate.quiesce(alive, timeout=10):
                    break
                try:
                    self._action(phase)
                except (CdpError, OSError, ValueError):
                    if not killed.is_set():
                        raise
                    break
                finally:
                    gate.release()
        finally:
            timer.join()
            gate.halt()
            for w in ws:
                w.join(30)
            cd.proc.wait(30)
            cd.proc = None
        t.kills += 1
        t.writes += sum(w.writes for w in ws)
        t.flushes += sum(w.flushes for w in ws)
        fio_done = None
        if fio is not None:
            fio_done = fio[0].wait(60) == 0
            self.fio_ok_seed = fio[1] if fio_done else None
        t0 = time.monotonic()
        cd.start(timeout=120)
        t.restart_seconds.append(time.monotonic() - t0)
        self._check(phase)

    def _action(self, phase: str) -> None:
        """The phase's action while the writers are quiesced. While a rewind is in flight
        ``_inflight`` holds its target's state (a kill may or may not have applied it)."""
        if phase == "markers" or (phase in ("rewind", "gc") and len(self.markers) < 2):
            state = self.model.snapshot()
            r = self._admin("snapshot", {"volumes": ["vol0"]})
            self.markers[r[0]["name"]] = (int(r[0]["seq"]), state)
            while len(self.markers) > 8:
                del self.markers[next(iter(self.markers))]
        elif phase == "rewind":
            name = self.rng.choice(list(self.markers))
            target = self.markers[name][1]
            self._inflight = target
            self._admin("rewind", {"volume": "vol0", "to": name})
            self._inflight = None
            self.model.settle(target)
            self.totals.rewinds += 1
        elif phase == "catalog":
            self._ntfs_flip()
            r = self._admin("snapshot", {"volumes": ["ntfs0"]})
            self.ntfs_markers[r[0]["name"]] = int(r[0]["seq"])
        elif phase == "gc":  # retention/compaction (present only when `cdpctl gc` is)
            assert self.cdpd is not None
            subprocess.run([*self._cdpctl_cmd(), "gc", "--now"], capture_output=True, timeout=120)

    def _cdpctl_cmd(self) -> list[str]:
        import sys

        assert self.cdpd is not None
        return [sys.executable, "-m", "cdp.cli.main", "--config", str(self.cdpd.config)]

    def _ntfs_flip(self) -> None:
        """Write the other NTFS image over ntfs0 (only the blocks that differ)."""
        assert self.cdpd is not None
        new = self.ntfs_imgs[1 - self.ntfs_state]
        old = self.ntfs_imgs[self.ntfs_state]
        with NbdClient.connect(self.cdpd.uri("ntfs0"), timeout=30) as c:
            step = 64 << 10
            for off in range(0, len(new), step):
                if new[off : off + step] != old[off : off + step]:
                    c.pwrite(new[off : off + step], off)
            c.flush()
        self.ntfs_state = 1 - self.ntfs_state

    def _start_fio(self) -> tuple[subprocess.Popen[bytes], int] | None:
        assert self.cdpd is not None
        seed = self.rng.randrange(1, 1 << 30)
        p = subprocess.Popen(self._fio_args(seed, verify_only=False), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=self.work)
        return p, seed

    def _fio_args(self, seed: int, verify_only: bool) -> list[str]:
        assert self.cdpd is not None
        return ["fio", "--name=torture", "--ioengine=nbd", f"--uri={self.cdpd.uri('vol1')}",
                "--rw=randwrite", "--bs=4k", "--size=4M", "--iodepth=8", "--verify=crc32c",
                f"--randseed={seed}", "--end_fsync=1", "--verify_state_save=0",
                "--verify_fatal=1", *(["--verify_only"] if verify_only else [])]

    # ------------------------------------------------------------------ checks

    def _problem(self, text: str) -> None:
        self.totals.problems.append(text)
        self.log(f"  PROBLEM: {text}")

    def _check(self, phase: str) -> None:
        cd = self.cdpd
        assert cd is not None
        t = self.totals
        inflight, self._inflight = self._inflight, None
        # 1. every flushed write is there
        with NbdClient.connect(cd.uri("vol0"), timeout=60) as c:
            data = c.pread(0, self.size)
        res, observed = check_blocks(self.model, data, extra=inflight)
        t.blocks_checked += res.checked
        t.lost += res.lost
        for d in res.details:
            self._problem(f"run {t.runs} ({phase}): vol0 {d}")
        self.model.settle(observed)
        # 2. reported markers are still there, and their views are exact
        listed = {m["name"]: int(m["seq"]) for m in self._admin("markers", {"volume": "vol0"})}
        for name, (seq, _state) in self.markers.items():
            t.markers_checked += 1
            if listed.get(name) != seq:
                t.lost += 1
                self._problem(f"run {t.runs}: reported {name} at @{seq} is listed as {listed.get(name)}")
        for name in self.rng.sample(list(self.markers), min(2, len(self.markers))):
            with NbdClient.connect(cd.uri(f"vol0@{name}"), timeout=60) as c:
                view = c.pread(0, self.size)
            r2 = check_exact(self.markers[name][1], view)
            t.pit_blocks_checked += r2.checked
            t.lost += r2.lost
            for d in r2.details:
                self._problem(f"run {t.runs}: vol0@{name} {d}")
        # 3. the store verifies (the user's command)
        r = cd.cdpctl("verify", check=False)
        if r.returncode == 0:
            t.verify_clean += 1
        else:
            self._problem(f"run {t.runs}: cdpctl verify exit {r.returncode}: {r.stdout}{r.stderr}")
        # 4. the last complete fio run still verifies
        if self.fio_ok_seed is not None:
            p = subprocess.run(self._fio_args(self.fio_ok_seed, verify_only=True),
                               capture_output=True, cwd=self.work, timeout=120)
            if p.returncode == 0:
                t.fio_verified += 1
            else:
                t.lost += 1
                self._problem(f"run {t.runs}: fio --verify_only failed: {p.stderr.decode()[-500:]}")
        # 5. the catalog agrees with the markers of ntfs0
        if self.use_ntfs and self.ntfs_markers:
            self._check_catalog()

    def _check_catalog(self, timeout: float = 60.0) -> None:
        t = self.totals
        listed = {m["name"]: int(m["seq"]) for m in self._admin("markers", {"volume": "ntfs0"})}
        for name, seq in self.ntfs_markers.items():
            t.markers_checked += 1
            if listed.get(name) != seq:
                t.lost += 1
                self._problem(f"run {t.runs}: reported ntfs0 {name} at @{seq} is listed as {listed.get(name)}")
        deadline = time.monotonic() + timeout
        while True:
            vs = self._admin("file_versions", {"volume": "ntfs0", "path": None})["versions"]
            cat = {v["marker"]: int(v["seq"]) for v in vs}
            bad = {k: s for k, s in cat.items() if listed.get(k) != s}
            if bad:
                self._problem(f"run {t.runs}: catalog versions not matching markers: {bad}")
                return
            if set(cat) == set(listed):
                t.catalog_versions_checked += len(cat)
                return
            if time.monotonic() > deadline:
                self._problem(f"run {t.runs}: catalog did not catch up: {sorted(set(listed) - set(cat))}")
                return
            time.sleep(0.2)

    # ------------------------------------------------------------------ driver

    def finish(self) -> None:
        """Stop cleanly and verify the stopped store offline too."""
        cd = self.cdpd
        if cd is None or cd.proc is None:
            return
        rc = cd.stop()
        if rc != 0:
            self._problem(f"cdpd exited {rc} on SIGTERM")
        r = cd.cdpctl("verify", check=False)
        if r.returncode != 0:
            self._problem(f"offline cdpctl verify exit {r.returncode}: {r.stdout}")

    def run(self, runs: int) -> Totals:
        self.setup()
        try:
            for i in range(runs):
                t0 = time.monotonic()
                self.run_once()
                t = self.totals
                self.log(f"run {i + 1}/{runs}: kills {t.kills} writes {t.writes} checked "
                         f"{t.blocks_checked} lost {t.lost} ({time.monotonic() - t0:.1f}s)")
        finally:
            try:
                self.finish()
            except Exception as e:  # report, do not hide the figures
                self._problem(f"finish: {e}")
        return self.totals


def summary(t: Totals) -> str:
    return json.dumps(t.to_dict(), indent=1)
