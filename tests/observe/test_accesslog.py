"""Access logs: JSON lines with every field, sampling, drops, and secrets kept out of every output."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from proxy.app import ProxyApp
from proxy.dataplane.exchange import Exchange
from proxy.observe.accesslog import FIELDS, AccessLog, rfc3339
from proxy.observe.traceparent import parse_traceparent
from proxy.settings import AccessLog as AccessLogConfig
from proxy.settings import Labels
from tests.conftest import ProxyFactory
from tests.helpers import Client, free_port, metric, scrape, scrape_metrics
from tests.observe.test_tracing import tracing
from tests.otlp import Receiver

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def flushed(app: ProxyApp) -> None:
    """Stop the writer: everything queued is written (ProxyApp.shutdown does the same)."""
    assert app.access_log is not None
    await app.access_log.aclose()


async def test_one_json_line_per_request_with_every_field(
    make_proxy: ProxyFactory, upstream: str, tmp_path: Path
) -> None:
    log = tmp_path / "access.jsonl"
    app = await make_proxy(
        upstream,
        labels={"model": "iris", "version": "v3"},
        access_log={"enabled": True, "path": str(log)},
        **tracing(None, sampler="always_on", endpoint=f"http://127.0.0.1:{free_port()}"),
    )
    client = await Client.connect(app.proxy_address)
    resp = await client.request(
        "POST", "/echo/predict?token=abc", headers={"User-Agent": "bench/2", "X-Request-Id": "req-1"}, body=b"{}"
    )
    assert resp.status == 200
    assert (await client.request("GET", "/status/500")).status == 500
    await flushed(app)
    first, second = read_lines(log)
    assert list(first) == list(FIELDS)
    sent = parse_traceparent(dict((k.lower(), v) for k, v in resp.json()["headers"])["traceparent"].encode())  # type: ignore[index]
    assert sent is not None
    assert first["request_id"] == "req-1"
    assert (first["trace_id"], first["span_id"]) == (sent.trace_id, sent.span_id)
    assert (first["model"], first["version"], first["variant"]) == ("iris", "v3", "stable")
    assert (first["method"], first["path"], first["status"]) == ("POST", "/echo/predict", 200)
    assert first["bytes_in"] == 2 and first["bytes_out"] == len(resp.body)
    assert first["client_ip"] == "127.0.0.1"
    assert first["user_agent"] == "bench/2"
    assert first["error"] is None
    assert 0 < first["ttfb_ms"] <= first["duration_ms"]
    assert 0 < first["upstream_ms"] <= first["duration_ms"]
    assert RFC3339_MS.match(first["timestamp"])
    started = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - started).total_seconds()) < 60
    assert second["status"] == 500 and second["path"] == "/status/500"


async def test_errors_always_successes_sampled(make_proxy: ProxyFactory, upstream: str, tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    app = await make_proxy(upstream, access_log={"enabled": True, "path": str(log), "success_ratio": 0.0})
    client = await Client.connect(app.proxy_address)
    for _ in range(10):
        assert (await client.request("GET", "/echo/ok")).status == 200
    assert (await client.request("GET", "/status/404")).status == 404
    assert (await client.request("GET", "/status/502")).status == 502
    down = await make_proxy(
        f"http://127.0.0.1:{free_port()}", access_log={"enabled": True, "path": str(log), "success_ratio": 0.0}
    )
    dclient = await Client.connect(down.proxy_address)
    assert (await dclient.request("GET", "/x")).status == 502
    await flushed(app)
    await flushed(down)
    lines = read_lines(log)
    assert sorted((line["status"], str(line["error"])) for line in lines) == [(502, "None"), (502, "connect")]


async def test_client_abort_is_logged_as_499(make_proxy: ProxyFactory, upstream: str, tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    app = await make_proxy(upstream, access_log={"enabled": True, "path": str(log), "success_ratio": 0.0})
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET /slow?delay=5 HTTP/1.1\r\nHost: t\r\n\r\n")

    async def in_flight() -> bool:
        return app.plane is not None and app.plane.in_flight == 1

    from tests.helpers import wait_until

    await wait_until(in_flight)
    await client.close()

    async def done() -> bool:
        return app.plane is not None and app.plane.in_flight == 0

    await wait_until(done)
    await flushed(app)
    (line,) = read_lines(log)
    assert (line["status"], line["error"]) == (499, "client_abort")


def test_a_full_queue_drops_and_counts() -> None:
    out = io.BytesIO()
    cfg = AccessLogConfig(enabled=True, max_queue_size=3, flush_interval=60.0)
    obs = AccessLog(cfg, Labels(), stream=out)
    try:
        for i in range(5):
            ex = Exchange(1.0, "10.0.0.1")
            ex.request_id = f"r{i}"
            ex.method, ex.path, ex.status, ex.t_done = "GET", "/", 200, 1.5
            obs.on_complete(ex)
        assert obs.dropped == 2
    finally:
        obs.close()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["r0", "r1", "r2"]
    assert lines[0]["duration_ms"] == 500.0
    assert lines[0]["upstream_ms"] is None and lines[0]["trace_id"] is None
    assert obs.written == 3


def test_rfc3339() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1764087759.1239) == "2025-11-25T16:22:39.123Z"


async def test_secrets_appear_nowhere(
    make_proxy: ProxyFactory, upstream: str, otlp_http: Receiver, tmp_path: Path
) -> None:
    log = tmp_path / "a.jsonl"
    secrets = {
        "Authorization": "Bearer s3cr3t-bearer-value",
        "Cookie": "session=s3cr3t-cookie-value",
        "X-Api-Key": "s3cr3t-api-key-value",
        "User-Agent": "s3cr3t-ua-value",
    }
    app = await make_proxy(
        upstream,
        access_log={"enabled": True, "path": str(log), "redact_headers": ["X-Api-Key", "User-Agent"]},
        **tracing(otlp_http),
    )
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/respond-headers?Set-Cookie=s3cr3t-set-cookie-value", headers=secrets)
    assert resp.status == 200
    await otlp_http.wait_spans(1)
    await flushed(app)
    _, plain = await scrape(app.admin_address)
    _, om = await scrape(app.admin_address, accept="application/openmetrics-text; version=1.0.0")
    outputs = {"log": log.read_bytes(), "spans": b"".join(otlp_http.raw), "metrics": (plain + om).encode()}
    for where, data in outputs.items():
        assert b"s3cr3t" not in data, where
    (line,) = read_lines(log)
    assert line["user_agent"] is None  # redacted by configuration
    assert "user_agent.original" not in otlp_http.spans[0].attributes
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_access_log_lines_total") == 1
    assert metric(m, "infermon_access_log_dropped_total") == 0


def test_stdout_is_the_default_target(capfd: Any) -> None:
    obs = AccessLog(AccessLogConfig(enabled=True, flush_interval=60.0), Labels())
    ex = Exchange(1.0, "10.0.0.1")
    ex.request_id, ex.method, ex.path, ex.status, ex.t_done = "to-stdout", "GET", "/", 200, 1.25
    obs.on_complete(ex)
    obs.close()
    out = capfd.readouterr().out
    assert orjson.loads(out.strip())["request_id"] == "to-stdout"


async def test_the_real_command_logs_and_traces_from_its_environment(
    spawn_proxy: Any, upstream: str, otlp_http: Receiver, tmp_path: Path
) -> None:
    """``infermon proxy`` configured by INFERMON_* and OTEL_* variables; SIGTERM flushes the log."""
    import asyncio
    import signal

    log = tmp_path / "access.jsonl"
    env = {
        "INFERMON_ACCESS_LOG__ENABLED": "true",
        "INFERMON_ACCESS_LOG__PATH": str(log),
        "INFERMON_ACCESS_LOG__FLUSH_INTERVAL": "60",  # only shutdown writes: proves the final flush
        "INFERMON_TRACING__ENABLED": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_http.url,
        "OTEL_BSP_SCHEDULE_DELAY": "20",
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    proc = await spawn_proxy(upstream, env=env)
    client = await Client.connect(proc.listen)
    for _ in range(3):
        assert (await client.request("GET", "/echo/cli")).status == 200
    await client.close()
    spans = await otlp_http.wait_spans(3)
    assert {s.resource["service.name"] for s in spans} == {"from-env"}
    proc.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        assert await proc.proc.wait() == 0
    lines = read_lines(log)
    assert [line["path"] for line in lines] == ["/echo/cli"] * 3
    assert {line["trace_id"] for line in lines} == {s.trace_id for s in spans}


def test_unwritable_path_is_a_config_error(tmp_path: Path) -> None:
    import pytest

    from proxy.errors import ConfigError

    cfg = AccessLogConfig.model_validate({"enabled": True, "path": str(tmp_path / "missing" / "access.log")})
    with pytest.raises(ConfigError, match=r"access_log\.path = .*cannot open it for appending"):
        AccessLog(cfg, Labels())
