"""The admin HTTP server (aiohttp): /metrics, /healthz, /readyz, /config, and the status page at /
(for a browser; JSON for everyone else) and /status (docs/status-page.md).

It runs on the proxy's event loop; nothing here is on the request path. /metrics is written in a
worker thread, so a scrape holds the loop only for cheap copies, whatever the series count.

Endpoints that change state (``/split``, ``/feedback``, reload, added by the capabilities that need
them) are registered with :func:`add_state_route`: when ``admin.token`` is configured they require
``Authorization: Bearer <token>`` and answer 401 with a JSON error otherwise. /metrics, /healthz,
/readyz and /config never ask for it.

Example::

    app = build_admin_app(registry, readiness, cfg.public_dict, token=cfg.admin.resolved_token())
    add_state_route(app, "PUT", "/split", put_split)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.admin.page import PAGE_PATHS, page_response, prefers_html
from proxy.observe.metrics import Scraper
from proxy.readiness import Readiness

log = logging.getLogger("infermon.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    body = orjson.dumps(data, option=orjson.OPT_INDENT_2)
    return web.Response(body=body, status=status, content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = json_response({"error": exc.reason, "path": request.path}, status=exc.status)
        if "Allow" in exc.headers:  # RFC 9110 15.5.6: a 405 MUST say which methods the resource takes
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:  # a failing collector or view: JSON like every other admin error
        log.exception("admin %s %s failed", request.method, request.path)
        return json_response({"error": f"internal error: {exc!r}", "path": request.path}, status=500)


ADMIN_TOKEN = web.AppKey("admin_token", str)  # "" when no token is configured


def require_token(handler: Handler) -> Handler:
    """Wrap a state-changing handler: with a token configured, only a matching bearer token passes."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        token = request.app[ADMIN_TOKEN]
        if token:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            presented = given.strip().encode("utf-8", "surrogateescape")  # any bytes a client sends
            # compare_digest: the time taken says nothing about how much of the token matched
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented, token.encode()):
                response = json_response(
                    {
                        "error": "this endpoint changes state: send Authorization: Bearer <admin.token>",
                        "path": request.path,
                    },
                    status=401,
                )
                challenge = 'Bearer realm="infermon-admin"'
                if scheme.lower() == "bearer":
                    challenge += ', error="invalid_token"'  # RFC 6750 3.1: a token came, and it is wrong
                response.headers["WWW-Authenticate"] = challenge
                return response
        return await handler(request)

    return guarded


def add_state_route(app: web.Application, method: str, path: str, handler: Handler) -> None:
    """Register an endpoint that changes state: it takes the admin token when one is configured."""
    app.router.add_route(method, path, require_token(handler))


def build_admin_app(
    registry: CollectorRegistry,
    readiness: Readiness,
    config: Callable[[], dict[str, Any]],
    token: str | None = None,
) -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app[ADMIN_TOKEN] = token or ""
    scraper = Scraper(registry)

    async def close_scraper(app: web.Application) -> None:
        scraper.close()

    app.on_cleanup.append(close_scraper)

    async def metrics(request: web.Request) -> web.StreamResponse:
        """Written in a worker thread (see :class:`Scraper`); the loop only sends the pieces."""
        gzip = "gzip" in request.headers.get("Accept-Encoding", "")
        async with scraper.exposition(request.headers.get("Accept", ""), gzip) as (pieces, content_type):
            response = web.StreamResponse(headers={"Content-Type": content_type, "Vary": "Accept-Encoding"})
            if gzip:
                response.headers["Content-Encoding"] = "gzip"
            response.content_length = sum(len(piece) for piece in pieces)
            await response.prepare(request)
            if request.method != "HEAD":
                for piece in pieces:
                    await response.write(piece)
                    # write() only waits when the socket pushes back, and a loopback socket takes
                    # megabytes at once: a turn for the loop after each piece, or 30 MB is one step
                    await asyncio.sleep(0)
            await response.write_eof()
        return response

    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        snapshot = readiness.snapshot()
        return json_response(snapshot, status=200 if snapshot["ready"] else 503)

    async def config_view(request: web.Request) -> web.Response:
        return json_response(config())

    async def index(request: web.Request) -> web.StreamResponse:
        """The status page for a browser (its Accept prefers text/html), else the JSON list of endpoints:
        curl's ``*/*``, no Accept, or ``application/json`` (RFC 9110 12.5.1)."""
        if prefers_html(request.headers.getall("Accept", [])):
            response = page_response(request, "index.html")
        else:
            paths = {route.resource.canonical for route in app.router.routes() if route.resource is not None}
            response = json_response({"endpoints": sorted(p for p in paths if p not in PAGE_PATHS)})
        response.headers["Vary"] = "Accept"
        return response

    async def status_page(request: web.Request) -> web.StreamResponse:
        return page_response(request, "index.html")

    async def asset(request: web.Request) -> web.StreamResponse:
        return page_response(request, request.match_info["name"])

    async def favicon(request: web.Request) -> web.StreamResponse:
        return page_response(request, "favicon.svg")

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", config_view)
    app.router.add_get("/", index)
    app.router.add_get("/status", status_page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/favicon.ico", favicon)
    return app
