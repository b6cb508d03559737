"""CPU cost of the node agent's collections, with simulated GPUs, reported as % of one core.

Usage: ``.venv/bin/python -m bench.agent_cpu [--gpus 8] [--rounds 300] [--interval 10]
[--scrape-interval 15]``

The GPU collector runs against :class:`proxy.agent.fake.FakeNvml` (every field supported, two pod
processes per GPU attributed through a temporary procfs, the XID event thread running), next to the
real psutil host collector. CPU is process time (all threads) over ``rounds`` collections; a scrape
(rendering the last snapshot as Prometheus text) is timed apart. The fake answers in Python, so the
figure covers the agent's own work, not the time a real driver spends inside NVML calls.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from proxy.agent.config import HostSettings, NvmlSettings
from proxy.agent.fake import FakeGpu, FakeNvml, FakeProcess
from proxy.agent.gpu import GpuCollector
from proxy.agent.host import HostCollector
from proxy.agent.podmap import PodMapper


def cpu_per_call(fn: Callable[[], object], rounds: int) -> float:
    """Process CPU seconds per call of ``fn``, after a few warm-up calls."""
    for _ in range(5):
        fn()
    start = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - start) / rounds


def simulated_gpus(count: int, procfs: Path) -> list[FakeGpu]:
    gpus = []
    for index in range(count):
        processes = []
        for slot in range(2):
            pid = 1000 + index * 10 + slot
            uid = f"00000000-0000-4000-8000-{index:06d}{slot:06d}"
            (procfs / str(pid)).mkdir()
            (procfs / str(pid) / "cgroup").write_text(
                f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}"
                f".slice/cri-containerd-{pid:064x}.scope\n"
            )
            processes.append(FakeProcess(pid, (index + 1) << 30))
        gpus.append(FakeGpu(uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000", processes=processes))
    return gpus


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--interval", type=float, default=10.0, help="collection interval to report at")
    parser.add_argument("--scrape-interval", type=float, default=15.0, help="scrape interval to report at")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        procfs = Path(tmp)
        gpu = GpuCollector(
            NvmlSettings(),
            "bench-node",
            nvml=FakeNvml(simulated_gpus(args.gpus, procfs)),
            pods=PodMapper(str(procfs)),
        )
        host = HostCollector(HostSettings())
        registry = CollectorRegistry()
        registry.register(gpu)
        registry.register(host)
        try:
            gpu_s = cpu_per_call(gpu.collect_once, args.rounds)
            host_s = cpu_per_call(host.collect_once, args.rounds)
            scrape_s = cpu_per_call(lambda: generate_latest(registry), args.rounds)
            series = sum(len(family.samples) for family in registry.collect())
        finally:
            gpu.close()

    collection_s = gpu_s + host_s
    share = collection_s / args.interval * 100
    scrape_share = scrape_s / args.scrape_interval * 100
    print(f"simulated GPUs:               {args.gpus} ({series} series on /metrics)")
    print(f"GPU collection:               {gpu_s * 1e3:.3f} ms CPU")
    print(f"host collection:              {host_s * 1e3:.3f} ms CPU")
    print(f"one collection (GPU + host):  {collection_s * 1e3:.3f} ms CPU")
    print(f"  at a {args.interval:g} s interval:       {share:.4f} % of one core (target < 1 %)")
    print(f"one scrape (render /metrics): {scrape_s * 1e3:.3f} ms CPU")
    print(f"  at a {args.scrape_interval:g} s scrape interval: {scrape_share:.4f} % of one core")
    print(f"total:                        {share + scrape_share:.4f} % of one core")
    return 0 if share < 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
