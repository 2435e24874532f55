"""Who may connect over NBD: client certificates (``tls_verify_peer``, ``tls_ca``) and
per-volume access by certificate subject (``[[nbd.client]]``), driven with nbdinfo,
qemu-img and qemu-io holding the right, a wrong and no certificate. A refused client is
logged with its identity, gets an error, and nothing it sent reaches the journal."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.config import parse_config
from cdp.errors import ConfigError
from cdp.targets.nbd.access import normalize_subject, subject_text
from tests.conftest import require_tool
from tests.qemu import qemu_io_tls
from tools.harness import Cdpd, run

_EXT_CA = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
_EXT_SERVER = ("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
               "keyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n")
_EXT_CLIENT = ("extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
               "basicConstraints=CA:FALSE\n")


def _ca(d: Path, name: str) -> None:
    (d / "ca.cnf").write_text(_EXT_CA)
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", str(d / f"{name}-key.pem"), "-out", str(d / f"{name}.csr"))
    run("openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-signkey", str(d / f"{name}-key.pem"),
        "-days", "2", "-extfile", str(d / "ca.cnf"), "-out", str(d / f"{name}-cert.pem"))


def _cert(d: Path, ca: str, name: str, subj: str, ext: str) -> None:
    (d / f"{name}.cnf").write_text(ext)
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", subj,
        "-keyout", str(d / f"{name}-key.pem"), "-out", str(d / f"{name}.csr"))
    run("openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}-cert.pem"),
        "-CAkey", str(d / f"{ca}-key.pem"), "-CAcreateserial", "-days", "2",
        "-extfile", str(d / f"{name}.cnf"), "-out", str(d / f"{name}-cert.pem"))


def _client_dir(d: Path, who: str | None) -> Path:
    """DIR as libnbd and qemu read it: ca-cert.pem, client-cert.pem, client-key.pem."""
    out = _dir(d, who)
    out.mkdir()
    shutil.copy(d / "ca-cert.pem", out / "ca-cert.pem")
    if who is not None:
        shutil.copy(d / f"{who}-cert.pem", out / "client-cert.pem")
        shutil.copy(d / f"{who}-key.pem", out / "client-key.pem")
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, the server's certificate, clients writer/reader/stranger signed by it, and
    "writer" again signed by another CA."""
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "otherca")
    _cert(d, "ca", "server", "/CN=127.0.0.1", _EXT_SERVER)
    _cert(d, "ca", "writer", "/O=Example/CN=writer", _EXT_CLIENT)
    _cert(d, "ca", "reader", "/O=Example/CN=reader", _EXT_CLIENT)
    _cert(d, "ca", "stranger", "/O=Example/CN=stranger", _EXT_CLIENT)
    _cert(d, "otherca", "forged", "/O=Example/CN=writer", _EXT_CLIENT)
    for who in ("writer", "reader", "stranger", "forged", None):
        _client_dir(d, who)
    return d


