"""proxy/alerts/hook.py: Alertmanager's webhook payloads over real HTTP, a real command per firing group.

The payloads have the shape Alertmanager 0.25 sends (webhook version 4); the command is
tests/alerts/record.py, which writes down its environment and standard input.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.alerts.hook import MAX_BODY_BYTES, TOKEN_ENV, HookConfig, PayloadError, RetrainHook, parse_notification
from tests.helpers import TIMEOUT, wait_until

RECORD = Path(__file__).with_name("record.py")
GROUP_KEY = '{}/{alertname=~"InfermonDriftDetected|InfermonModelScoreLow"}:{alertname="InfermonDriftDetected", model="iris", variant="stable", version="2"}'  # noqa: E501


def alert(feature: str = "age", status: str = "firing", **labels: str) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {
            "alertname": "InfermonDriftDetected",
            "feature": feature,
            "model": "iris",
            "severity": "warning",
            "variant": "stable",
            "version": "2",
            **labels,
        },
        "annotations": {
            "summary": f"Feature {feature} of iris 2 (stable) drifted",
            "runbook_url": "https://infermon.example/docs/alerts.md#infermondriftdetected",
        },
        "startsAt": "2026-11-25T16:22:39.123Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-25T18:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
        "fingerprint": f"{abs(hash(feature)):016x}"[:16],
    }


def notification(*alerts: dict[str, Any], status: str = "firing", group_key: str = GROUP_KEY) -> dict[str, Any]:
    """A webhook notification as Alertmanager 0.25 sends it."""
    common = dict(alerts[0]["labels"])
    for a in alerts[1:]:
        common = {k: v for k, v in common.items() if a["labels"].get(k) == v}
    return {
        "receiver": "retrain",
        "status": status,
        "alerts": list(alerts),
        "groupLabels": {k: common[k] for k in ("alertname", "model", "variant", "version") if k in common},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
    }


Post = Callable[..., Awaitable[tuple[int, dict[str, Any]]]]


class Hook:
    def __init__(self, hook: RetrainHook, url: str, out: Path) -> None:
        self.hook = hook
        self.url = url
        self.out = out

    def runs(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.out.glob("run-*.json"))]

    async def post(
        self, body: object, *, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else json.dumps(body).encode()
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
            session.post(
                self.url + "/alerts",
                data=io.BytesIO(data),
                headers={"Content-Type": "application/json", **(headers or {})},
            ) as resp,
        ):
            assert resp.content_type == "application/json"
            return resp.status, await resp.json()

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
            session.get(self.url + path) as resp,
        ):
            assert resp.content_type == "application/json"
            return resp.status, await resp.json()

    async def runs_finished(self, count: int) -> None:
        """Wait until ``count`` runs have ended (the hook's own record)."""

        async def done() -> bool:
            return len(self.hook.runs) >= count

        await wait_until(done)


StartHook = Callable[..., Awaitable[Hook]]


@pytest.fixture
async def start_hook(tmp_path: Path) -> AsyncIterator[StartHook]:
    started: list[tuple[RetrainHook, web.AppRunner]] = []

    async def start(*args: str, **overrides: Any) -> Hook:
        out = tmp_path / f"runs{len(started)}"
        out.mkdir()
        cfg = HookConfig(command=[sys.executable, str(RECORD), str(out), *args], **overrides)
        hook = RetrainHook(cfg)
        runner = web.AppRunner(hook.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        started.append((hook, runner))
        port = runner.addresses[0][1]
        return Hook(hook, f"http://127.0.0.1:{port}", out)

    yield start
    for hook, runner in started:
        await runner.cleanup()
        await hook.aclose()


async def test_one_run_per_firing_group_and_again_after_it_resolved(start_hook: StartHook) -> None:
    hook = await start_hook()
    assert await hook.post(notification(alert("age"))) == (202, {"action": "run", "group_key": GROUP_KEY})
    await hook.runs_finished(1)
    # the repeat_interval re-send, and a second feature joining the group: the same firing group
    assert (await hook.post(notification(alert("age"))))[1]["action"] == "duplicate"
    assert (await hook.post(notification(alert("age"), alert("city"))))[1]["action"] == "duplicate"
    assert len(hook.runs()) == 1
    (run,) = hook.runs()
    env = run["env"]
    assert env["INFERMON_ALERT_ALERTNAME"] == "InfermonDriftDetected"
    assert (env["INFERMON_ALERT_MODEL"], env["INFERMON_ALERT_VERSION"], env["INFERMON_ALERT_VARIANT"]) == (
        "iris", "2", "stable",
    )  # fmt: skip
    assert env["INFERMON_ALERT_FEATURE"] == "age"
    assert env["INFERMON_ALERT_GROUP_KEY"] == GROUP_KEY
    assert env["INFERMON_ALERT_STATUS"] == "firing"
    assert env["INFERMON_ALERT_RECEIVER"] == "retrain"
    assert env["INFERMON_ALERT_COUNT"] == "1"
    assert env["INFERMON_ALERT_STARTS_AT"] == "2026-11-25T16:22:39.123Z"
    assert json.loads(env["INFERMON_ALERT_LABELS"])["feature"] == ["age"]
    assert run["stdin"]["groupKey"] == GROUP_KEY and run["stdin"]["alerts"][0]["labels"]["feature"] == "age"

    assert await hook.post(notification(alert("age", "resolved"), status="resolved")) == (200, {"action": "resolved"})
    assert (await hook.get("/status"))[1]["groups"] == []
    # it fires again: a new firing group for the hook, with both features this time
    assert (await hook.post(notification(alert("age"), alert("city"))))[1]["action"] == "run"
    await hook.runs_finished(2)
    second = hook.runs()[1]["env"]
    assert second["INFERMON_ALERT_FEATURE"] == "age,city"
    assert second["INFERMON_ALERT_COUNT"] == "2"
    status = (await hook.get("/status"))[1]
    assert [r["outcome"] for r in status["runs"]] == ["ok", "ok"]
    assert status["notifications"] == {"duplicate": 2, "resolved": 1, "run": 2}
    assert status["groups"][0]["state"] == "done"


async def test_groups_are_told_apart_by_their_key(start_hook: StartHook) -> None:
    hook = await start_hook()
    other = GROUP_KEY.replace('model="iris"', 'model="churn"')
    for key in (GROUP_KEY, other, GROUP_KEY, other):
        await hook.post(notification(alert(), group_key=key))
    await hook.runs_finished(2)
    assert sorted(r["env"]["INFERMON_ALERT_GROUP_KEY"] for r in hook.runs()) == sorted([GROUP_KEY, other])


async def test_label_values_reach_the_command_as_data_never_as_a_command(start_hook: StartHook, tmp_path: Path) -> None:
    marker = tmp_path / "injected"
    hostile = f"x; touch {marker}; $(touch {marker}) `touch {marker}` ' \" \n"
    hook = await start_hook()
    assert (await hook.post(notification(alert(hostile, model=f"$(touch {marker})"))))[0] == 202
    await hook.runs_finished(1)
    env = hook.runs()[0]["env"]
    assert env["INFERMON_ALERT_FEATURE"] == hostile
    assert env["INFERMON_ALERT_MODEL"] == f"$(touch {marker})"
    assert not marker.exists()


async def test_label_names_that_are_not_variable_names_or_clash_are_left_to_the_json(start_hook: StartHook) -> None:
    hook = await start_hook()
    odd = alert()
    odd["labels"].update({"status": "weird", "app.kubernetes.io/name": "iris", "count": "9"})
    assert (await hook.post(notification(odd)))[0] == 202
    await hook.runs_finished(1)
    env = hook.runs()[0]["env"]
    assert env["INFERMON_ALERT_STATUS"] == "firing" and env["INFERMON_ALERT_COUNT"] == "1"
    labels = json.loads(env["INFERMON_ALERT_LABELS"])
    assert labels["status"] == ["weird"] and labels["app.kubernetes.io/name"] == ["iris"]
    assert not any("KUBERNETES" in k for k in env)


async def test_the_token_is_required_and_never_handed_to_the_command(
    start_hook: StartHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "s3cret-s3cret-s3cret")
    hook = await start_hook(token="s3cret-s3cret-s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-s3cret-s3cret"}):
        status, body = await hook.post(notification(alert()), headers=headers)
        assert status == 401 and "bearer token" in body["error"]
    # a header that is not UTF-8: refused like any wrong token, not a 500
    raw = json.dumps(notification(alert())).encode()
    status, answer = await _post_in_parts(hook.url, f"Authorization: Bearer \xe9\r\nContent-Length: {len(raw)}", raw)
    assert status == 401 and "bearer token" in answer["error"]
    status, _ = await hook.post(notification(alert()), headers={"Authorization": "Bearer s3cret-s3cret-s3cret"})
    assert status == 202
    await hook.runs_finished(1)
    assert hook.runs()[0]["token_seen"] is False


def _bad(mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    body = copy.deepcopy(notification(alert()))
    mutate(body)
    return body


BAD = {
    "version 3": (_bad(lambda b: b.update(version="3")), "version must be \"4\""),
    "no groupKey": (_bad(lambda b: b.pop("groupKey")), "groupKey must be a non-empty string"),
    "status": (_bad(lambda b: b.update(status="pending")), "status must be firing or resolved"),
    "no alerts": (_bad(lambda b: b.update(alerts=[])), "alerts must be a non-empty list"),
    "alert not an object": (_bad(lambda b: b.update(alerts=["x"])), "alerts[0] must be an object"),
    "label not a string": (_bad(lambda b: b["alerts"][0]["labels"].update(model=3)), "alerts[0].labels.model must"),
    "NUL": (_bad(lambda b: b["alerts"][0]["labels"].update(model="a\x00b")), "NUL"),
    "no alertname": (_bad(lambda b: b["alerts"][0]["labels"].pop("alertname")), "labels.alertname is missing"),
    "a list": ([1, 2], "must be a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_a_bad_payload_is_a_400_saying_what_is_wrong(start_hook: StartHook, case: str) -> None:
    hook = await start_hook()
    body, message = BAD[case]
    status, answer = await hook.post(body)
    assert status == 400 and message in answer["error"], answer
    assert hook.hook.groups == {}


async def test_http_errors_are_json(start_hook: StartHook) -> None:
    hook = await start_hook()
    assert (await hook.post(None, raw=b"{not json"))[0] == 400
    status, body = await hook.post(None, raw=b"{}", headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in body["error"]
    status, body = await hook.post(None, raw=b" " * (MAX_BODY_BYTES + 1))
    assert status == 413 and "max_alerts" in body["error"]
    assert (await hook.get("/alerts"))[0] == 405
    assert (await hook.get("/nowhere"))[0] == 404
    assert await hook.get("/healthz") == (200, {"ok": True})


async def _post_in_parts(url: str, framing: str, *parts: bytes) -> tuple[int, dict[str, Any]]:
    """POST /alerts written in ``parts``, each once the hook has had time to read the one before."""
    host, port = url.removeprefix("http://").split(":")
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                f"POST /alerts HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{framing}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")  # a test may send a byte that is not UTF-8
            )
            for part in parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.1)  # a network's pace: the hook's handler has read what came so far
            answer = await reader.read()
        finally:
            writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


async def test_a_notification_that_arrives_in_pieces_is_read_whole(start_hook: StartHook) -> None:
    """Alertmanager's body for a large group spans many TCP segments: all of them are the notification
    (a 400 here is never retried by Alertmanager, and the retraining would be lost)."""
    hook = await start_hook()
    body = json.dumps(notification(*(alert(f"feature_{i}") for i in range(50)))).encode()
    assert len(body) > 10_000
    status, answer = await _post_in_parts(hook.url, f"Content-Length: {len(body)}", body[:1000], body[1000:])
    assert (status, answer) == (202, {"action": "run", "group_key": GROUP_KEY})
    await hook.runs_finished(1)
    assert len(hook.runs()[0]["env"]["INFERMON_ALERT_FEATURE"].split(",")) == 50
    # chunked, without a length to refuse it by up front: the limit holds for what arrives
    half = MAX_BODY_BYTES // 2 + 1
    chunk = f"{half:x}\r\n".encode() + b" " * half + b"\r\n"
    status, answer = await _post_in_parts(hook.url, "Transfer-Encoding: chunked", chunk, chunk, b"0\r\n\r\n")
    assert status == 413 and "max_alerts" in answer["error"]


async def test_a_failed_run_is_tried_again_at_the_next_notification(start_hook: StartHook) -> None:
    hook = await start_hook("3")  # record.py exits 3
    await hook.post(notification(alert()))
    await hook.runs_finished(1)
    run = (await hook.get("/status"))[1]["runs"][0]
    assert (run["outcome"], run["exit_code"], run["detail"]) == ("failed", 3, "exit status 3")
    assert (await hook.post(notification(alert())))[1]["action"] == "run"  # the repeat brings it back
    await hook.runs_finished(2)
    assert len(hook.runs()) == 2


async def test_a_command_past_its_timeout_is_stopped_with_its_children(start_hook: StartHook, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    out = tmp_path / "unused"
    out.mkdir()
    hook = await start_hook(timeout=0.5)
    # a shell whose child would outlive a kill of the shell alone
    hook.hook.cfg.command = ["/bin/sh", "-c", f'sleep 30 & echo $! > "{pidfile}"; wait']
    await hook.post(notification(alert()))
    await hook.runs_finished(1)
    run = hook.hook.runs[0]
    assert run.outcome == "timeout" and "--timeout" in run.detail
    child = int(pidfile.read_text())

    async def child_gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        # a zombie waiting for init to reap it is gone too
        return Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z"  # noqa: ASYNC240 - /proc, no disk

    await wait_until(child_gone)
    assert (await hook.post(notification(alert())))[1]["action"] == "run"  # a timeout is a failure: again


async def test_a_command_that_cannot_start_is_an_error_run(start_hook: StartHook, tmp_path: Path) -> None:
    hook = await start_hook()
    hook.hook.cfg.command = [str(tmp_path / "missing")]
    await hook.post(notification(alert()))
    await hook.runs_finished(1)
    assert hook.hook.runs[0].outcome == "error" and "cannot start" in hook.hook.runs[0].detail
    assert hook.hook.groups == {}


async def test_concurrency_and_the_pending_bound(start_hook: StartHook, tmp_path: Path) -> None:
    release = tmp_path / "release"
    hook = await start_hook("0", str(release), concurrency=1, max_pending=1)
    keys = [GROUP_KEY.replace('model="iris"', f'model="m{i}"') for i in range(3)]
    assert (await hook.post(notification(alert(), group_key=keys[0])))[0] == 202

    async def running() -> bool:
        return len(hook.runs()) == 1  # the first run has started (and waits for the release)

    await wait_until(running)
    assert (await hook.post(notification(alert(), group_key=keys[1])))[0] == 202  # waits for the slot
    status, body = await hook.post(notification(alert(), group_key=keys[2]))
    assert status == 503 and "--max-pending" in body["error"]
    states = {g["group_key"]: g["state"] for g in (await hook.get("/status"))[1]["groups"]}
    assert states == {keys[0]: "running", keys[1]: "pending"}
    release.touch()
    await hook.runs_finished(2)
    assert [r["env"]["INFERMON_ALERT_GROUP_KEY"] for r in hook.runs()] == keys[:2]
    assert (await hook.post(notification(alert(), group_key=keys[2])))[0] == 202  # Alertmanager's retry


async def test_resolved_while_running_then_firing_again_runs_once_more(start_hook: StartHook, tmp_path: Path) -> None:
    release = tmp_path / "release"
    hook = await start_hook("0", str(release))
    await hook.post(notification(alert()))

    async def running() -> bool:
        return len(hook.runs()) == 1

    await wait_until(running)
    assert (await hook.post(notification(alert("age", "resolved"), status="resolved")))[1]["action"] == "resolved"
    assert (await hook.post(notification(alert())))[1]["action"] == "queued"
    assert (await hook.post(notification(alert())))[1]["action"] == "duplicate"
    release.touch()
    await hook.runs_finished(2)
    assert len(hook.runs()) == 2


async def test_resolved_before_a_slot_was_free_runs_nothing(start_hook: StartHook, tmp_path: Path) -> None:
    release = tmp_path / "release"
    hook = await start_hook("0", str(release))
    other = GROUP_KEY.replace('model="iris"', 'model="churn"')
    await hook.post(notification(alert()))
    await hook.post(notification(alert(), group_key=other))  # pending behind the first
    await hook.post(notification(alert("age", "resolved"), status="resolved", group_key=other))
    release.touch()
    await hook.runs_finished(1)

    async def forgotten() -> bool:
        return other not in hook.hook.groups

    await wait_until(forgotten)
    assert [r["env"]["INFERMON_ALERT_GROUP_KEY"] for r in hook.runs()] == [GROUP_KEY]


async def test_a_group_not_heard_of_for_forget_after_runs_again(tmp_path: Path) -> None:
    now = [1000.0]
    out = tmp_path / "runs"
    out.mkdir()
    hook = RetrainHook(HookConfig([sys.executable, str(RECORD), str(out)], forget_after=60.0), clock=lambda: now[0])
    try:
        note = parse_notification(json.dumps(notification(alert())).encode())
        assert hook.notify(note)[1]["action"] == "run"
        async with asyncio.timeout(TIMEOUT):
            while not hook.runs:
                await hook.run_finished.wait()
        now[0] += 59
        assert hook.notify(note)[1]["action"] == "duplicate"  # and heard of again now
        now[0] += 61  # the resolved notification was lost
        assert hook.notify(note)[1]["action"] == "run"
        async with asyncio.timeout(TIMEOUT):
            while len(hook.runs) < 2:
                await hook.run_finished.wait()
    finally:
        await hook.aclose()
    assert len(hook.runs) == 2


def test_parse_reads_the_fields_the_hook_uses() -> None:
    note = parse_notification(json.dumps(notification(alert("age"), alert("city", "resolved"))).encode())
    assert note.status == "firing" and note.group_key == GROUP_KEY and note.receiver == "retrain"
    assert [a.labels["feature"] for a in note.firing] == ["age"]
    assert note.common_labels["model"] == "iris"
    with pytest.raises(PayloadError, match="not JSON"):
        parse_notification(b"\xff")
