"""A small model server for the demo and the tests: KServe v1, Open Inference v2 and an SSE stream.

Endpoints::

    GET  /v2/health/ready                    -> 200
    POST /v2/models/{name}/infer             Open Inference Protocol v2 (+ /versions/{v}/infer)
    POST /v1/models/{name}:predict           KServe v1 {"instances": [...]}
    POST /v1/chat/completions                OpenAI-style; "stream": true answers server-sent events

Latency is a few milliseconds with a slow tail; ``error_rate`` of the requests fail with 500. A
client that leaves in the middle of a stream ends that stream quietly.
"""

from __future__ import annotations

import asyncio
import math
import random

import orjson
from aiohttp import web


def _score(features: list[float]) -> list[float]:
    z = sum((i + 1) * 0.1 * x for i, x in enumerate(features)) - 1.0
    p = 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))
    return [round(1.0 - p, 6), round(p, 6)]


def build_model_app(error_rate: float = 0.01, delay: float = 0.002, seed: int | None = None) -> web.Application:
    rng = random.Random(seed)
    app = web.Application()

    async def think() -> None:
        d = delay * (1 + rng.expovariate(1.0))
        if rng.random() < 0.02:
            d *= 10
        await asyncio.sleep(d)

    def fail() -> web.Response | None:
        if rng.random() < error_rate:
            return web.json_response({"error": "model crashed"}, status=500)
        return None

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def v2_infer(request: web.Request) -> web.Response:
        body = await request.json(loads=orjson.loads)
        await think()
        failed = fail()
        if failed is not None:
            return failed
        inputs = body.get("inputs") or []
        data = inputs[0].get("data", []) if inputs else []
        rows = [data[i : i + 4] for i in range(0, len(data), 4)] or [[0.0]]
        probs = [_score(row) for row in rows]
        name = request.match_info["name"]
        return web.json_response(
            {
                "model_name": name,
                "model_version": request.match_info.get("version", "1"),
                "id": body.get("id", ""),
                "outputs": [
                    {"name": "probabilities", "shape": [len(probs), 2], "datatype": "FP32",
                     "data": [p for pair in probs for p in pair]}
                ],
            },
            dumps=lambda o: orjson.dumps(o).decode(),
        )  # fmt: skip

    async def v1_predict(request: web.Request) -> web.Response:
        body = await request.json(loads=orjson.loads)
        await think()
        failed = fail()
        if failed is not None:
            return failed
        return web.json_response({"predictions": [_score(row) for row in body.get("instances", [])]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json(loads=orjson.loads)
        tokens = int(body.get("max_tokens", 16))
        await think()
        words = ["the", "model", "says", "hello", "to", "infermon", "and", "streams", "tokens"]
        if not body.get("stream"):
            text = " ".join(rng.choice(words) for _ in range(tokens))
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": text}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            for _ in range(tokens):
                chunk = {"choices": [{"delta": {"content": rng.choice(words) + " "}}]}
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await asyncio.sleep(delay)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client (or the proxy, cutting it at the end of a drain) left mid-stream: nobody to tell
        return response

    app.router.add_get("/v2/health/ready", ready)
    app.router.add_post("/v2/models/{name}/infer", v2_infer)
    app.router.add_post("/v2/models/{name}/versions/{version}/infer", v2_infer)
    app.router.add_post("/v1/models/{name}:predict", v1_predict)
    app.router.add_post("/v1/chat/completions", chat)
    return app
