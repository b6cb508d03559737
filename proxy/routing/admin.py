"""``GET /split`` and ``PUT /split`` on the admin server (``PUT`` takes the admin token when one is set)."""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.admin.server import add_state_route, json_response
from proxy.routing.split import Splitter


def add_split_routes(app: web.Application, splitter: Splitter) -> None:
    async def get_split(request: web.Request) -> web.Response:
        return json_response(splitter.state())

    async def put_split(request: web.Request) -> web.Response:
        declared = request.headers.get("Content-Type")
        # RFC 9110 8.3: no Content-Type, the body is looked at; one that says it is not JSON: 415
        if declared is not None and declared.partition(";")[0].strip().lower() != "application/json":
            response = json_response(
                {"error": f"the body must be application/json, not {declared[:80]!r}", "path": request.path},
                status=415,
            )
            response.headers["Accept"] = "application/json"  # RFC 9110 15.5.16: the type it takes
            return response
        body = await request.read()
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return json_response({"error": f"the body is not JSON: {exc}", "path": request.path}, status=400)
        try:
            weights = splitter.check_weights(data)
        except ValueError as exc:
            return json_response({"error": str(exc), "path": request.path}, status=400)
        peer = request.remote or "unknown"
        splitter.set_weights(weights, f"PUT /split from {peer}")
        return json_response(splitter.state())

    app.router.add_get("/split", get_split)
    add_state_route(app, "PUT", "/split", put_split)
