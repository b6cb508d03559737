"""The upstream side: one protocol per model-server connection, and the bounded pool that owns them.

An :class:`UpstreamConnection` carries one exchange at a time for its *owner* (the client-side
request, see :class:`UpstreamOwner`), parses the response with httptools and reports it as events.
Framing decisions that depend on the client (re-chunking, closing) are the owner's.

The :class:`UpstreamPool` keeps idle keep-alive connections (most recently used first), opens new
ones up to ``max_connections`` and queues callers beyond that for at most ``pool_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from proxy.dataplane.exchange import Headers
from proxy.dataplane.heads import INVALID, NO_BODY, UNTIL_CLOSE, framing_of
from proxy.dataplane.timer import Deadline
from proxy.errors import (
    ExchangeError,
    PoolExhausted,
    ProxyInternalError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.settings import Upstream

log = logging.getLogger("infermon.upstream")

MAX_RESPONSE_HEAD = 1 << 20
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024

class UpstreamOwner(Protocol):
    """What an upstream connection reports to the request that uses it."""

    def upstream_interim(self, status: int, reason: bytes, headers: Headers) -> None: ...
    def upstream_head(self, status: int, reason: bytes, headers: Headers, framing: int) -> None: ...
    def upstream_body(self, chunk: bytes) -> None: ...
    def upstream_complete(self, trailers: Headers, reusable: bool) -> None: ...
    def upstream_failed(self, error: ExchangeError, stale: bool) -> None: ...
    def upstream_upgraded(self, reason: bytes, headers: Headers, rest: bytes) -> None: ...
    def upstream_tunnel_data(self, data: bytes) -> None: ...
    def upstream_flush(self) -> None: ...
    def upstream_tunnel_closed(self) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.cfg = pool.cfg
        self.read_timeout = pool.cfg.read_timeout  # plain attributes: read on every exchange
        self.response_timeout = pool.cfg.response_timeout
        self.transport: asyncio.Transport | None = None
        self.owner: UpstreamOwner | None = None
        self.closed = False
        self.reused = False  # has carried an exchange before
        self.idle_since = 0.0
        self.tunnel = False
        self.deadline = Deadline(pool.loop, self._timed_out)
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._got_bytes = False
        self._head_done = False
        self._framing = NO_BODY
        self._status = 0
        self._reason = b""
        self._headers: Headers = []
        self._trailers: Headers = []
        self._head_size = 0
        self._te: list[bytes] = []  # Transfer-Encoding values of the response head
        self._has_length = False
        self._complete = False
        self._garbage = False  # bytes after the end of the response
        self._keep_alive = False
        self._out: list[bytes] = []
        self._reading_paused = False
        #: the write buffer is over its high-water mark; a new owner must hold its body back
        self.writing_paused = False

    # -- used by the owner --------------------------------------------------------------------

    def start(self, owner: UpstreamOwner, head: bytes, head_only: bool, complete: bool = False) -> None:
        """Begin an exchange with the request head; the body follows through :meth:`write`.

        Writes are gathered until :meth:`flush`, so a head and a small body leave in one send.
        ``complete``: the whole request is at hand (no more body to come), so the response head is
        due within ``response_timeout`` from now (:meth:`request_sent` in one step).
        """
        self.owner = owner
        self._head_only = head_only
        self._got_bytes = False
        self._head_done = False
        self._complete = False
        self._garbage = False
        self._framing = NO_BODY
        self._headers = []
        self._trailers = []
        self._head_size = 0
        self._te = []
        self._has_length = False
        if self._parser is None:
            self._parser = httptools.HttpResponseParser(self)
        self.deadline.set_in(self.response_timeout if complete else self.read_timeout)
        self._out = [head]

    def write(self, data: bytes) -> None:
        self._out.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self._out += data

    def flush(self) -> None:
        out = self._out
        if out and self.transport is not None:
            self._out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def request_sent(self) -> None:
        """The whole request is written: the response head is now due within response_timeout."""
        if not self._head_done:
            self.deadline.set_in(self.response_timeout)

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection: the owner is gone or the exchange cannot be finished."""
        self.owner = None
        self.deadline.cancel()
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if self.tunnel:
            if owner is not None:
                owner.upstream_tunnel_data(data)
            return
        if owner is None:  # bytes nobody asked for: this connection can't be trusted any more
            self.abort()
            return
        self._got_bytes = True
        self.deadline.set_in(self.read_timeout)
        parser = self._parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._status == 101 and self.owner is not None:
                self.tunnel = True
                self.deadline.cancel()
                offset = exc.args[0]
                self.owner.upstream_upgraded(self._reason, self._headers, data[offset:])
            else:
                self._fail(UpstreamProtocolError("unexpected protocol upgrade from upstream"))
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, UpstreamError):  # raised on purpose by a callback (head too large)
                self._fail(cause)
            else:  # a bug of ours while handling the response: not the model server's fault
                log.error("internal error while handling an upstream response", exc_info=cause or exc)
                self._fail(ProxyInternalError("internal proxy error while handling the upstream response"))
            return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid HTTP response from upstream: {exc}"))
            return
        try:
            if self._complete:
                self._finish(reusable=self._keep_alive and not self._garbage)
            elif self.owner is not None:
                self.owner.upstream_flush()
        except Exception as exc:  # a bug of ours after the parser: logged, never blamed on the upstream
            log.error("internal error while handling an upstream response", exc_info=exc)
            self._fail(ProxyInternalError("internal proxy error while handling the upstream response"))

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline.cancel()
        self.pool.forget(self)
        owner = self.owner
        if owner is None:
            return
        if self.tunnel:
            self.owner = None
            owner.upstream_tunnel_closed()
        elif self._head_done and self._framing == UNTIL_CLOSE and exc is None:
            self._finish(reusable=False)  # a close-delimited body ends with a clean close (FIN) only
        elif self._head_done and self._framing == UNTIL_CLOSE:
            self._fail(UpstreamReset("upstream reset the connection in the middle of a close-delimited response"))
        elif not self._got_bytes:
            what = "reset" if exc is not None else "closed"
            self._fail(UpstreamReset(f"upstream {what} the connection before responding"), stale=self.reused)
        else:
            self._fail(UpstreamReset("upstream closed the connection in the middle of the response"))

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.owner is not None:
            self.owner.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.owner is not None:
            self.deadline.set_in(self.read_timeout)
            self.owner.upstream_resume_writing()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        n = len(name)
        size = self._head_size = self._head_size + n + len(value) + 4
        if size > MAX_RESPONSE_HEAD:  # the head and the trailers together: memory stays bounded
            raise UpstreamProtocolError("upstream response head (or trailers) larger than 1 MiB")
        if self._head_done:
            self._trailers.append((name, value))
            return
        self._headers.append((name, value))
        if n == 14 or n == 17:  # content-length, transfer-encoding: noted for the framing
            lname = name.lower()
            if lname == b"content-length":
                self._has_length = True
            elif lname == b"transfer-encoding":
                self._te.append(value)

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        if self._complete:
            self._garbage = True
            return
        status = self._parser.get_status_code()
        self._status = status
        owner = self.owner
        if owner is None or status == 101:
            return
        if status < 200:
            owner.upstream_interim(status, self._reason, self._headers)
            self._headers = []
            self._head_size = 0
            self._te = []
            self._has_length = False
            return
        self._head_done = True
        framing = framing_of(status, self._te, self._has_length, self._head_only)
        if framing == INVALID:
            raise UpstreamProtocolError(
                "upstream applied chunked more than once or not last (RFC 9112 7): the body cannot be forwarded"
            )
        self._framing = framing
        owner.upstream_head(status, self._reason, self._headers, framing)
        if framing == NO_BODY and self._head_only:
            # llhttp does not know the request was HEAD and would wait for Content-Length bytes;
            # the response is complete now, and the parser must start afresh next time.
            self._keep_alive = self._parser.should_keep_alive()
            self._parser = None
            self._complete = True

    def on_body(self, body: bytes) -> None:
        if self.owner is not None and self._head_done and not self._complete:
            self.owner.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._head_done and self._parser is not None:
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it right after

    # -- internals ----------------------------------------------------------------------------

    def _finish(self, reusable: bool) -> None:
        owner = self.owner
        self.owner = None
        self.deadline.clear()
        self.reused = True
        if owner is not None:
            owner.upstream_complete(self._trailers, reusable and not self.closed)

    def _fail(self, error: ExchangeError, stale: bool = False) -> None:
        owner = self.owner
        self.abort()
        if owner is not None:
            owner.upstream_failed(error, stale)

    def _timed_out(self) -> None:
        what = "body data" if self._head_done else "the response head"
        self._fail(UpstreamTimeout(f"upstream sent no {what} in time"))


