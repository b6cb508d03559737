from __future__ import annotations

import logging
from typing import Any

import pynvml
import pytest

from proxy.agent.events import XidWatcher
from proxy.agent.fake import FakeGpu, FakeNvml
from proxy.agent.nvml import gpus


class FailingWait(FakeNvml):
    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> Any:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)


def test_watcher_ends_on_a_wait_error(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FailingWait([FakeGpu(uuid="GPU-a")])
    nvml.nvmlInit()
    seen: list[tuple[str, int]] = []
    watcher = XidWatcher(nvml, gpus(nvml), lambda uuid, xid: seen.append((uuid, xid)))
    with caplog.at_level(logging.WARNING):
        watcher.start()
        watcher.stop()
    assert seen == []
    assert "XID event wait failed" in caplog.text


def test_watcher_records_and_stops() -> None:
    gpu = FakeGpu(uuid="GPU-a")
    nvml = FakeNvml([gpu])
    nvml.nvmlInit()
    seen: list[tuple[str, int]] = []
    watcher = XidWatcher(nvml, gpus(nvml), lambda uuid, xid: seen.append((uuid, xid)), wait_ms=50)
    watcher.start()
    nvml.push_xid(gpu, 31)
    assert nvml.wait_processed(1, timeout=10)
    watcher.stop()
    assert seen == [("GPU-a", 31)]
