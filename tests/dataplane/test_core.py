"""DataPlane wiring: per-request routing between upstream pools."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.upstream import UpstreamPool
from tests.conftest import ProxyFactory
from tests.helpers import Client, RawUpstream, read_request_head

RawFactory = Callable[..., Awaitable[RawUpstream]]


def answering(name: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(name), name))

    return handler


async def test_route_sends_each_request_to_the_chosen_pool(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    stable = await raw_upstream(answering(b"stable"))
    canary = await raw_upstream(answering(b"canary"))
    app = await make_proxy(stable.url)
    plane = app.plane
    assert plane is not None
    canary_pool = plane.add_upstream("canary", canary.url)

    def route(ex: Exchange) -> UpstreamPool:
        return canary_pool if ex.header(b"x-variant") == b"canary" else plane.pool

    plane.router = route
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/", headers={"X-Variant": "canary"})).body == b"canary"
    assert (await client.request("GET", "/")).body == b"stable"
    assert (await client.request("GET", "/", headers={"X-Variant": "canary"})).body == b"canary"
    assert canary_pool.opened_total == 1  # connections return to the pool they came from
    assert plane.pool.opened_total == 1
