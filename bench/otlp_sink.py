"""A minimal OTLP/HTTP trace receiver for the tracing benchmark: counts spans, keeps nothing.

``python -m bench.otlp_sink --port N``; ``GET /count`` answers ``{"requests": R, "spans": S}``.
"""

from __future__ import annotations

import argparse

from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

_OK = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()


def app() -> web.Application:
    counts = {"requests": 0, "spans": 0}

    async def export(request: web.Request) -> web.Response:
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        counts["requests"] += 1
        counts["spans"] += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        return web.Response(body=_OK, content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response(counts)

    application = web.Application(client_max_size=64 << 20)
    application.router.add_post("/v1/traces", export)
    application.router.add_get("/count", count)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
