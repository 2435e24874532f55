"""`cdpctl volume resize` and `volume delete` against a real cdpd (issue 28, item 4):
what NBD and iSCSI clients see, and the refusals with their exit status."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from cdp.errors import ExitStatus
from cdp.targets.nbd.client import NbdClient, NbdClientError
from tests.conftest import require_tool
from tools.harness import Cdpd, run

MIB = 1 << 20


def _nbd_size(uri: str) -> int:
    return int(run("nbdinfo", "--size", uri).stdout.decode().strip())


def _iscsi_capacity(uri: str) -> int:
    out = run("iscsi-readcapacity16", uri).stdout.decode()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Total size"].strip())


def test_resize_grows_for_new_connections_and_refuses_shrink(tmp_path: Path) -> None:
    require_tool("nbdinfo", "iscsi-readcapacity16")
    d = Cdpd(tmp_path, size="1MiB").start()
    try:
        with NbdClient.connect(d.uri()) as c:
            c.pwrite(b"tail", MIB - 4)
            c.flush()
        d.cdpctl("snapshot")
        held = NbdClient.connect(d.uri())  # open across the resize
        try:
            r = d.cdpctl_json("volume", "resize", "vol0", "8MiB")
            assert r["changed"] and (r["old_size"], r["size"]) == (MIB, 8 * MIB)
            assert held.size == MIB  # an open connection keeps the size it was given
            assert held.pread(MIB - 4, 4) == b"tail"
        finally:
            held.close()
        assert _nbd_size(d.uri()) == 8 * MIB  # the next connection sees the new size
        assert _iscsi_capacity(d.iscsi_uri()) == 8 * MIB  # READ CAPACITY(16) at a new login
        # a point before the resize: the new size, zeros past the old end
        assert _nbd_size(d.uri("vol0@marker1")) == 8 * MIB
        with NbdClient.connect(d.uri("vol0@marker1")) as c:
            assert c.pread(MIB - 4, 4 + MIB) == b"tail" + bytes(MIB)
        with NbdClient.connect(d.uri()) as c:
            c.pwrite(b"grown", 7 * MIB)
            c.flush()
            assert c.pread(7 * MIB, 5) == b"grown"
        r2 = d.cdpctl("volume", "resize", "vol0", "4MiB", check=False)
        assert r2.returncode == ExitStatus.USAGE and "shrinking" in r2.stderr, r2.stderr
        r4 = d.cdpctl("volume", "resize", "vol0", str(1 << 63), check=False)
        assert r4.returncode == ExitStatus.USAGE and "too large" in r4.stderr, r4.stderr
        assert d.cdpctl_json("volume", "list")[0]["size"] == 8 * MIB
    finally:
        d.stop()
    d.start()  # the size is kept across a restart
    try:
        assert _nbd_size(d.uri()) == 8 * MIB
    finally:
        d.stop()


def test_delete_refused_while_connected_then_gone(tmp_path: Path) -> None:
    require_tool("nbdinfo")
    d = Cdpd(tmp_path, size="1MiB").start()
    try:
        d.cdpctl("volume", "create", "scratch", "--size", "2MiB")
        with NbdClient.connect(d.uri("scratch")) as c:
            c.pwrite(b"x" * 4096, 0)
            c.flush()
            r = d.cdpctl("volume", "delete", "scratch", check=False)
            assert r.returncode == ExitStatus.USAGE and "open connection" in r.stderr, r.stderr
        r = d.cdpctl("volume", "delete", "scratch")
        assert "deleted scratch" in r.stdout
        gone = run("nbdinfo", "--size", d.uri("scratch"), check=False)
        assert gone.returncode != 0
        names = [v["volume"] for v in d.cdpctl_json("volume", "list")]
        assert names == ["vol0"]
        r = d.cdpctl("volume", "delete", "scratch", check=False)
        assert r.returncode == ExitStatus.NOT_FOUND, r.stderr
        assert not (d.store / "volumes" / "scratch").exists()
        # --force with a client connected: the client gets errors, cdpd carries on
        d.cdpctl("volume", "create", "scratch", "--size", "2MiB")
        held = NbdClient.connect(d.uri("scratch"))
        try:
            held.pwrite(b"y" * 4096, 0)
            held.flush()
            r = d.cdpctl("volume", "delete", "scratch", "--force")
            assert "deleted scratch" in r.stdout
            with pytest.raises(NbdClientError):
                held.pread(0, 4096)
        finally:
            with contextlib.suppress(OSError, NbdClientError):
                held.close()
        assert [v["volume"] for v in d.cdpctl_json("volume", "list")] == ["vol0"]
        with NbdClient.connect(d.uri()) as c:  # the other volumes are served as before
            c.pwrite(b"still here", 0)
            c.flush()
    finally:
        d.stop()
