"""Distributed tracing: the proxy joins its caller's trace and exports one SERVER span per request.

Per request (``on_request_head``) the observer reads the caller's context (W3C ``traceparent`` /
``tracestate``, B3 when configured: :mod:`proxy.observe.traceparent`), draws the proxy's span id,
decides sampling, sets ``ex.trace_id`` / ``ex.span_id`` / ``ex.sampled`` and replaces the trace
headers sent upstream with the proxy's own, so the model server's spans become children of the
proxy's span. No span object exists while the request runs. ``on_complete`` builds the span after the
fact from the Exchange's timestamps, only when it is kept, and hands it to the SDK's
``BatchSpanProcessor``, whose worker thread encodes and exports it over OTLP.

Sampling follows OTEL_TRACES_SAMPLER's standard values, decided here with the SDK's arithmetic (the
lower 64 bits of the trace id below ``round(ratio * 2**64)``), so a downstream SDK with the same ratio
agrees. ``keep_errors`` also keeps the proxy's span of every 5xx, failed or slow request the head
sampler dropped; the upstream was told "not sampled" by then, so such a trace holds the proxy's span
alone (plus whatever the caller recorded).

The export path never waits on the collector: spans wait in the processor's bounded deque; when it is
full the span is not built at all and counted (``infermon_trace_spans_dropped_total{reason="queue_full"}``);
failed exports are counted too (``reason="export_failed"``) and logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from random import randbytes
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.observe import otlp
from proxy.observe.traceparent import (
    Parent,
    format_b3_single,
    format_traceparent,
    new_span_id,
    new_trace_id,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
    parse_tracestate,
)
from proxy.settings import Labels, Tracing

log = logging.getLogger("infermon.tracing")

_TRACECONTEXT = (b"traceparent", b"tracestate")
_B3_MULTI = (b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled", b"x-b3-flags", b"x-b3-parentspanid")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
#: environment variables the deploy manifests fill from the Downward API -> resource attributes
K8S_ENV = {
    "K8S_POD_NAME": "k8s.pod.name",
    "K8S_NAMESPACE_NAME": "k8s.namespace.name",
    "K8S_NODE_NAME": "k8s.node.name",
    "K8S_POD_UID": "k8s.pod.uid",
    "K8S_CONTAINER_NAME": "k8s.container.name",
}


_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)  # immutable: shared by every span
_ZERO16 = bytes(16)
_ZERO8 = bytes(8)


def _nonzero_ids() -> bytes:
    raw = randbytes(24)
    while not any(raw[:16]) or not any(raw[16:]):
        raw = randbytes(24)
    return raw


class Sampler:
    """The standard samplers, parent-based ones honouring the caller's sampled flag.

    >>> Sampler("traceidratio", 0.5).should_sample("0" * 16 + "7fffffffffffffff", None)
    True
    """

    def __init__(self, name: str, ratio: float) -> None:
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        if root == "always_on":
            self.bound = 1 << 64
        elif root == "always_off":
            self.bound = 0
        else:  # traceidratio: TraceIdRatioBased.get_bound_for_rate
            self.bound = round(ratio * (1 << 64))

    def should_sample(self, trace_id: str, parent_sampled: bool | None) -> bool:
        if self.parent_based and parent_sampled is not None:
            return parent_sampled
        return int(trace_id[16:], 16) < self.bound


def build_resource(cfg: Tracing, environ: dict[str, str] | None = None) -> Resource:
    """service.name, the configured attributes and the Kubernetes ones from the environment."""
    import os

    env = os.environ if environ is None else environ
    attributes: dict[str, str] = {
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.language": "python",
        "service.version": __version__,
    }
    for var, key in K8S_ENV.items():
        value = env.get(var)
        if value:
            attributes[key] = value
    attributes.update(cfg.resource_attributes)
    attributes["service.name"] = cfg.service_name
    return Resource(attributes)


def build_exporter(cfg: Tracing) -> SpanExporter:
    """The OTLP exporter (proxy/observe/otlp.py, or the SDK's), every setting passed explicitly."""
    url = cfg.export_url()
    headers = dict(cfg.headers)
    if cfg.exporter == "infermon":
        if cfg.protocol == "grpc":
            return otlp.GrpcExporter(url, headers, cfg.timeout)
        return otlp.HttpExporter(url, headers, cfg.timeout)
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        insecure = not url.startswith("https://")
        endpoint = url.split("://", 1)[1] if "://" in url else url
        return GrpcExporter(endpoint=endpoint, insecure=insecure, headers=headers, timeout=cfg.timeout)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=url, headers=headers, timeout=cfg.timeout)


