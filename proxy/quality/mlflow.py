"""The rolling scores, logged to an MLflow tracking server through its REST API (aiohttp).

No MLflow client library: the sidecar stays light, and the REST API (``/api/2.0/mlflow/...``) is all
it needs. Every ``quality.mlflow.interval`` seconds, from the last published snapshot:

1. the experiment ``quality.mlflow.experiment`` is found (``experiments/get-by-name``) or created;
2. each label set (model, version, variant) gets one run, found by its tags (``runs/search`` on
   ``infermon.model``, ``infermon.version``, ``infermon.variant``) or created with them;
3. its figures go in ``runs/log-batch`` calls (at most 1000 metrics each): ``<metric>.<window>``
   (``accuracy.1h``, ``roc_auc.1d``, ``mae.1h``, ``join_rate.1h``, ``labels.1h``) and per class
   ``<metric>.<class>.<window>`` (``f1.setosa.1h``; a class MLflow would refuse in a key made safe,
   :func:`metric_key`), with the export's step (going on from the highest step of a run found).

Authentication as MLflow's own client reads it: ``MLFLOW_TRACKING_TOKEN`` (bearer), else
``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` (basic). Every call has
``quality.mlflow.timeout``; it runs on the event loop as network I/O only, so a tracking server that
is down or slow never holds a request. Each export counts ``ok`` or ``failed``
(``infermon_mlflow_exports_total{outcome}``); a failure is logged at most once a minute, and the ids
found so far are looked up again at the next export.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import os
import re
import time
from typing import Any

import aiohttp

from proxy.config import mask_url
from proxy.quality.scores import ScoresEngine, Snapshot
from proxy.quality.store import Labels
from proxy.settings import Mlflow

log = logging.getLogger("infermon.quality")

API = "/api/2.0/mlflow"
MAX_BATCH = 1000  # metrics per runs/log-batch (MLflow's limit)
#: what MLflow takes in a key: alphanumerics (of any script: its rule is Python's \w), ``_ - . /`` and
#: spaces; a colon too, but not on a server running on Windows
_KEY_UNSAFE = re.compile(r"[^\w\-. /]")
#: a class's part of a key, at most (the metric and window names fit in the rest of MLflow's 250)
MAX_KEY_PART = 200
TAGS = ("infermon.model", "infermon.version", "infermon.variant")


class MlflowError(Exception):
    pass


def _key_part(part: str) -> str:
    safe = _KEY_UNSAFE.sub("_", part)
    # MLflow refuses a key that a path normalisation would change: '//', '/./' or '/../' inside it
    if "/" in safe and any(seg in ("", ".", "..") for seg in safe.split("/")[1:-1]):
        safe = safe.replace("/", "_")
    if safe != part or len(safe) > MAX_KEY_PART:
        # changed: a short digest of the text keeps two classes apart ("a:b" and "a_b")
        safe = f"{safe[: MAX_KEY_PART - 7]}_{hashlib.sha1(part.encode()).hexdigest()[:6]}"
    return safe


def metric_key(*parts: str) -> str:
    """An MLflow metric key, ``.``-joined: a part MLflow would refuse (characters beside alphanumerics,
    ``_ - . /`` and spaces; a path that normalises to another; too long) is made safe and marked with
    a digest of its text, so that two classes never share a key."""
    return ".".join(_key_part(p) for p in parts)[:250]


def auth_headers(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ) if env is None else env
    token = env.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        raw = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {raw}"}
    return {}


def _quoted(value: str) -> str | None:
    """A value for a search filter, or None when it cannot be quoted safely."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


