"""Replication inside TLS ([replication] tls_cert, tls_key, tls_ca; docs/REPLICATION.md):
certificates made at test time with the openssl CLI (a CA, the target's certificate
for 127.0.0.1, the source's client certificate). The stream arrives identical; a
plain-TCP peer and a source whose certificate another CA signed get nothing, and the
target lives on.
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

from cdp.replication.protocol import MAGIC
from tests.conftest import require_tool
from tests.integration.replication_env import (
    ReplEnv,
    api,
    caught_up,
    identical,
    start_all,
    status,
    writes,
)
from tools.harness import run


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(crt),
        "-addext", "keyUsage = critical, keyCertSign, cRLSign")  # RFC 5280, as 3.13 checks
    return crt, key


def _cert(d: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    key, csr, crt, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", str(key), "-out", str(csr))
    # RFC 5280 as Python 3.13's ssl checks it by default (VERIFY_X509_STRICT): a leaf
    # names its issuer's key (openssl x509 -req adds no extension the file lacks)
    ext.write_text(f"subjectAltName = {san}\nauthorityKeyIdentifier = keyid,issuer\n"
                   "basicConstraints = CA:FALSE\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))
    return crt, key


def _tls(cert: tuple[Path, Path], ca: Path) -> str:
    return f'tls_cert = "{cert[0]}"\ntls_key = "{cert[1]}"\ntls_ca = "{ca}"\n'


def test_replication_over_tls(repl: ReplEnv, tmp_path: Path) -> None:
    require_tool("openssl", "qemu-io", "qemu-img")
    certs = tmp_path / "pki"
    certs.mkdir()
    ca = _ca(certs, "ca")
    other_ca = _ca(certs, "other-ca")
    t_cert = _cert(certs, "target", ca, "IP:127.0.0.1, DNS:localhost")
    s_cert = _cert(certs, "source", ca, "DNS:source")
    rogue = _cert(certs, "rogue", other_ca, "DNS:rogue")
    src = repl.source(extra=_tls(s_cert, ca[0]))
    tgt, to = repl.target(extra=_tls(t_cert, ca[0]))
    port = int(to.rsplit(":", 1)[1])
    bad = repl.source("r", extra=_tls(rogue, other_ca[0]))  # the right secret, a foreign CA
    start_all(src, tgt, bad)
    try:
        assert "(TLS)" in tgt.logs()
        # a plain-TCP peer speaking the protocol: the TLS handshake fails, nothing stored
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(MAGIC + b"\x00" * 64)
            c.settimeout(5)
            try:
                while c.recv(4096):
                    pass
            except OSError:
                pass
        # a source whose certificate another CA signed: never gets past TLS
        bad.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rogue")
        rng = random.Random(40)
        writes(src.uri(), rng, 40)
        api(src, "snapshot", volumes=["vol0"], label="one")
        src.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
        writes(src.uri(), rng, 40)
        api(src, "snapshot", volumes=["vol0"], label="two")
        caught_up(src, to)
        assert identical(src, tgt) == 2
        time.sleep(1.0)
        assert status(bad, to)["state"] == "disconnected"
        assert "certificate" in bad.logs().lower()
        vols = {v["volume"] for v in api(tgt, "volume_list")}
        assert "rep0" in vols and "rogue" not in vols
        assert tgt.proc is not None and tgt.proc.poll() is None
    finally:
        for d in (src, tgt, bad):
            d.stop()
