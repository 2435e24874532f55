"""The file catalog on ext4 through the whole appliance: mkfs.ext4 and fuse2fs on a file
that nbdfuse backs with a cdp volume over NBD; a marker after each round of changes;
at every marker the catalog equals The Sleuth Kit's ``fls -r -p`` of ``cdpctl image``
of that marker and what fuse2fs showed, and restored files equal what was written and
``icat``. Also ``-O ^metadata_csum,^64bit`` and ext2."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.fuse import nbdfuse_file
from tests.helpers import assert_bytes_equal
from tests.integration.test_files_catalog import snapshot, wait_catalogued
from tools.ext4_fixture import fls_entries, mounted
from tools.harness import Cdpd


@pytest.fixture
def disk(cdpd: Cdpd, tmp_path: Path) -> Iterator[Path]:
    """The live volume as a file: nbdfuse at cdp's NBD export."""
    require_tool("nbdfuse", "mkfs.ext4", "e2fsck", "fuse2fs", "fls", "icat")
    with nbdfuse_file(cdpd.uri(), tmp_path / "nbd") as disk:
        yield disk


def mkfs(disk: Path, kind: str, options: list[str]) -> None:
    subprocess.run([f"mkfs.{kind}", "-q", "-F", "-b", "4096", *options, str(disk)], check=True,
                   capture_output=True, timeout=120)


def fs_state(mnt: Path) -> dict[str, tuple[str, int]]:
    """path -> ("dir", 0) or ("file", size) as fuse2fs shows it (symlinks not followed)."""
    out: dict[str, tuple[str, int]] = {}
    for root, dirs, fnames in os.walk(mnt):
        for n in dirs + fnames:
            p = Path(root, n)
            st = p.lstat()
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            out["/" + str(p.relative_to(mnt))] = (kind, 0 if kind == "dir" else st.st_size)
    return out


def check_point(cdpd: Cdpd, tmp: Path, point: str, expected: dict[str, tuple[str, int]],
                contents: dict[str, bytes]) -> None:
    """files -r == fls -r -p of the image == what fuse2fs showed; restore == icat."""
    r = cdpd.cdpctl_json("files", "--at", point, "-r")
    assert r["fs"] == [r["fs"][0]] and r["fs"][0].startswith("ext")
    listing: dict[str, dict[str, Any]] = {e["path"]: e for e in r["entries"]}
    img = tmp / f"{point}.img"
    cdpd.cdpctl("image", "--at", point, "-o", str(img))
    fls = {p: ino for p, ino, _t in fls_entries(img)}
    assert {p: e["record"] for p, e in listing.items()} == fls
    ours = {p: (e["type"], e["size"] if e["type"] == "file" else 0) for p, e in listing.items()}
    assert ours == expected
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


