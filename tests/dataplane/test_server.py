"""Client-side HTTP/1.1 behaviour of the data plane (RFC 9110 / 9112), against real upstreams."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.dataplane.http import new_request_id
from tests.conftest import ProxyFactory
from tests.helpers import (
    TIMEOUT,
    Client,
    RawUpstream,
    build_request,
    read_chunked,
    read_request_head,
)

RawFactory = Callable[..., Awaitable[RawUpstream]]


def echo_headers(resp: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in resp.json()["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


async def test_keep_alive_reuses_client_and_upstream_connections(
    make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    for _ in range(5):
        resp = await client.request("GET", "/x")
        assert (resp.status, resp.body) == (200, b"ok")
    assert app.plane is not None and app.plane.pool.opened_total == 1
    await client.close()


async def test_request_id_generated_forwarded_and_returned(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo")
    rid = resp.header("x-request-id")
    assert rid is not None and len(rid) == 36 and rid[14] == "4"
    assert echo_headers(resp)["x-request-id"] == [rid]
    resp = await client.request("GET", "/echo", headers={"X-Request-ID": "client-id-1"})
    assert resp.header("x-request-id") == "client-id-1"
    assert echo_headers(resp)["x-request-id"] == ["client-id-1"]
    # an unusable id (spaces, too long) is replaced, not forwarded
    resp = await client.request("GET", "/echo", headers={"X-Request-ID": "bad id"})
    assert resp.header("x-request-id") != "bad id"
    assert echo_headers(resp)["x-request-id"] == [resp.header("x-request-id")]
    await client.close()


def test_new_request_id_is_uuid4() -> None:
    import uuid

    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in list(ids)[:50]:
        u = uuid.UUID(rid)
        assert u.version == 4 and u.variant == uuid.RFC_4122


async def test_forwarded_headers_appended(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo", host="models.example:8080")
    h = echo_headers(resp)
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == ["models.example:8080"]
    assert h["host"] == ["models.example:8080"]
    resp = await client.request(
        "GET", "/echo", headers=[("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2"),
                                 ("X-Forwarded-Proto", "https")]
    )  # fmt: skip
    h = echo_headers(resp)
    assert h["x-forwarded-for"] == ["10.0.0.1, 10.0.0.2, 127.0.0.1"]
    assert h["x-forwarded-proto"] == ["https"]
    await client.close()


async def test_hop_by_hop_headers_removed_both_ways(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    seen: list[dict[str, str]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request_head(reader)
        seen.append(headers)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Up-Private\r\nX-Up-Private: 1\r\n"
            b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Kept: yes\r\nUpgrade: h2c\r\n\r\nok"
        )

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request(
        "GET",
        "/",
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "Proxy-Connection": "keep-alive",
            "Trailer": "X-T",
            "X-Normal": "1",
        },
    )
    assert resp.status == 200
    h = seen[0]
    for gone in ("connection", "x-private", "keep-alive", "te", "proxy-authorization", "proxy-connection", "trailer"):
        assert gone not in h, gone
    assert h["x-normal"] == "1"
    for gone in ("x-up-private", "keep-alive", "proxy-authenticate", "upgrade"):
        assert resp.header(gone) is None, gone
    assert resp.header("x-kept") == "yes"
    await client.close()


async def test_pipelined_requests_answered_in_order(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    # the first is slow: the later ones must still come back after it, in order
    await client.send(
        build_request("GET", "/slow?delay=0.2")
        + build_request("POST", "/echo/2", body=b"second")
        + build_request("GET", "/echo/3")
    )
    first = await client.response()
    second = await client.response()
    third = await client.response()
    assert first.json() == {"slow": True}
    assert second.json()["path"] == "/echo/2"  # type: ignore[index]
    assert second.json()["body"] == "second"  # type: ignore[index]
    assert third.json()["path"] == "/echo/3"  # type: ignore[index]
    await client.close()


async def test_chunked_request_stays_chunked(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    got: list[tuple[dict[str, str], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request_head(reader)
        body = await read_chunked(reader)
        got.append((headers, body))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    await client.send(
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    resp = await client.response()
    assert resp.status == 200
    headers, body = got[0]
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert body == b"hello world"
    await client.close()


async def test_content_length_kept_and_chunked_response_stays_chunked(
    make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, headers, _ = await read_request_head(reader)
            if "content-length" in headers:
                await reader.readexactly(int(headers["content-length"]))
            if line.startswith("GET /chunked"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                    b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n"
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("POST", "/cl", body=b"12345")
    assert resp.header("content-length") == "5" and resp.header("transfer-encoding") is None
    assert resp.body == b"hello"
    resp = await client.request("GET", "/chunked")
    assert resp.chunked and resp.header("content-length") is None
    assert resp.body == b"abcde"
    assert (b"X-Sum", b"5") in resp.trailers
    await client.close()


async def test_read_until_close_response(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await writer.drain()
        writer.write(b"close")
        writer.close()

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/")
    assert resp.body == b"until close"
    assert resp.chunked  # an HTTP/1.1 client keeps its connection: re-framed as chunked
    resp = await client.request("GET", "/")
    assert resp.body == b"until close"
    await client.close()
    # an HTTP/1.0 client gets it close-delimited
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET / HTTP/1.0\r\n\r\n")
    resp = await client.response()
    assert resp.body == b"until close" and not resp.chunked
    assert await client.closed()


async def test_http10_client_gets_dechunked_body_and_close(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET /sse?events=2&delay=0 HTTP/1.0\r\n\r\n")
    resp = await client.response()
    assert resp.status == 200 and not resp.chunked
    assert resp.body.count(b"data:") == 3
    assert await client.closed()


async def test_head_204_304(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request_head(reader)
            if line.startswith("HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: a/b\r\n\r\n")
            elif "204" in line:
                writer.write(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
            elif "304" in line:
                writer.write(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nend")

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("HEAD", "/")
    assert resp.status == 200 and resp.header("content-length") == "1000" and resp.body == b""
    resp = await client.request("GET", "/204")
    assert resp.status == 204 and resp.body == b"" and resp.header("x-a") == "1"
    resp = await client.request("GET", "/304")
    assert resp.status == 304 and resp.header("etag") == '"x"'
    resp = await client.request("GET", "/after")
    assert resp.body == b"end"  # the connection is still in sync after bodiless responses
    assert app.plane is not None and app.plane.pool.opened_total == 1
    await client.close()


async def test_expect_100_continue(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request_head(reader)
        assert headers.get("expect") == "100-continue"
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(int(headers["content-length"]))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    async with asyncio.timeout(TIMEOUT):
        interim = await client.reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    await client.send(b"data")
    resp = await client.response()
    assert (resp.status, resp.body) == (200, b"data")
    await client.close()


async def test_websocket_upgrade_is_tunnelled(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request_head(reader)
        assert headers["upgrade"] == "websocket"
        assert headers["connection"].lower() == "upgrade"
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        while True:
            data = await reader.read(100)
            if not data:
                return
            writer.write(b"echo:" + data)

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    await client.send(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    async with asyncio.timeout(TIMEOUT):
        head = await client.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    assert b"Upgrade: websocket" in head
    await client.send(b"ping")
    async with asyncio.timeout(TIMEOUT):
        assert await client.reader.readexactly(9) == b"echo:ping"
    await client.close()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n", 400),  # obsolete line folding
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /\x00 HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS hello on the plain port
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: t\r\nExpect: something-else\r\n\r\n", 417),
    ],
)
async def test_malformed_and_smuggling_requests_rejected(
    make_proxy: ProxyFactory, raw_upstream: RawFactory, raw: bytes, status: int
) -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.read(65536))

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    await client.send(raw)
    resp = await client.response()
    assert resp.status == status
    body = resp.json()
    assert isinstance(body, dict) and body["error"] and body["request_id"] == resp.header("x-request-id")
    assert resp.header("content-type") == "application/json"
    assert await client.closed()
    assert requests == []  # nothing reached the model server


async def test_oversize_head_431_and_url_414(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, limits={"max_header_bytes": 4096})
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo", headers={"X-Big": "a" * 5000})
    assert resp.status == 431
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo?" + "q" * 5000)
    assert resp.status in (414, 431)
    # a head that never ends is cut off once it passes the limit, not buffered forever
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: " + b"z" * 10000)
    resp = await client.response()
    assert resp.status == 431
    # within the limit it passes
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo", headers={"X-Ok": "a" * 3000})
    assert resp.status == 200


async def test_body_too_large_413(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, limits={"max_request_body_bytes": 1000})
    client = await Client.connect(app.proxy_address)
    resp = await client.request("POST", "/echo", body=b"a" * 1001)
    assert resp.status == 413
    assert await client.closed()
    # chunked: the limit is enforced while streaming
    client = await Client.connect(app.proxy_address)
    await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    await client.send(b"400\r\n" + b"b" * 1024 + b"\r\n")
    resp = await client.response()
    assert resp.status == 413
    client = await Client.connect(app.proxy_address)
    resp = await client.request("POST", "/echo", body=b"a" * 1000)
    assert resp.status == 200


async def test_slow_head_gets_408(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, limits={"header_timeout": 0.3})
    client = await Client.connect(app.proxy_address)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
    # trickle bytes: each one arrives in time, the whole head does not
    for _ in range(3):
        await asyncio.sleep(0.1)
        if client.writer.is_closing():
            break
        client.writer.write(b"X: y\r\n")
    resp = await client.response()
    assert resp.status == 408
    assert loop.time() - started < 2.0
    assert await client.closed()


async def test_idle_connection_closed_silently(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, limits={"header_timeout": 0.2, "keepalive_timeout": 0.2})
    client = await Client.connect(app.proxy_address)
    assert await client.closed()  # no bytes at all: closed without a 408
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo")
    assert resp.status == 200
    async with asyncio.timeout(TIMEOUT):
        assert await client.reader.read() == b""  # keep-alive idle timeout: plain close


async def test_stalled_body_gets_408(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, limits={"body_timeout": 0.3})
    client = await Client.connect(app.proxy_address)
    await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    resp = await client.response()
    assert resp.status == 408


async def test_connection_limit_503(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, limits={"max_connections": 2})
    a = await Client.connect(app.proxy_address)
    b = await Client.connect(app.proxy_address)
    assert (await a.request("GET", "/echo")).status == 200
    c = await Client.connect(app.proxy_address)
    resp = await c.response()
    assert resp.status == 503
    assert "max_connections" in resp.json()["error"]  # type: ignore[index]
    assert (await b.request("GET", "/echo")).status == 200
    for x in (a, b):
        await x.close()


async def test_in_flight_limit_503(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, limits={"max_in_flight": 1})
    slow = await Client.connect(app.proxy_address)
    await slow.send(build_request("GET", "/slow?delay=0.5"))
    assert app.plane is not None

    async def busy() -> bool:
        return app.plane is not None and app.plane.in_flight == 1

    from tests.helpers import wait_until

    await wait_until(busy)
    other = await Client.connect(app.proxy_address)
    resp = await other.request("GET", "/echo")
    assert resp.status == 503
    assert (await slow.response()).status == 200


async def test_absolute_form_target(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "http://models.example/echo/abs?x=1", host="models.example")
    assert resp.status == 200
    assert resp.json()["path"] == "/echo/abs?x=1"  # type: ignore[index]
    await client.close()


async def test_client_connection_close_is_honoured(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo", headers={"Connection": "close"})
    assert resp.status == 200
    assert resp.header("connection") == "close"
    assert await client.closed()


async def test_unrequested_101_is_a_protocol_error(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
        await writer.drain()
        await reader.read(100)

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/")
    assert resp.status == 502


async def test_interim_103_forwarded_before_final(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/")
    assert resp.interim == [103]
    assert (resp.status, resp.body) == (200, b"ok")


async def test_declined_upgrade_answers_then_closes(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    resp = await client.response()
    assert resp.status == 200  # the upstream ignored the upgrade and answered normally
    assert await client.closed()


async def test_pipelined_request_after_a_malformed_one_is_not_served(
    make_proxy: ProxyFactory, upstream: str
) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    await client.send(
        build_request("GET", "/slow?delay=0.2") + b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n"
        + build_request("GET", "/echo/never")
    )
    assert (await client.response()).status == 200
    assert (await client.response()).status == 400
    assert await client.closed()


async def test_via_added_for_the_upstream(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo", headers={"Via": "1.1 edge"})
    assert echo_headers(resp)["via"] in (["1.1 edge, 1.1 infermon"], ["1.1 edge", "1.1 infermon"])


@pytest.mark.parametrize("host", ["a b", "a/b", "x@y", "[::1", "h:80x"])
async def test_invalid_host_400(make_proxy: ProxyFactory, upstream: str, host: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo", host=host)
    assert resp.status == 400


async def test_absolute_form_authority_replaces_host(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "http://real.example:81/echo", host="other.example")
    assert echo_headers(resp)["host"] == ["real.example:81"]


async def test_transfer_encoding_in_http10_rejected(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    await client.send(b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert (await client.response()).status == 400


async def test_date_added_when_the_upstream_sends_none(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    from email.utils import parsedate_to_datetime

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 2\r\n\r\nok")

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/")
    date = resp.header("date")
    assert date is not None
    assert parsedate_to_datetime(date).tzinfo is not None
    resp = await client.request("GET", "/")
    assert resp.header_all("date") == ["Sun, 06 Nov 1994 08:49:37 GMT"]  # kept, not duplicated


# -- second-pass regressions -----------------------------------------------------------------------


async def test_connection_content_length_does_not_strip_the_body_length(
    make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    # with Content-Length stripped, the body would reach the model server as a second request
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, headers, _ = await read_request_head(reader)
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            seen.append((line, headers, body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    smuggled = b"GET /admin HTTP/1.1\r\nHost: m\r\n\r\n"
    resp = await client.request(
        "POST", "/infer", headers={"Connection": "content-length", "Content-Length": str(len(smuggled))}, body=smuggled
    )
    assert resp.status == 200
    resp = await client.request("GET", "/after", headers={"Connection": "host, x-forwarded-proto, x-request-id"})
    assert resp.status == 200
    assert [s[0].split()[1] for s in seen] == ["/infer", "/after"]  # nothing smuggled in between
    assert seen[0][2] == smuggled and seen[0][1]["content-length"] == str(len(smuggled))
    assert seen[1][1]["host"] == "test" and seen[1][1]["x-forwarded-proto"] == "http"
    assert "x-request-id" in seen[1][1]


async def test_response_connection_option_cannot_strip_content_length(
    make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: content-length, x-hop\r\nX-Hop: 1\r\nContent-Length: 2\r\n\r\nok"
            )

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    for _ in range(2):  # the connection stays usable: the framing held
        resp = await client.request("GET", "/")
        assert (resp.status, resp.body, resp.header("content-length"), resp.header("x-hop")) == (200, b"ok", "2", None)


async def test_close_delimited_gzip_response_is_labelled_gzip_chunked(
    make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    import gzip

    payload = gzip.compress(b'{"predictions": [1, 2, 3]}')

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + payload)
        await writer.drain()
        writer.close()

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/")
    assert resp.header("transfer-encoding") == "gzip, chunked"
    assert resp.chunked and resp.body == payload
    assert gzip.decompress(resp.body) == b'{"predictions": [1, 2, 3]}'


async def test_close_delimited_body_cut_by_a_reset_is_a_failure(
    make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    import socket
    import struct

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial body")
        await writer.drain()
        await asyncio.sleep(0.1)  # let the proxy forward the head and the first bytes
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    await client.send(build_request("GET", "/"))
    status, _, headers = await _read_head_of(client)
    assert status == 200 and (b"transfer-encoding", b"chunked") in [(k.lower(), v) for k, v in headers]
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await read_chunked(client.reader)  # cut: never a clean terminating chunk
    from tests.helpers import metric, scrape_metrics

    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_upstream_errors_total", kind="reset") == 1


async def _read_head_of(client: Client) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    from tests.helpers import _read_head

    async with asyncio.timeout(TIMEOUT):
        return await _read_head(client.reader)


async def test_pipelined_request_after_connection_close_is_dropped_not_aborted(
    make_proxy: ProxyFactory, upstream: str
) -> None:
    from tests.helpers import metric, scrape_metrics

    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    await client.send(
        build_request("GET", "/echo/1", headers={"Connection": "close"}) + build_request("GET", "/echo/2")
    )
    resp = await client.response()
    assert resp.status == 200 and resp.json()["path"] == "/echo/1"  # type: ignore[index]
    assert resp.header("connection") == "close"
    assert await client.closed()
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total") == 1
    assert metric(m, "infermon_requests_total", code="499") == 0
    assert metric(m, "infermon_client_aborts_total") == 0
    assert metric(m, "infermon_pipelined_requests_dropped_total") == 1


async def test_http10_request_without_keep_alive_ends_the_connection(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET /echo/a HTTP/1.0\r\n\r\nGET /echo/b HTTP/1.0\r\n\r\n")
    resp = await client.response()
    assert resp.status == 200 and resp.json()["path"] == "/echo/a"  # type: ignore[index]
    assert await client.closed()


@pytest.mark.parametrize(("count", "status"), [(99, 200), (100, 431), (400, 431)])
async def test_max_headers(make_proxy: ProxyFactory, upstream: str, count: int, status: int) -> None:
    # with Host, `count` + 1 fields: the default limit is 100
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    await client.send(build_request("GET", "/echo", headers=[(f"x-h{i}", "v") for i in range(count)]))
    resp = await client.response()
    assert resp.status == status
    if status == 431:
        assert "limits.max_headers" in resp.json()["error"]  # type: ignore[index]
        assert await client.closed()


async def test_max_headers_is_configurable(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, limits={"max_headers": 5})
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/echo", headers=[(f"x-h{i}", "v") for i in range(4)])).status == 200
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/echo", headers=[(f"x-h{i}", "v") for i in range(5)])).status == 431


async def test_a_bug_in_our_response_handling_is_an_internal_error_not_the_upstreams(
    make_proxy: ProxyFactory, upstream: str, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.hooks import Observer
    from tests.helpers import metric, scrape_metrics

    class Corrupting(Observer):
        """Leaves response fields the head rules cannot read: the failure is then in our own code
        (prepare_response), after the observer returned, the way a bug of ours would be."""

        name = "corrupting"

        def on_upstream_head(self, ex: Exchange) -> None:
            ex.response_headers = [*ex.response_headers, 42]  # type: ignore[list-item]

    app = await make_proxy(upstream, observers=(Corrupting(),))
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo")
    assert resp.status == 500
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_upstream_errors_total", kind="internal") == 1
    assert metric(m, "infermon_upstream_errors_total", kind="protocol") == 0
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], TypeError)]
    assert logged, "the traceback is logged"


async def test_request_trailers_are_bounded_like_the_head(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, limits={"max_headers": 5, "max_header_bytes": 8192})
    client = await Client.connect(app.proxy_address)
    head = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
    await client.send(head + b"".join(b"X-T%d: v\r\n" % i for i in range(50)) + b"\r\n")
    resp = await client.response()
    assert resp.status == 431 and "trailer" in resp.json()["error"]  # type: ignore[index]
    # one endless trailer value, sent across many reads: answered long before it ends
    client = await Client.connect(app.proxy_address)
    await client.send(head + b"X-T: ")
    for _ in range(64):
        try:
            await client.send(b"a" * 4096)
        except ConnectionError:
            break
    resp = await client.response()
    assert resp.status == 431


async def test_a_slow_request_is_not_cut_by_the_timeout_of_a_pipelined_one(
    make_proxy: ProxyFactory, upstream: str
) -> None:
    from tests.helpers import metric, scrape_metrics

    app = await make_proxy(upstream, limits={"header_timeout": 0.3, "body_timeout": 0.3})
    client = await Client.connect(app.proxy_address)
    await client.send(build_request("GET", "/slow?delay=0.8") + b"GET /echo HTTP/1.1\r\nHo")
    resp = await client.response()
    assert resp.status == 200 and resp.json() == {"slow": True}
    # the pipelined head's own clock started when its turn came: it is a 408 now, not a cut
    resp = await client.response()
    assert resp.status == 408
    client = await Client.connect(app.proxy_address)
    partial = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabcde"
    await client.send(build_request("GET", "/slow?delay=0.8") + partial)
    resp = await client.response()
    assert resp.status == 200
    resp = await client.response()
    assert resp.status == 408
    assert metric(await scrape_metrics(app.admin_address), "infermon_client_aborts_total") == 0


async def test_a_raising_router_is_a_500_and_the_connection_goes_on(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    plane = app.plane
    assert plane is not None

    def router(ex: Any) -> Any:
        return (1 / 0) if ex.path == "/echo/boom" else plane.pool

    plane.router = router
    client = await Client.connect(app.proxy_address)
    await client.send(build_request("GET", "/echo/a") + build_request("GET", "/echo/boom"))
    assert (await client.response()).status == 200
    assert (await client.response()).status == 500
    assert plane.in_flight == 0
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/echo/after")).status == 200


async def test_upstream_chunked_twice_is_a_protocol_error(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/")).status == 502


async def test_response_trailers_are_filtered(make_proxy: ProxyFactory, raw_upstream: RawFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n2\r\nok\r\n0\r\n"
            b"grpc-status: 0\r\nConnection: close\r\nx-request-id: spoof\r\n\r\n"
        )

    up = await raw_upstream(handler)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/", headers={"TE": "trailers"})
    assert resp.body == b"ok"
    assert [(k.lower(), v) for k, v in resp.trailers] == [(b"grpc-status", b"0")]
