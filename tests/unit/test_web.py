"""The web face's pieces without a daemon: the [http] settings, the token file and the
one ExitStatus -> HTTP table (the API itself: tests/integration/test_web_api.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cdp.config import ConfigError, Settings, parse_config
from cdp.errors import ExitStatus, NotFound
from cdp.web.auth import TOKEN_FILE, ensure_token, read_token, token_ok
from cdp.web.server import HTTP_STATUS, error_body


def test_http_settings_default_on_loopback() -> None:
    h = Settings().http
    assert (h.enabled, h.host, h.port, h.tls) == (True, "127.0.0.1", 9810, False)


def test_http_section_and_override(tmp_path: Path) -> None:
    s = parse_config({"http": {"listen": "0.0.0.0:8443", "enabled": False}})
    assert (s.http.enabled, s.http.host, s.http.port) == (False, "0.0.0.0", 8443)
    s = s.with_overrides(http="127.0.0.1:0")  # --http turns it on
    assert (s.http.enabled, s.http.host, s.http.port) == (True, "127.0.0.1", 0)
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    s = parse_config({"http": {"tls_cert": str(cert), "tls_key": str(cert)}})
    assert s.http.tls
    with pytest.raises(ConfigError, match=r"http\.tls_cert, http\.tls_key"):
        parse_config({"http": {"tls_cert": str(cert)}})
    with pytest.raises(ConfigError, match=r"http\.tls_key: cannot read"):
        parse_config({"http": {"tls_cert": str(cert), "tls_key": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match=r"http\.port"):
        parse_config({"http": {"port": 1}})
    with pytest.raises(ConfigError, match="--http"):
        Settings().with_overrides(http="127.0.0.1:notaport")


def test_token_made_once_owner_only(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no web token yet"):
        read_token(tmp_path)
    t = ensure_token(tmp_path)
    assert len(t) >= 40
    assert stat.S_IMODE((tmp_path / TOKEN_FILE).stat().st_mode) == 0o600
    assert ensure_token(tmp_path) == t == read_token(tmp_path)
    assert token_ok(t, t) and not token_ok(t[:-1], t) and not token_ok(None, t)


def test_every_exit_status_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(ExitStatus)
    assert HTTP_STATUS[ExitStatus.USAGE] == 400 and HTTP_STATUS[ExitStatus.NOT_FOUND] == 404
    body = error_body(ExitStatus.NOT_FOUND, "no volume 'x'", "NotFound")
    assert body["error"] == {"type": "NotFound", "message": "no volume 'x'", "exit_status": 3,
                             "meaning": ExitStatus.NOT_FOUND.meaning}
