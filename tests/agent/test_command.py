"""The real ``infermon agent`` in a subprocess: real nvidia-ml-py against a stub libnvidia-ml.so.1, and
the no-driver path of this machine. Scrapes go over real sockets; /metrics is parsed back with
prometheus_client's parser."""

from __future__ import annotations

import asyncio
import ctypes
import re
import shutil
import signal
from pathlib import Path

import pynvml
import pytest
from prometheus_client import generate_latest

from proxy import cli
from proxy.agent import metrics as agent_metrics
from proxy.agent.command import build
from proxy.agent.config import AgentConfig
from proxy.agent.fake import FakeGpu, FakeMig, FakeNvml, FakeProcess
from proxy.agent.gpu import GpuCollector
from tests.agent.conftest import INFERMON, REPO, StartAgent, agent_env, find, names

GPU0 = "GPU-00000000-0000-0000-0000-000000000000"
GPU1 = "GPU-00000000-0000-0000-0000-000000000001"
POD_UID = "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"
CONTAINER = "ab" * 32


def _has_nvml() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_cli_lists_agent() -> None:
    assert "proxy.agent.command" in cli.COMMAND_MODULES


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def _exposition(driver: str) -> str:
    """The agent's /metrics text, built as ``infermon agent`` builds it, over a fake NVML."""
    gpu = FakeGpu(
        uuid=GPU0,
        processes=[FakeProcess(100, 1 << 30)],
        migs=[FakeMig("MIG-1", 1, "1g.10gb", 10 << 30, 1 << 30, [FakeProcess(100, 1 << 30)])],
    )
    errors = [pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)] if driver == "no driver" else []
    nvml = FakeNvml([gpu], init_errors=errors)
    config = AgentConfig.model_validate({"nvml": {"pod_resources_socket": None}})
    registry, worker, collectors = build(config, nvml=nvml)
    try:
        worker.run_once()
        if driver == "gpus":
            nvml.push_xid(gpu, 79)
            assert nvml.wait_processed(1, timeout=5)
            worker.run_once()  # the count shows from the next snapshot on
        text = generate_latest(registry).decode()
    finally:
        for collector in collectors:
            if isinstance(collector, GpuCollector):
                collector.close()
    assert ("infermon_gpu_xid_errors_total{" in text) == (driver == "gpus")
    assert "infermon_host_cpus " in text
    return text


@needs_promtool
@pytest.mark.parametrize("driver", ["gpus", "no driver"])
async def test_promtool_accepts_the_exposition(driver: str) -> None:
    """Every family the agent serves (GPUs with MIG, processes and an XID; or no driver; host; process) lints clean."""
    assert PROMTOOL is not None
    text = _exposition(driver)
    proc = await asyncio.create_subprocess_exec(
        PROMTOOL, "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), timeout=20)
    assert proc.returncode == 0, out.decode()
    assert out.decode().strip() == ""  # no lint findings either


@pytest.mark.parametrize("page", ["agent.md", "metrics.md"])
def test_docs_list_every_exported_family(page: str) -> None:
    """docs/agent.md describes them; docs/metrics.md, every metric infermon exports, lists them too."""
    docs = (REPO / "docs" / page).read_text(encoding="utf-8")
    families = set(re.findall(r"^# TYPE (\S+)", _exposition("gpus") + _exposition("no driver"), flags=re.M))
    assert "`infermon_agent_process_*`" in docs
    missing = {f for f in families if f"`{f}`" not in docs and not f.startswith("infermon_agent_process_")}
    assert missing == set()
    if page == "metrics.md":  # and nothing the agent does not define (some need a socket, a GPU event)
        section = docs.split("## Node agent", 1)[1].split("\n## ", 1)[0]
        listed = set(re.findall(r"`(infermon_(?:gpu|host)_[a-z0-9_]+)`", section))
        assert listed == {spec.name for spec in (*agent_metrics.GPU_SPECS, *agent_metrics.HOST_SPECS)}


@pytest.fixture
def host_proc(tmp_path: Path) -> Path:
    """A procfs holding only /proc/4242/cgroup: the stub's GPU process, inside a pod (cgroup v2, systemd)."""
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{CONTAINER}.scope\n"
    )
    return proc


