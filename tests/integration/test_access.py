"""Access: the admin socket is the owner's only; listeners bind loopback by default;
NBD export names never reach outside the store; NBD over TLS (NBD_OPT_STARTTLS) with
real clients (nbdinfo, qemu-img) and "require" refusing plaintext."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.config import Settings, parse_config
from cdp.errors import ConfigError
from cdp.targets.nbd.proto import Opt, Rep
from tests.conftest import require_tool
from tools.harness import Cdpd, run


def _open_up(path: Path) -> None:
    """Let other users traverse to *path* (pytest's tmp dirs are 0700)."""
    for p in [path, *path.parents]:
        if p == Path("/"):
            break
        mode = p.stat().st_mode
        os.chmod(p, mode | stat.S_IXOTH | stat.S_IROTH)


@pytest.fixture
def open_cdpd() -> Iterator[Cdpd]:
    """A cdpd in a directory every user may traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="cdp-access-", dir="/tmp"))
    os.chmod(d, 0o755)
    c = Cdpd(d).start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(d, ignore_errors=True)


def _cdpctl_as_nobody(config: Path, *args: str) -> tuple[int, str]:
    """cdpctl *args* run by uid/gid 65534 (nobody): (exit status, stderr).

    A forked child of this process drops to nobody and runs cdpctl's ``main`` with
    the modules already loaded, so the checkout and its virtualenv need not be
    readable by other users (a clone in a 0700 directory is common: /root, mktemp -d).
    """
    from cdp.cli import main as cdpctl

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 99
        try:
            os.close(r)
            err = os.fdopen(w, "w")
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the child exits below
            sys.stderr = err
            signal.alarm(60)  # a stuck child ends (SIGALRM) instead of hanging pytest
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = cdpctl.main(["--config", str(config), *args])
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 98
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        stderr = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stderr


def test_admin_socket_is_owner_only(open_cdpd: Cdpd) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run cdpctl as another user")
    cdpd = open_cdpd
    sock = cdpd.store / "cdpd.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    _open_up(cdpd.store)
    os.chmod(cdpd.config, 0o644)
    code, err = _cdpctl_as_nobody(cdpd.config, "status")
    assert code != 0
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    # even with the file mode opened up, the daemon checks the peer's uid
    os.chmod(sock, 0o666)
    try:
        # regression: a refusal racing the request's send ended in BrokenPipeError, which
        # cdpctl took for a closed stdout and exited 0 having done nothing
        for cmd in (["status"], ["snapshot"], ["rewind", "--to", "@0"], ["verify"]):
            code, err = _cdpctl_as_nobody(cdpd.config, *cmd)
            assert code == 8, (cmd, code, err)
            assert err.strip() == "cdpctl: not the store's owner", err
    finally:
        os.chmod(sock, 0o600)
    assert cdpd.cdpctl_json("markers") == []  # nothing was done for the other user
    assert cdpd.cdpctl("status").returncode == 0  # the owner still can


def test_listeners_bind_loopback_by_default(cdpd: Cdpd) -> None:
    s = Settings()
    assert (s.nbd.host, s.metrics.host, s.iscsi.host) == ("127.0.0.1",) * 3
    from cdp.config import load_config

    shipped = load_config(Path(__file__).resolve().parents[2] / "config" / "cdp.toml")
    assert (shipped.nbd.host, shipped.metrics.host, shipped.iscsi.host) == ("127.0.0.1",) * 3
    assert shipped.nbd_tls.mode == "off"
    info = json.loads((cdpd.store / "cdpd.json").read_text())
    for key in ("nbd", "metrics", "iscsi"):
        assert info[key].startswith("127.0.0.1:"), info


def _go(port: int, name: bytes) -> int:
    """NBD_OPT_GO with a raw export name; returns the first reply type."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.read(18)
        s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", 0x49484156454F5054, Opt.GO, len(data)) + data)
        _magic, _opt, rep, ln = struct.unpack(">QIII", f.read(20))
        f.read(ln)
        return int(rep)


@pytest.mark.parametrize("name", [b"../vol0", b"/etc/passwd", b"vol0/../vol0", b"vol0\x00",
                                  b"..", b"volumes/vol0", b"vol0/journal", b"../../etc/passwd",
                                  b"vol0@../../x", b"%2e%2e", b"\x00", b"vol0@marker1/../.."])
def test_export_names_cannot_escape_the_store(cdpd: Cdpd, name: bytes) -> None:
    rep = _go(cdpd.nbd_port, name)
    assert rep & (1 << 31), f"{name!r} was accepted"
    assert rep in (Rep.ERR_UNKNOWN, Rep.ERR_INVALID), hex(rep)
    assert _go(cdpd.nbd_port, b"vol0") in (Rep.INFO, Rep.ACK)


# ---------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed CA and a server certificate for 127.0.0.1 (openssl)."""
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    o = ["openssl"]
    run(*o, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cdp test CA",
        "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"))
    run(*o, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(d / "server-key.pem"), "-out", str(d / "server.csr"))
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n")
    run(*o, "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca-cert.pem"),
        "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
        "-extfile", str(d / "ext.cnf"), "-out", str(d / "server-cert.pem"))
    client = d / "client"  # what libnbd and qemu read: DIR/ca-cert.pem
    client.mkdir()
    shutil.copy(d / "ca-cert.pem", client / "ca-cert.pem")
    return d


