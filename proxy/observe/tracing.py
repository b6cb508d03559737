"""Distributed tracing: the proxy joins its caller's trace and exports one SERVER span per request.

Per request (``on_request_head``) the observer reads the caller's context (W3C ``traceparent`` /
``tracestate``, B3 when configured: :mod:`proxy.observe.traceparent`), draws the proxy's span id,
decides sampling, sets ``ex.trace_id`` / ``ex.span_id`` / ``ex.sampled`` and replaces the trace
headers sent upstream with the proxy's own, so the model server's spans become children of the
proxy's span. No span object exists while the request runs. ``on_complete`` copies the Exchange's
fields into a plain tuple (a *snapshot*), only when the span is kept, and appends it to a bounded
queue; the export thread turns snapshots into OTLP and sends them.

Sampling follows OTEL_TRACES_SAMPLER's standard values, decided here with the SDK's arithmetic (the
lower 64 bits of the trace id below ``round(ratio * 2**64)``), so a downstream SDK with the same ratio
agrees. ``keep_errors`` also keeps the proxy's span of every 5xx, failed or slow request the head
sampler dropped; the upstream was told "not sampled" by then, so such a trace holds the proxy's span
alone (plus whatever the caller recorded).

Export. The queue is a ``deque`` whose length the event loop checks before appending (full: the span
is counted as ``infermon_trace_spans_dropped_total{reason="queue_full"}`` and not kept). One thread,
started by :meth:`TracingObserver.start`, wakes when a batch is full or every ``schedule_delay``
seconds and exports batches of ``max_export_batch_size``. With ``tracing.exporter: infermon`` (the
default) it writes the OTLP bytes itself (:class:`SpanWriter`, :mod:`proxy.observe.otlp`) and sends
them with the OTLP exporter specification's retries within ``tracing.timeout``; with ``sdk`` it builds
SDK ``ReadableSpan`` objects and hands them to the SDK's OTLP exporters (their own retries). No SDK
internals are read either way. Every span ends up counted once: exported, or dropped as
``queue_full``, ``export_failed`` (the collector refused or did not answer within the timeout),
``rejected`` (the collector's partial success refused them) or ``shutdown`` (still queued when
:meth:`TracingObserver.aclose` ran out of time). Failures are logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from random import randbytes
from typing import Any, NamedTuple

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
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


def build_transport(cfg: Tracing) -> otlp.Transport:
    """The proxy's own OTLP transport (proxy/observe/otlp.py), every setting passed explicitly."""
    url = cfg.export_url()
    if cfg.protocol == "grpc":
        return otlp.GrpcTransport(url, dict(cfg.headers), cfg.compression)
    return otlp.HttpTransport(url, dict(cfg.headers), cfg.compression)


def build_sdk_exporter(cfg: Tracing) -> SpanExporter:
    """The SDK's OTLP exporter (``tracing.exporter: sdk``), every setting passed explicitly."""
    url = cfg.export_url()
    headers = dict(cfg.headers)
    if cfg.protocol == "grpc":
        import grpc  # type: ignore[import-untyped]
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        insecure = not url.startswith("https://")
        endpoint = url.split("://", 1)[1] if "://" in url else url
        compression = grpc.Compression.Gzip if cfg.compression == "gzip" else grpc.Compression.NoCompression
        return GrpcExporter(
            endpoint=endpoint, insecure=insecure, headers=headers, timeout=cfg.timeout, compression=compression
        )
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(
        endpoint=url,
        headers=headers,
        timeout=cfg.timeout,
        compression=Compression.Gzip if cfg.compression == "gzip" else Compression.NoCompression,
    )


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


_SDK_LOGGERS = (  # the SDK's exporters log every failed batch (tracing.exporter: sdk)
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
)


