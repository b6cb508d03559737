"""The side path: one thread that turns queued samples into features, drift, sink records and usage.

It wakes every ``POLL`` seconds (the request path never signals it: appending to a deque is all it
does), and for each job:

1. builds a :class:`~proxy.sampling.sample.Sample` with the secret headers removed;
2. extracts features, predictions and usage (:class:`~proxy.sampling.extract.Extractor`, which
   also removes the configured JSON fields); a body it cannot read is dropped and counted
   (``unparsable``, ``hostile``);
3. feeds the drift engine and offers the sample to every sink (they queue, never block);
4. counts LLM token usage;
5. with feedback on, hands the predictions of each 2xx response (sampled ones and the ``FEEDBACK``
   jobs that carry a response only) to the feedback store (:attr:`SidePath.feedback`).

Every ``drift.interval`` seconds it has the drift engine evaluate its windows. An exception in any
step is logged (at most once a minute) and counted as ``internal``; the thread goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.sampling.extract import Dropped, Extractor
from proxy.sampling.llm import usage_from_tail
from proxy.sampling.redact import Redactor
from proxy.sampling.sample import Extracted, Sample
from proxy.sampling.sampler import FEEDBACK, SAMPLE, Job, Sampler

if TYPE_CHECKING:  # numpy comes with the drift engine: imported only when sampling is on
    from proxy.drift.engine import DriftEngine
    from proxy.quality.observer import QualityObserver
    from proxy.sinks.base import Sink

log = logging.getLogger("infermon.sampling")

POLL = 0.05
#: infermon_llm_time_per_output_token_seconds buckets
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
TOKEN_KINDS = ("prompt", "completion")


class SidePath:
    """The side-path thread and the counters it keeps (read by :class:`SideCollector`)."""

    def __init__(
        self,
        sampler: Sampler,
        extractor: Extractor,
        engine: DriftEngine | None,
        sinks: Sequence[Sink],
        redactor: Redactor,
        interval: float,
    ) -> None:
        self.sampler = sampler
        self.extractor = extractor
        self.engine = engine
        self.sinks = list(sinks)
        self.redactor = redactor
        self.interval = interval
        self.samples = 0  # infermon_samples_total
        self.rows = 0
        self.dropped: dict[str, int] = {"unparsable": 0, "hostile": 0, "internal": 0}
        #: (model, version, variant, kind) -> tokens
        self.tokens: dict[tuple[str, str, str, str], int] = {}
        #: (model, version, variant) -> bucket counts (+Inf last) and the sum at index -1
        self.tpot: dict[tuple[str, str, str], list[float]] = {}
        self.cpu_seconds = 0.0  # this thread's CPU time spent on jobs
        self.jobs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.eval_errors = 0
        #: where each sample's predictions go besides drift (the canary analysis): (variant, rows)
        self.predictions: Callable[[str, list[dict[str, Any]]], None] | None = None
        #: where every 2xx response's predictions go for the labels that come later (feedback.enabled)
        self.feedback: QualityObserver | None = None
        self._last_error_log = -1e9
        self._progress = threading.Condition()  # notified after each batch of jobs

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="infermon-side-path", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Process what is queued (within ``timeout``), then end the thread (blocking)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait_idle(self, timeout: float, target: int | None = None) -> bool:
        """Block until every job queued so far (or the first ``target`` ones) was processed (False
        after ``timeout`` seconds)."""
        if target is None:
            target = self.sampler.enqueued
        with self._progress:
            return self._progress.wait_for(lambda: self.jobs >= target, timeout)

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        queue = self.sampler.queue
        next_eval = time.monotonic() + self.interval
        while True:
            stopping = self._stop.is_set()
            if queue:
                cpu = time.thread_time()
                n = 0
                while queue and n < 256:  # evaluation still gets its turn under a flood
                    self._job(queue.popleft())
                    n += 1
                self.cpu_seconds += time.thread_time() - cpu
                with self._progress:
                    self.jobs += n
                    self._progress.notify_all()
            elif stopping:
                break
            now = time.monotonic()
            if self.engine is not None and now >= next_eval:
                next_eval = now + self.interval
                self._guarded(self.engine.evaluate, time.time())
            if not queue:
                self._stop.wait(POLL)
        if self.engine is not None:
            self._guarded(self.engine.evaluate, time.time())

    def _job(self, job: Job) -> None:
        kind, ex, wall, req, resp, sse, cut, tail, size = job
        self.sampler.bytes_out += size
        labels = (ex.model, ex.version, ex.variant)
        try:
            if kind == SAMPLE:
                self._sample(ex, wall, req, resp, sse, cut, tail, labels)
            elif kind == FEEDBACK:
                self._feedback(ex, wall, resp, labels)
            else:
                usage, _ = usage_from_tail(tail, sse)
                if usage is not None:
                    self._usage(labels, usage, ex, sse)
        except Exception as exc:  # a bug here must not end the thread
            if kind == FEEDBACK and self.feedback is not None:
                self.feedback.drop("internal")
            else:
                self.dropped["internal"] += 1
            self._log(exc)

    def _feedback(self, ex: Any, wall: float, resp: list[bytes], labels: tuple[str, str, str]) -> None:
        """A response kept for its predictions only: read them, hand them to the feedback store."""
        feedback = self.feedback
        if feedback is None:
            return
        encoded = any(k.lower() == b"content-encoding" for k, _ in ex.response_headers)
        body = resp[0] if len(resp) == 1 else b"".join(resp)
        if not encoded and feedback.response(ex.request_id, wall, labels, body):
            return  # the common shape, read without the extractor
        sample = Sample(
            request_id=ex.request_id,
            timestamp=wall,
            method=ex.method,
            path=ex.path,
            status=ex.status,
            model=labels[0],
            version=labels[1],
            variant=labels[2],
            request_headers=[],
            # only its content coding matters to reading the body
            response_headers=[
                ("content-encoding", v.decode("latin-1"))
                for k, v in ex.response_headers
                if k.lower() == b"content-encoding"
            ],
            request_body=b"",
            response_body=body,
        )
        try:
            extracted = self.extractor.extract(sample, response_only=True)
        except Dropped as exc:
            feedback.drop(exc.reason)
            return
        feedback.prediction(ex.request_id, wall, labels, extracted.predictions)

    def _sample(
        self,
        ex: Any,
        wall: float,
        req: list[bytes],
        resp: list[bytes],
        sse: bool,
        cut: bool,
        tail: bytes,
        labels: tuple[str, str, str],
    ) -> None:
        headers = self.redactor.headers
        sample = Sample(
            request_id=ex.request_id,
            timestamp=wall,
            method=ex.method,
            path=ex.path,
            status=ex.status,
            model=labels[0],
            version=labels[1],
            variant=labels[2],
            request_headers=headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in ex.request_headers]),
            response_headers=headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in ex.response_headers]),
            request_body=b"".join(req),
            response_body=b"".join(resp),
            response_stream=sse,
            response_truncated=cut,
            response_tail=tail if cut or sse else b"",
            duration=(ex.t_done - ex.t_accepted) if ex.t_done else 0.0,
            ttfb=(ex.t_first_byte - ex.t_accepted) if ex.t_first_byte else None,
            error=ex.error,
            trace_id=ex.trace_id,
        )
        extracted: Extracted | None = None
        lost = ""
        try:
            extracted = self.extractor.extract(sample)
        except Dropped as exc:
            self.dropped[exc.reason] = self.dropped.get(exc.reason, 0) + 1
            lost = exc.reason
        if extracted is not None:
            self.samples += 1
            self.rows += len(extracted.rows)
            if self.engine is not None and (extracted.rows or extracted.predictions):
                self.engine.add(extracted.rows, extracted.predictions, wall, sample.variant)
            for sink in self.sinks:
                sink.offer(sample, extracted)
            if self.predictions is not None and extracted.predictions:
                self.predictions(sample.variant, extracted.predictions)
        if self.feedback is not None and 200 <= ex.status < 300 and not sse and ex.path not in self.sampler.llm_routes:
            if extracted is None:
                self.feedback.drop(lost or "unparsable")
            else:
                self.feedback.prediction(ex.request_id, wall, labels, extracted.predictions)
        if ex.path in self.sampler.llm_routes and 200 <= ex.status < 300:
            # token usage counts for every OpenAI-route response, whether or not the sample was read
            usage = extracted.usage if extracted is not None else None
            if usage is None and tail:
                usage, _ = usage_from_tail(tail, sse)
            if usage is not None:
                self._usage(labels, usage, ex, sse)

    def _usage(self, labels: tuple[str, str, str], usage: dict[str, int], ex: Any, stream: bool) -> None:
        tokens = self.tokens
        for kind in TOKEN_KINDS:
            n = usage.get(f"{kind}_tokens")
            if isinstance(n, int) and n > 0:
                key = (*labels, kind)
                tokens[key] = tokens.get(key, 0) + n
        completion = usage.get("completion_tokens")
        if stream and isinstance(completion, int) and completion > 1 and ex.t_first_byte and ex.t_done:
            # time per output token after the first (the first one's wait is TTFT)
            value = (ex.t_done - ex.t_first_byte) / (completion - 1)
            hist = self.tpot.get(labels)
            if hist is None:
                hist = self.tpot[labels] = [0.0] * (len(TPOT_BUCKETS) + 2)
            i = 0
            while i < len(TPOT_BUCKETS) and value > TPOT_BUCKETS[i]:
                i += 1
            hist[i] += 1
            hist[-1] += value

    def _guarded(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self.eval_errors += 1
            self._log(exc)

    def _log(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 60.0:
            self._last_error_log = now
            log.error("side path failed (samples keep flowing): %r", exc, exc_info=exc)


class SideCollector(Collector):
    """``infermon_samples_*``, ``infermon_llm_*`` and the side path's own gauges."""

    def __init__(self, sampler: Sampler, side: SidePath | None) -> None:
        self.sampler = sampler
        self.side = side

    def collect(self) -> Iterator[Metric]:
        sampler, side = self.sampler, self.side
        yield CounterMetricFamily(
            "infermon_samples",
            "Sampled exchanges read by the side path (extracted, fed to drift and the sinks).",
            value=side.samples if side is not None else 0,
        )
        dropped = CounterMetricFamily(
            "infermon_samples_dropped",
            "Samples dropped, by reason: oversized (a body over sampling.max_body_bytes), incomplete "
            "(a body cut short), queue_full, unparsable, hostile (over a parse bound), internal.",
            labels=("reason",),
        )
        counts = dict(sampler.dropped)
        if side is not None:
            for reason, n in list(side.dropped.items()):
                counts[reason] = counts.get(reason, 0) + n
        for reason, n in counts.items():
            dropped.add_metric((reason,), n)
        yield dropped
        yield CounterMetricFamily(
            "infermon_sample_rows", "Instances (rows) extracted from samples.", value=side.rows if side else 0
        )
        yield GaugeMetricFamily("infermon_sample_queue", "Samples waiting for the side path.", value=len(sampler.queue))
        yield GaugeMetricFamily(
            "infermon_sample_queue_bytes",
            "Body bytes held by the samples waiting for the side path.",
            value=max(0, sampler.bytes_in - sampler.bytes_out),
        )
        if side is None:
            return
        yield CounterMetricFamily(
            "infermon_sidepath_cpu_seconds",
            "CPU time the side-path thread spent on samples and usage (not on waiting).",
            value=side.cpu_seconds,
        )
        yield CounterMetricFamily("infermon_sidepath_jobs", "Jobs the side path processed.", value=side.jobs)
        errors = CounterMetricFamily(
            "infermon_sidepath_errors",
            "Failures inside the side path (logged once a minute), by stage: sample (that sample is "
            "dropped as internal), evaluate (a drift evaluation).",
            labels=("stage",),
        )
        errors.add_metric(("sample",), side.dropped.get("internal", 0))
        errors.add_metric(("evaluate",), side.eval_errors)
        yield errors
        tokens = CounterMetricFamily(
            "infermon_llm_tokens",
            "LLM tokens on the OpenAI-compatible routes, from each response's usage, by kind: prompt, completion.",
            labels=("model", "version", "variant", "kind"),
        )
        for key, n in list(side.tokens.items()):
            tokens.add_metric(key, n)
        yield tokens
        yield CounterMetricFamily(
            "infermon_llm_usage_dropped",
            "OpenAI-route responses whose usage was not read: the side path's queue was full.",
            value=sampler.usage_dropped,
        )
        tpot = HistogramMetricFamily(
            "infermon_llm_time_per_output_token_seconds",
            "Streamed completions: time from the first to the last byte per output token after the first.",
            labels=("model", "version", "variant"),
        )
        for labels, hist in list(side.tpot.items()):
            counts_ = hist[:]
            buckets: list[tuple[str, float]] = []
            acc = 0.0
            for bound, c in zip((*map(str, TPOT_BUCKETS), "+Inf"), counts_[:-1], strict=True):
                acc += c
                buckets.append((bound, acc))
            tpot.add_metric(list(labels), buckets, counts_[-1])
        yield tpot
