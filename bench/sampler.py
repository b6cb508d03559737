"""CPU time and memory of a proxy under test, counted over its whole process tree.

For nginx that is the master and its workers; for infermon it is its one process (and any child it
may start). `ProcessTree.counters` reads, for every process of the tree, user and system CPU time
(``utime``/``stime`` of ``/proc/PID/stat``), minor page faults (``minflt``, same file) and voluntary
and involuntary context switches (``/proc/PID/task/*/status``, summed over threads); a run's figures
are the difference of two readings. RSS is sampled by a background thread while the run goes on, and
the peak is kept. `ProcessTree.pin` binds a started server to its CPUs (see `cpu_layout`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType

import psutil

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Counters:
    """Cumulative kernel counters of a process tree; subtract two readings for one run's share."""

    user_s: float = 0.0
    system_s: float = 0.0
    minor_faults: int = 0
    voluntary_switches: int = 0  # the process blocked (an epoll_wait that slept: one wake-up each)
    involuntary_switches: int = 0  # the scheduler took the CPU away (preempted by the other server)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s

    def __add__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


def read_counters(pid: int, proc: Path = Path("/proc")) -> Counters:
    """One process's counters (all its threads); zeros when it is gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return Counters()
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ")".
    rest = stat[stat.rindex(")") + 2 :].split()
    minflt, utime, stime = int(rest[7]), int(rest[11]), int(rest[12])  # fields 10, 14 and 15 of proc(5)
    voluntary = involuntary = 0
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        tids = []
    for tid in tids:
        try:
            status = (proc / str(pid) / "task" / tid / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return Counters(utime / CLOCK_TICKS, stime / CLOCK_TICKS, minflt, voluntary, involuntary)


class ProcessTree:
    """A root process and its descendants, looked up again on each reading (workers may be replaced)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)

    def processes(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pin(self, cpus: set[int]) -> None:
        """Bind every thread of every process in the tree to `cpus` (threads made later inherit it)."""
        for proc in self.processes():
            try:
                tids = os.listdir(f"/proc/{proc.pid}/task")
            except OSError:
                continue
            for tid in tids:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)

    def pids(self) -> list[int]:
        return [proc.pid for proc in self.processes()]

    def counters(self) -> Counters:
        total = Counters()
        for pid in self.pids():
            total += read_counters(pid)
        return total

    def cpu_seconds(self) -> float:
        return self.counters().cpu_s

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.processes():
            try:
                total += int(proc.memory_info().rss)
            except psutil.NoSuchProcess:
                continue
        return total


class MachineCpu:
    """Busy CPU seconds of the whole machine next to those of this harness and its children.

    The difference over a run is CPU that something else on the machine used (a test suite, a
    build): the noise behind an odd figure. Only user and system time count: interrupt time (the
    loopback traffic's softirq work) is not charged to any process, so it would show as "other".
    Steal is time the hypervisor gave to other guests.
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.me = psutil.Process()

    def reading(self) -> tuple[float, float, float]:
        """(machine busy seconds, ours, steal)."""
        times = psutil.cpu_times()
        busy = sum(float(getattr(times, key, 0.0)) for key in ("user", "nice", "system"))
        mine = self.me.cpu_times()
        ours = float(mine.user + mine.system + mine.children_user + mine.children_system)
        ours += sum(ProcessTree(pid).cpu_seconds() for pid in self.pids() if psutil.pid_exists(pid))
        return busy, ours, float(getattr(times, "steal", 0.0))


class RssSampler:
    """Samples a tree's RSS every `interval` seconds in a thread while used as a context manager.

    ``samples`` holds ``(seconds since start, rss bytes)``; ``peak`` the largest value seen.
    """

    def __init__(self, tree: ProcessTree, interval: float = 0.1) -> None:
        self.tree = tree
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._start = 0.0

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)

    def _sample(self) -> None:
        self.samples.append((time.monotonic() - self._start, self.tree.rss_bytes()))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._start = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._sample()


def cpu_layout(pin: bool) -> tuple[set[int], set[int]] | None:
    """(load generator CPUs, server CPUs): the first half of this process's CPUs and the rest.

    None when pinning is off or there are fewer than two CPUs. On 2 cores: wrk and the harness on
    CPU 0, upstream and proxy on CPU 1, as a sidecar shares its pod's cores with the model server
    while clients run elsewhere. Without pinning, c=1 latencies on a 2-core VM jump between two modes
    (both ends on one core or not) from one run to the next.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None
    half = max(1, len(cpus) // 2)
    return set(cpus[:half]), set(cpus[half:])
