"""The admin server over real sockets: /healthz, /readyz (with a real upstream probe), /config, /metrics."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy.app import ProxyApp
from proxy.dataplane.upstream import UpstreamPool
from proxy.readiness import Readiness, UpstreamProbe
from proxy.settings import ProxyConfig
from proxy.settings import Readiness as ReadinessSettings
from proxy.settings import Upstream as UpstreamSettings
from tests.conftest import ProxyFactory, Serve
from tests.helpers import TIMEOUT, Client, RawUpstream, bound_socket, fetch, read_request_head, scrape, wait_until

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def _json(body: bytes) -> dict[str, object]:
    data = orjson.loads(body)
    assert isinstance(data, dict)
    return data


async def readyz(app: ProxyApp) -> tuple[int, dict[str, object]]:
    resp = await fetch(app.admin_address, "/readyz")
    assert resp.header("content-type") == "application/json"
    return resp.status, _json(resp.body)


async def wait_ready(app: ProxyApp, status: int) -> dict[str, object]:
    """Poll /readyz until it answers ``status`` after a real probe; returns the body."""
    seen: dict[str, object] = {}

    async def check() -> bool:
        code, body = await readyz(app)
        seen.clear()
        seen.update(body)
        gates = body["gates"]
        assert isinstance(gates, dict)
        return code == status and gates["upstream"]["reason"] != "not probed yet"

    await wait_until(check)
    return seen


def upstream_reason(body: dict[str, object]) -> str:
    gates = body["gates"]
    assert isinstance(gates, dict)
    reason = gates["upstream"]["reason"]
    assert isinstance(reason, str)
    return reason


# -- /healthz ---------------------------------------------------------------------------------


async def test_healthz(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    resp = await fetch(app.admin_address, "/healthz")
    assert resp.status == 200
    assert resp.header("content-type") == "application/json"
    assert _json(resp.body) == {"status": "ok"}


async def test_healthz_is_ok_even_when_the_upstream_is_down(make_proxy: ProxyFactory) -> None:
    sock = bound_socket()  # bound, never listening: connections are refused
    app = await make_proxy(f"http://127.0.0.1:{sock.getsockname()[1]}")
    await wait_ready(app, 503)
    assert (await fetch(app.admin_address, "/healthz")).status == 200
    sock.close()


# -- /readyz ----------------------------------------------------------------------------------


async def test_readyz_true_with_a_reachable_upstream(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    body = await wait_ready(app, 200)
    assert body == {
        "ready": True,
        "gates": {
            "draining": {"ok": True, "reason": "serving"},
            "upstream": {"ok": True, "reason": "tcp connect ok"},
        },
    }


async def test_readyz_false_while_upstream_down_then_recovers(make_proxy: ProxyFactory) -> None:
    sock = bound_socket()
    app = await make_proxy(f"http://127.0.0.1:{sock.getsockname()[1]}")
    body = await wait_ready(app, 503)
    assert body["ready"] is False
    assert "refused" in upstream_reason(body).lower()

    runner = web.AppRunner(web.Application(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()  # the same port starts listening
        body = await wait_ready(app, 200)
        assert body["ready"] is True
        assert upstream_reason(body) == "tcp connect ok"
    finally:
        await runner.cleanup()


async def test_readyz_path_probe_non_2xx_then_recovers(make_proxy: ProxyFactory, serve: Serve) -> None:
    state = {"status": 503}
    seen: list[str] = []

    async def health(request: web.Request) -> web.Response:
        seen.append(request.headers.get("User-Agent", ""))
        return web.Response(status=state["status"], text="health")

    model = web.Application()
    model.router.add_get("/v2/health/ready", health)
    url = await serve(model)
    app = await make_proxy(url, readiness={"path": "/v2/health/ready", "interval": 0.05})

    body = await wait_ready(app, 503)
    assert upstream_reason(body) == "GET /v2/health/ready -> HTTP/1.1 503 Service Unavailable"
    assert seen[0] == "infermon-readiness"

    state["status"] = 204
    body = await wait_ready(app, 200)
    assert upstream_reason(body) == "GET /v2/health/ready -> 204"

    state["status"] = 404
    body = await wait_ready(app, 503)
    assert upstream_reason(body) == "GET /v2/health/ready -> HTTP/1.1 404 Not Found"


async def test_readyz_path_probe_timeout(
    make_proxy: ProxyFactory, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers; ends when the probe gives up and closes

    up = await raw_upstream(silent)
    app = await make_proxy(up.url, readiness={"path": "/ready", "timeout": 0.1, "interval": 0.05})
    body = await wait_ready(app, 503)
    assert upstream_reason(body) == "no answer within 0.1 s"


# -- /config ----------------------------------------------------------------------------------


async def test_config_shows_effective_config_with_password_masked(make_proxy: ProxyFactory, upstream: str) -> None:
    port = upstream.rsplit(":", 1)[1]
    app = await make_proxy(f"http://model:s3cret@127.0.0.1:{port}", limits={"max_in_flight": 17})
    resp = await fetch(app.admin_address, "/config")
    assert resp.status == 200
    assert resp.header("content-type") == "application/json"
    assert b"s3cret" not in resp.body
    data = _json(resp.body)
    assert data["upstream"] == f"http://model:***@127.0.0.1:{port}"
    limits = data["limits"]
    assert isinstance(limits, dict)
    assert limits["max_in_flight"] == 17  # the override
    assert limits["max_connections"] == 10_000  # and the defaults around it
    readiness = data["readiness"]
    assert isinstance(readiness, dict)
    assert readiness["interval"] == 0.2
    assert set(data) >= {"listen", "admin", "labels", "metrics", "drain", "upstream_pool"}


# -- /metrics ---------------------------------------------------------------------------------


async def test_metrics_text_format_by_default(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/echo")).status == 200
    await client.close()

    content_type, text = await scrape(app.admin_address)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "# EOF" not in text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"infermon_requests", "infermon_request_duration_seconds", "process_cpu_seconds"} <= names


async def test_metrics_openmetrics_by_accept(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/echo")).status == 200
    await client.close()

    content_type, text = await scrape(app.admin_address, accept=OPENMETRICS)
    assert content_type.startswith(OPENMETRICS)
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]  # strict
    requests = families["infermon_requests"]
    assert requests.type == "counter"
    assert [s.value for s in requests.samples if s.name == "infermon_requests_total"] == [1.0]
    assert families["infermon_request_duration_seconds"].type == "histogram"
    assert families["infermon_build"].type == "info"


async def test_metrics_prometheus_style_accept_header(make_proxy: ProxyFactory, upstream: str) -> None:
    """What Prometheus itself sends: OpenMetrics is preferred when listed."""
    app = await make_proxy(upstream)
    accept = f"{OPENMETRICS};q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=0.0.4;q=0.4"
    content_type, text = await scrape(app.admin_address, accept=accept)
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")


async def test_metrics_gzip(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    resp = await fetch(app.admin_address, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert resp.status == 200
    assert resp.header("content-encoding") == "gzip"
    assert b"infermon_build_info" in gzip.decompress(resp.body)


async def test_metrics_gzip_openmetrics(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    headers = {"Accept-Encoding": "gzip, deflate", "Accept": OPENMETRICS}
    resp = await fetch(app.admin_address, "/metrics", headers=headers)
    assert resp.status == 200
    assert (resp.header("content-encoding"), resp.header("vary")) == ("gzip", "Accept-Encoding")
    assert (resp.header("content-type") or "").startswith(OPENMETRICS)
    text = gzip.decompress(resp.body).decode()
    assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    assert {f.name for f in openmetrics_families(text)} >= {"infermon_requests", "process_cpu_seconds"}  # type: ignore[no-untyped-call]


async def test_metrics_head_has_the_length_and_no_body(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.admin_address)
    head = await client.request("HEAD", "/metrics")
    get = await client.request("GET", "/metrics")  # the same connection: nothing was left unread
    await client.close()
    assert (head.status, head.body) == (200, b"")
    assert int(head.header("content-length") or 0) > 1000
    assert get.status == 200 and b"infermon_build_info" in get.body


async def test_concurrent_scrapes_all_get_a_whole_exposition(make_proxy: ProxyFactory, upstream: str) -> None:
    """Scrapes that arrive while one of the same format is written share its result; every one of them
    gets a complete, parseable body."""
    app = await make_proxy(upstream)
    accepts = [None, OPENMETRICS] * 4
    results = await asyncio.gather(*(scrape(app.admin_address, accept=a) for a in accepts))
    for accept, (content_type, text) in zip(accepts, results, strict=True):
        if accept is None:
            assert content_type.startswith("text/plain; version=0.0.4")
            assert "infermon_build_info" in {f.name for f in text_string_to_metric_families(text)}
        else:
            assert content_type.startswith(OPENMETRICS)
            assert "infermon_build" in {f.name for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]


# -- errors -----------------------------------------------------------------------------------


async def test_unknown_path_is_404_json(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    resp = await fetch(app.admin_address, "/nope")
    assert resp.status == 404
    assert resp.header("content-type") == "application/json"
    assert _json(resp.body) == {"error": "Not Found", "path": "/nope"}


async def test_wrong_method_is_405_json(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    resp = await fetch(app.admin_address, "/metrics", method="DELETE")
    assert resp.status == 405
    assert resp.header("content-type") == "application/json"
    assert _json(resp.body) == {"error": "Method Not Allowed", "path": "/metrics"}


async def test_index_lists_endpoints(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    resp = await fetch(app.admin_address, "/")
    assert resp.status == 200
    endpoints = [
        "/config", "/drift", "/feedback", "/gpu", "/healthz", "/metrics", "/quality", "/readyz", "/status",
        "/timeseries",
    ]  # fmt: skip
    assert _json(resp.body) == {"endpoints": endpoints}
    assert resp.header("vary") == "Accept"


async def test_readyz_false_during_drain_delay(upstream: str) -> None:
    """On shutdown /readyz turns false first, while the admin server still answers."""
    cfg = ProxyConfig.model_validate(
        {"upstream": upstream, "readiness": {"interval": 0.05}, "drain": {"delay": 0.3, "timeout": 1.0}}
    )
    app = ProxyApp(cfg)
    await app.start(listen=bound_socket(), admin=bound_socket())
    await wait_ready(app, 200)
    stopping = asyncio.create_task(app.shutdown())
    try:
        status, body = await readyz(app)
        assert status == 503
        assert body["gates"] == {
            "draining": {"ok": False, "reason": "shutting down"},
            "upstream": {"ok": True, "reason": "tcp connect ok"},
        }
    finally:
        await asyncio.wait_for(stopping, 5)


async def test_readyz_survives_an_upstream_that_answers_nonsense(
    make_proxy: ProxyFactory, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """A status line longer than the reader's limit fails that probe; probing goes on and recovers."""
    answers = [b"x" * 200_000] * 3  # for the first three probes

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(answers.pop() if answers else b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    up = await raw_upstream(handler)
    app = await make_proxy(up.url, readiness={"path": "/ready", "interval": 0.05})
    body = await wait_ready(app, 503)
    assert upstream_reason(body) == "GET /ready -> status line too long"
    body = await wait_ready(app, 200)
    assert upstream_reason(body) == "GET /ready -> 200"


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    return cert, key


def _pool(url: str, tls: ssl.SSLContext | None = None) -> UpstreamPool:
    pool = UpstreamPool(asyncio.get_running_loop(), "stable", url, UpstreamSettings())
    if tls is not None:
        pool.ssl = tls
    return pool


async def test_probe_speaks_tls_to_an_https_upstream(serve: Serve, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    model = web.Application()
    model.router.add_get("/ready", ready)
    runner = web.AppRunner(model, access_log=None, handle_signals=False)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock, ssl_context=server_tls).start()
    port = sock.getsockname()[1]
    try:
        cfg = ReadinessSettings(path="/ready", timeout=2.0)
        client_tls = ssl.create_default_context(cafile=str(cert))
        probe = UpstreamProbe(Readiness(), _pool(f"https://127.0.0.1:{port}", client_tls), cfg)
        assert await probe.check() == (True, "GET /ready -> 200")

        untrusted = UpstreamProbe(Readiness(), _pool(f"https://127.0.0.1:{port}"), cfg)  # system CAs only
        ok, reason = await untrusted.check()
        assert not ok
        assert "certificate verify failed" in reason

        plain = UpstreamProbe(Readiness(), _pool(f"http://127.0.0.1:{port}"), cfg)  # plain HTTP to a TLS port
        assert (await plain.check())[0] is False
    finally:
        await runner.cleanup()


async def test_failing_collector_is_a_json_500_and_logged(
    make_proxy: ProxyFactory, upstream: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Collector):
        def collect(self) -> Iterator[Metric]:
            raise RuntimeError("sensor gone")

    app = await make_proxy(upstream)
    broken = Broken()
    app.registry.register(broken)
    resp = await fetch(app.admin_address, "/metrics")
    assert resp.status == 500
    assert resp.header("content-type") == "application/json"
    body = _json(resp.body)
    assert body["path"] == "/metrics"
    assert "sensor gone" in str(body["error"])
    assert any("sensor gone" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)

    app.registry.unregister(broken)  # and the next scrape is fine again
    assert (await fetch(app.admin_address, "/metrics")).status == 200


# -- the admin token on state-changing endpoints -----------------------------------------------------

ADMIN_TOKEN = "s3cr3t-t0ken-0123456789"


async def _admin_request(
    addr: tuple[str, int], method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object], str | None]:
    client = await Client.connect(addr)
    resp = await client.request(method, path, headers=headers, body=b"{}" if method != "GET" else b"")
    await client.close()
    return resp.status, _json(resp.body), resp.header("www-authenticate")


