"""Test helpers: a raw HTTP/1.1 client, scripted upstream servers, and metric readers.

Everything talks over real sockets on 127.0.0.1. Every network wait is bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

TIMEOUT = 10.0


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening-ready socket on a free port (passed to servers so no port can be stolen)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunked: bool = False
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for n, v in self.headers:
            if n.lower() == key:
                return v.decode("latin-1")
        return None

    def header_all(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.headers if n.lower() == key]

    def json(self) -> object:
        import orjson

        return orjson.loads(self.body)


_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ?(.*)$")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    m = _STATUS_LINE.match(lines[0])
    if m is None:
        raise ValueError(f"bad status line {lines[0]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or name != name.strip() or not name:
            raise ValueError(f"bad header line {line!r}")
        headers.append((name, value.strip()))
    return int(m.group(1)), m.group(2), headers


async def read_response(reader: asyncio.StreamReader, head_only: bool = False) -> Response:
    """Read exactly one response (Content-Length, chunked or until close), leaving what follows."""
    interim: list[int] = []
    async with asyncio.timeout(TIMEOUT):
        try:
            while True:
                status, reason, headers = await _read_head(reader)
                if 100 <= status < 200 and status != 101:
                    interim.append(status)
                    continue
                break
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError("connection closed before a response head") from exc
        names = {n.lower(): v for n, v in headers}
        chunked = b"chunked" in names.get(b"transfer-encoding", b"").lower()
        trailers: list[tuple[bytes, bytes]] = []
        body = b""
        try:
            if head_only or status in (101, 204, 304):
                pass
            elif chunked:
                parts = []
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                    if size == 0:
                        break
                    parts.append(await reader.readexactly(size))
                    if await reader.readexactly(2) != b"\r\n":
                        raise ValueError("chunk not followed by CRLF")
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    name, _, value = line[:-2].partition(b":")
                    trailers.append((name, value.strip()))
                body = b"".join(parts)
            elif b"content-length" in names:
                body = await reader.readexactly(int(names[b"content-length"]))
            else:
                body = await reader.read()  # close-delimited
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError("connection closed before the response was complete") from exc
    return Response(status, reason, headers, body, trailers, chunked, interim)


OPEN_CLIENTS: list[Client] = []


class Client:
    """One raw client connection: send bytes, read parsed responses.

    Every client is closed at the end of its test by the ``_close_clients`` fixture.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        OPEN_CLIENTS.append(self)

    @classmethod
    async def connect(cls, addr: tuple[str, int]) -> Client:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(addr[0], addr[1], limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(TIMEOUT):
            await self.writer.drain()

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        body: bytes = b"",
        host: str | None = "test",
    ) -> Response:
        await self.send(build_request(method, path, headers, body, host))
        return await self.response(head_only=method == "HEAD")

    async def response(self, head_only: bool = False) -> Response:
        return await read_response(self.reader, head_only)

    async def closed(self) -> bool:
        """True when the server closes the connection (EOF) within TIMEOUT."""
        try:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
        except (ConnectionError, TimeoutError):
            return isinstance(self.reader.exception(), ConnectionError) or self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(TIMEOUT):
                await self.writer.wait_closed()


def build_request(
    method: str = "GET",
    path: str = "/",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: str | None = "test",
) -> bytes:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in items}
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None and "host" not in names:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in items]
    if body and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- a scripted raw upstream ------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    """A TCP server whose per-connection behaviour is a coroutine; counts connections."""

    handler: Handler
    server: asyncio.base_events.Server | None = None
    connections: int = 0
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.writers.append(writer)
            task = asyncio.current_task()
            if task is not None:
                self.tasks.add(task)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        sock = bound_socket()
        self.server = await asyncio.start_server(on_conn, sock=sock, limit=1 << 20)
        self.port = sock.getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=TIMEOUT)
        if self.server is not None:
            async with asyncio.timeout(TIMEOUT):
                await self.server.wait_closed()


async def read_request_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], list[tuple[str, str]]]:
    """Read a request head; returns (request line, lower-case header dict, raw header list)."""
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    pairs: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            pairs.append((name.strip(), value.strip()))
    return lines[0], {k.lower(): v for k, v in pairs}, pairs


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    out: list[bytes] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(out)
            out.append(await reader.readexactly(size))
            await reader.readexactly(2)


# -- metrics ----------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted label items: value}"""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def metric(
    metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str
) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.get(name, {}).items():
        d = dict(key)
        if all(d.get(k) == v for k, v in labels.items()):
            total += value
    return total


async def scrape(admin: tuple[str, int], accept: str | None = None) -> tuple[str, str]:
    """GET /metrics over a raw socket; returns (content type, body text)."""
    client = await Client.connect(admin)
    try:
        headers = {"Accept": accept} if accept else None
        resp = await client.request("GET", "/metrics", headers=headers)
    finally:
        await client.close()
    assert resp.status == 200, resp
    return resp.header("content-type") or "", resp.body.decode()


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT, step: float = 0.02) -> None:
    """Poll an observable condition (for state only visible by polling, like /metrics)."""
    async with asyncio.timeout(timeout):
        while not await predicate():  # noqa: ASYNC110 - the condition is only observable by polling
            await asyncio.sleep(step)


async def body_stream(total: int, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
    block = b"x" * chunk
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield block if n == chunk else block[:n]
        sent += n


async def fetch(
    addr: tuple[str, int], path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> Response:
    """One request on a fresh connection (for the admin server and other one-off calls)."""
    client = await Client.connect(addr)
    try:
        return await client.request(method, path, headers=headers)
    finally:
        await client.close()


async def scrape_metrics(admin: tuple[str, int]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics and parse it: sample name -> {sorted label items: value}."""
    _, text = await scrape(admin)
    return parse_metrics(text)
