"""The canary analysis in a running proxy: fed by every request, evaluated off the request path.

:class:`CanaryObserver` hands each finished request of a known variant to the
:class:`~proxy.canary.analysis.CanaryAnalyzer` (``on_complete``: one short lock, a few appends) and
evaluates every ``canary.evaluate_every`` seconds in a worker thread; the side path hands it each
sample's predictions (:meth:`predictions`). ``GET /canary`` on the admin port shows the last
evaluation; ``infermon_canary_verdict{variant}`` and ``infermon_canary_check{variant,check}`` export it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.registry import Collector

from proxy.canary.analysis import CanaryAnalyzer, CanaryConfig
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.observe.labels import OTHER
from proxy.settings import ProxyConfig

log = logging.getLogger("infermon.canary")


class CanaryObserver(Observer):
    name = "canary"

    def __init__(self, cfg: ProxyConfig) -> None:
        c = cfg.canary
        self.every = c.evaluate_every
        self.analyzer = CanaryAnalyzer(
            CanaryConfig(
                baseline=c.baseline,
                interval=c.interval,
                window=c.window,
                confidence=c.confidence,
                latency_tolerance=c.latency_tolerance,
                error_tolerance=c.error_tolerance,
                prediction_threshold=c.prediction_threshold,
                min_requests=c.min_requests,
                min_predictions=c.min_predictions,
                max_variants=c.max_variants,
                prediction_bins=c.prediction_bins,
                max_classes=c.max_classes,
            )
        )
        self.observe = self.analyzer.observe
        self._task: asyncio.Task[None] | None = None
        self.evaluations = 0

    # -- request path -----------------------------------------------------------------------

    def on_complete(self, ex: Exchange) -> None:
        variant = ex.variant
        if not variant or variant == OTHER:
            return
        status = ex.status
        error = ex.error is not None or status >= 500 or status == 0
        self.observe(variant, status, ex.t_done - ex.t_accepted, error)

    # -- side path ------------------------------------------------------------------------------

    def predictions(self, variant: str, rows: list[dict[str, Any]]) -> None:
        """The first prediction of each instance of one sample (the class, or the number)."""
        if not variant or variant == OTHER or not rows:
            return
        values = [next(iter(row.values())) for row in rows if row]
        if values:
            self.analyzer.add_predictions(variant, values)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:  # tests and statistics take milliseconds: a thread, never the loop
                await asyncio.to_thread(self.analyzer.evaluate, time.monotonic())
                self.evaluations += 1
            except Exception:
                log.exception("canary evaluation failed (the next one runs in %g s)", self.every)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def collector(self) -> Collector:
        return self.analyzer.collector()

    def add_routes(self, app: web.Application) -> None:
        analyzer = self.analyzer

        async def canary(request: web.Request) -> web.Response:
            body = await asyncio.to_thread(lambda: orjson.dumps(analyzer.report(), option=orjson.OPT_INDENT_2))
            return web.Response(body=body, content_type="application/json")

        app.router.add_get("/canary", canary)
