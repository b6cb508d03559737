"""Tracing end to end: a real upstream, the proxy, and real OTLP receivers (HTTP/protobuf and gRPC)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from proxy.app import ProxyApp
from proxy.dataplane.exchange import Exchange
from proxy.observe.traceparent import parse_b3_single, parse_traceparent
from proxy.observe.tracing import TracingObserver
from proxy.settings import Labels, Tracing
from tests.conftest import ProxyFactory
from tests.helpers import Client, free_port, metric, scrape, scrape_metrics, wait_until
from tests.observe.test_traceparent import MALFORMED
from tests.otlp import Answer, GrpcWireTap, Receiver, http_receiver

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def tracing(receiver: Receiver | None, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "enabled": True,
        "sampler": "parentbased_always_on",
        "schedule_delay": 0.02,
        "timeout": 2.0,
    }
    if receiver is not None:
        cfg["endpoint"] = receiver.url
    cfg.update(extra)
    return {"tracing": cfg}


def upstream_headers(resp: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in resp.json()["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


async def get(app: ProxyApp, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Any:
    client = await Client.connect(app.proxy_address)
    try:
        return await client.request(method, path, headers=headers)
    finally:
        await client.close()


@pytest.mark.parametrize("exporter", ["infermon", "sdk"])
@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_the_proxy_span_joins_the_callers_trace(
    make_proxy: ProxyFactory,
    upstream: str,
    otlp_http: Receiver,
    otlp_grpc: Receiver,
    protocol: str,
    exporter: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("K8S_POD_NAME", "model-7d9f-abcde")
    monkeypatch.setenv("K8S_NAMESPACE_NAME", "serving")
    monkeypatch.setenv("K8S_NODE_NAME", "gpu-node-3")
    receiver = otlp_http if protocol == "http/protobuf" else otlp_grpc
    app = await make_proxy(
        upstream,
        labels={"model": "iris", "version": "v3", "variant": "canary"},
        **tracing(receiver, protocol=protocol, exporter=exporter,
                  resource_attributes={"deployment.environment": "test"}, headers={"x-collector-token": "t0ken"}),
    )  # fmt: skip
    client_tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    resp = await get(
        app, "/echo/predict?x=1", {"traceparent": client_tp, "tracestate": "vendor=abc", "User-Agent": "ua/1.0"},
        method="POST",
    )  # fmt: skip
    assert resp.status == 200
    seen = upstream_headers(resp)
    assert len(seen["traceparent"]) == 1
    sent = parse_traceparent(seen["traceparent"][0].encode())
    assert sent is not None
    assert sent.trace_id == CLIENT_TRACE
    assert sent.span_id != CLIENT_SPAN
    assert sent.sampled is True
    assert seen["tracestate"] == ["vendor=abc"]

    (got,) = await receiver.wait_spans(1)
    span = got.span
    assert got.trace_id == CLIENT_TRACE
    assert got.span_id == sent.span_id  # the upstream's parent is the proxy's span
    assert got.parent_span_id == CLIENT_SPAN  # whose parent is the client's span
    assert span.kind == span.SPAN_KIND_SERVER
    assert span.name == "POST"
    assert span.status.code == 0  # UNSET
    assert span.trace_state == "vendor=abc"
    # Span.flags: the parent is remote (0x300); the proxy's encoder adds the W3C flags (sampled)
    assert span.flags == (0x301 if exporter == "infermon" else 0x300)
    a = got.attributes
    assert a["http.request.method"] == "POST"
    assert a["url.path"] == "/echo/predict"
    assert a["http.response.status_code"] == 200
    assert a["server.address"] == "test"
    assert a["client.address"] == "127.0.0.1"
    assert a["user_agent.original"] == "ua/1.0"
    assert a["http.request.body.size"] == 0
    assert a["http.response.body.size"] == len(resp.body)
    assert (a["infermon.model.name"], a["infermon.model.version"], a["infermon.model.variant"]) == (
        "iris", "v3", "canary",
    )  # fmt: skip
    assert "x=1" not in str(a)  # no query strings in spans
    assert [e.name for e in span.events] == ["first_byte"]
    assert span.start_time_unix_nano <= span.events[0].time_unix_nano <= span.end_time_unix_nano
    assert abs(span.start_time_unix_nano / 1e9 - time.time()) < 60
    r = got.resource
    assert r["service.name"] == "infermon-proxy"
    assert r["k8s.pod.name"] == "model-7d9f-abcde"
    assert r["k8s.namespace.name"] == "serving"
    assert r["k8s.node.name"] == "gpu-node-3"
    assert r["deployment.environment"] == "test"
    assert receiver.headers[0].get("x-collector-token") == "t0ken"

    async def exported() -> bool:
        # counted by the export thread once the receiver has answered, a moment after it has the spans
        m = await scrape_metrics(app.admin_address)
        return metric(m, "infermon_trace_spans_exported_total") == 1

    await wait_until(exported)
    assert metric(await scrape_metrics(app.admin_address), "infermon_trace_spans_dropped_total") == 0


async def test_no_context_starts_a_new_sampled_trace(
    make_proxy: ProxyFactory, upstream: str, otlp_http: Receiver
) -> None:
    app = await make_proxy(upstream, **tracing(otlp_http))
    resp = await get(app, "/echo/x")
    sent = parse_traceparent(upstream_headers(resp)["traceparent"][0].encode())
    assert sent is not None and sent.sampled
    (got,) = await otlp_http.wait_spans(1)
    assert (got.trace_id, got.span_id, got.parent_span_id) == (sent.trace_id, sent.span_id, "")
    assert got.span.flags == 0x101  # a local root: "the parent is not remote" is known; sampled


async def test_unsampled_requests_export_nothing(make_proxy: ProxyFactory, upstream: str, otlp_http: Receiver) -> None:
    app = await make_proxy(upstream, **tracing(otlp_http, sampler="parentbased_traceidratio", sampler_arg=0.0))
    for _ in range(20):
        resp = await get(app, "/echo/quiet")
        sent = parse_traceparent(upstream_headers(resp)["traceparent"][0].encode())
        assert sent is not None and not sent.sampled  # propagated, not sampled
    resp = await get(app, "/echo/caller-sampled", {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    unsampled_parent = await get(app, "/echo/caller-not", {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
    assert parse_traceparent(upstream_headers(unsampled_parent)["traceparent"][0].encode()).sampled is False  # type: ignore[union-attr]
    spans = await otlp_http.wait_spans(1)
    await app.tracing.aclose()  # type: ignore[union-attr]
    assert [s.attributes["url.path"] for s in spans] == ["/echo/caller-sampled"]


@pytest.mark.parametrize("value", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_traceparent_starts_a_new_trace(make_proxy: ProxyFactory, upstream: str, value: str) -> None:
    app = await make_proxy(upstream, **tracing(None, sampler="always_off"))
    headers = [("traceparent", value), ("tracestate", "vendor=abc")]
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo/m", headers=headers)
    assert resp.status == 200
    seen = upstream_headers(resp)
    assert len(seen["traceparent"]) == 1
    sent = parse_traceparent(seen["traceparent"][0].encode())
    assert sent is not None
    assert sent.trace_id != CLIENT_TRACE and sent.trace_id not in value
    assert "tracestate" not in seen  # dropped with an invalid traceparent


async def test_repeated_traceparent_is_invalid(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, **tracing(None, sampler="always_off"))
    tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo/m", headers=[("traceparent", tp), ("traceparent", tp)])
    seen = upstream_headers(resp)
    assert len(seen["traceparent"]) == 1 and CLIENT_TRACE not in seen["traceparent"][0]


async def test_b3_single(make_proxy: ProxyFactory, upstream: str, otlp_http: Receiver) -> None:
    app = await make_proxy(upstream, **tracing(otlp_http, propagators="b3"))
    resp = await get(app, "/echo/b3", {"b3": f"{CLIENT_TRACE}-{CLIENT_SPAN}-1", "traceparent": "not ours now"})
    seen = upstream_headers(resp)
    assert seen["traceparent"] == ["not ours now"]  # tracecontext not configured: passes through
    (b3,) = seen["b3"]
    sent = parse_b3_single(b3.encode())
    assert sent is not None and sent.trace_id == CLIENT_TRACE and sent.span_id != CLIENT_SPAN and sent.sampled
    (got,) = await otlp_http.wait_spans(1)
    assert (got.trace_id, got.span_id, got.parent_span_id) == (CLIENT_TRACE, sent.span_id, CLIENT_SPAN)


async def test_b3_multi_and_64_bit_ids(make_proxy: ProxyFactory, upstream: str, otlp_http: Receiver) -> None:
    app = await make_proxy(upstream, **tracing(otlp_http, propagators=["tracecontext", "b3multi"]))
    short = CLIENT_TRACE[16:]
    resp = await get(app, "/echo/b3m", {"X-B3-TraceId": short, "X-B3-SpanId": CLIENT_SPAN, "X-B3-Sampled": "1"})
    seen = upstream_headers(resp)
    padded = "0" * 16 + short
    assert seen["x-b3-traceid"] == [padded]
    assert seen["x-b3-spanid"] != [CLIENT_SPAN]
    assert seen["x-b3-sampled"] == ["1"]
    tp = parse_traceparent(seen["traceparent"][0].encode())
    assert tp is not None and tp.trace_id == padded and [tp.span_id] == seen["x-b3-spanid"]
    (got,) = await otlp_http.wait_spans(1)
    assert (got.trace_id, got.parent_span_id) == (padded, CLIENT_SPAN)


async def test_disabled_tracing_passes_traceparent_untouched(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    assert app.tracing is None
    tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    resp = await get(app, "/echo/off", {"traceparent": tp, "tracestate": "a=b"})
    seen = upstream_headers(resp)
    assert seen["traceparent"] == [tp] and seen["tracestate"] == ["a=b"]


async def test_keep_errors_keeps_failed_and_slow_requests(
    make_proxy: ProxyFactory, upstream: str, otlp_http: Receiver
) -> None:
    app = await make_proxy(
        upstream, **tracing(otlp_http, sampler="always_off", keep_errors=True, slow_threshold=0.15)
    )
    fast = await get(app, "/echo/fast")
    assert parse_traceparent(upstream_headers(fast)["traceparent"][0].encode()).sampled is False  # type: ignore[union-attr]
    assert (await get(app, "/status/404")).status == 404
    assert (await get(app, "/status/503")).status == 503
    assert (await get(app, "/slow?delay=0.3")).status == 200
    spans = await otlp_http.wait_spans(2)
    await app.tracing.aclose()  # type: ignore[union-attr]
    by_path = {s.attributes["url.path"]: s for s in spans}
    assert set(by_path) == {"/status/503", "/slow"}
    err = by_path["/status/503"]
    assert err.span.status.code == 2  # ERROR
    assert err.attributes["error.type"] == "503"
    assert by_path["/slow"].span.status.code == 0
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total") == 4


async def test_upstream_failure_is_an_error_span(make_proxy: ProxyFactory, otlp_http: Receiver) -> None:
    app = await make_proxy(f"http://127.0.0.1:{free_port()}", **tracing(otlp_http))
    assert (await get(app, "/echo/x")).status == 502
    (got,) = await otlp_http.wait_spans(1)
    assert got.span.status.code == 2
    assert got.attributes["error.type"] == "connect"
    assert got.attributes["http.response.status_code"] == 502


async def test_exemplars_carry_the_exported_trace_id(
    make_proxy: ProxyFactory, upstream: str, otlp_http: Receiver
) -> None:
    app = await make_proxy(upstream, **tracing(otlp_http))
    await get(app, "/echo/ex")
    (got,) = await otlp_http.wait_spans(1)
    _, text = await scrape(app.admin_address, accept="application/openmetrics-text; version=1.0.0")
    exemplars = [
        s.exemplar.labels["trace_id"]
        for fam in text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
        if fam.name == "infermon_request_duration_seconds"
        for s in fam.samples
        if s.exemplar is not None
    ]
    assert exemplars == [got.trace_id]


async def _latencies(app: ProxyApp, n: int) -> list[float]:
    client = await Client.connect(app.proxy_address)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        assert (await client.request("GET", "/echo/l")).status == 200
        out.append(time.perf_counter() - t)
    return out


@pytest.mark.parametrize(
    ("protocol", "mode"),
    [("http/protobuf", "down"), ("http/protobuf", "hang"), ("http/protobuf", "fail"), ("grpc", "down"),
     ("grpc", "hang")],
)  # fmt: skip
async def test_a_collector_that_is_down_or_hangs_costs_requests_nothing(
    make_proxy: ProxyFactory,
    upstream: str,
    otlp_http: Receiver,
    otlp_grpc: Receiver,
    protocol: str,
    mode: str,
) -> None:
    receiver = otlp_http if protocol == "http/protobuf" else otlp_grpc
    endpoint = f"http://127.0.0.1:{free_port()}" if mode == "down" else receiver.url
    receiver.mode = mode
    receiver.hang_s = 5.0
    app = await make_proxy(
        upstream,
        **tracing(
            None, endpoint=endpoint, protocol=protocol, timeout=3.0, max_queue_size=8, max_export_batch_size=4
        ),
    )
    baseline = await make_proxy(upstream)
    await _latencies(baseline, 20)  # warm both
    await _latencies(app, 20)
    base = sorted(await _latencies(baseline, 200))
    traced = sorted(await _latencies(app, 200))
    # an export waiting on the collector (3 s timeout, retries) would show as whole seconds here
    assert traced[-1] < 0.5
    assert traced[len(traced) // 2] < base[len(base) // 2] + 0.005

    async def dropped() -> bool:
        # a hanging collector fills the queue (queue_full); a refused one may fail each export fast
        # enough that the queue never fills (export_failed): either way, spans are counted as lost
        m = await scrape_metrics(app.admin_address)
        return metric(m, "infermon_trace_spans_dropped_total") > 0

    await wait_until(dropped)
    if mode != "down":
        await receiver.wait_requests(1)
    receiver.unblock()
    if mode == "fail":

        async def failed() -> bool:
            m = await scrape_metrics(app.admin_address)
            return metric(m, "infermon_trace_spans_dropped_total", reason="export_failed") > 0

        await wait_until(failed)
    t = time.perf_counter()
    await app.tracing.aclose()  # type: ignore[union-attr]
    assert time.perf_counter() - t < 3.0 + 0.5  # shutdown waits on the collector for tracing.timeout at most


def test_otel_variables_rank_between_file_and_infermon_variables(tmp_path: Any) -> None:
    from proxy import config
    from proxy.errors import ConfigError
    from proxy.settings import ProxyConfig

    path = tmp_path / "proxy.yaml"
    path.write_text("tracing:\n  sampler: always_on\n  service_name: from-file\n  timeout: 7\n")
    env = {
        "OTEL_TRACES_SAMPLER": "ParentBased_TraceIdRatio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_SERVICE_NAME": "from-otel",
        "INFERMON_TRACING__SERVICE_NAME": "from-infermon",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=ml%20platform",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc,x-tenant=7",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": " GZip",
        "OTEL_PROPAGATORS": "tracecontext,baggage,b3multi",
        "INFERMON_ACCESS_LOG__REDACT_HEADERS": '["X-Api-Key"]',
    }
    cfg = config.load(ProxyConfig, file=path, env=env).tracing
    assert (cfg.sampler, cfg.sampler_arg) == ("parentbased_traceidratio", 0.25)
    assert cfg.service_name == "from-infermon"
    assert cfg.resource_attributes == {"deployment.environment": "prod", "team": "ml platform"}
    assert (cfg.protocol, cfg.export_url()) == ("grpc", "http://collector:4317")
    assert cfg.headers == {"authorization": "Bearer abc", "x-tenant": "7"}
    assert cfg.timeout == 2.5
    assert cfg.compression == "gzip"  # the traces-specific variable wins
    assert cfg.propagators == ["tracecontext", "baggage", "b3multi"]
    public = config.load(ProxyConfig, file=path, env=env).public_dict()
    assert public["tracing"]["headers"] == {"authorization": "***", "x-tenant": "***"}
    assert config.load(ProxyConfig, file=path, env={}).tracing.sampler == "always_on"
    http = config.load(ProxyConfig, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}).tracing
    assert http.export_url() == "http://c:4318/v1/traces"
    both = {"OTEL_SDK_DISABLED": "true", "INFERMON_TRACING__ENABLED": "true"}
    assert config.load(ProxyConfig, env=both).tracing.enabled  # the more specific variable wins
    assert not config.load(ProxyConfig, file=path, env={"OTEL_SDK_DISABLED": "true"}).tracing.enabled
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER_ARG"):
        config.load(ProxyConfig, env={"OTEL_TRACES_SAMPLER_ARG": "lots"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_COMPRESSION") as bad:
        config.load(ProxyConfig, env={"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"})
    assert "gzip" in str(bad.value)  # the error names the values that work
    assert config.load(ProxyConfig, env={}).tracing.compression == "none"


# -- the export thread, against the real receivers ------------------------------------------------


def exchange(i: int = 0, traceparent: str | None = None) -> Exchange:
    """A completed request as the data plane hands it to the hooks (before on_request_head)."""
    ex = Exchange(time.perf_counter(), "127.0.0.1")
    ex.method, ex.path, ex.request_id = "GET", f"/v1/models/m:predict/{i}", f"rid-{i}"
    ex.request_headers = [(b"Host", b"model:8080")]
    if traceparent is not None:
        ex.request_headers.append((b"traceparent", traceparent.encode()))
    return ex


def complete(obs: TracingObserver, n: int, traceparent: str | None = None) -> None:
    for i in range(n):
        ex = exchange(i, traceparent)
        obs.on_request_head(ex)
        ex.status, ex.bytes_out = 200, 10
        ex.t_first_byte = ex.t_done = time.perf_counter()
        obs.on_complete(ex)


@contextlib.asynccontextmanager
async def observer(url: str, protocol: str = "http/protobuf", **extra: Any) -> AsyncIterator[TracingObserver]:
    """A started TracingObserver (fast retries: 50 ms backoff), closed afterwards."""
    settings: dict[str, Any] = {"enabled": True, "endpoint": url, "protocol": protocol, "schedule_delay": 0.02,
                                "sampler": "parentbased_always_on", "timeout": 5.0, **extra}  # fmt: skip
    obs = TracingObserver(Tracing(**settings), Labels(), retry_backoff=0.05)
    await obs.start()
    try:
        yield obs
    finally:
        await obs.aclose()


async def counted(obs: TracingObserver, exported: int = 0, failed: int = 0) -> None:
    """Wait until the export thread has counted what it sent (it counts after the answer)."""

    async def done() -> bool:
        return obs.exported >= exported and obs.failed >= failed

    await wait_until(done)


def receiver_for(protocol: str, otlp_http: Receiver, otlp_grpc: Receiver) -> Receiver:
    return otlp_http if protocol == "http/protobuf" else otlp_grpc


PROTOCOLS = ["http/protobuf", "grpc"]


@pytest.mark.parametrize("exporter", ["infermon", "sdk"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_gzip_compression(otlp_http: Receiver, otlp_grpc: Receiver, protocol: str, exporter: str) -> None:
    receiver = receiver_for(protocol, otlp_http, otlp_grpc)
    tap = GrpcWireTap(int(otlp_grpc.url.rsplit(":", 1)[1]))
    await tap.start()
    try:
        url = receiver.url if protocol == "http/protobuf" else tap.url
        for compression in ("none", "gzip"):
            async with observer(url, protocol, compression=compression, exporter=exporter) as obs:
                complete(obs, 20)
                await counted(obs, exported=20)
        spans = await receiver.wait_spans(40)
        assert len({s.span_id for s in spans}) == 40  # every span arrived, decoded by the receiver
        if protocol == "http/protobuf":
            encodings = [h.get("Content-Encoding") for h in receiver.headers]
            assert encodings[0] is None and encodings[-1] == "gzip"
            assert receiver.wire[-1][:2] == b"\x1f\x8b"  # gzip's magic, as it came over the wire
            assert len(receiver.wire[-1]) < len(receiver.raw[-1]) / 3
        else:
            assert tap.compressed_flags[0] == 0 and tap.compressed_flags[-1] == 1  # the gRPC message flag
    finally:
        await tap.close()


@pytest.mark.parametrize(
    ("protocol", "failure"),
    [("http/protobuf", Answer(http_status=s)) for s in (429, 502, 503, 504)]
    + [("grpc", Answer(grpc_code=c)) for c in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED")],
    ids=lambda v: v if isinstance(v, str) else f"{v.http_status}-{v.grpc_code}",
)
async def test_a_transient_failure_is_retried(
    otlp_http: Receiver, otlp_grpc: Receiver, protocol: str, failure: Answer
) -> None:
    receiver = receiver_for(protocol, otlp_http, otlp_grpc)
    receiver.answers.extend([failure, failure])
    async with observer(receiver.url, protocol) as obs:
        complete(obs, 5)
        await receiver.wait_spans(5)
        await counted(obs, exported=5)
        assert receiver.requests == 3  # two refusals, then the spans
        assert (obs.failed, obs.dropped_queue_full) == (0, 0)


@pytest.mark.parametrize(
    ("protocol", "failure"),
    [("http/protobuf", Answer(http_status=400)), ("http/protobuf", Answer(http_status=500)),
     ("grpc", Answer(grpc_code="INVALID_ARGUMENT")), ("grpc", Answer(grpc_code="RESOURCE_EXHAUSTED"))],
    ids=["400", "500", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED-without-RetryInfo"],
)  # fmt: skip
async def test_a_permanent_failure_is_not_retried(
    otlp_http: Receiver, otlp_grpc: Receiver, protocol: str, failure: Answer
) -> None:
    receiver = receiver_for(protocol, otlp_http, otlp_grpc)
    receiver.answers.append(failure)
    async with observer(receiver.url, protocol) as obs:
        complete(obs, 5)
        await counted(obs, failed=5)
        assert receiver.requests == 1 and obs.exported == 0
        complete(obs, 1)  # the next batch goes through
        await counted(obs, exported=1)
        assert receiver.requests == 2


@pytest.mark.parametrize(
    ("protocol", "failure", "wait"),
    [("http/protobuf", Answer(http_status=503, retry_after="1"), 1.0),
     ("http/protobuf", Answer(http_status=429, retry_after="1"), 1.0),
     ("grpc", Answer(grpc_code="UNAVAILABLE", retry_delay=0.6), 0.6),
     ("grpc", Answer(grpc_code="RESOURCE_EXHAUSTED", retry_delay=0.6), 0.6)],
    ids=["503-Retry-After", "429-Retry-After", "UNAVAILABLE-RetryInfo", "RESOURCE_EXHAUSTED-RetryInfo"],
)  # fmt: skip
async def test_the_collectors_retry_delay_is_honoured(
    otlp_http: Receiver, otlp_grpc: Receiver, protocol: str, failure: Answer, wait: float
) -> None:
    receiver = receiver_for(protocol, otlp_http, otlp_grpc)
    receiver.answers.append(failure)
    async with observer(receiver.url, protocol) as obs:
        complete(obs, 3)
        await receiver.wait_spans(3)
        await counted(obs, exported=3)
    first, second = receiver.arrivals
    assert second - first >= wait  # not the 50 ms backoff


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_retries_give_up_within_the_timeout(otlp_http: Receiver, otlp_grpc: Receiver, protocol: str) -> None:
    receiver = receiver_for(protocol, otlp_http, otlp_grpc)
    receiver.mode = "fail"
    async with observer(receiver.url, protocol, timeout=0.8) as obs:
        started = time.monotonic()
        complete(obs, 4)
        await counted(obs, failed=4)
        elapsed = time.monotonic() - started
        assert obs.exported == 0
        assert receiver.requests >= 3  # it did retry: 50, 100, 200, 400 ms apart, jittered
        assert receiver.arrivals[-1] - receiver.arrivals[0] < 0.8
        assert elapsed < 0.8 + 0.5
        m = {("export_failed",): 4.0}
        assert {k: v for k, v in dropped(obs).items() if v} == m


async def test_a_connection_the_collector_closed_while_idle_is_reopened_at_once() -> None:
    receivers = http_receiver(keepalive_timeout=0.2)
    receiver = await anext(receivers)
    # a retry after the backoff could not happen within the timeout: only an immediate resend can
    cfg = Tracing(enabled=True, endpoint=receiver.url, sampler="always_on", schedule_delay=0.02, timeout=2.0)
    obs = TracingObserver(cfg, Labels(), retry_backoff=30.0)
    await obs.start()
    try:
        complete(obs, 1)
        await counted(obs, exported=1)

        async def closed_by_the_collector() -> bool:
            return receiver.connections() == 0

        await wait_until(closed_by_the_collector)
        complete(obs, 1)  # on the kept-alive connection the collector has closed
        await counted(obs, exported=2)
        assert (obs.failed, receiver.requests) == (0, 2)
    finally:
        await obs.aclose()
        await receivers.aclose()


async def test_a_retry_delay_past_the_timeout_fails_at_once(otlp_http: Receiver) -> None:
    otlp_http.answers.append(Answer(http_status=503, retry_after="30"))
    async with observer(otlp_http.url, timeout=5.0) as obs:
        started = time.monotonic()
        complete(obs, 2)
        await counted(obs, failed=2)
        assert time.monotonic() - started < 2.0  # no 30 s wait, nor 5 s: the retry could not happen in time
        assert otlp_http.requests == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_partial_success_counts_the_rejected_spans(
    otlp_http: Receiver, otlp_grpc: Receiver, protocol: str
) -> None:
    receiver = receiver_for(protocol, otlp_http, otlp_grpc)
    receiver.reject = (2, "spans too old")
    async with observer(receiver.url, protocol) as obs:
        complete(obs, 5)
        await counted(obs, exported=3)
        assert (obs.rejected, obs.failed, receiver.requests) == (2, 0, 1)  # not retried


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_flags_tell_a_local_root_from_a_remote_parent(
    otlp_http: Receiver, otlp_grpc: Receiver, protocol: str
) -> None:
    receiver = receiver_for(protocol, otlp_http, otlp_grpc)
    async with observer(receiver.url, protocol) as obs:
        complete(obs, 1)
        complete(obs, 1, traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
        spans = await receiver.wait_spans(2)
    by_parent = {s.parent_span_id: s.span.flags for s in spans}
    assert by_parent == {"": 0x101, CLIENT_SPAN: 0x301}


async def test_lifecycle_start_flush_and_close(otlp_http: Receiver) -> None:
    cfg = Tracing(enabled=True, endpoint=otlp_http.url, sampler="always_on", schedule_delay=30.0, timeout=2.0)
    obs = TracingObserver(cfg, Labels())
    complete(obs, 3)  # before start: they wait in the queue
    assert len(obs.queue) == 3 and obs.recorded == 3
    await obs.start()
    complete(obs, 2)
    await obs.aclose()  # the 30 s schedule delay is not waited for: close flushes
    assert (obs.exported, len(otlp_http.spans)) == (5, 5)
    complete(obs, 1)  # after close: counted, not queued
    assert (obs.dropped_shutdown, len(obs.queue)) == (1, 0)
    assert not any(t.name == "infermon-trace-export" for t in threading.enumerate())


async def test_close_waits_for_a_hung_collector_no_longer_than_the_timeout(otlp_http: Receiver) -> None:
    otlp_http.mode = "hang"
    cfg = Tracing(enabled=True, endpoint=otlp_http.url, sampler="always_on", timeout=0.5, max_export_batch_size=2)
    obs = TracingObserver(cfg, Labels())
    await obs.start()
    complete(obs, 5)
    started = time.monotonic()
    await obs.aclose()
    assert time.monotonic() - started < 0.5 + 1.0  # the collector would hang for 30 s
    assert obs.dropped_shutdown >= 1  # never sent

    async def settled() -> bool:  # the batch that hung ends with its own 0.5 s deadline
        return obs.in_flight == 0

    await wait_until(settled)
    assert obs.exported == 0 and obs.failed + obs.dropped_shutdown == 5  # every span accounted for


async def test_a_full_queue_drops_and_counts(otlp_http: Receiver) -> None:
    otlp_http.mode = "hang"
    async with observer(otlp_http.url, max_queue_size=4, max_export_batch_size=2, timeout=0.5) as obs:
        complete(obs, 2)
        await otlp_http.wait_requests(1)  # the first batch hangs in the export thread
        complete(obs, 10)
        assert (len(obs.queue), obs.dropped_queue_full, obs.recorded) == (4, 6, 6)
        assert dropped(obs)[("queue_full",)] == 6
        otlp_http.unblock()


def dropped(obs: TracingObserver) -> dict[tuple[str, ...], float]:
    (family,) = [m for m in obs.collector().collect() if m.name == "infermon_trace_spans_dropped"]
    return {tuple(s.labels.values()): s.value for s in family.samples if s.name.endswith("_total")}
