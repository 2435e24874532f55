"""The sentinel's file evidence through the whole appliance: real NTFS (mkntfs, ntfs-3g)
on a file that nbdfuse backs with a cdp volume over NBD, the catalog indexing each
marker. A benign workload (document edits, log appends, new photos and archives as
random bytes, an archive overwritten by another, renames, deletions) raises nothing; an
attack (documents encrypted in place then renamed to .locked, others written as new
.locked files with the originals deleted, ransom notes in three directories) raises an
alert whose clean point holds every document's last benign version and no attack file.
A slow attack (one document per step, a marker every two) raises one too. The same
attack on ext4 (mkfs.ext4, fuse2fs) gives the same evidence and clean point."""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tools import ext4_fixture, ntfs_fixture
from tools.harness import Cdpd

DIRS = ("Docs/Finance", "Docs/HR", "Docs/Projects")
NOTE = "README_DECRYPT.txt"
WORDS = ["invoice", "report", "customer", "balance", "meeting", "the", "and", "of", "plan"]


def _text(rng: random.Random, n: int) -> bytes:
    out: list[str] = []
    size = 0
    while size < n:
        line = " ".join(rng.choice(WORDS) for _ in range(12)) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Cdpd, Path]]:
    """cdpd (seal every 2 s, 2 s buckets) and its live volume as a file through nbdfuse."""
    require_tool("nbdfuse")
    d = Cdpd(tmp_path, size="128MiB",
             extra_config='\n[sentinel]\nbucket_seconds = "2s"\n').start()
    mnt = tmp_path / "nbd"
    mnt.mkdir()
    pidfile = tmp_path / "nbdfuse.pid"
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(mnt / "disk"), d.uri()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert proc.poll() is None or proc.returncode == 0
        assert time.monotonic() < deadline, "nbdfuse did not start"
        time.sleep(0.05)
    try:
        yield d, mnt / "disk"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        d.stop()


def snapshot_catalogued(d: Cdpd) -> str:
    name = str(d.cdpctl_json("snapshot")["name"])
    n = int(name.removeprefix("marker"))
    deadline = time.monotonic() + 120
    while True:
        r = d.cdpctl_json("versions")
        if any(v.get("version") == n for v in r["versions"]):
            return name
        assert time.monotonic() < deadline, f"{name} not catalogued"
        time.sleep(0.2)


def alerts(d: Cdpd) -> list[dict[str, Any]]:
    return list(d.cdpctl_json("alerts"))


def user_files(d: Cdpd, point: str) -> set[str]:
    r = d.cdpctl_json("files", "--at", point, "-r")
    return {e["path"] for e in r["entries"] if e["type"] == "file"
            and not e["path"].lstrip("/").startswith("$")}


def restored(d: Cdpd, tmp: Path, path: str, point: str) -> bytes:
    out = tmp / "restored"
    d.cdpctl("restore", path, "--at", point, "-o", str(out))
    return out.read_bytes()


#: the file systems the tests format the volume with: (tools, mount)
FILE_SYSTEMS: dict[str, tuple[tuple[str, ...], Callable[[Path], AbstractContextManager[Path]]]] = {
    "ntfs": (("mkntfs", "ntfs-3g"), ntfs_fixture.mounted),
    "ext4": (("mkfs.ext4", "fuse2fs"), ext4_fixture.mounted),
}


def format_volume(disk: Path, fs: str) -> None:
    """Format *disk* as *fs* ("ntfs" or "ext4")."""
    require_tool(*FILE_SYSTEMS[fs][0])
    if fs == "ntfs":
        ntfs_fixture.mkntfs(disk)
    else:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(disk)], check=True,
                       capture_output=True, timeout=120)


def mounted(disk: Path, fs: str) -> AbstractContextManager[Path]:
    """*disk* mounted read-write as *fs* (ntfs-3g or fuse2fs); unmounted on exit."""
    return FILE_SYSTEMS[fs][1](disk)


def setup_and_benign(d: Cdpd, disk: Path, rng: random.Random, fs: str = "ntfs") -> dict[str, bytes]:
    """A tree of documents (marker1) on a fresh *fs*, then the benign workload checked
    to raise nothing (on demand between markers, then at marker2). Returns each
    document's last bytes."""
    format_volume(disk, fs)
    docs: dict[str, bytes] = {}
    with mounted(disk, fs) as m:
        for i in range(18):
            p = f"/{DIRS[i % 3]}/doc{i:02d}.txt"
            docs[p] = _text(rng, rng.randrange(8 << 10, 32 << 10))
            (m / p[1:]).parent.mkdir(parents=True, exist_ok=True)
            (m / p[1:]).write_bytes(docs[p])
        (m / "logs").mkdir()
        (m / "logs" / "app.log").write_bytes(_text(rng, 20_000))
        (m / "Photos").mkdir()
        (m / "archive.zip").write_bytes(rng.randbytes(300_000))
        (m / "draft.txt").write_bytes(_text(rng, 6000))
        for i in range(5):
            (m / f"old{i}.tmp").write_bytes(_text(rng, 3000))
    snapshot_catalogued(d)
    with mounted(disk, fs) as m:  # the benign workload
        for p in list(docs)[:8]:  # document edits (rewritten, grown)
            docs[p] = docs[p][:4000] + _text(rng, 3000) + docs[p][4000:]
            (m / p[1:]).write_bytes(docs[p])
        with open(m / "logs" / "app.log", "ab") as f:
            for _ in range(50):
                f.write(_text(rng, 200))
        for i in range(12):  # new photos: random bytes into new files
            (m / "Photos" / f"IMG_{i:04d}.jpg").write_bytes(rng.randbytes(rng.randrange(100_000, 400_000)))
        (m / "backup.7z").write_bytes(rng.randbytes(500_000))
        with open(m / "archive.zip", "r+b") as f:  # an archive overwritten by another
            f.write(rng.randbytes(300_000))
        os.rename(m / "draft.txt", m / "final.txt")
        for i in range(5):
            os.unlink(m / f"old{i}.tmp")
    r = d.cdpctl_json("alerts", "scan")
    assert r["alert"] is None and r["evidence"]["encrypted_files"] == 0, r
    assert r["evidence"]["renamed"] >= 1 and r["evidence"]["deleted"] >= 5, r
    snapshot_catalogued(d)
    time.sleep(1.0)  # the marker's scan runs after the catalog commits
    assert alerts(d) == [], d.logs()
    return docs


