"""The canary analysis in a running proxy: fed by every request, evaluated off the request path.

:class:`CanaryObserver` appends each finished request of a known variant to a list (``on_complete``:
one tuple, no lock: the event loop's thread is the only one that touches the list). Once a second
its task swaps the list for an empty one and hands the batch to the
:class:`~proxy.canary.analysis.CanaryAnalyzer` in a worker thread; every ``canary.evaluate_every``
seconds it evaluates there too. The side path hands it each sample's predictions
(:meth:`predictions`), and the drift engine's per-variant windows are read at each evaluation.
``GET /canary`` on the admin port shows the last evaluation; ``infermon_canary_verdict{variant}``
and ``infermon_canary_check{variant,check}`` export it.
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

from proxy.canary.analysis import CanaryAnalyzer, CanaryConfig, DriftSource, Finished, QualitySource
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.observe.labels import OTHER
from proxy.settings import ProxyConfig

log = logging.getLogger("infermon.canary")

#: seconds between hand-overs of the finished requests to the analyzer
DRAIN = 1.0


class CanaryObserver(Observer):
    name = "canary"

    def __init__(
        self, cfg: ProxyConfig, drift: DriftSource | None = None, quality: QualitySource | None = None
    ) -> None:
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
                drift_share=c.drift_share,
                accuracy_tolerance=c.accuracy_tolerance,
                mae_tolerance=c.mae_tolerance,
            ),
            drift,
            quality,
        )
        if cfg.upstreams:  # a split: its variants are known from the start, traffic or not
            self.analyzer.track(cfg.variants())
        #: finished requests since the last hand-over (event-loop thread only)
        self._finished: list[Finished] = []
        self._task: asyncio.Task[None] | None = None
        self.evaluations = 0

    # -- request path -----------------------------------------------------------------------

    def on_complete(self, ex: Exchange) -> None:
        variant = ex.variant
        if not variant or variant == OTHER:
            return
        status = ex.status
        t = ex.t_done  # time.perf_counter(), the clock the analysis runs on
        self._finished.append((variant, t, t - ex.t_accepted, ex.error is not None or status >= 500 or status == 0))

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

    async def flush(self) -> None:
        """Hand the finished requests so far to the analyzer (event-loop thread)."""
        batch, self._finished = self._finished, []
        if batch:
            await asyncio.to_thread(self.analyzer.ingest, batch)

    async def evaluate(self) -> None:
        """Hand over the finished requests, then evaluate: both in a worker thread, never on the loop."""
        await self.flush()
        await asyncio.to_thread(self.analyzer.evaluate, time.perf_counter())
        self.evaluations += 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_eval = loop.time() + self.every
        while True:
            await asyncio.sleep(min(DRAIN, max(0.0, next_eval - loop.time())))
            try:
                if loop.time() >= next_eval:
                    next_eval = loop.time() + self.every
                    await self.evaluate()
                else:
                    await self.flush()
            except Exception:
                log.exception("canary analysis failed (it runs again in %g s)", DRAIN)

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
