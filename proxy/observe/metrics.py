"""All request metrics of the proxy, in one place (names and meanings: docs/metrics.md).

Hot path: the request path does not go through prometheus_client's metric objects (a lock and label
validation per call). :class:`RequestMetrics` keeps, per label set, a plain counter and one flat list
holding the buckets and sums of all five request histograms, updated by one ``on_complete`` per
request. The bucket bounds are held once, not per label set. Every dict is keyed by bounded labels
only: model, version and variant come from the :class:`~proxy.observe.labels.Labeler` (budgeted), the
method is a standard method or ``other``, the status is 100..599 or ``other``.

Scrape: :class:`Scraper` (the admin server's /metrics) takes on the event loop only what must be read
there (the gauge callbacks, a few small dicts, how many label sets there are), then writes the
exposition in a worker thread. The per-label-set lists only grow (appends), and each label set's flat
list is copied whole in one C-level step (atomic under the GIL), so a histogram's ``+Inf`` bucket
equals its ``_count`` in every scrape while traffic runs. The request metrics are written by
:meth:`RequestMetrics.render` (Prometheus text 0.0.4 or OpenMetrics 1.0 with exemplars; label values
escaped, ``le`` values as prometheus_client writes them). Every other collector (process, GC, data
plane connections, labels, tracing, access log) is small: it is collected on the loop, as before, and
encoded in the thread by the encoder prometheus_client's ``choose_encoder`` picks. gzip runs in the
thread too (zlib drops the GIL while it compresses).
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import sys
import time
import zlib
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import perf_counter

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
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

from proxy import __version__, _compiled
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Hooks, Observer
from proxy.observe.labels import METHODS, OTHER
from proxy.settings import ProxyConfig

REQUEST_LABELS = ("model", "version", "variant", "method", "code")
HIST_LABELS = ("model", "version", "variant", "method", "code_class")
MODEL_LABELS = ("model", "version", "variant")
UPSTREAM_KINDS = frozenset({"connect", "timeout", "reset", "protocol", "internal"})
OPENMETRICS = "application/openmetrics-text"

__all__ = ["FastCollector", "MetricsRegistry", "RequestMetrics", "Scraper", "build_registry"]
_ = (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR)  # the global ones stay unused: own registry

#: a gauge or counter read at scrape time: (name, help, read) -> one unlabelled sample
Reading = tuple[str, str, Callable[[], float]]
#: a labelled family read at scrape time: (name, help, label names, read) -> {label values: value}
LabelledReading = tuple[str, str, tuple[str, ...], Callable[[], Mapping[tuple[str, ...], float]]]

#: a counter or gauge family: (name, kind, help, label names, [(label values, value)])
_Family = tuple[str, str, str, tuple[str, ...], list[tuple[tuple[str, ...], float]]]

_SLICE_S = 0.0005  # the scrape thread hands over a piece of exposition after this much work ...
_YIELD_S = 0.0001  # ... and then pauses this long, so the event loop gets the GIL if it waits for it


# -- text helpers -----------------------------------------------------------------------------


def _go_float(value: float) -> str:
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


def _num(value: float) -> str:
    return str(value) if type(value) is int else _go_float(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(names: Sequence[str], values: Sequence[str]) -> str:
    """``model="iris",version="2"``: the inside of a sample's braces."""
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))


def _header(name: str, kind: str, doc: str, om: bool) -> str:
    """HELP and TYPE lines as prometheus_client writes them in each format."""
    if om:
        doc = doc.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"
    doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
    if kind == "counter":
        name += "_total"
    elif kind == "info":
        name += "_info"
        kind = "gauge"
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def _le_parts(bounds: Sequence[float]) -> tuple[str, ...]:
    """What follows a bucket's other labels, per bucket: ``,le="0.25"} `` (``le`` as prometheus_client
    writes it, so series keep their identity), ``+Inf`` last."""
    return (*(f',le="{_go_float(b)}"}} ' for b in bounds), ',le="+Inf"} ')


