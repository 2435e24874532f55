"""The web API's bearer token: ``STORE/http.token`` (mode 0600), made on cdpd's first
start with HTTP on. Only the store's owner can read it, so only they (and whom they
hand the console URL, ``cdpctl web``) can drive the API."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from cdp.errors import NotFound

TOKEN_FILE = "http.token"


def ensure_token(store: Path) -> str:
    """The store's token, created (32 random bytes, URL-safe, mode 0600) when missing."""
    path = store / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(store)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token


def read_token(store: Path) -> str:
    """The token in ``STORE/http.token``; NotFound when cdpd never served HTTP there."""
    try:
        token = (store / TOKEN_FILE).read_text().strip()
    except FileNotFoundError:
        raise NotFound(f"{store / TOKEN_FILE}: no web token yet (cdpd makes it when it "
                       "starts with [http] on)") from None
    if not token:
        raise NotFound(f"{store / TOKEN_FILE}: empty web token (remove it and restart cdpd)")
    return token


def token_ok(given: str | None, token: str) -> bool:
    """Constant-time comparison of a presented token with the store's."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())