class _OncePerInterval(logging.Filter):
    """Lets one record per logger and level through every ``interval`` seconds (the SDK's exporters
    log every failed batch)."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, int], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno)
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            return False
        self._last[key] = now
        return True


_SDK_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.sdk._shared_internal",
)


class CountingExporter(SpanExporter):
    """Wraps the OTLP exporter: counts exported and failed spans; never raises into the processor."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.reads_fields = isinstance(inner, otlp.HttpExporter | otlp.GrpcExporter)
        self.exported = 0
        self.failed = 0
        self._last_log = -1e9

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            if not self.reads_fields:  # an exporter that reads ReadableSpans: build them in full
                for span in spans:
                    if isinstance(span, ProxySpan):
                        span.materialize()
            result = self.inner.export(spans)
        except Exception as exc:  # an exporter must never take the worker thread down
            result = SpanExportResult.FAILURE
            self._log(f"span export raised {exc!r}")
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
            self._log(f"span export failed; {self.failed} spans lost to export failures so far")
        return result

    def _log(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= 60.0:
            self._last_log = now
            log.warning("%s", message)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class TracingObserver(Observer):
    """Extract, decide, inject on the request head; build and hand over kept spans on completion."""

    name = "tracing"

    def __init__(
        self,
        cfg: Tracing,
        labels: Labels,
        redact_headers: Sequence[str] = (),
        exporter: SpanExporter | None = None,
        resource: Resource | None = None,
    ) -> None:
        self.cfg = cfg
        self.sampler = Sampler(cfg.sampler, cfg.sampler_arg)
        props = set(cfg.propagators)
        self.w3c = "tracecontext" in props
        self.b3 = "b3" in props
        self.b3multi = "b3multi" in props
        self.order = [p for p in cfg.propagators if p in ("tracecontext", "b3", "b3multi")]
        owned: list[bytes] = []
        if self.w3c:
            owned += _TRACECONTEXT
        if self.b3:
            owned.append(b"b3")
        if self.b3multi:
            owned += _B3_MULTI
        self.owned = frozenset(owned)  # removed from what goes upstream, replaced by the proxy's own
        self.owned_lengths = frozenset(len(n) for n in owned)
        self.w3c_only = self.order == ["tracecontext"]
        self.root_bound = self.sampler.bound
        self.keep_errors = cfg.keep_errors
        self.slow = cfg.slow_threshold
        self.defaults = (labels.model, labels.version, labels.variant)
        self.record_user_agent = "user-agent" not in set(redact_headers)
        self.resource = resource if resource is not None else build_resource(cfg)
        self.scope = InstrumentationScope("infermon.proxy", __version__)
        self.exporter = CountingExporter(exporter if exporter is not None else build_exporter(cfg))
        self.processor = BatchSpanProcessor(
            self.exporter,
            max_queue_size=cfg.max_queue_size,
            schedule_delay_millis=cfg.schedule_delay * 1000,
            max_export_batch_size=min(cfg.max_export_batch_size, cfg.max_queue_size),
            export_timeout_millis=cfg.timeout * 1000,
        )
        # The SDK's BatchProcessor keeps ended spans in a deque(maxlen=max_queue_size); emitting into
        # a full one evicts the oldest span and logs a warning each time. Checking the length first
        # lets a full queue cost one len() per kept span instead of building the span and logging.
        queue = getattr(getattr(self.processor, "_batch_processor", None), "_queue", None)
        self.queue: Any = queue if queue is not None else ()
        self.max_queue = cfg.max_queue_size
        self.dropped_queue_full = 0
        self.recorded = 0
        self._log_filter = _OncePerInterval()
        for name in _SDK_LOGGERS:
            logging.getLogger(name).addFilter(self._log_filter)

    # -- hot path -----------------------------------------------------------------------------

    def on_request_head(self, ex: Exchange) -> None:
        headers = ex.request_headers
        lengths = self.owned_lengths
        found: list[tuple[bytes, bytes]] | None = None
        for name, value in headers:
            if len(name) in lengths:
                lname = name.lower()
                if lname in self.owned:
                    if found is None:
                        found = []
                    found.append((lname, value))
        if found is None and self.w3c_only:
            # the common case, no context from the caller: 24 random bytes, trace id then span id
            raw = randbytes(24)
            if raw[:16] == _ZERO16 or raw[16:] == _ZERO8:
                raw = _nonzero_ids()
            sampled = int.from_bytes(raw[8:16], "big") < self.root_bound  # the root sampler, as below
            h = raw.hex()
            ex.trace_id = trace_id = h[:32]
            ex.span_id = span_id = h[32:]
            ex.sampled = sampled
            headers.append((b"traceparent", f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}".encode()))
            return
        parent: Parent | None = None
        tracestate: bytes | None = None
        if found is not None:
            owned = self.owned
            headers = ex.request_headers = [(n, v) for n, v in headers if n.lower() not in owned]
            parent, tracestate = self._extract(found)
        span_id = new_span_id()
        if parent is not None and parent.trace_id:
            trace_id = parent.trace_id
            extra = ex.extra
            if extra is None:
                ex.extra = {"tracing": (parent.span_id, tracestate)}
            else:
                extra["tracing"] = (parent.span_id, tracestate)
        else:
            trace_id = new_trace_id()
        sampled = self.sampler.should_sample(trace_id, None if parent is None else parent.sampled)
        ex.trace_id = trace_id
        ex.span_id = span_id
        ex.sampled = sampled
        if self.w3c:
            headers.append((b"traceparent", format_traceparent(trace_id, span_id, sampled)))
            if tracestate is not None:
                headers.append((b"tracestate", tracestate))
        if self.b3:
            headers.append((b"b3", format_b3_single(trace_id, span_id, sampled)))
        if self.b3multi:
            headers.append((b"X-B3-TraceId", trace_id.encode("ascii")))
            headers.append((b"X-B3-SpanId", span_id.encode("ascii")))
            headers.append((b"X-B3-Sampled", b"1" if sampled else b"0"))

    def _extract(self, found: list[tuple[bytes, bytes]]) -> tuple[Parent | None, bytes | None]:
        """The caller's context from the first configured format that holds a valid one."""
        for prop in self.order:
            if prop == "tracecontext":
                tps = [v for n, v in found if n == b"traceparent"]
                if len(tps) != 1:
                    continue  # none, or repeated: invalid
                parent = parse_traceparent(tps[0].strip(b" \t"))
                if parent is None:
                    continue
                states = [v for n, v in found if n == b"tracestate"]
                return parent, parse_tracestate(states) if states else None
            if prop == "b3":
                values = [v for n, v in found if n == b"b3"]
                if len(values) == 1:
                    parent = parse_b3_single(values[0])
                    if parent is not None:
                        return parent, None
            if prop == "b3multi":
                multi = dict(found)
                parent = parse_b3_multi(
                    multi.get(b"x-b3-traceid"),
                    multi.get(b"x-b3-spanid"),
                    multi.get(b"x-b3-sampled"),
                    multi.get(b"x-b3-flags"),
                )
                if parent is not None:
                    return parent, None
        return None, None

    def on_complete(self, ex: Exchange) -> None:
        if not ex.trace_id:
            self._late_context(ex)
        if ex.sampled or (
            self.keep_errors
            and (ex.status >= 500 or ex.error is not None or ex.t_done - ex.t_accepted >= self.slow)
        ):
            if len(self.queue) >= self.max_queue:
                self.dropped_queue_full += 1
                return
            self.recorded += 1
            self.processor.on_end(self.build_span(ex))

    def _late_context(self, ex: Exchange) -> None:
        """A request answered before ``on_request_head`` (a 400, a 503 at max_in_flight): ids now."""
        found = [(n.lower(), v) for n, v in ex.request_headers if n.lower() in self.owned]
        parent, tracestate = self._extract(found) if found else (None, None)
        if parent is not None and parent.trace_id:
            ex.trace_id = parent.trace_id
            ex.extra = {**(ex.extra or {}), "tracing": (parent.span_id, tracestate)}
        else:
            ex.trace_id = new_trace_id()
        ex.span_id = new_span_id()
        ex.sampled = self.sampler.should_sample(ex.trace_id, None if parent is None else parent.sampled)

    # -- off the hot path: only for kept spans -----------------------------------------------

    def build_span(self, ex: Exchange) -> ProxySpan:
        """The proxy's SERVER span: a snapshot of the Exchange, turned into OTLP in the export thread.

        The span is an SDK ``ReadableSpan`` constructed directly rather than through
        Tracer.start_span: it must carry exactly the span id already sent upstream (a staged id in a
        custom IdGenerator would be shared state between the head and the completion of interleaved
        requests), its times are the Exchange's, known only at the end, and the sampling decision is
        already made. The event loop only copies the Exchange's fields (:class:`ProxySpan`); the
        attributes, events and status are derived in the export thread, where the OTLP encoder reads
        them straight from the snapshot and anything else (the SDK's exporters) sees a complete
        ReadableSpan, built on first access.
        """
        extra = ex.extra
        snap = (
            ex.trace_id, ex.span_id, extra.get("tracing") if extra else None, ex.method, ex.path,
            ex.request_headers, ex.client_host, ex.http_version, ex.bytes_in, ex.bytes_out, ex.status,
            ex.model, ex.version, ex.variant, ex.request_id, ex.error, ex.aborted,
            ex.t_accepted, ex.t_done or ex.t_accepted, ex.t_first_byte,
            time.time_ns() - time.perf_counter_ns(),  # perf_counter seconds -> epoch ns, once per span
        )  # fmt: skip
        return ProxySpan(self, snap, SpanContext(int(ex.trace_id, 16), int(ex.span_id, 16), False, _SAMPLED))

    def span_fields(self, snap: tuple[Any, ...]) -> otlp.SpanFields:
        """Everything the span says, from a snapshot (runs in the export thread)."""
        (trace_id, span_id, carried, method, path, headers, client, http_version, bytes_in, bytes_out,
         status_code, model, version, variant, request_id, error, aborted, t_start, t_end, t_first_byte,
         offset) = snap  # fmt: skip
        parent_span: str | None = None
        tracestate: str | None = None
        if carried is not None:
            parent_span = carried[0]
            if carried[1] is not None:
                tracestate = carried[1].decode("ascii")
        attributes: list[tuple[str, Any]] = []
        add = attributes.append
        if method in _METHODS:
            add(("http.request.method", method))
        else:
            add(("http.request.method", "_OTHER"))
            add(("http.request.method_original", method))
        add(("url.path", path))
        add(("url.scheme", "http"))
        host = _header(headers, b"host")
        if host:
            name, port = _split_host(host.decode("latin-1"))
            add(("server.address", name))
            if port:
                add(("server.port", port))
        if client:
            add(("client.address", client))
        add(("network.protocol.version", http_version))
        if self.record_user_agent:
            ua = _header(headers, b"user-agent")
            if ua:
                add(("user_agent.original", ua.decode("latin-1")))
        add(("http.request.body.size", bytes_in))
        add(("http.response.body.size", bytes_out))
        if status_code:
            add(("http.response.status_code", status_code))
        defaults = self.defaults
        add(("infermon.model.name", model or defaults[0]))
        add(("infermon.model.version", version or defaults[1]))
        add(("infermon.model.variant", variant or defaults[2]))
        add(("infermon.request_id", request_id))
        code, message = 0, ""
        if error is not None:
            add(("error.type", error))
            code, message = 2, f"upstream {error}"
        elif status_code >= 500:
            add(("error.type", str(status_code)))
            code = 2
        if aborted:
            add(("infermon.client_aborted", True))
        return otlp.SpanFields(
            trace_id=trace_id,
            span_id=span_id,
            parent_span_id=parent_span,
            trace_state=tracestate,
            name=method if method in _METHODS else "HTTP",
            start=int(t_start * 1e9) + offset,
            end=int(t_end * 1e9) + offset,
            attributes=attributes,
            first_byte=int(t_first_byte * 1e9) + offset if t_first_byte else None,
            status_code=code,
            status_message=message,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def collector(self) -> TracingCollector:
        return TracingCollector(self)

    async def aclose(self, timeout: float | None = None) -> None:
        """Export what is queued, waiting at most ``timeout`` seconds (a hung collector is left behind)."""
        if timeout is None:
            timeout = self.cfg.timeout
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def run() -> None:
            try:
                self.processor.shutdown()  # type: ignore[no-untyped-call]
            except Exception as exc:
                log.warning("span processor shutdown failed: %r", exc)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be closed already
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=run, name="infermon-trace-shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await done.wait()
        for name in _SDK_LOGGERS:
            logging.getLogger(name).removeFilter(self._log_filter)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if len(key) == len(name) and key.lower() == name:
            return value
    return None


class ProxySpan(ReadableSpan):
    """A kept span as a snapshot of its Exchange; the ReadableSpan fields are built when first read.

    The batch processor reads only ``context`` (ids and the sampled flag, given at once); the OTLP
    encoder calls :meth:`otlp_fields`; other exporters get spans passed through :meth:`materialize`
    (:class:`CountingExporter` does it), and any other attribute read builds the span too.
    """

    def __init__(self, observer: TracingObserver, snap: tuple[Any, ...], context: SpanContext) -> None:
        # ReadableSpan.__init__ runs later, in _materialize; until then only these exist
        self._observer = observer
        self._snap = snap
        self._context = context

    def otlp_fields(self) -> otlp.SpanFields:
        return self._observer.span_fields(self._snap)

    @property
    def resource(self) -> Resource:  # the same for every span: no need to build the rest
        return self._observer.resource

    @property
    def instrumentation_scope(self) -> InstrumentationScope:
        return self._observer.scope

    def __getattr__(self, name: str) -> Any:  # only for attributes not set yet: the lazy ones
        if name.startswith("__") or "_snap" not in self.__dict__ or "_name" in self.__dict__:
            raise AttributeError(name)
        self.materialize()
        return object.__getattribute__(self, name)

    def materialize(self) -> None:
        """Build the full ReadableSpan (its context then carries the caller's tracestate too)."""
        if "_name" in self.__dict__:
            return
        f = self.otlp_fields()
        obs = self._observer
        parent = None
        if f.parent_span_id is not None:
            parent = SpanContext(int(f.trace_id, 16), int(f.parent_span_id, 16), is_remote=True)
        trace_state = TraceState.from_header([f.trace_state]) if f.trace_state else None
        context = SpanContext(int(f.trace_id, 16), int(f.span_id, 16), False, _SAMPLED, trace_state)
        events = [Event("first_byte", timestamp=f.first_byte)] if f.first_byte is not None else []
        status = _UNSET
        if f.status_code == 2:
            status = Status(StatusCode.ERROR, f.status_message or None)
        ReadableSpan.__init__(
            self,
            name=f.name,
            context=context,
            parent=parent,
            resource=obs.resource,
            attributes=dict(f.attributes),
            events=events,
            kind=SpanKind.SERVER,
            status=status,
            start_time=f.start,
            end_time=f.end,
            instrumentation_scope=obs.scope,
        )


def _split_host(host: str) -> tuple[str, int | None]:
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[1:end], host[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    return name, int(port) if port.isdigit() else None


class TracingCollector(Collector):
    """infermon_trace_spans_* counters, read at scrape time."""

    def __init__(self, observer: TracingObserver) -> None:
        self.obs = observer

    def collect(self) -> Iterator[Metric]:
        obs = self.obs
        yield CounterMetricFamily(
            "infermon_trace_spans_recorded",
            "Proxy spans kept by sampling (or keep_errors) and handed to the export queue.",
            value=obs.recorded,
        )
        yield CounterMetricFamily(
            "infermon_trace_spans_exported", "Spans the collector accepted.", value=obs.exporter.exported
        )
        dropped = CounterMetricFamily(
            "infermon_trace_spans_dropped",
            "Spans lost: queue_full (the export queue was full), export_failed (the collector refused "
            "or did not answer in time).",
            labels=("reason",),
        )
        dropped.add_metric(("queue_full",), obs.dropped_queue_full)
        dropped.add_metric(("export_failed",), obs.exporter.failed)
        yield dropped
        yield GaugeMetricFamily(
            "infermon_trace_queue_spans", "Spans waiting in the export queue.", value=len(obs.queue)
        )
