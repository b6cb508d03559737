"""A model server for the probe tests whose answers a test changes mid-run: right, wrong, slow, 500."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

from aiohttp import web

SETOSA = [0.97, 0.02, 0.01]
VIRGINICA = [0.01, 0.09, 0.9]


class Model:
    """KServe v1, Open Inference v2 and OpenAI chat routes for an iris-like classifier.

    ``mode``: ``good``; ``wrong`` (every flower is virginica); ``error`` (500); ``slow`` (answers
    after ``delay`` seconds); ``hang`` (answers once ``release`` is set); ``close`` (drops the
    connection without an answer). ``noise`` is added to every probability (within a tolerance or
    not). ``seen`` keeps every request: (method, path, headers (lower-case names), body).
    """

    def __init__(self) -> None:
        self.mode = "good"
        self.delay = 0.0
        self.noise = 0.0
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()  # set when a request waits in ``hang``
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self._counter = itertools.count(1_700_000_000)

    def probabilities(self, instance: list[float]) -> list[float]:
        row = VIRGINICA if self.mode == "wrong" or instance[0] >= 5.5 else SETOSA
        return [p + self.noise for p in row]

    async def _misbehave(self, request: web.Request) -> web.StreamResponse | None:
        body = await request.read()
        self.seen.append((request.method, request.path_qs, {k.lower(): v for k, v in request.headers.items()}, body))
        if self.mode == "error":
            return web.json_response({"error": "model not loaded"}, status=500)
        if self.mode == "slow":
            await asyncio.sleep(self.delay)  # the model is slow: what the latency bound is there for
        if self.mode == "hang":
            self.waiting.set()
            await self.release.wait()
        if self.mode == "close":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return None

    async def v1(self, request: web.Request) -> web.StreamResponse:
        bad = await self._misbehave(request)
        if bad is not None:
            return bad
        body = await request.json()
        return web.json_response({"predictions": [self.probabilities(x) for x in body["instances"]]})

    async def v2(self, request: web.Request) -> web.StreamResponse:
        bad = await self._misbehave(request)
        if bad is not None:
            return bad
        body = await request.json()
        data = body["inputs"][0]["data"]
        rows = [self.probabilities(data[i : i + 4]) for i in range(0, len(data), 4)]
        return web.json_response(
            {
                "model_name": "iris",
                "id": str(uuid.uuid4()),  # a new id for every answer, as MLServer does
                "outputs": [
                    {
                        "name": "probabilities",
                        "shape": [len(rows), 3],
                        "datatype": "FP32",
                        "data": [p for r in rows for p in r],
                    }
                ],
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        bad = await self._misbehave(request)
        if bad is not None:
            return bad
        n = next(self._counter)
        answer: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": n,
            "model": "tiny",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"Hello! (sampled text {n})"},
                    "finish_reason": "stop" if self.mode != "wrong" else "length",
                }
            ],
        }
        return web.json_response(answer)

    async def whoami(self, request: web.Request) -> web.StreamResponse:
        # a server that echoes the caller's credentials in its answer (a debug field, a "user")
        await self._misbehave(request)
        return web.json_response(
            {"model": "iris", "caller": {"auth": request.headers.get("Authorization", ""), "role": "reader"}}
        )

    async def big(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": "x" * 4096})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/models/iris:predict", self.v1)
        app.router.add_post("/v2/models/iris/infer", self.v2)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/big", self.big)
        app.router.add_get("/whoami", self.whoami)
        return app


IRIS_V1: dict[str, Any] = {
    "name": "iris-v1",
    "path": "/v1/models/iris:predict",
    "body": {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]},
    "expect": {"json": {"predictions": [SETOSA, VIRGINICA]}, "rel_tol": 1e-5, "abs_tol": 1e-7},
}
IRIS_LABEL: dict[str, Any] = {
    "name": "iris-label",
    "path": "/v1/models/iris:predict",
    "body": {"instances": [[5.0, 3.4, 1.5, 0.2]]},
    "expect": {"label": {"path": "$.predictions[0]", "argmax": 0}},
}
