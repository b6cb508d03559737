"""Request-head and response-head rules (RFC 9110 / 9112) as pure functions.

Bytes and settings in, a prepared head or a rejection out: nothing here touches a socket, so every rule
is tested on its own (``tests/dataplane/test_heads.py``). The connection state machine in
``server.py`` calls :func:`prepare_request` once per request head and :func:`prepare_response` once
per response head; ``upstream.py`` calls :func:`framing_of` with what its parser noted.

Example::

    rules = HeadRules.from_config(cfg)
    head = prepare_request(rules, "POST", b"/v2/models/m/infer", "1.1", True, headers, "10.0.0.7")
    if head.reject is not None:
        ...  # answer head.reject.status with head.reject.message
    wire = serialize_request(head, b"model-server:8000")
"""

from __future__ import annotations

import re
from typing import NamedTuple

from proxy.dataplane import http
from proxy.dataplane.exchange import Headers

# response body framing, decided from the response head
NO_BODY = 0
LENGTH = 1
CHUNKED = 2
UNTIL_CLOSE = 3
INVALID = -1  # the response's transfer codings cannot be forwarded (chunked twice, or not last)
STREAMED = frozenset({CHUNKED, UNTIL_CLOSE})  # no declared length: the body is streamed

_HOST = b"host"
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_CONNECTION = b"connection"
_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"
_XFH = b"x-forwarded-host"
_EXPECT = b"expect"
_UPGRADE = b"upgrade"
_DATE = b"date"
_CHUNKED = b"chunked"

# request header fields the data plane looks at; everything else is forwarded untouched
(K_HOST, K_CONTENT_LENGTH, K_TE, K_CONNECTION, K_XFF, K_RID, K_UPGRADE, K_XFP, K_XFH, K_EXPECT, K_IDEMPOTENCY,
 K_HOP) = range(12)  # fmt: skip

#: Connection options that are not field names (RFC 9112 9.3, 9.6; RFC 9110 7.8).
NOT_FIELDS = frozenset({b"close", b"keep-alive", b"upgrade"})
_NOTHING: frozenset[bytes] = frozenset()

