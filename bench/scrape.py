"""Scrapes of infermon's admin /metrics during a load run, and traffic that grows its series count.

Used by ``python -m bench.run --scrape-interval S [--scrape-paths N]``. The admin server runs on the
proxy's event loop; the request metrics are written in a worker thread, so a scrape should cost the
requests in flight at most a few milliseconds of the loop. A build where the scrape runs on the loop
(an older one) holds every request for the scrape's whole time: it shows in wrk's p99 and max latency
of a run with scraping against one without, and in the scrape's own time.

`grow_series` first sends one request on each of N distinct Open Inference Protocol v2 paths
(``/v2/models/m{i}/versions/v{j}/infer``), so the proxy keeps N model/version label sets (the proxy
needs ``labels.max_values`` at least `label_values(N)`, and ``labels.max_combinations`` at least N;
the harness sets them through the environment).
"""

from __future__ import annotations

import http.client
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from bench.procs import LOOPBACK


def label_values(paths: int) -> tuple[int, int]:
    """(models, versions) with models * versions >= paths, as square as possible."""
    if paths <= 0:
        return 0, 0
    models = math.ceil(math.sqrt(paths))
    return models, math.ceil(paths / models)


def infer_paths(paths: int) -> list[str]:
    models, versions = label_values(paths)
    return [f"/v2/models/m{i}/versions/v{j}/infer" for i in range(models) for j in range(versions)][:paths]


def grow_series(port: int, paths: int, timeout: float = 10.0) -> int:
    """One GET on each of `paths` distinct inference paths over one keep-alive connection; 2xx count."""
    ok = 0
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        for path in infer_paths(paths):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            ok += 200 <= response.status < 300
    finally:
        conn.close()
    return ok


@dataclass
class Scrape:
    at_s: float  # since the scraper started
    seconds: float  # request sent to last byte read
    status: int
    bytes: int
    series: int  # sample lines in the exposition


def series_count(body: bytes) -> int:
    """Sample lines of a Prometheus text exposition (neither comments nor blank)."""
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def scrape(admin: int, timeout: float = 30.0) -> tuple[float, int, bytes]:
    """(seconds, status, body) of one GET /metrics on a fresh connection, as Prometheus makes it."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(LOOPBACK, admin, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return time.perf_counter() - started, response.status, body


class Scraper:
    """GETs /metrics every `interval` seconds in a thread while used as a context manager.

    The first scrape comes half an interval in; none starts after `last_start` seconds (wrk drops
    the requests still in flight when it stops, so a scrape that outlasts the run would hide the
    stall it causes). A failed scrape is recorded with status 0.
    """

    def __init__(self, admin: int, interval: float, last_start: float = float("inf")) -> None:
        self.admin = admin
        self.interval = interval
        self.last_start = last_start
        self.scrapes: list[Scrape] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scraper", daemon=True)
        self._start = 0.0

    def _loop(self) -> None:
        wait = self.interval / 2
        while not self._stop.wait(wait):
            at = time.monotonic() - self._start
            if at > self.last_start and self.scrapes:
                return
            try:
                seconds, status, body = scrape(self.admin)
            except (OSError, http.client.HTTPException):
                self.scrapes.append(Scrape(at, time.monotonic() - self._start - at, 0, 0, 0))
            else:
                self.scrapes.append(Scrape(at, seconds, status, len(body), series_count(body)))
            next_at = self._start + self.interval / 2 + len(self.scrapes) * self.interval
            wait = max(0.0, next_at - time.monotonic())

    def __enter__(self) -> Scraper:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=35.0)


@dataclass
class ScrapeSummary:
    count: int
    failed: int
    median_ms: float
    max_ms: float
    kib: float  # exposition size, median
    series: int  # sample lines, largest seen
    at_s: list[float] = field(default_factory=list)


def summarize(scrapes: list[Scrape]) -> ScrapeSummary:
    ok = [s for s in scrapes if s.status == 200]
    return ScrapeSummary(
        count=len(scrapes),
        failed=len(scrapes) - len(ok),
        median_ms=statistics.median(s.seconds for s in ok) * 1e3 if ok else 0.0,
        max_ms=max((s.seconds for s in ok), default=0.0) * 1e3,
        kib=statistics.median(s.bytes for s in ok) / 1024 if ok else 0.0,
        series=max((s.series for s in ok), default=0),
        at_s=[round(s.at_s, 2) for s in scrapes],
    )


def run_seconds(duration: float, interval: float, idle_scrape_s: float) -> tuple[float, float]:
    """(wrk seconds, latest scrape start) so that scrapes taking `idle_scrape_s` end inside the run.

    The run lasts at least `duration` and long enough for one scrape half an interval in to end a
    second before wrk stops; later scrapes start only while they can still end half a second early.
    """
    seconds = max(duration, math.ceil(interval / 2 + 1.5 * idle_scrape_s + 1.0))
    return seconds, seconds - 1.5 * idle_scrape_s - 0.5


def idle_scrapes(admin: int, count: int = 3) -> ScrapeSummary:
    """`count` scrapes one after another with no load: the scrape's own cost."""
    scrapes: list[Scrape] = []
    start = time.monotonic()
    for _ in range(count):
        at = time.monotonic() - start
        seconds, status, body = scrape(admin)
        scrapes.append(Scrape(at, seconds, status, len(body), series_count(body)))
    return summarize(scrapes)
