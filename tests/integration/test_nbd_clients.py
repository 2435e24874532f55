"""Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against our server."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.targets.nbd.proto import GREETING, OPTION_REPLY, Cmd, NbdErrno, Opt, Rep
from cdp.targets.testing.memdev import MemoryProvider
from cdp.targets.testing.nbd_thread import ServerThread
from cdp.targets.testing.nbd_wire import FLAGS, go, opt, req
from tests.conftest import require_tool
from tests.helpers import assert_bytes_equal

MiB = 1 << 20


@pytest.fixture
def srv() -> Iterator[ServerThread]:
    p = MemoryProvider()
    p.add("disk", 64 * MiB, description="scratch disk")
    p.add("ro", 4 * MiB, read_only=True, description="read-only view")
    with ServerThread(p) as s:
        yield s


def sh(*cmd: str, ok: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r


def test_qemu_io_write_read_patterns(srv: ServerThread) -> None:
    require_tool("qemu-io")
    r = sh(
        "qemu-io", "-f", "raw", srv.uri("disk"),
        "-c", "write -P 0xab 0 64k",
        "-c", "read -P 0xab 0 64k",
        "-c", "write -P 0xcd -f 1M 4k",  # FUA
        "-c", "read -P 0xcd 1M 4k",
        "-c", "write -z 2M 1M",
        "-c", "read -P 0 2M 1M",
        "-c", "discard 0 64k",
        "-c", "flush",
        "-c", "read -P 0xcd 1M 4k",
    )  # fmt: skip
    assert "Pattern verification failed" not in r.stdout + r.stderr


def test_read_only_export(srv: ServerThread) -> None:
    require_tool("qemu-io")
    # qemu sees NBD_FLAG_READ_ONLY and refuses to open read-write ...
    r = sh("qemu-io", "-f", "raw", srv.uri("ro"), "-c", "write 0 4k", ok=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr + r.stdout
    sh("qemu-io", "-r", "-f", "raw", srv.uri("ro"), "-c", "read -P 0 0 4k")
    # ... and a client that writes anyway gets EPERM from the server
    with raw_client(srv, "ro") as s:
        s.sendall(req(Cmd.WRITE, 0, 512, cookie=3) + bytes(512))
        assert simple_reply(s) == (NbdErrno.EPERM, 3)


def test_qemu_img_info_convert_compare(srv: ServerThread, tmp_path: Path) -> None:
    require_tool("qemu-img")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(8 * MiB) + bytes(8 * MiB) + os.urandom(MiB))
    info = json.loads(sh("qemu-img", "info", "--output=json", srv.uri("disk")).stdout)
    assert info["virtual-size"] == 64 * MiB
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri("disk"))
    out = tmp_path / "out.raw"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("disk"), str(out))
    assert_bytes_equal(out.read_bytes()[: src.stat().st_size], src.read_bytes())
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(out), srv.uri("disk"))


def test_nbdinfo_json_list_and_map(srv: ServerThread) -> None:
    require_tool("nbdinfo", "qemu-io")
    info = json.loads(sh("nbdinfo", "--json", srv.uri("disk")).stdout)
    (exp,) = info["exports"]
    assert exp["export-size"] == 64 * MiB
    assert exp["description"] == "scratch disk"
    assert exp["block_size_minimum"] == 1  # byte addressed, as nbdkit file
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 64 * MiB
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache",
                "can_multi_conn", "can_df"):  # fmt: skip
        assert exp[cap] is True, cap
    assert exp["is_read_only"] is False
    assert "base:allocation" in exp["contexts"]
    ro = json.loads(sh("nbdinfo", "--json", srv.uri("ro")).stdout)["exports"][0]
    assert ro["is_read_only"] is True and ro["can_trim"] is False

    listing = sh("nbdinfo", "--list", "--json", srv.uri()).stdout
    names = {e["export-name"] for e in json.loads(listing)["exports"]}
    assert names == {"disk", "ro"}

    sh("qemu-io", "-f", "raw", srv.uri("disk"), "-c", "write -P 1 1M 1M", "-c", "write -P 2 8M 64k",
       "-c", "discard 1M 512k")  # fmt: skip
    m = json.loads(sh("nbdinfo", "--map", "--json", srv.uri("disk")).stdout)
    data = [(e["offset"], e["length"]) for e in m if e["type"] == 0]
    assert data == [(1536 * 1024, 512 * 1024), (8 * MiB, 64 * 1024)]
    assert sum(e["length"] for e in m) == 64 * MiB


def test_nbdcopy_in_and_out(srv: ServerThread, tmp_path: Path) -> None:
    require_tool("nbdcopy")
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(32 * MiB))
    sh("nbdcopy", "--connections=4", str(src), srv.uri("disk"))
    out = tmp_path / "out.raw"
    sh("nbdcopy", srv.uri("disk"), str(out))
    got = out.read_bytes()
    assert len(got) == 64 * MiB
    assert_bytes_equal(got[: 32 * MiB], src.read_bytes())
    assert_bytes_equal(got[32 * MiB :], bytes(32 * MiB))


@pytest.mark.parametrize("jobs", [1, 4])
def test_fio_randwrite_verify(srv: ServerThread, jobs: int) -> None:
    require_tool("fio")
    r = sh(
        "fio", "--name=t", "--ioengine=nbd", f"--uri={srv.uri('disk')}", "--rw=randwrite",
        "--bs=4k", "--iodepth=32", "--size=8m", f"--numjobs={jobs}", "--offset_increment=8m", "--verify=crc32c", "--verify_state_save=0",
        "--verify_fatal=1", "--group_reporting", "--output-format=json",
        timeout=120,
    )  # fmt: skip
    job = json.loads(r.stdout[r.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MiB * jobs


# --- bad input over a real socket -------------------------------------------------


class raw_client:
    """A socket past the GO handshake (or just past the greeting when name is None)."""

    def __init__(self, srv: ServerThread, name: str | None) -> None:
        self.s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        assert GREETING.unpack(recv(self.s, 18))[2] == 3
        if name is not None:
            self.s.sendall(FLAGS + go(name))
            while True:
                _, _, rep, n = OPTION_REPLY.unpack(recv(self.s, 20))
                recv(self.s, n)
                if rep != Rep.INFO:
                    assert rep == Rep.ACK
                    break

    def __enter__(self) -> socket.socket:
        return self.s

    def __exit__(self, *a: object) -> None:
        self.s.close()


def recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def simple_reply(s: socket.socket) -> tuple[int, int]:
    _, err, cookie = struct.unpack(">IIQ", recv(s, 16))
    return err, cookie


def still_serving(srv: ServerThread) -> None:
    with raw_client(srv, "disk") as s:
        s.sendall(req(Cmd.FLUSH, cookie=77))
        assert simple_reply(s) == (0, 77)


def test_bad_input_over_socket(srv: ServerThread) -> None:
    # garbage instead of client flags: the server hangs up
    with raw_client(srv, None) as s:
        s.sendall(b"GARBAGE! " * 10)
        assert recv(s, 1) == b""
    still_serving(srv)
    # unknown export: NBD_REP_ERR_UNKNOWN with a message, and negotiation goes on
    with raw_client(srv, None) as s:
        s.sendall(FLAGS + go("missing"))
        _, o, rep, n = OPTION_REPLY.unpack(recv(s, 20))
        assert (o, rep) == (Opt.GO, Rep.ERR_UNKNOWN) and b"missing" in recv(s, n)
        s.sendall(opt(Opt.ABORT))
        assert OPTION_REPLY.unpack(recv(s, 20))[2] == Rep.ACK
    # past the end, absurd length, unknown command: errors, the connection goes on
    with raw_client(srv, "disk") as s:
        s.sendall(req(Cmd.READ, 64 * MiB - 512, 1024, cookie=1))
        assert simple_reply(s) == (NbdErrno.EINVAL, 1)
        s.sendall(req(Cmd.READ, 0, 0xFFFFFFFF, cookie=2))
        assert simple_reply(s) == (NbdErrno.EINVAL, 2)
        s.sendall(req(42, 0, 512, cookie=3))
        assert simple_reply(s) == (NbdErrno.EINVAL, 3)
        s.sendall(req(Cmd.READ, 0, 4, cookie=4))
        assert simple_reply(s) == (0, 4) and recv(s, 4) == bytes(4)
        # bad request magic ends this connection only
        s.sendall(b"\x00" * 28)
        assert recv(s, 1) == b""
    still_serving(srv)
