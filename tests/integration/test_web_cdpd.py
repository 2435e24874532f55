"""cdpd's HTTP listener as an operator meets it: TLS when [http] names a certificate,
--no-http, and a token that stays the same across restarts (tests/integration/
test_web_api.py drives the API itself)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import require_tool
from tools.harness import Cdpd


def test_tls_and_a_token_that_survives_restarts(tmp_path: Path) -> None:
    require_tool("openssl")
    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    d = Cdpd(tmp_path, extra_config=f'[http]\ntls_cert = "{cert}"\ntls_key = "{key}"\n').start()
    try:
        assert d.http_url.startswith("https://127.0.0.1:")
        url = d.cdpctl("web").stdout.strip()
        assert url.startswith(d.http_url + "/#token=")
        token = url.split("#token=", 1)[1]
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        req = urllib.request.Request(d.http_url + "/api/v1/volumes",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, context=ctx) as r:
            assert [v["volume"] for v in json.loads(r.read())] == ["vol0"]
        assert d.stop() == 0
        d.start()
        assert d.cdpctl("web").stdout.strip().split("#token=", 1)[1] == token
    finally:
        if d.proc is not None:
            d.stop()


def test_no_http(tmp_path: Path) -> None:
    d = Cdpd(tmp_path)
    p = subprocess.Popen([*_cdpd_cmd(d), "--no-http"], cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run = d.store / "cdpd.json"
        deadline = time.monotonic() + 60
        while not run.exists():
            assert p.poll() is None and time.monotonic() < deadline, "cdpd did not start"
            time.sleep(0.05)
        assert json.loads(run.read_text())["http"] is None
        r = d.cdpctl("web", check=False)
        assert r.returncode == 8 and "without HTTP" in r.stderr, r.stderr
    finally:
        p.terminate()
        p.wait(60)


def _cdpd_cmd(d: Cdpd) -> list[str]:
    return [sys.executable, "-m", "cdp.daemon", "--config", str(d.config), "--nbd", "127.0.0.1:0",
            "--iscsi", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
