"""The admin HTTP server (aiohttp): /metrics, /healthz, /readyz, /config.

It runs on the proxy's event loop; nothing here is on the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

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
        return json_response({"error": exc.reason, "path": request.path}, status=exc.status)
    except Exception as exc:  # a failing collector or view: JSON like every other admin error
        log.exception("admin %s %s failed", request.method, request.path)
        return json_response({"error": f"internal error: {exc!r}", "path": request.path}, status=500)


def build_admin_app(
    registry: CollectorRegistry,
    readiness: Readiness,
    config: Callable[[], dict[str, Any]],
) -> web.Application:
    app = web.Application(middlewares=[json_errors])

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encoder(registry), headers={"Content-Type": content_type})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression()
        return response

    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        snapshot = readiness.snapshot()
        return json_response(snapshot, status=200 if snapshot["ready"] else 503)

    async def config_view(request: web.Request) -> web.Response:
        return json_response(config())

    async def index(request: web.Request) -> web.Response:
        return json_response({"endpoints": ["/metrics", "/healthz", "/readyz", "/config"]})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", config_view)
    app.router.add_get("/", index)
    return app
