"""The ``infermon agent`` configuration schema (every key is listed in docs/agent.md).

Loaded through :func:`proxy.config.load` with the environment prefix ``INFERMON_AGENT_``, so
``INFERMON_AGENT_INTERVAL=5`` sets ``interval`` and ``INFERMON_AGENT_NVML__BACKOFF_MAX=60`` sets
``nvml.backoff_max``. Durations are seconds.
"""

from __future__ import annotations

import re
import socket
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from proxy.settings import HostPort, PositiveFloat


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None
    return value


Regex = Annotated[str, AfterValidator(_check_regex)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NvmlSettings(_Section):
    """The GPU collector."""

    enabled: bool = True
    backoff_initial: PositiveFloat = 10.0  # first retry of nvmlInit after a failure
    backoff_max: PositiveFloat = 300.0  # retries double up to this
    xid_events: bool = True  # count XID errors from an NVML event thread
    processes: bool = True  # per-pod GPU memory from the running compute processes
    # kubelet pod-resources socket (GPU -> pod allocations); null turns it off, a missing file is skipped
    pod_resources_socket: str | None = "/var/lib/kubelet/pod-resources/kubelet.sock"
    pod_resources_prefix: str = "nvidia.com/"  # resource names counted as GPUs

    @model_validator(mode="after")
    def _backoff_order(self) -> NvmlSettings:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        return self


class HostSettings(_Section):
    """The psutil host collector."""

    enabled: bool = True
    disk_exclude: Regex = r"^(loop|ram|zram|sr)\d+$"  # block devices left out (full match)
    network_exclude: Regex = r"^(lo|veth.*|cali.*|flannel.*|cni.*|docker.*|br-.*)$"


class AgentConfig(_Section):
    listen: HostPort = "0.0.0.0:9465"
    interval: Annotated[float, Field(ge=0.05)] = 10.0  # seconds between collections
    hostname: str = Field(default_factory=socket.gethostname)  # the hostname label; set to the node name
    procfs: str = "/proc"  # the host's /proc (mount it, e.g. /host/proc, when running in a container)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    nvml: NvmlSettings = Field(default_factory=NvmlSettings)
    host: HostSettings = Field(default_factory=HostSettings)
