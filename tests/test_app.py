"""ProxyApp wiring: the observer lifecycle and the readiness probes' logging."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.app import ProxyApp
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.settings import ProxyConfig
from tests.conftest import upstream_app
from tests.helpers import TIMEOUT, Client, bound_socket, free_port, metric, scrape_metrics, wait_until


class Lifecycle(Observer, Collector):
    name = "lifecycle"

    def __init__(self, fail_start: bool = False) -> None:
        self.events: list[str] = []
        self.fail_start = fail_start
        self.requests = 0

    async def start(self) -> None:
        self.events.append("start")
        if self.fail_start:
            raise RuntimeError("cannot start")

    async def aclose(self) -> None:
        self.events.append("aclose")

    def collector(self) -> Collector:
        return self

    def on_complete(self, ex: Exchange) -> None:
        self.requests += 1

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("test_lifecycle_requests", "Requests this observer saw.", value=self.requests)


def _cfg(upstream: str, **extra: object) -> ProxyConfig:
    return ProxyConfig.model_validate({"upstream": upstream, "readiness": {"interval": 0.05}, **extra})


async def test_every_observer_gets_start_collector_and_aclose(upstream: str) -> None:
    passed_in = Lifecycle()
    app = ProxyApp(_cfg(upstream), observers=(passed_in,))
    await app.start(listen=bound_socket(), admin=bound_socket())
    try:
        assert passed_in.events == ["start"]
        client = await Client.connect(app.proxy_address)
        assert (await client.request("GET", "/echo")).status == 200
        await client.close()
        assert metric(await scrape_metrics(app.admin_address), "test_lifecycle_requests_total") == 1
    finally:
        await app.shutdown()
    assert passed_in.events == ["start", "aclose"]


async def test_a_failing_observer_start_is_logged_not_fatal(upstream: str, caplog: pytest.LogCaptureFixture) -> None:
    broken = Lifecycle(fail_start=True)
    app = ProxyApp(_cfg(upstream), observers=(broken,))
    await app.start(listen=bound_socket(), admin=bound_socket())
    try:
        client = await Client.connect(app.proxy_address)
        assert (await client.request("GET", "/echo")).status == 200
        await client.close()
    finally:
        await app.shutdown()
    assert any("observer lifecycle failed to start" in r.getMessage() for r in caplog.records)
    assert broken.events == ["start", "aclose"]


async def test_dead_upstream_is_logged_once_with_the_reason_and_again_when_it_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="infermon.readiness")
    port = free_port()
    app = ProxyApp(_cfg(f"http://127.0.0.1:{port}"))
    await app.start(listen=bound_socket(), admin=bound_socket())
    runner: web.AppRunner | None = None
    try:
        probe = app.probe
        assert probe is not None

        async def probed_a_few_times() -> bool:
            return probe.rounds >= 5  # several failed rounds: still one line

        await wait_until(probed_a_few_times)
        assert probe.healthy is False
        down = [r for r in caplog.records if "not ready" in r.getMessage()]
        assert len(down) == 1
        assert down[0].levelno == logging.WARNING
        assert "refused" in down[0].getMessage().lower()
        assert f"127.0.0.1:{port}" in down[0].getMessage()

        runner = web.AppRunner(upstream_app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

        async def recovered() -> bool:
            return probe.healthy is True

        await wait_until(recovered, timeout=TIMEOUT)
        up = [r for r in caplog.records if "ready again" in r.getMessage()]
        assert len(up) == 1 and up[0].levelno == logging.WARNING
    finally:
        await app.shutdown()
        if runner is not None:
            await runner.cleanup()


async def test_unresolvable_upstream_is_logged_with_the_dns_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="infermon.readiness")
    app = ProxyApp(_cfg("http://no-such-host.invalid:8000"))
    await app.start(listen=bound_socket(), admin=bound_socket())
    try:
        probe = app.probe
        assert probe is not None

        async def failed() -> bool:
            return probe.healthy is False

        await wait_until(failed)
        lines = [r.getMessage() for r in caplog.records if "not ready" in r.getMessage()]
        assert len(lines) == 1 and "no-such-host.invalid" in lines[0]
        reason = app.readiness.gates["upstream"][1]
        assert reason in lines[0] and reason != "tcp connect ok"
    finally:
        await app.shutdown()
