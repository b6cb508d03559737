"""Upstream side: pool, failures mapped to 502/503/504, stale-connection retry, client aborts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import ProxyFactory
from tests.helpers import (
    TIMEOUT,
    Client,
    RawUpstream,
    build_request,
    free_port,
    metric,
    read_request_head,
    scrape_metrics,
    wait_until,
)

RawFactory = Callable[..., Awaitable[RawUpstream]]


async def metrics_of(app: object) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    return await scrape_metrics(app.admin_address)  # type: ignore[attr-defined]


async def test_upstream_down_502_json(make_proxy: ProxyFactory) -> None:
    app = await make_proxy(f"http://127.0.0.1:{free_port()}")
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/x")
    assert resp.status == 502
    body = resp.json()
    assert isinstance(body, dict)
    assert "unreachable" in body["error"]
    assert body["request_id"] == resp.header("x-request-id")
    # the client connection survives an upstream failure
    resp = await client.request("GET", "/x")
    assert resp.status == 502
    m = await metrics_of(app)
    assert metric(m, "infermon_upstream_errors_total", kind="connect") == 2
    assert metric(m, "infermon_requests_total", code="502") == 2


async def test_response_timeout_504(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, upstream_pool={"response_timeout": 0.3})
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/slow?delay=3")
    assert resp.status == 504
    m = await metrics_of(app)
    assert metric(m, "infermon_upstream_errors_total", kind="timeout") == 1
    resp = await client.request("GET", "/echo")  # and a fresh upstream connection works
    assert resp.status == 200


async def test_connect_timeout_504(make_proxy: ProxyFactory) -> None:
    # a listener that never accepts, with its backlog already full: SYNs go unanswered
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(blocker.getsockname())
        fillers.append(s)
    try:
        app = await make_proxy(
            f"http://127.0.0.1:{blocker.getsockname()[1]}", upstream_pool={"connect_timeout": 0.3}
        )
        client = await Client.connect(app.proxy_address)
        resp = await client.request("GET", "/")
        assert resp.status == 504
        assert "timed out" in resp.json()["error"]  # type: ignore[index]
    finally:
        for s in fillers:
            s.close()
        blocker.close()


def stale_second_request() -> tuple[list[int], Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]]:
    """An upstream that answers once per connection, then drops the next request unanswered."""
    served: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request_head(reader)
        await reader.readexactly(int(headers.get("content-length", "0")))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        served.append(1)
        # the next request on this connection finds it closed: the upstream timed it out
        await read_request_head(reader)
        writer.transport.abort()

    return served, handler


@pytest.mark.parametrize(
    ("method", "headers", "pool"),
    [
        ("GET", {}, {}),
        ("PUT", {}, {}),
        ("DELETE", {}, {}),
        ("POST", {"Idempotency-Key": "8e03978e-40d5-43e8-bc93-6894a57f9324"}, {}),
        ("POST", {}, {"retry_non_idempotent": True}),
    ],
)
async def test_stale_pooled_connection_retried_once_when_a_repeat_is_safe(
    make_proxy: ProxyFactory, raw_upstream: RawFactory, method: str, headers: dict[str, str], pool: dict[str, bool]
) -> None:
    served, handler = stale_second_request()
    up = await raw_upstream(handler)
    app = await make_proxy(up.url, upstream_pool=pool)
    client = await Client.connect(app.proxy_address)
    assert (await client.request(method, "/", headers=headers, body=b"abc")).body == b"first"
    resp = await client.request(method, "/", headers=headers, body=b"again")
    assert (resp.status, resp.body) == (200, b"first")
    assert len(served) == 2
    m = await metrics_of(app)
    assert metric(m, "infermon_upstream_retries_total") == 1
    assert metric(m, "infermon_upstream_errors_total") == 0
    assert metric(m, "infermon_requests_total", code="200") == 2
    assert metric(m, "infermon_upstream_connections_opened_total") == 2


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_request_is_never_retried_automatically(
    make_proxy: ProxyFactory, raw_upstream: RawFactory, method: str
) -> None:
    # RFC 9110 9.2.2: the model server may have run (or crashed on) the request already
    served, handler = stale_second_request()
    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    assert (await client.request(method, "/", body=b"abc")).status == 200
    resp = await client.request(method, "/", body=b"again")
    assert resp.status == 502
    assert len(served) == 1
    m = await metrics_of(app)
    assert metric(m, "infermon_upstream_retries_total") == 0
    assert metric(m, "infermon_upstream_errors_total", kind="reset") == 1
    assert metric(m, "infermon_upstream_connections_opened_total") == 1


async def test_stale_connection_not_retried_when_body_would_be_lost(
    make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request_head(reader)
        await reader.readexactly(int(headers.get("content-length", "0")))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_request_head(reader)
        writer.transport.abort()

    up = await raw_upstream(handler)
    app = await make_proxy(up.url, upstream_pool={"retry_buffer_bytes": 1024})
    client = await Client.connect(app.proxy_address)
    assert (await client.request("POST", "/", body=b"a")).status == 200
    resp = await client.request("POST", "/", body=b"b" * 4096)
    assert resp.status == 502
    m = await metrics_of(app)
    assert metric(m, "infermon_upstream_errors_total", kind="reset") == 1


async def test_garbage_from_upstream_502_protocol(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/")
    assert resp.status == 502
    m = await metrics_of(app)
    assert metric(m, "infermon_upstream_errors_total", kind="protocol") == 1


async def test_upstream_cut_mid_response_aborts_client(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    await client.send(build_request("GET", "/"))
    try:
        await client.response()
        raise AssertionError("a truncated response must not look complete")
    except ConnectionError:
        pass
    m = await metrics_of(app)
    assert metric(m, "infermon_upstream_errors_total", kind="reset") == 1


async def test_pool_waits_for_a_free_connection_then_503(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, upstream_pool={"max_connections": 1, "pool_timeout": 2.0})
    a = await Client.connect(app.proxy_address)
    b = await Client.connect(app.proxy_address)
    await a.send(build_request("GET", "/slow?delay=0.3"))
    await b.send(build_request("GET", "/echo"))
    assert (await a.response()).status == 200
    assert (await b.response()).status == 200  # waited for the one connection, then used it
    assert app.plane is not None and app.plane.pool.opened_total == 1

    app2 = await make_proxy(upstream, upstream_pool={"max_connections": 1, "pool_timeout": 0.2})
    c = await Client.connect(app2.proxy_address)
    d = await Client.connect(app2.proxy_address)
    await c.send(build_request("GET", "/slow?delay=1"))
    await wait_until(lambda: _in_flight(app2, 1))
    resp = await d.request("GET", "/echo")
    assert resp.status == 503
    assert "max_connections" in resp.json()["error"]  # type: ignore[index]
    assert (await c.response()).status == 200


async def _in_flight(app: object, n: int) -> bool:
    plane = app.plane  # type: ignore[attr-defined]
    return plane is not None and plane.in_flight == n


async def test_client_abort_cancels_upstream_and_counts_499(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    upstream_saw_close = asyncio.Event()
    got_request = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await reader.readexactly(2)
        got_request.set()
        if not await reader.read(1):  # blocks until the proxy drops the connection
            upstream_saw_close.set()

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    await client.send(build_request("POST", "/infer", body=b"{}"))
    async with asyncio.timeout(TIMEOUT):
        await got_request.wait()
    await client.close()
    async with asyncio.timeout(TIMEOUT):
        await upstream_saw_close.wait()
    await wait_until(lambda: _in_flight(app, 0))
    m = await metrics_of(app)
    assert metric(m, "infermon_client_aborts_total") == 1
    assert metric(m, "infermon_requests_total", code="499") == 1
    assert app.plane is not None and len(app.plane.pool.idle) == 0  # that connection is not reused


async def test_upstream_answers_before_the_body_ends(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nnope")
        await writer.drain()
        await reader.read(1 << 20)

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    resp = await client.response()
    assert (resp.status, resp.body) == (413, b"nope")
    assert resp.header("connection") == "close"
    assert await client.closed()


async def test_oversized_upstream_head_502(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * (2 << 20) + b"\r\n\r\n")
        await writer.drain()

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/")
    assert resp.status == 502


# -- flow-control state follows the connection ------------------------------------------------------


def _shrink_buffers(app: object) -> None:
    """Tiny kernel send buffers on every client connection of the proxy: its own write buffer fills."""
    for conn in app.plane.connections:  # type: ignore[attr-defined]
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def _slow_client(app: object) -> Client:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, app.proxy_address)  # type: ignore[attr-defined]
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    client = Client(reader, writer)

    async def accepted() -> bool:
        return len(app.plane.connections) == 1  # type: ignore[attr-defined]

    await wait_until(accepted)
    return client


async def test_slow_client_never_leaves_a_paused_connection_in_the_pool(
    make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    # the whole response arrives in a read or two; writing its last bytes passes the slow client's
    # high-water mark while the upstream connection is still attached
    body = b"x" * (400 * 1024)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    up = await raw_upstream(handler)
    app = await make_proxy(up.url, upstream_pool={"max_connections": 1, "response_timeout": 3})
    slow = await _slow_client(app)
    _shrink_buffers(app)
    await slow.send(build_request("GET", "/big"))
    plane = app.plane
    assert plane is not None

    async def exchange_done() -> bool:
        return len(plane.pool.idle) == 1

    await wait_until(exchange_done)  # finished upstream while the client has not read a byte
    idle = plane.pool.idle[0]
    assert idle.transport is not None and idle.transport.is_reading()
    fast = await Client.connect(app.proxy_address)
    async with asyncio.timeout(2):
        resp = await fast.request("GET", "/big")
    assert (resp.status, len(resp.body)) == (200, len(body))
    resp = await slow.response()
    assert (resp.status, resp.body) == (200, body)


async def test_upstream_attached_to_a_paused_client_starts_paused(
    make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    # response 1 fills the slow client's buffer and closes its upstream connection; response 2 comes
    # on a fresh connection, which must not stream into the client's full buffer unchecked
    first = b"a" * (400 * 1024)
    second = b"b" * (16 << 20)
    writers: list[asyncio.StreamWriter] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request_head(reader)
        if "/first" in line:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(first) + first)
            await writer.drain()
            return
        writers.append(writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(second))
        for i in range(0, len(second), 1 << 20):
            writer.write(second[i : i + (1 << 20)])
            await writer.drain()

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    slow = await _slow_client(app)
    _shrink_buffers(app)
    await slow.send(build_request("GET", "/first") + build_request("GET", "/second"))
    conn = next(iter(app.plane.connections))  # type: ignore[union-attr]
    transport = conn.transport
    assert transport is not None

    async def second_blocked_or_buffered() -> bool:
        blocked = bool(writers) and writers[0].transport.get_write_buffer_size() > 0
        return blocked or transport.get_write_buffer_size() > (4 << 20)

    await wait_until(second_blocked_or_buffered)
    assert transport.get_write_buffer_size() < (1 << 20)  # bounded: a read or two, not the body
    assert (await slow.response()).body == first
    assert (await slow.response()).body == second
