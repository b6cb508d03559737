"""The GPU collector against an injected fake NVML: MIG, XID events, unsupported fields, backoff, GPU loss."""

from __future__ import annotations

import logging
from pathlib import Path

import pynvml
import pytest
from prometheus_client import CollectorRegistry

from proxy.agent.config import NvmlSettings
from proxy.agent.fake import FakeGpu, FakeMig, FakeNvml, FakeProcess
from proxy.agent.gpu import GpuCollector
from proxy.agent.podmap import PodMapper
from tests.agent.conftest import find, names, scrape

POD_A = "0a1b2c3d-0000-4000-8000-00000000000a"
POD_B = "0a1b2c3d-0000-4000-8000-00000000000b"
CID = "c" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(nvml: FakeNvml, tmp_path: Path, clock: Clock | None = None, **settings: object) -> GpuCollector:
    return GpuCollector(
        NvmlSettings.model_validate(settings),
        "node-1",
        nvml=nvml,
        pods=PodMapper(str(tmp_path)),
        clock=clock or Clock(),
    )


def write_cgroup(procfs: Path, pid: int, line: str) -> None:
    (procfs / str(pid)).mkdir(parents=True)
    (procfs / str(pid) / "cgroup").write_text(line + "\n")


def test_mig_devices_get_instance_and_profile_labels(tmp_path: Path) -> None:
    write_cgroup(tmp_path, 100, f"0::/kubepods/besteffort/pod{POD_A}/{CID}")
    write_cgroup(tmp_path, 200, f"0::/kubepods/pod{POD_B}/{CID}")
    gpu = FakeGpu(
        uuid="GPU-a",
        migs=[
            FakeMig(
                "MIG-1",
                1,
                "3g.40gb",
                40 << 30,
                5 << 30,
                [FakeProcess(100, 3 << 30), FakeProcess(101, 1 << 30)],
            ),
            FakeMig("MIG-2", 2, "1g.10gb", 10 << 30, 2 << 30, [FakeProcess(200, 2 << 30)]),
        ],
    )
    collector = make(FakeNvml([gpu]), tmp_path, xid_events=False)
    collector.collect_once()
    s = scrape(collector)

    assert find(s, "infermon_gpu_devices") == [1.0]
    mig1 = {"gpu": "0", "uuid": "MIG-1", "gpu_instance_id": "1", "mig_profile": "3g.40gb"}
    mig2 = {"gpu": "0", "uuid": "MIG-2", "gpu_instance_id": "2", "mig_profile": "1g.10gb"}
    assert find(s, "infermon_gpu_info", **mig1, model_name=gpu.name, hostname="node-1") == [1.0]
    assert find(s, "infermon_gpu_memory_total_bytes", **mig1) == [40 << 30]
    assert find(s, "infermon_gpu_memory_used_bytes", **mig2) == [2 << 30]
    assert find(s, "infermon_gpu_memory_total_bytes", uuid="GPU-a", gpu_instance_id="") == [80 << 30]
    # whole-GPU fields stay on the parent only
    assert find(s, "infermon_gpu_power_watts", uuid="GPU-a") == [250.0]
    assert find(s, "infermon_gpu_power_watts", uuid="MIG-1") == []
    # processes are read per MIG device; pid 101 is outside any pod
    assert find(s, "infermon_gpu_processes", **mig1) == [2.0]
    assert find(s, "infermon_gpu_pod_memory_used_bytes", **mig1, pod_uid=POD_A, container_id=CID) == [3 << 30]
    assert find(s, "infermon_gpu_pod_memory_used_bytes", **mig1, pod_uid="", container_id="") == [1 << 30]
    assert find(s, "infermon_gpu_pod_memory_used_bytes", **mig2, pod_uid=POD_B) == [2 << 30]
    assert find(s, "infermon_gpu_processes", uuid="GPU-a") == []