class MlflowExporter:
    def __init__(self, cfg: Mlflow, engine: ScoresEngine) -> None:
        assert cfg.tracking_uri is not None
        self.cfg = cfg
        self.base = cfg.tracking_uri.rstrip("/") + API
        self.engine = engine
        self.headers = {"Content-Type": "application/json", **auth_headers()}
        self.outcomes = {"ok": 0, "failed": 0}
        self.metrics_logged = 0
        self.last_error: str | None = None
        self._experiment: str | None = None
        self._runs: dict[Labels, str] = {}
        self._step = 0
        self._last_log = -math.inf
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval)
            await self.export()

    # -- one export ---------------------------------------------------------------------------

    async def export(self) -> bool:
        """Log the last snapshot; True when every call succeeded. Never raises."""
        snap = self.engine.snapshot
        if not snap.at:
            return True  # nothing evaluated yet
        try:
            await self._export(snap)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.outcomes["failed"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._experiment = None
            self._runs.clear()  # looked up again next time: a run may have been deleted
            now = time.monotonic()
            if now - self._last_log >= 60.0:
                self._last_log = now
                log.warning("MLflow export to %s failed (the next one runs in %g s): %s",
                            mask_url(self.cfg.tracking_uri or ""), self.cfg.interval, self.last_error)  # fmt: skip
            return False
        self.outcomes["ok"] += 1
        self.last_error = None
        return True

    async def _export(self, snap: Snapshot) -> None:
        per_set: dict[Labels, list[tuple[str, float]]] = {}
        for (model, version, variant, _task), windows in snap.sets.items():
            figures = per_set.setdefault((model, version, variant), [])
            for window, ws in windows.items():
                figures.append((metric_key("labels", window), float(ws.labels)))
                for metric, value in ws.scores.items():
                    if math.isfinite(value):
                        figures.append((metric_key(metric, window), value))
                for cls, values in ws.classes.items():
                    for metric, value in values.items():
                        figures.append((metric_key(metric, cls, window), value))
        if not per_set:
            return
        experiment = await self._experiment_id()
        runs = {labels: await self._run_id(experiment, labels) for labels in per_set}
        self._step += 1  # after the runs are found: a run logged before this process goes on from its step
        stamp = int(snap.at * 1000)
        for labels, figures in per_set.items():
            run = runs[labels]
            metrics = [{"key": k, "value": v, "timestamp": stamp, "step": self._step} for k, v in figures]
            for i in range(0, len(metrics), MAX_BATCH):
                await self._call("POST", "runs/log-batch", {"run_id": run, "metrics": metrics[i : i + MAX_BATCH]})
                self.metrics_logged += len(metrics[i : i + MAX_BATCH])

    async def _experiment_id(self) -> str:
        if self._experiment is not None:
            return self._experiment
        name = self.cfg.experiment
        status, data = await self._call("GET", "experiments/get-by-name", params={"experiment_name": name}, ok=(404,))
        if status == 200:
            self._experiment = str(data["experiment"]["experiment_id"])
        else:
            _, data = await self._call("POST", "experiments/create", {"name": name})
            self._experiment = str(data["experiment_id"])
        return self._experiment

    async def _run_id(self, experiment: str, labels: Labels) -> str:
        run = self._runs.get(labels)
        if run is not None:
            return run
        quoted = [_quoted(v) for v in labels]
        if all(q is not None for q in quoted):
            query = " and ".join(f"tags.`{tag}` = {q}" for tag, q in zip(TAGS, quoted, strict=True))
            _, data = await self._call(
                "POST",
                "runs/search",
                {
                    "experiment_ids": [experiment],
                    "filter": query,
                    "run_view_type": "ACTIVE_ONLY",
                    "max_results": 1,
                    "order_by": ["attributes.start_time DESC"],
                },
            )
            runs = data.get("runs") or []
            if runs:
                run = str(runs[0]["info"]["run_id"])
                # MLflow shows a run's latest metrics by the highest step: go on from the run's
                logged = runs[0].get("data", {}).get("metrics") or []
                self._step = max(self._step, max((int(m.get("step", 0)) for m in logged), default=0))
        if run is None:
            model, version, variant = labels
            name = f"{model} {version}" + (f" ({variant})" if variant != "stable" else "")
            tags = [{"key": tag, "value": value} for tag, value in zip(TAGS, labels, strict=True)]
            tags.append({"key": "mlflow.source.name", "value": "infermon proxy"})
            _, data = await self._call(
                "POST",
                "runs/create",
                {"experiment_id": experiment, "run_name": name, "start_time": int(time.time() * 1000), "tags": tags},
            )
            run = str(data["run"]["info"]["run_id"])
        self._runs[labels] = run
        return run

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        ok: tuple[int, ...] = (),
    ) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers)
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout)
        async with self._session.request(
            method, f"{self.base}/{path}", json=body, params=params, timeout=timeout
        ) as resp:
            text = await resp.text()
            if resp.status != 200 and resp.status not in ok:
                raise MlflowError(f"{method} {path}: HTTP {resp.status}: {text[:300]}")
            try:
                data = await resp.json(content_type=None) if text else {}
            except ValueError:
                raise MlflowError(f"{method} {path}: the answer is not JSON: {text[:300]}") from None
            return resp.status, data