def _sample_name(name: str, kind: str) -> str:
    return name + {"counter": "_total", "info": "_info"}.get(kind, "")


# -- histograms ---------------------------------------------------------------------------------


class FastHistogram:
    """Bucket counts for one label set: ``observe`` is a bisect and two additions.

    ``bounds`` is shared, not copied (pass the same tuple to every label set). ``observe_exemplar``
    also keeps, per bucket, the latest (trace id, value, time): OpenMetrics exemplars that link a
    latency bucket to a trace. ``count`` is the sum of the buckets, so it always equals ``+Inf``.
    """

    __slots__ = ("bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds if isinstance(bounds, tuple) else tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.exemplars: list[tuple[str, float, float] | None] | None = None

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_exemplar(self, value: float, trace_id: str) -> None:
        i = bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.sum += value
        if self.exemplars is None:
            self.exemplars = [None] * len(self.counts)
        self.exemplars[i] = (trace_id, value, time.time())

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) per bucket, +Inf last."""
        out: list[tuple[str, float]] = []
        total = 0
        for i, n in enumerate(self.counts[:]):
            total += n
            out.append((_go_float(self.bounds[i]) if i < len(self.bounds) else "+Inf", total))
        return out

    def exposition(self) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
        """Like :meth:`cumulative`, with each bucket's latest exemplar where there is one."""
        rows: list[tuple[str, float] | tuple[str, float, Exemplar]] = list(self.cumulative())
        if self.exemplars is not None:
            for i, ex in enumerate(self.exemplars[:]):
                if ex is not None:
                    rows[i] = (*rows[i][:2], Exemplar({"trace_id": ex[0]}, ex[1], ex[2]))
        return rows


#: a reading taken: (name, help, label names, [(label values, value)])
_Read = tuple[str, str, tuple[str, ...], list[tuple[tuple[str, ...], float]]]


def _read(plain: list[Reading], labelled: list[LabelledReading]) -> list[_Read]:
    out: list[_Read] = [(name, doc, (), [((), fn())]) for name, doc, fn in plain]
    out += [(name, doc, names, list(fn().items())) for name, doc, names, fn in labelled]
    return out


@dataclass(slots=True)
class _Snapshot:
    """What a scrape took on the event loop; the rest is read in the worker thread."""

    series: int  # how many request series and histogram label sets there were: the lists only grow
    hists: int
    gaps: list[tuple[tuple[str, str, str], str, FastHistogram]]
    errors: list[tuple[tuple[str, ...], int]]
    aborts: list[tuple[tuple[str, ...], int]]
    retries: int
    in_flight: float
    observer_errors: list[tuple[tuple[str, str], int]] | None
    gauges: list[_Read]
    counters: list[_Read]


# -- collectors written by hand -------------------------------------------------------------------


class FastCollector(Collector):
    """A collector that writes its own exposition: :meth:`prepare` on the event loop (cheap copies),
    :meth:`render` in the scrape thread. ``collect`` gives the same families to prometheus_client."""

    def prepare(self) -> object:
        raise NotImplementedError

    def render(self, snapshot: object, openmetrics: bool) -> Iterator[str]:
        raise NotImplementedError

    def families(self, snapshot: object) -> Iterator[Metric]:
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        return self.families(self.prepare())


