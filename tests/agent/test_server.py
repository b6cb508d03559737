"""The agent's aiohttp app on a real socket: content negotiation and /healthz."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.agent.config import NvmlSettings
from proxy.agent.fake import FakeGpu, FakeNvml
from proxy.agent.gpu import GpuCollector
from proxy.agent.server import build_app
from proxy.agent.worker import Worker
from tests.agent.conftest import TIMEOUT, find, parse

Get = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
async def served() -> AsyncIterator[tuple[Get, Worker]]:
    collector = GpuCollector(NvmlSettings(xid_events=False), "node-1", nvml=FakeNvml([FakeGpu(uuid="GPU-a")]))
    registry = CollectorRegistry()
    registry.register(collector)
    worker = Worker([collector], interval=60)
    worker.run_once()
    runner = web.AppRunner(build_app(registry, worker))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]

    async def get(path: str, accept: str | None = None) -> tuple[int, str, str]:
        headers = {"Accept": accept} if accept else {}
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
            session.get(f"http://{host}:{port}{path}", headers=headers) as resp,
        ):
            return resp.status, resp.headers["Content-Type"], await resp.text()

    yield get, worker
    worker.stop()
    await runner.cleanup()


async def test_prometheus_text_by_default(served: tuple[Get, Worker]) -> None:
    get, _ = served
    status, content_type, body = await get("/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert find(parse(body), "infermon_gpu_utilization_ratio", uuid="GPU-a") == [0.5]


async def test_openmetrics_when_asked(served: tuple[Get, Worker]) -> None:
    get, _ = served
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, content_type, body = await get("/metrics", accept=accept)
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert "# TYPE infermon_gpu_energy_joules counter" in body
    assert body.endswith("# EOF\n")


async def test_healthz_follows_the_collection_thread(served: tuple[Get, Worker]) -> None:
    get, worker = served
    assert (await get("/healthz"))[0] == 503  # not started
    worker.start()
    status, _, body = await get("/healthz")
    assert (status, body) == (200, "ok\n")
    worker.stop()
    assert (await get("/healthz"))[0] == 503
