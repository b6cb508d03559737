"""Real OTLP trace receivers for the tests: OTLP/HTTP (aiohttp) and OTLP/gRPC (grpcio).

Both decode ``ExportTraceServiceRequest`` with opentelemetry-proto and keep every span with its
resource attributes. Tests await :meth:`Receiver.wait_spans` (an asyncio.Event set on each export)
instead of sleeping. ``mode`` switches a receiver to ``"fail"`` (HTTP 503 / gRPC UNAVAILABLE) or
``"hang"`` (answers only when released or after ``hang_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
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
class Receiver:
    loop: asyncio.AbstractEventLoop
    url: str = ""
    mode: str = "ok"
    hang_s: float = 30.0
    spans: list[Received] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    requests: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    release: threading.Event = field(default_factory=threading.Event)  # for the gRPC server's threads
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def unblock(self) -> None:
        """End every hanging export."""
        self.release.set()
        self.released.set()

    def record(self, body: bytes, headers: dict[str, str]) -> None:
        """Called on the loop thread for every export request."""
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


async def http_receiver() -> AsyncIterator[Receiver]:
    """An OTLP/HTTP receiver on a free port; ``receiver.url`` is its base URL."""
    receiver = Receiver(asyncio.get_running_loop())

    async def export(request: web.Request) -> web.Response:
        body = await request.read()
        if receiver.mode == "fail":
            receiver.bump()
            return web.Response(status=503)
        if receiver.mode == "hang":
            receiver.bump()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(receiver.hang_s):
                    await receiver.released.wait()
            return web.Response(status=503)
        receiver.record(body, dict(request.headers))
        return web.Response(
            body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
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
        if rec.mode == "fail":
            rec.loop.call_soon_threadsafe(rec.bump)
            context.abort(grpc.StatusCode.UNAVAILABLE, "down for the test")
        if rec.mode == "hang":
            rec.loop.call_soon_threadsafe(rec.bump)
            rec.release.wait(rec.hang_s)
            context.abort(grpc.StatusCode.UNAVAILABLE, "hung for the test")
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        rec.loop.call_soon_threadsafe(rec.record, request.SerializeToString(), metadata)
        return trace_service_pb2.ExportTraceServiceResponse()


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
