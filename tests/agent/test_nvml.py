from __future__ import annotations

import pynvml
import pytest

from proxy.agent.fake import FakeGpu, FakeNvml
from proxy.agent.nvml import gpus, mig_profile, reason, versions


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "library_not_found"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver_not_loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no_permission"),
        (pynvml.NVML_ERROR_GPU_IS_LOST, "gpu_lost"),
        (pynvml.NVML_ERROR_UNKNOWN, "nvml_error"),
    ],
)
def test_reason(code: int, expected: str) -> None:
    assert reason(pynvml.NVMLError(code)) == expected


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "1g.5gb"),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "3g.40gb"),
        ("NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb", "1c.3g.40gb"),
        ("NVIDIA H100 80GB HBM3", ""),
    ],
)
def test_mig_profile(name: str, profile: str) -> None:
    assert mig_profile(name) == profile


def test_discovery_and_versions() -> None:
    nvml = FakeNvml([FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b", name="NVIDIA L4")])
    nvml.nvmlInit()
    found = gpus(nvml)
    assert [(g.index, g.uuid, g.name) for g in found] == [
        (0, "GPU-a", "NVIDIA A100-SXM4-80GB"),
        (1, "GPU-b", "NVIDIA L4"),
    ]
    assert found[1].labels("n1") == ("1", "GPU-b", "NVIDIA L4", "n1", "", "")
    assert versions(nvml) == ("550.54.15", "12.4")
