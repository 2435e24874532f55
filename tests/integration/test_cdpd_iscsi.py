"""cdpd's iSCSI target on real volumes: what NBD writes iSCSI reads and the reverse,
across a marker and a point-in-time target; libiscsi's conformance suite on a journal-
backed volume; CHAP from config/cdp.toml."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.integration.iscsi_conformance import check_conformance
from tools.harness import Cdpd, run


def qemu_io(uri: str, *cmds: str, ro: bool = False) -> subprocess.CompletedProcess[bytes]:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if ro else [])
    for c in cmds:
        args += ["-c", c]
    return run(*args, uri)


def test_nbd_and_iscsi_see_the_same_volume(cdpd: Cdpd) -> None:
    require_tool("qemu-io", "iscsi-inq", "iscsi-readcapacity16", "iscsi-ls")
    qemu_io(cdpd.uri(), "write -P 0x5a 0 1M")
    qemu_io(cdpd.iscsi_uri(), "read -P 0x5a 0 1M", "write -P 0xa5 1M 64k", "flush")
    qemu_io(cdpd.uri(), "read -P 0xa5 1M 64k")
    marker = cdpd.cdpctl("snapshot", "--label", "both").stdout.strip()
    qemu_io(cdpd.iscsi_uri(), "write -P 0x11 0 4k")
    # the marker's read-only target shows the state at the marker
    qemu_io(cdpd.iscsi_uri(f"vol0@{marker}"), "read -P 0x5a 0 4k", "read -P 0xa5 1M 64k", ro=True)
    qemu_io(cdpd.uri(f"vol0@{marker}"), "read -P 0x5a 0 4k", ro=True)
    qemu_io(cdpd.uri(), "read -P 0x11 0 4k")
    # the journal holds iSCSI writes like NBD ones: rewind works across both
    cdpd.cdpctl("rewind", "--to", marker)
    qemu_io(cdpd.iscsi_uri(), "read -P 0x5a 0 4k")
    cap = run("iscsi-readcapacity16", cdpd.iscsi_uri()).stdout.decode()
    assert "Logical Block Length:512" in cap.replace(" ", "") or "512" in cap
    inq = run("iscsi-inq", cdpd.iscsi_uri()).stdout.decode()
    assert "cdp" in inq.lower()
    targets = run("iscsi-ls", f"iscsi://127.0.0.1:{cdpd.iscsi_port}").stdout.decode()
    assert "iqn.2026-11.io.cdp:vol0" in targets and "iqn.2026-11.io.cdp:vol0.marker1" in targets
    r = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 1 0 512", cdpd.iscsi_uri("vol0@marker1")],
        capture_output=True, text=True,
    )
    assert r.returncode != 0 or "failed" in r.stdout + r.stderr


@pytest.fixture
def small_cdpd(tmp_path: Path) -> Iterator[Cdpd]:
    d = Cdpd(tmp_path, size="64MiB").start()
    try:
        yield d
    finally:
        if d.proc is not None:
            d.stop()


@pytest.mark.slow
def test_conformance_suite_on_a_journal_volume(small_cdpd: Cdpd) -> None:
    check_conformance(small_cdpd.iscsi_uri())
    assert small_cdpd.cdpctl("verify").returncode == 0


def test_chap_from_config(tmp_path: Path) -> None:
    require_tool("iscsi-inq")
    chap = '[iscsi.chap.vol0]\nuser = "host1"\nsecret = "correct-horse-battery"\n'
    d = Cdpd(tmp_path, extra_config=chap).start()
    try:
        base = d.iscsi_uri()
        bad = base.replace("iscsi://", "iscsi://host1%wrong-secret-123@")
        r = subprocess.run(["iscsi-inq", bad], capture_output=True, text=True)
        assert r.returncode != 0
        good = base.replace("iscsi://", "iscsi://host1%correct-horse-battery@")
        run("iscsi-inq", good)
        r = subprocess.run(["iscsi-inq", base], capture_output=True, text=True)
        assert r.returncode != 0, "a target with CHAP accepted a login without it"
    finally:
        d.stop()
