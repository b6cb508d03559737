"""What the hot path hands to the side path, and what the side path makes of it.

A :class:`Sample` is built once, in ``on_complete``, from bytes the sampler copied (capped at
``sampling.max_body_bytes``); nothing in it is parsed yet. The side path (a worker thread) turns it
into an :class:`Extracted`: the bodies parsed and redacted, one feature row per instance, the
predictions, the LLM usage. Sinks and the drift engine only ever see redacted data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Sample:
    request_id: str
    timestamp: float  # time.time() when the exchange ended
    method: str
    path: str  # without the query string
    status: int  # 0 when no response head came
    model: str
    version: str
    variant: str
    #: header fields with the secrets already removed (Authorization, Cookie, ... and the configured ones)
    request_headers: list[tuple[str, str]]
    response_headers: list[tuple[str, str]]
    request_body: bytes
    response_body: bytes  # an event stream: whole events only, up to the cap
    response_stream: bool = False  # text/event-stream
    response_truncated: bool = False  # an event stream longer than the cap: later events left out
    response_tail: bytes = b""  # an event stream's last bytes (its final usage event), when truncated
    duration: float = 0.0  # seconds, first request byte to the end
    ttfb: float | None = None  # seconds to the first response body byte
    error: str | None = None  # the exchange's error kind, when it failed
    trace_id: str = ""


@dataclass(slots=True)
class Extracted:
    """One sample read by an adapter."""

    adapter: str  # the adapter that read it: kserve_v1, oip_v2, openai, tfserving, mapping, none
    #: one dict per instance: feature name -> value (float, int, str, bool or None for missing)
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: one dict per instance (empty when the response carried none): prediction name -> value
    predictions: list[dict[str, Any]] = field(default_factory=list)
    request: Any = None  # the request JSON, redacted; None when not JSON
    response: Any = None  # the response JSON, redacted; an event stream: the list of its data objects
    request_body: bytes = b""  # what sinks send: the redacted JSON re-encoded, or the bytes as they came
    response_body: bytes = b""
    #: OpenAI usage: prompt_tokens, completion_tokens, total_tokens (ints) when the response had them
    usage: dict[str, int] | None = None
    finish_reason: str | None = None
