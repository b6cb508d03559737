"""PID -> Kubernetes pod UID and container id, from ``<procfs>/<pid>/cgroup``.

NVML reports GPU processes by host PID, so the agent needs the host PID namespace (``hostPID: true``)
or the host's /proc mounted and named in ``procfs``. Recognised cgroup paths (v1 and v2, cgroupfs and
systemd drivers, containerd, CRI-O and Docker)::

    0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
    0::/kubepods/burstable/pod<uid>/<id>
    11:memory:/kubepods/pod<uid>/<id>                          (v1, guaranteed QoS)
    0::/kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope

Static (mirror) pods have a 32-hex-digit UID without dashes; it is returned as found.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_POD = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})(?:\.slice)?$"
)
_CONTAINER = re.compile(r"^(?:(?:cri-containerd|containerd|crio|docker|cri-o)-)?([0-9a-f]{64})(?:\.scope)?\Z")


@dataclass(frozen=True)
class PodRef:
    pod_uid: str
    container_id: str  # "" when the process sits in the pod cgroup but no container cgroup


def parse_cgroup(text: str) -> PodRef | None:
    """The pod of a ``/proc/<pid>/cgroup`` file's content, or None for a process outside kubepods."""
    found: PodRef | None = None
    for line in text.splitlines():
        _hierarchy, _, rest = line.partition(":")
        _controllers, _, path = rest.partition(":")
        if "kubepods" not in path:
            continue
        ref = _parse_path(path)
        if ref is None:
            continue
        if _hierarchy == "0" or found is None or (ref.container_id and not found.container_id):
            found = ref  # prefer the unified (v2) line, then one that names the container
    return found


def _parse_path(path: str) -> PodRef | None:
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        match = _POD.search(part)
        if match is None:
            continue
        uid = match.group(1).replace("_", "-")
        container = ""
        if i + 1 < len(parts):
            cmatch = _CONTAINER.fullmatch(parts[i + 1])
            if cmatch is not None:
                container = cmatch.group(1)
        return PodRef(uid, container)
    return None


class PodMapper:
    """Reads cgroup files under ``procfs``; a process that is gone or unreadable maps to None."""

    def __init__(self, procfs: str = "/proc") -> None:
        self.procfs = procfs

    def lookup(self, pid: int) -> PodRef | None:
        try:
            with open(os.path.join(self.procfs, str(pid), "cgroup"), encoding="utf-8") as fh:
                return parse_cgroup(fh.read())
        except OSError:
            return None
