"""Demo traffic: a steady mix of v2 inference, v1 predictions and streamed chat completions."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class TrafficStats:
    sent: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    failures: int = 0


async def generate(base_url: str, rate: float, duration: float | None, stats: TrafficStats, seed: int = 7) -> None:
    """Send about ``rate`` requests a second until ``duration`` passes (or forever)."""
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=30)
    deadline = None if duration is None else time.monotonic() + duration
    async with aiohttp.ClientSession(base_url, timeout=timeout) as session:
        pending: set[asyncio.Task[None]] = set()
        while deadline is None or time.monotonic() < deadline:
            task = asyncio.create_task(_one(session, rng, stats))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(rng.expovariate(rate))
        if pending:
            await asyncio.wait(pending, timeout=30)


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
