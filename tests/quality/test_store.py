"""The feedback store: bounded by count and age, late and duplicate labels told from unknown ones."""

from __future__ import annotations

import threading

from proxy.quality.predictions import Instance
from proxy.quality.store import FeedbackStore, Wanted

LABELS = ("m", "v", "stable")
ONE: list[Instance | None] = [Instance(1, None, None)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(max_entries: int = 10, ttl: float = 60.0, remember: int = 100) -> tuple[FeedbackStore, Clock]:
    clock = Clock()
    return FeedbackStore(max_entries, ttl, remember, ("d", "d", "stable"), clock), clock


def want(rid: str, instance: int = 0, task: str = "classification", supplied: Instance | None = None) -> Wanted:
    return Wanted(rid, instance, task, supplied)


def test_full_evicts_the_oldest_and_a_label_for_it_is_late() -> None:
    s, clock = store(max_entries=3)
    for i in range(5):
        s.put(f"r{i}", clock.now, LABELS, ONE)
    assert len(s) == 3 and s.evicted["full"] == 2
    outcomes = [f.outcome for f in s.join([want("r0"), want("r1"), want("r4"), want("nope")])]
    assert outcomes == ["late", "late", "joined", "unknown"]


def test_ttl_evicts_old_predictions() -> None:
    s, clock = store(ttl=60.0)
    s.put("old", clock.now, LABELS, ONE)
    clock.now += 30
    s.put("new", clock.now, LABELS, ONE)
    clock.now += 40  # old is 70 s old, new 40 s
    s.expire()
    assert len(s) == 1 and s.evicted["ttl"] == 1
    assert [f.outcome for f in s.join([want("old"), want("new")])] == ["late", "joined"]


def test_first_label_wins_per_instance_and_a_fully_labelled_request_leaves() -> None:
    s, clock = store()
    s.put("batch", clock.now, LABELS, [Instance(0, None, None), Instance(1, None, None)])
    found = s.join([want("batch", 1), want("batch", 1), want("batch", 5)])
    assert [f.outcome for f in found] == ["joined", "duplicate", "no_prediction"]
    assert found[0].instance == Instance(1, None, None) and found[0].labels == LABELS
    assert len(s) == 1
    assert s.join([want("batch", 0)])[0].outcome == "joined"
    assert len(s) == 0  # every instance labelled: it left, and is remembered
    assert [f.outcome for f in s.join([want("batch", 0), want("batch", 1)])] == ["duplicate", "duplicate"]


def test_a_prediction_that_does_not_fit_the_label_is_no_prediction() -> None:
    s, clock = store()
    s.put("r", clock.now, LABELS, [Instance("cat", None, None)])
    assert s.join([want("r", task="regression")])[0].outcome == "no_prediction"
    assert s.join([want("r")])[0].outcome == "joined"


def test_a_caller_prediction_counts_for_an_unknown_or_late_id_once() -> None:
    s, clock = store(max_entries=1)
    s.put("gone", clock.now, LABELS, ONE)
    s.put("here", clock.now, LABELS, ONE)
    mine = Instance(2, None, None)
    found = s.join([want("gone", supplied=mine), want("never", supplied=mine), want("never", supplied=mine)])
    assert [f.outcome for f in found] == ["supplied", "supplied", "duplicate"]
    assert found[0].labels == ("d", "d", "stable")  # the configured labels when the caller names none


def test_a_reused_id_replaces_its_prediction() -> None:
    s, clock = store()
    s.put("r", clock.now, LABELS, ONE)
    s.put("r", clock.now, LABELS, [Instance(9, None, None)])
    assert s.evicted["replaced"] == 1 and len(s) == 1
    assert s.join([want("r")])[0].instance == Instance(9, None, None)


def test_remembering_is_bounded() -> None:
    s, clock = store(max_entries=1, remember=2)
    for i in range(5):
        s.put(f"r{i}", clock.now, LABELS, ONE)
    assert [f.outcome for f in s.join([want("r0"), want("r2"), want("r3")])] == ["unknown", "late", "late"]


def test_inserts_and_joins_from_two_threads() -> None:
    s, clock = store(max_entries=100_000)

    def insert() -> None:
        for i in range(5000):
            s.put(f"r{i}", clock.now, LABELS, ONE)

    t = threading.Thread(target=insert)
    t.start()
    joined = 0
    while t.is_alive():
        joined += sum(f.outcome == "joined" for f in s.join([want(f"r{i}") for i in range(0, 5000, 7)]))
    t.join()
    joined += sum(f.outcome == "joined" for f in s.join([want(f"r{i}") for i in range(5000)]))
    assert joined == 5000 and s.outcomes["joined"] == 5000  # each id exactly once
