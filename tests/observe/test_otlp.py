"""The proxy's OTLP encoder writes what the SDK's encoder writes (decoded and compared), and the
few protobuf answers the exporter reads are read right."""

from __future__ import annotations

import email.utils
import time

import pytest
from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]
from google.rpc.status_pb2 import Status  # type: ignore[import-untyped]
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags

from proxy.dataplane.exchange import Exchange
from proxy.observe import otlp
from proxy.observe.tracing import TracingObserver, readable_span
from proxy.settings import Labels, Tracing


def _exchange(i: int, status: int = 200, error: str | None = None) -> Exchange:
    t = time.perf_counter()
    ex = Exchange(t, "10.1.2.3" if i != 5 else "")
    ex.method = "POST" if i % 2 else "BREW"
    ex.path = f"/v2/models/m{i % 3}/infer"
    ex.request_headers = [(b"Host", b"model:8080" if i != 2 else b"[::1]"), (b"User-Agent", b"\xe9t\xe9/1")]
    ex.request_id = f"rid-{i}" if i != 6 else "r" * 300  # past the precomputed prefixes
    ex.trace_id = f"{i + 1:032x}"
    ex.span_id = f"{i + 7:016x}"
    ex.sampled = True
    ex.status = status
    ex.error = error
    ex.bytes_in, ex.bytes_out = 10 * i, 2**40 + i
    ex.t_first_byte = t + 0.001 if i % 3 else 0.0
    ex.t_done = t + 0.002
    ex.aborted = i == 4
    ex.model = "iris" if i == 1 else ""
    if i % 2:
        ex.extra = {"tracing": (f"{i + 99:016x}", b"a=1,b@v=2" if i == 3 else None)}
    return ex


def test_encoder_matches_the_sdk() -> None:
    obs = TracingObserver(Tracing(enabled=True, resource_attributes={"x": "y"}), Labels(model="default"))
    exchanges = [_exchange(i) for i in range(7)]
    exchanges.append(_exchange(7, status=502, error="connect"))
    exchanges.append(_exchange(8, status=503))
    exchanges.append(_exchange(0))  # a repeat: from the caches
    snaps = [obs.snapshot(ex) for ex in exchanges]
    offset = time.time_ns() - time.perf_counter_ns()
    ours = ExportTraceServiceRequest.FromString(obs.encode(snaps, offset))
    sdk_spans = [readable_span(obs.span_fields(s, offset), obs.resource, obs.scope) for s in snaps]
    theirs = ExportTraceServiceRequest.FromString(encode_spans(sdk_spans).SerializeToString())
    # Span.flags: the SDK (1.45) writes only the parent's remote bits; the proxy adds the W3C trace
    # flags in the low 8 bits, as the proto asks: sampled, since every exported span was recorded
    theirs_spans = theirs.resource_spans[0].scope_spans[0].spans
    for sdk_span, encoded in zip(sdk_spans, theirs_spans, strict=True):
        assert sdk_span.context is not None
        encoded.flags |= int(sdk_span.context.trace_flags)
    assert ours == theirs
    spans = ours.resource_spans[0].scope_spans[0].spans
    assert len(spans) == 10
    remote = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
    for span in spans:
        if span.parent_span_id:  # the caller's span, from a request header: a remote parent
            assert span.flags == 0x01 | remote
        else:  # a root: "the parent is not remote" is known
            assert span.flags == 0x01 | SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
    assert spans[3].trace_state == "a=1,b@v=2"
    assert spans[6].attributes[-1].value.string_value == "r" * 300


def test_varint() -> None:
    assert otlp.varint(0) == b"\x00"
    assert otlp.varint(300) == b"\xac\x02"
    assert otlp.varint(-1) == b"\xff" * 9 + b"\x01"
    assert list(otlp.read_fields(b"\x08" + otlp.varint(2**40) + b"\x12\x02hi")) == [(1, 2**40), (2, b"hi")]
    with pytest.raises(ValueError, match="truncated"):
        list(otlp.read_fields(b"\x12\x05hi"))


def test_partial_success_is_read() -> None:
    full = ExportTraceServiceResponse().SerializeToString()
    assert otlp.partial_success(full) == (0, "")
    partial = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=3, error_message="too old")
    ).SerializeToString()
    assert otlp.partial_success(partial) == (3, "too old")
    assert otlp.partial_success(b"\x0a\x05\x08") == (0, "")  # malformed: nothing to report


def test_retry_info_is_read() -> None:
    status = Status(code=8, message="slow down")
    status.details.add().Pack(RetryInfo(retry_delay=Duration(seconds=2, nanos=500_000_000)))
    assert otlp.retry_info_delay(status.SerializeToString()) == 2.5
    assert otlp.retry_info_delay(Status(code=14).SerializeToString()) is None
    assert otlp.retry_info_delay(b"\xff") is None


def test_retry_after_is_read() -> None:
    assert otlp.retry_after("3") == 3.0
    assert otlp.retry_after(None) is None
    assert otlp.retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    delay = otlp.retry_after(date, now=now)
    assert delay is not None and 29 <= delay <= 31
