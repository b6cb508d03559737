"""Sampling end to end: a running proxy, a real model-server stand-in, /drift, /metrics and the sinks."""

from __future__ import annotations

import asyncio
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web

from proxy.app import ProxyApp
from tests.conftest import ProxyFactory, Serve
from tests.helpers import TIMEOUT, Client, fetch, metric, scrape_metrics


async def model_server(serve: Serve) -> str:
    """KServe v1 and Open Inference Protocol v2 predict endpoints that answer one number per row."""

    async def v1(request: web.Request) -> web.Response:
        body = await request.json()
        rows = [r.values() if isinstance(r, dict) else r for r in body["instances"]]
        return web.json_response({"predictions": [int(sum(v for v in r if isinstance(v, float)) > 50) for r in rows]})

    async def v2(request: web.Request) -> web.Response:
        body = await request.json()
        n = body["inputs"][0]["shape"][0]
        out = {"name": "predict", "shape": [n], "datatype": "FP64", "data": [0.5] * n}
        return web.json_response({"model_name": "m", "outputs": [out]})

    app = web.Application()
    app.router.add_post("/v1/models/{name}:predict", v1)
    app.router.add_post("/v2/models/{name}/infer", v2)
    return await serve(app)


async def settle(app: ProxyApp) -> None:
    """Wait until the side path processed every sample queued so far, then have drift evaluate."""
    side = app.sampling.side
    assert side is not None
    assert await asyncio.to_thread(side.wait_idle, TIMEOUT)
    engine = app.sampling.engine
    if engine is not None:
        import time

        await asyncio.to_thread(engine.evaluate, time.time())


async def post_json(client: Client, path: str, data: Any, headers: dict[str, str] | None = None) -> int:
    body = orjson.dumps(data)
    resp = await client.request(
        "POST", path, headers={"Content-Type": "application/json", **(headers or {})}, body=body
    )
    return resp.status


async def drift(app: ProxyApp) -> dict[str, Any]:
    resp = await fetch(app.admin_address, "/drift")
    assert resp.status == 200
    data: dict[str, Any] = orjson.loads(resp.body)
    return data


def _features(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in report["columns"] if f["kind"] == "feature"}


