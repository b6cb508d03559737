"""XID errors: a thread blocked in ``nvmlEventSetWait`` counts critical-error events per GPU and XID.

Started after a successful nvmlInit with the session's GPUs and stopped before nvmlShutdown. The wait
uses a short timeout so :meth:`XidWatcher.stop` returns within about ``wait_ms``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pynvml

from proxy.agent.nvml import UNSUPPORTED, Device, text

log = logging.getLogger("infermon.agent.events")

#: Called with (GPU uuid, xid) for every XID event.
Record = Callable[[str, int], None]


class XidWatcher:
    def __init__(self, nvml: Any, gpus: Sequence[Device], record: Record, wait_ms: int = 500) -> None:
        self._nvml = nvml
        self._gpus = list(gpus)
        self._record = record
        self._wait_ms = wait_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="infermon-xid", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            event_set = self._nvml.nvmlEventSetCreate()
        except pynvml.NVMLError as exc:
            log.warning("XID events unavailable: nvmlEventSetCreate failed: %s", exc)
            return
        try:
            if self._register(event_set):
                self._loop(event_set)
        finally:
            try:
                self._nvml.nvmlEventSetFree(event_set)
            except pynvml.NVMLError as exc:
                log.debug("nvmlEventSetFree failed: %s", exc)

    def _register(self, event_set: Any) -> bool:
        registered = False
        for gpu in self._gpus:
            try:
                self._nvml.nvmlDeviceRegisterEvents(gpu.handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
                registered = True
            except UNSUPPORTED:
                log.info("GPU %s (%s): XID events not supported, xid_errors_total left out", gpu.index, gpu.uuid)
            except pynvml.NVMLError as exc:
                log.warning("GPU %s (%s): cannot register for XID events: %s", gpu.index, gpu.uuid, exc)
        return registered

    def _loop(self, event_set: Any) -> None:
        while not self._stop.is_set():
            try:
                data = self._nvml.nvmlEventSetWait(event_set, self._wait_ms)
            except pynvml.NVMLError_Timeout:
                continue
            except pynvml.NVMLError as exc:
                log.warning("XID event wait failed, watcher stops until NVML is reinitialised: %s", exc)
                return
            if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                self._record(self._uuid_of(data.device), int(data.eventData))

    def _uuid_of(self, handle: Any) -> str:
        try:
            return text(self._nvml.nvmlDeviceGetUUID(handle))
        except pynvml.NVMLError:
            return "unknown"
