"""DataPlane wiring: per-request routing between upstream pools."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.upstream import UpstreamPool
from tests.conftest import ProxyFactory
from tests.helpers import Client, RawUpstream, metric, read_request_head, scrape_metrics

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


async def test_router_runs_before_the_head_is_serialized(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    heads: list[dict[str, str]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, headers, _ = await read_request_head(reader)
            heads.append(headers)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    stable = await raw_upstream(handler)
    canary = await raw_upstream(handler)
    app = await make_proxy(stable.url)
    plane = app.plane
    assert plane is not None
    canary_pool = plane.add_upstream("canary", canary.url)

    def route(ex: Exchange) -> UpstreamPool:
        ex.request_headers.append((b"X-Infermon-Variant", b"canary"))
        return canary_pool

    plane.router = route
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")  # no Host: the chosen upstream's
    assert (await client.response()).status == 200
    assert heads[0]["x-infermon-variant"] == "canary"
    assert heads[0]["host"] == f"127.0.0.1:{canary.port}"
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_upstream_connections_opened_total", upstream="canary") == 1
    assert metric(m, "infermon_upstream_connections_opened_total", upstream="stable") == 0
    assert metric(m, "infermon_upstream_connections", upstream="canary") == 1


async def test_upstream_names_are_unique(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    assert app.plane is not None
    with pytest.raises(ValueError, match="registered already"):
        app.plane.add_upstream("stable", upstream)
