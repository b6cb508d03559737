"""The proxy's own requests (``DataPlane.send``): through a named pool, never counted as client traffic."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.dataplane.own import OwnResult
from proxy.errors import UpstreamConnectError, UpstreamTimeout
from tests.conftest import ProxyFactory
from tests.helpers import TIMEOUT, RawUpstream, free_port, metric, read_request_head, scrape_metrics

RawFactory = Callable[..., Awaitable[RawUpstream]]


class Seen(Observer):
    name = "seen"

    def __init__(self) -> None:
        self.completed: list[Exchange] = []

    def on_complete(self, ex: Exchange) -> None:
        self.completed.append(ex)


async def send(app: object, *args: object, **kwargs: object) -> OwnResult:
    done: asyncio.Future[OwnResult] = asyncio.get_running_loop().create_future()
    app.plane.send(*args, done.set_result, **kwargs)  # type: ignore[attr-defined]
    async with asyncio.timeout(TIMEOUT):
        return await done


async def test_own_request_goes_through_the_pool_and_is_not_client_traffic(
    make_proxy: ProxyFactory, upstream: str
) -> None:
    seen = Seen()
    app = await make_proxy(upstream, observers=(seen,))
    result = await send(
        app, "stable", "POST", b"/echo/own", [(b"content-type", b"application/json")], b'{"x": 1}', timeout=5.0
    )
    assert result.error is None and result.status == 200
    body = result.body
    assert b'"path":"/echo/own"' in body and b'"length":8' in body
    assert result.header(b"content-type") == b"application/json; charset=utf-8"
    assert result.duration > 0 and result.upstream == "stable"
    # a second one reuses the pooled connection
    assert (await send(app, "stable", "GET", b"/echo", [], b"", timeout=5.0)).status == 200
    assert app.plane is not None and app.plane.pool.opened_total == 1
    assert seen.completed == []
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total") == 0


async def test_own_request_body_is_capped_and_the_rest_read_and_dropped(
    make_proxy: ProxyFactory, upstream: str
) -> None:
    app = await make_proxy(upstream)
    result = await send(app, "stable", "GET", b"/big?size=100000", [], b"", timeout=5.0, max_body_bytes=1000)
    assert result.error is None and result.status == 200
    assert len(result.body) == 1000 and result.truncated and result.body_bytes == 100_000
    again = await send(app, "stable", "GET", b"/echo", [], b"", timeout=5.0)  # the connection stayed usable
    assert again.status == 200
    assert app.plane is not None and app.plane.pool.opened_total == 1


async def test_own_request_failures_reach_the_callback(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    assert app.plane is not None
    app.plane.add_upstream("down", f"http://127.0.0.1:{free_port()}")
    result = await send(app, "down", "GET", b"/", [], b"", timeout=5.0)
    assert isinstance(result.error, UpstreamConnectError) and result.status == 0
    slow = await send(app, "stable", "GET", b"/slow?delay=3", [], b"", timeout=0.2)
    assert isinstance(slow.error, UpstreamTimeout)


async def test_own_request_cancel_and_bad_arguments(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    plane = app.plane
    assert plane is not None
    results: list[OwnResult] = []
    request = plane.send("stable", "GET", b"/slow?delay=0.3", [], b"", results.append, timeout=5.0)
    request.cancel()
    # a later request completes; the cancelled one never calls back
    assert (await send(app, "stable", "GET", b"/echo", [], b"", timeout=5.0)).status == 200
    assert results == []
    with pytest.raises(KeyError, match="no upstream named 'nope'"):
        plane.send("nope", "GET", b"/", [], b"", results.append, timeout=1.0)
    with pytest.raises(ValueError, match="origin-form"):
        plane.send("stable", "GET", b"http://x/", [], b"", results.append, timeout=1.0)


async def test_a_raising_callback_is_logged_not_fatal(
    make_proxy: ProxyFactory, upstream: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = await make_proxy(upstream)
    assert app.plane is not None
    done = asyncio.Event()

    def callback(result: OwnResult) -> None:
        done.set()
        raise RuntimeError("caller bug")

    app.plane.send("stable", "GET", b"/echo", [], b"", callback, timeout=5.0)
    async with asyncio.timeout(TIMEOUT):
        await done.wait()
    assert any(r.exc_info and "caller bug" in str(r.exc_info[1]) for r in caplog.records)
    assert (await send(app, "stable", "GET", b"/echo", [], b"", timeout=5.0)).status == 200


async def test_own_get_is_retried_on_a_stale_pooled_connection(
    make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_request_head(reader)
        writer.transport.abort()  # the pooled connection turns out closed

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    assert (await send(app, "stable", "GET", b"/", [], b"", timeout=5.0)).body == b"ok"
    assert (await send(app, "stable", "GET", b"/", [], b"", timeout=5.0)).body == b"ok"
    assert app.plane is not None and app.plane.pool.opened_total == 2  # once more, on a fresh connection
