"""The demo's set-up and summary in-process: the profile, the probes, the proxy's config, the lines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.demo.command import Options, Watcher, format_summary, proxy_config, record_probes, snapshot, write_profile
from proxy.demo.model import FEATURES, Models
from proxy.demo.model_server import build_model_app
from proxy.demo.traffic import TrafficStats
from proxy.drift.profile import load_profile
from proxy.probes import spec
from proxy.probes.command import PoolSender
from proxy.probes.runner import run_set
from tests.demo.conftest import serve


@pytest.fixture
async def servers(models: Models) -> AsyncIterator[tuple[str, str]]:
    async for stable in serve(build_model_app(models.stable, error_rate=0.0, delay=0.0, seed=1)):
        async for canary in serve(build_model_app(models.canary, version="2", error_rate=0.0, delay=0.0, seed=2)):
            yield stable, canary


def test_the_profile_is_the_training_data(models: Models, tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    write_profile(models, str(path))
    profile = load_profile(str(path))
    assert profile.columns() == list(FEATURES)
    assert [p.name for p in profile.predictions] == ["label"]
    assert profile.rows == len(models.x_train)
    for i, name in enumerate(FEATURES):
        feature = profile.get(name)
        assert feature is not None and feature.kind == "numeric"
        assert feature.mean == pytest.approx(float(models.x_train[:, i].mean()))


async def test_probes_recorded_from_stable_pass_on_it_and_fail_on_the_canary(
    servers: tuple[str, str], tmp_path: Path
) -> None:
    stable, canary = servers
    path = tmp_path / "probes.jsonl"
    await record_probes(stable, str(path))
    probes = spec.load(str(path))
    assert [p.name for p in probes] == ["iris-setosa", "iris-versicolor", "iris-virginica", "ready"]
    results = {}
    for name, url in (("stable", stable), ("canary", canary)):
        sender = PoolSender(url)
        try:
            outcomes = await run_set(sender, "stable", probes, concurrency=1, timeout=5.0, max_body_bytes=1 << 20,
                                     rel_tol=spec.DEFAULT_REL_TOL, abs_tol=spec.DEFAULT_ABS_TOL)  # fmt: skip
        finally:
            sender.close()
        results[name] = [o.ok for o in outcomes]
    assert results["stable"] == [True, True, True, True]
    assert results["canary"][-1] is True  # the health route
    assert not all(results["canary"][:3])  # other probabilities than stable's (its version is ignored)


async def test_the_proxy_config_validates(servers: tuple[str, str], models: Models, tmp_path: Path) -> None:
    stable, canary = servers
    write_profile(models, str(tmp_path / "profile.json"))
    await record_probes(stable, str(tmp_path / "probes.jsonl"))
    cfg = proxy_config(Options(), stable, canary, str(tmp_path / "profile.json"), str(tmp_path / "probes.jsonl"))
    assert cfg.upstreams == {"canary": canary} and cfg.split.weights == {"stable": 90, "canary": 10}
    assert cfg.feedback.enabled and cfg.sampling.rate == 1.0 and cfg.probes.file is not None
    assert cfg.canary.evaluate_every <= 2 and cfg.canary.min_requests <= 30
    assert cfg.drift.window_size >= cfg.drift.min_samples


def test_the_summary_before_any_evaluation(models: Models) -> None:
    """Nothing read yet (the first seconds, or an admin server that did not answer): no crash, dashes."""
    s = snapshot(TrafficStats(), Watcher("http://127.0.0.1:1", 0.0), models, 0.0, {})
    lines = format_summary(s)
    assert lines[0].startswith("0 requests, p50 -, p99 -, errors -")
    assert [line.split()[0] for line in lines[1:]] == ["drift", "canary", "scores", "probes"]
    assert s["canary"]["verdict"] is None and s["canary"]["first_fail_s"] is None
    assert s["models"]["stable"]["accuracy"] > s["models"]["canary"]["accuracy"]


def test_the_summary_reads_the_admin_documents(models: Models) -> None:
    watcher = Watcher("http://127.0.0.1:1", 1000.0)
    canary_variant = {
        "verdict": -1,
        "result": "fail",
        "reason": "r",
        "checks": {"errors": {"result": "pass"}, "quality": {"result": "fail"}},
    }
    stable_scores = {"labels": 40, "scores": {"accuracy": 0.9, "f1_macro": 0.8}}
    watcher.docs = {
        "canary": {
            "requests": {"stable": 90, "canary": 10},
            "variants": {"canary": canary_variant},
        },
        "drift": {"variants": {"stable": {"drifted": ["sepal_width", "label"], "insufficient": [], "rows": 300}}},
        "quality": {
            "label_sets": [
                {"variant": "stable", "task": "classification", "windows": {"10m": stable_scores}},
                {"variant": "canary", "task": "unlabelled", "windows": {}},
            ]
        },
        "probes": {"upstreams": {"stable": {"rounds": {"ok": 2}, "last_round": {"outcome": "ok", "passed": 4}}}},
    }
    watcher._note_verdict({"variants": {"canary": {"result": "fail"}}, "evaluated_at": 1006.04})
    s = snapshot(TrafficStats(), watcher, models, 10.0, {})
    assert s["drift"]["stable"]["drifted_features"] == ["sepal_width"]
    assert s["drift"]["stable"]["drifted_predictions"] == ["label"]
    assert s["canary"]["checks"] == {"errors": "pass", "quality": "fail"} and s["canary"]["first_fail_s"] == 6.0
    assert s["quality"] == {"stable": {"labels": 40, "accuracy": 0.9, "f1_macro": 0.8}}
    text = "\n".join(format_summary(s))
    assert "canary analysis: stable 90, canary 10" in text
    assert "stable sepal_width, label (300 rows)" in text
    assert "FAIL (errors pass, quality fail), failed first at 6 s" in text
    assert "stable accuracy 0.900, f1 0.800 (40 labels) | canary - (0 labels)" in text
    assert "stable ok (4 of 4 passed)" in text