# uri-host [ ":" port ] (RFC 9110 7.2): a reg-name, IPv4 or bracketed IPv6 literal
_HOST_VALUE = re.compile(rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?\Z")
_DIGITS = re.compile(rb"^[0-9]+\Z")
_VALID_HOSTS: set[bytes] = set()  # Host values that passed _HOST_VALUE (the regex costs more than the lookup)

#: Methods that RFC 9110 9.2.2 calls idempotent: a proxy may send them again after a failure.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Rejection(NamedTuple):
    """The proxy answers the request itself: ``status`` with ``{"error": message}``."""

    status: int
    message: str


class HeadRules:
    """What the head rules need from the configuration, built once per data plane."""

    __slots__ = ("max_request_body_bytes", "protected", "request_id_header", "special")

    def __init__(self, request_id_header: bytes, max_request_body_bytes: int | None = None) -> None:
        self.request_id_header = request_id_header.lower()
        self.max_request_body_bytes = max_request_body_bytes
        table = {name: K_HOP for name in http.HOP_BY_HOP}
        table.update(
            {
                _HOST: K_HOST,
                _CONTENT_LENGTH: K_CONTENT_LENGTH,
                _TRANSFER_ENCODING: K_TE,
                _CONNECTION: K_CONNECTION,
                _XFF: K_XFF,
                _UPGRADE: K_UPGRADE,
                _XFP: K_XFP,
                _XFH: K_XFH,
                _EXPECT: K_EXPECT,
                b"idempotency-key": K_IDEMPOTENCY,
                self.request_id_header: K_RID,
            }
        )
        self.special = table
        #: fields a Connection option may never remove: framing, routing, the request id, forwarding
        self.protected = frozenset(
            {_HOST, _CONTENT_LENGTH, _TRANSFER_ENCODING, self.request_id_header, b"forwarded", b"via", _DATE,
             b"idempotency-key", _EXPECT}  # the proxy decides on these two: what it decides on must arrive
        )  # fmt: skip


def connection_options(values: list[bytes], rules: HeadRules) -> frozenset[bytes]:
    """The field names that ``Connection`` lines make hop-by-hop, minus those no option may remove.

    One helper for both directions. ``Connection: content-length`` would otherwise forward a body
    without its length (the body's bytes then read as a second request: smuggling), and
    ``Connection: host`` an HTTP/1.1 request with no Host; such options are ignored, never obeyed
    (RFC 9110 7.6.1 lets a proxy keep fields meant for every recipient). Framing and routing fields,
    the request id, ``Forwarded``, ``Via``, ``Date`` and every ``X-Forwarded-*`` field are protected.
    """
    if len(values) == 1 and values[0].lower() in NOT_FIELDS:
        return _NOTHING  # the common case: keep-alive or close, no field named
    named: set[bytes] = set()
    protected = rules.protected
    for token in http.connection_tokens(values):
        if token in NOT_FIELDS or token in protected or token.startswith(b"x-forwarded-"):
            continue
        named.add(token)
    return frozenset(named)


def transfer_codings(value: bytes) -> list[bytes]:
    """``b"gzip, Chunked"`` -> ``[b"gzip", b"chunked"]`` (empty list elements dropped)."""
    return [c for c in (part.strip().lower() for part in value.split(b",")) if c]


class RequestHead:
    """A request head, validated and rewritten for the upstream; ``reject`` set when it must not go.

    ``headers`` is what goes upstream, in order, without a Host line when the client sent none (the
    chosen upstream supplies it: :func:`serialize_request`).
    """

    __slots__ = (
        "chunked",
        "close",
        "has_body",
        "head_only",
        "headers",
        "host",
        "http_version",
        "idempotent",
        "method",
        "path",
        "reject",
        "request_id",
        "target",
        "upgrade",
    )

    def __init__(self, method: str, http_version: str) -> None:
        self.method = method
        self.http_version = http_version
        self.target = b""
        self.path = ""
        self.request_id = ""
        self.headers: Headers = []
        self.host: bytes | None = None
        self.chunked = False  # the body comes chunked and goes up chunked
        self.upgrade = False  # a protocol switch (WebSocket) was asked for
        self.close = False  # the connection ends after this exchange
        self.has_body = False  # a body follows the head (chunked, or a Content-Length above 0)
        self.head_only = method == "HEAD"
        self.idempotent = method in IDEMPOTENT_METHODS
        self.reject: Rejection | None = None


def prepare_request(
    rules: HeadRules,
    method: str,
    url: bytes,
    http_version: str,
    keep_alive: bool,
    fields: Headers,
    client_host: str,
) -> RequestHead:
    """Validate a request head and build the fields sent upstream, in one pass over ``fields``.

    Hop-by-hop fields and those named by ``Connection`` are dropped, ``X-Forwarded-For`` is appended,
    ``X-Forwarded-Proto`` / ``-Host`` added when absent, ``Via`` appended, the request id kept (short
    visible ASCII) or generated and sent upstream. Smuggling shapes (Content-Length with
    Transfer-Encoding, a non-final or repeated ``chunked``, Transfer-Encoding in HTTP/1.0, a bad
    Content-Length), a missing, repeated or malformed Host in HTTP/1.1, CONNECT and unknown ``Expect``
    are rejected. An absolute-form target becomes origin-form and its authority replaces Host.
    """
    head = RequestHead(method, http_version)
    head.close = not keep_alive
    reject: Rejection | None = None
    target = url
    authority: bytes | None = None
    if target[:1] != b"/":
        lower = target[:8].lower()
        if lower.startswith(b"http://") or lower == b"https://":
            rest = target.split(b"//", 1)[1]
            end = len(rest)
            for stop in (b"/", b"?", b"#"):
                at = rest.find(stop)
                if 0 <= at < end:
                    end = at
            authority = rest[:end]
            target = rest[end:] or b"/"
            if target[:1] != b"/":
                target = b"/" + target  # http://h?x=1 is /?x=1 on host h
            if not authority or b"@" in authority or not _HOST_VALUE.match(authority):
                # RFC 9110 4.2.4: userinfo is not sent in a target; an empty or malformed host names nothing
                reject = Rejection(400, "the absolute-form target has no valid host (and no user:password@)")
        elif target == b"*" and method == "OPTIONS":
            pass  # asterisk-form: OPTIONS only (RFC 9112 3.2.4)
        else:
            reject = Rejection(400, "request target must be a path (origin-form) or an absolute URL")
    if method == "CONNECT":
        reject = Rejection(405, "CONNECT is not supported: infermon is a reverse proxy")
    if http_version not in ("1.1", "1.0"):
        reject = Rejection(505, f"HTTP/{http_version} is not supported: send HTTP/1.1 (or 1.0)")
    head.target = target
    q = target.find(b"?")
    head.path = (target if q < 0 else target[:q]).decode("latin-1")

    forward: Headers = []
    host: bytes | None = None
    hosts = 0
    xff: list[bytes] = []
    has_xfp = has_xfh = False
    request_id: bytes | None = None
    content_lengths: list[bytes] = []
    te: bytes | None = None
    upgrade: bytes | None = None
    connection: list[bytes] | None = None
    special = rules.special
    for name, value in fields:
        kind = special.get(name.lower())
        if kind is None:
            forward.append((name, value))
        elif kind == K_HOST:
            hosts += 1
            host = value
            forward.append((name, value))
        elif kind == K_CONTENT_LENGTH:
            content_lengths.append(value)
            forward.append((name, value))
        elif kind == K_TE:
            te = value if te is None else te + b", " + value
        elif kind == K_CONNECTION:
            connection = [value] if connection is None else [*connection, value]
        elif kind == K_XFF:
            xff.append(value)
        elif kind == K_RID:
            if request_id is None and http.is_valid_request_id(value):
                request_id = value
        elif kind == K_UPGRADE:
            upgrade = value
        elif kind == K_XFP:
            has_xfp = True
            forward.append((name, value))
        elif kind == K_XFH:
            has_xfh = True
            forward.append((name, value))
        elif kind == K_EXPECT:
            if http_version == "1.0":
                continue  # RFC 9110 10.1.1: an expectation in an HTTP/1.0 request is ignored
            if value.strip().lower() != b"100-continue" and reject is None:
                reject = Rejection(417, "only 'Expect: 100-continue' is supported")
            forward.append((name, value))
        elif kind == K_IDEMPOTENCY:
            head.idempotent = True  # the client says a repeat is safe (draft-ietf-httpapi-idempotency-key)
            forward.append((name, value))
        # else: hop-by-hop, dropped
    upgrade_asked = False
    if connection is not None:
        upgrade_asked = _UPGRADE in http.connection_tokens(connection)
        named = connection_options(connection, rules)
        if named:  # Connection names more fields as hop-by-hop: they stop here too
            forward = [(n, v) for n, v in forward if n.lower() not in named]

    head.request_id = request_id.decode("ascii") if request_id is not None else http.new_request_id()
    head.headers = forward
    head.reject = reject or _check_request(rules, head, hosts, host, content_lengths, te)
    if head.reject is not None:
        return head
    if authority is not None:
        # absolute-form: the target's authority replaces any Host (RFC 9112 3.2.2), HTTP/1.0 too
        if host is not None:
            forward = [(n, authority if n.lower() == _HOST else v) for n, v in forward]
        else:
            forward.append((b"Host", authority))
        host = authority
    head.host = host

    if upgrade is not None and upgrade_asked and http_version == "1.1":  # RFC 9110 7.8: 1.0 ignores it
        head.upgrade = True
        forward.append((b"Connection", b"Upgrade"))
        forward.append((b"Upgrade", upgrade))
    if te is not None:
        head.chunked = head.has_body = True
        forward.append((b"Transfer-Encoding", te))
    client = client_host.encode("ascii", "replace")
    forward.append((b"X-Forwarded-For", b", ".join([*xff, client]) if xff else client))
    if not has_xfp:
        forward.append((b"X-Forwarded-Proto", b"http"))
    if not has_xfh and host is not None:
        forward.append((b"X-Forwarded-Host", host))
    forward.append((rules.request_id_header, head.request_id.encode("ascii")))
    forward.append((b"Via", b"1.0 infermon" if http_version == "1.0" else b"1.1 infermon"))
    head.headers = forward
    return head


def _check_request(
    rules: HeadRules,
    head: RequestHead,
    hosts: int,
    host: bytes | None,
    content_lengths: list[bytes],
    te: bytes | None,
) -> Rejection | None:
    if hosts > 1 or (hosts == 0 and head.http_version == "1.1"):
        # RFC 9112 3.2: a request with more than one Host line, whatever its version, is a 400
        return Rejection(400, "a request needs exactly one Host header (HTTP/1.1), and never more than one")
    if host is not None and host not in _VALID_HOSTS:
        if not _HOST_VALUE.match(host):
            return Rejection(400, "invalid Host header")
        if len(_VALID_HOSTS) >= 1024:  # a few hosts in practice; bounded whatever clients send
            _VALID_HOSTS.clear()
        _VALID_HOSTS.add(host)
    if te is not None:
        if head.http_version == "1.0":
            return Rejection(400, "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")
        codings = transfer_codings(te)
        if not codings or codings[-1] != _CHUNKED or codings.count(_CHUNKED) != 1:
            return Rejection(400, "Transfer-Encoding must end with chunked (and name it once)")
        if content_lengths:
            return Rejection(400, "Content-Length and Transfer-Encoding together are not allowed")
        return None
    if content_lengths:
        values = {v.strip() for line in content_lengths for v in line.split(b",")}
        if len(values) != 1 or not _DIGITS.match(next(iter(values))):
            return Rejection(400, "invalid Content-Length")
        length = int(next(iter(values)))
        head.has_body = length > 0
        limit = rules.max_request_body_bytes
        if limit is not None and length > limit:
            return Rejection(413, f"request body larger than {limit} bytes (limits.max_request_body_bytes)")
    return None


def serialize_request(head: RequestHead, authority: bytes) -> bytes:
    """The request head as sent upstream; ``authority`` is the Host for a request that had none."""
    parts = [head.method.encode("ascii"), b" ", head.target, b" HTTP/1.1\r\n"]
    http.serialize_headers(parts, head.headers)
    if head.host is None:
        parts.append(b"Host: " + authority + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# -- responses ------------------------------------------------------------------------------------


def response_framing(status: int, headers: Headers, head_only: bool) -> int:
    """How the upstream's response body ends (RFC 9112 6.3): NO_BODY, LENGTH, CHUNKED or UNTIL_CLOSE.

    Transfer-Encoding lines are read together (``gzip`` on one line, ``chunked`` on the next is
    chunked); a Transfer-Encoding whose final coding is not chunked is read until close.
    """
    te: list[bytes] = []
    has_length = False
    for name, value in headers:
        lname = name.lower()
        if lname == _TRANSFER_ENCODING:
            te.append(value)
        elif lname == _CONTENT_LENGTH:
            has_length = True
    return framing_of(status, te, has_length, head_only)


def framing_of(status: int, transfer_encodings: list[bytes], has_length: bool, head_only: bool) -> int:
    """:func:`response_framing` from what a parser noted while reading the fields (the hot path).

    ``INVALID`` when ``chunked`` is applied more than once or is not the final coding (RFC 9112 7):
    such a body cannot be re-framed for the client without applying chunked twice.
    """
    if head_only or status in (204, 304) or status < 200:
        return NO_BODY
    if transfer_encodings:
        if len(transfer_encodings) == 1 and transfer_encodings[0].lower() == _CHUNKED:
            return CHUNKED  # the common case
        codings = [c for value in transfer_encodings for c in transfer_codings(value)]
        chunked = codings.count(_CHUNKED)
        if chunked > 1 or (chunked == 1 and codings[-1] != _CHUNKED):
            return INVALID
        return CHUNKED if chunked else UNTIL_CLOSE
    if has_length:
        return LENGTH
    return UNTIL_CLOSE


#: (wire, chunked, close): the status line and fields sent to the client; whether the body goes
#: chunked (re-chunked when it came close-delimited); whether the client connection ends after it.
#: A plain tuple: a NamedTuple costs a Python-level __new__ per response.
ResponseHead = tuple[bytes, bool, bool]


def prepare_response(
    rules: HeadRules,
    status: int,
    reason: bytes,
    fields: Headers,
    framing: int,
    *,
    request_id: str,
    http11: bool,
    head_only: bool,
    close: bool,
) -> ResponseHead:
    """The response head for the client, and how its body is framed.

    Hop-by-hop fields and those named by ``Connection`` (bar the protected ones) are dropped; the
    request id and a ``Date`` are added when absent. A streamed body (chunked or close-delimited
    upstream) goes chunked to an HTTP/1.1 client, with ``chunked`` appended to the upstream's other
    transfer codings (``gzip`` becomes ``gzip, chunked``, RFC 9112 6.1), and close-delimited to an
    HTTP/1.0 client, which must not see Transfer-Encoding at all.
    """
    parts = [http.status_line(status, reason)]
    te: list[bytes] | None = None
    connection: list[bytes] | None = None
    hop = http.HOP_BY_HOP
    rid = rules.request_id_header
    has_date = False
    for name, value in fields:  # one pass: the common response names no field in Connection
        lname = name.lower()
        if lname in hop:
            if lname == _TRANSFER_ENCODING:
                te = [value] if te is None else [*te, value]
            elif lname == _CONNECTION:
                connection = [value] if connection is None else [*connection, value]
            continue
        if lname == rid:
            continue  # the client gets the id the proxy logged and traced, not the upstream's
        if lname == _DATE:
            has_date = True
        parts += (name, b": ", value, b"\r\n")
    if connection is not None:
        named = connection_options(connection, rules)
        if named:  # rare: build the fields again without the named ones
            parts = [parts[0]]
            for name, value in fields:
                lname = name.lower()
                if lname not in hop and lname not in named and lname != rid:
                    parts += (name, b": ", value, b"\r\n")
    parts.append(rid + b": " + request_id.encode("ascii") + b"\r\n")
    if not has_date:
        parts.append(http.date_header())  # RFC 9110 6.6.1: a forwarded response needs a Date
    chunked = False
    if framing in STREAMED:
        if http11:
            chunked = True
            parts.append(b"Transfer-Encoding: " + _with_chunked(te) + b"\r\n")
        else:
            close = True
    elif framing == NO_BODY and te and head_only and http11:
        parts.append(b"Transfer-Encoding: " + _with_chunked(te) + b"\r\n")  # what a GET would have had
    if close:
        parts.append(b"Connection: close\r\n")
    elif not http11:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), chunked, close


def _with_chunked(values: list[bytes] | None) -> bytes:
    if not values:
        return _CHUNKED
    if len(values) == 1 and values[0] == _CHUNKED:
        return _CHUNKED  # the common case
    codings = [c for value in values for c in transfer_codings(value)]
    if not codings or codings[-1] != _CHUNKED:
        codings.append(_CHUNKED)
    return b", ".join(codings)


def switching_head(rules: HeadRules, reason: bytes, fields: Headers, request_id: str) -> bytes:
    """A 101 Switching Protocols head as forwarded: ``Connection: Upgrade`` and ``Upgrade`` kept,
    other hop-by-hop and Connection-named fields dropped, the request id added."""
    connection = [v for n, v in fields if n.lower() == _CONNECTION]
    named = connection_options(connection, rules) if connection else frozenset()
    rid = rules.request_id_header
    parts = [http.status_line(101, reason)]
    upgrade: bytes | None = None
    for name, value in fields:
        lname = name.lower()
        if lname == _UPGRADE:
            upgrade = value
        elif lname not in http.HOP_BY_HOP and lname not in named and lname != rid:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"Connection: Upgrade\r\n")
    if upgrade is not None:
        parts += (b"Upgrade: ", upgrade, b"\r\n")
    parts += (rid, b": ", request_id.encode("ascii"), b"\r\n\r\n")
    return b"".join(parts)


