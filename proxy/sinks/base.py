"""What every sink shares: the :class:`Sink` interface, its counters and their one collector.

A sink receives each sample after the side path read it (:class:`~proxy.sampling.sample.Sample` and
its :class:`~proxy.sampling.sample.Extracted`) through :meth:`Sink.offer`, called from the side-path
worker thread. ``offer`` never blocks and never raises: it puts what it makes of the sample into the
sink's bounded queue, or drops it and counts why. The sink's own thread takes it from there.

Metrics (label ``sink``: ``jsonl`` or ``cloudevents``), all read at scrape time from plain counters:

- ``infermon_sink_sent_total{sink}``: lines written (JSONL), events the receiver accepted (CloudEvents)
- ``infermon_sink_dropped_total{sink,reason}``: lines or events lost, by reason (each sink lists its
  reasons in :attr:`Sink.reasons`; every reason is exported from the start, at 0)
- ``infermon_sink_retries_total{sink}``: deliveries sent again after a transient failure
- ``infermon_sink_latency_seconds{sink}``: histogram, from ``offer`` to written / accepted
- ``infermon_sink_queue{sink}``: lines or events waiting

One collector serves every sink (:class:`SinksCollector`): two collectors each writing the same
families would put two ``# HELP`` blocks of one name in the exposition, which Prometheus refuses.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.sampling.sample import Extracted, Sample

if TYPE_CHECKING:
    from proxy.settings import Sinks as SinksConfig

__all__ = ["LATENCY_BUCKETS", "LogLimiter", "Sink", "SinkStats", "SinksCollector", "build_sinks", "rfc3339"]

#: delivery time buckets, seconds: a local file takes milliseconds, a receiver that retries minutes
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


_SECONDS: dict[int, str] = {}  # whole seconds already formatted (strftime is most of the cost)


def rfc3339(ts: float) -> str:
    """UTC with milliseconds: ``2026-11-25T16:22:39.123Z`` (the access log's form)."""
    seconds, ms = divmod(int(ts * 1000), 1000)
    prefix = _SECONDS.get(seconds)
    if prefix is None:
        if len(_SECONDS) >= 64:
            _SECONDS.clear()
        prefix = _SECONDS[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{prefix}.{ms:03d}Z"


class LogLimiter:
    """Logs a recurring error at most once per ``interval`` seconds, saying how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last = -1e18
        self._held = 0
        self._lock = threading.Lock()

    def error(self, msg: str, *args: object) -> None:
        self.log(logging.ERROR, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                self._held += 1
                return
            held, self._held, self._last = self._held, 0, now
        if held:
            msg += " (%d more like it in the last minute, not logged)"
            args = (*args, held)
        self.logger.log(level, msg, *args)


class SinkStats:
    """A sink's counters. Each is written by one thread at a time (``dropped`` under a lock, since the
    offering thread and the sink's own thread both drop); scrapes read them from any thread."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.sent = 0
        self.retries = 0
        self.dropped: dict[str, int] = dict.fromkeys(reasons, 0)
        self._lock = threading.Lock()
        #: non-cumulative bucket counts (the last one is +Inf), then the sum: copied whole by a scrape,
        #: so the +Inf bucket always equals the count
        self._hist: list[float] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]

    def drop(self, reason: str, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def observe(self, seconds: float, n: int = 1) -> None:
        """``n`` deliveries that each took ``seconds``."""
        hist = self._hist
        hist[bisect_left(LATENCY_BUCKETS, seconds)] += n
        hist[-1] += seconds * n

    def histogram(self) -> tuple[list[tuple[str, float]], float]:
        """(cumulative buckets, sum), as HistogramMetricFamily takes them."""
        snap = list(self._hist)
        buckets: list[tuple[str, float]] = []
        total = 0.0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), snap[:-1], strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
        return buckets, snap[-1]


class Sink:
    """A place sampled payloads go. Subclasses set :attr:`name` and :attr:`reasons`."""

    name: str = "sink"
    #: the ``reason`` values of ``infermon_sink_dropped_total`` this sink counts
    reasons: tuple[str, ...] = ("queue_full",)

    def __init__(self) -> None:
        self.stats = SinkStats(self.reasons)

    def offer(self, sample: Sample, extracted: Extracted) -> None:
        """Side-path thread: queue what the sample makes, or drop and count it. Never blocks, never raises."""
        raise NotImplementedError

    async def start(self) -> None:
        """On the proxy's event loop: start the sink's thread."""

    async def aclose(self, timeout: float | None = None) -> None:
        """Deliver what is queued within ``timeout`` seconds (the sink's own limit when None); what is
        left is dropped and counted (``shutdown``). Offers from then on are dropped (``shutdown``)."""

    def queued(self) -> int:
        """Lines or events waiting (``infermon_sink_queue``)."""
        return 0

    def collector(self) -> Collector:
        """This sink's metrics alone. With several sinks, register one :class:`SinksCollector` of them
        all instead (one collector per sink would write each family twice)."""
        return SinksCollector([self])


class SinksCollector(Collector):
    """The ``infermon_sink_*`` families of every sink, one family per name. Thread-safe."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

    def collect(self) -> Iterator[Metric]:
        sent = CounterMetricFamily(
            "infermon_sink_sent", "Lines written (jsonl), events the receiver accepted (cloudevents).", labels=("sink",)
        )
        dropped = CounterMetricFamily(
            "infermon_sink_dropped",
            "Lines or events lost: queue_full (the sink fell behind), failed (the receiver refused them or "
            "stayed unreachable through every retry), write_error (the file could not be written), too_large "
            "(a line longer than max_bytes), unserializable, shutdown (still queued when shutdown's time ran out).",
            labels=("sink", "reason"),
        )
        retries = CounterMetricFamily(
            "infermon_sink_retries", "Deliveries sent again after a connection error, a 5xx or a 429.", labels=("sink",)
        )
        latency = HistogramMetricFamily(
            "infermon_sink_latency_seconds",
            "Time from the offer to the line written or the event accepted (queueing and retries included).",
            labels=("sink",),
        )
        queue = GaugeMetricFamily("infermon_sink_queue", "Lines or events waiting to be delivered.", labels=("sink",))
        for sink in self.sinks:
            stats = sink.stats
            sent.add_metric((sink.name,), stats.sent)
            for reason, count in list(stats.dropped.items()):
                dropped.add_metric((sink.name, reason), count)
            retries.add_metric((sink.name,), stats.retries)
            buckets, total = stats.histogram()
            latency.add_metric((sink.name,), buckets, total)
            queue.add_metric((sink.name,), sink.queued())
        yield from (sent, dropped, retries, latency, queue)


def build_sinks(cfg: SinksConfig) -> list[Sink]:
    """The sinks the configuration switches on (a path, a URL), not started yet."""
    sinks: list[Sink] = []
    if cfg.jsonl.path is not None:
        from proxy.sinks.jsonl import JsonlSink

        sinks.append(JsonlSink(cfg.jsonl))
    if cfg.cloudevents.url is not None:
        from proxy.sinks.cloudevents import CloudEventsSink

        sinks.append(CloudEventsSink(cfg.cloudevents))
    return sinks
