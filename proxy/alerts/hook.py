"""The retraining hook: Alertmanager's webhook in, a user command out, once per firing group.

Alertmanager posts a notification for a group of alerts (version 4 of its webhook payload) when the
group starts firing, again every ``group_interval`` while alerts join or leave it, every
``repeat_interval`` while it keeps firing, and once more when it is resolved. The hook runs the
command on the first firing notification of a group (``groupKey``) and ignores the repeats until
the group is resolved; a group that fires again after that runs the command again. A run that fails
(a non-zero exit, the timeout, a command that cannot start) forgets its group, so the group's next
notification tries again. A group not heard of for ``forget_after`` seconds is forgotten too (a
resolved notification that never came).

The command is an argv, never a shell line: label values reach it only as environment variables
(``INFERMON_ALERT_*``) and as the payload on its standard input, so a label cannot inject a command.
At most ``concurrency`` commands run at once; up to ``max_pending`` more wait for a slot; beyond that a
new group is answered 503 and not remembered, so Alertmanager's retry or next notification brings it
back.

HTTP (JSON answers): ``POST /alerts`` (the webhook; ``Authorization: Bearer`` when a token is set),
``GET /status`` (the groups remembered and the last runs), ``GET /healthz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger("infermon.retrain_hook")

#: a notification larger than this is refused (413): Alertmanager's max_alerts bounds it
MAX_BODY_BYTES = 4 * 1024 * 1024
#: environment variables the hook sets besides the labels; a label with one of these names is left out
META = ("GROUP_KEY", "STATUS", "RECEIVER", "EXTERNAL_URL", "COUNT", "STARTS_AT", "LABELS")
#: the hook's own secret: never handed to the command
TOKEN_ENV = "INFERMON_RETRAIN_HOOK_TOKEN"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: seconds between SIGTERM and SIGKILL for a command past its timeout or at shutdown
KILL_GRACE = 10.0


class PayloadError(ValueError):
    """The body is not an Alertmanager webhook notification; ``str(exc)`` says what is wrong."""


@dataclass(frozen=True)
class Alert:
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    fingerprint: str


@dataclass(frozen=True)
class Notification:
    status: str
    group_key: str
    receiver: str
    external_url: str
    group_labels: dict[str, str]
    common_labels: dict[str, str]
    alerts: tuple[Alert, ...]

    @property
    def firing(self) -> tuple[Alert, ...]:
        return tuple(a for a in self.alerts if a.status == "firing")


def _text_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{where} must be an object of strings")
    for k, v in value.items():
        if not isinstance(v, str):
            raise PayloadError(f"{where}.{k} must be a string")
        if "\x00" in k or "\x00" in v:
            raise PayloadError(f"{where}.{k} holds a NUL character")
    return dict(value)


def _text(doc: Mapping[str, Any], key: str, where: str, required: bool = False) -> str:
    value = doc.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise PayloadError(f"{where}{key} must be a {'non-empty ' if required else ''}string")
    return value


def parse_notification(body: bytes) -> Notification:
    """Alertmanager's webhook payload (version 4) -> :class:`Notification`; :class:`PayloadError` if not one."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError("the body must be a JSON object (Alertmanager's webhook payload)")
    version = doc.get("version")
    if version != "4":
        raise PayloadError(f'version must be "4" (Alertmanager\'s webhook payload), not {version!r}')
    status = _text(doc, "status", "", required=True)
    if status not in ("firing", "resolved"):
        raise PayloadError(f"status must be firing or resolved, not {status!r}")
    raw_alerts = doc.get("alerts")
    if not isinstance(raw_alerts, list) or not raw_alerts:
        raise PayloadError("alerts must be a non-empty list")
    alerts = []
    for i, raw in enumerate(raw_alerts):
        where = f"alerts[{i}]."
        if not isinstance(raw, dict):
            raise PayloadError(f"alerts[{i}] must be an object")
        alert_status = _text(raw, "status", where, required=True)
        if alert_status not in ("firing", "resolved"):
            raise PayloadError(f"{where}status must be firing or resolved, not {alert_status!r}")
        labels = _text_map(raw.get("labels"), f"{where}labels")
        if not labels.get("alertname"):
            raise PayloadError(f"{where}labels.alertname is missing")
        alerts.append(
            Alert(
                status=alert_status,
                labels=labels,
                annotations=_text_map(raw.get("annotations"), f"{where}annotations"),
                starts_at=_text(raw, "startsAt", where),
                fingerprint=_text(raw, "fingerprint", where),
            )
        )
    return Notification(
        status=status,
        group_key=_text(doc, "groupKey", "", required=True),
        receiver=_text(doc, "receiver", ""),
        external_url=_text(doc, "externalURL", ""),
        group_labels=_text_map(doc.get("groupLabels"), "groupLabels"),
        common_labels=_text_map(doc.get("commonLabels"), "commonLabels"),
        alerts=tuple(alerts),
    )


