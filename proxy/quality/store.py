"""The feedback store: each request's predictions, waiting for labels that come later.

Keyed by the request id the client got in ``x-request-id``. Bounded twice: ``feedback.max_entries``
(the oldest entry goes first, counted ``full``) and ``feedback.ttl`` (older entries go, counted
``ttl``). A second prediction under an id already held (a client that reuses its ids) replaces the
first (counted ``replaced``). The ids of entries that left, and of requests whose every instance got
its label, are remembered (``feedback.remember`` of them, the oldest forgotten first): a label for
one of the first is ``late``, for one of the second ``duplicate``, never ``unknown``.

Thread-safe: the side-path thread inserts (:meth:`FeedbackStore.put`), the admin handler joins
(:meth:`FeedbackStore.join`, in a worker thread for large bodies); one lock, held only for dict work.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

from proxy.quality.predictions import Instance, usable

Labels = tuple[str, str, str]  # model, version, variant
Outcome = Literal["joined", "supplied", "unknown", "duplicate", "late", "no_prediction"]
OUTCOMES: tuple[Outcome, ...] = ("joined", "supplied", "unknown", "duplicate", "late", "no_prediction")
EVICTIONS = ("full", "ttl", "replaced")

#: what the remembered ids left as: evicted (a label is late) or every instance labelled (duplicate)
_GONE = 0
_DONE = 1


class _Entry:
    __slots__ = ("instances", "labelled", "labels", "t")

    def __init__(self, t: float, labels: Labels, instances: list[Instance | None]) -> None:
        self.t = t
        self.labels = labels
        self.instances = instances
        self.labelled: set[int] | None = None  # instances that got their label


class Found(NamedTuple):
    """What a join found for one feedback item."""

    outcome: Outcome
    labels: Labels | None = None
    t_prediction: float = 0.0
    instance: Instance | None = None


class Wanted(NamedTuple):
    """One label to join: the request id, the instance, the task (``classification`` for a label,
    ``regression`` for a value), and a prediction the caller sent (or None)."""

    request_id: str
    instance: int
    task: str
    supplied: Instance | None = None
    labels: Labels | None = None  # the label set of a caller-supplied prediction


class FeedbackStore:
    def __init__(
        self,
        max_entries: int,
        ttl: float,
        remember: int,
        default_labels: Labels,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.remember = remember
        self.default_labels = default_labels
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        #: id -> _GONE | _DONE, for late and duplicate labels; for _DONE also the instances labelled
        self._past: OrderedDict[str, tuple[int, frozenset[int] | None]] = OrderedDict()
        self.evicted: dict[str, int] = dict.fromkeys(EVICTIONS, 0)
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.stored = 0  # predictions (requests) put in

    def __len__(self) -> int:
        return len(self._entries)

    # -- the side path --------------------------------------------------------------------------

    def put(self, request_id: str, t: float, labels: Labels, instances: list[Instance | None]) -> None:
        """Keep one request's predictions (``t``: when it was answered, time.time())."""
        entry = _Entry(t, labels, instances)
        with self._lock:
            entries = self._entries
            if request_id in entries:
                del entries[request_id]
                self.evicted["replaced"] += 1
            else:
                self._past.pop(request_id, None)  # an id used again: its new prediction counts
            entries[request_id] = entry
            self.stored += 1
            self._expire(t)
            while len(entries) > self.max_entries:
                old, _ = entries.popitem(last=False)
                self.evicted["full"] += 1
                self._forget(old, _GONE, None)

    def expire(self) -> None:
        with self._lock:
            self._expire(self.clock())

    def _expire(self, now: float) -> None:
        cutoff = now - self.ttl
        entries = self._entries
        while entries:
            rid, entry = next(iter(entries.items()))
            if entry.t >= cutoff:
                break
            del entries[rid]
            self.evicted["ttl"] += 1
            self._forget(rid, _GONE, None)

    def _forget(self, request_id: str, how: int, labelled: frozenset[int] | None) -> None:
        if self.remember <= 0:
            return
        past = self._past
        past[request_id] = (how, labelled)
        past.move_to_end(request_id)
        while len(past) > self.remember:
            past.popitem(last=False)

    # -- the admin handler ----------------------------------------------------------------------

    def join(self, wanted: Sequence[Wanted]) -> list[Found]:
        """Look each label's prediction up; the first label of a (request id, instance) wins."""
        out: list[Found] = []
        outcomes = self.outcomes
        with self._lock:
            self._expire(self.clock())
            entries = self._entries
            past = self._past
            for w in wanted:
                found = self._one(w, entries, past)
                outcomes[found.outcome] += 1
                out.append(found)
        return out

    def _one(
        self, w: Wanted, entries: OrderedDict[str, _Entry], past: OrderedDict[str, tuple[int, frozenset[int] | None]]
    ) -> Found:
        entry = entries.get(w.request_id)
        if entry is not None:
            if entry.labelled is not None and w.instance in entry.labelled:
                return Found("duplicate")
            if w.instance >= len(entry.instances):
                return Found("no_prediction")
            kept = entry.instances[w.instance]
            if kept is None or not usable(kept, w.task):
                return Found("no_prediction")
            if entry.labelled is None:
                entry.labelled = set()
            entry.labelled.add(w.instance)
            if len(entry.labelled) >= len(entry.instances):  # every instance labelled: it leaves
                del entries[w.request_id]
                self._forget(w.request_id, _DONE, frozenset(entry.labelled))
            return Found("joined", entry.labels, entry.t, kept)
        was = past.get(w.request_id)
        if was is not None:
            how, labelled = was
            if how == _DONE and labelled is not None and w.instance in labelled:
                return Found("duplicate")
            if how == _GONE and w.supplied is None:
                return Found("late")
        if w.supplied is None:
            return Found("unknown")
        # a prediction the caller sent for an id the store does not hold; remembered for duplicates
        done = set(was[1] or ()) if was is not None and was[0] == _DONE else set()
        done.add(w.instance)
        self._forget(w.request_id, _DONE, frozenset(done))
        return Found("supplied", w.labels or self.default_labels, 0.0, w.supplied)

    def unseen(self, request_ids: Sequence[str]) -> bool:
        """Is one of these ids neither held nor remembered (its prediction may be on its way)?"""
        with self._lock:
            entries, past = self._entries, self._past
            return any(rid not in entries and rid not in past for rid in request_ids)

    def recount(self, was: Outcome, now: Outcome) -> None:
        """A join the caller found unusable after all (its own prediction did not fit the label)."""
        with self._lock:
            self.outcomes[was] -= 1
            self.outcomes[now] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "max_entries": self.max_entries,
                "ttl": self.ttl,
                "remembered": len(self._past),
                "stored": self.stored,
                "evicted": dict(self.evicted),
                "feedback": dict(self.outcomes),
            }
