"""All request metrics of the proxy, in one place (names and meanings: docs/metrics.md).

The hot path does not go through prometheus_client's metric objects (a lock and label validation per
call): :class:`RequestMetrics` keeps plain counters and bucket arrays per label set, updated by one
``on_complete`` per request, and a collector turns them into metric families at scrape time.
prometheus_client still writes the exposition (text and OpenMetrics). Everything runs on the event
loop thread, scrapes included, so no locks are needed.
"""

from __future__ import annotations

import platform
import sys
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from time import perf_counter, time

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from proxy import __version__
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Hooks, Observer
from proxy.observe.labels import method_label
from proxy.settings import ProxyConfig

REQUEST_LABELS = ("model", "version", "variant", "method", "code")
HIST_LABELS = ("model", "version", "variant", "method", "code_class")
MODEL_LABELS = ("model", "version", "variant")
UPSTREAM_KINDS = frozenset({"connect", "timeout", "reset", "protocol", "internal"})

__all__ = ["RequestMetrics", "build_registry"]
_ = (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR)  # the global ones stay unused: own registry


class FastHistogram:
    """Bucket counts for one label set: ``observe`` is a bisect and two additions.

    ``observe_exemplar`` also keeps, per bucket, the latest (trace id, value, time): OpenMetrics
    exemplars that link a latency bucket to a trace.
    """

    __slots__ = ("bounds", "count", "counts", "exemplars", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self.exemplars: list[tuple[str, float, float] | None] | None = None

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def observe_exemplar(self, value: float, trace_id: str) -> None:
        i = bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.sum += value
        self.count += 1
        if self.exemplars is None:
            self.exemplars = [None] * len(self.counts)
        self.exemplars[i] = (trace_id, value, time())

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) per bucket, +Inf last."""
        out: list[tuple[str, float]] = []
        total = 0
        for i, n in enumerate(self.counts):
            total += n
            out.append((_go_float(self.bounds[i]) if i < len(self.bounds) else "+Inf", total))
        return out

    def exposition(self) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
        """Like :meth:`cumulative`, with each bucket's latest exemplar where there is one."""
        rows: list[tuple[str, float] | tuple[str, float, Exemplar]] = list(self.cumulative())
        if self.exemplars is not None:
            for i, ex in enumerate(self.exemplars):
                if ex is not None:
                    rows[i] = (*rows[i][:2], Exemplar({"trace_id": ex[0]}, ex[1], ex[2]))
        return rows


class _Histograms:
    __slots__ = ("duration", "request_size", "response_size", "ttfb", "upstream_header")

    def __init__(self, cfg: ProxyConfig) -> None:
        m = cfg.metrics
        self.duration = FastHistogram(m.duration_buckets)
        self.upstream_header = FastHistogram(m.duration_buckets)
        self.ttfb = FastHistogram(m.duration_buckets)
        self.request_size = FastHistogram(m.size_buckets)
        self.response_size = FastHistogram(m.size_buckets)


class _Series:
    __slots__ = ("count", "hist")

    def __init__(self, hist: _Histograms) -> None:
        self.count = 0
        self.hist = hist


