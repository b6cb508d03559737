"""Shared pieces of the agent tests: the stub NVML library and a real ``infermon agent`` subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

REPO = Path(__file__).resolve().parents[2]
STUB_SOURCE = Path(__file__).with_name("stub_nvml.c")
TIMEOUT = aiohttp.ClientTimeout(total=5)
_LISTENING = re.compile(r"listening on (http://\S+)")
#: ``infermon`` as the console script runs it: proxy.cli.main through ``python -m proxy``.
INFERMON = (sys.executable, "-m", "proxy")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page, keyed by (sample name, label set)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def find(samples: Samples, name: str, **labels: str) -> list[float]:
    """Values of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return [value for (n, ls), value in samples.items() if n == name and wanted <= ls]


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


def scrape(collector: Collector) -> Samples:
    """What a scrape of a registry holding only ``collector`` shows right now."""
    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


@pytest.fixture(scope="session")
def stub_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding libnvidia-ml.so.1 compiled from stub_nvml.c (pynvml dlopens that name)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the stub NVML library")
    out = tmp_path_factory.mktemp("stub-nvml")
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(out / "libnvidia-ml.so.1"), str(STUB_SOURCE)],
        check=True,
        timeout=60,
    )
    return out


@pytest.fixture(autouse=True)
def _restore_procfs() -> Iterator[None]:
    saved = psutil.PROCFS_PATH
    yield
    psutil.PROCFS_PATH = saved


@dataclass
class AgentProcess:
    proc: asyncio.subprocess.Process
    url: str
    log: list[str] = field(default_factory=list)

    async def get(self, path: str, accept: str | None = None) -> tuple[int, str, str]:
        headers = {"Accept": accept} if accept else {}
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
            session.get(self.url + path, headers=headers) as resp,
        ):
            return resp.status, resp.headers.get("Content-Type", ""), await resp.text()

    async def metrics(self) -> Samples:
        status, _, body = await self.get("/metrics")
        assert status == 200
        return parse(body)

    async def metrics_until(self, check: Callable[[Samples], bool], within: float = 10.0) -> Samples:
        """Scrape until ``check`` holds (a collection runs on its own interval), at most ``within`` s."""
        async with asyncio.timeout(within):
            while True:
                samples = await self.metrics()
                if check(samples):
                    return samples
                await asyncio.sleep(0.05)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send ``signum``, wait for the exit and return the status; the rest of stderr lands in ``log``."""
        self.proc.send_signal(signum)
        assert self.proc.stderr is not None
        rest = await asyncio.wait_for(self.proc.stderr.read(), timeout=15)
        self.log.extend(rest.decode().splitlines())
        return await asyncio.wait_for(self.proc.wait(), timeout=15)


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERMON_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


StartAgent = Callable[..., Awaitable[AgentProcess]]


@pytest.fixture
async def start_agent() -> AsyncIterator[StartAgent]:
    """Start ``infermon agent --listen 127.0.0.1:0 ARGS`` and wait for its listening line."""
    started: list[AgentProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> AgentProcess:
        proc = await asyncio.create_subprocess_exec(
            *INFERMON, "agent", "--listen", "127.0.0.1:0", *args,
            env=env or agent_env(), cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        agent = AgentProcess(proc, "")
        started.append(agent)
        assert proc.stderr is not None
        while not agent.url:
            line = await asyncio.wait_for(proc.stderr.readline(), timeout=20)
            if not line:
                raise AssertionError("agent exited before listening:\n" + "\n".join(agent.log))
            agent.log.append(line.decode().rstrip("\n"))
            match = _LISTENING.search(agent.log[-1])
            if match:
                agent.url = match.group(1)
        return agent

    yield start
    for agent in started:
        if agent.proc.returncode is None:
            agent.proc.kill()
            await asyncio.wait_for(agent.proc.wait(), timeout=15)
