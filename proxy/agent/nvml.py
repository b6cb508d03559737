"""NVML access: device discovery and one reader per field, all through an injectable ``nvml`` object.

``nvml`` is the ``pynvml`` module (nvidia-ml-py) in production; tests pass an object with the same
function names and signatures, raising ``pynvml``'s exception classes, as prometheus_client's
``ProcessCollector`` takes ``proc=``. Readers convert to base units (bytes, watts, hertz, ratios 0-1)::

    values = READERS["power"](pynvml, handle)   # [(GPU_POWER, (), 71.5)]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pynvml

from proxy.agent import metrics as m

log = logging.getLogger("infermon.agent.nvml")

Value = tuple[m.Spec, tuple[str, ...], float]
Reader = Callable[[Any, Any], list[Value]]

#: NVML errors that mean "this device cannot report this field": leave the field out.
UNSUPPORTED: tuple[type[BaseException], ...] = (
    pynvml.NVMLError_NotSupported,
    pynvml.NVMLError_FunctionNotFound,
    pynvml.NVMLLibraryMismatchError,
)
#: NVML errors after which the whole session is dropped and nvmlInit retried.
FATAL: tuple[type[BaseException], ...] = (
    pynvml.NVMLError_GpuIsLost,
    pynvml.NVMLError_Uninitialized,
    pynvml.NVMLError_DriverNotLoaded,
    pynvml.NVMLError_LibRmVersionMismatch,
)

_REASONS = {
    "LibraryNotFound": "library_not_found",
    "DriverNotLoaded": "driver_not_loaded",
    "NoPermission": "no_permission",
    "GpuIsLost": "gpu_lost",
    "LibRmVersionMismatch": "driver_library_mismatch",
    "Uninitialized": "uninitialized",
}

#: Clock event (throttle) reason bits -> label values.
CLOCK_EVENT_REASONS = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)


def reason(exc: BaseException) -> str:
    """``NVMLError_DriverNotLoaded()`` -> ``"driver_not_loaded"``, for the ``reason`` label."""
    name = type(exc).__name__.removeprefix("NVMLError_")
    return _REASONS.get(name, "nvml_error")


def text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Device:
    """A full GPU, or a MIG device (``gpu_instance_id`` set) inside GPU ``index``."""

    handle: Any
    index: int
    uuid: str
    name: str
    gpu_instance_id: str = ""
    mig_profile: str = ""

    def labels(self, hostname: str) -> tuple[str, ...]:
        return (str(self.index), self.uuid, self.name, hostname, self.gpu_instance_id, self.mig_profile)


def gpus(nvml: Any) -> list[Device]:
    """Every full GPU NVML reports and this process may open (others are logged and skipped)."""
    found = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError_NoPermission:
            log.warning("GPU %d: no permission to open it (device cgroup?), left out", index)
            continue
        found.append(Device(handle, index, text(nvml.nvmlDeviceGetUUID(handle)), text(nvml.nvmlDeviceGetName(handle))))
    return found


def mig_devices(nvml: Any, gpu: Device) -> list[Device]:
    """The MIG devices of ``gpu``; empty when MIG is off or the GPU cannot do MIG."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(gpu.handle)
    except UNSUPPORTED:
        return []
    if current != pynvml.NVML_DEVICE_MIG_ENABLE:
        return []
    found = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu.handle)):
        try:
            handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu.handle, slot)
        except pynvml.NVMLError_NotFound:
            continue  # an empty slot
        name = text(nvml.nvmlDeviceGetName(handle))
        found.append(
            Device(
                handle,
                gpu.index,
                text(nvml.nvmlDeviceGetUUID(handle)),
                gpu.name,
                str(nvml.nvmlDeviceGetGpuInstanceId(handle)),
                mig_profile(name),
            )
        )
    return found


def mig_profile(name: str) -> str:
    """``"NVIDIA A100-SXM4-40GB MIG 1g.5gb"`` -> ``"1g.5gb"`` (the profile NVML puts in the name)."""
    _, sep, profile = name.rpartition("MIG ")
    return profile.strip() if sep else ""


def versions(nvml: Any) -> tuple[str, str]:
    """(driver version, CUDA driver version as ``"12.4"``); empty strings where unknown."""
    try:
        driver = text(nvml.nvmlSystemGetDriverVersion())
    except pynvml.NVMLError:
        driver = ""
    try:
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}"
    except pynvml.NVMLError:
        cuda_text = ""
    return driver, cuda_text


# Readers: one per field, all or nothing (a field whose call fails contributes no value).


