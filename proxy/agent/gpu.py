"""The GPU collector: NVML session with backoff, one snapshot per interval, scrapes read the snapshot.

:meth:`GpuCollector.collect_once` runs on the agent's collection thread; :meth:`GpuCollector.collect`
is the prometheus_client ``Collector`` hook and only returns the families of the last finished
collection. Without a library or driver, or after a GPU is lost, the snapshot holds
``infermon_gpu_collector_up{reason="..."} 0`` and ``infermon_gpu_devices 0`` and nvmlInit is retried
after ``backoff_initial`` seconds, doubling up to ``backoff_max``::

    collector = GpuCollector(NvmlSettings(), hostname="node-1")             # real pynvml
    collector = GpuCollector(NvmlSettings(), hostname="n", nvml=FakeNvml())  # tests and the bench
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pynvml
from prometheus_client.core import Metric

from proxy.agent import metrics as m
from proxy.agent import nvml as nv
from proxy.agent.config import NvmlSettings
from proxy.agent.events import XidWatcher
from proxy.agent.podmap import PodMapper
from proxy.agent.podresources import Allocation, PodResources

log = logging.getLogger("infermon.agent.gpu")


class _Session:
    """What one successful nvmlInit knows: the devices and the versions."""

    def __init__(self, nvml: Any) -> None:
        self.gpus = nv.gpus(nvml)
        self.driver, self.cuda = nv.versions(nvml)
        self.watcher: XidWatcher | None = None


class GpuCollector:
    def __init__(
        self,
        settings: NvmlSettings,
        hostname: str,
        *,
        nvml: Any = pynvml,
        pods: PodMapper | None = None,
        pod_resources: PodResources | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._hostname = hostname
        self._nvml = nvml
        self._pods = pods or PodMapper()
        self._pod_resources = pod_resources
        self._clock = clock
        self._session: _Session | None = None
        self._reason = "not_started"
        self._retry_at = 0.0
        self._backoff = settings.backoff_initial
        self._init_failures: dict[str, int] = defaultdict(int)
        self._xid_lock = threading.Lock()
        self._xids: dict[tuple[str, int], int] = defaultdict(int)
        self._known: dict[str, tuple[str, ...]] = {}  # uuid -> labels, kept across sessions for XID series
        self._skip: set[tuple[str, str]] = set()  # (uuid, field) found unsupported
        self._warned: set[tuple[str, str, str]] = set()
        self._families: tuple[Metric, ...] = ()

    # prometheus_client Collector
    def describe(self) -> Iterator[Metric]:
        return m.describe(m.GPU_SPECS)

    def collect(self) -> Iterable[Metric]:
        return self._families

    # collection thread
    def collect_once(self) -> None:
        start = time.perf_counter()
        batch = m.Batch()
        if self._session is None and self._clock() >= self._retry_at:
            self._init()
        session = self._session
        if session is not None:
            try:
                self._read(session, batch)
            except nv.FATAL as exc:
                log.warning("NVML failed mid-run (%s): shutting down the session, retrying init", exc)
                self._drop(nv.reason(exc))
                batch = m.Batch()
        up = self._session is not None
        batch.add(m.GPU_UP, ("" if up else self._reason,), 1.0 if up else 0.0)
        batch.add(m.GPU_DEVICES, (), float(len(self._session.gpus)) if self._session else 0.0)
        for why, count in sorted(self._init_failures.items()):
            batch.add(m.GPU_INIT_FAILURES, (why,), float(count))
        self._add_xids(batch)
        batch.add(m.GPU_DURATION, (), time.perf_counter() - start)
        batch.add(m.GPU_LAST, (), time.time())
        self._families = batch.families()

    def close(self) -> None:
        if self._session is not None:
            self._drop("stopped")
        if self._pod_resources is not None:
            self._pod_resources.close()

    def record_xid(self, uuid: str, xid: int) -> None:
        with self._xid_lock:
            self._xids[(uuid, xid)] += 1

    def _init(self) -> None:
        try:
            self._nvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self._fail(nv.reason(exc), exc)
            return
        try:
            session = _Session(self._nvml)
        except pynvml.NVMLError as exc:
            self._shutdown()
            self._fail(nv.reason(exc), exc)
            return
        log.info("NVML ready: %d GPU(s), driver %s, CUDA %s", len(session.gpus), session.driver, session.cuda)
        self._session = session
        self._backoff = self._settings.backoff_initial
        self._known.update((gpu.uuid, gpu.labels(self._hostname)) for gpu in session.gpus)
        if self._settings.xid_events and session.gpus:
            session.watcher = XidWatcher(self._nvml, session.gpus, self.record_xid)
            session.watcher.start()

    def _fail(self, why: str, exc: BaseException) -> None:
        self._init_failures[why] += 1
        log.log(
            logging.INFO if self._reason == why else logging.WARNING,
            "NVML unavailable (%s: %s), next try in %.0f s",
            why,
            exc,
            self._backoff,
        )
        self._reason = why
        self._retry_at = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, self._settings.backoff_max)

    def _drop(self, why: str) -> None:
        session, self._session = self._session, None
        if session is not None and session.watcher is not None:
            session.watcher.stop()
        self._shutdown()
        self._reason = why
        self._retry_at = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, self._settings.backoff_max)

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", exc)

    def _read(self, session: _Session, batch: m.Batch) -> None:
        allocations = self._allocations(batch)
        for gpu in session.gpus:
            labels = gpu.labels(self._hostname)
            batch.add(m.GPU_INFO, (*labels, session.driver, session.cuda), 1.0)
            self._fields(gpu, nv.GPU_READERS, labels, batch)
            for held in allocations.get(gpu.uuid, []) + allocations.get(str(gpu.index), []):
                batch.add(m.GPU_ALLOCATION, (*labels, held.namespace, held.pod, held.container, held.resource), 1)
            try:
                migs = nv.mig_devices(self._nvml, gpu)
            except nv.FATAL:
                raise
            except pynvml.NVMLError as exc:
                self._warn_once(gpu, "mig_devices", exc)
                migs = []
            for mig in migs:
                mig_labels = mig.labels(self._hostname)
                batch.add(m.GPU_INFO, (*mig_labels, session.driver, session.cuda), 1.0)
                self._fields(mig, nv.MIG_READERS, mig_labels, batch)
                for held in allocations.get(mig.uuid, []):
                    row = (*mig_labels, held.namespace, held.pod, held.container, held.resource)
                    batch.add(m.GPU_ALLOCATION, row, 1)
            if self._settings.processes:
                for device in migs or [gpu]:
                    self._processes(device, device.labels(self._hostname), batch)

    def _allocations(self, batch: m.Batch) -> dict[str, list[Allocation]]:
        if self._pod_resources is None or not self._pod_resources.available:
            return {}
        found = self._pod_resources.allocations()
        batch.add(m.GPU_POD_RESOURCES_UP, (), 0.0 if found is None else 1.0)
        return found or {}

    def _fields(
        self, device: nv.Device, readers: dict[str, nv.Reader], labels: tuple[str, ...], batch: m.Batch
    ) -> None:
        for field, reader in readers.items():
            if (device.uuid, field) in self._skip:
                continue
            try:
                values = reader(self._nvml, device.handle)
            except nv.UNSUPPORTED as exc:
                self._unsupported(device, field, exc)
                continue
            except nv.FATAL:
                raise
            except pynvml.NVMLError as exc:
                self._warn_once(device, field, exc)
                continue
            for spec, extra, value in values:
                batch.add(spec, (*labels, *extra), value)

    def _processes(self, device: nv.Device, labels: tuple[str, ...], batch: m.Batch) -> None:
        field = "processes"
        if (device.uuid, field) in self._skip:
            return
        try:
            procs = nv.processes(self._nvml, device.handle)
        except nv.UNSUPPORTED as exc:
            self._unsupported(device, field, exc)
            return
        except nv.FATAL:
            raise
        except pynvml.NVMLError as exc:
            self._warn_once(device, field, exc)
            return
        batch.add(m.GPU_PROCESSES, labels, float(len(procs)))
        per_pod: dict[tuple[str, str], float] = defaultdict(float)
        for proc in procs:
            used = getattr(proc, "usedGpuMemory", None)
            if used is None:
                continue
            ref = self._pods.lookup(int(proc.pid))
            key = (ref.pod_uid, ref.container_id) if ref else ("", "")
            per_pod[key] += float(used)
        for (pod_uid, container_id), used_bytes in sorted(per_pod.items()):
            batch.add(m.GPU_POD_MEMORY, (*labels, pod_uid, container_id), used_bytes)

    def _add_xids(self, batch: m.Batch) -> None:
        with self._xid_lock:
            counts = sorted(self._xids.items())
        if not counts:
            return
        for (uuid, xid), count in counts:
            labels = self._known.get(uuid, ("", uuid, "", self._hostname, "", ""))
            batch.add(m.GPU_XID, (*labels, str(xid)), float(count))

    def _unsupported(self, device: nv.Device, field: str, exc: BaseException) -> None:
        self._skip.add((device.uuid, field))
        log.info(
            "GPU %s (%s): %s not available (%s), left out",
            device.index,
            device.uuid,
            field,
            type(exc).__name__,
        )

    def _warn_once(self, device: nv.Device, field: str, exc: BaseException) -> None:
        key = (device.uuid, field, type(exc).__name__)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("GPU %s (%s): reading %s failed: %s (left out)", device.index, device.uuid, field, exc)
