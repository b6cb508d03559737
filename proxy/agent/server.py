"""The agent's HTTP server (aiohttp): /metrics and /healthz on its own port.

/metrics renders the registry in the format the scraper asks for (Prometheus text, or OpenMetrics
when the Accept header prefers it, via ``prometheus_client.exposition.choose_encoder``). It only reads
the snapshots the collection thread left; it never calls NVML. /healthz answers 200 while the
collection thread runs and keeps its pace, 503 otherwise; a node without GPUs is still healthy.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from proxy.agent.worker import Worker

REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
WORKER_KEY = web.AppKey("worker", Worker)


def build_app(registry: CollectorRegistry, worker: Worker) -> web.Application:
    app = web.Application()
    app[REGISTRY_KEY] = registry
    app[WORKER_KEY] = worker
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    return app


async def _metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    if request.app[WORKER_KEY].healthy():
        return web.Response(text="ok\n")
    return web.Response(status=503, text="collection thread stalled\n")