async def test_state_changing_endpoints_take_the_bearer_token(make_proxy: ProxyFactory, upstream: str) -> None:
    from proxy.admin.server import add_state_route

    changes: list[str] = []

    async def change(request: web.Request) -> web.Response:
        changes.append(request.method)
        return web.json_response({"changed": True})

    cfg = ProxyConfig.model_validate({"upstream": upstream, "admin": {"token": ADMIN_TOKEN}})
    app = ProxyApp(cfg)
    add_state_route(app.admin_app, "PUT", "/change", change)  # before start, as capabilities do
    await app.start(listen=bound_socket(), admin=bound_socket())
    try:
        addr = app.admin_address
        status, body, challenge = await _admin_request(addr, "PUT", "/change")
        assert status == 401 and "Bearer" in str(body["error"]) and challenge == 'Bearer realm="infermon-admin"'
        status, _, challenge = await _admin_request(
            addr, "PUT", "/change", {"Authorization": "Bearer wrong-token-0123456"}
        )
        assert status == 401 and challenge == 'Bearer realm="infermon-admin", error="invalid_token"'
        status, _, _ = await _admin_request(addr, "PUT", "/change", {"Authorization": "Bearer \xff\xfe"})
        assert status == 401  # bytes that are not UTF-8: a wrong token, not a 500
        status, _, _ = await _admin_request(addr, "PUT", "/change", {"Authorization": f"Basic {ADMIN_TOKEN}"})
        assert status == 401
        assert changes == []
        status, body, _ = await _admin_request(addr, "PUT", "/change", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 200 and body == {"changed": True} and changes == ["PUT"]
        # read-only endpoints never ask for it, and /config masks it
        for path in ("/healthz", "/config"):
            status, body, _ = await _admin_request(addr, "GET", path)
            assert status == 200, path
        assert body["admin"] == {"listen": "0.0.0.0:9464", "token": "***", "token_file": None}
        assert (await fetch(addr, "/metrics")).status == 200
        assert ADMIN_TOKEN not in (await fetch(addr, "/config")).body.decode()
    finally:
        await app.shutdown()


async def test_without_a_token_state_routes_are_open(upstream: str) -> None:
    from proxy.admin.server import add_state_route, build_admin_app

    async def change(request: web.Request) -> web.Response:
        return web.json_response({"changed": True})

    admin_app = build_admin_app(ProxyApp(ProxyConfig(upstream=upstream)).registry, Readiness(), dict)
    add_state_route(admin_app, "POST", "/change", change)
    runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    try:
        status, body, _ = await _admin_request(sock.getsockname(), "POST", "/change")
        assert (status, body) == (200, {"changed": True})
    finally:
        await runner.cleanup()
