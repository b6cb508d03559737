"""Shared fixtures: the proxy under test (in-process, on uvloop) and upstream servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
import pytest
import uvloop
from aiohttp import web

from proxy.app import ProxyApp
from proxy.settings import ProxyConfig
from tests.helpers import OPEN_CLIENTS, RawUpstream, bound_socket


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    """Run every async test on uvloop, the loop infermon runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


ProxyFactory = Callable[..., Awaitable[ProxyApp]]


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    """Close every raw test client a test opened, so no socket outlives its test."""
    yield
    while OPEN_CLIENTS:
        await OPEN_CLIENTS.pop().close()


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    """``await make_proxy(upstream_url, limits={...}, ...)`` -> a started ProxyApp on free ports."""
    apps: list[ProxyApp] = []

    async def factory(upstream: str, observers: tuple[Any, ...] = (), **overrides: Any) -> ProxyApp:
        data = _merge(
            {"upstream": upstream, "readiness": {"interval": 0.2, "timeout": 1.0}, "drain": {"timeout": 2.0}},
            overrides,
        )
        app = ProxyApp(ProxyConfig.model_validate(data), observers=observers)
        await app.start(listen=bound_socket(), admin=bound_socket())
        apps.append(app)
        return app

    yield factory
    for app in apps:
        if app.plane is not None:
            app.plane.close()
        await app.shutdown()
    for _ in range(3):
        await asyncio.sleep(0)  # let aborted transports report connection_lost


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "body": body.decode("latin-1") if len(body) < 4096 else "",
        },
        dumps=lambda o: orjson.dumps(o).decode(),
    )


async def _status(request: web.Request) -> web.Response:
    return web.json_response({"status": "x"}, status=int(request.match_info["code"]))


async def _sse(request: web.Request) -> web.StreamResponse:
    events = int(request.query.get("events", "5"))
    delay = float(request.query.get("delay", "0.01"))
    first_delay = float(request.query.get("first_delay", "0"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if first_delay:
        await asyncio.sleep(first_delay)
    for i in range(events):
        await response.write(b"data: {\"i\": %d}\n\n" % i)
        await asyncio.sleep(delay)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "1")))
    return web.json_response({"slow": True})


async def _big(request: web.Request) -> web.Response:
    size = int(request.query.get("size", "1048576"))
    return web.Response(body=b"y" * size, content_type="application/octet-stream")


async def _header(request: web.Request) -> web.Response:
    return web.json_response({"ok": True}, headers={k: v for k, v in request.query.items()})


def upstream_app() -> web.Application:
    app = web.Application(client_max_size=1 << 40)
    app.router.add_route("*", "/echo{tail:.*}", _echo)
    app.router.add_route("*", "/status/{code}", _status)
    app.router.add_get("/sse", _sse)
    app.router.add_post("/sse", _sse)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/big", _big)
    app.router.add_get("/respond-headers", _header)
    app.router.add_route("*", "/v2/models/{tail:.*}", _echo)
    app.router.add_route("*", "/v1/models/{tail:.*}", _echo)
    app.router.add_get("/v2/health/ready", _ready)
    return app


async def _ready(request: web.Request) -> web.Response:
    return web.json_response({"ready": True})


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """A real aiohttp model-server-like upstream; yields its base URL."""
    runner = web.AppRunner(
        upstream_app(), access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    sock = bound_socket()
    site = web.SockSite(runner, sock)
    await site.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    await runner.cleanup()


Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(app)`` -> base URL of an aiohttp app on a free port; cleaned up after the test."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        sock = bound_socket()
        await web.SockSite(runner, sock).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    """``await raw_upstream(handler)`` -> a started scripted TCP upstream."""
    started: list[RawUpstream] = []

    async def factory(handler: Any) -> RawUpstream:
        up = await RawUpstream(handler).start()
        started.append(up)
        return up

    yield factory
    for up in started:
        with contextlib.suppress(Exception):
            await up.stop()


class ProxyProcess:
    """``infermon proxy`` as a real child process (for signals and memory measurements)."""

    def __init__(self, proc: asyncio.subprocess.Process, listen: tuple[str, int], admin: tuple[str, int]) -> None:
        self.proc = proc
        self.listen = listen
        self.admin = admin

    def peak_rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


@pytest.fixture
async def spawn_proxy() -> AsyncIterator[Callable[..., Awaitable[ProxyProcess]]]:
    """``await spawn_proxy(upstream_url, *extra_args, env={...})`` -> a ready proxy subprocess."""
    import os
    import sys

    from tests.helpers import TIMEOUT, Client, free_port

    procs: list[ProxyProcess] = []

    async def factory(upstream: str, *args: str, env: dict[str, str] | None = None) -> ProxyProcess:
        listen = ("127.0.0.1", free_port())
        admin = ("127.0.0.1", free_port())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "proxy",
            "--listen", f"{listen[0]}:{listen[1]}", "--admin", f"{admin[0]}:{admin[1]}",
            "--upstream", upstream, *args,
            env={**os.environ, **(env or {})},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        pp = ProxyProcess(proc, listen, admin)
        procs.append(pp)
        async with asyncio.timeout(TIMEOUT):
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"proxy exited with {proc.returncode}")
                try:
                    client = await Client.connect(admin)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                resp = await client.request("GET", "/healthz")
                await client.close()
                if resp.status == 200:
                    return pp

    yield factory
    for pp in procs:
        if pp.proc.returncode is None:
            pp.proc.kill()
        await pp.proc.wait()
