"""The scores logged to a real MLflow tracking server, read back through its REST API."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from proxy.quality.mlflow import auth_headers, metric_key
from tests.conftest import ProxyFactory, Serve
from tests.helpers import TIMEOUT, Client, free_port, metric, scrape_metrics
from tests.quality.test_observer import QUALITY, label_set, model_server, post_feedback, predict, quality, settle

API = "/api/2.0/mlflow"


async def rest(session: aiohttp.ClientSession, url: str, method: str, path: str, **kw: Any) -> Any:
    async with session.request(method, f"{url}{API}/{path}", timeout=aiohttp.ClientTimeout(total=TIMEOUT), **kw) as r:
        assert r.status == 200, await r.text()
        return await r.json()


@pytest.mark.timeout(300)  # the session's server may start within this test
async def test_scores_reach_mlflow_one_run_per_model_version(
    make_proxy: ProxyFactory, serve: Serve, mlflow_server: str
) -> None:
    upstream, models = await model_server(serve)
    cfg = {**QUALITY, "mlflow": {"tracking_uri": mlflow_server, "experiment": "infermon-test", "interval": 3600}}
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=cfg, labels={"version": "v7"})
    x, y = models["iris"].data.tolist()[:60], models["iris"].target.tolist()[:60]
    client = await Client.connect(app.proxy_address)
    ids = [await predict(client, "iris", [row]) for row in x]
    await settle(app)
    items = [{"request_id": r, "label": v} for r, v in zip(ids, y, strict=True)]
    status, _ = await post_feedback(app, orjson.dumps(items))
    assert status == 200
    assert app.quality is not None and app.quality.exporter is not None
    await app.quality.evaluate()
    exporter = app.quality.exporter
    assert await exporter.export(), exporter.last_error
    assert await exporter.export(), exporter.last_error  # a second step, into the same run
    w = label_set(await quality(app), "iris", "classification")["windows"]["1h"]

    async with aiohttp.ClientSession() as session:
        experiment = await rest(
            session, mlflow_server, "GET", "experiments/get-by-name", params={"experiment_name": "infermon-test"}
        )
        eid = experiment["experiment"]["experiment_id"]
        runs = (await rest(session, mlflow_server, "POST", "runs/search", json={"experiment_ids": [eid]}))["runs"]
        assert len(runs) == 1
        run = runs[0]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["infermon.model"] == "iris" and tags["infermon.version"] == "v7"
        assert tags["infermon.variant"] == "stable"
        assert run["info"]["run_name"] == "iris v7"
        logged = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert logged["accuracy.1h"] == pytest.approx(w["scores"]["accuracy"], abs=1e-12)
        assert logged["f1_macro.1h"] == pytest.approx(w["scores"]["f1_macro"], abs=1e-12)
        assert logged["labels.1h"] == 60
        assert logged["recall.2.1h"] == pytest.approx(w["classes"]["2"]["recall"], abs=1e-12)
        history = await rest(
            session,
            mlflow_server,
            "GET",
            "metrics/get-history",
            params={"run_id": run["info"]["run_id"], "metric_key": "accuracy.1h"},
        )
        assert sorted(h["step"] for h in history["metrics"]) == [1, 2]

        # a proxy started again finds its run by the tags instead of making another
        again = await make_proxy(upstream, feedback={"enabled": True}, quality=cfg, labels={"version": "v7"})
        ids = [await predict(await Client.connect(again.proxy_address), "iris", [row]) for row in x[:30]]
        await settle(again)
        await post_feedback(again, orjson.dumps([{"request_id": r, "label": 0} for r in ids]))
        assert again.quality is not None and again.quality.exporter is not None
        await again.quality.evaluate()
        assert await again.quality.exporter.export(), again.quality.exporter.last_error
        runs = (await rest(session, mlflow_server, "POST", "runs/search", json={"experiment_ids": [eid]}))["runs"]
        assert len(runs) == 1
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_mlflow_exports_total", outcome="ok") == 2
    assert metric(metrics, "infermon_mlflow_exports_total", outcome="failed") == 0


async def test_a_tracking_server_that_is_down_is_counted_and_blocks_nothing(
    make_proxy: ProxyFactory, serve: Serve
) -> None:
    upstream, models = await model_server(serve)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = {**QUALITY, "mlflow": {"tracking_uri": down, "interval": 3600, "timeout": 2}}
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=cfg)
    client = await Client.connect(app.proxy_address)
    ids = [await predict(client, "iris", [row]) for row in models["iris"].data.tolist()[:3]]
    await settle(app)
    await post_feedback(app, orjson.dumps([{"request_id": r, "label": 0} for r in ids]))
    assert app.quality is not None and app.quality.exporter is not None
    await app.quality.evaluate()
    assert not await app.quality.exporter.export()
    assert await predict(client, "iris", [[5.0, 3.0, 1.5, 0.2]])  # the data plane goes on
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_mlflow_exports_total", outcome="failed") == 1
    report = await quality(app)
    assert report["mlflow"]["exports"] == {"ok": 0, "failed": 1}
    assert report["mlflow"]["last_error"]


def test_auth_comes_from_mlflows_own_variables() -> None:
    assert auth_headers({"MLFLOW_TRACKING_TOKEN": "t0k"}) == {"Authorization": "Bearer t0k"}
    basic = auth_headers({"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"})
    assert basic == {"Authorization": "Basic dTpw"}
    assert auth_headers({}) == {}


def test_metric_keys_are_what_mlflow_accepts() -> None:
    key = metric_key("f1", "Iris setosa (big)", "1h")
    assert key.startswith("f1.Iris setosa _big__") and key.endswith(".1h") and len(key) == len("f1..1h") + 24
    assert metric_key("accuracy", "1h") == "accuracy.1h" and metric_key("f1", "setosa", "1d") == "f1.setosa.1d"


async def test_a_failure_log_masks_the_password_of_the_tracking_uri(caplog: pytest.LogCaptureFixture) -> None:
    """quality.mlflow.tracking_uri may carry user:password@: /config masks it, and so must the log."""
    import logging

    from proxy.quality.mlflow import MlflowExporter
    from proxy.quality.scores import Labelled, ScoresEngine
    from proxy.settings import Mlflow, Quality

    engine = ScoresEngine(Quality(min_labels=1))
    engine.add([Labelled(("m", "v", "stable"), "classification", "1", "1", 1000.0)])
    engine.evaluate(1001.0)
    uri = f"http://alice:s3cret-pw@127.0.0.1:{free_port()}"  # nothing listens there
    exporter = MlflowExporter(Mlflow(tracking_uri=uri, timeout=2), engine)
    try:
        with caplog.at_level(logging.WARNING, logger="infermon.quality"):
            assert not await exporter.export()
    finally:
        await exporter.aclose()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "MLflow export to http://alice:***@127.0.0.1" in logged
    assert "s3cret-pw" not in logged and "s3cret-pw" not in (exporter.last_error or "")


#: class names a model or a label may bring that MLflow's key rules refuse as they are: a colon (not
#: on a Windows server), a path that normalises to another ('//', '/../', '/./'), a leading '/'
ODD_CLASSES = ("a//b", "x/../y", "p/./q", "/root", "ratio:1", "猫", "é", "plain")


def test_metric_keys_from_odd_class_names_pass_mlflows_rules() -> None:
    import posixpath
    import re

    allowed = re.compile(r"^[/\w.\- ]*$")  # MLflow's rule on Windows, the strictest of its servers
    keys = [metric_key("f1", c, "1h") for c in ODD_CLASSES]
    for key in keys:
        assert allowed.match(key), key
        assert posixpath.normpath(key) == key and not key.startswith(("/", "..")), key
    assert metric_key("f1", "猫", "1h") == "f1.猫.1h"  # letters of any script are alphanumerics to MLflow
    assert metric_key("f1", "animals/cat", "1h") == "f1.animals/cat.1h"  # a slash that stays a slash
    keys += [metric_key("f1", "a_b", "1h"), metric_key("f1", "a/b", "1h"), metric_key("f1", "a:b", "1h")]
    assert len(set(keys)) == len(keys)  # no two classes logged under one key
    long = "c" * 256  # the longest class text: the window must survive MLflow's 250 characters
    one, two = metric_key("precision", long, "1h"), metric_key("precision", long, "1d")
    assert len(one) <= 250 and one.endswith(".1h") and two.endswith(".1d")
    assert metric_key("precision", long[:-1] + "d", "1h") != one


@pytest.mark.timeout(300)  # the session's server may start within this test
async def test_odd_class_names_do_not_stop_the_export(mlflow_server: str) -> None:
    """One class name the server refuses made the whole runs/log-batch a 400, every time: nothing
    of that label set, nor of the ones after it, was logged again while the class was in a window."""
    from proxy.quality.mlflow import MlflowExporter
    from proxy.quality.scores import Labelled, ScoresEngine
    from proxy.settings import Mlflow, Quality

    engine = ScoresEngine(Quality(min_labels=1))
    engine.add(
        [Labelled(("odd", "v1", "stable"), "classification", c, c, 1000.0) for c in ODD_CLASSES]
        + [Labelled(("zz-after", "v1", "stable"), "classification", "1", "1", 1000.0)]
    )
    engine.evaluate(1001.0)
    exporter = MlflowExporter(Mlflow(tracking_uri=mlflow_server, experiment="infermon-odd"), engine)
    try:
        assert await exporter.export(), exporter.last_error
    finally:
        await exporter.aclose()
    async with aiohttp.ClientSession() as session:
        found = await rest(
            session, mlflow_server, "GET", "experiments/get-by-name", params={"experiment_name": "infermon-odd"}
        )
        eid = found["experiment"]["experiment_id"]
        runs = (await rest(session, mlflow_server, "POST", "runs/search", json={"experiment_ids": [eid]}))["runs"]
    assert len(runs) == 2
    odd = next(r for r in runs if {"key": "infermon.model", "value": "odd"} in r["data"]["tags"])
    logged = {m["key"] for m in odd["data"]["metrics"]}
    assert {metric_key("f1", c, "1h") for c in ODD_CLASSES} <= logged


@pytest.mark.timeout(300)  # the session's server may start within this test
async def test_a_restarted_proxy_goes_on_with_the_runs_steps(mlflow_server: str) -> None:
    """A proxy started again logs into the run it finds by its tags. Its steps must go on from the
    run's: MLflow shows a run's latest metric by the highest step, so steps starting again at 1
    kept the run showing the old figures until the new process had exported as often as the old."""
    from proxy.quality.mlflow import MlflowExporter
    from proxy.quality.scores import Labelled, ScoresEngine
    from proxy.settings import Mlflow, Quality

    cfg = Mlflow(tracking_uri=mlflow_server, experiment="infermon-restart")
    labels = ("restart", "v1", "stable")

    async def run_proxy(right: bool, exports: int) -> None:
        engine = ScoresEngine(Quality(min_labels=1))
        engine.add([Labelled(labels, "classification", "1", "1" if right else "0", 1000.0)])
        engine.evaluate(1001.0)
        exporter = MlflowExporter(cfg, engine)
        try:
            for _ in range(exports):
                assert await exporter.export(), exporter.last_error
        finally:
            await exporter.aclose()

    await run_proxy(right=False, exports=3)  # accuracy 0 at steps 1, 2, 3
    await run_proxy(right=True, exports=1)  # then the proxy restarts: accuracy 1
    async with aiohttp.ClientSession() as session:
        found = await rest(
            session, mlflow_server, "GET", "experiments/get-by-name", params={"experiment_name": "infermon-restart"}
        )
        eid = found["experiment"]["experiment_id"]
        (run,) = (await rest(session, mlflow_server, "POST", "runs/search", json={"experiment_ids": [eid]}))["runs"]
        latest = {m["key"]: m for m in run["data"]["metrics"]}
        assert latest["accuracy.1h"]["value"] == 1.0 and latest["accuracy.1h"]["step"] == 4
        history = await rest(
            session,
            mlflow_server,
            "GET",
            "metrics/get-history",
            params={"run_id": run["info"]["run_id"], "metric_key": "accuracy.1h"},
        )
        assert sorted(h["step"] for h in history["metrics"]) == [1, 2, 3, 4]
