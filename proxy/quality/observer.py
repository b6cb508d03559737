"""Model quality in a running proxy: the store, the scores engine, ``POST /feedback`` and ``GET /quality``.

:class:`QualityObserver` has no request-path hook: the sampler captures the responses
(:mod:`proxy.sampling.sampler`, with ``feedback.enabled``) and the side path hands each request's
predictions to :meth:`QualityObserver.prediction` (the side-path thread). A task on the event loop
has the scores engine recompute in a worker thread every ``quality.interval`` seconds; the MLflow
export (``quality.mlflow.tracking_uri``) runs beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.admin.server import add_state_route, json_response
from proxy.dataplane.hooks import Observer
from proxy.quality.feedback import BadFeedback, Item, apply, parse_body, validate
from proxy.quality.predictions import Instance, instance, kserve_instances, without_many_scores
from proxy.quality.scores import ScoresEngine
from proxy.quality.store import EVICTIONS, OUTCOMES, FeedbackStore, Labels
from proxy.settings import ProxyConfig

if TYPE_CHECKING:
    from proxy.quality.mlflow import MlflowExporter
    from proxy.sampling.sampler import Sampler

log = logging.getLogger("infermon.quality")

#: bodies larger than this are parsed and joined in a worker thread, not on the event loop
OFF_LOOP_BYTES = 64 * 1024
#: how long POST /feedback waits at most for the side path to store the predictions of the responses
#: given before it came (a label posted as soon as its answer came would find its id unknown)
CATCH_UP_SECONDS = 2.0
#: why a prediction never reached the store, besides the request path's reasons (the sampler's)
SIDE_REASONS = ("unparsable", "hostile", "no_prediction", "internal")


class QualityObserver(Observer):
    name = "quality"

    def __init__(self, cfg: ProxyConfig, sampler: Sampler | None = None) -> None:
        self.cfg = cfg
        fb = cfg.feedback
        labels = cfg.labels
        self.store = FeedbackStore(fb.max_entries, fb.ttl, fb.remember, (labels.model, labels.version, labels.variant))
        self.engine = ScoresEngine(cfg.quality)
        self.sampler = sampler
        self.max_instances = fb.max_instances
        self.max_classes = cfg.quality.max_classes  # scores of more classes are not kept
        self.max_body = fb.max_body_bytes
        #: predictions lost on the side path, by reason (the side-path thread writes)
        self.dropped: dict[str, int] = dict.fromkeys(SIDE_REASONS, 0)
        self.instances_cut = 0  # instances beyond feedback.max_instances, not kept
        self.requests: dict[int, int] = {}  # POST /feedback answers by status
        #: KServe v1 / TF Serving responses are read directly, without the extractor, unless the
        #: configuration asks the extractor for something (an adapter, a mapping, redaction)
        self.direct = cfg.sampling.adapter in ("auto", "kserve_v1", "tfserving") and not cfg.sampling.redact_fields
        self.exporter: MlflowExporter | None = None
        if cfg.quality.mlflow.tracking_uri is not None:
            from proxy.quality.mlflow import MlflowExporter

            self.exporter = MlflowExporter(cfg.quality.mlflow, self.engine)
        self._task: asyncio.Task[None] | None = None

    # -- the side path (its thread) -------------------------------------------------------------

    def prediction(self, request_id: str, t: float, labels: Labels, rows: list[dict[str, Any]]) -> None:
        """One request's extracted predictions (one row per instance), answered at ``t``."""
        if len(rows) > self.max_instances:
            self.instances_cut += len(rows) - self.max_instances
            rows = rows[: self.max_instances]
        self.instances(request_id, t, labels, [instance(row) for row in rows])

    def response(self, request_id: str, t: float, labels: Labels, body: bytes) -> bool:
        """A response kept for feedback, read directly when it is KServe v1 / TF Serving JSON:
        False when it is another shape (the caller then has the extractor read it)."""
        if not self.direct or not body.startswith(b"{"):
            return False
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        found = kserve_instances(doc, self.max_instances + 1)
        if found is None:
            return False
        if len(found) > self.max_instances:
            self.instances_cut += len(doc["predictions"]) - self.max_instances
            found = found[: self.max_instances]
        self.instances(request_id, t, labels, found)
        return True

    def instances(self, request_id: str, t: float, labels: Labels, instances: list[Instance | None]) -> None:
        if not any(i is not None for i in instances):
            self.dropped["no_prediction"] += 1
            return
        most = self.max_classes
        if any(i is not None and i.scores is not None and len(i.scores) > most for i in instances):
            instances = [without_many_scores(i, most) for i in instances]
        self.store.put(request_id, t, labels, instances)
        self.engine.predicted(labels, t, len(instances))

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        if self.exporter is not None:
            self.exporter.start()

    async def evaluate(self) -> None:
        """Expire old predictions and recompute the scores, in a worker thread."""
        await asyncio.to_thread(self._evaluate)

    def _evaluate(self) -> None:
        self.store.expire()
        self.engine.evaluate(time.time())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.quality.interval)
            try:
                await self.evaluate()
            except Exception:
                log.exception("quality evaluation failed (it runs again in %g s)", self.cfg.quality.interval)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.exporter is not None:
            await self.exporter.aclose()

    def collector(self) -> Collector:
        return QualityCollector(self)

    # -- admin routes ---------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        add_state_route(app, "POST", "/feedback", self.post_feedback)
        app.router.add_get("/quality", self.get_quality)

    def _count(self, status: int) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1

    async def post_feedback(self, request: web.Request) -> web.Response:
        limit = self.max_body
        too_large = json_response(
            {
                "error": f"the body is over feedback.max_body_bytes ({limit} bytes): send fewer items per request",
                "limit": limit,
            },
            status=413,
        )
        if request.content_length is not None and request.content_length > limit:
            self._count(413)
            return too_large
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > limit:
                self._count(413)
                return too_large
        # the responses answered before this label came: their predictions may still be queued
        side = self.sampler.side if self.sampler is not None else None
        target = self.sampler.enqueued if self.sampler is not None else 0
        data = bytes(body)
        content_type = request.content_type
        off_loop = len(data) > OFF_LOOP_BYTES
        if off_loop:
            parsed = await asyncio.to_thread(self._parse, data, content_type)
        else:
            parsed = self._parse(data, content_type)
        if isinstance(parsed, BadFeedback):
            self._count(400)
            return json_response(parsed.as_dict(), status=400)
        if side is not None and side.jobs < target:
            ids = [it.request_id for it in parsed]
            unseen = await asyncio.to_thread(self.store.unseen, ids) if off_loop else self.store.unseen(ids)
            if unseen:  # wait (off the loop) for the side path to store what was queued before
                await asyncio.to_thread(side.wait_idle, CATCH_UP_SECONDS, target)
        if off_loop:
            result = await asyncio.to_thread(apply, parsed, self.store, self.engine)
        else:
            result = apply(parsed, self.store, self.engine)
        self._count(200)
        return json_response(result)

    @staticmethod
    def _parse(body: bytes, content_type: str) -> list[Item] | BadFeedback:
        try:
            raw, lines = parse_body(body, content_type)
            return validate(raw, lines)
        except BadFeedback as exc:
            return exc

    async def get_quality(self, request: web.Request) -> web.Response:
        def render() -> bytes:
            report: dict[str, Any] = {"enabled": True, **self.engine.report(), "store": self.store.stats()}
            report["predictions_dropped"] = self.dropped_counts()
            if self.exporter is not None:
                report["mlflow"] = {
                    "tracking_uri": self.cfg.public_dict()["quality"]["mlflow"]["tracking_uri"],
                    "experiment": self.cfg.quality.mlflow.experiment,
                    "exports": dict(self.exporter.outcomes),
                    "last_error": self.exporter.last_error,
                }
            return orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)

        return web.Response(body=await asyncio.to_thread(render), content_type="application/json")

    def dropped_counts(self) -> dict[str, int]:
        counts = dict(self.sampler.feedback_dropped) if self.sampler is not None else {}
        for reason, n in list(self.dropped.items()):
            counts[reason] = counts.get(reason, 0) + n
        return counts


