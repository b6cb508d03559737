"""proxy.sampling.setup: the /drift route on the admin server (review findings, issue 8)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from proxy.drift.profile import FeatureProfile, Profile
from proxy.errors import ConfigError
from proxy.sampling.setup import Sampling
from proxy.settings import ProxyConfig
from tests.conftest import ProxyFactory
from tests.helpers import TIMEOUT, fetch


def _wide_profile(path: Path, features: int = 200, categories: int = 1000) -> Path:
    """A valid profile: ``features`` categorical features of ``categories`` top values each (what
    ``infermon baseline build --top-k 1000`` makes of a wide table of identifiers)."""
    fps = []
    for j in range(features):
        counts = [5] * categories + [0]
        fps.append(
            FeatureProfile(
                name=f"f{j}", kind="categorical", count=sum(counts), missing=0, distinct=categories,
                categories=[f"value-{k}" for k in range(categories)], counts=counts,
            )
        )  # fmt: skip
    rows = 5 * categories
    path.write_bytes(Profile(fps, [], rows, "wide.csv", "2026-01-01T00:00:00Z").to_json())
    return path


async def test_drift_endpoint_does_not_stall_the_request_path(
    make_proxy: ProxyFactory, upstream: str, tmp_path: Path
) -> None:
    """The working rule: "the request path never waits on monitoring". /drift runs on the admin
    server, which shares the data plane's event loop; the handler deep-copies the whole report and
    serialises it (indented) on that loop (setup.py: engine.report() then json_response), where
    /metrics renders in a worker thread. With a legal profile (200 features x 1000 categories) one
    GET /drift holds the loop for hundreds of milliseconds (about 15 ms with the default top-k 20):
    every proxied request waits that long."""
    profile = _wide_profile(tmp_path / "profile.json")
    app = await make_proxy(upstream, sampling={"rate": 1.0}, drift={"reference": str(profile), "interval": 3600})
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    gaps: list[float] = []

    async def ticker() -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = loop.time()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    resp = await asyncio.wait_for(fetch(app.admin_address, "/drift"), TIMEOUT)
    done.set()
    await task
    assert resp.status == 200
    assert max(gaps) < 0.1, f"the event loop stalled {max(gaps) * 1000:.0f} ms serving /drift"


@pytest.mark.parametrize(
    ("config", "variant"),
    [
        ({}, None),  # one upstream: every variant's rows (there is only the default's)
        ({"upstreams": {"canary": "http://127.0.0.1:9"}}, "stable"),
        ({"upstreams": {"canary": "http://127.0.0.1:9"}, "canary": {"baseline": "canary"}}, "canary"),
        ({"labels": {"variant_header": "x-variant"}}, "stable"),
        ({"labels": {"variant_request_header": "x-variant"}, "canary": {"baseline": "blue"}}, "blue"),
    ],
)
def test_the_reference_variant_is_the_baseline_when_traffic_is_split(
    config: dict[str, Any], variant: str | None
) -> None:
    sampling = Sampling(ProxyConfig.model_validate({"sampling": {"rate": 1.0}, **config}))
    assert sampling.engine is not None
    report = sampling.engine.report()
    assert report["reference"]["variant"] == variant
    assert report["variant"] == (variant or "stable")


def test_the_default_variant_is_the_top_level_one_without_a_split() -> None:
    sampling = Sampling(ProxyConfig.model_validate({"sampling": {"rate": 1.0}, "labels": {"variant": "blue"}}))
    assert sampling.engine is not None
    assert sampling.engine.report()["variant"] == "blue"


def test_a_baseline_that_cannot_be_a_variant_is_a_config_error() -> None:
    cfg = ProxyConfig.model_validate(
        # a mesh names the variants (with a split, ProxyConfig itself refuses a baseline that is no upstream)
        {"sampling": {"rate": 1.0}, "labels": {"variant_request_header": "x-variant"}, "canary": {"baseline": "b\nad"}}
    )
    with pytest.raises(ConfigError, match=r"canary\.baseline = 'b\\nad': not a variant name"):
        Sampling(cfg)
