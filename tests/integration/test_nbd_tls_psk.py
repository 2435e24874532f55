"""Who may connect over NBD, by pre-shared key: ``[nbd] tls_psk`` (a ``user:hexkey``
file, as ``nbdkit --tls-psk`` reads) and per-volume access by PSK user
(``[[nbd.client]] user = ...``), driven with nbdinfo, qemu-img and qemu-io holding the
right key, a wrong key, an unknown user and no TLS at all. A refused client is logged
with its user, gets an error, and nothing it sent reaches the journal."""

from __future__ import annotations

import json
import os
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.config import parse_config, psk_supported
from cdp.errors import ConfigError
from tests.conftest import require_tool
from tests.qemu import qemu_io_tls
from tools.harness import Cdpd, run

ALICE, BOB = secrets.token_hex(32), secrets.token_hex(32)


def _keys(path: Path, lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(lines)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def psk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's key file and one client directory per case, each holding the
    ``keys.psk`` file QEMU's tls-creds-psk reads (libnbd takes the same file)."""
    d = tmp_path_factory.mktemp("psk")
    _keys(d / "server.psk", f"# cdp test keys\nalice:{ALICE}\n\nbob:{BOB}\n")
    _keys(d / "alice" / "keys.psk", f"alice:{ALICE}\n")
    _keys(d / "bob" / "keys.psk", f"bob:{BOB}\n")
    _keys(d / "wrongkey" / "keys.psk", f"alice:{secrets.token_hex(32)}\n")
    _keys(d / "mallory" / "keys.psk", f"mallory:{secrets.token_hex(32)}\n")
    return d


@pytest.fixture
def cdpd_psk(tmp_path: Path, psk: Path) -> Iterator[Cdpd]:
    if not psk_supported():
        pytest.fail("TLS pre-shared keys need Python 3.13's ssl module; this test runs on "
                    f"{ssl.OPENSSL_VERSION} under a Python without them (make the venv with "
                    "python3.13: see the README)")
    cfg = f"""
[nbd]
tls = "require"
tls_psk = "{psk / 'server.psk'}"

[[nbd.client]]
user = "alice"
read_write = ["vol0"]
read_only = ["vol1"]

[[nbd.client]]
user = "bob"
read_only = ["vol0"]

[[volume]]
name = "vol1"
size = "16MiB"
"""
    d = Cdpd(tmp_path, size="64MiB", extra_config=cfg).start()
    try:
        yield d
    finally:
        d.stop()


def _user(who: str) -> str:
    return "alice" if who == "wrongkey" else who


def _qemu(psk: Path, who: str, port: int, export: str) -> tuple[str, str]:
    obj = f"tls-creds-psk,id=tls0,endpoint=client,dir={psk / who},username={_user(who)}"
    return obj, f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0"


def _qemu_io(psk: Path, who: str, port: int, export: str, cmd: str, check: bool = True
             ) -> tuple[int, str]:
    return qemu_io_tls(*_qemu(psk, who, port, export), cmd, check)


def _nbdinfo(psk: Path, who: str, port: int, export: str) -> tuple[int, str]:
    uri = f"nbds://{_user(who)}@127.0.0.1:{port}/{export}?tls-psk-file={psk / who / 'keys.psk'}"
    r = run("nbdinfo", "--json", uri, check=False)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def test_pre_shared_keys_and_per_volume_access(cdpd_psk: Cdpd, psk: Path) -> None:
    require_tool("nbdinfo", "qemu-img", "qemu-io")
    d, port = cdpd_psk, cdpd_psk.nbd_port
    # alice: writes vol0, reads vol1 and may not write it
    assert _qemu_io(psk, "alice", port, "vol0", "write -P 0x5a 0 64k")[0] == 0
    assert _qemu_io(psk, "alice", port, "vol0", "read -P 0x5a 0 64k")[0] == 0
    rc, out = _nbdinfo(psk, "alice", port, "vol0")
    assert rc == 0 and not json.loads(out)["exports"][0]["is_read_only"], out
    rc, out = _nbdinfo(psk, "alice", port, "vol1")
    assert rc == 0 and json.loads(out)["exports"][0]["is_read_only"], out
    assert _qemu_io(psk, "alice", port, "vol1", "write -P 0x11 0 4k", check=False)[0] != 0
    # bob: vol0 read-only, vol1 refused with the reason
    rc, out = _nbdinfo(psk, "bob", port, "vol0")
    assert rc == 0 and json.loads(out)["exports"][0]["is_read_only"], out
    assert _qemu_io(psk, "bob", port, "vol0", "read -P 0x5a 0 64k")[0] == 0
    assert _qemu_io(psk, "bob", port, "vol0", "write -P 0x22 0 4k", check=False)[0] != 0
    obj, opts = _qemu(psk, "bob", port, "vol1")
    r = run("qemu-img", "info", "--object", obj, "--image-opts", opts, check=False)
    assert r.returncode != 0 and b"client 'bob' may not use volume 'vol1'" in r.stderr, r.stderr

    def journal_state() -> list[tuple[int, int, int]]:
        return [(v["last_seq"], v["durable_seq"], v["session_bytes_written"])
                for v in d.cdpctl_json("status")]

    before = journal_state()
    # alice's name with a wrong key, a user the server does not know, and no TLS
    for who in ("wrongkey", "mallory"):
        rc, out = _nbdinfo(psk, who, port, "vol0")
        assert rc != 0, (who, out)
        rc, out = _qemu_io(psk, who, port, "vol0", "write -P 0x33 0 4k", check=False)
        assert rc != 0, (who, out)
    r = run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 4k", d.uri("vol0"), check=False)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode != 0 or "failed" in out.lower(), out  # tls = "require"
    assert journal_state() == before
    assert _qemu_io(psk, "alice", port, "vol0", "read -P 0x5a 0 64k")[0] == 0
    logs = d.logs()
    assert "TLS established, PSK user 'alice'" in logs, logs[-3000:]
    assert "client 'bob' may not use volume 'vol1'" in logs
    refused = [ln for ln in logs.splitlines() if "client refused (unknown PSK user or wrong key" in ln]
    assert any("user 'alice'" in ln for ln in refused), refused  # the wrong key
    assert "TLS PSK: unknown user 'mallory'" in logs


def test_psk_config_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _keys(tmp_path / "k.psk", f"alice:{ALICE}\n")
    ok = {"tls": "require", "tls_psk": str(keys)}
    if psk_supported():
        s = parse_config({"nbd": {**ok, "client": [{"user": "alice", "read_only": ["*"]}]}})
        assert dict(s.nbd_tls.psk) == {"alice": bytes.fromhex(ALICE)}
        assert s.nbd_tls.clients[0].user == "alice"
        with pytest.raises(ConfigError, match=r"nbd\.tls_psk: .* can be read by group or others"):
            os.chmod(keys, 0o640)
            parse_config({"nbd": ok})
        keys.chmod(0o600)
        for bad, why in (("alice\n", "line 1: expected user:hexkey"),
                         ("alice:zz\n", "line 1: expected user:hexkey"),
                         (f"alice:{ALICE}\nalice:{BOB}\n", "line 2: user 'alice' appears twice"),
                         ("# nothing\n", "holds no user:hexkey line")):
            _keys(tmp_path / "bad.psk", bad)
            with pytest.raises(ConfigError, match=why):
                parse_config({"nbd": {**ok, "tls_psk": str(tmp_path / "bad.psk")}})
        with pytest.raises(ConfigError, match=r"nbd\.tls_psk: cannot read"):
            parse_config({"nbd": {**ok, "tls_psk": str(tmp_path / "missing.psk")}})
    with pytest.raises(ConfigError, match=r"nbd\.tls_psk: needs tls = \"on\" or \"require\""):
        parse_config({"nbd": {**ok, "tls": "off"}})
    with pytest.raises(ConfigError, match=r"nbd\.tls_cert: not used with tls_psk"):
        parse_config({"nbd": {**ok, "tls_cert": __file__, "tls_key": __file__}})
    with pytest.raises(ConfigError, match=r"nbd\.client: PSK users need tls = \"require\""):
        parse_config({"nbd": {**ok, "tls": "on", "client": [{"user": "alice"}]}})
    with pytest.raises(ConfigError, match=r"nbd\.client\[0\]: with tls_psk a row names a PSK user"):
        parse_config({"nbd": {**ok, "client": [{"subject": "CN=a"}]}})
    with pytest.raises(ConfigError, match=r"nbd\.client: a row with user = \.\.\. needs tls_psk"):
        parse_config({"nbd": {"tls": "require", "tls_cert": __file__, "tls_key": __file__,
                              "client": [{"user": "alice"}]}})
    with pytest.raises(ConfigError, match=r"nbd\.client\[0\]: give a certificate subject or a PSK"):
        parse_config({"nbd": {**ok, "client": [{"user": "alice", "subject": "CN=a"}]}})
    # a Python whose ssl has no PSK callbacks is told so by name, before anything opens
    monkeypatch.setattr(ssl, "HAS_PSK", False, raising=False)
    with pytest.raises(ConfigError, match=r"nbd\.tls_psk: this Python .* Python 3\.13"):
        parse_config({"nbd": ok})
