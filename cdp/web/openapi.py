"""The REST API's OpenAPI 3.1 document, served at ``/api/v1/openapi.json``. Hand-written:
each path says what it answers in the words of the operation it runs. A test checks
that it lists exactly the routes of :data:`cdp.web.api.ROUTES`."""

from __future__ import annotations

from typing import Any


def _p(name: str, desc: str, where: str = "query", required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "description": desc, "schema": {"type": "string"}}


_VOL = _p("volume", "volume name", "path")
_AT = _p("at", "point: markerN | marker label | @SEQ | ISO-8601 time | -10m | now (default now)")
_JSON = {"application/json": {"schema": {"type": "object"}}}


def _get(summary: str, *params: dict[str, Any], content: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"summary": summary, "parameters": list(params),
            "responses": {"200": {"description": "OK", "content": content or _JSON},
                          "default": {"$ref": "#/components/responses/Error"}}}


def _post(summary: str, body: dict[str, Any], *params: dict[str, Any], status: str = "200") -> dict[str, Any]:
    return {"summary": summary, "parameters": list(params),
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {status: {"description": "OK", "content": _JSON},
                          "default": {"$ref": "#/components/responses/Error"}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "cdp appliance API", "version": "1",
             "description": "The operations cdpctl runs, over HTTP (docs/WEB.md). Every "
             "request needs `Authorization: Bearer TOKEN` (STORE/http.token); state-changing "
             "requests from a browser must come from the console's own origin."},
    "servers": [{"url": "/api/v1"}],
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {"Error": {
            "description": "the CLI's error: 400 usage, 401 no token, 403 cross-site, 404 not "
            "found, 409 read-only, 423 locked, 500 error or corruption, 507 store full",
            "content": {"application/json": {"schema": {"type": "object", "properties": {
                "error": {"type": "object", "properties": {
                    "type": {"type": "string"}, "message": {"type": "string"},
                    "exit_status": {"type": "integer"}, "meaning": {"type": "string"}}}}}}}}},
    },
    "paths": {
        "/openapi.json": {"get": _get("this document")},
        "/volumes": {"get": _get("the volumes (cdpctl volume list)")},
        "/volumes/{volume}": {"get": _get("a volume's status (cdpctl status)", _VOL)},
        "/volumes/{volume}/markers": {
            "get": _get("the volume's markers with retention's view of each", _VOL),
            "post": _post("take a marker (cdpctl snapshot)",
                          {"type": "object", "properties": {"label": {"type": "string"}}},
                          _VOL, status="201"),
        },
        "/volumes/{volume}/timeline": {"get": _get(
            "writes, bytes and entropy per time bucket; markers, alerts, rewinds and "
            "retention bands of the range", _VOL,
            _p("from", "range start: ns since the epoch or a point (default: oldest point)"),
            _p("to", "range end: ns or a point (default: now)"),
            _p("buckets", "number of buckets, 1..5000 (default 200)"))},
        "/volumes/{volume}/files": {"get": _get(
            "a directory as of a point (cdpctl files)", _VOL, _AT,
            _p("path", "directory or file (default /)"), _p("recursive", "1: the subtree"))},
        "/volumes/{volume}/versions": {"get": _get(
            "every catalogued version of a path; without path the catalogued markers "
            "(cdpctl versions)", _VOL, _p("path", "file path"))},
        "/volumes/{volume}/find": {"get": _get(
            "glob over names, or whole paths when the pattern has a / (cdpctl find)", _VOL,
            _p("pattern", "glob, case-insensitive", required=True), _AT)},
        "/volumes/{volume}/diff": {"get": _get(
            "files added, modified, deleted, renamed between two points (cdpctl diff)", _VOL,
            _p("from", "point", required=True), _p("to", "point (default now)"))},
        "/volumes/{volume}/changed": {"get": _get(
            "byte ranges that differ between two points (cdpctl changed)", _VOL,
            _p("from", "point ('origin': everything written)", required=True),
            _p("to", "point (default now)"))},
        "/volumes/{volume}/restore": {"get": _get(
            "a file's bytes as of a point, streamed (Content-Disposition: attachment); a "
            "directory as a tar stream (cdpctl restore)", _VOL,
            _p("path", "file or directory", required=True), _AT,
            _p("stream", "alternate data stream name"),
            content={"application/octet-stream": {}, "application/x-tar": {}})},
        "/volumes/{volume}/rewind": {"post": _post(
            "rewind the live volume; the answer's `undo` is the point that undoes it "
            "(cdpctl rewind)",
            {"type": "object", "required": ["to"], "properties": {"to": {"type": "string"}}},
            _VOL)},
        "/volumes/{volume}/retention": {
            "get": _get("the retention policy and state (cdpctl retention show)", _VOL),
            "post": _post("set the retention policy (cdpctl retention set)",
                          {"type": "object", "properties": {
                              "tiers": {"type": "array", "items": {"type": "string"}},
                              "max_store_bytes": {"type": ["string", "integer"]},
                              "on_full": {"type": "string"}}}, _VOL),
        },
        "/alerts": {"get": _get("the sentinel's alerts (cdpctl alerts)",
                                _p("volume", "only this volume"))},
    },
}
