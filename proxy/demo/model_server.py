"""A small model server for the demo and the tests: Open Inference Protocol v2, KServe v1, an SSE stream.

Endpoints::

    GET  /v2                                 server metadata {"name", "version", "extensions"}
    GET  /v2/health/ready, /v2/health/live   -> 200 {"ready": true} / {"live": true}
    GET  /v2/models/{name}                   model metadata (inputs, outputs, versions)
    GET  /v2/models/{name}/ready             -> 200 {"name": ..., "ready": true}
    POST /v2/models/{name}/infer             Open Inference Protocol v2
    (each /v2/models/{name} route also as /v2/models/{name}/versions/{v}: an unknown version is a 404)
    POST /v1/models/{name}:predict           KServe v1 {"instances": [[...], ...]}
    POST /v1/chat/completions                OpenAI-style; "stream": true answers server-sent events

With a :class:`~proxy.demo.model.Classifier` the inference routes answer with its class and class
probabilities. An OIP v2 request gives its features either as one FP32 tensor per feature (named
after it, shape ``[N]`` or ``[N, 1]``) or as one ``[N, 4]`` tensor in feature order; the answer has
two outputs, ``label`` (INT64 ``[N]``, the class index) and ``probabilities`` (FP32 ``[N, 3]``).
Each input tensor needs ``name``, ``shape`` and a numeric ``datatype`` (``FP32``, ``INT64``, ...);
a request the model cannot read is a 400 ``{"error": "..."}``, before any simulated failure.
Without a model (the benchmarks) a fixed two-class logistic score answers.

Latency is ``delay`` with an exponential tail (2% of requests ten times slower); ``error_rate`` of
the inference requests fail with 500. A client that leaves in the middle of a stream ends that
stream quietly.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from proxy.demo.model import CLASSES, FEATURES, Classifier


def _score(features: list[float]) -> list[float]:
    z = sum((i + 1) * 0.1 * x for i, x in enumerate(features)) - 1.0
    p = 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))
    return [round(1.0 - p, 6), round(p, 6)]


class BadInput(ValueError):
    """An inference request the model cannot read; its text is the 400 answer's error."""


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


#: the OIP v2 tensor datatypes the model reads (numbers); BYTES, or none, is a 400
NUMERIC = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}
)


