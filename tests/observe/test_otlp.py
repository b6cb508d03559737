"""The proxy's OTLP encoder writes what the SDK's encoder writes (decoded and compared)."""

from __future__ import annotations

import time

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from proxy.dataplane.exchange import Exchange
from proxy.observe.otlp import SpanEncoder, _varint
from proxy.observe.tracing import TracingObserver
from proxy.settings import Labels, Tracing


def _exchange(i: int, status: int = 200, error: str | None = None) -> Exchange:
    t = time.perf_counter()
    ex = Exchange(t, "10.1.2.3")
    ex.method = "POST" if i % 2 else "BREW"
    ex.path = f"/v2/models/m{i % 3}/infer"
    ex.request_headers = [(b"Host", b"model:8080"), (b"User-Agent", b"\xe9t\xe9/1")]
    ex.request_id = f"rid-{i}"
    ex.trace_id = f"{i + 1:032x}"
    ex.span_id = f"{i + 7:016x}"
    ex.sampled = True
    ex.status = status
    ex.error = error
    ex.bytes_in, ex.bytes_out = 10 * i, 2**40 + i
    ex.t_first_byte = t + 0.001 if i % 3 else 0.0
    ex.t_done = t + 0.002
    ex.aborted = i == 4
    if i % 2:
        ex.extra = {"tracing": (f"{i + 99:016x}", b"a=1,b@v=2" if i == 3 else None)}
    return ex


def test_encoder_matches_the_sdk() -> None:
    obs = TracingObserver(Tracing(enabled=True, resource_attributes={"x": "y"}), Labels())
    try:
        spans = [obs.build_span(_exchange(i)) for i in range(6)]
        spans.append(obs.build_span(_exchange(6, status=502, error="connect")))
        spans.append(obs.build_span(_exchange(7, status=503)))
        ours = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))  # from the snapshots
        for span in spans:
            span.materialize()
        also_ours = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
        for span in spans:
            span.otlp_fields = None  # type: ignore[method-assign, assignment]  # the generic path
        generic = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
        theirs = ExportTraceServiceRequest.FromString(encode_spans(spans).SerializeToString())
        for rs in theirs.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    span.ClearField("flags")  # the SDK also writes the W3C flags field; we leave it out
        assert ours == theirs
        assert also_ours == theirs
        assert generic == theirs
        assert len(ours.resource_spans[0].scope_spans[0].spans) == 8
    finally:
        obs.processor.shutdown()  # type: ignore[no-untyped-call]


def test_varint() -> None:
    assert _varint(0) == b"\x00"
    assert _varint(300) == b"\xac\x02"
    assert _varint(-1) == b"\xff" * 9 + b"\x01"
