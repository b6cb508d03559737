"""The one record every request leaves behind.

An :class:`Exchange` is created when the first byte of a request arrives and is handed, always the
same object, to every observer hook (see :mod:`proxy.dataplane.hooks`). Timestamps are
``time.perf_counter()`` seconds; ``0.0`` means "did not happen".
"""

from __future__ import annotations

from typing import Any

Headers = list[tuple[bytes, bytes]]


class Exchange:
    """One request and its response, as seen by the proxy.

    Timestamps, in the order they normally happen:

    =====================  ==========================================================
    ``t_accepted``         first byte of the request received
    ``t_head``             request head parsed
    ``t_body_done``        last request body byte received
    ``t_upstream_connected``  an upstream connection was attached and the head sent
    ``t_upstream_head``    final response head received from the upstream
    ``t_first_byte``       first response body byte received (time to first token for streams)
    ``t_done``             exchange finished: response complete, failed or aborted
    =====================  ==========================================================
    """

    __slots__ = (
        "aborted",
        "bytes_in",
        "bytes_out",
        "client_host",
        "error",
        "extra",
        "http_version",
        "method",
        "model",
        "path",
        "request_headers",
        "request_id",
        "response_headers",
        "retried",
        "sampled",
        "span_id",
        "status",
        "stream",
        "t_accepted",
        "t_body_done",
        "t_done",
        "t_first_byte",
        "t_head",
        "t_last_chunk",
        "t_upstream_connected",
        "t_upstream_head",
        "target",
        "trace_id",
        "upgraded",
        "upstream",
        "variant",
        "version",
    )

    def __init__(self, t_accepted: float, client_host: str) -> None:
        self.t_accepted = t_accepted
        self.client_host = client_host
        self.request_id = ""
        self.method = ""
        self.target = b""
        self.path = ""
        self.http_version = "1.1"
        self.request_headers: Headers = []
        self.response_headers: Headers = []
        self.status = 0
        self.t_head = 0.0
        self.t_body_done = 0.0
        self.t_upstream_connected = 0.0
        self.t_upstream_head = 0.0
        self.t_first_byte = 0.0
        self.t_last_chunk = 0.0
        self.t_done = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.model = ""
        self.version = ""
        self.variant = ""
        #: the named upstream a split chose (its name is also the variant label); "" without a split
        self.upstream = ""
        #: upstream error kind (connect, timeout, reset, protocol) or a client-side reason
        self.error: str | None = None
        self.aborted = False  # the client went away before the response was complete
        self.retried = False  # sent again on a fresh upstream connection after a stale one
        self.upgraded = False  # switched to a tunnel after 101
        self.stream = False  # response body has no declared length (chunked or until close)
        #: W3C trace context of the proxy's span (hex), set by the tracing observer; "" when off
        self.trace_id = ""
        self.span_id = ""
        self.sampled = False  # the proxy's span is recorded and exported
        #: free slot for observers (trace span, sampled body copy ...), keyed by observer
        self.extra: dict[str, Any] | None = None

    def header(self, name: bytes) -> bytes | None:
        """First request header named ``name`` (lower-case bytes), or None."""
        for key, value in self.request_headers:
            if key.lower() == name:
                return value
        return None

    def response_header(self, name: bytes) -> bytes | None:
        for key, value in self.response_headers:
            if key.lower() == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"<Exchange {self.request_id} {self.method} {self.path} {self.status}>"
