"""bench.sampler: kernel counters of a process tree."""

from __future__ import annotations

import os
import threading
import time

from bench.sampler import Counters, ProcessTree, read_counters


def test_counters_subtract_and_add() -> None:
    a = Counters(1.0, 2.0, 3, 4, 5)
    b = Counters(0.5, 0.5, 1, 1, 1)
    assert a - b == Counters(0.5, 1.5, 2, 3, 4)
    assert (a - b) + b == a
    assert a.cpu_s == 3.0


def test_read_counters_sees_cpu_time_and_switches_of_every_thread() -> None:
    before = ProcessTree(os.getpid()).counters()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # 50 ms of CPU, so at least a few clock ticks
        pass
    woke = threading.Event()
    done = threading.Event()

    def waiter() -> None:
        woke.wait(timeout=5.0)  # blocks: a voluntary switch of this thread
        done.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    woke.set()
    assert done.wait(timeout=5.0)
    after = read_counters(os.getpid())  # read before the thread ends: its switches count while it lives
    thread.join(timeout=5.0)
    used = after - before
    assert used.cpu_s >= 0.03
    assert used.voluntary_switches >= 1
    assert used.minor_faults >= 0


def test_read_counters_of_a_gone_process_is_zero() -> None:
    assert read_counters(2**22 + 1) == Counters()
