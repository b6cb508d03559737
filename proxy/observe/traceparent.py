"""Trace context headers: strict W3C Trace Context and B3, parsed and written without the SDK.

The OpenTelemetry propagators build a ``Context`` object per request; the proxy needs only the ids and
the sampled flag, so it parses the headers itself. Every parser returns ``None`` for anything it does
not accept, and never raises: the caller then starts a new trace.

W3C ``traceparent`` (https://www.w3.org/TR/trace-context/)::

    00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01
    version-trace_id-parent_id-flags        (lower-case hex)

- version: two hex digits, ``ff`` is invalid; version ``00`` is exactly 55 characters; a higher
  version may be longer, then the 56th character is ``-`` and only the first four fields are read.
- trace_id: 32 hex, parent_id: 16 hex, neither all zeros; flags: 2 hex, bit 0 is "sampled".

``tracestate`` is passed on only with a valid traceparent, and dropped whole when a member is
malformed, a key repeats or there are more than 32 members; over 512 characters, members longer than
128 characters go first, then members from the end (the W3C truncation rule).

B3 (https://github.com/openzipkin/b3-propagation): single ``b3: {trace}-{span}-{sampling}-{parent}``
(sampling and parent optional; ``b3: 0`` / ``1`` / ``d`` alone carry only a decision) and multi
``X-B3-TraceId`` / ``X-B3-SpanId`` / ``X-B3-Sampled`` / ``X-B3-Flags``. 64-bit trace ids are
left-padded to 128 bits. ``d`` (debug) means sampled.

Example::

    >>> parse_traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    Parent(trace_id='0af7651916cd43dd8448eb211c80319c', span_id='b7ad6b7169203331', sampled=True)
    >>> parse_traceparent(b"00-00000000000000000000000000000000-b7ad6b7169203331-01") is None
    True
"""

from __future__ import annotations

import re
from random import getrandbits
from typing import NamedTuple

_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_HEX_TRACE = re.compile(r"(?:[0-9a-f]{16}|[0-9a-f]{32})\Z")

# tracestate member grammar (W3C Trace Context, section 3.3.1)
_TS_KEY = r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
_TS_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_TS_MEMBER = re.compile(rf"({_TS_KEY})=({_TS_VALUE})\Z")
TRACESTATE_MAX_MEMBERS = 32
TRACESTATE_MAX_LEN = 512
TRACESTATE_LONG_MEMBER = 128


class Parent(NamedTuple):
    """The caller's span: ids in lower-case hex; ``sampled`` None when the caller left it open."""

    trace_id: str
    span_id: str
    sampled: bool | None


def parse_traceparent(value: bytes) -> Parent | None:
    """A W3C ``traceparent`` value, or None when it is not valid."""
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version = m.group(1)
    if version == b"ff":
        return None
    size = len(value)
    if version == b"00":
        if size != 55:
            return None
    elif size > 55 and value[55:56] != b"-":
        return None
    trace_id = m.group(2).decode("ascii")
    span_id = m.group(3).decode("ascii")
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Parent(trace_id, span_id, bool(int(m.group(4), 16) & 1))


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> bytes:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}".encode("ascii")


def parse_tracestate(values: list[bytes]) -> bytes | None:
    """The ``tracestate`` to pass on (all header lines combined), or None to drop it."""
    joined = b",".join(values)
    try:
        text = joined.decode("ascii")
    except UnicodeDecodeError:
        return None
    members: list[str] = []
    keys: set[str] = set()
    for raw in text.split(","):
        member = raw.strip(" \t")
        if not member:
            continue  # empty list members are allowed and ignored
        m = _TS_MEMBER.match(member)
        if m is None or m.group(1) in keys:
            return None
        keys.add(m.group(1))
        members.append(member)
    if not members or len(members) > TRACESTATE_MAX_MEMBERS:
        return None
    out = ",".join(members)
    if len(out) > TRACESTATE_MAX_LEN:
        members = [m for m in members if len(m) <= TRACESTATE_LONG_MEMBER]
        while members and len(",".join(members)) > TRACESTATE_MAX_LEN:
            members.pop()
        if not members:
            return None
        out = ",".join(members)
    if len(values) == 1 and out == text:
        return values[0]
    return out.encode("ascii")


def _b3_trace_id(text: str) -> str | None:
    text = text.lower()
    if not _HEX_TRACE.match(text):
        return None
    trace_id = text.rjust(32, "0")
    return None if trace_id == _ZERO_TRACE else trace_id


def _b3_span_id(text: str) -> str | None:
    text = text.lower()
    if not _HEX16.match(text) or text == _ZERO_SPAN:
        return None
    return text


def _b3_sampled(text: str) -> bool | None:
    """True (``1``, ``d``), False (``0``), None for anything else."""
    text = text.lower()
    if text in ("1", "d", "true"):
        return True
    if text in ("0", "false"):
        return False
    return None


def parse_b3_single(value: bytes) -> Parent | None:
    """The ``b3`` header; a decision alone (``b3: 0``) gives empty ids and only ``sampled``."""
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    parts = text.split("-")
    if len(parts) == 1:
        decision = _b3_sampled(parts[0])
        return None if decision is None else Parent("", "", decision)
    if len(parts) > 4:
        return None
    trace_id = _b3_trace_id(parts[0])
    span_id = _b3_span_id(parts[1])
    if trace_id is None or span_id is None:
        return None
    sampled: bool | None = None
    if len(parts) >= 3:
        sampled = _b3_sampled(parts[2])
        if sampled is None:
            return None
    if len(parts) == 4 and _b3_span_id(parts[3]) is None:
        return None
    return Parent(trace_id, span_id, sampled)


def parse_b3_multi(
    trace: bytes | None, span: bytes | None, sampled: bytes | None, flags: bytes | None
) -> Parent | None:
    """The ``X-B3-*`` headers (lower-case names), any of which may be missing."""
    try:
        decision: bool | None = None
        if flags is not None and flags.strip() == b"1":
            decision = True
        elif sampled is not None:
            decision = _b3_sampled(sampled.decode("ascii").strip())  # unknown values: left open
        if trace is None or span is None:
            return None if decision is None else Parent("", "", decision)
        trace_id = _b3_trace_id(trace.decode("ascii").strip())
        span_id = _b3_span_id(span.decode("ascii").strip())
    except UnicodeDecodeError:
        return None
    if trace_id is None or span_id is None:
        return None
    return Parent(trace_id, span_id, decision)


def format_b3_single(trace_id: str, span_id: str, sampled: bool) -> bytes:
    return f"{trace_id}-{span_id}-{'1' if sampled else '0'}".encode("ascii")


def new_trace_id() -> str:
    """128 random bits, never all zeros (the trace-id-ratio samplers read the lower 64)."""
    n = getrandbits(128)
    while not n:
        n = getrandbits(128)
    return f"{n:032x}"


def new_span_id() -> str:
    n = getrandbits(64)
    while not n:
        n = getrandbits(64)
    return f"{n:016x}"