def features_of(inputs: Any) -> np.ndarray[Any, np.dtype[np.float64]]:
    """The ``[N, 4]`` feature matrix of an OIP v2 request's ``inputs`` (see the module docstring)."""
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise BadInput("inputs must be a non-empty list of tensors")
    width = len(FEATURES)

    def tensor(t: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
        shape, data = t.get("shape"), t.get("data")
        if t.get("datatype") not in NUMERIC:
            raise BadInput(f"tensor {t.get('name')!r}: datatype must be one of {', '.join(sorted(NUMERIC))}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise BadInput(f"tensor {t.get('name')!r}: shape must be a list of whole numbers")
        try:
            arr = np.asarray(data, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise BadInput(f"tensor {t.get('name')!r}: data must be numbers") from None
        if arr.size != math.prod(shape) or not np.isfinite(arr).all():
            raise BadInput(f"tensor {t.get('name')!r}: data must hold prod(shape) finite numbers")
        return arr

    if len(inputs) == 1:
        arr, shape = tensor(inputs[0]), inputs[0]["shape"]
        if len(shape) != 2 or shape[1] != width:
            raise BadInput(f"one input tensor must have shape [N, {width}] ({', '.join(FEATURES)})")
        return arr.reshape(-1, width)
    named = {t.get("name"): t for t in inputs}
    missing = [f for f in FEATURES if f not in named]
    if missing:
        raise BadInput(f"missing input tensors: {', '.join(missing)} (one per feature, or one [N, {width}] tensor)")
    columns = [tensor(named[f]) for f in FEATURES]
    if len({c.size for c in columns}) != 1:
        raise BadInput("every feature tensor must hold the same number of rows")
    return np.stack(columns, axis=1)


def outputs_of(model: Classifier, x: np.ndarray[Any, np.dtype[np.float64]]) -> list[dict[str, Any]]:
    """The OIP v2 ``outputs`` for feature rows ``x``: ``label`` first (the class), then ``probabilities``."""
    probs = model.predict_proba(x)
    labels = probs.argmax(axis=1)
    return [
        {"name": "label", "shape": [len(x)], "datatype": "INT64", "data": [int(v) for v in labels]},
        {"name": "probabilities", "shape": [len(x), len(CLASSES)], "datatype": "FP32",
         "data": [round(float(p), 6) for p in probs.reshape(-1)]},
    ]  # fmt: skip


def build_model_app(
    model: Classifier | None = None,
    *,
    name: str = "iris",
    version: str = "1",
    error_rate: float = 0.01,
    delay: float = 0.002,
    seed: int | None = None,
) -> web.Application:
    """The model server's aiohttp application; ``model`` None: the fixed two-class score."""
    rng = random.Random(seed)
    failures = random.Random(None if seed is None else seed + 1)  # its own draws: the error share is exact
    app = web.Application()

    async def think() -> None:
        d = delay * (1 + rng.expovariate(1.0))
        if rng.random() < 0.02:
            d *= 10
        await asyncio.sleep(d)

    def fail() -> web.Response | None:
        if failures.random() < error_rate:
            return web.json_response({"error": "model crashed"}, status=500)
        return None

    def known(request: web.Request) -> web.Response | None:
        if model is None:  # the fixed score answers any name and version
            return None
        if request.match_info["name"] != name:
            return web.json_response({"error": f"no model named {request.match_info['name']!r} (try {name!r})"},
                                     status=404)  # fmt: skip
        asked = request.match_info.get("version", version)
        if asked != version:
            return web.json_response(
                {"error": f"model {request.match_info['name']!r} has no version {asked!r} (it has {version!r})"},
                status=404,
            )
        return None

    async def server_metadata(request: web.Request) -> web.Response:
        return web.json_response({"name": "infermon-demo", "version": version, "extensions": []})

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def metadata(request: web.Request) -> web.Response:
        unknown = known(request)
        if unknown is not None:
            return unknown
        return web.json_response(
            {
                "name": request.match_info["name"],
                "versions": [version],
                "platform": "numpy",
                "inputs": [{"name": f, "datatype": "FP32", "shape": [-1, 1]} for f in FEATURES],
                "outputs": [
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(CLASSES)]},
                ],
                "parameters": {"classes": list(CLASSES)},
            }
        )

    async def model_ready(request: web.Request) -> web.Response:
        unknown = known(request)
        if unknown is not None:
            return unknown
        return web.json_response({"name": request.match_info["name"], "ready": True})

    async def body_of(request: web.Request) -> Any:
        try:
            return await request.json(loads=orjson.loads)
        except ValueError:
            return None

    async def v2_infer(request: web.Request) -> web.Response:
        unknown = known(request)
        if unknown is not None:
            return unknown
        body = await body_of(request)
        if not isinstance(body, dict):
            return web.json_response({"error": "the body must be a JSON object with inputs"}, status=400)
        inputs = body.get("inputs") or []
        outputs: list[dict[str, Any]] = []
        if model is not None:
            try:
                outputs = outputs_of(model, features_of(inputs))
            except BadInput as exc:
                return web.json_response({"error": str(exc)}, status=400)
        elif not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
            return web.json_response({"error": "inputs must be a list of tensors"}, status=400)
        await think()
        failed = fail()
        if failed is not None:
            return failed
        if model is None:
            data = inputs[0].get("data", []) if inputs else []
            rows = [data[i : i + 4] for i in range(0, len(data), 4)] or [[0.0]]
            probs = [_score(row) for row in rows]
            outputs = [{"name": "probabilities", "shape": [len(probs), 2], "datatype": "FP32",
                        "data": [p for pair in probs for p in pair]}]  # fmt: skip
        answer = {
            "model_name": request.match_info["name"],
            "model_version": version if model is not None else request.match_info.get("version", version),
            "outputs": outputs,
        }
        if "id" in body:
            answer["id"] = body["id"]
        return web.json_response(answer, dumps=_dumps)

    async def v1_predict(request: web.Request) -> web.Response:
        body = await body_of(request)
        if not isinstance(body, dict) or not isinstance(body.get("instances", []), list):
            return web.json_response({"error": "the body must be a JSON object with instances"}, status=400)
        await think()
        failed = fail()
        if failed is not None:
            return failed
        instances = body.get("instances", [])
        if model is None:
            return web.json_response({"predictions": [_score(row) for row in instances]})
        try:
            x = np.asarray(instances, dtype=np.float64).reshape(-1, len(FEATURES)) if instances else None
        except (TypeError, ValueError):
            return web.json_response({"error": f"instances must be rows of {len(FEATURES)} numbers"}, status=400)
        probs = [] if x is None else model.predict_proba(x).round(6).tolist()
        return web.json_response({"predictions": probs}, dumps=_dumps)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await body_of(request)
        if not isinstance(body, dict):
            return web.json_response({"error": "the body must be a JSON object"}, status=400)
        max_tokens, messages = body.get("max_tokens", 16), body.get("messages", [])
        options, model_name = body.get("stream_options") or {}, body.get("model", "chat")
        if type(max_tokens) is not int or not isinstance(messages, list) or not isinstance(options, dict):
            return web.json_response(
                {"error": "max_tokens must be a whole number, messages a list and stream_options an object"},
                status=400,
            )
        if not isinstance(model_name, str):
            return web.json_response({"error": "model must be a string"}, status=400)
        tokens = max(1, min(max_tokens, 256))
        await think()
        words = ["the", "model", "says", "hello", "to", "infermon", "and", "streams", "tokens"]
        prompt = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict)) // 4
        usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
        # what every OpenAI chat completion and chunk carries: its id, creation time, model and object
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if not body.get("stream"):
            text = " ".join(rng.choice(words) for _ in range(tokens))
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            return web.json_response({**head, "object": "chat.completion", "usage": usage, "choices": [choice]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        include_usage = bool(options.get("include_usage"))
        try:
            await response.prepare(request)
            for i in range(tokens):
                last = i == tokens - 1
                delta = {"content": rng.choice(words) + " "}
                if i == 0:
                    delta = {"role": "assistant", **delta}  # the first chunk says whose message it is
                choice = {"index": 0, "delta": delta, "finish_reason": "length" if last else None}
                chunk = {**head, "object": "chat.completion.chunk", "choices": [choice]}
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await asyncio.sleep(delay)
            if include_usage:
                tail = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                await response.write(b"data: " + orjson.dumps(tail) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client (or the proxy, cutting it at the end of a drain) left mid-stream: nobody to tell
        return response

    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/models/{name}", metadata)
    app.router.add_get("/v2/models/{name}/ready", model_ready)
    app.router.add_get("/v2/models/{name}/versions/{version}", metadata)
    app.router.add_get("/v2/models/{name}/versions/{version}/ready", model_ready)
    app.router.add_post("/v2/models/{name}/infer", v2_infer)
    app.router.add_post("/v2/models/{name}/versions/{version}/infer", v2_infer)
    app.router.add_post("/v1/models/{name}:predict", v1_predict)
    app.router.add_post("/v1/chat/completions", chat)
    return app