class Ticket:
    """A caller waiting for a connection; ``cancel()`` when it no longer wants one."""

    __slots__ = ("callback", "cancelled", "timer")

    def __init__(self, callback: Callable[[UpstreamConnection | None, ExchangeError | None], None]) -> None:
        self.callback = callback
        self.cancelled = False
        self.timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class UpstreamPool:
    """The connections to one named upstream (``stable``, ``canary``, a shadow target ...).

    ``authority`` is the Host sent for requests that came without one (HTTP/1.0) and for the
    proxy's own requests.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, url: str, cfg: Upstream) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        self.loop = loop
        self.name = name
        self.url = url
        self.scheme = scheme
        self.host = host
        self.port = port
        self.cfg = cfg
        default_port = 443 if scheme == "https" else 80
        shown = f"[{host}]" if ":" in host else host
        self.authority = (shown if port == default_port else f"{shown}:{port}").encode("idna")
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if scheme == "https" else None
        self.idle: deque[UpstreamConnection] = deque()
        self.open = 0  # connections open or being opened
        self.opened_total = 0  # connections established, ever
        self.waiters: deque[Ticket] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection, if any (the fast path)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def connect_or_wait(self, callback: Callable[[UpstreamConnection | None, ExchangeError | None], None]) -> Ticket:
        ticket = Ticket(callback)
        if self.open < self.cfg.max_connections:
            self.open += 1
            self.loop.create_task(self._connect(ticket))
        else:
            ticket.timer = self.loop.call_later(self.cfg.pool_timeout, self._waiter_timed_out, ticket)
            self.waiters.append(ticket)
        return ticket

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Take back a connection whose exchange is over: park it idle, hand it on, or close it.

        A released connection always reads again, whatever flow control its last owner applied: an
        idle connection must see its peer's close, and its next owner decides afresh.
        """
        conn.owner = None
        if not reusable or conn.closed or self._closed:
            conn.abort()  # connection_lost -> forget() does the accounting
            return
        if conn._reading_paused:
            conn.resume_reading()
        while self.waiters:
            ticket = self.waiters.popleft()
            if not ticket.cancelled:
                if ticket.timer is not None:  # it is served now: no pool timeout any more
                    ticket.timer.cancel()
                    ticket.timer = None
                self.loop.call_soon(self._hand_over, ticket, conn)
                return
        if len(self.idle) >= self.cfg.max_idle:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        if self._sweeper is None:
            self._schedule_sweep()

    def forget(self, conn: UpstreamConnection) -> None:
        """Called once when a connection is lost."""
        self.open -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if not self._closed:
            self._serve_waiter_with_new_connection()

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self.idle:
            self.idle.pop().abort()
        while self.waiters:
            self.waiters.popleft().cancel()

    # -- internals ----------------------------------------------------------------------------

    def _serve_waiter_with_new_connection(self) -> None:
        while self.waiters and self.open < self.cfg.max_connections:
            ticket = self.waiters.popleft()
            if ticket.cancelled:
                continue
            if ticket.timer is not None:
                ticket.timer.cancel()
                ticket.timer = None
            self.open += 1
            self.loop.create_task(self._connect(ticket))

    def _hand_over(self, ticket: Ticket, conn: UpstreamConnection) -> None:
        if ticket.cancelled:  # the waiter went away meanwhile: the connection goes back
            self.release(conn, reusable=True)
            return
        if conn.closed or conn.transport is None or conn.transport.is_closing():
            # it closed between release() and now: the waiter gets a fresh connection instead
            if self._closed:
                self._fail_ticket(ticket, UpstreamConnectError("the upstream pool is closed"))
                return
            self.open += 1
            self.loop.create_task(self._connect(ticket))
            return
        ticket.cancelled = True
        ticket.callback(conn, None)

    def _waiter_timed_out(self, ticket: Ticket) -> None:
        ticket.timer = None
        with contextlib.suppress(ValueError):
            self.waiters.remove(ticket)
        self._fail_ticket(
            ticket,
            PoolExhausted(
                f"all {self.cfg.max_connections} upstream connections stayed busy for "
                f"{self.cfg.pool_timeout:g} s (upstream_pool.max_connections)"
            ),
        )

    async def _connect(self, ticket: Ticket) -> None:
        try:
            async with asyncio.timeout(self.cfg.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl
                )
        except TimeoutError:
            self.open -= 1
            self._fail_ticket(ticket, UpstreamTimeout(f"connecting to upstream {self._where()} timed out"))
            return
        except OSError as exc:
            self.open -= 1
            reason = exc.strerror or str(exc)
            self._fail_ticket(ticket, UpstreamConnectError(f"upstream {self._where()} unreachable: {reason}"))
            return
        self.opened_total += 1
        if ticket.cancelled or self._closed:
            self.release(conn, reusable=True)
            return
        ticket.cancelled = True
        ticket.callback(conn, None)

    def _fail_ticket(self, ticket: Ticket, error: ExchangeError) -> None:
        if not ticket.cancelled:
            ticket.cancelled = True
            ticket.callback(None, error)

    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    def _schedule_sweep(self) -> None:
        interval = min(1.0, self.cfg.idle_timeout / 2)
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - self.cfg.idle_timeout
        idle = self.idle
        while idle and idle[0].idle_since <= cutoff:
            idle.popleft().abort()
        if idle and not self._closed:
            self._schedule_sweep()
