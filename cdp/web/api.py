"""The REST API ``/api/v1``: one row of :data:`ROUTES` per route, each a call of an
operation of :mod:`cdp.ops` (one operations layer, two faces: no operation is
implemented here). JSON in and out; the restore download streams the bytes of
:func:`cdp.ops.catalog.open_file` (a directory: a tar stream) in pieces of at most
4 MiB, so memory stays bounded whatever the file's size. The routes are documented in
:mod:`cdp.web.openapi` (a test checks both list the same ones)."""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from cdp.catalog.model import Entry
from cdp.errors import CdpError, NotFound, UsageError
from cdp.ops import run_op
from cdp.ops.catalog import FileBytes, open_file, open_tree
from cdp.store import Store
from cdp.web.openapi import OPENAPI

log = logging.getLogger("cdp.web")

PREFIX = "/api/v1"
#: the largest piece written to the socket at once (zero runs are cut to it)
WRITE_PIECE = 4 << 20
#: the application's store (what the routes run their operations on)
STORE_KEY = web.AppKey("store", Store)


def _store(request: web.Request) -> Store:
    return request.app[STORE_KEY]


def _q(request: web.Request, name: str, *, required: bool = False) -> str | None:
    v = request.query.get(name)
    if required and not v:
        raise UsageError(f"missing query parameter {name!r}")
    return v or None


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        doc = json.loads(await request.read() or b"{}")
    except ValueError as e:
        raise UsageError(f"request body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise UsageError("request body must be a JSON object")
    return doc


async def _op(request: web.Request, op: str, args: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(await run_op(_store(request), op, args), status=status)


def _vol(request: web.Request) -> str:
    return request.match_info["volume"]


# ---------------------------------------------------------------------------- handlers


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


async def volumes(request: web.Request) -> web.Response:
    return await _op(request, "volume_list", {})


async def volume(request: web.Request) -> web.Response:
    rows = await run_op(_store(request), "status", {"volumes": [_vol(request)]})
    return web.json_response(rows[0])


async def markers(request: web.Request) -> web.Response:
    return await _op(request, "markers", {"volume": _vol(request)})


async def add_marker(request: web.Request) -> web.Response:
    body = await _body(request)
    rows = await run_op(_store(request), "snapshot",
                        {"volumes": [_vol(request)], "label": str(body.get("label") or "")})
    return web.json_response(rows[0], status=201)


async def timeline(request: web.Request) -> web.Response:
    return await _op(request, "timeline", {"volume": _vol(request), "from": _q(request, "from"),
                                           "to": _q(request, "to"),
                                           "buckets": _q(request, "buckets")})


async def files(request: web.Request) -> web.Response:
    return await _op(request, "files", {"volume": _vol(request), "at": _q(request, "at"),
                                        "path": _q(request, "path") or "/",
                                        "recursive": _q(request, "recursive") in ("1", "true")})


async def versions(request: web.Request) -> web.Response:
    return await _op(request, "file_versions", {"volume": _vol(request),
                                                "path": _q(request, "path")})


async def find(request: web.Request) -> web.Response:
    return await _op(request, "find", {"volume": _vol(request),
                                       "pattern": _q(request, "pattern", required=True),
                                       "at": _q(request, "at")})


async def diff(request: web.Request) -> web.Response:
    return await _op(request, "files_diff", {"volume": _vol(request),
                                             "from": _q(request, "from", required=True),
                                             "to": _q(request, "to") or "now"})


async def changed(request: web.Request) -> web.Response:
    return await _op(request, "changed", {"volume": _vol(request), "from": _q(request, "from"),
                                          "to": _q(request, "to")})


async def rewind(request: web.Request) -> web.Response:
    body = await _body(request)
    if not body.get("to"):
        raise UsageError('rewind needs {"to": POINT}')
    return await _op(request, "rewind", {"volume": _vol(request), "to": str(body["to"])})


async def retention(request: web.Request) -> web.Response:
    return await _op(request, "retention_show", {"volume": _vol(request)})


async def set_retention(request: web.Request) -> web.Response:
    body = await _body(request)
    unknown = sorted(set(body) - {"tiers", "max_store_bytes", "on_full"})
    if unknown:
        raise UsageError(f"retention: unknown field {unknown[0]!r} "
                         "(known: tiers, max_store_bytes, on_full)")
    return await _op(request, "retention_set", {"volume": _vol(request), **body})


async def alerts(request: web.Request) -> web.Response:
    return await _op(request, "alerts", {"volume": _q(request, "volume")})


def _disposition(name: str) -> str:
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\/;' else "_" for c in name)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


async def _write_pieces(resp: web.StreamResponse, f: FileBytes) -> int:
    """Stream *f*'s bytes (each piece at most :data:`WRITE_PIECE`); returns the count.
    Over history the S3 tier holds, the pieces are read off the loop and fetch what
    they need first (:meth:`FileBytes.async_pieces`)."""
    n = 0
    async for _off, piece in f.async_pieces():
        view = memoryview(piece)
        for i in range(0, len(view), WRITE_PIECE):
            chunk = view[i:i + WRITE_PIECE]
            await resp.write(bytes(chunk))
            n += len(chunk)
    return n


async def restore(request: web.Request) -> web.StreamResponse:
    """A file's bytes as of ``at`` (Content-Disposition: attachment), or a directory's
    subtree as a tar stream. Cost: O(bytes) reads, memory O(one piece)."""
    store = _store(request)
    args = {"volume": _vol(request), "at": _q(request, "at"),
            "path": _q(request, "path", required=True), "stream": _q(request, "stream")}
    try:
        f = await open_file(store, args)
    except UsageError as e:
        if "is a directory" not in str(e):
            raise
        return await _restore_tree(request, store, args)
    resp = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": _disposition(f.path.rsplit("/", 1)[-1] or "file"),
        "X-Cdp-Seq": str(f.seq),
    })
    resp.content_length = f.size
    await resp.prepare(request)
    try:
        await _write_pieces(resp, f)
    except CdpError as e:  # the status line is sent: cut the reply short (Content-Length)
        log.error("restore %s at %s: %s", f.path, f.point, e)
        resp.force_close()
        return resp
    await resp.write_eof()
    return resp