class RequestMetrics(Observer, FastCollector):
    """Golden signals per model, version, variant, method and status."""

    name = "metrics"

    #: (family, help, bounds attribute) in the order of a label set's flat list
    HISTOGRAMS = (
        ("infermon_request_duration_seconds",
         "End-to-end request duration, first request byte to last response byte.", "duration_bounds"),
        ("infermon_upstream_header_seconds",
         "Time from sending the request upstream to its response head.", "duration_bounds"),
        ("infermon_time_to_first_byte_seconds",
         "First request byte to first response body byte (TTFT for streams).", "duration_bounds"),
        ("infermon_request_size_bytes", "Request body size.", "size_bounds"),
        ("infermon_response_size_bytes", "Response body size.", "size_bounds"),
    )  # fmt: skip

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        labels = cfg.labels
        m = cfg.metrics
        self.defaults = (labels.model, labels.version, labels.variant)
        # one bounds tuple per kind, shared by every label set
        self.duration_bounds = tuple(m.duration_buckets)
        self.size_bounds = tuple(m.size_buckets)
        self.gap_bounds = tuple(m.gap_buckets)
        nd = len(self.duration_bounds) + 1
        ns = len(self.size_bounds) + 1
        # (offset of the buckets, number of buckets incl. +Inf) per histogram; its sum follows
        self.layout: list[tuple[int, int]] = []
        offset = 0
        for _, _, attr in self.HISTOGRAMS:
            n = nd if attr == "duration_bounds" else ns
            self.layout.append((offset, n))
            offset += n + 1
        self.size = offset
        (_, _), (o_up, _), (o_ttfb, _), (o_req, _), (o_resp, _) = self.layout
        self._at = (nd, o_up, o_up + nd, o_ttfb, o_ttfb + nd, o_req, o_req + ns, o_resp, o_resp + ns)
        self._les = [_le_parts(getattr(self, attr)) for _, _, attr in self.HISTOGRAMS]
        self._gap_les = _le_parts(self.gap_bounds)

        # Per label set, no object of its own: an index into append-only lists (read from the scrape
        # thread) and one flat list holding its five histograms' buckets and sums. (A list, not an
        # array: list item updates are the interpreter's fastest path, about 1.5 us less per request.)
        #: bounded key -> (request series index, its histograms, histogram index)
        self.series: dict[tuple[str, str, str, str, int], tuple[int, list[float], int]] = {}
        self.requests: list[int] = []  # infermon_requests_total, per series index
        self.series_keys: list[tuple[str, ...]] = []  # label values, per series index
        self.series_labels: list[str] = []  # the same, as exposition text
        self.hists: dict[tuple[str, ...], int] = {}  # histogram label values -> histogram index
        self.hist_counts: list[list[float]] = []  # per histogram index, HISTOGRAMS in order
        self.hist_keys: list[tuple[str, ...]] = []
        self.hist_labels: list[str] = []
        #: per histogram index: the latest sampled request per duration bucket, None until one
        self.hist_exemplars: list[list[tuple[str, float, float] | None] | None] = []
        self.gaps: dict[tuple[str, str, str], FastHistogram] = {}
        self.gap_list: list[tuple[tuple[str, str, str], str, FastHistogram]] = []  # append only
        self.upstream_errors: dict[tuple[str, ...], int] = {}
        self.client_aborts: dict[tuple[str, ...], int] = {}
        self.retries = 0
        self.in_flight: Callable[[], int] = lambda: 0
        #: read on the event loop at each scrape (never from the scrape thread)
        self.gauges: list[Reading] = []
        self.counters: list[Reading] = []
        self.gauge_families: list[LabelledReading] = []
        self.counter_families: list[LabelledReading] = []
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
                hist = self._new_gap(key)
            hist.observe(t - last)

    def on_complete(self, ex: Exchange) -> None:
        d = self.defaults
        model = ex.model or d[0]
        version = ex.version or d[1]
        variant = ex.variant or d[2]
        method = ex.method
        if method not in METHODS:
            method = OTHER
        status = ex.status
        if not 100 <= status <= 599:
            status = 0  # "other"
        key = (model, version, variant, method, status)
        entry = self.series.get(key)
        if entry is None:
            entry = self._new_series(key)
        index, c, hindex = entry
        self.requests[index] += 1
        nd, o_up, s_up, o_ttfb, s_ttfb, o_req, s_req, o_resp, s_resp = self._at
        bounds = self.duration_bounds
        start = ex.t_accepted
        value = ex.t_done - start
        i = bisect_left(bounds, value)
        c[i] += 1
        c[nd] += value
        if ex.sampled:
            exemplars = self.hist_exemplars[hindex]
            if exemplars is None:
                exemplars = self.hist_exemplars[hindex] = [None] * nd
            exemplars[i] = (ex.trace_id, value, time.time())
        if ex.t_upstream_head and ex.t_upstream_connected:
            value = ex.t_upstream_head - ex.t_upstream_connected
            c[o_up + bisect_left(bounds, value)] += 1
            c[s_up] += value
        if ex.t_first_byte:
            value = ex.t_first_byte - start
            c[o_ttfb + bisect_left(bounds, value)] += 1
            c[s_ttfb] += value
        sizes = self.size_bounds
        n = ex.bytes_in
        c[o_req + bisect_left(sizes, n)] += 1
        c[s_req] += n
        n = ex.bytes_out
        c[o_resp + bisect_left(sizes, n)] += 1
        c[s_resp] += n
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

    def _new_series(self, key: tuple[str, str, str, str, int]) -> tuple[int, list[float], int]:
        model, version, variant, method, status = key
        code, code_class = (str(status), f"{status // 100}xx") if status else (OTHER, OTHER)
        hkey = (model, version, variant, method, code_class)
        hindex = self.hists.get(hkey)
        if hindex is None:
            hindex = len(self.hist_counts)
            # every list is extended before the index is published in the dict, and each append is
            # one step the scrape thread sees whole; it reads only up to the count it was given
            self.hist_counts.append([0] * self.size)
            self.hist_keys.append(hkey)
            self.hist_labels.append(label_text(HIST_LABELS, hkey))
            self.hist_exemplars.append(None)
            self.hists[hkey] = hindex
        skey = (model, version, variant, method, code)
        entry = self.series[key] = (len(self.series_keys), self.hist_counts[hindex], hindex)
        self.requests.append(0)
        self.series_keys.append(skey)
        self.series_labels.append(label_text(REQUEST_LABELS, skey))
        return entry

    def _new_gap(self, key: tuple[str, str, str]) -> FastHistogram:
        hist = self.gaps[key] = FastHistogram(self.gap_bounds)
        self.gap_list.append((key, label_text(MODEL_LABELS, key), hist))
        return hist

    # -- scrape: on the event loop ---------------------------------------------------------------

    def prepare(self) -> _Snapshot:
        return _Snapshot(
            series=len(self.series_labels),
            hists=len(self.hist_labels),
            gaps=self.gap_list[:],
            errors=list(self.upstream_errors.items()),
            aborts=list(self.client_aborts.items()),
            retries=self.retries,
            in_flight=self.in_flight(),
            observer_errors=list(self.hooks.errors.items()) if self.hooks is not None else None,
            gauges=_read(self.gauges, self.gauge_families),
            counters=_read(self.counters, self.counter_families),
        )

    # -- scrape: in the worker thread ------------------------------------------------------------

    def _simple(self, snap: _Snapshot) -> list[_Family]:
        """Every family but the histograms: (name, kind, help, label names, [(label values, value)])."""
        fams: list[_Family] = [
            ("infermon_requests_in_flight", "gauge", "Requests being proxied now.", (), [((), snap.in_flight)]),
            ("infermon_upstream_errors", "counter", "Upstream failures by kind: connect, timeout, reset, protocol.",
             (*MODEL_LABELS, "kind"), list(snap.errors)),
            ("infermon_client_aborts", "counter", "Requests whose client went away before the response ended.",
             MODEL_LABELS, list(snap.aborts)),
            ("infermon_upstream_retries", "counter",
             "Requests sent again on a fresh connection after a pooled one turned out stale.", (),
             [((), snap.retries)]),
        ]  # fmt: skip
        if snap.observer_errors is not None:
            fams.append(
                ("infermon_observer_errors", "counter", "Exceptions raised by monitoring observers.",
                 ("observer", "hook"), [((o, h), n) for (o, h), n in snap.observer_errors])
            )  # fmt: skip
        fams += [(n, "gauge", doc, names, rows) for n, doc, names, rows in snap.gauges]
        fams += [(n, "counter", doc, names, rows) for n, doc, names, rows in snap.counters]
        return fams

    def render(self, snapshot: object, openmetrics: bool) -> Iterator[str]:
        """The exposition of every family, in pieces of about :data:`_SLICE_S` seconds of work each."""
        assert isinstance(snapshot, _Snapshot)
        snap = snapshot
        om = openmetrics
        due = perf_counter() + _SLICE_S
        # infermon_requests_total
        name = "infermon_requests"
        out = [_header(name, "counter", "Requests answered by the proxy (499: client went away).", om)]
        prefix = name + "_total{"
        counts = self.requests[: snap.series]  # one copy
        for i, labels in enumerate(self.series_labels[: snap.series]):
            out.append(f"{prefix}{labels}}} {counts[i]}\n")
            if not i & 63 and perf_counter() > due:
                yield "".join(out)
                out = []
                due = perf_counter() + _SLICE_S
        yield "".join(out)
        # the five request histograms
        for index, ((name, doc, _), (offset, n)) in enumerate(zip(self.HISTOGRAMS, self.layout, strict=True)):
            les = self._les[index]
            exemplars = om and index == 0
            out = [_header(name, "histogram", doc, om)]
            bucket, count, total = name + "_bucket{", name + "_count{", name + "_sum{"
            hist_labels = self.hist_labels[: snap.hists]
            for h, c in enumerate(self.hist_counts[: snap.hists]):
                c = c[offset : offset + n + 1]  # one copy, made in one step: buckets and sum agree
                if not any(c):
                    continue  # nothing recorded for this histogram in this label set
                found_ex = self.hist_exemplars[h] if exemplars else None
                ex = found_ex[:] if found_ex is not None else None
                cum: float = 0
                lab = hist_labels[h]
                for j in range(n):
                    cum += c[j]
                    found = ex[j] if ex is not None else None
                    if found is not None:
                        tid, value, ts = found
                        out.append(f'{bucket}{lab}{les[j]}{cum} # {{trace_id="{tid}"}} {_go_float(value)} {ts}\n')
                    else:
                        out.append(f"{bucket}{lab}{les[j]}{cum}\n")
                out.append(f"{count}{lab}}} {cum}\n{total}{lab}}} {_go_float(c[n])}\n")
                if perf_counter() > due:
                    yield "".join(out)
                    out = []
                    due = perf_counter() + _SLICE_S
            yield "".join(out)
        # stream chunk gaps
        name = "infermon_stream_chunk_gap_seconds"
        out = [
            _header(
                name,
                "histogram",
                "Time between consecutive response body pieces of streamed (chunked / SSE) responses.",
                om,
            )
        ]
        bucket, count, total = name + "_bucket{", name + "_count{", name + "_sum{"
        les = self._gap_les
        for _, lab, gap in snap.gaps:
            gap_counts = gap.counts[:]
            gsum = gap.sum
            cum = 0
            for j, k in enumerate(gap_counts):
                cum += k
                out.append(f"{bucket}{lab}{les[j]}{cum}\n")
            out.append(f"{count}{lab}}} {cum}\n{total}{lab}}} {_go_float(gsum)}\n")
            if perf_counter() > due:
                yield "".join(out)
                out = []
                due = perf_counter() + _SLICE_S
        yield "".join(out)
        # counters and gauges
        out = []
        for name, kind, doc, names, rows in self._simple(snap):
            out.append(_header(name, kind, doc, om))
            sample = _sample_name(name, kind)
            for values, value in rows:
                if names:
                    out.append(f"{sample}{{{label_text(names, values)}}} {_num(value)}\n")
                else:
                    out.append(f"{sample} {_num(value)}\n")
        out.append(_header(BUILD_INFO[0], "info", BUILD_INFO[1], om))
        out.append(f"{BUILD_INFO[0]}_info{{{label_text(BUILD_LABELS, _build_values())}}} 1\n")
        yield "".join(out)

    def families(self, snapshot: object) -> Iterator[Metric]:
        """The same families as prometheus_client objects (for ``registry.collect()``)."""
        assert isinstance(snapshot, _Snapshot)
        snap = snapshot
        requests = CounterMetricFamily(
            "infermon_requests", "Requests answered by the proxy (499: client went away).", labels=REQUEST_LABELS
        )
        counts = self.requests[: snap.series]
        for i, key in enumerate(self.series_keys[: snap.series]):
            requests.add_metric(key, counts[i])
        yield requests
        for index, ((name, doc, attr), (offset, n)) in enumerate(zip(self.HISTOGRAMS, self.layout, strict=True)):
            bounds: tuple[float, ...] = getattr(self, attr)
            fam = HistogramMetricFamily(name, doc, labels=HIST_LABELS)
            for h, c in enumerate(self.hist_counts[: snap.hists]):
                c = c[offset : offset + n + 1]
                found_ex = self.hist_exemplars[h] if index == 0 else None
                ex = found_ex[:] if found_ex is not None else None
                rows: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
                cum: float = 0
                for j in range(n):
                    cum += c[j]
                    le = _go_float(bounds[j]) if j < len(bounds) else "+Inf"
                    found = ex[j] if ex is not None else None
                    if found is not None:
                        rows.append((le, cum, Exemplar({"trace_id": found[0]}, found[1], found[2])))
                    else:
                        rows.append((le, cum))
                if cum:
                    fam.add_metric(self.hist_keys[h], rows, c[n])
            yield fam
        gaps = HistogramMetricFamily(
            "infermon_stream_chunk_gap_seconds",
            "Time between consecutive response body pieces of streamed (chunked / SSE) responses.",
            labels=MODEL_LABELS,
        )
        for key, _, gap in snap.gaps:
            gaps.add_metric(key, gap.cumulative(), gap.sum)
        yield gaps
        for name, kind, doc, names, values in self._simple(snap):
            fam2: Metric
            if kind == "counter":
                fam2 = CounterMetricFamily(name, doc, labels=names)
            else:
                fam2 = GaugeMetricFamily(name, doc, labels=names)
            for labels, value in values:
                fam2.add_metric(labels, value)
            yield fam2
        yield InfoMetricFamily(*BUILD_INFO, value=dict(zip(BUILD_LABELS, _build_values(), strict=True)))


