"""The JSON the status page reads beside the capabilities' own: ``GET /timeseries`` and ``GET /gpu``.

:func:`add_status_routes` registers both on the admin app; the time series task starts with the admin
server (``on_startup``) and stops with it, so nothing else has to know about it. Neither endpoint
takes the admin token, and both answer 200 with JSON whenever the proxy runs (an agent that is down
is a field of ``/gpu``, not an error status): the page polls them every few seconds.

Example (what ``ProxyApp`` does)::

    add_status_routes(admin_app, app.metrics, cfg.status)
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from proxy.admin.gpu import GpuSource
from proxy.admin.server import json_response
from proxy.admin.timeseries import RequestSeries, Snapshot
from proxy.observe.metrics import RequestMetrics
from proxy.settings import Status

SERIES = web.AppKey("request_series", RequestSeries)
GPU = web.AppKey("gpu_source", GpuSource)


def add_status_routes(app: web.Application, metrics: RequestMetrics, cfg: Status) -> None:
    series = app[SERIES] = RequestSeries(metrics, interval=cfg.interval, history=cfg.history)
    gpu = app[GPU] = GpuSource(cfg.agent, timeout=cfg.agent_timeout, min_age=min(cfg.interval, 5.0))

    async def start(app: web.Application) -> None:
        series.start()

    async def stop(app: web.Application) -> None:
        await series.aclose()
        await gpu.aclose()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)

    def render(snapshot: Snapshot) -> bytes:
        return orjson.dumps(series.report_of(snapshot), option=orjson.OPT_INDENT_2)

    async def timeseries(request: web.Request) -> web.Response:
        # copied on the loop, assembled and serialised in a worker thread: at the largest history
        # (3600 points of 32 variants) that is a quarter of a second the loop would otherwise stall
        body = await asyncio.to_thread(render, series.snapshot())
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    async def gpu_view(request: web.Request) -> web.Response:
        response = json_response(await gpu.report())
        response.headers["Cache-Control"] = "no-store"
        return response

    app.router.add_get("/timeseries", timeseries)
    app.router.add_get("/gpu", gpu_view)