#: trailer fields never forwarded: hop-by-hop, framing, routing and the request id (RFC 9110 6.5.1)
_TRAILER_DROP = http.HOP_BY_HOP | {
    _CONTENT_LENGTH, _HOST, b"content-type", b"content-encoding", b"content-range", b"authorization",
    b"set-cookie", b"cookie", b"cache-control", b"expect",
}  # fmt: skip


def forward_trailers(rules: HeadRules, fields: Headers) -> Headers:
    """The trailer fields passed on to the client: what may go in a trailer and is not hop-by-hop."""
    rid = rules.request_id_header
    return [(n, v) for n, v in fields if (lname := n.lower()) not in _TRAILER_DROP and lname != rid]


def interim_head(rules: HeadRules, status: int, reason: bytes, fields: Headers) -> bytes:
    """A 1xx response (100 Continue, 103 Early Hints) as forwarded: hop-by-hop fields dropped."""
    connection = [v for n, v in fields if n.lower() == _CONNECTION]
    named = connection_options(connection, rules) if connection else frozenset()
    parts = [http.status_line(status, reason)]
    http.serialize_headers(
        parts, [(n, v) for n, v in fields if n.lower() not in http.HOP_BY_HOP and n.lower() not in named]
    )
    parts.append(b"\r\n")
    return b"".join(parts)
