"""SIGTERM / SIGINT: stop accepting, /readyz false, in-flight requests finish, exit 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import pytest

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from tests.conftest import ProxyFactory, ProxyProcess
from tests.helpers import TIMEOUT, Client, build_request, wait_until

SpawnProxy = Callable[..., Awaitable[ProxyProcess]]


async def readyz(proxy: ProxyProcess) -> int:
    client = await Client.connect(proxy.admin)
    resp = await client.request("GET", "/readyz")
    await client.close()
    return resp.status


async def _ready(proxy: ProxyProcess) -> bool:
    return await readyz(proxy) == 200


async def _not_ready(proxy: ProxyProcess) -> bool:
    return await readyz(proxy) == 503


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_drain_finishes_in_flight_requests_then_exits_0(
    spawn_proxy: SpawnProxy, upstream: str, sig: signal.Signals
) -> None:
    proxy = await spawn_proxy(upstream, env={"INFERMON_DRAIN__DELAY": "0.5", "INFERMON_DRAIN__TIMEOUT": "10"})
    await wait_until(lambda: _ready(proxy))  # the upstream probe has seen the model server
    busy = await Client.connect(proxy.listen)
    await busy.send(build_request("GET", "/slow?delay=1.5"))
    idle = await Client.connect(proxy.listen)
    assert (await idle.request("GET", "/echo")).status == 200
    await asyncio.sleep(0.2)  # the slow request is now in flight upstream
    proxy.proc.send_signal(sig)
    # during drain.delay: readiness is false, but the proxy still serves
    await wait_until(lambda: _not_ready(proxy))
    resp = await busy.response()
    assert resp.status == 200
    assert resp.header("connection") == "close"  # told not to come back on this connection
    assert await idle.closed()  # idle keep-alive connections are closed
    async with asyncio.timeout(TIMEOUT):
        code = await proxy.proc.wait()
    assert code == 0
    with pytest.raises(ConnectionRefusedError):
        await Client.connect(proxy.listen)


async def test_drain_timeout_cuts_what_is_left_and_exits_0(spawn_proxy: SpawnProxy, upstream: str) -> None:
    proxy = await spawn_proxy(upstream, env={"INFERMON_DRAIN__TIMEOUT": "0.3"})
    busy = await Client.connect(proxy.listen)
    await busy.send(build_request("GET", "/slow?delay=30"))
    await asyncio.sleep(0.2)
    proxy.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(TIMEOUT):
        code = await proxy.proc.wait()
    assert code == 0
    assert proxy.proc.stderr is not None
    err = (await proxy.proc.stderr.read()).decode()
    assert "1 requests in flight" in err
    with pytest.raises(ConnectionError):
        await busy.response()


async def test_requests_cut_at_the_drain_timeout_are_not_client_aborts(make_proxy: ProxyFactory, upstream: str) -> None:
    from prometheus_client.exposition import generate_latest

    from tests.helpers import metric, parse_metrics

    seen = Recorder()
    app = await make_proxy(upstream, drain={"timeout": 0.2}, observers=(seen,))
    busy = await Client.connect(app.proxy_address)
    await busy.send(build_request("GET", "/slow?delay=30"))
    plane = app.plane
    assert plane is not None

    async def in_flight() -> bool:
        return plane.in_flight == 1

    await wait_until(in_flight)
    await app.shutdown()
    m = parse_metrics(generate_latest(app.registry).decode())
    assert metric(m, "infermon_client_aborts_total") == 0
    assert metric(m, "infermon_requests_total", code="503") == 1
    assert [(ex.status, ex.error, ex.aborted) for ex in seen.done] == [(503, "drain", False)]


class Recorder(Observer):
    name = "recorder"

    def __init__(self) -> None:
        self.done: list[Exchange] = []

    def on_complete(self, ex: Exchange) -> None:
        self.done.append(ex)
