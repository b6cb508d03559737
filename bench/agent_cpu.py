"""CPU cost of the node agent's collections, with simulated GPUs, reported as % of one core.

Usage: ``.venv/bin/python -m bench.agent_cpu [--gpus 8] [--rounds 300] [--interval 10]
[--scrape-interval 15] [--nvml fake|stub]``

``--nvml fake`` (the default) runs the GPU collector against :class:`proxy.agent.fake.FakeNvml`
(every field supported, two pod processes per GPU attributed through a temporary procfs, the XID
event thread running). ``--nvml stub`` compiles tests/agent/stub_nvml.c with gcc and runs the real
nvidia-ml-py against it (ctypes calls included; ECC unsupported, one process on GPU 0). The real
psutil host collector runs beside either. CPU is process time (all threads) over ``rounds``
collections; a scrape (rendering the last snapshot as Prometheus text) is timed apart. Neither NVML
stand-in spends the time a real driver spends inside its calls.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml
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


STUB_SOURCE = Path(__file__).resolve().parents[1] / "tests" / "agent" / "stub_nvml.c"
_IN_STUB = "INFERMON_BENCH_STUB_CHILD"


def rerun_with_stub(gpus: int) -> int:
    """Build the stub libnvidia-ml.so.1 and run this benchmark again with the loader pointed at it."""
    gcc = shutil.which("gcc")
    if gcc is None:
        print("--nvml stub needs gcc", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as lib:
        subprocess.run(
            [gcc, "-shared", "-fPIC", "-O2", "-o", f"{lib}/libnvidia-ml.so.1", str(STUB_SOURCE)], check=True
        )
        env = {**os.environ, "LD_LIBRARY_PATH": lib, "STUB_NVML_GPUS": str(gpus), _IN_STUB: "1"}
        return subprocess.call([sys.executable, "-m", "bench.agent_cpu", *sys.argv[1:]], env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--interval", type=float, default=10.0, help="collection interval to report at")
    parser.add_argument("--scrape-interval", type=float, default=15.0, help="scrape interval to report at")
    parser.add_argument("--nvml", choices=("fake", "stub"), default="fake", help="simulated NVML to use")
    args = parser.parse_args()
    if args.nvml == "stub" and _IN_STUB not in os.environ:
        return rerun_with_stub(args.gpus)

    with tempfile.TemporaryDirectory() as tmp:
        procfs = Path(tmp)
        nvml: Any = FakeNvml(simulated_gpus(args.gpus, procfs)) if args.nvml == "fake" else pynvml
        gpu = GpuCollector(NvmlSettings(), "bench-node", nvml=nvml, pods=PodMapper(str(procfs)))
        host = HostCollector(HostSettings())
        registry = CollectorRegistry()
        registry.register(gpu)
        registry.register(host)
        try:
            gpu_s = cpu_per_call(gpu.collect_once, args.rounds)
            host_s = cpu_per_call(host.collect_once, args.rounds)
            scrape_s = cpu_per_call(lambda: generate_latest(registry), args.rounds)
            if not any(s.value for f in gpu.collect() if f.name == "infermon_gpu_devices" for s in f.samples):
                print("no GPU was collected: NVML did not initialise", file=sys.stderr)
                return 2
            series = sum(len(family.samples) for family in registry.collect())
        finally:
            gpu.close()

    collection_s = gpu_s + host_s
    share = collection_s / args.interval * 100
    scrape_share = scrape_s / args.scrape_interval * 100
    print(f"simulated GPUs:               {args.gpus}, NVML {args.nvml} ({series} series on /metrics)")
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