def check_clean(d: Cdpd, tmp: Path, point: str, docs: dict[str, bytes]) -> None:
    """*point* holds every document's last benign version and no attack file."""
    files = user_files(d, point)
    assert set(docs) <= files
    assert not [p for p in files if p.endswith(".locked") or p.endswith(NOTE)], files
    for p, data in docs.items():
        assert restored(d, tmp, p, point) == data, p


@pytest.mark.parametrize("fs", ["ntfs", "ext4"])
def test_file_evidence_attack_alert_clean_point(rig: tuple[Cdpd, Path], tmp_path: Path,
                                                fs: str) -> None:
    d, disk = rig
    rng = random.Random(211)
    docs = setup_and_benign(d, disk, rng, fs)
    names = sorted(docs)
    t0 = time.monotonic()
    with mounted(disk, fs) as m:
        for p in names[:9]:  # encrypted in place, then renamed
            with open(m / p[1:], "r+b") as f:
                old = f.read()
                f.seek(0)
                f.write(bytes(a ^ b for a, b in zip(old, rng.randbytes(len(old)), strict=True)))
            os.rename(m / p[1:], m / (p[1:] + ".locked"))
        for p in names[9:]:  # written as new .locked files, the originals deleted
            (m / (p[1:] + ".locked")).write_bytes(rng.randbytes(len(docs[p])))
            os.unlink(m / p[1:])
        for dd in DIRS:
            (m / dd / NOTE).write_text("Your files are encrypted. Pay 1 BTC to decrypt.\n")
    r = d.cdpctl_json("alerts", "scan")
    latency = time.monotonic() - t0
    ev = r["evidence"]
    print(f"sentinel files ({fs}): alert {latency:.1f} s after the attack began (incl. unmount); "
          f"evidence {ev}")
    assert r["alert"] == "alert1", (r, d.logs())
    assert ev["encrypted_files"] == 18 and ev["encrypted_in_place"] == 9
    assert ev["extension_churn"] == {"extension": "locked", "files": 18}
    assert ev["ransom_note_dirs"] == 3 and r["score"] >= 1
    [a] = alerts(d)
    assert a["state"] == "active" and a["clean_point"] == "clean-before-alert1"
    benign = max(v["seq"] for v in d.cdpctl_json("versions")["versions"])
    print(f"sentinel files ({fs}): first suspicious write @{a['first_seq']}, "
          f"{a['first_seq'] - benign - 1} writes after the benign marker @{benign} "
          f"(the mount and the attack's first steps); attack writes up to @{ev['to_seq']}")
    enc = {f["path"] for f in a["files"] if f["encrypted"] and f["change"] != "added"}
    assert enc == set(docs), a["files"]
    assert {f["path"] for f in a["files"] if f["change"] == "added"} == \
        {p + ".locked" for p in names[9:]} | {f"/{dd}/{NOTE}" for dd in DIRS}
    check_clean(d, tmp_path, "clean-before-alert1", docs)
    # the next marker's scan joins the same alert
    snapshot_catalogued(d)
    time.sleep(1.0)
    assert [x["id"] for x in alerts(d)] == ["alert1"]


def test_slow_attack(rig: tuple[Cdpd, Path], tmp_path: Path) -> None:
    d, disk = rig
    fs = "ntfs"
    rng = random.Random(212)
    docs = setup_and_benign(d, disk, rng)
    names = sorted(docs)
    found: list[dict[str, Any]] = []
    for k, p in enumerate(names[:12]):  # one document per step, a marker every two
        with mounted(disk, fs) as m:
            data = (m / p[1:]).read_bytes()
            (m / (p[1:] + ".locked")).write_bytes(
                bytes(a ^ b for a, b in zip(data, rng.randbytes(len(data)), strict=True)))
            os.unlink(m / p[1:])
        time.sleep(1.0)
        if k % 2:
            snapshot_catalogued(d)
            time.sleep(0.5)
            found = alerts(d)
            if found:
                break
    assert len(found) == 1, d.logs()
    a = found[0]
    assert a["evidence"]["files"]["suspect_files_window"] >= 10
    assert a["evidence"]["files"]["encrypted_files"] <= 2  # each scan saw little
    ev = a["evidence"]["files"]
    print(f"sentinel slow attack: alert at step {k + 1} (score {a['score']}, "
          f"{ev['suspect_files_window']} suspect files in the window, {ev['encrypted_files']} "
          f"in the last scan of {ev['scan_seconds']} s)")
    check_clean(d, tmp_path, a["clean_point"], docs)