class SpanFields(NamedTuple):
    """Everything a proxy span says (ids in hex, times in epoch ns): what the SDK path builds
    ReadableSpans from, and what :class:`SpanWriter` writes (both from :func:`common_attributes`)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    trace_state: str | None
    name: str
    start: int
    end: int
    attributes: list[tuple[str, Any]]
    first_byte: int | None  # the one event, "first_byte"
    status_code: int  # 0 unset, 2 error
    status_message: str


#: what on_complete copies from the Exchange, in this order (a plain tuple: cheapest to build)
SNAPSHOT = (
    "trace_id", "span_id", "carried", "method", "path", "host", "user_agent", "client_host", "http_version",
    "bytes_in", "bytes_out", "status", "model", "version", "variant", "request_id", "error", "aborted",
    "t_accepted", "t_done", "t_first_byte",
)  # fmt: skip


def common_attributes(
    method: str,
    host: bytes | None,
    client: str,
    http_version: str,
    agent: bytes | None,
    status_code: int,
    model: str,
    version: str,
    variant: str,
    error: str | None,
    aborted: bool,
) -> list[tuple[str, Any]]:
    """The attributes that repeat between requests (the labels, method, status, peer, user agent);
    url.path, the body sizes and the request id follow them in every span."""
    attributes: list[tuple[str, Any]] = []
    add = attributes.append
    if method in _METHODS:
        add(("http.request.method", method))
    else:
        add(("http.request.method", "_OTHER"))
        add(("http.request.method_original", method))
    add(("url.scheme", "http"))
    if host:
        name, port = _split_host(host.decode("latin-1"))
        add(("server.address", name))
        if port:
            add(("server.port", port))
    if client:
        add(("client.address", client))
    add(("network.protocol.version", http_version))
    if agent:
        add(("user_agent.original", agent.decode("latin-1")))
    if status_code:
        add(("http.response.status_code", status_code))
    add(("infermon.model.name", model))
    add(("infermon.model.version", version))
    add(("infermon.model.variant", variant))
    if error is not None:
        add(("error.type", error))
    elif status_code >= 500:
        add(("error.type", str(status_code)))
    if aborted:
        add(("infermon.client_aborted", True))
    return attributes


def span_status(status_code: int, error: str | None) -> tuple[int, str]:
    """(OTLP status code, message): ERROR on upstream failures and 5xx, UNSET otherwise."""
    if error is not None:
        return 2, f"upstream {error}"
    if status_code >= 500:
        return 2, ""
    return 0, ""


_KEY_PATH = otlp.attribute_key("url.path")
_KEY_BYTES_IN = otlp.attribute_key("http.request.body.size")
_KEY_BYTES_OUT = otlp.attribute_key("http.response.body.size")
_KEY_REQUEST_ID = otlp.attribute_key("infermon.request_id")
# Span.events = 11 (21 bytes) holding Event.time_unix_nano = 1 (fixed64) and Event.name = 2 "first_byte"
_FIRST_BYTE = struct.Struct("<3sQ12s")
_FIRST_BYTE_HEAD, _FIRST_BYTE_NAME = b"\x5a\x15\x09", b"\x12\x0afirst_byte"
_TIMES = struct.Struct("<BQBQ")  # Span.start_time_unix_nano = 7, Span.end_time_unix_nano = 8 (fixed64)
_FLAGS_ROOT = otlp.span_flags(TraceFlags.SAMPLED, None)  # every exported span was recorded: sampled
_FLAGS_REMOTE_PARENT = otlp.span_flags(TraceFlags.SAMPLED, True)  # the parent came in a request header
_CACHE_MAX = 4096
# the request id attribute up to its value, for every value length below 100 bytes
_REQUEST_ID_PREFIXES = [otlp.string_attribute(_KEY_REQUEST_ID, "x" * n)[: -n or None] for n in range(100)]


class SpanWriter:
    """Snapshots -> encoded OTLP ``Span`` messages, in the export thread.

    What repeats between requests (method, peer, user agent, status, labels, hence the span's name
    and status too) is encoded once per distinct combination and kept (bounded); per span only the
    ids, times, path (also cached), sizes and request id are written.
    """

    def __init__(self, defaults: tuple[str, str, str], record_user_agent: bool) -> None:
        self.defaults = defaults
        self.record_user_agent = record_user_agent
        self._common: dict[tuple[Any, ...], tuple[bytes, bytes, bytes]] = {}
        self._paths: dict[str, bytes] = {}
        self._sizes: dict[tuple[int, int], bytes] = {}

    def _encode_common(self, key: tuple[Any, ...]) -> tuple[bytes, bytes, bytes]:
        method, host, client, http_version, agent, status_code, model, version, variant, error, aborted = key
        d = self.defaults
        attributes = common_attributes(
            method, host, client, http_version, agent, status_code,
            model or d[0], version or d[1], variant or d[2], error, aborted,
        )  # fmt: skip
        name = method if method in _METHODS else "HTTP"
        head = otlp.field(0x2A, name.encode("utf-8")) + b"\x30\x02"  # Span.name = 5, Span.kind = 6: SERVER
        code, message = span_status(status_code, error)
        status = otlp.field(0x12, message.encode("utf-8")) if message else b""
        if code:
            status += b"\x18" + otlp.varint(code)
        encoded = (head, b"".join(otlp.attribute(k, v) for k, v in attributes), otlp.field(0x7A, status))
        if len(self._common) >= _CACHE_MAX:
            self._common.clear()
        self._common[key] = encoded
        return encoded

    def _encode_sizes(self, key: tuple[int, int]) -> bytes:
        encoded = otlp.int_attribute(_KEY_BYTES_IN, key[0]) + otlp.int_attribute(_KEY_BYTES_OUT, key[1])
        if len(self._sizes) >= _CACHE_MAX:
            self._sizes.clear()
        self._sizes[key] = encoded
        return encoded

    def _encode_path(self, path: str) -> bytes:
        if len(self._paths) >= _CACHE_MAX:
            self._paths.clear()
        encoded = self._paths[path] = otlp.string_attribute(_KEY_PATH, path)
        return encoded

    def span(self, snap: tuple[Any, ...], offset: int) -> bytes:
        """One Span message; ``offset`` turns the snapshot's perf_counter seconds into epoch ns."""
        (trace_id, span_id, carried, method, path, host, agent, client, http_version, bytes_in, bytes_out,
         status_code, model, version, variant, request_id, error, aborted, t_start, t_end,
         t_first_byte) = snap  # fmt: skip
        key = (method, host, client, http_version, agent, status_code, model, version, variant, error, aborted)
        common = self._common.get(key)
        if common is None:
            common = self._encode_common(key)
        head, attributes, status = common
        sizes = self._sizes.get((bytes_in, bytes_out))
        if sizes is None:
            sizes = self._encode_sizes((bytes_in, bytes_out))
        path_attribute = self._paths.get(path)
        if path_attribute is None:
            path_attribute = self._encode_path(path)
        rid = request_id.encode("utf-8")
        if len(rid) < len(_REQUEST_ID_PREFIXES):
            rid_attribute = _REQUEST_ID_PREFIXES[len(rid)] + rid
        else:
            rid_attribute = otlp.string_attribute(_KEY_REQUEST_ID, request_id)
        times = _TIMES.pack(0x39, int(t_start * 1e9) + offset, 0x41, int(t_end * 1e9) + offset)
        if carried is None:
            ids = bytes.fromhex(f"0a10{trace_id}1208{span_id}")  # Span.trace_id = 1, Span.span_id = 2
            flags = _FLAGS_ROOT
        else:
            parent, state = carried
            if state:
                ids = b"".join((
                    bytes.fromhex(f"0a10{trace_id}1208{span_id}"), b"\x1a", otlp.varint(len(state)), state,
                    bytes.fromhex(f"2208{parent}"),
                ))  # Span.trace_state = 3, Span.parent_span_id = 4
            else:
                ids = bytes.fromhex(f"0a10{trace_id}1208{span_id}2208{parent}")
            flags = _FLAGS_REMOTE_PARENT
        if t_first_byte:
            event = _FIRST_BYTE.pack(_FIRST_BYTE_HEAD, int(t_first_byte * 1e9) + offset, _FIRST_BYTE_NAME)
            return b"".join((ids, head, times, attributes, path_attribute, sizes, rid_attribute, event, status, flags))
        return b"".join((ids, head, times, attributes, path_attribute, sizes, rid_attribute, status, flags))


