"""cdpctl web: print the web console's URL, with the store's token in its fragment
(``http://127.0.0.1:9810/#token=...``; a fragment never reaches the server's logs)."""

from __future__ import annotations

import argparse
import json

from cdp.cli.common import Context, emit_json
from cdp.errors import DaemonUnavailable
from cdp.web.auth import read_token


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("web", help="print the web console's URL (with its access token)")
    p.add_argument("--json", action="store_true", help="print JSON (url, token)")
    p.set_defaults(func=show)


def console_url(ctx: Context) -> tuple[str, str]:
    """(base URL of the running cdpd's HTTP listener, the token). DaemonUnavailable when
    cdpd is not running or serves no HTTP."""
    try:
        info = json.loads((ctx.store_path / "cdpd.json").read_text())
    except (OSError, ValueError):
        info = None
    if info is None or ctx.daemon() is None:
        raise DaemonUnavailable(f"cdpd is not running on store {ctx.store_path}; "
                                f"start it with `{ctx.start_hint()}`")
    base = info.get("http")
    if not base:
        raise DaemonUnavailable("cdpd runs without HTTP (--no-http or [http] enabled = false)")
    scheme, rest = base.split("://", 1)
    host, port = rest.rsplit(":", 1)
    if host.strip("[]") in ("", "0.0.0.0", "::"):  # listening everywhere: loopback works
        host = "127.0.0.1"
    return f"{scheme}://{host}:{port}/", read_token(ctx.store_path)


def show(ctx: Context, args: argparse.Namespace) -> int:
    base, token = console_url(ctx)
    if ctx.json:
        emit_json({"url": f"{base}#token={token}", "base": base, "token": token})
    else:
        print(f"{base}#token={token}")
    return 0