class RequestMetrics(Observer, Collector):
    """Golden signals per model, version, variant, method and status."""

    name = "metrics"

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        labels = cfg.labels
        self.defaults = (labels.model, labels.version, labels.variant)
        self.series: dict[tuple[str, str, str, str, int], _Series] = {}
        self.series_labels: dict[tuple[str, str, str, str, int], tuple[str, ...]] = {}
        self.hists: dict[tuple[str, ...], _Histograms] = {}
        self.gaps: dict[tuple[str, str, str], FastHistogram] = {}
        self.upstream_errors: dict[tuple[str, ...], int] = {}
        self.client_aborts: dict[tuple[str, ...], int] = {}
        self.retries = 0
        self.in_flight: Callable[[], int] = lambda: 0
        self.gauges: list[tuple[str, str, Callable[[], float]]] = []
        self.counters: list[tuple[str, str, Callable[[], float]]] = []
        self.hooks: Hooks | None = None

    def collector(self) -> Collector:
        return self

    # -- hot path -----------------------------------------------------------------------------

    def on_response_body(self, ex: Exchange, chunk: bytes) -> None:
        if not ex.stream:
            return
        last = ex.t_last_chunk
        t = ex.t_last_chunk = perf_counter()
        if last:
            key = (ex.model or self.defaults[0], ex.version or self.defaults[1], ex.variant or self.defaults[2])
            hist = self.gaps.get(key)
            if hist is None:
                hist = self.gaps[key] = FastHistogram(self.cfg.metrics.gap_buckets)
            hist.observe(t - last)

    def on_complete(self, ex: Exchange) -> None:
        model = ex.model or self.defaults[0]
        version = ex.version or self.defaults[1]
        variant = ex.variant or self.defaults[2]
        key = (model, version, variant, ex.method, ex.status)
        series = self.series.get(key)
        if series is None:
            series = self._new_series(key)
        series.count += 1
        h = series.hist
        start = ex.t_accepted
        if ex.sampled:
            h.duration.observe_exemplar(ex.t_done - start, ex.trace_id)
        else:
            h.duration.observe(ex.t_done - start)
        if ex.t_upstream_head and ex.t_upstream_connected:
            h.upstream_header.observe(ex.t_upstream_head - ex.t_upstream_connected)
        if ex.t_first_byte:
            h.ttfb.observe(ex.t_first_byte - start)
        h.request_size.observe(ex.bytes_in)
        h.response_size.observe(ex.bytes_out)
        if ex.error is not None or ex.aborted or ex.retried:
            self._outcome(ex, (model, version, variant))

    def _outcome(self, ex: Exchange, labels: tuple[str, str, str]) -> None:
        if ex.error in UPSTREAM_KINDS:
            key = (*labels, ex.error)
            self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1
        if ex.aborted:
            self.client_aborts[labels] = self.client_aborts.get(labels, 0) + 1
        if ex.retried:
            self.retries += 1

    def _new_series(self, key: tuple[str, str, str, str, int]) -> _Series:
        model, version, variant, method, status = key
        mlabel = method_label(method)
        code_class = f"{status // 100}xx" if status else "none"
        hkey = (model, version, variant, mlabel, code_class)
        hist = self.hists.get(hkey)
        if hist is None:
            hist = self.hists[hkey] = _Histograms(self.cfg)
        series = self.series[key] = _Series(hist)
        self.series_labels[key] = (model, version, variant, mlabel, str(status))
        return series

    # -- scrape -------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "infermon_requests", "Requests answered by the proxy (499: client went away).", labels=REQUEST_LABELS
        )
        merged: dict[tuple[str, ...], int] = {}
        for key, series in self.series.items():
            labels = self.series_labels[key]
            merged[labels] = merged.get(labels, 0) + series.count
        for labels, count in merged.items():
            requests.add_metric(labels, count)
        yield requests

        specs = (
            ("infermon_request_duration_seconds",
             "End-to-end request duration, first request byte to last response byte.", "duration"),
            ("infermon_upstream_header_seconds",
             "Time from sending the request upstream to its response head.", "upstream_header"),
            ("infermon_time_to_first_byte_seconds",
             "First request byte to first response body byte (TTFT for streams).", "ttfb"),
            ("infermon_request_size_bytes", "Request body size.", "request_size"),
            ("infermon_response_size_bytes", "Response body size.", "response_size"),
        )  # fmt: skip
        for name, doc, attr in specs:
            fam = HistogramMetricFamily(name, doc, labels=HIST_LABELS)
            for hkey, hists in self.hists.items():
                hist: FastHistogram = getattr(hists, attr)
                if hist.count:
                    fam.add_metric(hkey, hist.exposition(), hist.sum)
            yield fam

        gaps = HistogramMetricFamily(
            "infermon_stream_chunk_gap_seconds",
            "Time between consecutive response body pieces of streamed (chunked / SSE) responses.",
            labels=MODEL_LABELS,
        )
        for gkey, hist in self.gaps.items():
            gaps.add_metric(gkey, hist.cumulative(), hist.sum)
        yield gaps

        inflight = GaugeMetricFamily("infermon_requests_in_flight", "Requests being proxied now.")
        inflight.add_metric((), self.in_flight())
        yield inflight

        errors = CounterMetricFamily(
            "infermon_upstream_errors",
            "Upstream failures by kind: connect, timeout, reset, protocol.",
            labels=(*MODEL_LABELS, "kind"),
        )
        for ekey, n in self.upstream_errors.items():
            errors.add_metric(ekey, n)
        yield errors

        aborts = CounterMetricFamily(
            "infermon_client_aborts", "Requests whose client went away before the response ended.", labels=MODEL_LABELS
        )
        for akey, n in self.client_aborts.items():
            aborts.add_metric(akey, n)
        yield aborts

        yield CounterMetricFamily(
            "infermon_upstream_retries",
            "Requests sent again on a fresh connection after a pooled one turned out stale.",
            value=self.retries,
        )
        if self.hooks is not None:
            obs = CounterMetricFamily(
                "infermon_observer_errors", "Exceptions raised by monitoring observers.", labels=("observer", "hook")
            )
            for (oname, hook), n in self.hooks.errors.items():
                obs.add_metric((oname, hook), n)
            yield obs
        for gname, doc, fn in self.gauges:
            yield GaugeMetricFamily(gname, doc, value=fn())
        for cname, doc, fn in self.counters:
            yield CounterMetricFamily(cname, doc, value=fn())

        yield InfoMetricFamily(
            "infermon_build",
            "infermon build information.",
            value={"version": __version__, "python": platform.python_version(), "loop": _loop_name()},
        )


def _go_float(value: float) -> str:
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


def _loop_name() -> str:
    return "uvloop" if "uvloop" in sys.modules else "asyncio"


def build_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry with the process, platform and GC collectors and the given ones."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry
