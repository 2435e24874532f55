"""cdpd's HTTP listener (aiohttp, on cdpd's own loop): the REST API under ``/api`` and
the console's static files at ``/``.

Design notes
------------
* **Every /api request carries the token**: ``Authorization: Bearer TOKEN`` (scripts)
  or the ``cdp_token`` cookie the console sets from the URL fragment ``#token=``
  (``SameSite=Strict``, path ``/api``; a fragment never reaches the server or its logs,
  and a cookie lets the browser download a restore with a plain link). Without it: 401.
* **State-changing requests** (anything but GET/HEAD/OPTIONS) must also come from the
  console's own origin: an ``Origin`` (or ``Sec-Fetch-Site: cross-site``) naming another
  site gets 403, so a page elsewhere cannot drive the API through the cookie. A request
  without ``Origin`` (curl, a script) carries its bearer token and is let through.
* **Errors are JSON** with the CLI's message, its exit status and that status's meaning;
  the HTTP status comes from :data:`HTTP_STATUS`, the one table mapping
  :class:`~cdp.errors.ExitStatus` to HTTP (as ``nbd_errno`` maps errors to the wire).
* The static files need no token: they hold no data; the API they call does.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from cdp.config import HttpSettings
from cdp.errors import CdpError, ExitStatus, UsageError
from cdp.store import Store
from cdp.web.api import STORE_KEY, add_routes
from cdp.web.auth import ensure_token, token_ok

log = logging.getLogger("cdp.web")

#: ExitStatus -> HTTP status: the one table (docs/WEB.md, "Errors")
HTTP_STATUS: dict[ExitStatus, int] = {
    ExitStatus.OK: 200,
    ExitStatus.ERROR: 500,
    ExitStatus.USAGE: 400,
    ExitStatus.NOT_FOUND: 404,
    ExitStatus.READ_ONLY: 409,
    ExitStatus.STORE_FULL: 507,
    ExitStatus.CORRUPTION: 500,
    ExitStatus.LOCKED: 423,
    ExitStatus.NO_DAEMON: 503,
}

COOKIE = "cdp_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(status: ExitStatus, message: str, kind: str) -> dict[str, Any]:
    """The JSON of an error reply: the CLI's message and exit status."""
    return {"error": {"type": kind, "message": message, "exit_status": int(status),
                      "meaning": status.meaning}}


def error_response(e: BaseException) -> web.Response:
    """The reply for an exception: a CdpError by its exit status, anything else 500."""
    if isinstance(e, CdpError):
        st = ExitStatus(e.exit_status)
        return web.json_response(error_body(st, str(e), type(e).__name__),
                                 status=HTTP_STATUS[st])
    log.exception("web: internal error", exc_info=e)
    return web.json_response(error_body(ExitStatus.ERROR, f"internal error: {e}", type(e).__name__),
                             status=500)


def _same_origin(request: web.Request) -> bool:
    """True unless the request says it comes from another site."""
    if request.headers.get("Sec-Fetch-Site", "") == "cross-site":
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == f"{request.scheme}://{request.host}"


def make_app(store: Store, token: str) -> web.Application:
    """The aiohttp application: auth + error middleware, the API, the console."""
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        if not token_ok(given, token):
            return web.json_response(
                error_body(ExitStatus.USAGE, "missing or wrong token (Authorization: Bearer "
                           "TOKEN; `cdpctl web` prints the console URL)", "Unauthorized"),
                status=401, headers={"WWW-Authenticate": 'Bearer realm="cdp"'})
        if request.method not in SAFE_METHODS and not _same_origin(request):
            return web.json_response(
                error_body(ExitStatus.USAGE, f"cross-site request refused (Origin "
                           f"{request.headers.get('Origin')!r})", "Forbidden"), status=403)
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status == 404:
                return web.json_response(error_body(ExitStatus.NOT_FOUND,
                                                    f"no such API path: {request.path}", "NotFound"),
                                         status=404)
            if e.status == 405:
                return web.json_response(error_body(
                    ExitStatus.USAGE, f"{request.method} is not allowed on {request.path}",
                    "MethodNotAllowed"), status=405)
            raise
        except (CdpError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, CdpError):
                return error_response(e)
            return error_response(UsageError(f"bad request: {e}"))

    app = web.Application(middlewares=[guard], client_max_size=1 << 20)
    app[STORE_KEY] = store
    add_routes(app)
    static = Path(str(resources.files("cdp.web") / "static"))

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(static / "index.html", headers={"Cache-Control": "no-store"})

    app.router.add_get("/", index)
    app.router.add_static("/static/", static)
    return app


class WebServer:
    """The HTTP listener of a running cdpd."""

    def __init__(self, store: Store, settings: HttpSettings) -> None:
        self.store = store
        self.settings = settings
        self.token = ensure_token(store.path)
        self._runner: web.AppRunner | None = None
        self.port = settings.port

    @property
    def scheme(self) -> str:
        return "https" if self.settings.tls else "http"

    async def start(self) -> None:
        """Listen; OSError when the address cannot be bound (the caller names --http)."""
        s = self.settings
        ctx = None
        if s.tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(s.tls_cert, s.tls_key)
        runner = web.AppRunner(make_app(self.store, self.token), handle_signals=False,
                               access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, s.host or None, s.port, ssl_context=ctx, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        socks = getattr(server, "sockets", None) or []
        if socks:
            self.port = socks[0].getsockname()[1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
