"""Model quality from delayed ground truth (docs/quality.md).

With ``--feedback`` every request's prediction is kept in a bounded store (:mod:`.store`), keyed by
the request id the client got in ``x-request-id``. ``POST /feedback`` on the admin port joins labels
with them (:mod:`.feedback`); the scores engine (:mod:`.scores`) keeps rolling windows of labelled
predictions per model, version and variant and recomputes accuracy, precision, recall, F1, ROC AUC,
log loss and the confusion matrix (classification) or MAE, RMSE, MAPE and R^2 (regression) off the
request path. ``GET /quality`` and ``infermon_model_score`` show them; :mod:`.mlflow` logs them to an
MLflow tracking server. numpy is the only numeric dependency at run time.
"""

from __future__ import annotations

from aiohttp import web

from proxy.admin.server import json_response


def add_disabled_routes(app: web.Application) -> None:
    """``GET /quality`` and ``POST /feedback`` that say how to switch feedback on."""
    reason = "feedback is off: start the proxy with --feedback (feedback.enabled: true)"

    async def quality(request: web.Request) -> web.Response:
        return json_response({"enabled": False, "reason": reason})

    async def feedback(request: web.Request) -> web.Response:
        return json_response({"error": reason, "path": request.path}, status=404)

    app.router.add_get("/quality", quality)
    app.router.add_post("/feedback", feedback)
