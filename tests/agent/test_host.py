from __future__ import annotations

import psutil

from proxy.agent.config import HostSettings
from proxy.agent.host import HostCollector
from tests.agent.conftest import find, names, scrape


def test_host_metrics_from_this_machine() -> None:
    collector = HostCollector(HostSettings())
    assert scrape(collector) == {}
    collector.collect_once()
    s = scrape(collector)
    modes = {dict(labels)["mode"] for name, labels in s if name == "infermon_host_cpu_seconds_total"}
    assert {"user", "system", "idle"} <= modes
    assert find(s, "infermon_host_cpus") == [float(psutil.cpu_count())]
    total = find(s, "infermon_host_memory_bytes", state="total")[0]
    assert 0 < find(s, "infermon_host_memory_bytes", state="available")[0] <= total
    assert find(s, "infermon_host_load1")[0] >= 0
    assert find(s, "infermon_host_load15")[0] >= 0
    assert find(s, "infermon_host_swap_bytes", state="total")
    assert find(s, "infermon_host_collection_duration_seconds")[0] >= 0
    devices = {dict(labels)["device"] for name, labels in s if name.startswith("infermon_host_network_")}
    assert "lo" not in devices  # excluded by default
    assert all(n.startswith("infermon_host_") for n in names(s))


def test_device_filters_and_procfs() -> None:
    collector = HostCollector(HostSettings(network_exclude=r"^$", disk_exclude=r".*"), procfs="/proc")
    collector.collect_once()
    s = scrape(collector)
    assert psutil.PROCFS_PATH == "/proc"
    assert "lo" in {dict(labels)["device"] for name, labels in s if name == "infermon_host_network_receive_bytes_total"}
    assert find(s, "infermon_host_disk_read_bytes_total") == []


def test_procfs_points_psutil_at_the_host_proc() -> None:
    HostCollector(HostSettings(), procfs="/host/proc")
    assert psutil.PROCFS_PATH == "/host/proc"  # restored by the autouse fixture in conftest
