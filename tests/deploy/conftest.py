"""Fixtures of tests/deploy: the node agent on the stub NVML library, for the end-to-end alerting test."""

from tests.agent.conftest import start_agent, stub_nvml_dir  # noqa: F401 - fixtures, shared with tests/agent
