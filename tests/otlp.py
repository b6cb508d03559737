"""Real OTLP trace receivers for the tests: OTLP/HTTP (aiohttp) and OTLP/gRPC (grpcio).

Both decode ``ExportTraceServiceRequest`` with opentelemetry-proto and keep every span with its
resource attributes. Tests await :meth:`Receiver.wait_spans` (an asyncio.Event set on each export)
instead of sleeping. ``mode`` switches a receiver to ``"fail"`` (HTTP 503 / gRPC UNAVAILABLE) or
``"hang"`` (answers only when released or after ``hang_s``). ``answers`` scripts the next requests'
failures (an HTTP status with Retry-After, a gRPC code with RetryInfo), one per request, before the
receiver goes back to ``mode``; ``reject`` answers a partial success. The HTTP receiver reads bodies
as they came (no automatic decompression) and gunzips a ``Content-Encoding: gzip`` one itself;
``wire`` keeps what came over the wire, ``raw`` the decoded request. :class:`GrpcWireTap` relays
gRPC traffic and reads each request message's compressed flag off the HTTP/2 frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]
from google.rpc.status_pb2 import Status  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.helpers import TIMEOUT, bound_socket


def value_of(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(items: Any) -> dict[str, Any]:
    """OTLP KeyValue list -> dict."""
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in items:
        out[kv.key] = value_of(kv.value)
    return out


@dataclass
class Received:
    span: Span
    resource: dict[str, Any]

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return attrs(self.span.attributes)


@dataclass
class Answer:
    """A scripted failure for one export request."""

    http_status: int = 503
    retry_after: str | None = None  # the Retry-After header (HTTP)
    grpc_code: str = "UNAVAILABLE"
    retry_delay: float | None = None  # RetryInfo.retry_delay in the status details (gRPC)


@dataclass
class Receiver:
    loop: asyncio.AbstractEventLoop
    url: str = ""
    mode: str = "ok"
    hang_s: float = 30.0
    answers: deque[Answer] = field(default_factory=deque)
    reject: tuple[int, str] | None = None  # answer a partial success: (rejected spans, message)
    spans: list[Received] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)  # decoded request bodies
    wire: list[bytes] = field(default_factory=list)  # request bodies as they came (HTTP)
    requests: int = 0
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of every export request
    headers: list[dict[str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    release: threading.Event = field(default_factory=threading.Event)  # for the gRPC server's threads
    released: asyncio.Event = field(default_factory=asyncio.Event)
    connections: Callable[[], int] = lambda: 0  # open client connections (HTTP receiver)

    def unblock(self) -> None:
        """End every hanging export."""
        self.release.set()
        self.released.set()

    def record(self, body: bytes, headers: dict[str, str]) -> None:
        """Called on the loop thread for every export request that is answered with success."""
        self.requests += 1
        self.headers.append(headers)
        self.raw.append(body)
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            resource = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.append(Received(span, resource))
        self.changed.set()

    def bump(self) -> None:
        self.requests += 1
        self.changed.set()

    def response(self) -> trace_service_pb2.ExportTraceServiceResponse:
        out = trace_service_pb2.ExportTraceServiceResponse()
        if self.reject is not None:
            out.partial_success.rejected_spans, out.partial_success.error_message = self.reject
        return out

    async def wait_spans(self, n: int, timeout: float = TIMEOUT) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.spans) < n:
                self.changed.clear()
                await self.changed.wait()
        return self.spans

    async def wait_requests(self, n: int, timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while self.requests < n:
                self.changed.clear()
                await self.changed.wait()


async def http_receiver(keepalive_timeout: float = 75.0) -> AsyncGenerator[Receiver, None]:
    """An OTLP/HTTP receiver on a free port; ``receiver.url`` is its base URL. It closes connections
    idle for ``keepalive_timeout`` seconds; ``receiver.connections()`` counts the open ones."""
    receiver = Receiver(asyncio.get_running_loop())

    async def export(request: web.Request) -> web.Response:
        receiver.arrivals.append(time.monotonic())
        body = await request.read()
        if receiver.answers:
            answer = receiver.answers.popleft()
            receiver.bump()
            headers = {"Retry-After": answer.retry_after} if answer.retry_after is not None else {}
            return web.Response(status=answer.http_status, headers=headers)
        if receiver.mode == "fail":
            receiver.bump()
            return web.Response(status=503)
        if receiver.mode == "hang":
            receiver.bump()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(receiver.hang_s):
                    await receiver.released.wait()
            return web.Response(status=503)
        receiver.wire.append(body)
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        receiver.record(body, dict(request.headers))
        return web.Response(body=receiver.response().SerializeToString(), content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=0.5,
        auto_decompress=False,
        keepalive_timeout=keepalive_timeout,
    )
    await runner.setup()
    server = runner.server
    receiver.connections = lambda: len(server.connections) if server is not None else 0
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    receiver.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield receiver
    finally:
        receiver.unblock()
        await runner.cleanup()


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        import grpc  # type: ignore[import-untyped]

        rec = self.receiver
        rec.arrivals.append(time.monotonic())
        answer = None
        with contextlib.suppress(IndexError):
            answer = rec.answers.popleft()
        if answer is not None:
            rec.loop.call_soon_threadsafe(rec.bump)
            if answer.retry_delay is not None:
                status = Status(code=getattr(grpc.StatusCode, answer.grpc_code).value[0], message="scripted")
                seconds, fraction = divmod(answer.retry_delay, 1.0)
                delay = Duration(seconds=int(seconds), nanos=int(fraction * 1e9))
                status.details.add().Pack(RetryInfo(retry_delay=delay))
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
            context.abort(getattr(grpc.StatusCode, answer.grpc_code), "scripted for the test")
        if rec.mode == "fail":
            rec.loop.call_soon_threadsafe(rec.bump)
            context.abort(grpc.StatusCode.UNAVAILABLE, "down for the test")
        if rec.mode == "hang":
            rec.loop.call_soon_threadsafe(rec.bump)
            rec.release.wait(rec.hang_s)
            context.abort(grpc.StatusCode.UNAVAILABLE, "hung for the test")
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        rec.loop.call_soon_threadsafe(rec.record, request.SerializeToString(), metadata)
        return rec.response()


async def grpc_receiver() -> AsyncIterator[Receiver]:
    """An OTLP/gRPC receiver (grpcio, its own threads); ``receiver.url`` is http://127.0.0.1:PORT."""
    import grpc

    receiver = Receiver(asyncio.get_running_loop())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(receiver), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver.url = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        receiver.unblock()
        await asyncio.to_thread(lambda: server.stop(grace=0.5).wait(5))


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME = struct.Struct(">I")


class GrpcWireTap:
    """A TCP relay in front of a gRPC server that reads the client's HTTP/2 frames as they pass.

    For every stream, the first byte of its first DATA frame is the gRPC message's compressed flag
    (1: compressed with the call's grpc-encoding); :attr:`compressed_flags` lists them in order.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.compressed_flags: list[int] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = bound_socket()
        self._server = await asyncio.start_server(self._client, sock=sock)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        down = asyncio.create_task(self._pipe(up_reader, writer, None))
        self._tasks.add(down)
        try:
            await self._pipe(reader, up_writer, bytearray())
        finally:
            down.cancel()
            self._tasks.discard(down)
            up_writer.close()
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tap: bytearray | None) -> None:
        seen: set[int] = set()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
                if tap is not None:
                    tap += data
                    self._read_frames(tap, seen)

    def _read_frames(self, buf: bytearray, seen: set[int]) -> None:
        if buf.startswith(_PREFACE):
            del buf[: len(_PREFACE)]
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                return
            kind, stream = buf[3], _FRAME.unpack(buf[5:9])[0] & 0x7FFFFFFF
            if kind == 0 and length and stream not in seen:  # DATA
                seen.add(stream)
                self.compressed_flags.append(buf[9])
            del buf[: 9 + length]