def test_ext4_catalog_through_the_appliance(cdpd: Cdpd, disk: Path, tmp_path: Path) -> None:
    rnd = random.Random(25)
    mkfs(disk, "ext4", [])
    contents: dict[int, dict[str, bytes]] = {}
    expected: dict[int, dict[str, tuple[str, int]]] = {}

    # ---- marker1: a tree, a hard link, a 2,000-file directory, two fragmented files
    report = rnd.randbytes(150_000)
    pieces = [rnd.randbytes(65536) for _ in range(24)]
    with mounted(disk) as m:
        (m / "Reports" / "2024").mkdir(parents=True)
        (m / "Reports" / "Q3.xlsx").write_bytes(report)
        (m / "Reports" / "2024" / "notes.txt").write_text("quarterly notes\n")
        (m / "small.txt").write_text("hi")
        os.link(m / "small.txt", m / "Reports" / "small-link.txt")
        os.symlink("small.txt", m / "link-to-small")
        many = m / "many"
        many.mkdir()
        for i in range(2000):
            (many / f"f{i:05d}.dat").write_bytes(b"%d" % i * (i % 50))
        with open(m / "big-a.bin", "wb") as fa, open(m / "big-b.bin", "wb") as fb:
            for p in pieces:  # interleaved appends fragment both files
                fa.write(p)
                fa.flush()
                os.fsync(fa.fileno())
                fb.write(p[:40000])
                fb.flush()
                os.fsync(fb.fileno())
    # index the 2,000-entry directory (htree), as e2fsck -D does on a real system
    r = subprocess.run(["e2fsck", "-fyD", str(disk)], capture_output=True, timeout=120)
    assert r.returncode in (0, 1), r.stdout
    with mounted(disk) as m:
        expected[1] = fs_state(m)
    big_a = b"".join(pieces)
    contents[1] = {"/Reports/Q3.xlsx": report, "/small.txt": b"hi", "/big-a.bin": big_a,
                   "/many/f00049.dat": b"49" * 49}
    assert snapshot(cdpd) == "marker1"

    # ---- marker2: append, overwrite in place, truncate, renames (a file, a directory),
    # a new hard link, deletions, additions to the htree directory
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
        os.link(m / "big-a.bin", m / "Archive" / "big-a-link.bin")
        (m / "many" / "f00002.dat").unlink()
        for i in range(50):
            (m / "many" / f"added-{i:03d}").write_bytes(b"+%d" % i)
        (m / "new.txt").write_text("new file")
        expected[2] = fs_state(m)
    q3b = report[:1000] + b"X" * 500 + report[1500:]
    contents[2] = {"/Archive/Reports-2024/Q3.xlsx": q3b, "/small.txt": b"hi there",
                   "/Archive/Reports-2024/small-link.txt": b"hi there", "/new.txt": b"new file",
                   "/Archive/big-a-link.bin": big_a}
    assert snapshot(cdpd) == "marker2"

    # ---- marker3: delete many files, re-create a deleted name, delete a directory
    with mounted(disk) as m:
        for i in range(100, 400):
            (m / "many" / f"f{i:05d}.dat").unlink()
        (m / "many" / "f00002.dat").write_bytes(b"reborn")
        (m / "new.txt").unlink()
        (m / "Archive" / "Reports-2024" / "2024" / "notes.txt").unlink()
        (m / "Archive" / "Reports-2024" / "2024").rmdir()
        expected[3] = fs_state(m)
    contents[3] = {"/many/f00002.dat": b"reborn", "/big-a.bin": big_a}
    assert snapshot(cdpd) == "marker3"

    # ---- a point that is not a marker: the overlay
    with mounted(disk) as m:
        (m / "after.txt").write_text("after the last marker")
        expected[4] = fs_state(m)

    versions = wait_catalogued(cdpd, 3)
    assert [v["kind"] for v in versions] == ["full", "diff", "diff"]
    assert [v["fs"] for v in versions] == [["ext4"]] * 3
    assert all(v["stats"]["damaged"] == 0 for v in versions), versions
    assert versions[1]["stats"]["parsed"] < versions[0]["stats"]["parsed"] / 2

    for n in (1, 2, 3):
        check_point(cdpd, tmp_path, f"marker{n}", expected[n], contents[n])
    check_point(cdpd, tmp_path, "now", expected[4], {"/after.txt": b"after the last marker"})
    assert cdpd.cdpctl_json("files", "--at", "now", "/")["from_catalog"] is False

    # ---- versions, find, diff
    v = cdpd.cdpctl_json("versions", "/small.txt")["versions"]
    assert [(x["start_version"], x["end_version"], x["state"]) for x in v] == [(1, 2, "replaced"), (2, 0, "current")]
    v = cdpd.cdpctl_json("versions", "/new.txt")["versions"]
    assert [(x["start_version"], x["end_version"], x["state"]) for x in v] == [(2, 3, "deleted")]
    v = cdpd.cdpctl_json("versions", "/Reports/Q3.xlsx")["versions"]
    assert [(x["start_version"], x["end_version"], x["state"]) for x in v] == [(1, 2, "deleted")]
    f = cdpd.cdpctl_json("find", "q3*")["entries"]
    assert {e["path"] for e in f} == {"/Reports/Q3.xlsx", "/Archive/Reports-2024/Q3.xlsx"}
    d = cdpd.cdpctl_json("diff", "--from", "marker1", "--to", "marker2")["changes"]
    got = {(c["change"], c["path"], c.get("new_path")) for c in d}
    for want_row in [
        ("modified", "/small.txt", None),
        ("renamed", "/many/f00001.dat", "/many/renamed.dat"),
        ("renamed", "/Reports/2024/notes.txt", "/Archive/Reports-2024/2024/notes.txt"),
        ("deleted", "/many/f00002.dat", None),
        ("added", "/new.txt", None),
        ("added", "/Archive", None),
        ("modified", "/big-b.bin", None),
    ]:
        assert want_row in got, (want_row, sorted(got))

    # ---- status says which file system the volume holds
    st = cdpd.cdpctl_json("status")
    assert st["filesystems"] == {"marker": "marker3", "fs": [{"name": "", "fs": "ext4"}]}
    assert "file systems:  ext4 (at marker3)" in cdpd.cdpctl("status").stdout


@pytest.mark.parametrize("kind,options", [("ext4", ["-O", "^metadata_csum,^64bit"]), ("ext2", [])])
def test_older_layouts_through_the_appliance(cdpd: Cdpd, disk: Path, tmp_path: Path, kind: str,
                                             options: list[str]) -> None:
    mkfs(disk, kind, options)
    with mounted(disk) as m:
        (m / "d" / "e").mkdir(parents=True)
        (m / "d" / "e" / "f.txt").write_text("f\n")
        (m / "g.bin").write_bytes(b"g" * 70_000)
        for i in range(300):
            (m / "d" / f"n{i:03d}").write_bytes(b"")
        first = fs_state(m)
    assert snapshot(cdpd) == "marker1"
    with mounted(disk) as m:
        (m / "d" / "e").rename(m / "e-up")
        with open(m / "g.bin", "ab") as f:
            f.write(b"h" * 5000)
        os.link(m / "g.bin", m / "d" / "g-link")
        (m / "d" / "n007").unlink()
        second = fs_state(m)
    assert snapshot(cdpd) == "marker2"
    versions = wait_catalogued(cdpd, 2)
    assert [v["kind"] for v in versions] == ["full", "diff"] and versions[0]["fs"] == [kind]
    check_point(cdpd, tmp_path, "marker1", first, {"/d/e/f.txt": b"f\n"})
    check_point(cdpd, tmp_path, "marker2", second, {"/e-up/f.txt": b"f\n",
                                                    "/d/g-link": b"g" * 70_000 + b"h" * 5000})
