"""The client side of the data plane: one :class:`ClientConnection` protocol per client connection.

Each request goes through ``_Request`` states::

    parsing head -> queued (pipelined behind another) -> waiting for an upstream connection
      -> streaming (request body up, response down) -> finished

Requests on one connection are answered strictly in order: a pipelined request waits in the queue,
with reading paused, until the one before it is finished. Bodies are never buffered beyond one read
(plus ``retry_buffer_bytes`` kept for a stale-connection retry): reading from one side is paused while
the other side's write buffer is full.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from proxy.dataplane import http
from proxy.dataplane.exchange import Exchange, Headers
from proxy.dataplane.timer import Deadline
from proxy.dataplane.upstream import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    WRITE_HIGH,
    WRITE_LOW,
    Ticket,
    UpstreamConnection,
    UpstreamPool,
)
from proxy.errors import ExchangeError, UpstreamError, UpstreamProtocolError

if TYPE_CHECKING:
    from proxy.dataplane.core import DataPlane

log = logging.getLogger("infermon.dataplane")

# reasons to pause reading from the client (a bit mask)
PAUSE_PIPELINE = 1  # a later request waits for the current one
PAUSE_UPSTREAM = 2  # upstream write buffer is full
PAUSE_BUFFER = 4  # body arriving before an upstream connection is attached
PAUSE_LINGER = 8
PAUSE_STOP = 16  # nothing more is read as HTTP from this client (after a parse error, an upgrade)

PENDING_LIMIT = 64 * 1024
LINGER_SECONDS = 2.0

# what the connection deadline means when it fires
T_HEAD = 1
T_BODY = 2
T_IDLE = 3
T_LINGER = 4

_HOST = b"host"
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"
_XFH = b"x-forwarded-host"
_EXPECT = b"expect"
_UPGRADE = b"upgrade"
_CONNECTION = b"connection"
_DATE = b"date"


# request header fields the data plane looks at; everything else is forwarded untouched
(_K_HOST, _K_CONTENT_LENGTH, _K_TE, _K_CONNECTION, _K_XFF, _K_RID, _K_UPGRADE, _K_XFP, _K_XFH, _K_EXPECT, _K_HOP) = (
    range(11)
)
_NOT_FIELDS = frozenset({b"close", b"keep-alive", b"upgrade"})
# uri-host [ ":" port ] (RFC 9110 7.2): a reg-name, IPv4 or bracketed IPv6 literal
_HOST_VALUE = re.compile(rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?$")


def _special_fields(request_id_header: bytes) -> dict[bytes, int]:
    table = {name: _K_HOP for name in http.HOP_BY_HOP}
    table.update(
        {
            _HOST: _K_HOST,
            _CONTENT_LENGTH: _K_CONTENT_LENGTH,
            _TRANSFER_ENCODING: _K_TE,
            _CONNECTION: _K_CONNECTION,
            _XFF: _K_XFF,
            _UPGRADE: _K_UPGRADE,
            _XFP: _K_XFP,
            _XFH: _K_XFH,
            _EXPECT: _K_EXPECT,
            request_id_header: _K_RID,
        }
    )
    return table


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID_SET = (0x4 << 76) | (0x2 << 62)


def new_request_id() -> str:
    """A random (version 4) UUID string; a quarter of the cost of ``str(uuid.uuid4())``."""
    h = f"{random.getrandbits(128) & _UUID_CLEAR | _UUID_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _Request:
    __slots__ = (
        "chunked_in",
        "chunked_out",
        "close_after",
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
        "response_done",
        "response_started",
        "retry_body",
        "retry_bytes",
        "te_value",
        "ticket",
        "upgrade",
        "upstream",
    )

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.error: tuple[int, str] | None = None
        self.head = b""
        self.head_only = False
        self.headed = False  # on_request_head has run
        self.chunked_in = False
        self.te_value = b""
        self.upgrade = False
        self.chunked_out = False
        self.close_after = False
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.in_flight = False
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.retry_body: list[bytes] | None = []
        self.retry_bytes = 0
        self.ticket: Ticket | None = None
        self.upstream: UpstreamConnection | None = None
        self.pool: UpstreamPool | None = None


class ClientConnection(asyncio.Protocol):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        cfg = plane.cfg
        self.limits = cfg.limits
        self.hooks = plane.hooks
        self.rid_header = cfg.request_id_header.encode("ascii")
        self._special = plane.special_fields
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
        self._url = b""
        self._headers: Headers = []
        self._head_size = 0
        self._raw_head = 0  # bytes received while a head is incomplete
        self._in_head = False
        self._reject: _Reject | None = None
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
            ex.request_id = new_request_id()
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
                    reject = _Reject(500, "internal proxy error")
                else:
                    reject = _Reject(400, f"malformed request: {exc}")
            self._flush_up()
            self._parse_failed(reject)
            return
        finally:
            self._flush_up()
        if self._in_head and self._raw_head > self.limits.max_header_bytes:
            self._parse_failed(_Reject(431, "request head too large (limits.max_header_bytes)"))

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
        self.closed = True
        self.deadline.cancel()
        self.plane.connections.discard(self)
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.abort()
        requests = self.requests
        self.requests = deque()
        for req in requests:
            self._abandon(req)
        self.parsing = None  # a half-received head is not a request

    def pause_writing(self) -> None:
        if self.requests and self.requests[0].upstream is not None:
            self.requests[0].upstream.pause_reading()
        elif self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
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
        if self.deadline_kind != T_HEAD or self.deadline.when is None:
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
            return  # request trailers are not forwarded
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.limits.max_header_bytes:
            raise self._fail_parse(431, "request header fields too large (limits.max_header_bytes)")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.parsing
        assert req is not None
        self._in_head = False
        self._raw_head = 0
        ex = req.ex
        ex.t_head = time.perf_counter()
        parser = self.parser
        ex.method = parser.get_method().decode("ascii", "replace")
        ex.http_version = parser.get_http_version()
        if not parser.should_keep_alive():
            req.close_after = True
        self._prepare(req)
        if req.error is None and not req.request_done:
            self.deadline_kind = T_BODY
            self.deadline.set_in(self.limits.body_timeout)
        else:
            self.deadline.clear()
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
        if self.deadline_kind == T_BODY:
            self.deadline.set_in(self.limits.body_timeout)
        if self.hooks.request_body:
            self.hooks.call(self.hooks.request_body, "on_request_body", ex, body)
        if req.chunked_in:
            self._send_up(req, b"%x\r\n" % len(body))
            self._send_up(req, body)
            self._send_up(req, b"\r\n")
        else:
            self._send_up(req, body)

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
        if req.upstream is not None and not req.response_done:
            req.upstream.request_sent()

    # -- request preparation ------------------------------------------------------------------

    def _fail_parse(self, status: int, message: str) -> _Reject:
        self._reject = _Reject(status, message)
        return self._reject

    def _prepare(self, req: _Request) -> None:
        """Validate the head and build the header list sent upstream (``ex.request_headers``)."""
        ex = req.ex
        target = self._url
        authority: bytes | None = None
        if target[:1] != b"/" and target != b"*":
            if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
                rest = target.split(b"//", 1)[1]
                slash = rest.find(b"/")
                authority = rest[:slash] if slash >= 0 else rest
                target = rest[slash:] if slash >= 0 else b"/"
            elif ex.method != "OPTIONS":
                req.error = (400, "request target must be a path (origin-form) or an absolute URL")
        if ex.method == "CONNECT":
            req.error = (405, "CONNECT is not supported: infermon is a reverse proxy")
        ex.target = target
        q = target.find(b"?")
        ex.path = (target if q < 0 else target[:q]).decode("latin-1")

        forward: Headers = []
        host: bytes | None = None
        hosts = 0
        xff: list[bytes] = []
        has_xfp = has_xfh = False
        request_id: bytes | None = None
        content_length: bytes | None = None
        te: bytes | None = None
        upgrade: bytes | None = None
        connection: list[bytes] | None = None
        special = self._special
        for name, value in self._headers:
            kind = special.get(name.lower())
            if kind is None:
                forward.append((name, value))
            elif kind == _K_HOST:
                hosts += 1
                host = value
                forward.append((name, value))
            elif kind == _K_CONTENT_LENGTH:
                content_length = value
                forward.append((name, value))
            elif kind == _K_TE:
                te = value if te is None else te + b", " + value
            elif kind == _K_CONNECTION:
                connection = [value] if connection is None else [*connection, value]
            elif kind == _K_XFF:
                xff.append(value)
            elif kind == _K_RID:
                if request_id is None and http.is_valid_request_id(value):
                    request_id = value
            elif kind == _K_UPGRADE:
                upgrade = value
            elif kind == _K_XFP:
                has_xfp = True
                forward.append((name, value))
            elif kind == _K_XFH:
                has_xfh = True
                forward.append((name, value))
            elif kind == _K_EXPECT:
                if value.lower() != b"100-continue":
                    req.error = req.error or (417, "only 'Expect: 100-continue' is supported")
                forward.append((name, value))
            # else: hop-by-hop, dropped
        tokens: set[bytes] = set()
        if connection is not None:
            tokens = http.connection_tokens(connection)
            named = tokens - _NOT_FIELDS
            if named:  # Connection names more fields as hop-by-hop: they stop here too
                forward = [(n, v) for n, v in forward if n.lower() not in named]

        ex.request_id = request_id.decode("ascii") if request_id is not None else new_request_id()
        if req.error is not None:
            return
        if ex.http_version == "1.1" and hosts != 1:
            req.error = (400, "an HTTP/1.1 request needs exactly one Host header")
            return
        if host is not None and not _HOST_VALUE.match(host):
            req.error = (400, "invalid Host header")
            return
        if authority is not None and host is not None:
            # absolute-form: the target's authority wins over Host (RFC 9112 3.2.2)
            forward = [(n, authority if n.lower() == _HOST else v) for n, v in forward]
            host = authority
        if te is not None and ex.http_version == "1.0":
            req.error = (400, "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")
            return
        if te is not None:
            codings = [c.strip().lower() for c in te.split(b",")]
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                req.error = (400, "Transfer-Encoding must end with chunked (and name it once)")
                return
            if content_length is not None:
                req.error = (400, "Content-Length and Transfer-Encoding together are not allowed")
                return
            req.chunked_in = True
            req.te_value = te
        elif content_length is not None:
            limit = self.limits.max_request_body_bytes
            if limit is not None and int(content_length) > limit:
                req.error = (413, f"request body larger than {limit} bytes (limits.max_request_body_bytes)")
                return

        if upgrade is not None and _UPGRADE in tokens:
            req.upgrade = True
            forward.append((b"Connection", b"Upgrade"))
            forward.append((b"Upgrade", upgrade))
        if req.chunked_in:
            forward.append((b"Transfer-Encoding", req.te_value))
        if host is None:
            host = self.plane.upstream_authority
            forward.append((b"Host", host))
        client = self.client_host.encode("ascii")
        forward.append((b"X-Forwarded-For", b", ".join([*xff, client]) if xff else client))
        if not has_xfp:
            forward.append((b"X-Forwarded-Proto", b"http"))
        if not has_xfh:
            forward.append((b"X-Forwarded-Host", host))
        forward.append((self.rid_header, ex.request_id.encode("ascii")))
        forward.append((b"Via", b"1.0 infermon" if ex.http_version == "1.0" else b"1.1 infermon"))
        ex.request_headers = forward
        req.head_only = ex.method == "HEAD"

    # -- running a request --------------------------------------------------------------------

    def _start(self, req: _Request) -> None:
        ex = req.ex
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
        parts = [ex.method.encode("ascii"), b" ", ex.target, b" HTTP/1.1\r\n"]
        http.serialize_headers(parts, ex.request_headers)
        parts.append(b"\r\n")
        req.head = b"".join(parts)
        pool = req.pool = plane.pool if plane.route is None else plane.route(ex)
        conn = pool.take_idle()
        if conn is not None:
            self._attach(req, conn)
        else:
            req.ticket = pool.connect_or_wait(lambda c, e: self._pool_answered(req, c, e))

    def _pool_answered(self, req: _Request, conn: UpstreamConnection | None, error: ExchangeError | None) -> None:
        req.ticket = None
        if self.closed or req.response_done or not self.requests or self.requests[0] is not req:
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
        req.ex.t_upstream_connected = time.perf_counter()
        conn.start(_Owner(self, req, conn), req.head, req.head_only)
        if req.pending:
            conn.writelines(req.pending)
            req.pending = []
            req.pending_bytes = 0
            self._resume(PAUSE_BUFFER)
        if req.request_done:
            conn.request_sent()
        if not self._feeding:
            conn.flush()

    def _send_up(self, req: _Request, data: bytes) -> None:
        """Forward request body bytes, or hold them until an upstream connection is attached."""
        if req.retry_body is not None:
            req.retry_bytes += len(data)
            if req.retry_bytes <= self.plane.cfg.upstream_pool.retry_buffer_bytes:
                req.retry_body.append(data)
            else:
                req.retry_body = None
        conn = req.upstream
        if conn is not None and not req.response_done:
            conn.write(data)
        elif not req.response_done:
            req.pending.append(data)
            req.pending_bytes += len(data)
            if req.pending_bytes > PENDING_LIMIT:
                self._pause(PAUSE_BUFFER)

    def _upstream_error(self, req: _Request, error: ExchangeError, stale: bool = False) -> None:
        ex = req.ex
        if (
            stale
            and not req.ex.retried
            and req.retry_body is not None
            and not req.response_started
            and not self.closed
        ):
            ex.retried = True
            req.upstream = None
            req.pending = list(req.retry_body)
            req.pending_bytes = 0
            assert req.pool is not None
            req.ticket = req.pool.connect_or_wait(lambda c, e: self._pool_answered(req, c, e))
            return
        ex.error = error.kind
        req.upstream = None
        if req.response_started:
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
        if transport is not None and not self.closed and not req.response_started:
            req.response_started = True
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
        req.close_after = True
        self.requests.append(req)
        if len(self.requests) == 1:
            self._respond_error(req, status, message)

    def _finish(self, req: _Request) -> None:
        """The exchange is over: record it, then move on to the next request or close."""
        if req.response_done:
            return
        req.response_done = True
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
            # answered by the proxy itself (a limit, a bad header) or abandoned in the pipeline: the
            # head was read, so observers see it (labels, trace) like any other request
            req.headed = True
            if hooks.request_head:
                hooks.call(hooks.request_head, "on_request_head", ex)
        if hooks.complete:
            hooks.call(hooks.complete, "on_complete", ex)
        if self.requests and self.requests[0] is req:
            self.requests.popleft()
        if self.closed:
            return
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
            self._resume(PAUSE_PIPELINE)

    def _abandon(self, req: _Request) -> None:
        """The client went away with ``req`` unanswered."""
        ex = req.ex
        if req.response_done:
            return
        if not ex.upgraded:
            ex.aborted = True
        if not req.response_started:
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

    def _parse_failed(self, reject: _Reject) -> None:
        """Answer a request we could not parse (in turn, after those before it) and close."""
        self.parser = httptools.HttpRequestParser(self)  # the old one is in an error state
        self._pause(PAUSE_STOP)
        self._in_head = False
        req = self.parsing
        self.parsing = None
        if req is not None and req in self.requests:  # the head was fine, the body was not
            if req is not self.requests[0]:
                req.error = (reject.status, reject.message)
                req.close_after = True
            elif not req.response_started:
                self._respond_error(req, reject.status, reject.message)
            else:
                self._finish(req)
                self._abort_transport()
            return
        if req is None:
            req = _Request(Exchange(time.perf_counter(), self.client_host))
        req.error = (reject.status, reject.message)
        req.close_after = True
        if not req.ex.request_id:
            req.ex.request_id = new_request_id()
        self.requests.append(req)
        if len(self.requests) == 1:
            self._start(req)

    def _deadline_passed(self) -> None:
        kind = self.deadline_kind
        if self.closed or self.transport is None:
            return
        if kind in (T_IDLE, T_LINGER):
            self.transport.close()
            return
        if kind == T_HEAD and not self.requests:
            if self.parsing is None:  # not a byte of a new request: an idle connection, not an error
                self.transport.close()
                return
            ex = self.parsing.ex
            self.parsing = None
            ex.request_id = new_request_id()
            self._pause(PAUSE_STOP)
            self._respond_error_now(ex, 408, "request head not received in time (limits.header_timeout)")
            return
        req = self.parsing
        if kind == T_BODY and req is not None and self.requests and self.requests[0] is req:
            self.parsing = None
            if not req.response_started:
                self._respond_error(req, 408, "request body stalled (limits.body_timeout)")
                return
            self._finish(req)
        self._abort_transport()

    # -- upgrade (WebSocket) ------------------------------------------------------------------

    def _upgrade_requested(self, rest: bytes) -> None:
        """The parser stopped after an Upgrade request head; the request already started."""
        req = self.requests[-1] if self.requests else None
        if req is None or not req.upgrade:
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
        req.response_started = True
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
        parts = [http.status_line(status, reason)]
        http.serialize_headers(parts, [(n, v) for n, v in headers if n.lower() not in http.HOP_BY_HOP])
        parts.append(b"\r\n")
        client.transport.write(b"".join(parts))

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
        headers = ex.response_headers
        rid = client.rid_header
        hop = http.HOP_BY_HOP
        parts = [http.status_line(status, reason)]
        has_rid = has_date = False
        te = b""
        connection: list[bytes] | None = None
        for name, value in headers:
            lname = name.lower()
            if lname in hop:
                if lname == _TRANSFER_ENCODING:
                    te = value
                elif lname == _CONNECTION:
                    connection = [value] if connection is None else [*connection, value]
                continue
            if lname == rid:
                has_rid = True
            elif lname == _DATE:
                has_date = True
            parts += (name, b": ", value, b"\r\n")
        if connection is not None:
            named = http.connection_tokens(connection) - _NOT_FIELDS
            if named:
                parts = [parts[0]]
                http.serialize_headers(
                    parts, [(n, v) for n, v in headers if n.lower() not in hop and n.lower() not in named]
                )
        if not has_rid:
            parts.append(rid + b": " + ex.request_id.encode("ascii") + b"\r\n")
        if not has_date:
            parts.append(http.date_header())  # RFC 9110 6.6.1: a forwarded response needs a Date
        http11 = ex.http_version == "1.1"
        if framing in (CHUNKED, UNTIL_CLOSE):
            ex.stream = True
            if http11:
                req.chunked_out = True
                parts.append(b"Transfer-Encoding: " + (te or b"chunked") + b"\r\n")
            else:
                req.close_after = True
        elif framing == NO_BODY and te and req.head_only and http11:
            parts.append(b"Transfer-Encoding: " + te + b"\r\n")
        if not req.request_done:
            req.close_after = True  # the upstream answered before the body ended
        if req.close_after or client.plane.draining:
            req.close_after = True
            parts.append(b"Connection: close\r\n")
        elif not http11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        req.response_started = True
        self.out.append(b"".join(parts))

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
        if req.chunked_out:
            self.out.append(b"0\r\n")
            if trailers:
                http.serialize_headers(self.out, trailers)
            self.out.append(b"\r\n")
        self.upstream_flush()
        req.upstream = None
        self.conn.pool.release(self.conn, reusable=reusable and req.request_done)
        client._finish(req)

    def upstream_failed(self, error: UpstreamError, stale: bool) -> None:
        self.upstream_flush()
        if self.req.upstream is not self.conn:
            return
        self.client._upstream_error(self.req, error, stale)

    def upstream_upgraded(self, reason: bytes, headers: Headers, rest: bytes) -> None:
        req = self.req
        if not req.upgrade:  # 101 to a request that asked for no protocol switch
            self.conn.abort()
            self.client._upstream_error(req, UpstreamProtocolError("upstream switched protocols unasked"))
            return
        req.ex.status = 101
        req.ex.t_upstream_head = time.perf_counter()
        parts = [http.status_line(101, reason)]
        http.serialize_headers(parts, headers)
        parts.append(b"\r\n")
        self.client.tunnel_open(req, self.conn, b"".join(parts), rest)

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
