"""Observer hook points of the data plane.

Observers are registered once at start-up; :class:`Hooks` keeps, per hook point, only the bound
methods an observer overrides, so a hook nobody uses costs one truthiness test per request. A hook
that raises is logged (at most once per observer and hook every ``log_interval`` seconds), counted,
and never touches the request.

Hook points, in request order:

- ``on_request_head(ex)``: request head parsed, before it is sent upstream. May add headers
  (``ex.request_headers`` is the list that will be sent) and set labels. Requests the proxy answers
  itself after reading their head (limits, invalid fields) get it too, just before ``on_complete``.
- ``on_request_body(ex, chunk)``: each request body piece, as received, always after
  ``on_request_head`` (a pipelined request's pieces read ahead of its turn are held, then handed
  over right after its head).
- ``on_upstream_head(ex)``: final response head received, before it is sent to the client;
  ``ex.response_headers`` may be read or changed; labels from response headers are set here.
- ``on_first_byte(ex)``: the first response body byte (time to first token for streams).
- ``on_response_body(ex, chunk)``: each response body piece, as received.
- ``on_complete(ex)``: always, exactly once per exchange: success, error response (including
  requests rejected before their head was complete), upstream failure or client abort.

Example::

    class Slow(Observer):
        def on_complete(self, ex: Exchange) -> None:
            if ex.t_done - ex.t_accepted > 1.0:
                print("slow", ex.request_id)

    hooks = Hooks([Slow()])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from proxy.dataplane.exchange import Exchange

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

log = logging.getLogger("infermon.hooks")

HOOK_NAMES = (
    "on_request_head",
    "on_request_body",
    "on_upstream_head",
    "on_first_byte",
    "on_response_body",
    "on_complete",
)


class Observer:
    """Base class: override the hooks you need. Hooks must be O(1): no I/O, no awaits.

    An instance may set a hook attribute to ``None`` to opt out of it (decided at start-up).

    Lifecycle, called by ``ProxyApp`` for every observer, built-in or passed in: :meth:`start` once
    before traffic (start threads or tasks here), :meth:`collector` once for its metrics, and
    :meth:`aclose` once at shutdown, after the data plane drained (flush what is queued, within the
    observer's own time limit). A failing ``start`` or ``aclose`` is logged, never fatal.
    """

    name = "observer"

    async def start(self) -> None:
        """Called once, before the data plane accepts traffic."""

    async def aclose(self) -> None:
        """Called once at shutdown, after the data plane drained."""

    def collector(self) -> Collector | None:
        """The observer's metrics, registered with the proxy's registry; None when it has none."""
        return None

    def on_request_head(self, ex: Exchange) -> None:
        """Request head parsed."""

    def on_request_body(self, ex: Exchange, chunk: bytes) -> None:
        """A piece of the request body."""

    def on_upstream_head(self, ex: Exchange) -> None:
        """Final response head from the upstream."""

    def on_first_byte(self, ex: Exchange) -> None:
        """First response body byte."""

    def on_response_body(self, ex: Exchange, chunk: bytes) -> None:
        """A piece of the response body."""

    def on_complete(self, ex: Exchange) -> None:
        """The exchange is over, whatever the outcome."""


class Hooks:
    """The composed observer chain, built once."""

    def __init__(self, observers: Sequence[Observer], log_interval: float = 60.0) -> None:
        self.observers = list(observers)
        self.log_interval = log_interval
        self.errors: dict[tuple[str, str], int] = {}
        self._last_log: dict[tuple[str, str], float] = {}
        self.request_head = self._bound("on_request_head")
        self.request_body = self._bound("on_request_body")
        self.upstream_head = self._bound("on_upstream_head")
        self.first_byte = self._bound("on_first_byte")
        self.response_body = self._bound("on_response_body")
        self.complete = self._bound("on_complete")

    def _bound(self, hook: str) -> list[tuple[str, Callable[..., None]]]:
        base = getattr(Observer, hook)
        found = []
        for obs in self.observers:
            fn = getattr(obs, hook, None)
            if fn is None or getattr(fn, "__func__", None) is base:
                continue  # not overridden, or switched off on the instance (set to None)
            found.append((obs.name, fn))
        return found

    def call(self, chain: list[tuple[str, Callable[..., None]]], hook: str, *args: Any) -> None:
        for name, fn in chain:
            try:
                fn(*args)
            except Exception as exc:  # an observer must never fail a request
                self._failed(name, hook, exc)

    def _failed(self, name: str, hook: str, exc: Exception) -> None:
        key = (name, hook)
        self.errors[key] = self.errors.get(key, 0) + 1
        now = time.monotonic()
        if now - self._last_log.get(key, -1e9) >= self.log_interval:
            self._last_log[key] = now
            log.error(
                "observer %s failed in %s (%d times so far): %r",
                name,
                hook,
                self.errors[key],
                exc,
                exc_info=exc,
            )
