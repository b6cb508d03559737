"""GET /gpu: the proxy reads the node agent's /metrics itself. A real ``infermon agent`` on the stub NVML
library, an agent that is down, one that answers too much, too slowly or not Prometheus text."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.admin.gpu import MAX_BYTES, metrics_url, parse_gpus
from proxy.config import load
from proxy.errors import ConfigError
from proxy.settings import ProxyConfig
from tests.agent.conftest import StartAgent, agent_env, start_agent, stub_nvml_dir  # noqa: F401 - fixtures used below
from tests.conftest import ProxyFactory, Serve
from tests.helpers import fetch, free_port, wait_until

GPU0 = "GPU-00000000-0000-0000-0000-000000000000"


async def _gpu(admin: tuple[str, int]) -> dict[str, Any]:
    resp = await fetch(admin, "/gpu")
    assert resp.status == 200, resp  # whatever the agent does, the page's fetch succeeds
    assert resp.header("cache-control") == "no-store"
    report: dict[str, Any] = orjson.loads(resp.body)
    return report


async def test_a_real_agent_on_the_stub_library(
    start_agent: StartAgent, stub_nvml_dir: Path, make_proxy: ProxyFactory, upstream: str  # noqa: F811
) -> None:
    env = agent_env(LD_LIBRARY_PATH=str(stub_nvml_dir), INFERMON_AGENT_HOST__ENABLED="false")
    agent = await start_agent("--interval", "0.1", env=env)
    app = await make_proxy(upstream, status={"agent": agent.url, "interval": 0.1})
    seen: dict[str, Any] = {}

    async def up() -> bool:
        seen.update(await _gpu(app.admin_address))
        return bool(seen.get("up") and seen.get("gpus"))

    await wait_until(up)
    assert seen["enabled"] is True and seen["error"] is None and seen["agent"] == agent.url
    assert seen["collector_up"] is True and seen["devices"] == 2
    gpu0 = next(g for g in seen["gpus"] if g["uuid"] == GPU0)
    assert gpu0["gpu"] == "0" and gpu0["model_name"] == "Stub GPU A" and gpu0["driver_version"] == "550.54.15"
    assert gpu0["utilization"] == 0.75
    assert gpu0["memory_used_bytes"] == 4 * 2**30 and gpu0["memory_total_bytes"] == 16 * 2**30
    assert gpu0["power_watts"] == 250.5 and gpu0["sm_clock_hz"] == 1410e6
    assert [g["gpu"] for g in seen["gpus"]] == ["0", "1"]
    assert await agent.stop() == 0


async def test_no_agent_configured_says_off(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    report = await _gpu(app.admin_address)
    assert report["enabled"] is False and "status.agent" in report["reason"]


async def test_an_agent_that_is_down_is_reported_and_logged_once(
    make_proxy: ProxyFactory, upstream: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="infermon.admin.gpu")
    port = free_port()
    app = await make_proxy(upstream, status={"agent": f"http://127.0.0.1:{port}", "interval": 0.1})
    stamps: set[float] = set()

    async def three_fetches() -> bool:
        report = await _gpu(app.admin_address)
        assert report["enabled"] is True and report["up"] is False and report["gpus"] == []
        assert report["error"].startswith("cannot connect"), report["error"]
        stamps.add(report["fetched_at"])
        return len(stamps) >= 3

    await wait_until(three_fetches)
    warnings = [r for r in caplog.records if r.name == "infermon.admin.gpu"]
    assert len(warnings) == 1 and "cannot be read" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"x" * (MAX_BYTES + 1), 200, "over the"),
        (b"ok", 500, "the agent answered 500"),
        (b"infermon_gpu_devices{{{ 1\n", 200, "does not parse"),
        (b"\xff\xfe", 200, "not UTF-8"),
    ],
)
async def test_an_agent_answering_wrong(
    make_proxy: ProxyFactory, upstream: str, serve: Serve, body: bytes, status: int, error: str
) -> None:
    async def metrics(request: web.Request) -> web.StreamResponse:
        if len(body) > MAX_BYTES:  # no Content-Length: the cap has to stop the read itself
            response = web.StreamResponse()
            await response.prepare(request)
            for i in range(0, len(body), 1 << 20):
                await response.write(body[i : i + (1 << 20)])
            await response.write_eof()
            return response
        return web.Response(body=body, status=status, content_type="text/plain")

    agent = web.Application()
    agent.router.add_get("/metrics", metrics)
    url = await serve(agent)
    app = await make_proxy(upstream, status={"agent": url})
    report = await _gpu(app.admin_address)
    assert report["up"] is False and error in report["error"], report


async def test_a_slow_agent_times_out(make_proxy: ProxyFactory, upstream: str, serve: Serve) -> None:
    release = asyncio.Event()

    async def metrics(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="")

    agent = web.Application()
    agent.router.add_get("/custom/path", metrics)
    url = await serve(agent)
    app = await make_proxy(upstream, status={"agent": url + "/custom/path", "agent_timeout": 0.2})
    try:
        async with asyncio.timeout(5):
            report = await _gpu(app.admin_address)
    finally:
        release.set()
    assert report["up"] is False and "in time" in report["error"]


def test_metrics_url() -> None:
    assert metrics_url("http://n:9465") == "http://n:9465/metrics"
    assert metrics_url("http://n:9465/") == "http://n:9465/metrics"
    assert metrics_url("http://n:9465/agent/metrics") == "http://n:9465/agent/metrics"


def test_parse_skips_what_it_does_not_show() -> None:
    text = (
        'infermon_gpu_collector_up{reason="library_not_found"} 0\n'
        "infermon_gpu_devices 0\n"
        'node_cpu_seconds_total{cpu="0",mode="idle"} 5\n'
    )
    parsed = parse_gpus(text)
    assert parsed == {"collector_up": False, "collector_reason": "library_not_found", "devices": 0.0, "gpus": []}


@pytest.mark.parametrize("value", ["node:9465", "ftp://node:9465", "http://:9465", "http://node:99999", "http://n:1/?a"])
def test_a_bad_agent_address_is_a_config_error_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(ProxyConfig, env={"INFERMON_STATUS__AGENT": value}, ignore_env_prefixes=("INFERMON_AGENT_",))
    assert "status.agent" in str(info.value)


def test_the_agent_password_is_masked_in_config() -> None:
    cfg = ProxyConfig.model_validate({"status": {"agent": "http://u:secret@node:9465"}})
    assert "secret" not in orjson.dumps(cfg.public_dict()).decode()
