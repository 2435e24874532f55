"""The operator's first hour with the file catalog (issue 28): ``find`` as docs/FILES.md
writes it, and what it prints when nothing matched or a file is past the last marker.
Real NTFS (mkntfs, ntfs-3g) on a cdp volume through nbdfuse, as test_files_catalog."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from tests.integration.test_files_catalog import disk, snapshot, wait_catalogued
from tools.harness import Cdpd
from tools.ntfs_fixture import mkntfs, mounted, set_ads

__all__ = ["disk"]  # the fixture, imported for pytest


def test_find_as_the_docs_write_it(cdpd: Cdpd, disk: Path) -> None:
    mkntfs(disk)
    with mounted(disk) as m:
        (m / "Reports" / "2024").mkdir(parents=True)
        (m / "Reports" / "2024" / "Q3.xlsx").write_bytes(b"q3")
        (m / "Other" / "Reports" / "2024").mkdir(parents=True)
        (m / "Other" / "Reports" / "2024" / "q3-copy.xlsx").write_bytes(b"q3 copy")
    assert snapshot(cdpd) == "marker1"
    wait_catalogued(cdpd, 1)

    # item 6: a path pattern without a leading '/' is anchored at the root
    f = cdpd.cdpctl_json("find", "reports/*/q3*", "--at", "marker1")["entries"]
    assert [e["path"] for e in f] == ["/Reports/2024/Q3.xlsx"]
    f = cdpd.cdpctl_json("find", "reports/*/q3*")["entries"]
    assert [e["path"] for e in f] == ["/Reports/2024/Q3.xlsx"]
    f = cdpd.cdpctl_json("find", "*/2024/q3*")["entries"]  # '*' crosses '/'
    assert sorted(e["path"] for e in f) == ["/Other/Reports/2024/q3-copy.xlsx", "/Reports/2024/Q3.xlsx"]
    r = cdpd.cdpctl("find", "nothing-here*", check=False)
    assert r.returncode == 1 and "no matches" in r.stderr and r.stdout == "", (r.returncode, r.stderr)
    r = cdpd.cdpctl("find", "nothing-here*", "--json", check=False)
    assert r.returncode == 1 and '"entries": []' in r.stdout

    # item 14: a file past the last marker is not shown as "marker0.."
    with mounted(disk) as m:
        (m / "Reports" / "2024" / "Q3-late.xlsx").write_bytes(b"late")
    out = cdpd.cdpctl("find", "q3*", "--at", "now").stdout
    assert "marker0" not in out, out
    late = next(line for line in out.splitlines() if "Q3-late" in line)
    assert "after the last marker" in late, out
    assert "marker1.." in next(line for line in out.splitlines() if "/Q3.xlsx" in line), out


ODD = ["/odd/a:b.txt", "/odd/-dash.txt", "/odd/with space.txt", "/odd/new\nline.txt", "/odd/--"]


def test_restore_reaches_every_name_and_streams_have_their_option(cdpd: Cdpd, disk: Path,
                                                                   tmp_path: Path) -> None:
    """Issue 28 item 5: PATH is literal (':' is part of a name, not a stream); streams
    are --stream NAME."""
    mkntfs(disk)
    with mounted(disk) as m:
        (m / "odd").mkdir()
        for i, p in enumerate(ODD):
            (m / p.lstrip("/")).write_bytes(b"file %d" % i)
        (m / "odd" / "a").write_bytes(b"plain a")
        set_ads(m / "odd" / "a", "b.txt", b"the stream b.txt of a")
    assert snapshot(cdpd) == "marker1"
    wait_catalogued(cdpd, 1)
    out = tmp_path / "out"
    for i, p in enumerate(ODD):
        r = cdpd.cdpctl("restore", "--at", "marker1", "-o", str(out), "--", p)
        assert out.read_bytes() == b"file %d" % i, (p, r.stdout)
        assert len(r.stdout.splitlines()) == 1, r.stdout
    cdpd.cdpctl("restore", "/odd/a", "--stream", "b.txt", "--at", "marker1", "-o", str(out))
    assert out.read_bytes() == b"the stream b.txt of a"
    cdpd.cdpctl("restore", "/odd/a", "--at", "marker1", "-o", str(out))
    assert out.read_bytes() == b"plain a"
    r = cdpd.cdpctl("restore", "/odd/a", "--stream", "nope", "--at", "marker1", "-o", str(out), check=False)
    assert r.returncode == 3 and "no stream 'nope'" in r.stderr, r.stderr


LONE = "/odd/lone-\udc00.txt"  # an NTFS name with a lone UTF-16 surrogate (legal in NTFS)
TWIN = "/odd/lone-\U0010fc00.txt"  # the character cdp stores a lone U+DC00 as: kept apart


def test_names_with_lone_surrogates_are_reachable(cdpd: Cdpd, disk: Path, tmp_path: Path) -> None:
    """Issue 28 item 5: a name that is not valid Unicode stays exact: ``files``, ``find``,
    ``versions`` and ``restore`` reach it, typed as bash's $'...' gives it (WTF-8 bytes),
    and it prints escaped on one line."""
    mkntfs(disk)
    with mounted(disk) as m:
        (m / "odd").mkdir()
        for p, data in ((LONE, b"lone"), (TWIN, b"twin")):  # ntfs-3g takes WTF-8 bytes
            raw = os.fsencode(str(m)) + p.encode("utf-8", "surrogatepass")
            with open(raw, "wb") as f:
                f.write(data)
    assert snapshot(cdpd) == "marker1"
    wait_catalogued(cdpd, 1)
    argv = os.fsdecode(LONE.encode("utf-8", "surrogatepass"))  # what bash passes for $'\udc00'

    rows = cdpd.cdpctl_json("files", "/odd", "--at", "marker1")["entries"]
    assert sorted(e["path"] for e in rows) == sorted([LONE, TWIN])
    out = cdpd.cdpctl("files", "/odd", "--at", "marker1").stdout
    assert "'lone-\\udc00.txt'" in out and len(out.splitlines()) == 3, out
    found = cdpd.cdpctl_json("find", "lone-*")["entries"]
    assert sorted(e["path"] for e in found) == sorted([LONE, TWIN])
    assert [e["path"] for e in cdpd.cdpctl_json("find", argv.rsplit("/", 1)[1])["entries"]] == [LONE]
    out = cdpd.cdpctl("find", "lone-*", "--at", "marker1").stdout
    assert "'/odd/lone-\\udc00.txt'" in out, out
    v = cdpd.cdpctl_json("versions", argv)
    assert v["path"] == LONE and [r["size"] for r in v["versions"]] == [4]
    dest = tmp_path / "restored"
    for p, data in ((argv, b"lone"), (TWIN, b"twin")):
        r = cdpd.cdpctl("restore", "--at", "marker1", "-o", str(dest), "--", p)
        assert dest.read_bytes() == data and len(r.stdout.splitlines()) == 1, r.stdout
    assert "'/odd/lone-\\udc00.txt'" in cdpd.cdpctl("restore", "--at", "marker1", "-o", str(dest),
                                                      argv).stdout


def _flip_in_journal(store: Path, needle: bytes) -> None:
    """Flip the first byte of *needle* where the journal stores it (in place)."""
    for seg in sorted(store.glob("volumes/*/journal/*.seg")):
        i = seg.read_bytes().find(needle)
        if i >= 0:
            with open(seg, "r+b") as f:
                f.seek(i)
                b = f.read(1)
                f.seek(i)
                f.write(bytes([b[0] ^ 0xFF]))
            return
    raise AssertionError("the file's data is not in the journal")


def test_restore_on_error_maps_a_damaged_record(cdpd: Cdpd, disk: Path, tmp_path: Path) -> None:
    """Issue 28 item 13: a record failing its checksum stops a restore (exit 6); with
    --on-error zero the damaged 4 KiB is zeroed and reported, with skip-file the file is
    left unwritten; both list the damaged range (text and --json)."""
    mkntfs(disk)
    data = random.Random(13).randbytes(512 << 10)  # incompressible: stored as written
    with mounted(disk) as m:
        (m / "big.bin").write_bytes(data)
    assert snapshot(cdpd) == "marker1"
    wait_catalogued(cdpd, 1)
    hit = 300_000
    _flip_in_journal(cdpd.store, data[hit : hit + 64])
    out = tmp_path / "big.bin"
    r = cdpd.cdpctl("restore", "/big.bin", "--at", "marker1", "-o", str(out), check=False)
    assert r.returncode == 6 and "checksum" in r.stderr and not out.exists(), r.stderr
    r = cdpd.cdpctl("restore", "/big.bin", "--at", "marker1", "-o", str(out), "--on-error", "zero",
                    check=False)
    assert r.returncode == 6 and "damaged: offset" in r.stderr and "zeroed" in r.stderr, r.stderr
    got = out.read_bytes()
    diff = [i for i in range(len(data)) if got[i] != data[i]]
    assert diff and diff[0] // 4096 == diff[-1] // 4096 == hit // 4096  # one granule lost
    lo = hit // 4096 * 4096
    assert got[lo : lo + 4096] == bytes(4096) and got[:lo] == data[:lo] and got[lo + 4096:] == data[lo + 4096:]
    out.unlink()
    r = cdpd.cdpctl("restore", "/big.bin", "--at", "marker1", "-o", str(out), "--on-error",
                    "skip-file", "--json", check=False)
    j = json.loads(r.stdout)
    assert r.returncode == 6 and j["skipped"] and not out.exists()
    assert [(d["offset"], d["length"]) for d in j["damaged"]] == [(lo, 4096)]
    assert j["damaged"][0]["source_offset"] % 512 == 0 and "checksum" in j["damaged"][0]["reason"]
