"""bench.scrape: inference paths, exposition size, the scraper thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench import scrape

EXPOSITION = b"# HELP a A.\n# TYPE a counter\na_total 1.0\n\nb_bucket{le=\"1\"} 2\n"


def test_label_values_cover_the_paths() -> None:
    assert scrape.label_values(0) == (0, 0)
    assert scrape.label_values(1) == (1, 1)
    assert scrape.label_values(10) == (4, 3)
    for n in (1, 7, 400, 1000):
        paths = scrape.infer_paths(n)
        assert len(set(paths)) == n
        models, versions = scrape.label_values(n)
        assert models * versions >= n
    assert scrape.infer_paths(2) == ["/v2/models/m0/versions/v0/infer", "/v2/models/m1/versions/v0/infer"]


def test_series_count_counts_samples_only() -> None:
    assert scrape.series_count(EXPOSITION) == 2


def test_run_seconds_leaves_room_for_a_scrape_to_end() -> None:
    seconds, last = scrape.run_seconds(10, 1.0, 0.01)
    assert seconds == 10
    assert last == pytest.approx(10 - 0.015 - 0.5)
    seconds, last = scrape.run_seconds(2, 1.0, 2.0)  # a 2 s scrape needs a longer run
    assert seconds >= 0.5 + 3.0 + 1.0
    assert last >= 0.5


class _Metrics(BaseHTTPRequestHandler):
    served: threading.Semaphore

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(EXPOSITION)))
        self.end_headers()
        self.wfile.write(EXPOSITION)
        type(self).served.release()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[tuple[int, threading.Semaphore]]:
    _Metrics.served = threading.Semaphore(0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], _Metrics.served
    finally:
        server.shutdown()
        server.server_close()


def test_scraper_scrapes_every_interval(admin: tuple[int, threading.Semaphore]) -> None:
    port, served = admin
    with scrape.Scraper(port, interval=0.02) as scraper:
        for _ in range(3):
            assert served.acquire(timeout=10.0)
    summary = scrape.summarize(scraper.scrapes)
    assert summary.count >= 3
    assert summary.failed == 0
    assert summary.series == 2
    assert summary.max_ms >= summary.median_ms > 0


def test_scraper_starts_none_after_last_start(admin: tuple[int, threading.Semaphore]) -> None:
    port, served = admin
    with scrape.Scraper(port, interval=0.02, last_start=0.0) as scraper:
        assert served.acquire(timeout=10.0)  # the first one always goes
        scraper._thread.join(timeout=10.0)  # then the thread ends by itself
    assert len(scraper.scrapes) == 1


def test_idle_scrapes(admin: tuple[int, threading.Semaphore]) -> None:
    port, _ = admin
    summary = scrape.idle_scrapes(port, count=2)
    assert summary.count == 2
    assert summary.kib == pytest.approx(len(EXPOSITION) / 1024)
