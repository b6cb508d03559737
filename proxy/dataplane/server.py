"""The client side of the data plane: one :class:`ClientConnection` protocol per client connection.

Each request goes through the ``_Request`` states (``state``, ordered)::

    QUEUED (pipelined behind another) -> CONNECTING (started, waiting for an upstream connection)
      -> SENT (request going up) -> RESPONDING (response head sent) -> DONE

Requests on one connection are answered strictly in order: a pipelined request waits in the queue,
with reading paused, until the one before it is finished. A request still QUEUED when the connection
ends was never started: it is dropped (counted), never reported as an exchange. Bodies are never
buffered beyond one read (plus ``retry_buffer_bytes`` kept for a stale-connection retry): reading
from one side is paused while the other side's write buffer is full, and that flow-control state
follows the connection: an upstream connection attached while the client's writes are paused starts
paused, and one handed back to the pool always reads again.

The head rules (validation, hop-by-hop removal, forwarding fields, framing) are pure functions in
:mod:`proxy.dataplane.heads`; this module is the connection state machine around them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Protocol, cast

import httptools

from proxy.dataplane import http
from proxy.dataplane.exchange import Exchange, Headers
from proxy.dataplane.heads import (
    STREAMED,
    HeadRules,
    Rejection,
    RequestHead,
    forward_trailers,
    interim_head,
    prepare_request,
    prepare_response,
    switching_head,
)
from proxy.dataplane.heads import serialize_request as _serialize
from proxy.dataplane.hooks import Hooks
from proxy.dataplane.timer import Deadline
from proxy.dataplane.upstream import WRITE_HIGH, WRITE_LOW, Ticket, UpstreamConnection, UpstreamPool
from proxy.errors import ExchangeError, UpstreamProtocolError
from proxy.settings import LimitValues, ProxyConfig

log = logging.getLogger("infermon.dataplane")

# reasons to pause reading from the client (a bit mask)
PAUSE_PIPELINE = 1  # a later request waits for the current one
PAUSE_UPSTREAM = 2  # upstream write buffer is full
PAUSE_BUFFER = 4  # body arriving before an upstream connection is attached
PAUSE_LINGER = 8
PAUSE_STOP = 16  # nothing more is read as HTTP from this client (after a parse error, an upgrade)

PENDING_LIMIT = 64 * 1024
LINGER_SECONDS = 2.0

# where a chunked request body is (trailers are bounded like a head)
NO_CHUNK = 0
IN_CHUNK_HEAD = 1  # a chunk-size line was read, no data yet: chunk data or, after the last chunk, trailers
IN_CHUNK_BODY = 2

# what the connection deadline means when it fires
T_HEAD = 1
T_BODY = 2
T_IDLE = 3
T_LINGER = 4

# where a request is in its life (``_Request.state``); ordered, each one implies the ones before
QUEUED = 0  # head parsed; waits behind an earlier request on this connection
CONNECTING = 1  # started: on_request_head ran, waiting for an upstream connection
SENT = 2  # attached to an upstream connection; the request is going up
RESPONDING = 3  # the response head went to the client (an error answered by the proxy included)
DONE = 4  # finished and recorded

_METHOD_NAMES = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")}


class _Plane(Protocol):
    """What a client connection needs of the data plane (``proxy.dataplane.core.DataPlane``)."""

    cfg: ProxyConfig
    limits: LimitValues
    hooks: Hooks
    loop: asyncio.AbstractEventLoop
    rules: HeadRules
    connections: set[ClientConnection]
    in_flight: int
    draining: bool
    closing: bool  # the data plane is cutting every connection (drain timeout, shutdown)
    drained: asyncio.Event
    dropped_pipelined: int

    def route(self, ex: Exchange) -> UpstreamPool: ...


class _Request:
    __slots__ = (
        "chunked_in",
        "chunked_out",
        "close_after",
        "early",
        "error",
        "ex",
        "head",
        "head_only",
        "headed",
        "in_flight",
        "pending",
        "pending_bytes",
        "pool",
        "request_done",
        "retry_body",
        "retry_bytes",
        "state",
        "ticket",
        "upstream",
        "wire",
    )

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.state = QUEUED
        self.error: Rejection | None = None  # answered by the proxy itself when it starts
        self.head: RequestHead | None = None
        self.wire = b""  # the request head as sent upstream
        self.headed = False  # on_request_head has run
        #: body pieces read before on_request_head ran (a pipelined request's, read ahead of its
        #: turn): handed to on_request_body right after it, so observers see them in order
        self.early: list[bytes] | None = None
        self.head_only = False  # HEAD: the response has no body whatever its fields say
        self.chunked_in = False  # the request body comes chunked and goes up chunked
        self.chunked_out = False  # the response body goes to the client chunked
        self.close_after = False  # the client connection ends after this exchange
        self.request_done = False  # the whole request body was received
        self.in_flight = False  # counted in plane.in_flight
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.retry_body: list[bytes] | None = []
        self.retry_bytes = 0
        self.ticket: Ticket | None = None
        self.upstream: UpstreamConnection | None = None
        self.pool: UpstreamPool | None = None



class ClientConnection(asyncio.Protocol):
    def __init__(self, plane: _Plane) -> None:
        self.plane = plane
        cfg = plane.cfg
        self.limits = plane.limits
        self.max_headers = cfg.limits.max_headers
        self.retry_any = cfg.upstream_pool.retry_non_idempotent
        self.retry_buffer = cfg.upstream_pool.retry_buffer_bytes
        self.hooks = plane.hooks
        self.rules = plane.rules
        self.rid_header = plane.rules.request_id_header
        self.transport: asyncio.Transport | None = None
        self.client_host = ""
        self.parser = httptools.HttpRequestParser(self)
        self.requests: deque[_Request] = deque()  # unanswered, oldest first (the first is active)
        self.parsing: _Request | None = None
        self.closed = False
        self.tunnel: UpstreamConnection | None = None
        self.deadline = Deadline(plane.loop, self._deadline_passed)
        self.deadline_kind = T_HEAD
        self._paused = 0
        self._writing_paused = False  # the client's write buffer is over its high-water mark
        self._last = False  # a request that ends the connection was read: later ones are dropped
        self._url = b""
        self._headers: Headers = []
        self._head_size = 0
        self._raw_head = 0  # bytes received while a head is incomplete
        self._in_head = False
        self._reject: Rejection | None = None
        self._chunk = NO_CHUNK
        self._trailer_bytes = 0
        self._trailer_fields = 0
        self._feeding = False  # inside parser.feed_data: upstream writes are flushed after it

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        peer = transport.get_extra_info("peername")
        self.client_host = peer[0] if isinstance(peer, tuple) else ""
        plane = self.plane
        plane.connections.add(self)
        if len(plane.connections) > self.limits.max_connections:
            ex = Exchange(time.perf_counter(), self.client_host)
            ex.request_id = http.new_request_id()
            self._respond_error_now(ex, 503, "too many client connections (limits.max_connections)")
            return
        self.deadline_kind = T_HEAD
        self.deadline.set_in(self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            self.tunnel.flush()
            return
        if self._paused & PAUSE_LINGER:
            return  # discarding what a client still sends after a final error
        if self.parsing is None or self._in_head:
            self._raw_head += len(data)
        in_trailers = self._chunk == IN_CHUNK_HEAD  # still so after this read: all of it was trailers
        self._feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            reject = self._reject
            self._reject = None
            if reject is None:
                cause = exc.__context__
                if isinstance(exc, httptools.HttpParserCallbackError) and cause is not None:
                    log.error("internal error while handling a request", exc_info=cause)
                    reject = Rejection(500, "internal proxy error")
                    if self.parsing is not None:
                        self.parsing.ex.error = "internal"
                else:
                    reject = Rejection(400, f"malformed request: {exc}")
            self._flush_up()
            self._parse_failed(reject)
            return
        finally:
            self._flush_up()
        if self._in_head and self._raw_head > self.limits.max_header_bytes:
            self._parse_failed(Rejection(431, "request head too large (limits.max_header_bytes)"))
        elif in_trailers and self._chunk == IN_CHUNK_HEAD and self.parsing is not None:
            # the parser buffers a trailer field until it ends: count the raw bytes, not only fields
            self._trailer_bytes += len(data)
            if self._trailer_bytes > self.limits.max_header_bytes:
                self._parse_failed(Rejection(431, "request trailer fields too large (limits.max_header_bytes)"))

    def _flush_up(self) -> None:
        self._feeding = False
        requests = self.requests
        if requests:
            conn = requests[0].upstream
            if conn is not None:
                conn.flush()

    def eof_received(self) -> bool | None:
        return False  # a client that stops sending mid-exchange has gone: treated as an abort

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._lost()
        except Exception as error:
            log.error("internal error while closing a client connection", exc_info=error)

    def _lost(self) -> None:
        self.closed = True
        self.deadline.cancel()
        self.plane.connections.discard(self)
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.abort()
        requests = self.requests
        self.requests = deque()
        for req in requests:
            if req.state == QUEUED:
                self.plane.dropped_pipelined += 1  # never started: dropped, not aborted
            else:
                self._abandon(req)
        self.parsing = None  # a half-received head is not a request

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.requests and self.requests[0].upstream is not None:
            self.requests[0].upstream.pause_reading()
        elif self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.requests and self.requests[0].upstream is not None:
            self.requests[0].upstream.resume_reading()
        elif self.tunnel is not None:
            self.tunnel.resume_reading()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = _Request(Exchange(time.perf_counter(), self.client_host))
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._in_head = True
        self._trailer_bytes = 0
        self._trailer_fields = 0
        self._chunk = NO_CHUNK
        # the head timeout runs for the request being read only while none is active: a pipelined
        # head behind a slow request is not late (its clock starts when its turn comes)
        if not self.requests and (self.deadline_kind != T_HEAD or self.deadline.when is None):
            self.deadline_kind = T_HEAD
            self.deadline.set_in(self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.limits.max_header_bytes:
            raise self._fail_parse(414 if len(self._url) > self.limits.max_header_bytes // 2 else 431,
                                   "request target too long (limits.max_header_bytes)")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # request trailers are not forwarded, but they are bounded like the head
            self._trailer_fields += 1
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_fields > self.max_headers:
                raise self._fail_parse(431, f"more than {self.max_headers} trailer fields (limits.max_headers)")
            if self._trailer_bytes > self.limits.max_header_bytes:
                raise self._fail_parse(431, "request trailer fields too large (limits.max_header_bytes)")
            return
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.limits.max_header_bytes:
            raise self._fail_parse(431, "request header fields too large (limits.max_header_bytes)")
        headers = self._headers
        if len(headers) >= self.max_headers:
            raise self._fail_parse(431, f"more than {self.max_headers} header fields (limits.max_headers)")
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.parsing
        assert req is not None
        self._in_head = False
        self._raw_head = 0
        ex = req.ex
        ex.t_head = time.perf_counter()
        if self._last:
            # RFC 9112 9.6: after a request that closes the connection nothing more is processed
            self.parsing = None
            self.plane.dropped_pipelined += 1
            self._pause(PAUSE_STOP)
            return
        parser = self.parser
        raw_method = parser.get_method()
        method = _METHOD_NAMES.get(raw_method)
        if method is None:
            method = raw_method.decode("ascii", "replace")
        ex.method = method
        ex.http_version = version = parser.get_http_version()
        head = req.head = prepare_request(
            self.rules, method, self._url, version, parser.should_keep_alive(), self._headers, self.client_host
        )
        ex.target = head.target
        ex.path = head.path
        ex.request_id = head.request_id
        ex.request_headers = head.headers
        req.head_only = head.head_only
        req.chunked_in = head.chunked
        if head.close:
            req.close_after = True
            self._last = True
        if head.reject is not None:
            req.error = head.reject
        if self.requests:
            pass  # pipelined: its body is not read (nor late) before its turn
        elif req.error is None and head.has_body:
            self.deadline_kind = T_BODY
            self.deadline.set_in(self.limits.body_timeout)
        else:
            self.deadline.clear()  # no body to wait for
        self.requests.append(req)
        if len(self.requests) == 1:
            self._start(req)
        else:
            self._pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        if req is None or req.error is not None:
            return
        ex = req.ex
        ex.bytes_in += len(body)
        limit = self.limits.max_request_body_bytes
        if limit is not None and ex.bytes_in > limit:
            raise self._fail_parse(413, f"request body larger than {limit} bytes (limits.max_request_body_bytes)")
        if self._chunk == IN_CHUNK_HEAD:
            self._chunk = IN_CHUNK_BODY
        if self.deadline_kind == T_BODY and self.deadline.when is not None:  # armed: the active body
            self.deadline.set_in(self.limits.body_timeout)
        if self.hooks.request_body:
            if req.headed:
                self.hooks.call(self.hooks.request_body, "on_request_body", ex, body)
            elif req.early is None:
                req.early = [body]
            else:
                req.early.append(body)
        if req.chunked_in:
            self._send_up(req, b"%x\r\n" % len(body))
            self._send_up(req, body)
            self._send_up(req, b"\r\n")
        else:
            self._send_up(req, body)

    def on_chunk_header(self) -> None:
        self._chunk = IN_CHUNK_HEAD  # until a body byte comes: either chunk data or the trailers

    def on_chunk_complete(self) -> None:
        self._chunk = NO_CHUNK

    def on_message_complete(self) -> None:
        req = self.parsing
        if req is None:
            return
        self.parsing = None
        if req.error is not None:
            return
        req.request_done = True
        req.ex.t_body_done = time.perf_counter()
        if self.deadline_kind == T_BODY:
            self.deadline.clear()
        if req.chunked_in:
            self._send_up(req, b"0\r\n\r\n")
        if req.upstream is not None and req.state < DONE:
            req.upstream.request_sent()
        if self._last:
            self._pause(PAUSE_STOP)  # nothing after this request is read

    def _fail_parse(self, status: int, message: str) -> Exception:
        self._reject = Rejection(status, message)
        return ValueError(message)

    # -- running a request --------------------------------------------------------------------

    def _start(self, req: _Request) -> None:
        try:
            self._begin(req)
        except Exception as exc:  # the router is user code; a bug here must not hang the request
            self._internal_error(req, exc, "starting a request")

    def _begin(self, req: _Request) -> None:
        ex = req.ex
        req.state = CONNECTING
        if req.error is not None:
            status, message = req.error
            self._respond_error(req, status, message)
            return
        plane = self.plane
        if plane.in_flight >= self.limits.max_in_flight:
            self._respond_error(req, 503, "too many requests in flight (limits.max_in_flight)")
            return
        plane.in_flight += 1
        req.in_flight = True
        if plane.draining:
            req.close_after = True
        req.headed = True
        hooks = self.hooks
        if hooks.request_head:
            hooks.call(hooks.request_head, "on_request_head", ex)
        early = req.early
        if early is not None:  # what was read of its body before its turn, in order
            req.early = None
            for piece in early:
                hooks.call(hooks.request_body, "on_request_body", ex, piece)
        # routing comes before serialization: the chosen upstream supplies a missing Host, and the
        # router (like any observer before it) may still add to ex.request_headers
        pool = req.pool = plane.route(ex)
        head = req.head
        assert head is not None
        head.headers = ex.request_headers
        req.wire = _serialize(head, pool.authority)
        conn = pool.take_idle()
        if conn is not None:
            self._attach(req, conn)
        else:
            req.ticket = pool.connect_or_wait(lambda c, e: self._pool_answered(req, c, e))

    def _pool_answered(self, req: _Request, conn: UpstreamConnection | None, error: ExchangeError | None) -> None:
        try:
            self._connection_ready(req, conn, error)
        except Exception as exc:
            self._internal_error(req, exc, "attaching an upstream connection")

    def _connection_ready(self, req: _Request, conn: UpstreamConnection | None, error: ExchangeError | None) -> None:
        req.ticket = None
        if self.closed or req.state == DONE or not self.requests or self.requests[0] is not req:
            if conn is not None:
                conn.pool.release(conn, reusable=True)
            return
        if conn is None:
            assert error is not None
            self._upstream_error(req, error)
        else:
            self._attach(req, conn)

    def _attach(self, req: _Request, conn: UpstreamConnection) -> None:
        req.upstream = conn
        if req.state < SENT:
            req.state = SENT
        req.ex.t_upstream_connected = time.perf_counter()
        conn.start(_Owner(self, req, conn), req.wire, req.head_only, req.request_done)
        if self._writing_paused:
            conn.pause_reading()  # the client cannot take more yet: the response waits upstream
        if conn.writing_paused:
            self._pause(PAUSE_UPSTREAM)  # its write buffer is still full from the last exchange
        if req.pending:
            conn.writelines(req.pending)
            req.pending = []
            req.pending_bytes = 0
            self._resume(PAUSE_BUFFER)
        if not self._feeding:
            conn.flush()

    def _send_up(self, req: _Request, data: bytes) -> None:
        """Forward request body bytes, or hold them until an upstream connection is attached."""
        if req.retry_body is not None:
            req.retry_bytes += len(data)
            if req.retry_bytes <= self.retry_buffer:
                req.retry_body.append(data)
            else:
                req.retry_body = None
        if req.state == DONE:
            return
        conn = req.upstream
        if conn is not None:
            conn.write(data)
        else:
            req.pending.append(data)
            req.pending_bytes += len(data)
            if req.pending_bytes > PENDING_LIMIT:
                self._pause(PAUSE_BUFFER)

    def _may_retry(self, req: _Request) -> bool:
        """RFC 9110 9.2.2: only idempotent requests (or opted-in ones) are sent again automatically."""
        head = req.head
        return (
            not req.ex.retried
            and req.retry_body is not None
            and req.state < RESPONDING
            and not self.closed
            and head is not None
            and (head.idempotent or self.retry_any)
        )

    def _upstream_error(self, req: _Request, error: ExchangeError, stale: bool = False) -> None:
        ex = req.ex
        if stale and self._may_retry(req):
            ex.retried = True
            req.upstream = None
            assert req.retry_body is not None
            req.pending = list(req.retry_body)
            req.pending_bytes = 0
            assert req.pool is not None
            req.ticket = req.pool.connect_or_wait(lambda c, e: self._pool_answered(req, c, e))
            return
        ex.error = error.kind
        req.upstream = None
        if req.state >= RESPONDING:
            # the status line is gone already: cutting the connection is the only honest signal
            self._finish(req)
            self._abort_transport()
            return
        self._respond_error(req, error.status, str(error))

    # -- responses ----------------------------------------------------------------------------

    def _respond_error(self, req: _Request, status: int, message: str) -> None:
        """Answer ``req`` with a JSON error and finish it."""
        ex = req.ex
        ex.status = status
        if req.upstream is not None:
            req.upstream.abort()
            req.upstream = None
        if req.ticket is not None:
            req.ticket.cancel()
            req.ticket = None
        if not req.request_done or status in (400, 408, 413, 414, 431):
            req.close_after = True
        transport = self.transport
        if transport is not None and not self.closed and req.state < RESPONDING:
            req.state = RESPONDING
            transport.write(
                http.error_response(
                    status,
                    message,
                    ex.request_id,
                    self.rid_header,
                    close=req.close_after,
                    head_only=req.head_only,
                )
            )
        self._finish(req)

    def _respond_error_now(self, ex: Exchange, status: int, message: str) -> None:
        """An error for a request that never got its own ``_Request`` (connection-level)."""
        req = _Request(ex)
        req.error = Rejection(status, message)
        req.close_after = True
        self.requests.append(req)
        if len(self.requests) == 1:
            self._start(req)

    def _finish(self, req: _Request) -> None:
        """The exchange is over: record it, then move on to the next request or close."""
        if req.state == DONE:
            return
        req.state = DONE
        ex = req.ex
        ex.t_done = time.perf_counter()
        if req.ticket is not None:
            req.ticket.cancel()
            req.ticket = None
        plane = self.plane
        if req.in_flight:
            req.in_flight = False
            plane.in_flight -= 1
            if plane.draining and plane.in_flight == 0:
                plane.drained.set()
        hooks = self.hooks
        if not req.headed and ex.t_head:
            # answered by the proxy itself (a limit, a bad header): the head was read, so observers
            # see it (labels, trace) like any other request
            req.headed = True
            if hooks.request_head:
                hooks.call(hooks.request_head, "on_request_head", ex)
        if hooks.complete:
            hooks.call(hooks.complete, "on_complete", ex)
        if self.requests and self.requests[0] is req:
            self.requests.popleft()
        if self.closed:
            return
        if self._paused & (PAUSE_UPSTREAM | PAUSE_BUFFER):
            self._resume(PAUSE_UPSTREAM | PAUSE_BUFFER)
        if req.close_after or (plane.draining and not self.requests and self.parsing is None):
            self._close(linger=not req.request_done)
            return
        if self.requests:
            nxt = self.requests[0]
            if len(self.requests) == 1:
                self._resume(PAUSE_PIPELINE)
            self._start(nxt)
        elif self.parsing is None:
            self.deadline_kind = T_IDLE
            self.deadline.set_in(self.limits.keepalive_timeout)
            if self._paused & PAUSE_PIPELINE:
                self._resume(PAUSE_PIPELINE)
        else:
            if self._in_head:  # a pipelined head is half read: its clock starts now
                self.deadline_kind = T_HEAD
                self.deadline.set_in(self.limits.header_timeout)
            self._resume(PAUSE_PIPELINE)

    def _abandon(self, req: _Request) -> None:
        """The connection ended with ``req`` started and unanswered: the client left, or the proxy
        cut it at the end of a drain (then it is not the client's doing: 503, ``error="drain"``)."""
        ex = req.ex
        if req.state == DONE:
            return
        if self.plane.closing:
            ex.error = "drain"
            if req.state < RESPONDING:
                ex.status = 503
        else:
            if not ex.upgraded:
                ex.aborted = True
            if req.state < RESPONDING:
                ex.status = 499
        if req.upstream is not None:
            req.upstream.abort()
            req.upstream = None
        self._finish(req)

    # -- connection control -------------------------------------------------------------------

    def _pause(self, bit: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
            if self.deadline_kind == T_BODY:
                self.deadline.clear()  # a body we are not reading cannot be late
        self._paused |= bit

    def _resume(self, bit: int) -> None:
        if self._paused & bit:
            self._paused &= ~bit
            if not self._paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()
                if self.parsing is not None and not self._in_head:
                    self.deadline_kind = T_BODY
                    self.deadline.set_in(self.limits.body_timeout)

    def _close(self, linger: bool) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if linger and transport.can_write_eof():
            # the client may still be sending a body we will not read: half-close and drain a little,
            # so our response is not destroyed by a TCP reset
            self._paused |= PAUSE_LINGER
            self._paused &= PAUSE_LINGER
            transport.resume_reading()
            transport.write_eof()
            self.deadline_kind = T_LINGER
            self.deadline.set_in(LINGER_SECONDS)
        else:
            transport.close()

    def _abort_transport(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def close_idle(self) -> None:
        """Drain: close now if nothing is in progress; otherwise after the current response."""
        if not self.requests and self.parsing is None and self.tunnel is None:
            self._close(linger=False)
        for req in self.requests:
            req.close_after = True

    def _parse_failed(self, reject: Rejection) -> None:
        """Answer a request we could not parse (in turn, after those before it) and close."""
        self.parser = httptools.HttpRequestParser(self)  # the old one is in an error state
        self._pause(PAUSE_STOP)
        self._in_head = False
        req = self.parsing
        self.parsing = None
        if req is not None and req in self.requests:  # the head was fine, the body was not
            if req is not self.requests[0]:
                req.error = reject
                req.close_after = True
            elif req.state < RESPONDING:
                self._respond_error(req, reject.status, reject.message)
            else:
                self._finish(req)
                self._abort_transport()
            return
        if self._last:
            # llhttp refuses data after a request that closes the connection: a pipelined request
            # that is never processed (RFC 9112 9.6), not an error to answer
            self.plane.dropped_pipelined += 1
            return
        if req is None:
            req = _Request(Exchange(time.perf_counter(), self.client_host))
        req.error = reject
        req.close_after = True
        if not req.ex.request_id:
            req.ex.request_id = http.new_request_id()
        self.requests.append(req)
        if len(self.requests) == 1:
            self._start(req)

    def _deadline_passed(self) -> None:
        try:
            self._deadline_due()
        except Exception as exc:
            self._internal_error(self.requests[0] if self.requests else None, exc, "at a client deadline")

    def _deadline_due(self) -> None:
        kind = self.deadline_kind
        if self.closed or self.transport is None:
            return
        if kind in (T_IDLE, T_LINGER):
            self.transport.close()
            return
        if kind == T_HEAD:
            if self.requests:
                return  # a request is active: its upstream timeouts run; a pipelined head waits its turn
            if self.parsing is None:  # not a byte of a new request: an idle connection, not an error
                self.transport.close()
                return
            ex = self.parsing.ex
            self.parsing = None
            ex.request_id = http.new_request_id()
            self._pause(PAUSE_STOP)
            self._respond_error_now(ex, 408, "request head not received in time (limits.header_timeout)")
            return
        req = self.parsing
        if kind != T_BODY or req is None or not self.requests or self.requests[0] is not req:
            return  # a body not being read (pipelined, or paused) is not late
        self.parsing = None
        if req.state < RESPONDING:
            self._respond_error(req, 408, "request body stalled (limits.body_timeout)")
            return
        self._finish(req)
        self._abort_transport()

    def _internal_error(self, req: _Request | None, exc: BaseException, where: str) -> None:
        """A bug of the proxy's own: logged with its traceback, the request answered 500 (or cut)."""
        log.error("internal error %s", where, exc_info=exc)
        if req is None or req.state == DONE:
            self._abort_transport()
            return
        req.ex.error = "internal"
        try:
            if req.upstream is not None:
                req.upstream.abort()
                req.upstream = None
            if req.state < RESPONDING:
                self._respond_error(req, 500, "internal proxy error")
            else:
                self._finish(req)
                self._abort_transport()
        except Exception as again:  # answering failed too: the connection cannot be trusted
            log.error("internal error while answering an internal error", exc_info=again)
            self._abort_transport()

    # -- upgrade (WebSocket) ------------------------------------------------------------------

    def _upgrade_requested(self, rest: bytes) -> None:
        """The parser stopped after an Upgrade request head; the request already started."""
        req = self.requests[-1] if self.requests else None
        if req is None or req.head is None or not req.head.upgrade:
            if req is not None:
                self._abort_transport()
            return  # already answered (and closing), e.g. CONNECT
        req.request_done = True
        req.close_after = True  # if the upstream declines the switch, this connection ends with its answer
        self.parsing = None
        if rest:
            self._send_up(req, rest)
        self._pause(PAUSE_STOP)  # no more HTTP from this client: it is a tunnel or it is over

    def tunnel_open(self, req: _Request, conn: UpstreamConnection, head: bytes, rest: bytes) -> None:
        assert self.transport is not None
        req.ex.upgraded = True
        req.state = RESPONDING
        self.tunnel = conn
        self.deadline.cancel()
        self.transport.write(head)
        if rest:
            self.transport.write(rest)
        self._paused = 0
        self.transport.resume_reading()

    def tunnel_closed(self, req: _Request) -> None:
        self.tunnel = None
        req.upstream = None
        self._finish(req)
        if self.transport is not None and not self.closed:
            self.transport.close()


class _Owner:
    """Receives one upstream exchange's events on behalf of a request; stale owners are ignored."""

    __slots__ = ("client", "conn", "first", "out", "req")

    def __init__(self, client: ClientConnection, req: _Request, conn: UpstreamConnection) -> None:
        self.client = client
        self.req = req
        self.conn = conn
        self.first = True
        #: response bytes gathered during one upstream read, written to the client in one call
        self.out: list[bytes] = []

    def upstream_flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            transport = self.client.transport
            if transport is not None and not self.client.closed:
                transport.write(out[0] if len(out) == 1 else b"".join(out))

    def upstream_interim(self, status: int, reason: bytes, headers: Headers) -> None:
        client = self.client
        if client.closed or client.transport is None or self.req.ex.http_version != "1.1":
            return
        client.transport.write(interim_head(client.rules, status, reason, headers))

    def upstream_head(self, status: int, reason: bytes, headers: Headers, framing: int) -> None:
        client = self.client
        req = self.req
        ex = req.ex
        ex.status = status
        ex.t_upstream_head = time.perf_counter()
        ex.response_headers = headers
        hooks = client.hooks
        if hooks.upstream_head:
            hooks.call(hooks.upstream_head, "on_upstream_head", ex)
        if not req.request_done:
            req.close_after = True  # the upstream answered before the body ended
        if client.plane.draining:
            req.close_after = True
        http11 = ex.http_version == "1.1"
        wire, chunked, close = prepare_response(
            client.rules,
            status,
            reason,
            ex.response_headers,
            framing,
            request_id=ex.request_id,
            http11=http11,
            head_only=req.head_only,
            close=req.close_after,
        )
        ex.stream = framing in STREAMED  # no declared length
        req.chunked_out = chunked
        req.close_after = close
        req.state = RESPONDING
        self.out.append(wire)

    def upstream_body(self, chunk: bytes) -> None:
        req = self.req
        ex = req.ex
        hooks = self.client.hooks
        if self.first:
            self.first = False
            ex.t_first_byte = time.perf_counter()
            if hooks.first_byte:
                hooks.call(hooks.first_byte, "on_first_byte", ex)
        ex.bytes_out += len(chunk)
        if hooks.response_body:
            hooks.call(hooks.response_body, "on_response_body", ex, chunk)
        if req.chunked_out:
            self.out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
        else:
            self.out.append(chunk)

    def upstream_complete(self, trailers: Headers, reusable: bool) -> None:
        client = self.client
        req = self.req
        try:
            if req.chunked_out:
                self.out.append(b"0\r\n")
                if trailers:
                    http.serialize_headers(self.out, forward_trailers(client.rules, trailers))
                self.out.append(b"\r\n")
            # detach before the last write: if it fills the client's buffer, pause_writing must not
            # pause a connection that is going back to the pool
            req.upstream = None
            self.upstream_flush()
            self.conn.pool.release(self.conn, reusable=reusable and req.request_done)
            client._finish(req)
        except Exception as exc:
            client._internal_error(req, exc, "finishing a response")

    def upstream_failed(self, error: ExchangeError, stale: bool) -> None:
        try:
            self.upstream_flush()
            if self.req.upstream is not self.conn:
                return
            self.client._upstream_error(self.req, error, stale)
        except Exception as exc:
            self.client._internal_error(self.req, exc, "handling an upstream failure")

    def upstream_upgraded(self, reason: bytes, headers: Headers, rest: bytes) -> None:
        req = self.req
        if req.head is None or not req.head.upgrade:  # 101 to a request that asked for no protocol switch
            self.conn.abort()
            self.client._upstream_error(req, UpstreamProtocolError("upstream switched protocols unasked"))
            return
        req.ex.status = 101
        req.ex.t_upstream_head = time.perf_counter()
        head = switching_head(self.client.rules, reason, headers, req.ex.request_id)
        self.client.tunnel_open(req, self.conn, head, rest)

    def upstream_tunnel_data(self, data: bytes) -> None:
        self.req.ex.bytes_out += len(data)
        transport = self.client.transport
        if transport is not None and not self.client.closed:
            transport.write(data)

    def upstream_tunnel_closed(self) -> None:
        self.client.tunnel_closed(self.req)

    def upstream_pause_writing(self) -> None:
        self.client._pause(PAUSE_UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self.client._resume(PAUSE_UPSTREAM)
