"""The file catalog through the whole appliance: real NTFS (mkntfs, ntfs-3g) on a file
that nbdfuse backs with a cdp volume over NBD; markers with cdpctl; the catalog checked
against The Sleuth Kit (fls, icat) on `cdpctl image` of every marker and against what
the file system showed before each marker."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.fuse import nbdfuse_file
from tests.helpers import assert_bytes_equal
from tools.harness import Cdpd
from tools.ntfs_fixture import fls_entries, mkntfs, mounted, set_ads

SYSTEM = ("$", "$Extend/")


@pytest.fixture
def disk(cdpd: Cdpd, tmp_path: Path) -> Iterator[Path]:
    """The live volume as a file: nbdfuse straight at cdp's NBD export (NTFS tools write
    unaligned byte ranges; cdp takes them as they are, minimum block size 1)."""
    require_tool("nbdfuse", "mkntfs", "ntfs-3g", "fls", "icat")
    with nbdfuse_file(cdpd.uri(), tmp_path / "nbd") as disk:
        yield disk


def snapshot(cdpd: Cdpd) -> str:
    return str(cdpd.cdpctl_json("snapshot")["name"])


def wait_catalogued(cdpd: Cdpd, n: int, timeout: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        r = cdpd.cdpctl_json("versions")
        if len(r["versions"]) >= n:
            return list(r["versions"])
        assert r.get("last_error") is None, r["last_error"]
        assert time.monotonic() < deadline, f"catalog has {len(r['versions'])} of {n} markers"
        time.sleep(0.2)


def fs_state(mnt: Path) -> dict[str, tuple[str, int]]:
    """path -> (type, size) as the mounted file system shows it."""
    out: dict[str, tuple[str, int]] = {}
    for root, dirs, fnames in os.walk(mnt):
        for d in dirs:
            p = Path(root, d)
            out["/" + str(p.relative_to(mnt))] = ("dir", 0)
        for f in fnames:
            p = Path(root, f)
            out["/" + str(p.relative_to(mnt))] = ("file", p.stat().st_size)
    return out


def user(path: str) -> bool:
    p = path.lstrip("/")
    return not p.startswith(SYSTEM) and not p.startswith("$OrphanFiles")


def catalog_listing(cdpd: Cdpd, point: str) -> dict[str, dict[str, Any]]:
    r = cdpd.cdpctl_json("files", "--at", point, "-r")
    return {e["path"]: e for e in r["entries"] if user(e["path"])}


def check_point(cdpd: Cdpd, tmp: Path, point: str, expected: dict[str, tuple[str, int]],
                contents: dict[str, bytes]) -> None:
    """files -r == fls -r -p on the image == what the mount showed; restore == icat."""
    listing = catalog_listing(cdpd, point)
    img = tmp / f"{point}.img"
    cdpd.cdpctl("image", "--at", point, "-o", str(img))
    fls = [r for r in fls_entries(img) if not r["deleted"] and user(str(r["path"]))]
    fls_names = {"/" + str(r["path"]): ("dir" if r["type"] == "d" else "file")
                 for r in fls if r["stream"] is None}
    ours = {p: e["type"] for p, e in listing.items()}
    assert ours == fls_names
    assert {p: (e["type"], e["size"] if e["type"] == "file" else 0) for p, e in listing.items()} == expected
    fls_streams = {("/" + str(r["path"]), str(r["stream"])) for r in fls if r["stream"]}
    our_streams = {(p, s["name"]) for p, e in listing.items() for s in e["streams"]}
    assert our_streams == fls_streams
    for path, data in contents.items():
        out = tmp / "restored"
        cdpd.cdpctl("restore", path, "--at", point, "-o", str(out))
        got = out.read_bytes()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), path
        icat = subprocess.run(["icat", str(img), str(listing[path]["record"])],
                              capture_output=True, check=True).stdout
        assert_bytes_equal(got, icat, path)
        assert abs(out.stat().st_mtime_ns - listing[path]["modified_ns"]) < 1000
    img.unlink()


def test_files_catalog_through_the_appliance(cdpd: Cdpd, disk: Path, tmp_path: Path) -> None:
    rnd = random.Random(5)
    mkntfs(disk)
    contents: dict[int, dict[str, bytes]] = {}
    expected: dict[int, dict[str, tuple[str, int]]] = {}

    # ---- marker1: a tree, hard link, ADS, thousands of small files, a fragmented file
    q3 = rnd.randbytes(150_000)
    with mounted(disk) as m:
        (m / "Reports" / "2024").mkdir(parents=True)
        (m / "Reports" / "Q3.xlsx").write_bytes(q3)
        (m / "Reports" / "2024" / "notes.txt").write_text("quarterly notes\n")
        (m / "small.txt").write_text("hi")
        os.link(m / "small.txt", m / "Reports" / "small-link.txt")
        set_ads(m / "Reports" / "Q3.xlsx", "Zone.Identifier", b"[ZoneTransfer]\r\nZoneId=3\r\n")
        many = m / "many"
        many.mkdir()
        for i in range(2000):
            (many / f"f{i:05d}.dat").write_bytes(b"%d" % i * (i % 50))
        a, b = m / "big-a.bin", m / "big-b.bin"
        pieces_a = [rnd.randbytes(65536) for _ in range(48)]
        with open(a, "wb") as fa, open(b, "wb") as fb:
            for p in pieces_a:  # interleaved appends fragment both files
                fa.write(p)
                fa.flush()
                os.fsync(fa.fileno())
                fb.write(p[:40000])
                fb.flush()
                os.fsync(fb.fileno())
        expected[1] = fs_state(m)
    big_a = b"".join(pieces_a)
    contents[1] = {"/Reports/Q3.xlsx": q3, "/small.txt": b"hi", "/big-a.bin": big_a}
    assert snapshot(cdpd) == "marker1"

    # ---- marker2: append, overwrite in place, truncate, rename, move a dir, delete
    with mounted(disk) as m:
        with open(m / "small.txt", "ab") as f:
            f.write(b" there")
        with open(m / "Reports" / "Q3.xlsx", "r+b") as f:
            f.seek(1000)
            f.write(b"X" * 500)
        os.truncate(m / "big-b.bin", 10_000)
        (m / "many" / "f00001.dat").rename(m / "many" / "renamed.dat")
        (m / "Archive").mkdir()
        (m / "Reports").rename(m / "Archive" / "Reports-2024")
        (m / "many" / "f00002.dat").unlink()
        (m / "new.txt").write_text("new file")
        expected[2] = fs_state(m)
    q3b = q3[:1000] + b"X" * 500 + q3[1500:]
    contents[2] = {"/Archive/Reports-2024/Q3.xlsx": q3b, "/small.txt": b"hi there",
                   "/new.txt": b"new file"}
    assert snapshot(cdpd) == "marker2"

    # ---- marker3: delete many files, re-create a deleted name
    with mounted(disk) as m:
        for i in range(100, 400):
            (m / "many" / f"f{i:05d}.dat").unlink()
        (m / "many" / "f00002.dat").write_bytes(b"reborn")
        (m / "new.txt").unlink()
        expected[3] = fs_state(m)
    contents[3] = {"/many/f00002.dat": b"reborn", "/big-a.bin": big_a}
    assert snapshot(cdpd) == "marker3"

    # ---- a point that is not a marker: the overlay
    with mounted(disk) as m:
        (m / "after.txt").write_text("after the last marker")
        expected[4] = fs_state(m)

    versions = wait_catalogued(cdpd, 3)
    assert [v["kind"] for v in versions] == ["full", "diff", "diff"]
    assert all(v["stats"]["damaged"] == 0 for v in versions)
    # the diffs parsed only a fraction of the MFT
    assert versions[1]["stats"]["parsed"] < versions[0]["stats"]["parsed"] / 2

    for n in (1, 2, 3):
        want = {p: v for p, v in expected[n].items() if user(p)}
        check_point(cdpd, tmp_path, f"marker{n}", want, contents[n])
    now = {p: v for p, v in expected[4].items() if user(p)}
    check_point(cdpd, tmp_path, "now", now, {"/after.txt": b"after the last marker"})
    r = cdpd.cdpctl_json("files", "--at", "now", "/")
    assert r["from_catalog"] is False

    # ---- versions: small.txt modified once; new.txt added then deleted
    v = cdpd.cdpctl_json("versions", "/small.txt")["versions"]
    assert [(x["start_version"], x["end_version"], x["state"]) for x in v] == [(1, 2, "replaced"), (2, 0, "current")]
    v = cdpd.cdpctl_json("versions", "/new.txt")["versions"]
    assert [(x["start_version"], x["end_version"], x["state"]) for x in v] == [(2, 3, "deleted")]
    v = cdpd.cdpctl_json("versions", "/Reports/Q3.xlsx")["versions"]
    assert [(x["start_version"], x["end_version"], x["state"]) for x in v] == [(1, 2, "deleted")]

    # ---- find across versions and at a point
    f = cdpd.cdpctl_json("find", "q3*")["entries"]
    assert {e["path"] for e in f} == {"/Reports/Q3.xlsx", "/Archive/Reports-2024/Q3.xlsx"}
    f = cdpd.cdpctl_json("find", "q3*", "--at", "marker1")["entries"]
    assert [e["path"] for e in f] == ["/Reports/Q3.xlsx"]

    # ---- diff marker1 -> marker2 is what the script did
    d = cdpd.cdpctl_json("diff", "--from", "marker1", "--to", "marker2")["changes"]
    got = {(c["change"], c["path"], c.get("new_path")) for c in d}
    for want_row in [
        ("modified", "/small.txt", None),
        ("renamed", "/many/f00001.dat", "/many/renamed.dat"),
        ("renamed", "/Reports", "/Archive/Reports-2024"),
        ("renamed", "/Reports/2024/notes.txt", "/Archive/Reports-2024/2024/notes.txt"),
        ("deleted", "/many/f00002.dat", None),
        ("added", "/new.txt", None),
        ("added", "/Archive", None),
        ("modified", "/big-b.bin", None),
    ]:
        assert want_row in got, (want_row, sorted(got))
    assert not any(c["path"].startswith("/many/f0") and c["change"] != "deleted" and c["path"] != "/many/f00001.dat"
                   for c in d if c["change"] != "modified"), d
    d = cdpd.cdpctl_json("diff", "--from", "marker2", "--to", "marker3")["changes"]
    deleted = {c["path"] for c in d if c["change"] == "deleted"}
    assert {f"/many/f{i:05d}.dat" for i in range(100, 400)} | {"/new.txt"} <= deleted
    assert ("added", "/many/f00002.dat") in {(c["change"], c["path"]) for c in d}

    # ---- restart: offline commands read the same catalog
    cdpd.stop()
    r = cdpd.cdpctl("files", "--at", "marker2", "/Archive", "--json")
    names = {e["name"] for e in json.loads(r.stdout)["entries"]}
    assert names == {"Reports-2024"}