class QualityCollector(Collector):
    """The store's and the feedback API's counters, then the scores engine's families."""

    def __init__(self, quality: QualityObserver) -> None:
        self.quality = quality

    def collect(self) -> Iterator[Metric]:
        q = self.quality
        stats = q.store.stats()
        total = CounterMetricFamily(
            "infermon_feedback",
            "Labels received on POST /feedback, by outcome: joined (with a kept prediction), supplied (with the "
            "caller's prediction), unknown (no such request id), duplicate (that instance had its label), late "
            "(its prediction was evicted), no_prediction (none that fits the label).",
            labels=("outcome",),
        )
        for outcome in OUTCOMES:
            total.add_metric((outcome,), stats["feedback"][outcome])
        yield total
        yield GaugeMetricFamily(
            "infermon_feedback_store_entries", "Requests whose predictions wait for labels.", value=stats["entries"]
        )
        yield CounterMetricFamily(
            "infermon_feedback_predictions", "Requests whose predictions were kept for labels.", value=stats["stored"]
        )
        evicted = CounterMetricFamily(
            "infermon_feedback_store_evicted",
            "Kept predictions that left without all their labels, by reason: full (feedback.max_entries), ttl "
            "(feedback.ttl), replaced (a request id used again).",
            labels=("reason",),
        )
        for reason in EVICTIONS:
            evicted.add_metric((reason,), stats["evicted"][reason])
        yield evicted
        dropped = CounterMetricFamily(
            "infermon_feedback_predictions_dropped",
            "Predictions never kept, by reason: queue_full, oversized (a response over sampling.max_body_bytes), "
            "incomplete, unparsable, hostile, no_prediction (a 2xx response without one), internal.",
            labels=("reason",),
        )
        for reason, n in q.dropped_counts().items():
            dropped.add_metric((reason,), n)
        yield dropped
        yield CounterMetricFamily(
            "infermon_feedback_instances_cut",
            "Instances of batched requests beyond feedback.max_instances, not kept.",
            value=q.instances_cut,
        )
        requests = CounterMetricFamily(
            "infermon_feedback_requests", "POST /feedback requests, by status (400: a bad body).", labels=("status",)
        )
        for status, n in sorted(q.requests.items()):
            requests.add_metric((str(status),), n)
        yield requests
        yield from q.engine.collector().collect()
        if q.exporter is not None:
            exports = CounterMetricFamily(
                "infermon_mlflow_exports",
                "Exports of the scores to the MLflow tracking server, by outcome: ok, failed.",
                labels=("outcome",),
            )
            for result, n in q.exporter.outcomes.items():
                exports.add_metric((result,), n)
            yield exports
