"""Host metrics through psutil: CPU seconds by mode, memory, swap, load, disk and network bytes.

``procfs`` points psutil at the host's /proc (``psutil.PROCFS_PATH`` is process-wide; the agent is
the only user in its process). Network counters come from ``<procfs>/net/dev``, which shows the
agent's own network namespace: run the agent with ``hostNetwork: true`` to see the node's interfaces.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

import psutil
from prometheus_client.core import Metric

from proxy.agent import metrics as m
from proxy.agent.config import HostSettings

log = logging.getLogger("infermon.agent.host")

_MEMORY_STATES = ("total", "available", "used", "free", "buffers", "cached", "shared")


class HostCollector:
    def __init__(self, settings: HostSettings, procfs: str = "/proc", *, ps: Any = psutil) -> None:
        self._settings = settings
        self._ps = ps
        self._disk_exclude = re.compile(settings.disk_exclude)
        self._net_exclude = re.compile(settings.network_exclude)
        self._families: tuple[Metric, ...] = ()
        ps.PROCFS_PATH = procfs

    def describe(self) -> Iterator[Metric]:
        return m.describe(m.HOST_SPECS)

    def collect(self) -> Iterable[Metric]:
        return self._families

    def collect_once(self) -> None:
        start = time.perf_counter()
        batch = m.Batch()
        ps = self._ps
        for mode, seconds in ps.cpu_times()._asdict().items():
            batch.add(m.HOST_CPU, (mode,), float(seconds))
        batch.add(m.HOST_CPUS, (), float(ps.cpu_count() or 0))
        memory = ps.virtual_memory()
        for state in _MEMORY_STATES:
            value = getattr(memory, state, None)
            if value is not None:
                batch.add(m.HOST_MEMORY, (state,), float(value))
        swap = ps.swap_memory()
        for state in ("total", "used", "free"):
            batch.add(m.HOST_SWAP, (state,), float(getattr(swap, state)))
        load1, load5, load15 = os.getloadavg()
        batch.add(m.HOST_LOAD1, (), load1)
        batch.add(m.HOST_LOAD5, (), load5)
        batch.add(m.HOST_LOAD15, (), load15)
        for disk, io in sorted((ps.disk_io_counters(perdisk=True, nowrap=True) or {}).items()):
            if not self._disk_exclude.fullmatch(disk):
                batch.add(m.HOST_DISK_READ, (disk,), float(io.read_bytes))
                batch.add(m.HOST_DISK_WRITTEN, (disk,), float(io.write_bytes))
        for nic, net in sorted((ps.net_io_counters(pernic=True, nowrap=True) or {}).items()):
            if not self._net_exclude.fullmatch(nic):
                batch.add(m.HOST_NET_RX, (nic,), float(net.bytes_recv))
                batch.add(m.HOST_NET_TX, (nic,), float(net.bytes_sent))
        batch.add(m.HOST_DURATION, (), time.perf_counter() - start)
        self._families = batch.families()
