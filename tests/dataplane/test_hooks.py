"""Observer hooks: a failing observer never fails a request; on_complete runs once per exchange."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import HOOK_NAMES, Hooks, Observer
from tests.conftest import ProxyFactory
from tests.helpers import (
    TIMEOUT,
    Client,
    RawUpstream,
    bound_socket,
    build_request,
    metric,
    read_request_head,
    scrape_metrics,
    wait_until,
)


class Boom(Observer):
    """Raises in every hook, after noting the call."""

    name = "boom"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def _fail(self, hook: str) -> None:
        self.calls[hook] += 1
        raise RuntimeError(f"boom in {hook}")

    def on_request_head(self, ex: Exchange) -> None:
        self._fail("on_request_head")

    def on_request_body(self, ex: Exchange, chunk: bytes) -> None:
        self._fail("on_request_body")

    def on_upstream_head(self, ex: Exchange) -> None:
        self._fail("on_upstream_head")

    def on_first_byte(self, ex: Exchange) -> None:
        self._fail("on_first_byte")

    def on_response_body(self, ex: Exchange, chunk: bytes) -> None:
        self._fail("on_response_body")

    def on_complete(self, ex: Exchange) -> None:
        self._fail("on_complete")


class Completions(Observer):
    """Records every exchange handed to on_complete."""

    name = "completions"

    def __init__(self) -> None:
        self.done: list[Exchange] = []
        self.heads = 0

    def on_request_head(self, ex: Exchange) -> None:
        self.heads += 1

    def on_complete(self, ex: Exchange) -> None:
        self.done.append(ex)


async def _until(predicate: Callable[[], bool]) -> None:
    """Wait (bounded) for state that the proxy changes after the response has reached the client."""

    async def check() -> bool:
        return bool(predicate())

    await wait_until(check)


# -- a failing observer -----------------------------------------------------------------------


async def test_failing_observer_never_fails_the_request(
    make_proxy: ProxyFactory, upstream: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="infermon.hooks")
    boom = Boom()
    app = await make_proxy(upstream, observers=(boom,))
    client = await Client.connect(app.proxy_address)
    requests = 3
    for i in range(requests):
        resp = await client.request("POST", f"/echo/{i}", body=b"payload-%d" % i)
        assert resp.status == 200
        data = resp.json()
        assert isinstance(data, dict)
        assert data["path"] == f"/echo/{i}"
        assert data["body"] == f"payload-{i}"
    stream = await client.request("GET", "/sse?events=2&delay=0")
    assert stream.status == 200
    assert stream.body.count(b"data: ") == 3
    await client.close()

    # every hook ran (and raised) for every request; none was skipped after the first failure
    total = requests + 1
    for hook in ("on_request_head", "on_upstream_head", "on_first_byte"):
        assert boom.calls[hook] == total, hook
    assert boom.calls["on_request_body"] == requests
    assert boom.calls["on_response_body"] >= total
    await _until(lambda: boom.calls["on_complete"] == total)

    m = await scrape_metrics(app.admin_address)
    for hook in HOOK_NAMES:
        assert metric(m, "infermon_observer_errors_total", observer="boom", hook=hook) == boom.calls[hook], hook
    # the metrics observer, registered before it, still saw every request
    assert metric(m, "infermon_requests_total", code="200") == total

    # logged at most once per observer and hook within the interval, with the exception
    records = [r for r in caplog.records if r.name == "infermon.hooks"]
    per_hook = Counter(hook for r in records for hook in HOOK_NAMES if f" in {hook} " in r.getMessage())
    assert per_hook == dict.fromkeys(HOOK_NAMES, 1)
    assert all(r.exc_info is not None and "boom in" in str(r.exc_info[1]) for r in records)
    assert all("observer boom failed" in r.getMessage() for r in records)


def test_failures_are_logged_again_after_the_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="infermon.hooks")
    boom = Boom()
    ex = Exchange(0.0, "127.0.0.1")
    quiet = Hooks([boom], log_interval=3600)
    for _ in range(5):
        quiet.call(quiet.complete, "on_complete", ex)
    assert quiet.errors == {("boom", "on_complete"): 5}
    assert len(caplog.records) == 1
    assert "(1 times so far)" in caplog.records[0].getMessage()

    caplog.clear()
    chatty = Hooks([boom], log_interval=0)
    for _ in range(3):
        chatty.call(chatty.complete, "on_complete", ex)
    assert len(caplog.records) == 3
    assert "(3 times so far)" in caplog.records[-1].getMessage()


def test_one_failing_observer_does_not_stop_the_next() -> None:
    boom, seen = Boom(), Completions()
    hooks = Hooks([boom, seen])
    ex = Exchange(0.0, "127.0.0.1")
    hooks.call(hooks.complete, "on_complete", ex)
    assert seen.done == [ex]


def test_base_exception_is_not_swallowed() -> None:
    class Exit(Observer):
        name = "exit"

        def on_complete(self, ex: Exchange) -> None:
            raise KeyboardInterrupt

    hooks = Hooks([Exit()])
    with pytest.raises(KeyboardInterrupt):
        hooks.call(hooks.complete, "on_complete", Exchange(0.0, ""))


# -- which hooks are called -------------------------------------------------------------------


def test_only_overridden_hooks_are_bound() -> None:
    class OnlyComplete(Observer):
        name = "only"

        def on_complete(self, ex: Exchange) -> None:
            pass

    class Inherits(OnlyComplete):
        name = "inherits"

    class OptsOut(Boom):
        def __init__(self) -> None:
            super().__init__()
            self.on_response_body = None  # type: ignore[assignment]

    only, inherits, opts_out = OnlyComplete(), Inherits(), OptsOut()
    hooks = Hooks([only, inherits, opts_out, Observer()])
    assert [name for name, _ in hooks.complete] == ["only", "inherits", "boom"]
    for chain in (hooks.request_head, hooks.request_body, hooks.upstream_head, hooks.first_byte):
        assert [name for name, _ in chain] == ["boom"]
    assert hooks.response_body == []


async def test_hooks_not_overridden_are_not_called(
    make_proxy: ProxyFactory, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    called: Counter[str] = Counter()

    def counting(hook: str) -> object:
        def base_hook(self: Observer, *args: object) -> None:
            called[hook] += 1

        return base_hook

    # the base class's (no-op) hooks now count their calls; a subclass that does not override them
    # inherits these very functions, so any call through the chain would show here
    for hook in HOOK_NAMES:
        if hook != "on_complete":
            monkeypatch.setattr(Observer, hook, counting(hook))

    class Spy(Observer):
        name = "spy"

        def on_complete(self, ex: Exchange) -> None:
            called["on_complete"] += 1

    app = await make_proxy(upstream, observers=(Spy(),))
    client = await Client.connect(app.proxy_address)
    assert (await client.request("POST", "/echo", body=b"x")).status == 200
    assert (await client.request("GET", "/sse?events=2&delay=0")).status == 200
    await client.close()
    await _until(lambda: called["on_complete"] == 2)
    assert called == {"on_complete": 2}


# -- on_complete exactly once -----------------------------------------------------------------


async def test_on_complete_once_for_success(make_proxy: ProxyFactory, upstream: str) -> None:
    seen = Completions()
    app = await make_proxy(upstream, observers=(seen,))
    client = await Client.connect(app.proxy_address)
    for path in ("/echo", "/status/404", "/sse?events=2&delay=0"):
        await client.request("GET", path)
    await client.close()
    await _until(lambda: len(seen.done) == 3)
    assert [ex.status for ex in seen.done] == [200, 404, 200]
    assert len({id(ex) for ex in seen.done}) == 3
    assert seen.heads == 3
    assert all(ex.t_done >= ex.t_accepted > 0 for ex in seen.done)


async def test_on_complete_once_for_upstream_down(make_proxy: ProxyFactory) -> None:
    seen = Completions()
    sock = bound_socket()
    app = await make_proxy(f"http://127.0.0.1:{sock.getsockname()[1]}", observers=(seen,))
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo")
    assert resp.status == 502
    await client.close()
    sock.close()
    await _until(lambda: len(seen.done) == 1)
    (ex,) = seen.done
    assert (ex.status, ex.error) == (502, "connect")
    assert seen.heads == 1


async def test_on_complete_once_for_a_malformed_request(make_proxy: ProxyFactory, upstream: str) -> None:
    seen = Completions()
    app = await make_proxy(upstream, observers=(seen,))
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
    resp = await client.response()
    assert resp.status == 400
    assert await client.closed()
    await client.close()
    await _until(lambda: len(seen.done) == 1)
    (ex,) = seen.done
    assert ex.status == 400
    assert seen.heads == 0  # it never became a request the upstream saw
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", code="400") == 1


async def test_on_complete_once_for_a_rejected_head(make_proxy: ProxyFactory, upstream: str) -> None:
    seen = Completions()
    app = await make_proxy(upstream, observers=(seen,))
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo", host=None)  # HTTP/1.1 without Host
    assert resp.status == 400
    await client.close()
    await _until(lambda: len(seen.done) == 1)
    assert seen.done[0].status == 400


async def test_on_complete_once_for_a_client_abort(make_proxy: ProxyFactory, upstream: str) -> None:
    seen = Completions()
    app = await make_proxy(upstream, observers=(seen,))
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET /sse?events=50&delay=0.05 HTTP/1.1\r\nHost: t\r\n\r\n")
    async with asyncio.timeout(TIMEOUT):
        await client.reader.readuntil(b"data: ")
    client.writer.transport.abort()
    await _until(lambda: len(seen.done) == 1)
    (ex,) = seen.done
    assert ex.aborted
    assert ex.status == 200


async def test_on_complete_once_for_a_head_timeout(make_proxy: ProxyFactory, upstream: str) -> None:
    seen = Completions()
    app = await make_proxy(upstream, observers=(seen,), limits={"header_timeout": 0.2})
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n")  # the head never ends
    resp = await client.response()
    assert resp.status == 408
    await client.close()
    await _until(lambda: len(seen.done) == 1)
    assert seen.done[0].status == 408
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", code="408") == 1


async def test_on_complete_once_for_a_connection_over_the_limit(make_proxy: ProxyFactory, upstream: str) -> None:
    seen = Completions()
    app = await make_proxy(upstream, observers=(seen,), limits={"max_connections": 1})
    first = await Client.connect(app.proxy_address)
    assert (await first.request("GET", "/echo")).status == 200
    second = await Client.connect(app.proxy_address)
    resp = await second.response()
    assert resp.status == 503
    assert await second.closed()
    await second.close()
    await first.close()
    await _until(lambda: len(seen.done) == 2)
    assert sorted(ex.status for ex in seen.done) == [200, 503]
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", code="503") == 1


@pytest.mark.parametrize("closer", ["client", "upstream"])
async def test_on_complete_once_for_an_upgraded_tunnel(
    make_proxy: ProxyFactory, raw_upstream: Callable[..., Awaitable[RawUpstream]], closer: str
) -> None:
    async def websocket_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            data = await reader.readexactly(4)
            writer.write(data.upper())
            await writer.drain()
            if closer == "client":
                await reader.read()  # until the proxy closes its side

    up = await raw_upstream(websocket_like)
    seen = Completions()
    app = await make_proxy(up.url, observers=(seen,))
    client = await Client.connect(app.proxy_address)
    await client.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    resp = await client.response()
    assert resp.status == 101
    await client.send(b"ping")
    async with asyncio.timeout(TIMEOUT):
        assert await client.reader.readexactly(4) == b"PING"
    if closer == "client":
        await client.close()
    else:
        assert await client.closed()
        await client.close()
    await _until(lambda: len(seen.done) == 1)
    (ex,) = seen.done
    assert (ex.status, ex.upgraded, ex.aborted) == (101, True, False)
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", code="101") == 1
    assert metric(m, "infermon_client_aborts_total") == 0
    assert metric(m, "infermon_requests_in_flight") == 0


class Order(Observer):
    """Records the hook calls of every exchange, in order."""

    name = "order"

    def __init__(self) -> None:
        self.calls: dict[int, list[str]] = {}
        self.bodies: dict[int, bytes] = {}

    def on_request_head(self, ex: Exchange) -> None:
        self.calls.setdefault(id(ex), []).append("head")

    def on_request_body(self, ex: Exchange, chunk: bytes) -> None:
        self.calls.setdefault(id(ex), []).append("body")
        self.bodies[id(ex)] = self.bodies.get(id(ex), b"") + chunk

    def on_complete(self, ex: Exchange) -> None:
        self.calls.setdefault(id(ex), []).append("complete")


async def test_pipelined_bodies_reach_observers_after_their_head(make_proxy: ProxyFactory, upstream: str) -> None:
    """A pipelined request's body is read before its turn; its pieces wait for its on_request_head."""
    order = Order()
    app = await make_proxy(upstream, observers=(order,))
    client = await Client.connect(app.proxy_address)
    bodies = [b"first-body", b"second-body-" * 20, b"third"]
    await client.send(b"".join(build_request("POST", "/echo", body=b) for b in bodies))
    for _ in bodies:
        assert (await client.response()).status == 200
    calls = list(order.calls.values())
    assert len(calls) == 3
    for seen in calls:
        assert seen[0] == "head" and seen[-1] == "complete" and "body" in seen
    assert sorted(order.bodies.values()) == sorted(bodies)
