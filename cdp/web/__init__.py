"""The web face of cdp: cdpd's HTTP listener serving the REST API (``/api/v1``) and the
console (``/``), on the operations layer like cdpctl (docs/WEB.md).

:mod:`cdp.web.auth` keeps the bearer token, :mod:`cdp.web.server` the listener and its
checks (token, Origin, errors), :mod:`cdp.web.api` the routes (one row each, each a call
of :func:`cdp.ops.run_op`), :mod:`cdp.web.openapi` the API's OpenAPI document, and
``static/`` the console (plain JS + SVG, no CDN).
"""