def readable_span(f: SpanFields, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """The span as an SDK ReadableSpan (public constructor), for the SDK's exporters."""
    trace_id = int(f.trace_id, 16)
    parent = None
    if f.parent_span_id is not None:
        parent = SpanContext(trace_id, int(f.parent_span_id, 16), is_remote=True)
    trace_state = TraceState.from_header([f.trace_state]) if f.trace_state else None
    context = SpanContext(trace_id, int(f.span_id, 16), False, _SAMPLED, trace_state)
    events = [Event("first_byte", timestamp=f.first_byte)] if f.first_byte is not None else []
    status = Status(StatusCode.ERROR, f.status_message or None) if f.status_code == 2 else _UNSET
    return ReadableSpan(
        name=f.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=dict(f.attributes),
        events=events,
        kind=SpanKind.SERVER,
        status=status,
        start_time=f.start,
        end_time=f.end,
        instrumentation_scope=scope,
    )


class TracingObserver(Observer):
    """Extract, decide, inject on the request head; queue kept spans on completion; export them.

    Lifecycle: construct, ``await start()`` (opens the exporter and starts the export thread), serve,
    ``await aclose()`` (exports what is queued for at most ``tracing.timeout`` seconds, then stops).
    Spans completed before ``start`` wait in the queue. ``retry_backoff`` is the first wait between
    export tries (doubled each time); tests shorten it.
    """

    name = "tracing"

    def __init__(
        self,
        cfg: Tracing,
        labels: Labels,
        redact_headers: Sequence[str] = (),
        resource: Resource | None = None,
        retry_backoff: float = 1.0,
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
        self.writer = SpanWriter(self.defaults, self.record_user_agent)
        self._encoded_resource, self._encoded_scope = otlp.resource_and_scope(
            self.resource.attributes, self.scope.name, self.scope.version
        )
        self.retry_backoff = retry_backoff
        # the export queue: appended by the event loop, popped by the export thread
        self.queue: deque[tuple[Any, ...]] = deque()
        self.max_queue = cfg.max_queue_size
        self.batch_size = min(cfg.max_export_batch_size, cfg.max_queue_size)
        self._wake = threading.Event()  # a full batch is waiting, or shutdown
        self._abort = threading.Event()  # shutdown's time is up: stop waiting between retries
        self._closing = False
        self._closed = False
        self._close_deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._exporter: otlp.Exporter | None = None
        self._sdk_exporter: SpanExporter | None = None
        self._log_filter = _OncePerInterval()
        self._last_log = -1e9
        # counters (each written by one thread: the event loop or the export thread)
        self.recorded = 0
        self.dropped_queue_full = 0
        self.exported = 0
        self.failed = 0
        self.rejected = 0
        self.dropped_shutdown = 0
        self.in_flight = 0  # spans taken from the queue by the export thread, not yet counted

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
            queue = self.queue
            if len(queue) >= self.max_queue:
                if self._closed:
                    self.dropped_shutdown += 1
                else:
                    self.dropped_queue_full += 1
                return
            self.recorded += 1
            queue.append(self.snapshot(ex))
            if len(queue) >= self.batch_size and not self._wake.is_set():
                self._wake.set()

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

    # -- off the hot path ---------------------------------------------------------------------

    def snapshot(self, ex: Exchange) -> tuple[Any, ...]:
        """What ``on_complete`` queues for a kept span: the fields of :data:`SNAPSHOT`.

        Host and User-Agent are read here, so the snapshot holds no list: a tuple of strings and
        numbers is untracked by the garbage collector, while queued spans that kept the request's
        header list alive made its full passes run far more often (measured: ~3.5 us per span).
        """
        host = agent = None
        for name, value in ex.request_headers:
            size = len(name)
            if size == 4:
                if host is None and name.lower() == b"host":
                    host = value
            elif size == 10 and agent is None and name.lower() == b"user-agent":
                agent = value
        extra = ex.extra
        return (
            ex.trace_id, ex.span_id, extra.get("tracing") if extra else None, ex.method, ex.path,
            host, agent if self.record_user_agent else None, ex.client_host, ex.http_version,
            ex.bytes_in, ex.bytes_out, ex.status, ex.model, ex.version, ex.variant, ex.request_id,
            ex.error, ex.aborted, ex.t_accepted, ex.t_done or ex.t_accepted, ex.t_first_byte,
        )  # fmt: skip

    def span_fields(self, snap: tuple[Any, ...], offset: int) -> SpanFields:
        """Everything the span says, from a snapshot (the SDK path; :class:`SpanWriter` writes the same)."""
        (trace_id, span_id, carried, method, path, host, agent, client, http_version, bytes_in, bytes_out,
         status_code, model, version, variant, request_id, error, aborted, t_start, t_end,
         t_first_byte) = snap  # fmt: skip
        parent_span: str | None = None
        tracestate: str | None = None
        if carried is not None:
            parent_span = carried[0]
            if carried[1]:
                tracestate = carried[1].decode("ascii")
        d = self.defaults
        attributes = common_attributes(
            method, host, client, http_version, agent, status_code,
            model or d[0], version or d[1], variant or d[2], error, aborted,
        )  # fmt: skip
        attributes += [
            ("url.path", path),
            ("http.request.body.size", bytes_in),
            ("http.response.body.size", bytes_out),
            ("infermon.request_id", request_id),
        ]
        code, message = span_status(status_code, error)
        return SpanFields(
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

    def encode(self, batch: Sequence[tuple[Any, ...]], offset: int | None = None) -> bytes:
        """An ``ExportTraceServiceRequest`` for snapshots (``offset``: epoch ns minus perf_counter ns)."""
        if offset is None:
            offset = time.time_ns() - time.perf_counter_ns()
        span = self.writer.span
        return otlp.export_request(self._encoded_resource, self._encoded_scope, [span(s, offset) for s in batch])

    # -- export thread --------------------------------------------------------------------------

    def _run(self) -> None:
        queue = self.queue
        size = self.batch_size
        delay = self.cfg.schedule_delay
        try:
            while True:
                closing = self._closing
                woken = True
                if not closing:
                    woken = self._wake.wait(delay)
                    self._wake.clear()
                    closing = self._closing
                # a full batch goes at once; on the timer, or when closing, whatever is queued
                while queue and (closing or not woken or len(queue) >= size):
                    if closing and time.monotonic() >= self._close_deadline:
                        return
                    self._export_batch()
                    closing = self._closing
                if closing:
                    return
        except Exception as exc:  # never expected; the spans still queued are counted at shutdown
            log.error("the span export thread stopped: %r", exc)
        finally:
            self._close_exporters()

    def _export_batch(self) -> None:
        queue = self.queue
        popleft = queue.popleft
        batch: list[tuple[Any, ...]] = []
        with contextlib.suppress(IndexError):
            for _ in range(self.batch_size):
                batch.append(popleft())
        n = self.in_flight = len(batch)
        if not n:
            return
        deadline = min(time.monotonic() + self.cfg.timeout, self._close_deadline)
        try:
            result = self._send(batch, deadline)
        except Exception as exc:  # an exporter must never take the thread down
            result = otlp.Attempt(False, detail=f"raised {exc!r}")
        if result.ok:
            self.exported += n - result.rejected
            if result.rejected:
                self.rejected += result.rejected
                reason = result.detail or "no reason given"
                self._log(f"the collector rejected {result.rejected} of {n} spans: {reason}")
        else:
            self.failed += n
            self._log(
                f"span export failed after {result.attempts} attempt(s) ({result.detail}); "
                f"{self.failed} spans lost to export failures so far"
            )
        self.in_flight = 0

    def _send(self, batch: list[tuple[Any, ...]], deadline: float) -> otlp.Attempt:
        offset = time.time_ns() - time.perf_counter_ns()  # perf_counter -> epoch ns, once per batch
        if self._sdk_exporter is not None:
            spans = [readable_span(self.span_fields(s, offset), self.resource, self.scope) for s in batch]
            if self._sdk_exporter.export(spans) is SpanExportResult.SUCCESS:
                return otlp.Attempt(True)
            return otlp.Attempt(False, detail="the SDK's exporter failed; its own log says why")
        assert self._exporter is not None
        return self._exporter.export(self.encode(batch, offset), deadline, self._abort)

    def _log(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= 60.0:
            self._last_log = now
            log.warning("%s", message)

    def _close_exporters(self) -> None:
        with contextlib.suppress(Exception):
            if self._exporter is not None:
                self._exporter.transport.close()
            if self._sdk_exporter is not None:
                self._sdk_exporter.shutdown()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the exporter and start the export thread."""
        if self._thread is not None or self._closing:
            return
        if self.cfg.exporter == "sdk":
            self._sdk_exporter = build_sdk_exporter(self.cfg)
            for name in _SDK_LOGGERS:
                logging.getLogger(name).addFilter(self._log_filter)
        else:
            self._exporter = otlp.Exporter(build_transport(self.cfg), backoff=self.retry_backoff)
        self._thread = threading.Thread(target=self._run, name="infermon-trace-export", daemon=True)
        self._thread.start()

    async def aclose(self) -> None:
        """Export what is queued for at most ``tracing.timeout`` seconds, then stop.

        Spans still queued then are counted as dropped (``shutdown``) and logged; a collector that
        hangs is left behind (the thread is a daemon), the caller is not kept waiting.
        """
        if self._closed:
            return
        timeout = self.cfg.timeout
        self._close_deadline = time.monotonic() + timeout
        self._closing = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, timeout)
        self._abort.set()
        self._closed = True
        self.max_queue = 0  # anything completing from now on is counted, not queued
        left = 0
        with contextlib.suppress(IndexError):
            while True:
                self.queue.popleft()
                left += 1
        self.dropped_shutdown += left
        if left or (thread is not None and thread.is_alive()):
            sending = f"; {self.in_flight} more still being sent" if thread is not None and thread.is_alive() else ""
            log.warning("tracing shut down with %d spans not exported%s", left, sending)
        if thread is None:
            self._close_exporters()
        for name in _SDK_LOGGERS:
            logging.getLogger(name).removeFilter(self._log_filter)

    def collector(self) -> TracingCollector:
        return TracingCollector(self)


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
        yield CounterMetricFamily("infermon_trace_spans_exported", "Spans the collector accepted.", value=obs.exported)
        dropped = CounterMetricFamily(
            "infermon_trace_spans_dropped",
            "Spans lost: queue_full (the export queue was full), export_failed (the collector refused "
            "or did not answer within tracing.timeout, retries included), rejected (the collector's "
            "partial success refused them), shutdown (still queued when shutdown's flush time ran out).",
            labels=("reason",),
        )
        dropped.add_metric(("queue_full",), obs.dropped_queue_full)
        dropped.add_metric(("export_failed",), obs.failed)
        dropped.add_metric(("rejected",), obs.rejected)
        dropped.add_metric(("shutdown",), obs.dropped_shutdown)
        yield dropped
        yield GaugeMetricFamily(
            "infermon_trace_queue_spans", "Spans waiting in the export queue.", value=len(obs.queue)
        )
