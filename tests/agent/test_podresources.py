"""GPU -> pod allocations from a real gRPC server speaking the kubelet pod-resources API on a unix socket."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from proxy.agent.config import NvmlSettings
from proxy.agent.fake import FakeGpu, FakeMig, FakeNvml
from proxy.agent.gpu import GpuCollector
from proxy.agent.podresources import Allocation, PodResources, parse_list_response
from tests.agent.conftest import find, scrape

grpc = pytest.importorskip("grpc")  # optional: the pod-resources client needs grpcio


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def devices(resource: str, *ids: str) -> bytes:
    return _field(1, resource) + b"".join(_field(2, i) for i in ids) + _field(3, _field(1, _field(1, b"")))


def container(name: str, *device_messages: bytes) -> bytes:
    cpu_ids = _varint(3 << 3 | 2) + _varint(2) + b"\x01\x02"  # packed int64 cpu_ids = 3, skipped
    return _field(1, name) + b"".join(_field(2, d) for d in device_messages) + cpu_ids


def pod(name: str, namespace: str, *containers: bytes) -> bytes:
    return _field(1, name) + _field(2, namespace) + b"".join(_field(3, c) for c in containers)


def response(*pods: bytes) -> bytes:
    return b"".join(_field(1, p) for p in pods)


LISTING = response(
    pod(
        "llm-0",
        "serving",
        container("model", devices("nvidia.com/gpu", "GPU-a"), devices("example.com/nic", "eth1")),
        container("sidecar"),
    ),
    pod("batch-1", "jobs", container("worker", devices("nvidia.com/mig-1g.10gb", "MIG-2"))),
    pod(
        "shared",
        "dev",
        container("a", devices("nvidia.com/gpu", "GPU-b::0")),
        container("b", devices("nvidia.com/gpu", "GPU-b::1")),
    ),
    pod("by-index", "dev", container("c", devices("nvidia.com/gpu", "2"))),
)


def test_parse_list_response() -> None:
    parsed = parse_list_response(LISTING)
    assert parsed["GPU-a"] == [Allocation("serving", "llm-0", "model", "nvidia.com/gpu")]
    assert parsed["MIG-2"] == [Allocation("jobs", "batch-1", "worker", "nvidia.com/mig-1g.10gb")]
    assert [a.container for a in parsed["GPU-b"]] == ["a", "b"]
    assert "eth1" not in parsed
    assert parse_list_response(b"") == {}
    with pytest.raises(ValueError, match="truncated"):
        parse_list_response(LISTING[:-3])


@pytest.fixture
def kubelet_socket() -> Iterator[tuple[str, list[bytes]]]:
    """A gRPC server answering v1.PodResourcesLister/List with the bytes in the returned list."""
    answer = [LISTING]
    directory = tempfile.mkdtemp(prefix="kubelet-", dir="/tmp")  # unix socket paths are short
    path = f"{directory}/kubelet.sock"

    def list_pods(request: bytes, context: Any) -> bytes:
        return answer[0]

    handler = grpc.method_handlers_generic_handler(
        "v1.PodResourcesLister",
        {"List": grpc.unary_unary_rpc_method_handler(list_pods, lambda b: b, lambda b: b)},
    )
    with ThreadPoolExecutor(max_workers=2) as pool:
        server = grpc.server(pool)
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix://{path}")
        server.start()
        try:
            yield path, answer
        finally:
            server.stop(None).wait(5)
    Path(path).unlink(missing_ok=True)
    Path(directory).rmdir()


def test_allocations_labelled_on_gpus_and_mig_devices(kubelet_socket: tuple[str, list[bytes]]) -> None:
    path, _ = kubelet_socket
    gpus = [
        FakeGpu(uuid="GPU-a"),
        FakeGpu(uuid="GPU-b"),
        FakeGpu(uuid="GPU-c"),
        FakeGpu(uuid="GPU-m", migs=[FakeMig("MIG-1", 1), FakeMig("MIG-2", 2)]),
    ]
    pod_resources = PodResources(path)
    collector = GpuCollector(NvmlSettings(xid_events=False), "node-1", nvml=FakeNvml(gpus), pod_resources=pod_resources)
    try:
        collector.collect_once()
        s = scrape(collector)
    finally:
        collector.close()
    assert find(s, "infermon_gpu_pod_resources_up") == [1.0]
    assert find(
        s, "infermon_gpu_pod_allocation", uuid="GPU-a", gpu="0", k8s_namespace="serving", k8s_pod="llm-0",
        k8s_container="model", resource="nvidia.com/gpu",
    ) == [1.0]  # fmt: skip
    assert len(find(s, "infermon_gpu_pod_allocation", uuid="GPU-b", k8s_pod="shared")) == 2
    assert find(s, "infermon_gpu_pod_allocation", gpu="2", k8s_pod="by-index") == [1.0]
    assert find(
        s, "infermon_gpu_pod_allocation", uuid="MIG-2", gpu_instance_id="2", k8s_pod="batch-1",
        resource="nvidia.com/mig-1g.10gb",
    ) == [1.0]  # fmt: skip
    assert find(s, "infermon_gpu_pod_allocation", uuid="MIG-1") == []


def test_kubelet_gone_reports_down(caplog: pytest.LogCaptureFixture) -> None:
    directory = tempfile.mkdtemp(prefix="kubelet-", dir="/tmp")
    path = f"{directory}/kubelet.sock"
    with socket.socket(socket.AF_UNIX) as sock:  # the file exists, nobody listens
        sock.bind(path)
        pod_resources = PodResources(path, timeout=2.0)
        collector = GpuCollector(
            NvmlSettings(xid_events=False),
            "n",
            nvml=FakeNvml([FakeGpu(uuid="GPU-a")]),
            pod_resources=pod_resources,
        )
        try:
            collector.collect_once()
            collector.collect_once()
        finally:
            collector.close()
    Path(path).unlink()
    Path(directory).rmdir()
    s = scrape(collector)
    assert find(s, "infermon_gpu_pod_resources_up") == [0.0]
    assert find(s, "infermon_gpu_pod_allocation") == []
    assert find(s, "infermon_gpu_collector_up") == [1.0]
    assert caplog.text.count("pod-resources List on") == 1


def test_no_socket_no_series(tmp_path: Path) -> None:
    pod_resources = PodResources(str(tmp_path / "absent.sock"))
    collector = GpuCollector(
        NvmlSettings(xid_events=False),
        "n",
        nvml=FakeNvml([FakeGpu(uuid="GPU-a")]),
        pod_resources=pod_resources,
    )
    collector.collect_once()
    s = scrape(collector)
    assert find(s, "infermon_gpu_pod_resources_up") == []
    assert find(s, "infermon_gpu_pod_allocation") == []
