"""Demo traffic: Open Inference v2 requests from the training distribution, labels, streamed chats.

- **Inference** (``1 - chat_share`` of the requests): one flower drawn from the distribution the
  models were trained on (:func:`proxy.demo.model.sample`), sent as one FP32 tensor per feature.
  After ``shift_after`` seconds the features in ``SHIFTED`` move up by ``SHIFT_SD`` of their
  standard deviation: that is the drift the proxy should find, on those features and no other.
- **Labels**: for ``label_share`` of the answered inference requests, the true class is posted to
  ``POST /feedback`` on the admin port a little later (``label_delay`` seconds), keyed by the
  ``x-request-id`` the proxy answered with, in batches.
- **Chat**: the rest are streamed OpenAI-style chat completions, read to ``data: [DONE]``.

At most ``max_in_flight`` requests are in flight; a stop lets them finish (``grace`` seconds), then
posts the labels still waiting, then closes the client sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from proxy.demo import SHIFT_SD, SHIFTED
from proxy.demo.model import FEATURES, FloatArray, overall_std, sample

#: the model the requests name
MODEL = "iris"


@dataclass
class TrafficStats:
    """What the traffic generator sent and saw (client side)."""

    sent: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    failures: int = 0  # no answer: a connection error, a timeout, or still unfinished when the grace ran out
    infer: int = 0
    chats: int = 0
    shifted: int = 0  # inference requests sent with shifted features
    shift_started: float | None = None  # seconds after the start when the shift began
    #: latencies of answered inference requests, seconds (the most recent ones)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=50_000))
    labels_posted: int = 0
    label_outcomes: dict[str, int] = field(default_factory=dict)  # what POST /feedback counted
    label_errors: int = 0  # posts that failed (no answer, not 200)

    @property
    def answered(self) -> int:
        return sum(self.by_status.values())

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.by_status.items() if status >= 500) + self.failures

    def error_rate(self) -> float | None:
        total = self.answered + self.failures
        return self.errors / total if total else None

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        return float(np.percentile(np.fromiter(self.latencies, dtype=np.float64), q)) * 1000.0


def infer_body(row: FloatArray) -> dict[str, Any]:
    """An OIP v2 request for one row of features: one ``[1]`` FP32 tensor per feature, named after it."""
    return {
        "inputs": [
            {"name": name, "shape": [1], "datatype": "FP32", "data": [round(float(v), 3)]}
            for name, v in zip(FEATURES, row, strict=True)
        ]
    }


def shift(x: FloatArray, std: FloatArray, features: tuple[str, ...] = SHIFTED, sd: float = SHIFT_SD) -> FloatArray:
    """``x`` (rows of features) with ``features`` moved up by ``sd`` standard deviations."""
    out = x.copy()
    for name in features:
        i = FEATURES.index(name)
        out[..., i] += sd * std[i]
    return out


class Traffic:
    def __init__(
        self,
        base_url: str,
        rate: float,
        stats: TrafficStats,
        *,
        admin_url: str | None = None,
        duration: float | None = None,
        shift_after: float | None = None,
        seed: int = 7,
        stop: asyncio.Event | None = None,
        grace: float = 5.0,
        chat_share: float = 0.1,
        label_share: float = 0.9,
        label_delay: tuple[float, float] = (0.3, 1.5),
        max_in_flight: int = 32,
    ) -> None:
        self.base_url, self.admin_url, self.rate, self.stats = base_url, admin_url, rate, stats
        self.duration, self.shift_after, self.grace = duration, shift_after, grace
        self.stop = stop or asyncio.Event()
        self.rng = random.Random(seed)
        self.data_rng = np.random.default_rng(seed + 1)  # not the training data's seed: fresh rows
        self.std = overall_std()
        self.chat_share, self.label_share, self.label_delay = chat_share, label_share, label_delay
        self.slots = asyncio.Semaphore(max_in_flight)
        self.labels: list[tuple[float, str, int]] = []  # (when due, request id, true class)
        self.start = 0.0

    async def run(self) -> None:
        """Send until ``duration`` passes or ``stop`` is set, then finish (see the module docstring)."""
        timeout = aiohttp.ClientTimeout(total=30)
        self.start = time.monotonic()
        deadline = None if self.duration is None else self.start + self.duration
        async with (
            aiohttp.ClientSession(self.base_url, timeout=timeout) as session,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as admin,
        ):
            poster = asyncio.create_task(self._post_labels(admin)) if self.admin_url else None
            pending: set[asyncio.Task[None]] = set()
            try:
                while not self.stop.is_set():
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        break
                    await self.slots.acquire()
                    task = asyncio.create_task(self._one(session))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    task.add_done_callback(lambda _: self.slots.release())
                    pause = self.rng.expovariate(self.rate)
                    if deadline is not None:
                        pause = max(0.0, min(pause, deadline - time.monotonic()))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await self.stop.wait()
            finally:
                if pending:
                    _, unfinished = await asyncio.wait(pending, timeout=self.grace)
                    for task in unfinished:
                        task.cancel()
                    await asyncio.gather(*unfinished, return_exceptions=True)
                    self.stats.failures += len(unfinished)
                if poster is not None:
                    poster.cancel()
                    await asyncio.gather(poster, return_exceptions=True)
                    await self._flush_labels(admin, everything=True)

    def shifting(self) -> bool:
        if self.shift_after is None or time.monotonic() - self.start < self.shift_after:
            return False
        if self.stats.shift_started is None:
            self.stats.shift_started = round(time.monotonic() - self.start, 3)
        return True

    async def _one(self, session: aiohttp.ClientSession) -> None:
        stats = self.stats
        stats.sent += 1
        chat = self.rng.random() < self.chat_share
        try:
            if chat:
                stats.chats += 1
                payload = {"model": "chat", "stream": True, "max_tokens": self.rng.randint(4, 24),
                           "stream_options": {"include_usage": True},
                           "messages": [{"role": "user", "content": "Which flower is this?"}]}  # fmt: skip
                async with session.post("/v1/chat/completions", json=payload) as resp:
                    async for _ in resp.content:
                        pass
                    status = resp.status
            else:
                stats.infer += 1
                x, y = sample(self.data_rng, 1)
                if self.shifting():
                    x = shift(x, self.std)
                    stats.shifted += 1
                began = time.perf_counter()
                async with session.post(f"/v2/models/{MODEL}/infer", json=infer_body(x[0])) as resp:
                    await resp.read()
                    status = resp.status
                    request_id = resp.headers.get("x-request-id")
                if status < 500:
                    stats.latencies.append(time.perf_counter() - began)
                if status == 200 and request_id and self.admin_url and self.rng.random() < self.label_share:
                    lo, hi = self.label_delay
                    self.labels.append((time.monotonic() + self.rng.uniform(lo, hi), request_id, int(y[0])))
        except (aiohttp.ClientError, TimeoutError):
            stats.failures += 1
            return
        stats.by_status[status] = stats.by_status.get(status, 0) + 1

    async def _post_labels(self, admin: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(0.25)
            await self._flush_labels(admin)

    async def _flush_labels(self, admin: aiohttp.ClientSession, *, everything: bool = False) -> None:
        now = time.monotonic()
        due = [item for item in self.labels if everything or item[0] <= now]
        if not due or self.admin_url is None:
            return
        self.labels = [item for item in self.labels if not (everything or item[0] <= now)]
        body = [{"request_id": rid, "label": label} for _, rid, label in due]
        try:
            async with admin.post(f"{self.admin_url}/feedback", json=body) as resp:
                answer = await resp.json() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            answer = None
        if not isinstance(answer, dict):
            self.stats.label_errors += 1
            return
        self.stats.labels_posted += len(body)
        for outcome, n in (answer.get("outcomes") or {}).items():
            self.stats.label_outcomes[outcome] = self.stats.label_outcomes.get(outcome, 0) + int(n)


async def generate(
    base_url: str,
    rate: float,
    duration: float | None,
    stats: TrafficStats,
    seed: int = 7,
    *,
    stop: asyncio.Event | None = None,
    grace: float = 5.0,
    admin_url: str | None = None,
    shift_after: float | None = None,
    chat_share: float = 0.1,
) -> None:
    """Send about ``rate`` requests a second until ``duration`` passes or ``stop`` is set (or forever);
    labels go to ``admin_url`` when given, the shift starts after ``shift_after`` seconds when given."""
    traffic = Traffic(
        base_url, rate, stats, admin_url=admin_url, duration=duration, shift_after=shift_after, seed=seed,
        stop=stop, grace=grace, chat_share=chat_share,
    )  # fmt: skip
    await traffic.run()
