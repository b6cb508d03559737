"""The node agent's GPU figures, fetched by the proxy for the status page: ``GET /gpu``.

A browser behind ``kubectl port-forward`` reaches only the admin port, so the proxy reads the agent's
``/metrics`` (``status.agent``) itself: one fetch at a time, at most one per ``min_age`` seconds
(requests in between get the last result), bounded by ``status.agent_timeout`` and by
:data:`MAX_BYTES`. The text is parsed with prometheus_client's parser in a worker thread. An agent
that cannot be reached, answers an error or too much is reported as ``{"up": false, "error": ...}``
with status 200 (the page shows it), and logged once when it goes down and once when it is back.

Example::

    gpu = GpuSource("http://10.0.0.5:9465", timeout=2.0)
    report = await gpu.report()   # {"enabled": true, "up": true, "gpus": [...], ...}
    await gpu.aclose()
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import mask_url

log = logging.getLogger("infermon.admin.gpu")

#: the largest /metrics page read from the agent (a node with 8 GPUs and MIG writes about 100 KiB)
MAX_BYTES = 4 << 20

#: per GPU (or MIG device): JSON key -> the agent's gauge
GAUGES = {
    "utilization": "infermon_gpu_utilization_ratio",
    "memory_copy_utilization": "infermon_gpu_memory_copy_utilization_ratio",
    "memory_used_bytes": "infermon_gpu_memory_used_bytes",
    "memory_total_bytes": "infermon_gpu_memory_total_bytes",
    "power_watts": "infermon_gpu_power_watts",
    "temperature_celsius": "infermon_gpu_temperature_celsius",
    "sm_clock_hz": "infermon_gpu_sm_clock_hz",
    "processes": "infermon_gpu_processes",
}
_BY_NAME = {name: key for key, name in GAUGES.items()}
_DEVICE_LABELS = ("gpu", "uuid", "model_name", "mig_profile", "gpu_instance_id")


def metrics_url(agent: str) -> str:
    """The agent's /metrics URL: ``status.agent`` as written when it has a path, else with /metrics."""
    parts = urlsplit(agent)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urlunsplit(parts)


def parse_gpus(text: str) -> dict[str, Any]:
    """The GPU figures of an agent's /metrics text (Prometheus text format). Raises ValueError when the
    text does not parse."""
    devices: dict[tuple[str, str], dict[str, Any]] = {}
    collector_up: bool | None = None
    reason = ""
    count: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "infermon_gpu_collector_up":
                collector_up = sample.value == 1
                reason = labels.get("reason", "")
                continue
            if name == "infermon_gpu_devices":
                count = sample.value
                continue
            key = _BY_NAME.get(name)
            if key is None and name != "infermon_gpu_info":
                continue
            uuid = labels.get("uuid", "")
            if not uuid:
                continue
            device = devices.setdefault(
                (labels.get("gpu", ""), uuid), {k: labels.get(k, "") for k in _DEVICE_LABELS}
            )
            if key is not None:
                device[key] = sample.value
            else:
                device["driver_version"] = labels.get("driver_version", "")
    gpus = sorted(devices.values(), key=lambda d: (_index(d["gpu"]), d["mig_profile"] != "", d["uuid"]))
    return {"collector_up": collector_up, "collector_reason": reason, "devices": count, "gpus": gpus}


def _index(gpu: str) -> int:
    return int(gpu) if gpu.isdigit() else 1 << 30


class GpuSource:
    """Fetches and parses the agent's /metrics on demand (see the module docstring)."""

    def __init__(self, agent: str | None, timeout: float = 2.0, min_age: float = 1.0) -> None:
        self.agent = agent
        self.url = metrics_url(agent) if agent else None
        self.timeout = timeout
        self.min_age = min_age
        self._session: aiohttp.ClientSession | None = None
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0
        self._fetching: asyncio.Task[dict[str, Any]] | None = None
        self._was_up: bool | None = None

    async def report(self) -> dict[str, Any]:
        if self.url is None:
            return {
                "enabled": False,
                "reason": "no agent address: set status.agent to the node agent's URL (docs/status-page.md)",
            }
        if self._last is not None and time.monotonic() - self._last_at < self.min_age:
            return self._last
        task = self._fetching
        if task is None or task.done():  # one fetch at a time; callers meanwhile share it
            task = self._fetching = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(_retrieve)
        # shielded: a page that goes away mid-fetch does not cancel the fetch the others wait for
        return await asyncio.shield(task)

    async def _fetch(self) -> dict[str, Any]:
        assert self.url is not None and self.agent is not None
        base: dict[str, Any] = {"enabled": True, "agent": mask_url(self.agent), "fetched_at": round(time.time(), 3)}
        try:
            text = await self._get(self.url)
            parsed = await asyncio.to_thread(parse_gpus, text)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
            error = _describe(exc)
            result = {**base, "up": False, "error": error, "gpus": []}
            if self._was_up is not False:
                log.warning("status page: the node agent at %s cannot be read: %s", mask_url(self.url), error)
        else:
            result = {**base, "up": True, "error": None, **parsed}
            if self._was_up is False:
                log.info("status page: the node agent at %s answers again", mask_url(self.url))
        self._was_up = result["up"]
        self._last, self._last_at = result, time.monotonic()
        return result

    async def _get(self, url: str) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), auto_decompress=True, trust_env=False
            )
        headers = {"Accept": "text/plain;version=0.0.4", "User-Agent": "infermon-status"}
        async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"the agent answered {resp.status} {resp.reason or ''}".rstrip())
            if resp.content_length is not None and resp.content_length > MAX_BYTES:
                raise ValueError(f"the agent's /metrics is {resp.content_length} bytes, over the {MAX_BYTES} read")
            parts: list[bytes] = []
            size = 0
            async for piece in resp.content.iter_chunked(1 << 16):  # decompressed: a gzip bomb stops too
                size += len(piece)
                if size > MAX_BYTES:
                    raise ValueError(f"the agent's /metrics is over the {MAX_BYTES} bytes read")
                parts.append(piece)
            return b"".join(parts).decode("utf-8")

    async def aclose(self) -> None:
        task, self._fetching = self._fetching, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _retrieve(task: asyncio.Task[dict[str, Any]]) -> None:
    """A fetch nobody awaited any more (its page went away) is not an unretrieved exception."""
    if not task.cancelled() and task.exception() is not None:
        log.error("status page: reading the node agent failed", exc_info=task.exception())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time (status.agent_timeout)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, UnicodeDecodeError):
        return "the agent's /metrics is not UTF-8 text"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ValueError) and not text.startswith("the agent"):
        return f"the agent's /metrics does not parse: {text}"
    return text
