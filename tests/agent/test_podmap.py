from __future__ import annotations

from pathlib import Path

import pytest

from proxy.agent.podmap import PodMapper, PodRef, parse_cgroup

UID = "4f6c2b1a-9d3e-4c2b-8a1f-0e9d8c7b6a55"
UNDERSCORED = UID.replace("-", "_")
CID = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # cgroup v2, systemd driver, containerd
        (
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UNDERSCORED}.slice/"
            f"cri-containerd-{CID}.scope",
            PodRef(UID, CID),
        ),
        # cgroup v2, systemd driver, guaranteed QoS, CRI-O
        (f"0::/kubepods.slice/kubepods-pod{UNDERSCORED}.slice/crio-{CID}.scope", PodRef(UID, CID)),
        # cgroup v2, cgroupfs driver
        (f"0::/kubepods/besteffort/pod{UID}/{CID}", PodRef(UID, CID)),
        # cgroup v1, cgroupfs driver, several controllers
        (
            f"12:pids:/kubepods/burstable/pod{UID}/{CID}\n"
            f"11:memory:/kubepods/burstable/pod{UID}/{CID}\n"
            "1:name=systemd:/system.slice/containerd.service",
            PodRef(UID, CID),
        ),
        # cgroup v1, systemd driver, docker
        (
            f"4:cpu,cpuacct:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UNDERSCORED}.slice/"
            f"docker-{CID}.scope",
            PodRef(UID, CID),
        ),
        # the pod cgroup itself (pause process gone, a process placed directly in the pod)
        (f"0::/kubepods/burstable/pod{UID}", PodRef(UID, "")),
        # a static pod: its UID is a 32-digit hash
        (f"0::/kubepods/burstable/pod{'ab' * 16}/{CID}", PodRef("ab" * 16, CID)),
        # not in a pod
        ("0::/system.slice/nvidia-persistenced.service", None),
        ("0::/user.slice/user-1000.slice/session-3.scope", None),
        ("", None),
        ("0::/kubepods.slice", None),
    ],
)
def test_parse_cgroup(text: str, expected: PodRef | None) -> None:
    assert parse_cgroup(text) == expected


def test_unified_line_wins_over_v1_lines() -> None:
    other = "9f6c2b1a-9d3e-4c2b-8a1f-0e9d8c7b6a55"
    text = f"3:memory:/kubepods/pod{other}/{CID}\n0::/kubepods/pod{UID}/{CID}\n"
    assert parse_cgroup(text) == PodRef(UID, CID)


def test_mapper_reads_procfs_and_tolerates_gone_processes(tmp_path: Path) -> None:
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "cgroup").write_text(f"0::/kubepods/pod{UID}/{CID}\n")
    mapper = PodMapper(str(tmp_path))
    assert mapper.lookup(77) == PodRef(UID, CID)
    assert mapper.lookup(78) is None
