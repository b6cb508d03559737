from __future__ import annotations

from pathlib import Path

import pytest

from proxy.agent.config import AgentConfig
from proxy.config import load
from proxy.errors import ConfigError


def agent_config(env: dict[str, str] | None = None, file: Path | None = None, **flags: object) -> AgentConfig:
    return load(AgentConfig, file=file, env=env or {}, env_prefix="INFERMON_AGENT_", flags=flags)


def test_defaults() -> None:
    config = agent_config()
    assert config.listen == "0.0.0.0:9465"
    assert config.interval == 10.0
    assert config.procfs == "/proc"
    assert config.hostname
    assert config.nvml.enabled
    assert config.nvml.xid_events
    assert config.nvml.processes
    assert (config.nvml.backoff_initial, config.nvml.backoff_max) == (10.0, 300.0)
    assert config.nvml.pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert config.host.enabled


def test_layers_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("interval: 5\nhostname: from-file\nnvml:\n  backoff_max: 60\nhost:\n  enabled: false\n")
    config = agent_config(
        {
            "INFERMON_AGENT_HOSTNAME": "node-7",
            "INFERMON_AGENT_NVML__XID_EVENTS": "false",
            "INFERMON_AGENT_NVML__POD_RESOURCES_SOCKET": "/run/kubelet.sock",
        },
        file=path,
        interval=2.5,
    )
    assert config.interval == 2.5
    assert config.hostname == "node-7"
    assert config.nvml.backoff_max == 60
    assert config.nvml.xid_events is False
    assert config.nvml.pod_resources_socket == "/run/kubelet.sock"
    assert config.host.enabled is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INFERMON_AGENT_LISTEN": "9465"}, "listen = '9465' (from env INFERMON_AGENT_LISTEN)"),
        ({"INFERMON_AGENT_INTERVAL": "0"}, "interval"),
        ({"INFERMON_AGENT_NVML__BACKOFF_INITIAL": "400"}, "backoff_max must be at least backoff_initial"),
        ({"INFERMON_AGENT_HOST__DISK_EXCLUDE": "(["}, "host.disk_exclude"),
        ({"INFERMON_AGENT_NVML__COLOUR": "x"}, "unknown key nvml.colour"),
        ({"INFERMON_AGENT_LOG_LEVEL": "loud"}, "log_level"),
    ],
)
def test_bad_values_raise_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="config error") as info:
        agent_config(env)
    assert message in str(info.value)


def test_frozen() -> None:
    config = agent_config()
    with pytest.raises(ValueError, match="frozen"):
        config.interval = 1.0


def test_unknown_section_names_its_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        agent_config(env={"INFERMON_AGENT_NVMLX__ENABLED": "false"})
    assert str(info.value).startswith("config error: unknown key nvmlx (from env INFERMON_AGENT_NVMLX__ENABLED)")
    assert "did you mean nvml?" in str(info.value)
    path = tmp_path / "agent.yaml"
    path.write_text("hosts:\n  enabled: false\n")
    with pytest.raises(ConfigError) as info:
        agent_config(file=path)
    assert f"unknown key hosts (from file {path})" in str(info.value)


def test_a_section_rule_names_where_its_keys_came_from() -> None:
    with pytest.raises(ConfigError) as info:
        agent_config(env={"INFERMON_AGENT_NVML__BACKOFF_MAX": "1"})
    assert "(from env INFERMON_AGENT_NVML__BACKOFF_MAX)" in str(info.value)
    assert "backoff_max must be at least backoff_initial" in str(info.value)