def write_csv(path: Path, names: list[str], rows: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        w.writerows(rows.tolist())


async def build_profile(tmp_path: Path, names: list[str], rows: np.ndarray) -> Path:
    data = tmp_path / "train.csv"
    write_csv(data, names, rows)
    out = tmp_path / "profile.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "baseline", "build", str(data), "--out", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, err.decode()
    return out


async def test_drift_scenario_on_a_shipped_dataset(make_proxy: ProxyFactory, serve: Serve, tmp_path: Path) -> None:
    """Reference from one half of the wine dataset; the other half through the proxy, with two
    features shifted by one standard deviation and one rescaled: exactly those three drift."""
    from sklearn.datasets import load_wine

    data = load_wine()
    x = np.asarray(data.data, dtype=float)
    names = [n.replace("/", "_") for n in data.feature_names]
    rng = np.random.default_rng(7)
    order = rng.permutation(len(x))
    ref, live = x[order[: len(x) // 2]], x[order[len(x) // 2 :]].copy()
    shifted = {names[0]: 0, names[6]: 6}
    rescaled = {names[9]: 9}
    for i in shifted.values():
        live[:, i] += x[:, i].std()
    for i in rescaled.values():
        live[:, i] *= 1.8
    profile = await build_profile(tmp_path, names, ref)
    upstream = await model_server(serve)
    app = await make_proxy(
        upstream,
        sampling={"rate": 1.0},
        drift={"reference": str(profile), "min_samples": 30, "interval": 3600},
    )
    client = await Client.connect(app.proxy_address)
    for start in range(0, len(live), 4):  # batched: four instances per request, as rows of numbers
        assert (
            await post_json(client, "/v1/models/wine:predict", {"instances": live[start : start + 4].tolist()}) == 200
        )
    await settle(app)
    report = await drift(app)
    features = _features(report)
    flagged = {name for name, f in features.items() if f["drifted"] is True}
    assert flagged == set(shifted) | set(rescaled), {n: (f["method"], f["statistics"]) for n, f in features.items()}
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_samples_total") == -(-len(live) // 4)
    for name in flagged:
        assert metric(m, "infermon_feature_drifted", feature=name) == 1
    for name in set(names) - flagged:
        assert metric(m, "infermon_feature_drifted", feature=name) == 0


async def test_drift_says_off_when_sampling_is_off(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    report = await drift(app)
    assert report["enabled"] is False and "sample-rate" in report["reason"]


async def test_without_a_profile_the_first_samples_become_the_reference(make_proxy: ProxyFactory, serve: Serve) -> None:
    upstream = await model_server(serve)
    app = await make_proxy(
        upstream, sampling={"rate": 1.0}, drift={"reference_samples": 40, "min_samples": 20, "interval": 3600}
    )
    client = await Client.connect(app.proxy_address)
    rng = np.random.default_rng(1)
    for _ in range(10):
        rows = [{"age": float(a), "plan": "gold" if a > 40 else "basic"} for a in rng.normal(40, 10, 2)]
        assert await post_json(client, "/v1/models/churn:predict", {"instances": rows}) == 200
    await settle(app)
    report = await drift(app)
    assert report["reference"]["source"] == "first 40 samples"
    assert report["reference"]["status"] == "collecting"  # 20 of 40 rows collected
    assert report["reference"]["rows"] == 20
    for _ in range(30):
        rows = [{"age": float(a), "plan": "gold"} for a in rng.normal(70, 5, 2)]
        assert await post_json(client, "/v1/models/churn:predict", {"instances": rows}) == 200
    await settle(app)
    report = await drift(app)
    assert report["reference"]["status"] == "ready"
    features = _features(report)
    assert set(features) >= {"age", "plan"}


async def test_secrets_and_redacted_fields_never_reach_a_sink(
    make_proxy: ProxyFactory, serve: Serve, tmp_path: Path
) -> None:
    upstream = await model_server(serve)
    out = tmp_path / "samples.jsonl"
    app = await make_proxy(
        upstream,
        sampling={"rate": 1.0, "redact_fields": ["ssn"]},
        sinks={"jsonl": {"path": str(out)}},
        access_log={"redact_headers": ["x-customer"]},
    )
    client = await Client.connect(app.proxy_address)
    headers = {"Authorization": "Bearer s3cr3t-token", "Cookie": "session=c00kie", "X-Customer": "acme-corp"}
    rows = [{"age": 31.0, "ssn": "123-45-6789"}]
    assert await post_json(client, "/v1/models/churn:predict", {"instances": rows}, headers) == 200
    await settle(app)
    for sink in app.sampling.sinks:
        await sink.aclose()
    text = out.read_text()
    assert '"age"' in text
    for secret in ("s3cr3t-token", "c00kie", "acme-corp", "123-45-6789"):
        assert secret not in text
    report = orjson.dumps(await drift(app)).decode()
    assert "123-45-6789" not in report and "ssn" not in report


async def test_a_broken_body_is_counted_and_the_request_is_untouched(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, sampling={"rate": 1.0, "max_depth": 8})
    client = await Client.connect(app.proxy_address)
    resp = await client.request("POST", "/v1/models/m:predict", body=b"{not json")
    assert resp.status == 200  # the echo upstream answered; sampling never changes that
    deep = b'{"instances": ' + b"[" * 50 + b"1" + b"]" * 50 + b"}"
    resp = await client.request("POST", "/v1/models/m:predict", body=deep)
    assert resp.status == 200
    await settle(app)
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_samples_dropped_total", reason="unparsable") == 1
    assert metric(m, "infermon_samples_dropped_total", reason="hostile") == 1
    assert metric(m, "infermon_samples_total") == 0


async def test_llm_usage_is_counted_for_every_request(make_proxy: ProxyFactory, serve: Serve) -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
        if not body.get("stream"):
            return web.json_response({"model": body["model"], "choices": [{"finish_reason": "stop"}], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(5):
            chunk = {"model": body["model"], "choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: " + orjson.dumps({"model": body["model"], "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app_ = web.Application()
    app_.router.add_post("/v1/chat/completions", chat)
    app = await make_proxy(await serve(app_))  # sampling off: usage is counted anyway
    client = await Client.connect(app.proxy_address)
    for stream in (False, True, False):
        payload = {"model": "llama", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        assert await post_json(client, "/v1/chat/completions", payload) == 200
    await settle(app)
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_llm_tokens_total", model="llama", kind="prompt") == 33
    assert metric(m, "infermon_llm_tokens_total", model="llama", kind="completion") == 15
    assert metric(m, "infermon_llm_time_per_output_token_seconds_count", model="llama") == 1


@pytest.mark.parametrize("rate", [0.1])
async def test_sampling_rate_is_honoured(make_proxy: ProxyFactory, serve: Serve, rate: float) -> None:
    upstream = await model_server(serve)
    app = await make_proxy(upstream, sampling={"rate": rate})
    client = await Client.connect(app.proxy_address)
    n = 600
    for _ in range(n):
        assert await post_json(client, "/v1/models/m:predict", {"instances": [[1.0, 2.0]]}) == 200
    await settle(app)
    m = await scrape_metrics(app.admin_address)
    got = metric(m, "infermon_samples_total")
    # binomial(600, 0.1): mean 60, sd 7.3; 6 sd either side
    assert 16 <= got <= 104


def test_a_proxy_without_sampling_never_loads_numpy() -> None:
    """numpy (and the drift engine) cost ~15 MB of RSS: only a proxy that samples loads them."""
    import subprocess

    code = (
        "import sys\n"
        "from proxy import cli\n"
        "cli.build_parser()\n"
        "from proxy.app import ProxyApp\n"
        "from proxy.settings import ProxyConfig\n"
        "ProxyApp(ProxyConfig())\n"
        "assert 'numpy' not in sys.modules, 'numpy loaded'\n"
        "assert 'proxy.drift.engine' not in sys.modules\n"
        "ProxyApp(ProxyConfig.model_validate({'sampling': {'rate': 0.5}}))\n"
        "assert 'numpy' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


async def test_drift_per_variant_through_a_split(make_proxy: ProxyFactory, serve: Serve) -> None:
    """A canary upstream beside stable: the reference comes from stable's first rows only (the
    canary's rows meanwhile are dropped and counted), and only the canary, whose inputs shifted,
    drifts."""
    upstream = await model_server(serve)
    app = await make_proxy(
        upstream,
        upstreams={"canary": upstream},
        split={"weights": {"stable": 100, "canary": 0}, "force_header": "x-infermon-variant"},
        sampling={"rate": 1.0},
        drift={"reference_samples": 40, "min_samples": 20, "interval": 3600},
    )
    client = await Client.connect(app.proxy_address)
    rng = np.random.default_rng(3)
    canary = {"X-Infermon-Variant": "canary"}

    async def send(n: int, loc: float, headers: dict[str, str] | None = None) -> None:
        for _ in range(n):
            rows = [{"age": float(a)} for a in rng.normal(loc, 10, 2)]
            assert await post_json(client, "/v1/models/churn:predict", {"instances": rows}, headers) == 200

    await send(5, 70.0, canary)  # while the reference is collected: not part of it
    await send(20, 40.0)  # stable's 40 rows: the reference
    await send(15, 40.0)
    await send(15, 70.0, canary)
    await settle(app)
    report = await drift(app)
    assert (report["reference"]["status"], report["reference"]["variant"]) == ("ready", "stable")
    assert report["other"]["rows_dropped"] == {"collecting": 10, "variant_budget": 0, "invalid_variant": 0}
    assert report["variant"] == "stable"
    assert report["drifted"] == []
    assert _features(report)["age"]["window_rows"] == 30
    variants = report["variants"]
    assert set(variants) == {"stable", "canary"}
    assert variants["stable"]["drifted"] == [] and variants["stable"]["window_rows"] == {"age": 30, "prediction": 30}
    assert variants["canary"]["drifted"] == ["age", "prediction"]
    assert variants["canary"]["window_rows"] == {"age": 30, "prediction": 30}
    age = next(c for c in variants["canary"]["columns"] if c["name"] == "age")
    assert age["statistics"]["ks"] < 1e-6
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_feature_drifted", variant="stable", feature="age") == 0
    assert metric(m, "infermon_feature_drifted", variant="canary", feature="age") == 1
    assert metric(m, "infermon_drift_window_rows", variant="canary", feature="age") == 30
    assert metric(m, "infermon_feature_bin_total", variant="canary", feature="age") == 30
    assert metric(m, "infermon_drift_rows_dropped_total", reason="collecting") == 10
    engine = app.sampling.engine
    assert engine is not None
    summary = engine.summary()
    assert summary["canary"].drifted_features == ("age",) and summary["canary"].drifted_predictions == ("prediction",)
    assert summary["stable"].drifted_features == () and summary["stable"].rows == 30
