"""Every metric the agent exports, in one place, and :class:`Batch`, which fills them.

A collection builds a :class:`Batch` of metric families off the scrape path; a scrape yields the
last finished batch as it is. Names follow docs/agent.md: ``infermon_gpu_*`` and ``infermon_host_*``,
base units in the name, counters declared with their ``_total`` name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: Labels of every per-device GPU series. ``gpu_instance_id`` and ``mig_profile`` are empty on full GPUs.
DEVICE_LABELS = ("gpu", "uuid", "model_name", "hostname", "gpu_instance_id", "mig_profile")


@dataclass(frozen=True)
class Spec:
    """One metric family: its name (with ``_total`` for counters), kind, help text and label names."""

    name: str
    kind: Literal["gauge", "counter"]
    doc: str
    labels: tuple[str, ...] = ()

    def family(self) -> Metric:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.doc, labels=self.labels)
        return GaugeMetricFamily(self.name, self.doc, labels=self.labels)


def _gpu(name: str, kind: Literal["gauge", "counter"], doc: str, *extra: str) -> Spec:
    return Spec(f"infermon_gpu_{name}", kind, doc, (*DEVICE_LABELS, *extra))


# Collector state.
GPU_UP = Spec("infermon_gpu_collector_up", "gauge", "1 if NVML answered the last collection, else 0", ("reason",))
GPU_DEVICES = Spec("infermon_gpu_devices", "gauge", "GPUs NVML reports (0 without a driver)")
GPU_DURATION = Spec("infermon_gpu_collection_duration_seconds", "gauge", "Time the last GPU collection took")
GPU_LAST = Spec("infermon_gpu_last_collection_timestamp_seconds", "gauge", "Unix time the last GPU collection finished")
GPU_INIT_FAILURES = Spec("infermon_gpu_init_failures_total", "counter", "nvmlInit attempts that failed", ("reason",))

# Per device.
GPU_INFO = _gpu("info", "gauge", "Always 1: device and driver identity", "driver_version", "cuda_version")
GPU_UTIL = _gpu("utilization_ratio", "gauge", "Share of the last sample period a kernel ran (0-1)")
GPU_MEM_UTIL = _gpu(
    "memory_copy_utilization_ratio",
    "gauge",
    "Share of the last sample period memory was read or written (0-1)",
)
GPU_MEM_USED = _gpu("memory_used_bytes", "gauge", "Device memory in use")
GPU_MEM_FREE = _gpu("memory_free_bytes", "gauge", "Device memory free")
GPU_MEM_TOTAL = _gpu("memory_total_bytes", "gauge", "Device memory installed")
GPU_POWER = _gpu("power_watts", "gauge", "Power draw")
GPU_ENERGY = _gpu("energy_joules_total", "counter", "Energy consumed since the driver was loaded")
GPU_TEMP = _gpu("temperature_celsius", "gauge", "GPU core temperature")
GPU_SM_CLOCK = _gpu("sm_clock_hz", "gauge", "Streaming multiprocessor clock")
GPU_MEM_CLOCK = _gpu("memory_clock_hz", "gauge", "Memory clock")
GPU_CLOCK_EVENT = _gpu(
    "clock_event_reason", "gauge", "1 while this reason holds the clocks down (throttling), else 0", "reason"
)
GPU_PCIE = _gpu("pcie_throughput_bytes_per_second", "gauge", "PCIe throughput over the last 20 ms sample", "direction")
GPU_PCIE_REPLAY = _gpu("pcie_replays_total", "counter", "PCIe replay (retransmission) events")
GPU_REMAPPED = _gpu("remapped_rows_total", "counter", "Memory rows remapped", "cause")
GPU_REMAP_PENDING = _gpu("row_remap_pending", "gauge", "1 if a row remap waits for a GPU reset")
GPU_REMAP_FAILED = _gpu("row_remap_failed", "gauge", "1 if a row remap has failed")
GPU_ECC = _gpu("ecc_errors_total", "counter", "ECC memory errors", "type", "scope")
GPU_XID = _gpu("xid_errors_total", "counter", "XID critical errors reported by the driver, by XID", "xid")
GPU_PROCESSES = _gpu("processes", "gauge", "Compute processes running on the device")
GPU_POD_MEMORY = _gpu(
    "pod_memory_used_bytes",
    "gauge",
    "Device memory used by compute processes, summed per pod and container (empty for non-pod processes)",
    "pod_uid",
    "container_id",
)
GPU_ALLOCATION = _gpu(
    "pod_allocation",
    "gauge",
    "1 for each container the kubelet allocated this device to (pod-resources API)",
    "k8s_namespace",
    "k8s_pod",
    "k8s_container",
    "resource",
)
GPU_POD_RESOURCES_UP = Spec(
    "infermon_gpu_pod_resources_up", "gauge", "1 if the last kubelet pod-resources List call answered, else 0"
)

GPU_SPECS = (
    GPU_UP, GPU_DEVICES, GPU_DURATION, GPU_LAST, GPU_INIT_FAILURES, GPU_INFO, GPU_UTIL, GPU_MEM_UTIL,
    GPU_MEM_USED, GPU_MEM_FREE, GPU_MEM_TOTAL, GPU_POWER, GPU_ENERGY, GPU_TEMP, GPU_SM_CLOCK,
    GPU_MEM_CLOCK, GPU_CLOCK_EVENT, GPU_PCIE, GPU_PCIE_REPLAY, GPU_REMAPPED, GPU_REMAP_PENDING,
    GPU_REMAP_FAILED, GPU_ECC, GPU_XID, GPU_PROCESSES, GPU_POD_MEMORY, GPU_ALLOCATION, GPU_POD_RESOURCES_UP,
)  # fmt: skip

# Host.
HOST_CPU = Spec("infermon_host_cpu_seconds_total", "counter", "CPU time of all cores by mode", ("mode",))
HOST_CPUS = Spec("infermon_host_cpus", "gauge", "Logical CPUs")
HOST_MEMORY = Spec("infermon_host_memory_bytes", "gauge", "Memory by state (total, available, used ...)", ("state",))
HOST_SWAP = Spec("infermon_host_swap_bytes", "gauge", "Swap by state (total, used, free)", ("state",))
HOST_LOAD1 = Spec("infermon_host_load1", "gauge", "1-minute load average")
HOST_LOAD5 = Spec("infermon_host_load5", "gauge", "5-minute load average")
HOST_LOAD15 = Spec("infermon_host_load15", "gauge", "15-minute load average")
HOST_DISK_READ = Spec("infermon_host_disk_read_bytes_total", "counter", "Bytes read from a block device", ("device",))
HOST_DISK_WRITTEN = Spec(
    "infermon_host_disk_written_bytes_total", "counter", "Bytes written to a block device", ("device",)
)
HOST_NET_RX = Spec(
    "infermon_host_network_receive_bytes_total", "counter", "Bytes received by an interface", ("device",)
)
HOST_NET_TX = Spec("infermon_host_network_transmit_bytes_total", "counter", "Bytes sent by an interface", ("device",))
HOST_DURATION = Spec("infermon_host_collection_duration_seconds", "gauge", "Time the last host collection took")

HOST_SPECS = (
    HOST_CPU, HOST_CPUS, HOST_MEMORY, HOST_SWAP, HOST_LOAD1, HOST_LOAD5, HOST_LOAD15, HOST_DISK_READ,
    HOST_DISK_WRITTEN, HOST_NET_RX, HOST_NET_TX, HOST_DURATION,
)  # fmt: skip


class Batch:
    """Metric families filled during one collection, in the order their specs first appear."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, spec: Spec, labels: Sequence[str], value: float) -> None:
        family = self._families.get(spec.name)
        if family is None:
            family = self._families[spec.name] = spec.family()
        family.add_metric(labels, value)  # type: ignore[attr-defined]

    def families(self) -> tuple[Metric, ...]:
        return tuple(self._families.values())


def describe(specs: Sequence[Spec]) -> Iterator[Metric]:
    """Empty families for ``CollectorRegistry`` name checks."""
    for spec in specs:
        yield spec.family()
