"""Demo traffic: a steady mix of v2 inference, v1 predictions and streamed chat completions."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class TrafficStats:
    sent: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    failures: int = 0  # no answer: a connection error, a timeout, or still unfinished when the grace ran out


async def generate(
    base_url: str,
    rate: float,
    duration: float | None,
    stats: TrafficStats,
    seed: int = 7,
    *,
    stop: asyncio.Event | None = None,
    grace: float = 5.0,
) -> None:
    """Send about ``rate`` requests a second until ``duration`` passes or ``stop`` is set (or forever).

    Then no new request starts; the ones in flight (streams included) get ``grace`` seconds to finish
    before they are cancelled and counted as failures. Only then is the client session closed, so a
    normal stop cuts no response halfway.
    """
    rng = random.Random(seed)
    stop = stop or asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=30)
    deadline = None if duration is None else time.monotonic() + duration
    async with aiohttp.ClientSession(base_url, timeout=timeout) as session:
        pending: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            task = asyncio.create_task(_one(session, rng, stats))
            pending.add(task)
            task.add_done_callback(pending.discard)
            pause = rng.expovariate(rate)
            if deadline is not None:
                pause = min(pause, deadline - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await stop.wait()
        if pending:
            _, unfinished = await asyncio.wait(pending, timeout=grace)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            stats.failures += len(unfinished)


async def _one(session: aiohttp.ClientSession, rng: random.Random, stats: TrafficStats) -> None:
    pick = rng.random()
    stats.sent += 1
    try:
        if pick < 0.5:
            data = [round(rng.gauss(0.5, 0.2), 3) for _ in range(8)]
            version = "2" if rng.random() < 0.2 else "1"
            url = f"/v2/models/iris/versions/{version}/infer"
            payload = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": data}]}
            async with session.post(url, json=payload) as resp:
                await resp.read()
                status = resp.status
        elif pick < 0.8:
            payload2 = {"instances": [[rng.random() for _ in range(4)]]}
            async with session.post("/v1/models/churn:predict", json=payload2) as resp:
                await resp.read()
                status = resp.status
        else:
            payload3 = {"model": "chat", "stream": True, "max_tokens": rng.randint(4, 24),
                        "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
            async with session.post("/v1/chat/completions", json=payload3) as resp:
                async for _ in resp.content:
                    pass
                status = resp.status
    except (aiohttp.ClientError, TimeoutError):
        stats.failures += 1
        return
    stats.by_status[status] = stats.by_status.get(status, 0) + 1
