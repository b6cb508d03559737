"""The proxy's own requests: one request through a named upstream pool, fire-and-forget.

Shadow traffic and golden-request probes send requests of their own to an upstream. They go through
the same pools, connections and framing as client traffic, but never through the client path: no
observer hook runs, nothing is counted as client traffic, and a failure only reaches the callback.
The response body is kept up to ``max_body_bytes`` (the rest is read and dropped, counted in
``OwnResult.body_bytes``), so an own request never holds more than that whatever the upstream sends.

Example::

    def done(result: OwnResult) -> None:
        print(result.status, result.error, len(result.body))

    plane.send("canary", "POST", b"/v2/models/m/infer", [(b"content-type", b"application/json")],
               body, done, timeout=5.0)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from proxy.dataplane import http
from proxy.dataplane.exchange import Headers
from proxy.dataplane.heads import IDEMPOTENT_METHODS
from proxy.dataplane.upstream import Ticket, UpstreamConnection, UpstreamPool
from proxy.errors import ExchangeError, UpstreamProtocolError, UpstreamTimeout

log = logging.getLogger("infermon.dataplane.own")

DEFAULT_MAX_BODY = 1 << 20


class OwnResult:
    """What became of one own request. ``error`` is None when a complete response arrived."""

    __slots__ = ("body", "body_bytes", "duration", "error", "headers", "status", "truncated", "upstream")

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.status = 0
        self.headers: Headers = []
        self.body = b""
        self.body_bytes = 0  # every body byte received, kept or not
        self.truncated = False  # the body was longer than max_body_bytes
        self.error: ExchangeError | None = None
        self.duration = 0.0  # seconds, from send to the end of the response (or the failure)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"<OwnResult {self.upstream} {self.status} error={self.error!r}>"


class OwnRequest:
    """One own request in flight; :meth:`cancel` drops it (the callback is then never called)."""

    __slots__ = (
        "_body",
        "_callback",
        "_chunks",
        "_conn",
        "_done",
        "_max_body",
        "_retried",
        "_started",
        "_ticket",
        "_timer",
        "_wire",
        "head_only",
        "idempotent",
        "pool",
        "result",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        wire: bytes,
        body: bytes,
        callback: Callable[[OwnResult], None],
        *,
        head_only: bool,
        idempotent: bool,
        max_body_bytes: int,
        timeout: float,
    ) -> None:
        self.pool = pool
        self.result = OwnResult(pool.name)
        self.head_only = head_only
        self.idempotent = idempotent
        self._wire = wire
        self._body = body
        self._callback = callback
        self._max_body = max_body_bytes
        self._chunks: list[bytes] = []
        self._conn: UpstreamConnection | None = None
        self._ticket: Ticket | None = None
        self._done = False
        self._retried = False
        self._started = time.perf_counter()
        self._timer: asyncio.TimerHandle | None = pool.loop.call_later(timeout, self._timed_out, timeout)

    def begin(self) -> None:
        conn = self.pool.take_idle()
        if conn is not None:
            self._attach(conn)
        else:
            self._ticket = self.pool.connect_or_wait(self._pool_answered)

    def cancel(self) -> None:
        if self._done:
            return
        self._done = True
        self._cleanup()

    # -- UpstreamOwner ----------------------------------------------------------------------------

    def upstream_interim(self, status: int, reason: bytes, headers: Headers) -> None:
        pass

    def upstream_head(self, status: int, reason: bytes, headers: Headers, framing: int) -> None:
        self.result.status = status
        self.result.headers = headers

    def upstream_body(self, chunk: bytes) -> None:
        result = self.result
        room = self._max_body - result.body_bytes
        result.body_bytes += len(chunk)
        if room >= len(chunk):
            self._chunks.append(chunk)
        else:
            if room > 0:
                self._chunks.append(chunk[:room])
            result.truncated = True

    def upstream_complete(self, trailers: Headers, reusable: bool) -> None:
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.pool.release(conn, reusable=reusable)
        self.result.body = b"".join(self._chunks)
        self._end(None)

    def upstream_failed(self, error: ExchangeError, stale: bool) -> None:
        self._conn = None
        if stale and self.idempotent and not self._retried and not self._done:
            self._retried = True  # a pooled connection the upstream had closed: once more, fresh
            self._ticket = self.pool.connect_or_wait(self._pool_answered)
            return
        self._end(error)

    def upstream_upgraded(self, reason: bytes, headers: Headers, rest: bytes) -> None:
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.abort()
        self._end(UpstreamProtocolError("upstream switched protocols on the proxy's own request"))

    def upstream_tunnel_data(self, data: bytes) -> None:
        pass

    def upstream_flush(self) -> None:
        pass

    def upstream_tunnel_closed(self) -> None:
        pass

    def upstream_pause_writing(self) -> None:
        pass  # the whole (capped) body is written at once: nothing more to hold back

    def upstream_resume_writing(self) -> None:
        pass

    # -- internals ----------------------------------------------------------------------------------

    def _pool_answered(self, conn: UpstreamConnection | None, error: ExchangeError | None) -> None:
        self._ticket = None
        if self._done:
            if conn is not None:
                conn.pool.release(conn, reusable=True)
            return
        if conn is None:
            assert error is not None
            self._end(error)
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        conn.start(self, self._wire, self.head_only)
        if self._body:
            conn.write(self._body)
        conn.request_sent()
        conn.flush()

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        if not self._done:
            self._end(UpstreamTimeout(f"the proxy's own request got no complete answer within {timeout:g} s"))

    def _end(self, error: ExchangeError | None) -> None:
        if self._done:
            return
        self._done = True
        self._cleanup()
        result = self.result
        result.error = error
        result.duration = time.perf_counter() - self._started
        try:
            self._callback(result)
        except Exception:  # a broken caller is logged, never the data plane's problem
            log.exception("callback of an own request to %s failed", self.pool.name)

    def _cleanup(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ticket is not None:
            self._ticket.cancel()
            self._ticket = None
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.abort()  # mid-exchange: the connection cannot be reused


def build_request(
    pool: UpstreamPool,
    method: str,
    target: bytes,
    headers: Headers,
    body: bytes,
    callback: Callable[[OwnResult], None],
    *,
    timeout: float,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> OwnRequest:
    """An :class:`OwnRequest` ready to :meth:`~OwnRequest.begin`: Host and framing fields are ours.

    ``headers`` must not carry framing or hop-by-hop fields (Content-Length, Transfer-Encoding,
    Connection ...): they are dropped, and Content-Length is set from ``body``.
    """
    if not target.startswith(b"/"):
        raise ValueError("target must be a path (origin-form), for example b'/v2/health/ready'")
    if not method or not method.isalpha() or not method.isupper():
        raise ValueError(f"method {method!r} is not an HTTP method name")
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    has_host = False
    for name, value in headers:
        lname = name.lower()
        if lname in http.HOP_BY_HOP or lname == b"content-length":
            continue
        if lname == b"host":
            has_host = True
        parts += (name, b": ", value, b"\r\n")
    if not has_host:
        parts.append(b"Host: " + pool.authority + b"\r\n")
    if body or method in ("POST", "PUT", "PATCH"):
        parts.append(b"Content-Length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    head_only = method == "HEAD"
    idempotent = method in IDEMPOTENT_METHODS or any(n.lower() == b"idempotency-key" for n, _ in headers)
    return OwnRequest(
        pool,
        b"".join(parts),
        body,
        callback,
        head_only=head_only,
        idempotent=idempotent,
        max_body_bytes=max_body_bytes,
        timeout=timeout,
    )


__all__ = ["OwnRequest", "OwnResult", "build_request"]
