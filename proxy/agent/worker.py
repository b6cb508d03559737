"""The collection thread: every ``interval`` seconds, each source builds a fresh snapshot.

Sources are blocking (ctypes calls into NVML, /proc reads), so they run on one thread of their own,
never on the event loop and never per scrape. A source that raises is logged and skipped for that
round; the others still run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger("infermon.agent.worker")


class Source(Protocol):
    def collect_once(self) -> None: ...


class Worker:
    def __init__(self, sources: Sequence[Source], interval: float) -> None:
        self._sources = list(sources)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="infermon-collect", daemon=True)
        self._rounds = 0
        self._last_round = time.monotonic()

    @property
    def rounds(self) -> int:
        """Collections finished so far."""
        return self._rounds

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def healthy(self) -> bool:
        """The thread runs and has finished a round within three intervals (plus a grace second)."""
        age = time.monotonic() - self._last_round
        return self._thread.is_alive() and age < 3 * self._interval + 1.0

    def run_once(self) -> None:
        for source in self._sources:
            try:
                source.collect_once()
            except Exception:
                log.exception("collection by %s failed", type(source).__name__)
        self._rounds += 1
        self._last_round = time.monotonic()

    def _run(self) -> None:
        next_round = time.monotonic()
        while not self._stop.is_set():
            self.run_once()
            next_round += self._interval
            delay = next_round - time.monotonic()
            if delay < 0:  # a round overran: skip the missed ticks instead of bursting
                next_round = time.monotonic()
                delay = 0.0
            self._stop.wait(delay)