def _tls_cdpd(tmp: Path, certs: Path, mode: str) -> Cdpd:
    return Cdpd(tmp, extra_config=f'\n[nbd]\ntls = "{mode}"\ntls_cert = "{certs / "server-cert.pem"}"\n'
                f'tls_key = "{certs / "server-key.pem"}"\n').start()


@pytest.fixture
def tls_require(tmp_path: Path, certs: Path) -> Iterator[Cdpd]:
    d = _tls_cdpd(tmp_path, certs, "require")
    try:
        yield d
    finally:
        d.stop()


def test_tls_require_with_nbdinfo_and_qemu(tls_require: Cdpd, certs: Path) -> None:
    require_tool("nbdinfo", "qemu-img", "qemu-io")
    port = tls_require.nbd_port
    cdir = certs / "client"
    uri = f"nbds://127.0.0.1:{port}/vol0?tls-certificates={cdir}"
    r = run("nbdinfo", "--json", uri)
    assert json.loads(r.stdout)["exports"][0]["export-size"] == 256 << 20
    # plaintext is refused
    r = run("nbdinfo", f"nbd://127.0.0.1:{port}/vol0", check=False)
    assert r.returncode != 0
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={cdir}"
    opts = f"driver=nbd,host=127.0.0.1,port={port},export=vol0,tls-creds=tls0"
    run("qemu-io", "--object", obj, "--image-opts", opts, "-c", "write -P 0x5a 0 64k")
    run("qemu-io", "--object", obj, "--image-opts", opts, "-c", "read -P 0x5a 0 64k")
    r = run("qemu-img", "info", "--object", obj, "--image-opts", opts)
    assert b"virtual size: 256 MiB" in r.stdout


def test_tls_require_refuses_options_before_starttls(tls_require: Cdpd) -> None:
    with socket.create_connection(("127.0.0.1", tls_require.nbd_port), timeout=10) as s:
        f = s.makefile("rb")
        f.read(18)
        s.sendall(struct.pack(">I", 3))
        s.sendall(struct.pack(">QII", 0x49484156454F5054, Opt.LIST, 0))
        _m, opt, rep, ln = struct.unpack(">QIII", f.read(20))
        assert (opt, rep) == (Opt.LIST, Rep.ERR_TLS_REQD)
        f.read(ln)


def test_tls_on_serves_both(tmp_path: Path, certs: Path) -> None:
    require_tool("nbdinfo")
    d = _tls_cdpd(tmp_path, certs, "on")
    try:
        cdir = certs / "client"
        run("nbdinfo", f"nbds://127.0.0.1:{d.nbd_port}/vol0?tls-certificates={cdir}")
        run("nbdinfo", f"nbd://127.0.0.1:{d.nbd_port}/vol0")
    finally:
        d.stop()


def test_tls_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nbd\.tls"):
        parse_config({"nbd": {"tls": "maybe"}})
    with pytest.raises(ConfigError, match=r"nbd\.tls_cert"):
        parse_config({"nbd": {"tls": "require"}})
    with pytest.raises(ConfigError, match=r"nbd\.tls_key"):
        parse_config({"nbd": {"tls": "on", "tls_cert": __file__, "tls_key": str(tmp_path / "none.pem")}})
    s = parse_config({"nbd": {"tls": "on", "tls_cert": __file__, "tls_key": __file__, "listen": "127.0.0.1:1"}})
    assert s.nbd_tls.mode == "on" and s.nbd.port == 1