def test_xid_events_counted_by_gpu_and_xid(tmp_path: Path) -> None:
    gpus = [FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b")]
    nvml = FakeNvml(gpus)
    collector = make(nvml, tmp_path)
    collector.collect_once()
    try:
        nvml.push_xid(gpus[0], 79)
        nvml.push_xid(gpus[0], 79)
        nvml.push_xid(gpus[0], 48)
        nvml.push_xid(gpus[1], 13)
        assert nvml.wait_processed(4, timeout=10)
        collector.collect_once()
        s = scrape(collector)
    finally:
        collector.close()
    assert find(s, "infermon_gpu_xid_errors_total", uuid="GPU-a", gpu="0", xid="79") == [2.0]
    assert find(s, "infermon_gpu_xid_errors_total", uuid="GPU-a", xid="48") == [1.0]
    assert find(s, "infermon_gpu_xid_errors_total", uuid="GPU-b", gpu="1", xid="13") == [1.0]
    assert nvml.shutdown_calls == 1


def test_xid_registration_not_supported_leaves_metric_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gpu = FakeGpu(uuid="GPU-a", unsupported={"nvmlDeviceRegisterEvents"})
    collector = make(FakeNvml([gpu]), tmp_path)
    with caplog.at_level(logging.INFO):
        collector.collect_once()
        collector.close()  # joins the watcher, which gave up at once
    assert "infermon_gpu_xid_errors_total" not in names(scrape(collector))
    assert "XID events not supported" in caplog.text


def test_unsupported_fields_left_out_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gpu = FakeGpu(
        uuid="GPU-a",
        unsupported={"nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetComputeRunningProcesses"},
        missing={"nvmlDeviceGetPcieReplayCounter"},
    )
    nvml = FakeNvml([gpu, FakeGpu(uuid="GPU-b")])
    collector = make(nvml, tmp_path, xid_events=False)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            collector.collect_once()
    s = scrape(collector)
    assert find(s, "infermon_gpu_ecc_errors_total", uuid="GPU-a") == []
    assert find(s, "infermon_gpu_pcie_replays_total", uuid="GPU-a") == []
    assert find(s, "infermon_gpu_processes", uuid="GPU-a") == []
    assert find(s, "infermon_gpu_ecc_errors_total", uuid="GPU-b", type="corrected", scope="volatile") == [0.0]
    assert find(s, "infermon_gpu_pcie_replays_total", uuid="GPU-b") == [0.0]
    assert find(s, "infermon_gpu_power_watts", uuid="GPU-a") == [250.0]
    for field in ("ecc", "pcie_replays", "processes"):
        assert caplog.text.count(f"(GPU-a): {field} not available") == 1


def test_other_errors_leave_the_field_out_and_warn_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gpu = FakeGpu(uuid="GPU-a", failing={"nvmlDeviceGetPowerUsage": pynvml.NVML_ERROR_NO_PERMISSION})
    collector = make(FakeNvml([gpu]), tmp_path, xid_events=False)
    with caplog.at_level(logging.WARNING):
        collector.collect_once()
        collector.collect_once()
    s = scrape(collector)
    assert find(s, "infermon_gpu_power_watts") == []
    assert find(s, "infermon_gpu_collector_up") == [1.0]
    assert caplog.text.count("reading power failed") == 1
    del gpu.failing["nvmlDeviceGetPowerUsage"]  # a transient error is retried, unlike NOT_SUPPORTED
    collector.collect_once()
    assert find(scrape(collector), "infermon_gpu_power_watts") == [250.0]


def test_init_retried_with_exponential_backoff(tmp_path: Path) -> None:
    failures: list[BaseException] = [pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED) for _ in range(4)]
    nvml = FakeNvml([FakeGpu(uuid="GPU-a")], init_errors=failures)
    clock = Clock()
    collector = make(nvml, tmp_path, clock, backoff_initial=10, backoff_max=30, xid_events=False)

    attempts_at = []
    for now in range(0, 121):
        clock.now = float(now)
        before = nvml.init_calls
        collector.collect_once()
        if nvml.init_calls != before:
            attempts_at.append(now)
        if now == 50:
            s = scrape(collector)
            assert find(s, "infermon_gpu_collector_up", reason="driver_not_loaded") == [0.0]
            assert find(s, "infermon_gpu_devices") == [0.0]
            assert find(s, "infermon_gpu_init_failures_total", reason="driver_not_loaded") == [3.0]
            assert find(s, "infermon_gpu_info") == []
    assert attempts_at == [0, 10, 30, 60, 90]  # 10, 20, then capped at 30
    s = scrape(collector)
    assert find(s, "infermon_gpu_collector_up", reason="") == [1.0]
    assert find(s, "infermon_gpu_devices") == [1.0]


def test_gpu_lost_mid_run_drops_the_session_and_recovers(tmp_path: Path) -> None:
    gpu = FakeGpu(uuid="GPU-a")
    nvml = FakeNvml([gpu])
    clock = Clock()
    collector = make(nvml, tmp_path, clock, backoff_initial=5, backoff_max=60, xid_events=False)
    collector.collect_once()
    assert find(scrape(collector), "infermon_gpu_collector_up") == [1.0]

    gpu.lost = True
    collector.collect_once()
    s = scrape(collector)
    assert find(s, "infermon_gpu_collector_up", reason="gpu_lost") == [0.0]
    assert find(s, "infermon_gpu_devices") == [0.0]
    assert find(s, "infermon_gpu_power_watts") == []
    assert nvml.shutdown_calls == 1

    clock.now = 5.0  # retry: init works but the lost GPU fails enumeration
    collector.collect_once()
    assert find(scrape(collector), "infermon_gpu_collector_up", reason="gpu_lost") == [0.0]
    assert nvml.init_calls == 2
    assert nvml.shutdown_calls == 2

    gpu.lost = False
    clock.now = 14.0  # backoff doubled to 10 s
    collector.collect_once()
    assert nvml.init_calls == 2
    clock.now = 15.0
    collector.collect_once()
    s = scrape(collector)
    assert find(s, "infermon_gpu_collector_up") == [1.0]
    assert find(s, "infermon_gpu_power_watts", uuid="GPU-a") == [250.0]