def command_env(note: Notification, base: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: ``base`` (less the hook's token) and ``INFERMON_ALERT_*`` for ``note``.

    ``INFERMON_ALERT_<LABEL>`` for every label of the firing alerts (its distinct values, sorted, joined
    with commas: one value when the group is one model, version and variant); ``INFERMON_ALERT_LABELS``
    the same as a JSON object of lists; and the group's ``GROUP_KEY``, ``STATUS``, ``RECEIVER``,
    ``EXTERNAL_URL``, ``COUNT`` (firing alerts) and ``STARTS_AT`` (the earliest).
    """
    firing = note.firing or note.alerts
    values: dict[str, set[str]] = {}
    for alert in firing:
        for name, value in alert.labels.items():
            values.setdefault(name, set()).add(value)
    env = {k: v for k, v in base.items() if not k.startswith("INFERMON_ALERT_") and k != TOKEN_ENV}
    labels: dict[str, list[str]] = {}
    for name in sorted(values):
        labels[name] = sorted(values[name])
        key = name.upper()
        if _ENV_NAME.match(name) and key not in META:
            env[f"INFERMON_ALERT_{key}"] = ",".join(labels[name])
    starts = sorted(a.starts_at for a in firing if a.starts_at)
    env.update(
        {
            "INFERMON_ALERT_GROUP_KEY": note.group_key,
            "INFERMON_ALERT_STATUS": note.status,
            "INFERMON_ALERT_RECEIVER": note.receiver,
            "INFERMON_ALERT_EXTERNAL_URL": note.external_url,
            "INFERMON_ALERT_COUNT": str(len(note.firing)),
            "INFERMON_ALERT_STARTS_AT": starts[0] if starts else "",
            "INFERMON_ALERT_LABELS": orjson.dumps(labels).decode(),
        }
    )
    return env


@dataclass
class Group:
    """One firing group the hook has run (or is running) the command for."""

    key: str
    labels: dict[str, str]
    first_seen: float
    last_seen: float
    state: str = "pending"  # pending (waits for a slot), running, done
    resolved: bool = False  # a resolved notification came while the command ran
    again: Notification | None = None  # fired again while the command still ran: run once more


@dataclass(frozen=True)
class Run:
    group_key: str
    labels: dict[str, str]
    started: float
    seconds: float
    outcome: str  # ok, failed, timeout, error
    exit_code: int | None
    detail: str


@dataclass
class HookConfig:
    command: Sequence[str]
    timeout: float = 3600.0
    concurrency: int = 1
    max_pending: int = 100
    forget_after: float = 172_800.0
    token: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


class RetrainHook:
    """The state machine of firing groups and the command runs; :meth:`app` serves it."""

    def __init__(self, cfg: HookConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.groups: dict[str, Group] = {}
        self.runs: deque[Run] = deque(maxlen=50)
        #: notifications received, by what the hook did with them (run, duplicate, resolved, ...)
        self.notifications: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._procs: set[asyncio.subprocess.Process] = set()
        self._closing = False
        #: set after each run ends (tests and shutdown wait on it)
        self.run_finished = asyncio.Event()

    # -- notifications ----------------------------------------------------------------------------

    def notify(self, note: Notification) -> tuple[int, dict[str, object]]:
        """Act on one notification; the HTTP status and JSON body to answer with."""
        status, answer = self._notify(note)
        self.notifications[str(answer.get("action", "refused"))] += 1
        return status, answer

    def _notify(self, note: Notification) -> tuple[int, dict[str, object]]:
        now = self.clock()
        self._forget_stale(now)
        group = self.groups.get(note.group_key)
        if note.status == "resolved":
            if group is None:
                return 200, {"action": "ignored", "reason": "not a group the hook ran"}
            if group.state == "done":
                del self.groups[note.group_key]
            else:
                group.resolved, group.again = True, None
            log.info("group %s resolved", note.group_key)
            return 200, {"action": "resolved"}
        if group is not None and not group.resolved:
            group.last_seen = now
            return 200, {"action": "duplicate", "state": group.state}
        if group is not None and group.state == "pending":  # resolved and firing again before it started
            group.resolved, group.last_seen = False, now
            return 202, {"action": "queued", "reason": "waits for a slot"}
        if group is not None:  # resolved while its run goes on, and firing again: once more after it
            group.resolved, group.again, group.last_seen = False, note, now
            return 202, {"action": "queued", "reason": "runs again when the current run ends"}
        if self._closing:
            return 503, {"error": "the hook is shutting down"}
        pending = sum(1 for g in self.groups.values() if g.state == "pending")
        if pending >= self.cfg.max_pending:
            log.warning("group %s refused: %d runs already wait for a slot", note.group_key, pending)
            return 503, {"error": f"{pending} runs already wait (--max-pending); Alertmanager will retry"}
        labels = dict(note.common_labels)
        self.groups[note.group_key] = Group(note.group_key, labels, now, now)
        self._start(note)
        return 202, {"action": "run", "group_key": note.group_key}

    def _forget_stale(self, now: float) -> None:
        for key, group in list(self.groups.items()):
            if group.state == "done" and now - group.last_seen > self.cfg.forget_after:
                log.info("group %s forgotten: no notification for %.0f s", key, now - group.last_seen)
                del self.groups[key]

    def _start(self, note: Notification) -> None:
        task = asyncio.get_running_loop().create_task(self._run(note))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- runs ---------------------------------------------------------------------------------------

    async def _run(self, note: Notification) -> None:
        group = self.groups[note.group_key]
        async with self._slots:
            if self._closing or group.resolved:  # resolved before a slot was free: nothing to do
                self.groups.pop(note.group_key, None)
                self.run_finished.set()
                self.run_finished = asyncio.Event()
                return
            group.state = "running"
            run = await self._execute(note)
        self.runs.append(run)
        level = logging.INFO if run.outcome == "ok" else logging.WARNING
        log.log(level, "command for group %s: %s after %.1f s%s", note.group_key, run.outcome, run.seconds,
                f" ({run.detail})" if run.detail else "")  # fmt: skip
        group.state = "done"
        if group.again is not None:  # it fired again after a resolve while this ran
            again, group.again = group.again, None
            group.state = "pending"
            self._start(again)
        elif group.resolved or run.outcome != "ok":
            # resolved: a later firing is a new one; failed: the group's next notification tries again
            self.groups.pop(note.group_key, None)
        self.run_finished.set()
        self.run_finished = asyncio.Event()

    async def _execute(self, note: Notification) -> Run:
        started, t0 = time.time(), self.clock()
        labels = dict(note.common_labels)

        def done(outcome: str, code: int | None, detail: str = "") -> Run:
            return Run(note.group_key, labels, started, self.clock() - t0, outcome, code, detail)

        log.info("group %s fires: running %s", note.group_key, self.cfg.command[0])
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.cfg.command,
                stdin=asyncio.subprocess.PIPE,
                env=command_env(note, self.cfg.env),
                start_new_session=True,  # its own process group: a timeout ends its children too
            )
        except OSError as exc:
            return done("error", None, f"cannot start {self.cfg.command[0]}: {exc.strerror or exc}")
        self._procs.add(proc)
        try:
            payload = orjson.dumps(_payload(note))
            try:
                async with asyncio.timeout(self.cfg.timeout):
                    await proc.communicate(payload)
            except TimeoutError:
                await _stop(proc)
                return done("timeout", proc.returncode, f"still running after {self.cfg.timeout:g} s (--timeout)")
        finally:
            self._procs.discard(proc)
        code = proc.returncode
        if code == 0:
            return done("ok", 0)
        if code is not None and code < 0:
            return done("failed", code, f"killed by signal {-code}")
        return done("failed", code, f"exit status {code}")

    async def aclose(self) -> None:
        """Stop taking groups, end the running commands (SIGTERM, then SIGKILL), wait for the tasks."""
        self._closing = True
        for proc in list(self._procs):
            await _stop(proc)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def status(self) -> dict[str, object]:
        now = self.clock()
        return {
            "notifications": dict(sorted(self.notifications.items())),
            "groups": [
                {"group_key": g.key, "labels": g.labels, "state": g.state, "resolved": g.resolved,
                 "seconds_since_last_notification": round(now - g.last_seen, 3)}
                for g in self.groups.values()
            ],
            "runs": [
                {"group_key": r.group_key, "labels": r.labels, "outcome": r.outcome, "exit_code": r.exit_code,
                 "seconds": round(r.seconds, 3), "detail": r.detail,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.started))}
                for r in self.runs
            ],
        }  # fmt: skip

    # -- HTTP -----------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_json_errors], client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/alerts", self._post)
        app.router.add_get("/status", self._status)
        app.router.add_get("/healthz", _healthz)
        return app

    async def _post(self, request: web.Request) -> web.Response:
        token = self.cfg.token
        if token is not None:
            # surrogateescape: the bytes of a header that is not UTF-8 (aiohttp keeps them so), a 401
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {token}".encode()):
                return _error(401, "a bearer token is required (Authorization: Bearer ...)",
                              {"WWW-Authenticate": 'Bearer realm="infermon-retrain-hook"'})  # fmt: skip
        if request.content_type not in ("application/json", "application/octet-stream"):
            return _error(415, f"the body must be application/json, not {request.content_type}")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _error(413, f"the body is over {MAX_BODY_BYTES} bytes (lower max_alerts in Alertmanager)")
        # every piece until the end of the body: StreamReader.read(n) answers with what has arrived so
        # far, so one read of a body that comes in several TCP segments would see only its start
        pieces: list[bytes] = []
        size = 0
        async for piece in request.content.iter_any():
            size += len(piece)
            if size > MAX_BODY_BYTES:
                return _error(413, f"the body is over {MAX_BODY_BYTES} bytes (lower max_alerts in Alertmanager)")
            pieces.append(piece)
        body = b"".join(pieces)
        try:
            note = parse_notification(body)
        except PayloadError as exc:
            return _error(400, str(exc))
        status, answer = self.notify(note)
        return _json(status, answer)

    async def _status(self, request: web.Request) -> web.Response:
        return _json(200, self.status())


def _payload(note: Notification) -> dict[str, object]:
    """What the command reads on its standard input: the notification as Alertmanager sent it (parsed)."""
    return {
        "status": note.status,
        "groupKey": note.group_key,
        "receiver": note.receiver,
        "externalURL": note.external_url,
        "groupLabels": note.group_labels,
        "commonLabels": note.common_labels,
        "alerts": [
            {"status": a.status, "labels": a.labels, "annotations": a.annotations, "startsAt": a.starts_at,
             "fingerprint": a.fingerprint}
            for a in note.alerts
        ],
    }  # fmt: skip


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the command's process group, SIGKILL after :data:`KILL_GRACE` seconds."""
    for signum, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), wait)


def _json(status: int, body: object, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return _json(status, {"error": message}, headers)


async def _healthz(request: web.Request) -> web.Response:
    return _json(200, {"ok": True})


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own 404 / 405 / 413 answers as JSON errors, like the hook's."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return _error(exc.status, exc.reason, headers)
