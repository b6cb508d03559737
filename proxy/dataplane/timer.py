"""A cheap, movable deadline for per-connection timeouts.

Requests move a connection's deadline many times a second; rescheduling a loop timer each time would
cost more than the request. :class:`Deadline` keeps one timer armed at the earliest deadline ever
asked for; when it fires early (the deadline moved later) it re-arms itself for the new time. Moving a
deadline later is an attribute write; moving it earlier re-arms the timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    __slots__ = ("_armed_at", "_callback", "_handle", "_loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        #: absolute ``loop.time()`` of the deadline, or None when disarmed
        self.when: float | None = None

    def set_in(self, seconds: float) -> None:
        self.set_at(self._loop.time() + seconds)

    def set_at(self, when: float) -> None:
        self.when = when
        handle = self._handle
        if handle is None or when < self._armed_at:
            if handle is not None:
                handle.cancel()
            self._armed_at = when
            self._handle = self._loop.call_at(when, self._fire)

    def clear(self) -> None:
        self.when = None

    def cancel(self) -> None:
        self.when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        when = self.when
        if when is None:
            return
        if self._loop.time() + 0.001 < when:
            self._armed_at = when
            self._handle = self._loop.call_at(when, self._fire)
            return
        self.when = None
        self._callback()
