"""The example configurations in config/ stay valid as the schema grows."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.settings import ProxyConfig

EXAMPLES = sorted((Path(__file__).parent.parent / "config").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path: Path) -> None:
    cfg = config.load(ProxyConfig, file=path, env={})
    assert cfg.upstream.startswith("http")
