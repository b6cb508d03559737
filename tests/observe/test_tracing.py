"""Tracing end to end: a real upstream, the proxy, and real OTLP receivers (HTTP/protobuf and gRPC)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from proxy.app import ProxyApp
from proxy.observe.traceparent import parse_b3_single, parse_traceparent
from tests.conftest import ProxyFactory
from tests.helpers import Client, free_port, metric, scrape, scrape_metrics, wait_until
from tests.observe.test_traceparent import MALFORMED
from tests.otlp import Receiver

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
    await app.tracing.aclose(2.0)  # type: ignore[union-attr]
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
    await app.tracing.aclose(2.0)  # type: ignore[union-attr]
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
    await app.tracing.aclose(0.5)  # type: ignore[union-attr]
    assert time.perf_counter() - t < 2.0  # shutdown does not wait on the collector either


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