def _utilization(nvml: Any, h: Any) -> list[Value]:
    rates = nvml.nvmlDeviceGetUtilizationRates(h)
    return [(m.GPU_UTIL, (), rates.gpu / 100.0), (m.GPU_MEM_UTIL, (), rates.memory / 100.0)]


def _memory(nvml: Any, h: Any) -> list[Value]:
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    return [
        (m.GPU_MEM_USED, (), float(mem.used)),
        (m.GPU_MEM_FREE, (), float(mem.free)),
        (m.GPU_MEM_TOTAL, (), float(mem.total)),
    ]


def _power(nvml: Any, h: Any) -> list[Value]:
    return [(m.GPU_POWER, (), nvml.nvmlDeviceGetPowerUsage(h) / 1000.0)]  # milliwatts


def _energy(nvml: Any, h: Any) -> list[Value]:
    return [(m.GPU_ENERGY, (), nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0)]  # millijoules


def _temperature(nvml: Any, h: Any) -> list[Value]:
    return [(m.GPU_TEMP, (), float(nvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)))]


def _sm_clock(nvml: Any, h: Any) -> list[Value]:
    return [(m.GPU_SM_CLOCK, (), nvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) * 1e6)]  # MHz


def _memory_clock(nvml: Any, h: Any) -> list[Value]:
    return [(m.GPU_MEM_CLOCK, (), nvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM) * 1e6)]


def _clock_events(nvml: Any, h: Any) -> list[Value]:
    try:
        bits = nvml.nvmlDeviceGetCurrentClocksEventReasons(h)
    except pynvml.NVMLError_FunctionNotFound:  # drivers before R535 only have the old name
        bits = nvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)
    return [(m.GPU_CLOCK_EVENT, (label,), 1.0 if bits & bit else 0.0) for bit, label in CLOCK_EVENT_REASONS]


def _pcie_tx(nvml: Any, h: Any) -> list[Value]:
    kib = nvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_TX_BYTES)  # KiB/s
    return [(m.GPU_PCIE, ("tx",), kib * 1024.0)]


def _pcie_rx(nvml: Any, h: Any) -> list[Value]:
    kib = nvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES)
    return [(m.GPU_PCIE, ("rx",), kib * 1024.0)]


def _pcie_replays(nvml: Any, h: Any) -> list[Value]:
    return [(m.GPU_PCIE_REPLAY, (), float(nvml.nvmlDeviceGetPcieReplayCounter(h)))]


def _remapped_rows(nvml: Any, h: Any) -> list[Value]:
    correctable, uncorrectable, pending, failed = nvml.nvmlDeviceGetRemappedRows(h)
    return [
        (m.GPU_REMAPPED, ("correctable",), float(correctable)),
        (m.GPU_REMAPPED, ("uncorrectable",), float(uncorrectable)),
        (m.GPU_REMAP_PENDING, (), 1.0 if pending else 0.0),
        (m.GPU_REMAP_FAILED, (), 1.0 if failed else 0.0),
    ]


def _ecc(nvml: Any, h: Any) -> list[Value]:
    out: list[Value] = []
    for error_type, type_label in (
        (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"),
        (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected"),
    ):
        for counter, scope in (
            (pynvml.NVML_VOLATILE_ECC, "volatile"),
            (pynvml.NVML_AGGREGATE_ECC, "aggregate"),
        ):
            count = nvml.nvmlDeviceGetTotalEccErrors(h, error_type, counter)
            out.append((m.GPU_ECC, (type_label, scope), float(count)))
    return out


#: Fields read on a full GPU, by name (the name appears in "not supported" log lines).
GPU_READERS: dict[str, Reader] = {
    "utilization": _utilization,
    "memory": _memory,
    "power": _power,
    "energy": _energy,
    "temperature": _temperature,
    "sm_clock": _sm_clock,
    "memory_clock": _memory_clock,
    "clock_events": _clock_events,
    "pcie_tx": _pcie_tx,
    "pcie_rx": _pcie_rx,
    "pcie_replays": _pcie_replays,
    "remapped_rows": _remapped_rows,
    "ecc": _ecc,
}
#: Fields read on a MIG device (NVML answers the rest only for the whole GPU).
MIG_READERS: dict[str, Reader] = {"memory": _memory}


def processes(nvml: Any, h: Any) -> Sequence[Any]:
    """Compute processes on the device: objects with ``pid`` and ``usedGpuMemory`` (bytes or None)."""
    return list(nvml.nvmlDeviceGetComputeRunningProcesses(h))