def test_xid_series_keep_their_labels_while_the_gpu_is_gone(tmp_path: Path) -> None:
    gpu = FakeGpu(uuid="GPU-a")
    nvml = FakeNvml([gpu])
    collector = make(nvml, tmp_path, xid_events=False)
    collector.collect_once()
    collector.record_xid("GPU-a", 79)
    collector.collect_once()
    before = [ls for (n, ls) in scrape(collector) if n == "infermon_gpu_xid_errors_total"]
    gpu.lost = True
    collector.collect_once()
    s = scrape(collector)
    assert find(s, "infermon_gpu_collector_up") == [0.0]
    assert [ls for (n, ls) in s if n == "infermon_gpu_xid_errors_total"] == before
    assert find(s, "infermon_gpu_xid_errors_total", gpu="0", model_name=gpu.name, xid="79") == [1.0]


def test_a_gpu_without_permission_is_skipped(tmp_path: Path) -> None:
    hidden = FakeGpu(uuid="GPU-hidden", failing={"nvmlDeviceGetHandleByIndex": pynvml.NVML_ERROR_NO_PERMISSION})
    collector = make(FakeNvml([hidden, FakeGpu(uuid="GPU-b")]), tmp_path, xid_events=False)
    collector.collect_once()
    s = scrape(collector)
    assert find(s, "infermon_gpu_devices") == [1.0]
    assert find(s, "infermon_gpu_info", uuid="GPU-b", gpu="1") == [1.0]


def test_scrape_reads_the_last_snapshot_without_calling_nvml(tmp_path: Path) -> None:
    gpu = FakeGpu(uuid="GPU-a", utilization=30)
    nvml = FakeNvml([gpu])
    collector = make(nvml, tmp_path, xid_events=False)
    assert scrape(collector) == {}  # nothing collected yet
    collector.collect_once()
    gpu.utilization = 90
    nvml.initialized = False  # any NVML call now would fail
    assert find(scrape(collector), "infermon_gpu_utilization_ratio") == [0.3]
    assert find(scrape(collector), "infermon_gpu_collection_duration_seconds")[0] >= 0


def test_units_and_clock_event_reasons(tmp_path: Path) -> None:
    gpu = FakeGpu(
        uuid="GPU-a",
        clock_reasons=0x4 | 0x40,
        energy_mj=2500,
        pcie_tx_kib=3,
        remapped_rows=(1, 2, True, False),
    )
    collector = make(FakeNvml([gpu]), tmp_path, xid_events=False)
    collector.collect_once()
    s = scrape(collector)
    assert find(s, "infermon_gpu_energy_joules_total") == [2.5]
    assert find(s, "infermon_gpu_pcie_throughput_bytes_per_second", direction="tx") == [3072.0]
    assert find(s, "infermon_gpu_sm_clock_hz") == [1.41e9]
    active = {dict(ls)["reason"] for (n, ls), v in s.items() if n == "infermon_gpu_clock_event_reason" and v == 1}
    assert active == {"sw_power_cap", "hw_thermal_slowdown"}
    assert find(s, "infermon_gpu_remapped_rows_total", cause="uncorrectable") == [2.0]
    assert find(s, "infermon_gpu_row_remap_pending") == [1.0]
    assert find(s, "infermon_gpu_row_remap_failed") == [0.0]


def test_clock_event_reasons_fall_back_to_the_pre_535_name(tmp_path: Path) -> None:
    gpu = FakeGpu(uuid="GPU-a", clock_reasons=0x1, missing={"nvmlDeviceGetCurrentClocksEventReasons"})
    collector = make(FakeNvml([gpu]), tmp_path, xid_events=False)
    collector.collect_once()
    assert find(scrape(collector), "infermon_gpu_clock_event_reason", reason="gpu_idle") == [1.0]


def test_registry_describe_names_do_not_clash(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(make(FakeNvml([]), tmp_path))
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(make(FakeNvml([]), tmp_path))