BUILD_INFO = ("infermon_build", "infermon build information.")
BUILD_LABELS = ("version", "python", "loop", "data_plane")


def _build_values() -> tuple[str, str, str, str]:
    return __version__, platform.python_version(), _loop_name(), _compiled.mode()


def _loop_name() -> str:
    return "uvloop" if "uvloop" in sys.modules else "asyncio"


# -- registry and scrape ----------------------------------------------------------------------------


class MetricsRegistry(CollectorRegistry):
    """A CollectorRegistry that keeps its collectors in order, so /metrics can tell the collectors
    that write their own exposition (:class:`FastCollector`) from the rest. Registered first come first."""

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self.ordered: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self.ordered.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self.ordered.remove(collector)


class _Collected:
    """Metric families collected already, in the form prometheus_client's encoders read: ``collect()``."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _take(registry: CollectorRegistry) -> tuple[list[tuple[FastCollector, object]], _Collected]:
    """On the event loop: every collector's share of a scrape. A :class:`FastCollector` prepares its
    snapshot (cheap copies); any other collector is collected here, on the loop thread, where the state
    it reads (pools, queues, connection sets) is changed, so none of them is ever read from a thread.
    They are small; the request metrics are the one family whose size grows with traffic."""
    collectors = list(registry.ordered) if isinstance(registry, MetricsRegistry) else [registry]
    fast: list[tuple[FastCollector, object]] = []
    families: list[Metric] = []
    target = registry.get_target_info() if isinstance(registry, MetricsRegistry) else None
    if target:
        families.append(InfoMetricFamily("target", "Target metadata", value=target))
    for collector in collectors:
        if isinstance(collector, FastCollector):
            fast.append((collector, collector.prepare()))
        else:
            families.extend(collector.collect())
    return fast, _Collected(families)


class _Job:
    """One render, shared by the scrapes that asked for it while it ran."""

    __slots__ = ("future", "users")

    def __init__(self, future: asyncio.Future[list[bytes]]) -> None:
        self.future = future
        self.users = 0


class Scraper:
    """Renders /metrics off the event loop: one worker thread; scrapes that arrive while one of the
    same format (content type and gzip) is being written share its result.

    Example::

        async with scraper.exposition(request.headers.get("Accept", ""), gzip=False) as (pieces, ctype):
            for piece in pieces:
                ...  # send it
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infermon-scrape")
        self._running: dict[tuple[str, bool], _Job] = {}

    @contextlib.asynccontextmanager
    async def exposition(self, accept: str, gzip: bool) -> AsyncIterator[tuple[list[bytes], str]]:
        """(body pieces, content type) for an ``Accept`` header, gzip-compressed when ``gzip``; valid
        inside the ``async with`` (the pieces are then freed in the worker thread, a few at a time:
        freeing hundreds of megabytes at once would itself hold the loop)."""
        encoder, content_type = choose_encoder(accept)
        key = (content_type, gzip)
        job = self._running.get(key)
        if job is None:
            fast, rest = _take(self.registry)
            om = content_type.startswith(OPENMETRICS)
            loop = asyncio.get_running_loop()
            job = _Job(loop.run_in_executor(self.executor, _encode, encoder, rest, fast, om, gzip))
            self._running[key] = job
            job.future.add_done_callback(lambda f: self._done(key, f))
        job.users += 1
        try:
            yield await asyncio.shield(job.future), content_type
        finally:
            job.users -= 1
            if not job.users and job.future.done() and not job.future.cancelled() and not job.future.exception():
                with contextlib.suppress(RuntimeError):  # shut down: the pieces go with the garbage
                    self.executor.submit(_discard, job.future.result())

    def _done(self, key: tuple[str, bool], future: asyncio.Future[list[bytes]]) -> None:
        self._running.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: a scrape whose client left is not an unhandled error

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _encode(
    encoder: Callable[[_Collected], bytes],
    rest: _Collected,
    fast: list[tuple[FastCollector, object]],
    om: bool,
    gzip: bool,
) -> list[bytes]:
    """The exposition in pieces (runs in the scrape thread)."""
    head = encoder(rest)
    if om and head.endswith(b"# EOF\n"):
        head = head[: -len(b"# EOF\n")]
    pieces = [head]
    for collector, snapshot in fast:
        for text in collector.render(snapshot, om):
            pieces.append(text.encode())
            # a real (short) sleep, not sleep(0): the GIL goes to the event loop if it waits for it,
            # so the loop waits at most one piece's work, not the interpreter's 5 ms switch interval
            time.sleep(_YIELD_S)
    if om:
        pieces.append(b"# EOF\n")
    if not gzip:
        return pieces
    z = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    out = []
    pieces.reverse()
    while pieces:  # each text piece is freed as soon as it is compressed, not all at once at the end
        out.append(z.compress(pieces.pop()))
    out.append(z.flush())
    return [piece for piece in out if piece]


def _discard(pieces: list[bytes]) -> None:
    """Free a sent exposition a piece at a time, letting the event loop in between."""
    freed = 0
    while pieces:
        freed += len(pieces.pop())
        if freed >= 1 << 22:
            freed = 0
            time.sleep(_YIELD_S)


def build_registry(*collectors: Collector) -> MetricsRegistry:
    """A registry with the process, platform and GC collectors and the given ones."""
    registry = MetricsRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry
