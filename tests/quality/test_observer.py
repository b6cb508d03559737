"""Model quality end to end: real models behind a running proxy, labels posted afterwards, the scores
read back from /quality and /metrics and compared with scikit-learn's."""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import shutil
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web
from sklearn import metrics as skm

from proxy.app import ProxyApp
from tests.conftest import ProxyFactory, Serve
from tests.helpers import TIMEOUT, Client, fetch, metric, scrape, scrape_metrics

TOL = 1e-9


def sk_log_loss(y: Any, proba: Any, labels: list[int]) -> float:
    if "y_proba" in inspect.signature(skm.log_loss).parameters:
        return float(skm.log_loss(y, y_proba=proba, labels=labels))
    return float(skm.log_loss(y, proba, labels=labels))


async def model_server(serve: Serve) -> tuple[str, dict[str, Any]]:
    """KServe v1 predict endpoints of models trained here: iris classes (ints), iris probabilities
    (vectors), diabetes (numbers)."""
    from sklearn.datasets import load_diabetes, load_iris
    from sklearn.linear_model import LinearRegression, LogisticRegression

    iris = load_iris()
    classifier = LogisticRegression(max_iter=200, C=0.05).fit(iris.data, iris.target)  # not perfect
    diabetes = load_diabetes()
    regressor = LinearRegression().fit(diabetes.data[:300], diabetes.target[:300])

    async def iris_classes(request: web.Request) -> web.Response:
        x = np.asarray((await request.json())["instances"], dtype=float)
        return web.json_response({"predictions": classifier.predict(x).tolist()})

    async def iris_proba(request: web.Request) -> web.Response:
        x = np.asarray((await request.json())["instances"], dtype=float)
        return web.json_response({"predictions": classifier.predict_proba(x).tolist()})

    async def diabetes_value(request: web.Request) -> web.Response:
        x = np.asarray((await request.json())["instances"], dtype=float)
        return web.json_response({"predictions": regressor.predict(x).tolist()})

    app = web.Application()
    app.router.add_post("/v1/models/iris:predict", iris_classes)
    app.router.add_post("/v1/models/iris-proba:predict", iris_proba)
    app.router.add_post("/v1/models/diabetes:predict", diabetes_value)
    url = await serve(app)
    return url, {"iris": iris, "classifier": classifier, "diabetes": diabetes, "regressor": regressor}


async def predict(client: Client, model: str, rows: list[list[float]], request_id: str | None = None) -> str:
    headers = {"Content-Type": "application/json"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    resp = await client.request(
        "POST", f"/v1/models/{model}:predict", headers=headers, body=orjson.dumps({"instances": rows})
    )
    assert resp.status == 200, resp.body
    rid = resp.header("x-request-id")
    assert rid
    return rid


async def post_feedback(
    app: ProxyApp, body: bytes, content_type: str = "application/json", token: str | None = None
) -> tuple[int, dict[str, Any]]:
    client = await Client.connect(app.admin_address)
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        resp = await client.request("POST", "/feedback", headers=headers, body=body)
    finally:
        await client.close()
    data: dict[str, Any] = orjson.loads(resp.body)
    return resp.status, data


async def settle(app: ProxyApp) -> None:
    """Every prediction queued so far stored, then the scores recomputed."""
    side = app.sampling.side
    assert side is not None and app.quality is not None
    assert await asyncio.to_thread(side.wait_idle, TIMEOUT)
    await app.quality.evaluate()


async def quality(app: ProxyApp) -> dict[str, Any]:
    resp = await fetch(app.admin_address, "/quality")
    assert resp.status == 200
    data: dict[str, Any] = orjson.loads(resp.body)
    return data


def label_set(report: dict[str, Any], model: str, task: str) -> dict[str, Any]:
    for s in report["label_sets"]:
        if s["model"] == model and s["task"] == task:
            found: dict[str, Any] = s
            return found
    raise AssertionError(f"no label set {model} {task} in {[(s['model'], s['task']) for s in report['label_sets']]}")


QUALITY = {"windows": {"1h": {"seconds": 3600, "max_labels": 10_000}}, "min_labels": 20, "interval": 3600}


async def test_classification_scores_match_sklearn(make_proxy: ProxyFactory, serve: Serve) -> None:
    """Every iris instance through the proxy (classes one per request, probabilities three per request),
    labels posted shuffled, some missing, some twice (the second one wrong: the first wins), some for
    ids the proxy never saw: /quality and /metrics give scikit-learn's figures."""
    upstream, models = await model_server(serve)
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=QUALITY)
    iris = models["iris"]
    x, y = iris.data.tolist(), iris.target.tolist()
    client = await Client.connect(app.proxy_address)
    ids = [await predict(client, "iris", [row]) for row in x]
    batches = [(await predict(client, "iris-proba", x[i : i + 3]), i) for i in range(0, len(x), 3)]
    await settle(app)

    rng = random.Random(5)
    keep = [i for i in range(len(x)) if rng.random() > 0.15]  # about 15% never get a label
    first_labels: list[dict[str, Any]] = [{"request_id": ids[i], "label": y[i]} for i in keep]
    proba_keep = [i for i in range(len(x)) if rng.random() > 0.2]
    for i in proba_keep:
        rid, start = batches[i // 3]
        first_labels.append({"request_id": rid, "instance": i - start, "label": y[i]})
    # then wrong second labels (the first wins) and ids the proxy never saw
    later: list[dict[str, Any]] = [{"request_id": ids[i], "label": (y[i] + 1) % 3} for i in rng.sample(keep, 15)]
    later += [{"request_id": f"never-seen-{n}", "label": 1} for n in range(7)]
    rng.shuffle(first_labels)
    rng.shuffle(later)
    half = len(first_labels) // 2
    status, answer = await post_feedback(app, orjson.dumps(first_labels[:half]))
    assert status == 200, answer
    lines = b"\n".join(orjson.dumps(it) for it in first_labels[half:]) + b"\n"
    status, answer2 = await post_feedback(app, lines, "application/x-ndjson")
    assert status == 200, answer2
    status, answer3 = await post_feedback(app, b"\n".join(orjson.dumps(it) for it in later))  # JSON lines, found
    assert status == 200, answer3
    assert answer3["outcomes"] == {
        "joined": 0, "supplied": 0, "unknown": 7, "duplicate": 15, "late": 0, "no_prediction": 0,
    }  # fmt: skip
    assert answer["outcomes"]["joined"] + answer2["outcomes"]["joined"] == len(keep) + len(proba_keep)
    await app.quality.evaluate()  # type: ignore[union-attr]
    report = await quality(app)

    classifier = models["classifier"]
    truth = np.array([y[i] for i in keep])
    predicted = classifier.predict(np.array([x[i] for i in keep]))
    w = label_set(report, "iris", "classification")["windows"]["1h"]
    assert w["labels"] == len(keep)
    assert w["predictions"] == len(x) and w["labelled_predictions"] == len(keep)
    assert abs(w["scores"]["join_rate"] - len(keep) / len(x)) < TOL
    assert abs(w["scores"]["accuracy"] - skm.accuracy_score(truth, predicted)) < TOL
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        assert abs(w["scores"][f"{name}_macro"] - fn(truth, predicted, average="macro", zero_division=0)) < TOL
        per = fn(truth, predicted, average=None, labels=[0, 1, 2], zero_division=0)
        for c in range(3):
            assert abs(w["classes"][str(c)][name] - per[c]) < TOL
    assert w["confusion"]["classes"] == ["0", "1", "2"]
    assert w["confusion"]["matrix"] == skm.confusion_matrix(truth, predicted, labels=[0, 1, 2]).tolist()
    assert "roc_auc" not in w["scores"] and "scores" in w["missing"]["roc_auc"]  # classes only: no AUC, said so

    p_truth = np.array([y[i] for i in proba_keep])
    proba = classifier.predict_proba(np.array([x[i] for i in proba_keep]))
    wp = label_set(report, "iris-proba", "classification")["windows"]["1h"]
    assert wp["labels"] == len(proba_keep) and wp["scored"] == len(proba_keep)
    assert abs(wp["scores"]["accuracy"] - skm.accuracy_score(p_truth, proba.argmax(axis=1))) < TOL
    auc = skm.roc_auc_score(p_truth, proba, multi_class="ovr", average="macro")
    assert abs(wp["scores"]["roc_auc"] - auc) < TOL
    assert abs(wp["scores"]["log_loss"] - sk_log_loss(p_truth, proba, [0, 1, 2])) < TOL
    assert wp["predictions"] == len(x)  # instances, not requests

    metrics = await scrape_metrics(app.admin_address)
    labels = {"model": "iris", "version": "unknown", "variant": "stable", "window": "1h"}
    score = metrics["infermon_model_score"]
    assert abs(metric(metrics, "infermon_model_score", metric="accuracy", **labels) - w["scores"]["accuracy"]) < TOL
    assert not any(dict(k).get("metric") == "roc_auc" and dict(k)["model"] == "iris" for k in score)
    proba_labels = {**labels, "model": "iris-proba"}
    assert abs(metric(metrics, "infermon_model_score", metric="roc_auc", **proba_labels) - auc) < TOL
    assert metric(metrics, "infermon_model_score_labels", **labels) == len(keep)
    matrix = w["confusion"]["matrix"]
    assert metric(metrics, "infermon_model_confusion", actual="2", predicted="1", **labels) == matrix[2][1]
    assert metric(metrics, "infermon_model_class_score", metric="f1", **{"class": "0"}, **labels) == pytest.approx(
        w["classes"]["0"]["f1"], abs=TOL
    )
    assert metric(metrics, "infermon_feedback_total", outcome="joined") == len(keep) + len(proba_keep)
    assert metric(metrics, "infermon_feedback_total", outcome="duplicate") == 15
    assert metric(metrics, "infermon_feedback_total", outcome="unknown") == 7
    assert metric(metrics, "infermon_feedback_predictions_total") == len(x) + len(batches)
    # fully labelled requests left the store; the rest still wait
    waiting = (len(x) - len(keep)) + len({i // 3 for i in range(len(x)) if i not in set(proba_keep)})
    assert metric(metrics, "infermon_feedback_store_entries") == waiting
    assert metric(metrics, "infermon_feedback_delay_seconds_count", model="iris") == len(keep)


async def test_regression_scores_match_sklearn(make_proxy: ProxyFactory, serve: Serve) -> None:
    upstream, models = await model_server(serve)
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=QUALITY)
    data = models["diabetes"]
    x, y = data.data[300:].tolist(), data.target[300:].tolist()
    client = await Client.connect(app.proxy_address)
    ids = [await predict(client, "diabetes", [row], request_id=f"client-id-{i}") for i, row in enumerate(x)]
    assert ids == [f"client-id-{i}" for i in range(len(x))]  # the client's own ids are the keys
    await settle(app)
    rng = random.Random(11)
    keep = [i for i in range(len(x)) if rng.random() > 0.25]
    items = [{"request_id": ids[i], "value": y[i]} for i in keep]
    items += [{"request_id": ids[i], "value": 0.0} for i in keep[:9]]  # duplicates, ignored
    items += [{"request_id": "nope", "value": 1.0}]
    rng.shuffle(items)
    first: dict[str, float] = {}
    for it in items:
        first.setdefault(str(it["request_id"]), float(it["value"]))
    status, answer = await post_feedback(app, orjson.dumps(items))
    assert status == 200, answer
    await app.quality.evaluate()  # type: ignore[union-attr]
    w = label_set(await quality(app), "diabetes", "regression")["windows"]["1h"]
    truth = np.array([first[ids[i]] for i in keep])
    predicted = models["regressor"].predict(np.array([x[i] for i in keep]))
    assert w["labels"] == len(keep)
    assert abs(w["scores"]["mae"] - skm.mean_absolute_error(truth, predicted)) < TOL
    assert abs(w["scores"]["rmse"] - np.sqrt(skm.mean_squared_error(truth, predicted))) < TOL
    assert abs(w["scores"]["mape"] - skm.mean_absolute_percentage_error(truth, predicted)) < TOL
    assert abs(w["scores"]["r2"] - skm.r2_score(truth, predicted)) < TOL
    assert abs(w["scores"]["join_rate"] - len(keep) / len(x)) < TOL
    metrics = await scrape_metrics(app.admin_address)
    r2 = metric(metrics, "infermon_model_score", metric="r2", model="diabetes", window="1h")
    assert abs(r2 - skm.r2_score(truth, predicted)) < TOL


async def test_sampled_requests_feed_the_store_too(make_proxy: ProxyFactory, serve: Serve) -> None:
    """With sampling at 1.0 every prediction reaches the store through its sample, once."""
    upstream, models = await model_server(serve)
    app = await make_proxy(upstream, feedback={"enabled": True}, sampling={"rate": 1.0}, quality=QUALITY)
    x = models["iris"].data.tolist()[:30]
    client = await Client.connect(app.proxy_address)
    ids = [await predict(client, "iris", [row]) for row in x]
    await settle(app)
    status, answer = await post_feedback(app, orjson.dumps([{"request_id": rid, "label": 0} for rid in ids]))
    assert status == 200 and answer["outcomes"]["joined"] == 30
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_feedback_predictions_total") == 30
    assert metric(metrics, "infermon_samples_total") == 30


async def test_too_few_labels_say_so(make_proxy: ProxyFactory, serve: Serve) -> None:
    upstream, models = await model_server(serve)
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=QUALITY)
    client = await Client.connect(app.proxy_address)
    ids = [await predict(client, "iris", [row]) for row in models["iris"].data.tolist()[:5]]
    await settle(app)
    status, _ = await post_feedback(app, orjson.dumps([{"request_id": rid, "label": 0} for rid in ids]))
    assert status == 200
    await app.quality.evaluate()  # type: ignore[union-attr]
    w = label_set(await quality(app), "iris", "classification")["windows"]["1h"]
    assert w["labels"] == 5
    assert set(w["scores"]) == {"join_rate"}
    assert "fewer than quality.min_labels (20)" in w["missing"]["accuracy"]
    metrics = await scrape_metrics(app.admin_address)
    assert not any(dict(k)["metric"] == "accuracy" for k in metrics.get("infermon_model_score", {}))
    assert metric(metrics, "infermon_model_score_labels", model="iris") == 5


BAD_BODIES: list[tuple[bytes, str, int | None, str | None, str]] = [
    (b"", "application/json", None, None, "empty"),
    (b"{nope", "application/json", None, None, "not JSON"),
    (b"42", "application/json", None, None, "JSON object"),
    (b'[{"request_id": "a", "label": 1}, 7]', "application/json", 1, None, "JSON object"),
    (b'[{"request_id": "a", "label": 1}, {"label": 1}]', "application/json", 1, "request_id", "missing"),
    (b'[{"request_id": "a"}]', "application/json", 0, "label", "exactly one"),
    (b'[{"request_id": "a", "label": 1, "value": 2}]', "application/json", 0, "value", "exactly one"),
    (b'[{"request_id": "a", "label": [1]}]', "application/json", 0, "label", "a class"),
    (b'[{"request_id": "a", "value": "x"}]', "application/json", 0, "value", "finite number"),
    (b'[{"request_id": "a", "label": 1, "instance": -1}]', "application/json", 0, "instance", "whole number"),
    (b'[{"request_id": "a", "label": 1, "lable": 2}]', "application/json", 0, "lable", "unknown key"),
    (b'[{"request_id": "a", "label": 1, "scores": [0.5, 2]}]', "application/json", 0, "scores", "from 0 to 1"),
    (b'[{"request_id": "a", "label": 1, "model": "m"}]', "application/json", 0, "model", "send prediction"),
    (b'[{"request_id": 12, "label": 1}]', "application/json", 0, "request_id", "string"),
    (b'{"request_id": "a", "label": 1}\n{"request_id": "b", "label": 1\n', "application/x-ndjson", 1, None, "line 2"),
]


@pytest.mark.parametrize(("body", "ctype", "index", "key", "says"), BAD_BODIES)
async def test_a_bad_body_names_the_item_and_applies_nothing(
    make_proxy: ProxyFactory, serve: Serve, body: bytes, ctype: str, index: int | None, key: str | None, says: str
) -> None:
    upstream, models = await model_server(serve)
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=QUALITY)
    client = await Client.connect(app.proxy_address)
    rid = await predict(client, "iris", models["iris"].data.tolist()[:1], request_id="a")
    await settle(app)
    status, error = await post_feedback(app, body, ctype)
    assert status == 400
    assert says in error["error"]
    assert error["index"] == index and error["key"] == key
    assert app.quality is not None
    stats = app.quality.store.stats()
    assert stats["entries"] == 1 and sum(stats["feedback"].values()) == 0  # nothing applied
    status, answer = await post_feedback(app, orjson.dumps({"request_id": rid, "label": 0}))
    assert status == 200 and answer["outcomes"]["joined"] == 1  # and nothing lost


async def test_a_full_store_evicts_the_oldest_and_counts_it(make_proxy: ProxyFactory, serve: Serve) -> None:
    upstream, models = await model_server(serve)
    app = await make_proxy(upstream, feedback={"enabled": True, "max_entries": 5}, quality=QUALITY)
    client = await Client.connect(app.proxy_address)
    ids = [await predict(client, "iris", [row]) for row in models["iris"].data.tolist()[:8]]
    await settle(app)
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_feedback_store_entries") == 5
    assert metric(metrics, "infermon_feedback_store_evicted_total", reason="full") == 3
    status, answer = await post_feedback(app, orjson.dumps([{"request_id": rid, "label": 0} for rid in ids]))
    assert status == 200
    assert answer["outcomes"]["late"] == 3 and answer["outcomes"]["joined"] == 5
    status, answer = await post_feedback(
        app, orjson.dumps({"request_id": ids[0], "label": 0, "prediction": 0, "model": "iris"})
    )
    assert answer["outcomes"]["supplied"] == 1  # a late label with its own prediction still counts


async def test_the_token_guards_feedback_and_large_bodies_get_413(make_proxy: ProxyFactory, serve: Serve) -> None:
    upstream, _ = await model_server(serve)
    token = "0123456789abcdef0123456789"
    app = await make_proxy(
        upstream, admin={"token": token}, feedback={"enabled": True, "max_body_bytes": 2048}, quality=QUALITY
    )
    body = orjson.dumps({"request_id": "x", "label": 1})
    status, error = await post_feedback(app, body)
    assert status == 401 and "Bearer" in error["error"]
    status, error = await post_feedback(app, body, token="wrong-token-0123456789")
    assert status == 401
    status, answer = await post_feedback(app, body, token=token)
    assert status == 200 and answer["outcomes"]["unknown"] == 1
    big = orjson.dumps([{"request_id": f"id-{i}", "label": 1} for i in range(200)])
    status, error = await post_feedback(app, big, token=token)
    assert status == 413 and error["limit"] == 2048
    resp = await fetch(app.admin_address, "/quality")
    assert resp.status == 200  # reading takes no token


async def test_quality_says_when_feedback_is_off(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    data = orjson.loads((await fetch(app.admin_address, "/quality")).body)
    assert data["enabled"] is False and "--feedback" in data["reason"]
    status, error = await post_feedback(app, b'{"request_id": "a", "label": 1}')
    assert status == 404 and "--feedback" in error["error"]


async def test_summary_gives_the_canary_accuracy_per_variant(make_proxy: ProxyFactory, serve: Serve) -> None:
    upstream, models = await model_server(serve)
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=QUALITY)
    x, y = models["iris"].data.tolist()[:40], models["iris"].target.tolist()[:40]
    client = await Client.connect(app.proxy_address)
    ids = [await predict(client, "iris", [row]) for row in x]
    await settle(app)
    await post_feedback(app, orjson.dumps([{"request_id": r, "label": v} for r, v in zip(ids, y, strict=True)]))
    assert app.quality is not None
    await app.quality.evaluate()
    summary = app.quality.engine.summary()
    predicted = models["classifier"].predict(np.array(x))
    assert summary["stable"]["metric"] == "accuracy" and summary["stable"]["labels"] == 40
    assert abs(summary["stable"]["value"] - skm.accuracy_score(y, predicted)) < TOL


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
async def test_promtool_accepts_the_quality_exposition(make_proxy: ProxyFactory, serve: Serve) -> None:
    assert PROMTOOL is not None
    upstream, models = await model_server(serve)
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=QUALITY)
    x, y = models["iris"].data.tolist()[::3], models["iris"].target.tolist()[::3]
    client = await Client.connect(app.proxy_address)
    ids = [await predict(client, "iris-proba", [row]) for row in x]
    await settle(app)
    await post_feedback(app, orjson.dumps([{"request_id": r, "label": v} for r, v in zip(ids, y, strict=True)]))
    assert app.quality is not None
    await app.quality.evaluate()
    _, text = await scrape(app.admin_address)
    assert 'infermon_model_score{metric="roc_auc"' in text
    proc = await asyncio.create_subprocess_exec(
        PROMTOOL, "check", "metrics", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), TIMEOUT)
    assert proc.returncode == 0, out.decode()
    assert out.decode().strip() == ""


def test_the_feedback_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.cli import build_parser
    from proxy.dataplane.command import load_config

    for name in [k for k in os.environ if k.startswith("INFERMON_")]:
        monkeypatch.delenv(name)
    assert load_config(build_parser().parse_args(["proxy", "--feedback"])).feedback.enabled is True
    assert load_config(build_parser().parse_args(["proxy"])).feedback.enabled is False


async def test_scores_of_more_classes_than_max_classes_are_not_kept(make_proxy: ProxyFactory, serve: Serve) -> None:
    """A 1000-class softmax (an ImageNet model) cost about 32 KB per waiting request, 3 GB at the
    default feedback.max_entries, for scores no AUC or log loss is ever computed from (more classes
    than quality.max_classes). The predicted class is kept; the scores are not."""
    import tracemalloc

    k = 1000
    rng = np.random.default_rng(3)

    async def imagenet(request: web.Request) -> web.Response:
        n = len((await request.json())["instances"])
        proba = rng.dirichlet(np.ones(k), size=n)
        proba[:, 417] += 1.0  # the best class, always
        return web.json_response({"predictions": (proba / proba.sum(axis=1, keepdims=True)).tolist()})

    model = web.Application()
    model.router.add_post("/v1/models/imagenet:predict", imagenet)
    upstream = await serve(model)
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=QUALITY)
    assert app.quality is not None
    client = await Client.connect(app.proxy_address)
    tracemalloc.start()
    try:
        ids = [await predict(client, "imagenet", [[0.0]]) for _ in range(25)]
        await settle(app)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert app.quality.store.stats()["entries"] == 25
    assert held < 25 * 8_000  # the scores alone would be 25 x 32 KB
    status, answer = await post_feedback(app, orjson.dumps([{"request_id": r, "label": 417} for r in ids]))
    assert status == 200 and answer["outcomes"]["joined"] == 25
    await app.quality.evaluate()
    w = label_set(await quality(app), "imagenet", "classification")["windows"]["1h"]
    assert w["scores"]["accuracy"] == 1.0  # the class with the highest score was kept
    assert "quality.max_classes" in w["missing"]["roc_auc"]


async def test_a_label_posted_right_after_its_response_is_joined(make_proxy: ProxyFactory, serve: Serve) -> None:
    """The side path stores a prediction some milliseconds after its response (it polls its queue): a
    client that posts the label as soon as it has the answer must not find its id unknown."""
    upstream, models = await model_server(serve)
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=QUALITY)
    x, y = models["iris"].data.tolist()[:20], models["iris"].target.tolist()[:20]
    client = await Client.connect(app.proxy_address)
    ids = [await predict(client, "iris", [row]) for row in x]  # no settle: straight to the labels
    labels = [{"request_id": r, "label": v} for r, v in zip(ids, y, strict=True)]
    status, answer = await post_feedback(app, orjson.dumps(labels))
    assert status == 200 and answer["outcomes"]["joined"] == 20, answer
    rid = await predict(client, "iris", x[:1])
    status, answer = await post_feedback(app, orjson.dumps({"request_id": rid, "label": y[0]}))
    assert answer["outcomes"]["joined"] == 1, answer
    status, answer = await post_feedback(app, orjson.dumps({"request_id": "never-seen", "label": 1}))
    assert answer["outcomes"]["unknown"] == 1  # an id the proxy never answered is still unknown


async def test_a_body_of_the_largest_default_size_does_not_hold_the_event_loop(
    make_proxy: ProxyFactory, serve: Serve
) -> None:
    """A worker thread does not help a parse that holds the GIL: one orjson call over a 16 MiB body
    held the data plane's loop for over 100 ms, and its quarter-million items as long again in
    garbage collections. A body of the default feedback.max_body_bytes must leave the loop free."""
    import time

    from proxy.settings import Feedback

    upstream, _ = await model_server(serve)
    app = await make_proxy(upstream, feedback={"enabled": True}, quality=QUALITY)
    limit = Feedback().max_body_bytes
    one = len(orjson.dumps({"request_id": "3f2b8c1e-4d7a-4f0e-9b1a-000000000000", "label": 1})) + 1
    body = orjson.dumps(
        [{"request_id": f"3f2b8c1e-4d7a-4f0e-9b1a-{i:012d}", "label": i % 3} for i in range(limit // one - 1)]
    )
    assert limit // 2 < len(body) <= limit
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    import gc

    gc.freeze()  # the test process's heap (scikit-learn, numpy) is not the proxy's: a full collection of it
    try:  # takes longer than the body's work; the collections the body's own objects cause still count
        ticker = asyncio.create_task(tick())
        status, answer = await post_feedback(app, body)
        done.set()
        await ticker
    finally:
        gc.unfreeze()
    assert status == 200 and answer["outcomes"]["unknown"] == answer["items"]
    assert max(gaps) < 0.06, f"the loop was held {max(gaps) * 1000:.0f} ms"
