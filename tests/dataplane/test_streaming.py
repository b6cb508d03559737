"""Bodies stream both ways with flow control: memory stays bounded whatever the body size."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests.conftest import ProxyFactory, ProxyProcess
from tests.helpers import TIMEOUT, Client, RawUpstream, build_request, read_request_head

RawFactory = Callable[..., Awaitable[RawUpstream]]
SpawnProxy = Callable[..., Awaitable[ProxyProcess]]
MiB = 1 << 20


async def test_2gib_upload_streams_with_bounded_memory(spawn_proxy: SpawnProxy, raw_upstream: RawFactory) -> None:
    total = 2 << 30
    received: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request_head(reader)
        if "content-length" not in headers:
            return
        left = int(headers["content-length"])
        while left:
            chunk = await reader.read(min(left, 4 * MiB))
            if not chunk:
                return
            left -= len(chunk)
        received.append(int(headers["content-length"]))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    up = await raw_upstream(handler)
    proxy = await spawn_proxy(up.url)
    baseline = proxy.rss_bytes()
    client = await Client.connect(proxy.listen)
    client.writer.transport.set_write_buffer_limits(high=4 * MiB)
    await client.send(build_request("POST", "/upload", body=b"")[:-2] + f"Content-Length: {total}\r\n\r\n".encode())
    block = b"\0" * (4 * MiB)
    sent = 0
    async with asyncio.timeout(120):
        while sent < total:
            client.writer.write(block)
            sent += len(block)
            await client.writer.drain()
    resp = await client.response()
    assert (resp.status, resp.body) == (200, b"ok")
    assert received == [total]
    growth = proxy.peak_rss_bytes() - baseline
    assert growth < 32 * MiB, f"proxy memory grew by {growth / MiB:.1f} MiB for a 2 GiB upload"


async def test_endless_stream_to_a_slow_client_is_backpressured(
    spawn_proxy: SpawnProxy, raw_upstream: RawFactory
) -> None:
    pushed = 0
    upstream_gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pushed
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        event = b"data: " + b"t" * 65000 + b"\n\n"
        frame = b"%x\r\n%s\r\n" % (len(event), event)
        try:
            while True:  # an endless stream, written as fast as the proxy will take it
                writer.write(frame)
                pushed += len(event)
                await writer.drain()
        except ConnectionError:
            upstream_gone.set()

    up = await raw_upstream(handler)
    proxy = await spawn_proxy(up.url)
    baseline = proxy.rss_bytes()
    client = await Client.connect(proxy.listen)
    await client.send(build_request("GET", "/stream"))
    # the client reads nothing for a while: the upstream must be held back, not buffered in the proxy
    await asyncio.sleep(1.0)  # the slowness of the client is the point here, not a wait for an event
    stalled_at = pushed
    assert stalled_at < 64 * MiB, f"{stalled_at / MiB:.0f} MiB pushed into a client that reads nothing"
    # now the client reads 200 MiB: the stream flows, memory stays flat
    got = 0
    async with asyncio.timeout(60):
        while got < 200 * MiB:
            data = await client.reader.read(4 * MiB)
            assert data
            got += len(data)
    assert pushed > stalled_at + 150 * MiB
    growth = proxy.peak_rss_bytes() - baseline
    assert growth < 32 * MiB, f"proxy memory grew by {growth / MiB:.1f} MiB"
    client.writer.transport.abort()
    async with asyncio.timeout(TIMEOUT):
        await upstream_gone.wait()  # the client went away: the proxy dropped the upstream too


async def test_sse_events_are_not_buffered(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.send(build_request("GET", "/sse?events=3&delay=0.4"))
    async with asyncio.timeout(TIMEOUT):
        head = await client.reader.readuntil(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        first = await client.reader.readuntil(b"\n\n")
    first_at = loop.time() - started
    assert b'data: {"i": 0}' in first
    assert first_at < 0.35, f"first event after {first_at:.2f}s: the stream was buffered"
    async with asyncio.timeout(TIMEOUT):
        rest = await client.reader.readuntil(b"[DONE]\n\n")
    assert rest.count(b"data:") == 3
    assert loop.time() - started > 1.1
