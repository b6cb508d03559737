"""A simulated NVML with pynvml's function names, signatures and exceptions, for tests and bench/.

Handles are the :class:`FakeGpu` / :class:`FakeMig` objects themselves. Per GPU, ``unsupported`` and
``missing`` name pynvml functions that raise ``NVMLError_NotSupported`` / ``NVMLError_FunctionNotFound``,
``failing`` maps a function name to any other NVML error code, and ``lost = True`` makes every call
raise ``NVMLError_GpuIsLost``::

    gpu = FakeGpu(uuid="GPU-0", unsupported={"nvmlDeviceGetTotalEccErrors"})
    nvml = FakeNvml([gpu])
    GpuCollector(NvmlSettings(), "node-1", nvml=nvml)
    nvml.push_xid(gpu, 79); nvml.wait_processed(1, timeout=5)   # the watcher counted it
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import pynvml


@dataclass
class FakeProcess:
    pid: int
    usedGpuMemory: int | None  # pynvml's attribute name


@dataclass
class FakeMig:
    uuid: str
    gpu_instance_id: int
    profile: str = "1g.10gb"
    memory_total: int = 10 << 30
    memory_used: int = 1 << 30
    processes: list[FakeProcess] = field(default_factory=list)
    parent: FakeGpu | None = None


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    utilization: int = 50
    memory_utilization: int = 20
    memory_total: int = 80 << 30
    memory_used: int = 10 << 30
    power_mw: int = 250_000
    energy_mj: int = 1_000_000
    temperature: int = 60
    sm_mhz: int = 1410
    memory_mhz: int = 1593
    clock_reasons: int = 0
    pcie_tx_kib: int = 100
    pcie_rx_kib: int = 200
    pcie_replays: int = 0
    remapped_rows: tuple[int, int, bool, bool] = (0, 0, False, False)
    ecc_errors: int = 0
    processes: list[FakeProcess] = field(default_factory=list)
    migs: list[FakeMig] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    failing: dict[str, int] = field(default_factory=dict)  # function name -> NVML_ERROR_* code
    lost: bool = False

    def __post_init__(self) -> None:
        for mig in self.migs:
            mig.parent = self


@dataclass
class FakeUtilization:
    gpu: int
    memory: int


@dataclass
class FakeMemory:
    total: int
    free: int
    used: int


@dataclass
class FakeEvent:
    device: Any
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


class FakeNvml:
    def __init__(self, gpus: list[FakeGpu], *, init_errors: list[BaseException] | None = None) -> None:
        self.gpus = gpus
        self.init_errors = list(init_errors or [])  # raised by successive nvmlInit calls, then success
        self.initialized = False
        self.init_calls = 0
        self.shutdown_calls = 0
        self._events: queue.Queue[FakeEvent] = queue.Queue()
        self._cond = threading.Condition()
        self._handed_out = 0
        self._processed = 0

    # test helpers
    def push_xid(self, gpu: FakeGpu, xid: int) -> None:
        self._events.put(FakeEvent(gpu, pynvml.nvmlEventTypeXidCriticalError, xid))

    def wait_processed(self, count: int, timeout: float) -> bool:
        """Block until the watcher came back for more after ``count`` events in total."""
        with self._cond:
            return self._cond.wait_for(lambda: self._processed >= count, timeout)

    def _check(self, handle: Any, name: str) -> FakeGpu:
        gpu = handle.parent if isinstance(handle, FakeMig) else handle
        assert isinstance(gpu, FakeGpu)
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in gpu.missing:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if name in gpu.failing:
            raise pynvml.NVMLError(gpu.failing[name])
        if name in gpu.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    # library
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_errors:
            raise self.init_errors.pop(0)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    # devices
    def nvmlDeviceGetCount(self) -> int:
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self._check(self.gpus[index], "nvmlDeviceGetHandleByIndex")

    def nvmlDeviceGetName(self, handle: Any) -> str:
        gpu = self._check(handle, "nvmlDeviceGetName")
        return f"{gpu.name} MIG {handle.profile}" if isinstance(handle, FakeMig) else gpu.name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        self._check(handle, "nvmlDeviceGetUUID")
        return str(handle.uuid)

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        gpu = self._check(handle, "nvmlDeviceGetMigMode")
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if gpu.migs else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        self._check(handle, "nvmlDeviceGetMaxMigDeviceCount")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> FakeMig:
        gpu = self._check(handle, "nvmlDeviceGetMigDeviceHandleByIndex")
        if index >= len(gpu.migs):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return gpu.migs[index]

    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int:
        self._check(handle, "nvmlDeviceGetGpuInstanceId")
        return int(handle.gpu_instance_id)

    # fields
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> FakeUtilization:
        if isinstance(handle, FakeMig):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        gpu = self._check(handle, "nvmlDeviceGetUtilizationRates")
        return FakeUtilization(gpu.utilization, gpu.memory_utilization)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> FakeMemory:
        self._check(handle, "nvmlDeviceGetMemoryInfo")
        total, used = int(handle.memory_total), int(handle.memory_used)
        return FakeMemory(total, total - used, used)

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._check(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return self._check(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        return self._check(handle, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int:
        gpu = self._check(handle, "nvmlDeviceGetClockInfo")
        return gpu.sm_mhz if clock_type == pynvml.NVML_CLOCK_SM else gpu.memory_mhz

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._check(handle, "nvmlDeviceGetCurrentClocksEventReasons").clock_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self._check(handle, "nvmlDeviceGetCurrentClocksThrottleReasons").clock_reasons

    def nvmlDeviceGetPcieThroughput(self, handle: Any, counter: int) -> int:
        gpu = self._check(handle, "nvmlDeviceGetPcieThroughput")
        return gpu.pcie_tx_kib if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else gpu.pcie_rx_kib

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        return self._check(handle, "nvmlDeviceGetPcieReplayCounter").pcie_replays

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, bool, bool]:
        return self._check(handle, "nvmlDeviceGetRemappedRows").remapped_rows

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int:
        return self._check(handle, "nvmlDeviceGetTotalEccErrors").ecc_errors

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[FakeProcess]:
        self._check(handle, "nvmlDeviceGetComputeRunningProcesses")
        return list(handle.processes)

    # events
    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlEventSetFree(self, event_set: object) -> None:
        return None

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: object) -> None:
        self._check(handle, "nvmlDeviceRegisterEvents")

    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> FakeEvent:
        with self._cond:
            self._processed = self._handed_out  # the caller is back: what it got before is counted
            self._cond.notify_all()
        try:
            event = self._events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None
        with self._cond:
            self._handed_out += 1
        return event