@pytest.fixture
def cdpd_mtls(tmp_path: Path, pki: Path) -> Iterator[Cdpd]:
    cfg = f"""
[nbd]
tls = "require"
tls_cert = "{pki / 'server-cert.pem'}"
tls_key = "{pki / 'server-key.pem'}"
tls_ca = "{pki / 'ca-cert.pem'}"
tls_verify_peer = true

[[nbd.client]]
subject = "CN=writer,O=Example"
read_write = ["vol0"]
read_only = ["vol1"]

[[nbd.client]]
subject = "cn = reader, o = Example"
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


def _dir(pki: Path, who: str | None) -> Path:
    return pki / ("as-" + (who or "nobody"))


def _qemu(pki: Path, who: str | None, port: int, export: str) -> tuple[str, str]:
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={_dir(pki, who)}"
    return obj, f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0"


def _qemu_io(pki: Path, who: str | None, port: int, export: str, cmd: str, check: bool = True
             ) -> tuple[int, str]:
    return qemu_io_tls(*_qemu(pki, who, port, export), cmd, check)


def _nbdinfo(pki: Path, who: str | None, port: int, export: str) -> tuple[int, str]:
    uri = f"nbds://127.0.0.1:{port}/{export}?tls-certificates={_dir(pki, who)}"
    r = run("nbdinfo", "--json", uri, check=False)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def test_client_certificates_and_per_volume_access(cdpd_mtls: Cdpd, pki: Path) -> None:
    require_tool("nbdinfo", "qemu-img", "qemu-io")
    d, port = cdpd_mtls, cdpd_mtls.nbd_port
    # the right certificate: writer writes vol0, reads vol1 and may not write it
    assert _qemu_io(pki, "writer", port, "vol0", "write -P 0x5a 0 64k")[0] == 0
    assert _qemu_io(pki, "writer", port, "vol0", "read -P 0x5a 0 64k")[0] == 0
    rc, out = _nbdinfo(pki, "writer", port, "vol1")
    assert rc == 0 and json.loads(out)["exports"][0]["is_read_only"], out
    rc, out = _qemu_io(pki, "writer", port, "vol1", "write -P 0x11 0 4k", check=False)
    assert rc != 0, out
    # reader: vol0 read-only, vol1 refused
    rc, out = _nbdinfo(pki, "reader", port, "vol0")
    assert rc == 0 and json.loads(out)["exports"][0]["is_read_only"], out
    assert _qemu_io(pki, "reader", port, "vol0", "read -P 0x5a 0 64k")[0] == 0
    rc, out = _qemu_io(pki, "reader", port, "vol0", "write -P 0x22 0 4k", check=False)
    assert rc != 0, out
    assert _nbdinfo(pki, "reader", port, "vol1")[0] != 0
    def journal_state() -> list[tuple[int, int, int]]:
        """What a write would move: the journal's last and durable seq, bytes written
        (the maps' own stats change when a timer seals them, which is not a write)."""
        return [(v["last_seq"], v["durable_seq"], v["session_bytes_written"])
                for v in d.cdpctl_json("status")]

    before = journal_state()
    # a certificate from our CA without a row, one from another CA, and none at all
    for who in ("stranger", "forged", None):
        rc, out = _nbdinfo(pki, who, port, "vol0")
        assert rc != 0, (who, out)
        rc, out = _qemu_io(pki, who, port, "vol0", "write -P 0x33 0 4k", check=False)
        assert rc != 0, (who, out)
        obj, opts = _qemu(pki, who, port, "vol0")
        r = run("qemu-img", "info", "--object", obj, "--image-opts", opts, check=False)
        assert r.returncode != 0, who
    r = run("qemu-img", "info", "--object", _qemu(pki, "stranger", port, "vol0")[0], "--image-opts",
            _qemu(pki, "stranger", port, "vol0")[1], check=False)
    assert b"may not use volume 'vol0'" in r.stderr, r.stderr  # the reason reaches the client
    # nothing a refused client sent reached the journal; the data is the writer's
    assert journal_state() == before
    assert _qemu_io(pki, "writer", port, "vol0", "read -P 0x5a 0 64k")[0] == 0
    logs = d.logs()
    assert "client 'CN=stranger,O=Example' may not use volume 'vol0'" in logs, logs[-3000:]
    assert "client 'CN=reader,O=Example' may not use volume 'vol1'" in logs
    # (qemu checks its own certificate against its CA and never sends a forged one)
    refused = [ln for ln in logs.splitlines() if "client refused (no verified certificate)" in ln]
    assert any("certificate verify failed" in ln for ln in refused), refused  # forged
    assert any("did not return a certificate" in ln for ln in refused), refused  # none


def test_client_access_config_is_validated(tmp_path: Path) -> None:
    ok = {"tls": "require", "tls_cert": __file__, "tls_key": __file__}
    with pytest.raises(ConfigError, match=r"nbd\.tls_verify_peer: needs tls = \"require\""):
        parse_config({"nbd": {**ok, "tls": "on", "tls_verify_peer": True, "tls_ca": __file__}})
    with pytest.raises(ConfigError, match=r"nbd\.tls_ca: needed"):
        parse_config({"nbd": {**ok, "tls_verify_peer": True}})
    with pytest.raises(ConfigError, match=r"nbd\.tls_ca: cannot read"):
        parse_config({"nbd": {**ok, "tls_verify_peer": True, "tls_ca": str(tmp_path / "x.pem")}})
    with pytest.raises(ConfigError, match=r"nbd\.client: needs tls_verify_peer"):
        parse_config({"nbd": {**ok, "client": [{"subject": "CN=a"}]}})
    with pytest.raises(ConfigError, match=r"nbd\.client\[0\]\.subject"):
        parse_config({"nbd": {**ok, "tls_verify_peer": True, "tls_ca": __file__,
                              "client": [{"subject": "writer"}]}})
    with pytest.raises(ConfigError, match=r"nbd\.client\[0\]\.read_only"):
        parse_config({"nbd": {**ok, "tls_verify_peer": True, "tls_ca": __file__,
                              "client": [{"subject": "CN=a", "read_only": "vol0"}]}})
    s = parse_config({"nbd": {**ok, "tls_verify_peer": True, "tls_ca": __file__,
                              "client": [{"subject": "CN=a", "read_write": ["*"]}]}})
    assert s.nbd_tls.verify_peer and s.nbd_tls.clients[0].read_write == ("*",)


def test_subjects_compare_in_rfc4514_form() -> None:
    cert = {"subject": ((("countryName", "DE"),), (("organizationName", "Example, Inc."),),
                        (("commonName", "backup01"),))}
    assert subject_text(cert) == "CN=backup01,O=Example\\, Inc.,C=DE"
    assert normalize_subject(" cn = backup01 , organizationName=Example\\, Inc., c=DE") == \
        subject_text(cert)
    assert subject_text(None) == ""
    with pytest.raises(ValueError):
        normalize_subject("CN=a,b")
