from __future__ import annotations

import logging
import threading

import pytest

from proxy.agent.worker import Worker


class Counting:
    def __init__(self) -> None:
        self.calls = 0
        self.done = threading.Event()

    def collect_once(self) -> None:
        self.calls += 1
        if self.calls >= 3:
            self.done.set()


class Broken:
    def collect_once(self) -> None:
        raise RuntimeError("boom")


def test_a_failing_source_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    good = Counting()
    worker = Worker([Broken(), good], interval=10)
    with caplog.at_level(logging.ERROR):
        worker.run_once()
    assert good.calls == 1
    assert worker.rounds == 1
    assert "collection by Broken failed" in caplog.text


def test_thread_runs_on_its_interval_and_stops_promptly() -> None:
    source = Counting()
    worker = Worker([source], interval=0.01)
    worker.start()
    assert source.done.wait(timeout=10)
    assert worker.healthy()
    worker.stop()
    assert not worker.healthy()


def test_stop_interrupts_a_long_wait() -> None:
    source = Counting()
    worker = Worker([source], interval=3600)
    worker.start()
    worker.stop()  # returns without waiting out the hour
    assert source.calls == 1