async def test_stub_library_end_to_end(start_agent: StartAgent, stub_nvml_dir: Path, host_proc: Path) -> None:
    env = agent_env(LD_LIBRARY_PATH=str(stub_nvml_dir), INFERMON_AGENT_HOST__ENABLED="false")
    agent = await start_agent("--interval", "0.1", "--procfs", str(host_proc), env=env)

    # XID 79 arrives through the event thread; wait for it and for a few collections to have run.
    first = await agent.metrics_until(lambda s: bool(find(s, "infermon_gpu_xid_errors_total", xid="79")))
    stamp = find(first, "infermon_gpu_last_collection_timestamp_seconds")
    samples = await agent.metrics_until(lambda s: find(s, "infermon_gpu_last_collection_timestamp_seconds") != stamp)

    assert find(samples, "infermon_gpu_collector_up") == [1.0]
    assert find(samples, "infermon_gpu_devices") == [2.0]
    assert find(samples, "infermon_gpu_xid_errors_total", uuid=GPU0, gpu="0", xid="79") == [1.0]
    info = find(samples, "infermon_gpu_info", uuid=GPU0, model_name="Stub GPU A", driver_version="550.54.15")
    assert info == [1.0]
    assert find(samples, "infermon_gpu_info", uuid=GPU1, cuda_version="12.4", hostname=find_hostname(samples))
    assert find(samples, "infermon_gpu_utilization_ratio", uuid=GPU0) == [0.75]
    assert find(samples, "infermon_gpu_utilization_ratio", uuid=GPU1) == [0.1]
    assert find(samples, "infermon_gpu_memory_copy_utilization_ratio", uuid=GPU0) == [0.4]
    assert find(samples, "infermon_gpu_memory_used_bytes", gpu="0") == [4 * 2**30]
    assert find(samples, "infermon_gpu_memory_free_bytes", gpu="0") == [12 * 2**30]
    assert find(samples, "infermon_gpu_memory_total_bytes", gpu="1") == [16 * 2**30]
    assert find(samples, "infermon_gpu_power_watts", gpu="0") == [250.5]
    assert find(samples, "infermon_gpu_energy_joules_total", gpu="0") == [123456.789]
    assert find(samples, "infermon_gpu_temperature_celsius", gpu="1") == [40.0]
    assert find(samples, "infermon_gpu_sm_clock_hz", gpu="0") == [1410e6]
    assert find(samples, "infermon_gpu_memory_clock_hz", gpu="0") == [1215e6]
    assert find(samples, "infermon_gpu_clock_event_reason", gpu="0", reason="sw_power_cap") == [1.0]
    assert find(samples, "infermon_gpu_clock_event_reason", gpu="0", reason="gpu_idle") == [0.0]
    assert find(samples, "infermon_gpu_clock_event_reason", gpu="1", reason="gpu_idle") == [1.0]
    assert find(samples, "infermon_gpu_pcie_throughput_bytes_per_second", gpu="0", direction="tx") == [1024000]
    assert find(samples, "infermon_gpu_pcie_throughput_bytes_per_second", gpu="0", direction="rx") == [2048000]
    assert find(samples, "infermon_gpu_remapped_rows_total", gpu="0", cause="correctable") == [2.0]
    assert find(samples, "infermon_gpu_row_remap_pending", gpu="1") == [0.0]
    assert find(samples, "infermon_gpu_processes", gpu="0") == [1.0]
    assert find(samples, "infermon_gpu_processes", gpu="1") == [0.0]
    pod = find(samples, "infermon_gpu_pod_memory_used_bytes", gpu="0", pod_uid=POD_UID, container_id=CONTAINER)
    assert pod == [2**30]
    # ECC answers NOT_SUPPORTED and the PCIe replay symbol is missing: left out, not exported as 0.
    assert "infermon_gpu_ecc_errors_total" not in names(samples)
    assert "infermon_gpu_pcie_replays_total" not in names(samples)
    assert not any(n.startswith("node_") for n in names(samples))

    status, content_type, body = await agent.get("/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    assert "infermon_gpu_energy_joules_total{" in body
    status, content_type, _ = await agent.get("/metrics", accept="text/plain")
    assert content_type.startswith("text/plain")
    assert (await agent.get("/healthz"))[0] == 200

    assert await agent.stop() == 0
    for uuid in (GPU0, GPU1):  # logged once per device and field, however many collections ran
        assert sum(f"({uuid}): ecc not available (NVMLError_NotSupported)" in line for line in agent.log) == 1
        assert (
            sum(f"({uuid}): pcie_replays not available (NVMLError_FunctionNotFound)" in line for line in agent.log) == 1
        )


def find_hostname(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> str:
    for (name, labels), _ in samples.items():
        if name == "infermon_gpu_info":
            return dict(labels)["hostname"]
    raise AssertionError("no infermon_gpu_info")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_no_driver_on_this_machine(start_agent: StartAgent, signum: int) -> None:
    if _has_nvml():
        pytest.skip("this machine has an NVML library")
    agent = await start_agent("--interval", "0.1")
    # GPU and host snapshots are published one after the other: wait for both
    samples = await agent.metrics_until(
        lambda s: bool(find(s, "infermon_gpu_collector_up") and find(s, "infermon_host_cpus"))
    )
    assert find(samples, "infermon_gpu_collector_up", reason="library_not_found") == [0.0]
    assert find(samples, "infermon_gpu_devices") == [0.0]
    assert find(samples, "infermon_gpu_init_failures_total", reason="library_not_found") == [1.0]
    assert not any(n.startswith("infermon_gpu_") and "info" in n for n in names(samples))
    # the host collector still works
    assert find(samples, "infermon_host_cpu_seconds_total", mode="idle")[0] > 0
    assert find(samples, "infermon_host_memory_bytes", state="total")[0] > 0
    assert find(samples, "infermon_host_cpus")[0] >= 1
    assert find(samples, "infermon_agent_process_cpu_seconds_total")
    assert (await agent.get("/healthz"))[0] == 200
    assert await agent.stop(signum) == 0
    assert any("NVML unavailable (library_not_found" in line for line in agent.log)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--listen", "nonsense"], {}, "listen = 'nonsense' (from flag --listen)"),
        ([], {"INFERMON_AGENT_INTERVAL": "soon"}, "interval = 'soon' (from env INFERMON_AGENT_INTERVAL)"),
        ([], {"INFERMON_AGENT_COLOUR": "red"}, "unknown key colour"),
    ],
)
async def test_bad_config_exits_2(args: list[str], env: dict[str, str], message: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *INFERMON, "agent", *args,
        env=agent_env(**env), cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 2
    assert message in stderr.decode()


async def test_port_in_use_is_one_line_and_exit_1() -> None:
    """A busy port is not a config error: one ``cannot listen on`` line and exit 1, like ``infermon proxy``."""
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            *INFERMON, "agent", "--listen", f"127.0.0.1:{port}",
            env=agent_env(), cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=20)
    finally:
        busy.close()
    assert proc.returncode == 1, stderr.decode()
    assert stdout == b""
    assert stderr.decode().splitlines() == [
        f"cannot listen on 127.0.0.1:{port}: Address already in use (change listen or --listen)"
    ]
