"""Bytes-level HTTP/1.1 helpers shared by both sides of the data plane (RFC 9110 / 9112)."""

from __future__ import annotations

import random
import time
from email.utils import formatdate
from http import HTTPStatus

import orjson

from proxy.dataplane.exchange import Headers

#: Hop-by-hop fields (RFC 9110 7.6.1), plus Proxy-* (never forwarded) and the framing fields that
#: each side of the proxy sets for itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

REASONS = {s.value: s.phrase.encode("latin-1") for s in HTTPStatus}
REASONS[499] = b"Client Closed Request"


_date_cache: tuple[int, bytes] = (0, b"")


def date_header() -> bytes:
    """``Date: <IMF-fixdate>\\r\\n`` for now, formatted at most once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n")
    return _date_cache[1]


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """Lower-case tokens of the values of every Connection field line."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


#: status lines already built, by (status, reason)
_STATUS_LINES: dict[tuple[int, bytes | None], bytes] = {}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason if reason is not None else REASONS.get(status, b""))
        if len(_STATUS_LINES) < 512:  # the common (status, reason) pairs; bounded whatever upstreams send
            _STATUS_LINES[(status, reason)] = line
    return line


def serialize_headers(parts: list[bytes], headers: Headers) -> None:
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")  # one in-place extend: cheaper than four appends


def error_response(
    status: int,
    message: str,
    request_id: str,
    request_id_header: bytes,
    *,
    close: bool,
    head_only: bool = False,
) -> bytes:
    """A complete JSON error response: ``{"error": ..., "request_id": ...}``."""
    body = orjson.dumps({"error": message, "request_id": request_id})
    parts = [
        status_line(status),
        date_header(),
        b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
    ]
    if request_id:
        parts.append(request_id_header + b": " + request_id.encode("ascii") + b"\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def is_valid_request_id(value: bytes) -> bool:
    """A client-supplied request id is kept when it is short visible ASCII (no spaces)."""
    return 0 < len(value) <= 200 and all(0x21 <= c <= 0x7E for c in value)


_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID_SET = (0x4 << 76) | (0x2 << 62)


def new_request_id() -> str:
    """A random (version 4) UUID string; a quarter of the cost of ``str(uuid.uuid4())``."""
    h = f"{random.getrandbits(128) & _UUID_CLEAR | _UUID_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