async def _restore_tree(request: web.Request, store: Store, args: dict[str, Any]) -> web.StreamResponse:
    path, items = await open_tree(store, args)
    if not items and path != "/":
        raise NotFound(f"{path}: no such directory at {args.get('at') or 'now'}")
    base = path.rstrip("/")
    top = base.rsplit("/", 1)[-1] or args["volume"]
    resp = web.StreamResponse(headers={"Content-Type": "application/x-tar",
                                       "Content-Disposition": _disposition(top + ".tar")})
    await resp.prepare(request)
    try:
        for it in items:
            rel = top + "/" + it.path[len(base):].lstrip("/")
            info = tarfile.TarInfo(rel)
            if isinstance(it, Entry):
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                info.mtime = (it.mtime or 0) // 10**9
                await resp.write(info.tobuf(tarfile.PAX_FORMAT))
                continue
            info.size = it.size
            info.mode = 0o644
            info.mtime = (it.mtime or 0) // 10**9
            await resp.write(info.tobuf(tarfile.PAX_FORMAT))
            n = await _write_pieces(resp, it)
            if n % tarfile.BLOCKSIZE:
                await resp.write(bytes(tarfile.BLOCKSIZE - n % tarfile.BLOCKSIZE))
    except CdpError as e:  # the status line is sent: cut the tar short
        log.error("restore %s at %s (tar): %s", path, args.get("at"), e)
        resp.force_close()
        return resp
    await resp.write(bytes(2 * tarfile.BLOCKSIZE))
    await resp.write_eof()
    return resp


Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]

#: every API route: (method, path below /api/v1, handler); the OpenAPI document lists the same
ROUTES: list[Route] = [
    ("GET", "/openapi.json", openapi),
    ("GET", "/volumes", volumes),
    ("GET", "/volumes/{volume}", volume),
    ("GET", "/volumes/{volume}/markers", markers),
    ("POST", "/volumes/{volume}/markers", add_marker),
    ("GET", "/volumes/{volume}/timeline", timeline),
    ("GET", "/volumes/{volume}/files", files),
    ("GET", "/volumes/{volume}/versions", versions),
    ("GET", "/volumes/{volume}/find", find),
    ("GET", "/volumes/{volume}/diff", diff),
    ("GET", "/volumes/{volume}/changed", changed),
    ("GET", "/volumes/{volume}/restore", restore),
    ("POST", "/volumes/{volume}/rewind", rewind),
    ("GET", "/volumes/{volume}/retention", retention),
    ("POST", "/volumes/{volume}/retention", set_retention),
    ("GET", "/alerts", alerts),
]


def add_routes(app: web.Application) -> None:
    for method, path, handler in ROUTES:
        app.router.add_route(method, PREFIX + path, handler)
