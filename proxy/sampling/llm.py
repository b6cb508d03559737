"""OpenAI-compatible bodies without a full parse: event streams, the `usage` in a capped tail, the model.

Three readers, each bounded by the bytes it is given:

- :func:`sse_data` / :func:`parse_sse` read a ``text/event-stream`` body the way the Server-Sent
  Events specification does (lines end in CRLF, LF or CR; ``data:`` fields of one event are joined
  with ``\\n``; comments and events without data are skipped; an unfinished last event is left out).
- :func:`usage_from_tail` finds the token ``usage`` and the last ``finish_reason`` in the last bytes
  of a response (side path: it runs for every request on an LLM route, not only sampled ones).
- :func:`scan_model` finds the request's ``"model": "..."`` in the first body bytes (hot path: a
  bytes search and one precompiled regex match, no JSON parse).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

#: the usage counters kept (OpenAI's names; vLLM, TGI, SGLang, Ollama and LiteLLM use them too)
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")

#: the longest model name :func:`scan_model` returns; a longer value gives None
MAX_MODEL_CHARS = 256
#: the bytes at the start of a body :func:`scan_model` searches forwards before it searches backwards
FRONT_BYTES = 256

_MODEL_KEY = b'"model"'
# after the key: the colon, then a string value of plain characters (the one regex of the fast path)
_MODEL_VALUE = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*"([^"\\]{1,%d})"' % MAX_MODEL_CHARS)
# a string value starts there, but is not one _MODEL_VALUE takes: empty, escaped, too long or cut
_MODEL_STRING = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*"')

_USAGE_KEY = b'"usage"'
_USAGE_OPEN = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*\{")
_FINISH = re.compile(rb'"finish_reason"[ \t\r\n]*:[ \t\r\n]*"([A-Za-z0-9_.\-]{1,64})"')
# what an event stream's line can start with: a field the specification names, or a comment
_FIELD_START = (b"data:", b"data\n", b"data\r", b":", b"event:", b"id:", b"retry:")


def _model_at(head: bytes, key: int) -> str | None:
    """The value after the ``"model"`` at ``key`` (None: rejected); "" when no ``: "string"`` follows."""
    found = _MODEL_VALUE.match(head, key + 7)
    if found is not None:
        try:
            return found.group(1).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if _MODEL_STRING.match(head, key + 7) is not None:
        return None  # a string value, but empty, escaped, longer than MAX_MODEL_CHARS or cut by the end
    return ""


def scan_model(head: bytes) -> str | None:
    """The value of a ``"model": "<string>"`` pair in ``head``, without parsing JSON.

    ``head`` is the first bytes of a request (or response) body, as many as ``llm.scan_bytes``. A
    top-level key is written before the nested values or after them, so the scan looks for the key in
    the first :data:`FRONT_BYTES` bytes (``{"model": ...`` as curl examples write it), then from the
    end of ``head`` backwards (``{"messages": [...], "model": ...`` as the OpenAI SDKs write it); the
    backward search costs about half what a forward one does over the same bytes. A ``"model"``
    inside a string value is never taken (JSON escapes the quotes there), nor one that is not
    followed by ``:`` and a string (``"role": "model"``). The limitation: without a parse, a nested
    ``"model"`` key (in ``metadata`` or a tool's schema) can win over the top-level one, when it comes
    later in ``head`` or the top-level one is not in ``head`` at all.

    Returns None when there is no such pair in ``head``, when the value is empty, longer than
    :data:`MAX_MODEL_CHARS`, holds an escape (a backslash: rejected, not unescaped), is cut by the end
    of ``head``, or is not UTF-8.
    """
    key = head.find(_MODEL_KEY, 0, FRONT_BYTES)
    while key >= 0:
        value = _model_at(head, key)
        if value != "":
            return value
        key = head.find(_MODEL_KEY, key + 7, FRONT_BYTES)
    key = head.rfind(_MODEL_KEY)
    while key >= 0:
        value = _model_at(head, key)
        if value != "":
            return value
        key = head.rfind(_MODEL_KEY, 0, key)
    return None


def sse_data(body: bytes) -> list[str]:
    """The data of each event in an event stream, as the SSE specification dispatches it.

    Lines end in CRLF, LF or CR; a line starting with ``:`` is a comment; ``field: value`` loses one
    space after the colon; the ``data`` fields of one event are joined with ``\\n``; an empty line ends
    an event, and an event without data is not dispatched; an event the body ends in the middle of
    (no empty line after it) is left out. Bytes that are not UTF-8 are replaced (as the specification
    decodes), and a leading byte order mark is skipped.
    """
    text = body.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    events: list[str] = []
    data: list[str] = []
    has_data = False
    # splitlines also splits on \v, \f, \x1c.. \x1e, \x85, \u2028, \u2029: the SSE grammar does not;
    # normalise the three real line ends to \n and split on it alone
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    # the last element follows the last line end: an unfinished line, never dispatched
    for line in lines[:-1]:
        if not line:
            if has_data:
                events.append("\n".join(data))
            data = []
            has_data = False
            continue
        if line[0] == ":":
            continue
        colon = line.find(":")
        if colon < 0:
            field, value = line, ""
        else:
            field, value = line[:colon], line[colon + 1 :]
            if value.startswith(" "):
                value = value[1:]
        if field == "data":
            data.append(value)
            has_data = True
    return events


def parse_sse(body: bytes) -> list[Any]:
    """The JSON data of each event of an event stream (``[DONE]`` and data that is not JSON skipped)."""
    out: list[Any] = []
    for data in sse_data(body):
        if data == "[DONE]":
            continue
        try:
            out.append(orjson.loads(data))
        except orjson.JSONDecodeError:
            continue
    return out


def usage_counts(value: Any) -> dict[str, int] | None:
    """The token counters of a ``usage`` object (non-negative ints only), None when it has none."""
    if not isinstance(value, dict):
        return None
    usage: dict[str, int] = {}
    for key in USAGE_KEYS:
        count = value.get(key)
        if type(count) is int and count >= 0:
            usage[key] = count
    return usage or None


def _last_finish(choices: Any) -> str | None:
    reason: str | None = None
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                value = choice.get("finish_reason")
                if isinstance(value, str) and value:
                    reason = value
    return reason


def stream_usage(events: list[Any]) -> tuple[dict[str, int] | None, str | None]:
    """Usage and finish_reason from the data objects of an OpenAI stream.

    The usage is that of the last chunk carrying a non-null ``usage`` (``stream_options.include_usage``
    puts it on one last chunk with empty ``choices``; some servers put a running count on every chunk);
    the finish_reason is the last non-null one of any choice.
    """
    usage: dict[str, int] | None = None
    reason: str | None = None
    for event in events:
        if not isinstance(event, dict):
            continue
        counts = usage_counts(event.get("usage"))
        if counts is not None:
            usage = counts
        found = _last_finish(event.get("choices"))
        if found is not None:
            reason = found
    return usage, reason


def response_usage(response: Any) -> tuple[dict[str, int] | None, str | None]:
    """Usage and the first choice's finish_reason from a plain (not streamed) OpenAI response."""
    if not isinstance(response, dict):
        return None, None
    reason: str | None = None
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        value = choices[0].get("finish_reason")
        if isinstance(value, str) and value:
            reason = value
    return usage_counts(response.get("usage")), reason


def _object_end(data: bytes, start: int) -> int:
    """The index after the JSON object opening at ``data[start]``, or -1 when ``data`` ends first."""
    depth = 0
    in_string = False
    i = start
    n = len(data)
    while i < n:
        c = data[i]
        if in_string:
            if c == 0x5C:  # backslash: skip the escaped character
                i += 1
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _plain_tail(tail: bytes) -> tuple[dict[str, int] | None, str | None]:
    try:
        return response_usage(orjson.loads(tail))
    except orjson.JSONDecodeError:
        pass  # the tail of a larger body: look for the keys
    usage: dict[str, int] | None = None
    pos = tail.rfind(_USAGE_KEY)
    while pos >= 0 and usage is None:
        opened = _USAGE_OPEN.match(tail, pos + len(_USAGE_KEY))
        if opened is not None:
            begin = opened.end() - 1
            end = _object_end(tail, begin)
            if end > 0:
                try:
                    usage = usage_counts(orjson.loads(tail[begin:end]))
                except orjson.JSONDecodeError:
                    usage = None
        pos = tail.rfind(_USAGE_KEY, 0, pos)
    reason: str | None = None
    for found in _FINISH.finditer(tail):
        reason = found.group(1).decode("ascii")
    return usage, reason


def _stream_tail(tail: bytes) -> tuple[dict[str, int] | None, str | None]:
    # a stream's first bytes may be a UTF-8 byte order mark (the event stream format allows one);
    # then line ends: the end of the line (or event) before the cut
    tail = tail.removeprefix(b"\xef\xbb\xbf").lstrip(b"\r\n")
    if not tail.startswith(_FIELD_START):
        # the tail starts inside an event: skip to the end of that event (the first empty line)
        tail = tail.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = tail.find(b"\n\n")
        if end < 0:
            return None, None
        tail = tail[end + 2 :]
    return stream_usage(parse_sse(tail))


def usage_from_tail(tail: bytes, stream: bool) -> tuple[dict[str, int] | None, str | None]:
    """``(usage, finish_reason)`` from the last bytes of an OpenAI-compatible response.

    ``tail`` is the end of the response body (``llm.tail_bytes`` of it, or all of it when shorter);
    ``stream`` says whether it is an event stream. A stream's tail may start in the middle of an
    event: that first piece is skipped; then the events are read as :func:`stream_usage` does. A plain
    JSON body is parsed when the tail is all of it; otherwise the last ``"usage": {...}`` object in the
    tail is parsed on its own and the last ``"finish_reason": "..."`` is taken. ``usage`` holds
    ``prompt_tokens``, ``completion_tokens`` and ``total_tokens`` where the response had them (an
    embeddings response has no completion tokens); either value is None when the tail has none.
    Never raises on any input.
    """
    try:
        return _stream_tail(tail) if stream else _plain_tail(tail)
    except (ValueError, TypeError, RecursionError):  # a last guard: the readers above do not raise
        return None, None
