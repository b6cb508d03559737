"""End to end with real servers: Prometheus and Alertmanager (Debian's packages) on the shipped files.

A proxy (in-process, tracing on) in front of a real model server, and ``infermon agent`` on the stub
NVML library, are scraped by a real Prometheus running deploy/prometheus/prometheus.yml (its targets
pointed at them, 1 s intervals) with the shipped rules; a real Alertmanager runs
deploy/alertmanager/alertmanager.yml with its Slack and PagerDuty URLs pointed at a test inbox and
its retraining webhook at a real ``RetrainHook``.

What is checked: request counts through Prometheus' query API after known traffic, the recording
rules' values, every rule evaluating without error, every dashboard expression answering, exemplars
carrying the trace ids the OTLP receiver got, an XID from the agent and a model server taken down
reaching PagerDuty and Slack through Alertmanager with their rendered annotations; and, through
Alertmanager's API, the retraining hook running once per firing group across repeats, a resolve
and a new firing, and inhibition.

The one override: ``InfermonUpstreamDown``'s ``for`` (1m as shipped, covered by the promtool unit
tests of test_prometheus_rules.py) is 1s here, and Alertmanager's group waits and intervals are
1-2 s, so the test takes seconds rather than minutes. Every wait polls an HTTP API with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.alerts.hook import HookConfig, RetrainHook
from tests.agent.conftest import StartAgent, agent_env
from tests.alerts.test_hook import RECORD
from tests.conftest import ProxyFactory, upstream_app
from tests.deploy.promql import ALERTMANAGER, DEPLOY, PROMETHEUS, RULE_FILES, load_yaml, needs_servers
from tests.deploy.test_grafana_dashboards import BOARDS, _concrete, _exprs
from tests.helpers import Client, bound_socket, free_port
from tests.otlp import Receiver, http_receiver

pytestmark = [needs_servers, pytest.mark.timeout(180)]

WAIT = 40.0  # seconds any one condition may take (a slow CI machine shares two cores)
TOKEN = "e2e-hook-token-0123456789"
ROUTING_KEY = "0123456789abcdef0123456789abcdef"
IRIS = "/v2/models/iris/versions/2/infer"


# -- helpers -------------------------------------------------------------------------------------


async def _get_json(url: str, **params: str) -> Any:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, params=params) as resp,
    ):
        return await resp.json(content_type=None)


async def _until(what: str, probe: Callable[[], Awaitable[Any]], within: float = WAIT) -> Any:
    """Poll ``probe`` (an HTTP API: only polling can see it) until it returns something truthy."""
    last: Any = None
    try:
        async with asyncio.timeout(within):
            while True:
                last = await probe()
                if last:
                    return last
                await asyncio.sleep(0.25)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {within:g} s (last: {last!r})") from None


@dataclass
class Server:
    name: str
    proc: asyncio.subprocess.Process
    url: str
    log: Path

    def tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""


@contextlib.asynccontextmanager
async def _server(name: str, argv: list[str], url: str, log: Path) -> AsyncIterator[Server]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=asyncio.subprocess.STDOUT)
    server = Server(name, proc, url, log)
    try:

        async def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{server.tail()}")
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                    session.get(url + "/-/ready") as resp,
                ):
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await _until(f"{name} ready", ready)
        yield server
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@dataclass
class Inbox:
    """Slack's and PagerDuty's APIs, as far as Alertmanager sees them: every POST kept by path."""

    url: str = ""
    posts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.setdefault(request.path, []).append(await request.json())
        if request.path == "/pagerduty":
            return web.json_response({"status": "success", "message": "Event processed"}, status=202)
        return web.Response(text="ok")

    def find(self, path: str, needle: str) -> list[dict[str, Any]]:
        return [p for p in self.posts.get(path, []) if needle in json.dumps(p)]


@contextlib.asynccontextmanager
async def _inbox() -> AsyncIterator[Inbox]:
    inbox = Inbox()
    app = web.Application()
    app.router.add_post("/{tail:.*}", inbox.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    inbox.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield inbox
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _hook(out: Path) -> AsyncIterator[tuple[RetrainHook, str]]:
    hook = RetrainHook(HookConfig([sys.executable, str(RECORD), str(out)], token=TOKEN))
    runner = web.AppRunner(hook.app(), access_log=None, handle_signals=False)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    try:
        yield hook, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        await hook.aclose()


def _alertmanager_config(tmp: Path, inbox: Inbox, hook_url: str) -> Path:
    """The shipped configuration; only its secrets' files, its URLs and its waits are the test's."""
    cfg = load_yaml(DEPLOY / "alertmanager" / "alertmanager.yml")
    secrets = {"slack": f"{inbox.url}/slack", "pagerduty": ROUTING_KEY, "hook": TOKEN}
    for name, value in secrets.items():
        (tmp / name).write_text(value + "\n")
    cfg["global"]["slack_api_url_file"] = str(tmp / "slack")
    cfg["templates"] = [str(DEPLOY / "alertmanager" / t) for t in cfg["templates"]]

    def fast(route: dict[str, Any]) -> None:
        route["group_wait"], route["group_interval"] = "1s", "1s"
        if route.get("receiver") == "retrain":
            route["repeat_interval"] = "1s"  # so that repeats come while the test watches
        for child in route.get("routes", []):
            fast(child)

    fast(cfg["route"])
    for receiver in cfg["receivers"]:
        for pd in receiver.get("pagerduty_configs", []):
            pd["routing_key_file"] = str(tmp / "pagerduty")
            pd["url"] = f"{inbox.url}/pagerduty"
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"{hook_url}/alerts"
            hook["http_config"]["authorization"]["credentials_file"] = str(tmp / "hook")
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def _alertmanager(tmp: Path, inbox: Inbox, hook_url: str) -> AsyncIterator[Server]:
    assert ALERTMANAGER is not None
    port = free_port()
    argv = [
        ALERTMANAGER,
        f"--config.file={_alertmanager_config(tmp, inbox, hook_url)}",
        f"--storage.path={tmp / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip: one instance
        "--log.level=warn",
    ]
    async with _server("alertmanager", argv, f"http://127.0.0.1:{port}", tmp / "alertmanager.log") as server:
        yield server


def _prometheus_config(tmp: Path, proxy: str, agent: str, alertmanager: str) -> Path:
    """The shipped prometheus.yml with its targets pointed at the test's, every second."""
    cfg = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["global"]["external_labels"]["cluster"] = "e2e"
    rules = []
    for path in RULE_FILES:
        doc = load_yaml(path)
        for group in doc["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == "InfermonUpstreamDown":
                    rule["for"] = "1s"  # 1m as shipped (the promtool tests check that timing)
        copy = tmp / path.name
        copy.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
        rules.append(str(copy))
    assert [Path(r).name for r in rules] == cfg["rule_files"]
    cfg["rule_files"] = rules
    cfg["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}]
    targets = {"infermon": proxy, "infermon-agent": agent}
    assert {s["job_name"] for s in cfg["scrape_configs"]} == set(targets)
    for scrape in cfg["scrape_configs"]:
        scrape["scrape_interval"] = "1s"
        for static in scrape["static_configs"]:
            static["targets"] = [targets[scrape["job_name"]]]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url

    async def query(self, expr: str) -> list[dict[str, Any]]:
        answer = await _get_json(self.url + "/api/v1/query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def values(self, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in await self.query(expr)}


async def _upstream() -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(upstream_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def otlp() -> AsyncIterator[Receiver]:
    async for receiver in http_receiver():
        yield receiver


# -- Prometheus -> Alertmanager ------------------------------------------------------------------


async def test_prometheus_scrapes_records_and_alerts_through_alertmanager(
    tmp_path: Path, make_proxy: ProxyFactory, start_agent: StartAgent, stub_nvml_dir: Path, otlp: Receiver
) -> None:
    assert PROMETHEUS is not None
    upstream, upstream_url = await _upstream()
    stopped = False
    try:
        proxy = await make_proxy(
            upstream_url,
            tracing={"enabled": True, "endpoint": otlp.url, "sampler": "parentbased_always_on",
                     "schedule_delay": 0.05},
        )  # fmt: skip
        agent = await start_agent(
            "--interval", "0.2",
            env=agent_env(LD_LIBRARY_PATH=str(stub_nvml_dir), INFERMON_AGENT_HOST__ENABLED="false"),
        )  # fmt: skip
        out = tmp_path / "runs"
        out.mkdir()
        async with _inbox() as inbox, _hook(out) as (_, hook_url), _alertmanager(tmp_path, inbox, hook_url) as am:
            port = free_port()
            admin = f"{proxy.admin_address[0]}:{proxy.admin_address[1]}"
            config = _prometheus_config(
                tmp_path, admin, agent.url.removeprefix("http://"), am.url.removeprefix("http://")
            )
            argv = [
                PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage", "--log.level=warn",
            ]  # fmt: skip
            async with _server("prometheus", argv, f"http://127.0.0.1:{port}", tmp_path / "prometheus.log") as server:
                prom = Prom(server.url)
                await _check_traffic(prom, proxy.proxy_address, otlp)
                await _check_rules_and_dashboards(prom)
                await _check_the_agent(prom, inbox, agent.url)
                await upstream.cleanup()  # the model server goes away
                stopped = True
                await _check_upstream_down(prom, inbox, admin)
    finally:
        if not stopped:
            await upstream.cleanup()


async def _check_traffic(prom: Prom, proxy: tuple[str, int], otlp: Receiver) -> None:
    client = await Client.connect(proxy)

    async def send(ok: int, failed: int) -> None:
        for _ in range(ok):
            assert (await client.request("POST", IRIS, body=b'{"inputs": []}')).status == 200
        for _ in range(failed):
            assert (await client.request("GET", "/status/503")).status == 503

    def seen(ok: int, failed: int) -> Callable[[], Awaitable[dict[tuple[str, ...], float] | None]]:
        async def probe() -> dict[tuple[str, ...], float] | None:
            got = await prom.values(
                'sum by (model, version, code) (infermon_requests_total{job="infermon"})', "model", "version", "code"
            )
            return got if got == {("iris", "2", "200"): ok, ("unknown", "unknown", "503"): failed} else None

        return probe

    # in two steps, so that the counters grow between scrapes and the rates are not 0 / 0
    await send(1, 1)
    await _until("the first requests through Prometheus", seen(1, 1))
    await send(6, 2)
    await _until("the request counts through Prometheus", seen(7, 3))
    await client.close()
    up = await prom.values('up{job=~"infermon|infermon-agent"}', "job")
    assert up == {("infermon",): 1.0, ("infermon-agent",): 1.0}
    # the external label is on what Prometheus sends on, not on what it stores
    assert await prom.query('infermon_requests_total{cluster="e2e"}') == []

    # exemplars: the trace ids of sampled requests, the ones the collector received
    spans = await otlp.wait_spans(10)
    now = time.time()

    async def exemplars() -> set[str]:
        answer = await _get_json(prom.url + "/api/v1/query_exemplars",
                                 query='infermon_request_duration_seconds_bucket{model="iris"}',
                                 start=str(now - 600), end=str(now + 60))  # fmt: skip
        assert answer["status"] == "success", answer
        return {e["labels"]["trace_id"] for series in answer["data"] for e in series["exemplars"]}

    ids = await _until("exemplars of the latency histogram", exemplars)
    assert ids <= {s.trace_id for s in spans}


async def _check_rules_and_dashboards(prom: Prom) -> None:
    async def recorded() -> dict[tuple[str, ...], float] | None:
        ratio = await prom.values("infermon:request_errors:ratio_rate5m", "model")
        return ratio if set(ratio) == {("iris",), ("unknown",)} else None

    assert await _until("the error ratio recording rule", recorded) == {("iris",): 0.0, ("unknown",): 1.0}
    rate = await prom.values('infermon:requests:rate5m{model="iris"}', "version", "variant")
    assert set(rate) == {("2", "stable")} and rate["2", "stable"] > 0
    p99 = await prom.values('infermon:request_duration_seconds:quantile_rate5m{quantile="0.99"}', "model")
    assert set(p99) == {("iris",), ("unknown",)}

    async def evaluated() -> list[dict[str, Any]] | None:
        groups = (await _get_json(prom.url + "/api/v1/rules"))["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if all(not r["lastEvaluation"].startswith("0001") for r in rules) else None

    rules = await _until("every rule evaluated", evaluated)
    shipped = sum(len(g["rules"]) for path in RULE_FILES for g in load_yaml(path)["groups"])
    assert len(rules) == shipped
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert broken == {}

    for name, board in BOARDS.items():
        for where, expr in _exprs(board):
            answer = await _get_json(prom.url + "/api/v1/query", query=_concrete(expr))
            assert answer["status"] == "success", (name, where, answer)


async def _check_the_agent(prom: Prom, inbox: Inbox, agent: str) -> None:
    async def devices() -> dict[tuple[str, ...], float]:
        return await prom.values('infermon_gpu_devices{job="infermon-agent"}', "instance")

    assert await _until("the agent's GPUs in Prometheus", devices) == {(agent.removeprefix("http://"),): 2.0}
    # the stub delivers XID 79 on GPU 0: a critical alert, paged
    events = await _until(
        "the XID alert at PagerDuty", lambda: _async(inbox.find("/pagerduty", "InfermonGpuXidErrors"))
    )
    event = events[0]
    assert event["routing_key"] == ROUTING_KEY and event["event_action"] == "trigger"
    assert "reported XID 79" in event["payload"]["summary"]
    assert event["links"] == [
        {"href": "https://infermon.example/docs/alerts.md#infermongpuxiderrors", "text": "runbook"}
    ]


async def _check_upstream_down(prom: Prom, inbox: Inbox, admin: str) -> None:
    async def down() -> dict[tuple[str, ...], float] | None:
        up = await prom.values("infermon_upstream_up", "upstream")
        return up if up == {("stable",): 0.0} else None

    await _until("infermon_upstream_up 0", down)
    pages = await _until("InfermonUpstreamDown at PagerDuty",
                         lambda: _async(inbox.find("/pagerduty", "InfermonUpstreamDown")))  # fmt: skip
    assert pages[0]["payload"]["summary"] == f"InfermonUpstreamDown: {admin} cannot reach its model server"
    chats = await _until("InfermonUpstreamDown on Slack", lambda: _async(inbox.find("/slack", "InfermonUpstreamDown")))
    message = chats[0]
    assert message["channel"] == "#ml-alerts"
    (attachment,) = message["attachments"]
    assert attachment["title"] == "[FIRING:1] InfermonUpstreamDown (e2e)"
    assert f"*critical*: {admin} cannot reach its model server" in attachment["text"]
    assert "<https://infermon.example/docs/alerts.md#infermonupstreamdown|runbook>" in attachment["text"]


async def _async(value: Any) -> Any:
    return value


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + "Z"


# -- Alertmanager -> the retraining hook ---------------------------------------------------------


async def _post_alerts(am: Server, *alerts: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(am.url + "/api/v2/alerts", json=list(alerts)) as resp,
    ):
        assert resp.status == 200, await resp.text()


def _alert(labels: dict[str, str], firing: bool = True) -> dict[str, Any]:
    now = time.time()
    return {
        "labels": {"cluster": "e2e", **labels},
        "annotations": {"summary": f"{labels['alertname']} (e2e)", "description": "posted by the test",
                        "runbook_url": f"https://infermon.example/docs/alerts.md#{labels['alertname'].lower()}"},
        "startsAt": _iso(now - 5),
        "endsAt": _iso(now + 600 if firing else now - 1),
    }  # fmt: skip


async def test_alertmanager_runs_the_hook_once_per_firing_group_and_inhibits(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    out.mkdir()
    score = {"alertname": "InfermonModelScoreLow", "severity": "warning", "model": "churn", "version": "3",
             "variant": "stable", "metric": "accuracy", "instance": "10.0.0.1:9464", "job": "infermon"}  # fmt: skip
    async with _inbox() as inbox, _hook(out) as (hook, hook_url), _alertmanager(tmp_path, inbox, hook_url) as am:
        await _post_alerts(am, _alert(score))

        async def runs(n: int) -> bool:
            return len(hook.runs) >= n

        await _until("the first run", lambda: runs(1))
        # Alertmanager repeats the firing group (repeat_interval 1 s here): the hook does not run again
        await _until("two repeats", lambda: _async(hook.notifications["duplicate"] >= 2))
        assert len(hook.runs) == 1 and hook.runs[0].outcome == "ok"
        (first,) = [json.loads(p.read_text()) for p in out.glob("run-*.json")]
        env = first["env"]
        assert (env["INFERMON_ALERT_MODEL"], env["INFERMON_ALERT_VERSION"], env["INFERMON_ALERT_VARIANT"]) == (
            "churn", "3", "stable",
        )  # fmt: skip
        assert env["INFERMON_ALERT_METRIC"] == "accuracy" and env["INFERMON_ALERT_CLUSTER"] == "e2e"
        assert 'model="churn"' in env["INFERMON_ALERT_GROUP_KEY"] and env["INFERMON_ALERT_RECEIVER"] == "retrain"
        assert first["stdin"]["alerts"][0]["annotations"]["summary"] == "InfermonModelScoreLow (e2e)"
        # the same alert also went to Slack (the route continues)
        await _until("the score alert on Slack", lambda: _async(inbox.find("/slack", "InfermonModelScoreLow")))

        await _post_alerts(am, _alert(score, firing=False))
        await _until("the resolved notification", lambda: _async(hook.notifications["resolved"] >= 1))
        assert hook.groups == {}
        await _post_alerts(am, _alert(score))  # it fires again: a new firing group
        await _until("the second run", lambda: runs(2))
        assert len(list(out.glob("run-*.json"))) == 2

        # inhibition: a proxy that cannot be scraped silences its other alerts, not other proxies'
        down = {
            "alertname": "InfermonProxyDown",
            "severity": "critical",
            "instance": "10.0.0.9:9464",
            "job": "infermon",
        }
        dropped = {"alertname": "InfermonSamplesDropped", "severity": "warning", "job": "infermon"}
        await _post_alerts(am, _alert(down), _alert({**dropped, "instance": "10.0.0.9:9464"}),
                           _alert({**dropped, "instance": "10.0.0.8:9464"}))  # fmt: skip

        async def states() -> dict[str, str] | None:
            listed = await _get_json(am.url + "/api/v2/alerts", filter='alertname="InfermonSamplesDropped"')
            seen = {a["labels"]["instance"]: a["status"]["state"] for a in listed}
            # the inhibitor takes the source alert in on its own: both can be listed active before it has
            return seen if len(seen) == 2 and seen["10.0.0.9:9464"] == "suppressed" else None

        assert await _until("the down proxy's alert suppressed", states) == {
            "10.0.0.9:9464": "suppressed",
            "10.0.0.8:9464": "active",
        }

        # an upstream that is down silences its own variant's probe alerts on that proxy, not another's
        proxy = {"instance": "10.0.0.7:9464", "job": "infermon"}
        await _post_alerts(
            am,
            _alert({"alertname": "InfermonUpstreamDown", "severity": "warning", "upstream": "canary-a",
                    "variant": "canary-a", **proxy}),
            *(_alert({"alertname": "InfermonProbeFailing", "severity": "warning", "probe": "p1", "variant": v, **proxy})
              for v in ("canary-a", "canary-b")),
        )  # fmt: skip

        async def probes() -> dict[str, str] | None:
            listed = await _get_json(am.url + "/api/v2/alerts", filter='alertname="InfermonProbeFailing"')
            seen = {a["labels"]["variant"]: a["status"]["state"] for a in listed}
            return seen if len(seen) == 2 and seen["canary-a"] == "suppressed" else None

        assert await _until("canary-a's probe alert suppressed", probes) == {
            "canary-a": "suppressed",
            "canary-b": "active",
        }
