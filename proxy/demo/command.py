"""``infermon demo``: two versions of a real model, infermon in front of both, and traffic through it.

What runs, all in this process, on 127.0.0.1 (free ports unless ``--listen`` / ``--admin`` say):

1. the model (:mod:`proxy.demo.model`): a numpy logistic regression trained at start-up on
   generated data; ``stable`` on all of it, ``canary`` on a few mislabelled rows (less accurate);
2. one model server per version (:mod:`proxy.demo.model_server`: Open Inference Protocol v2 and a
   streaming OpenAI-style chat route); the canary is also slower and fails a few percent;
3. a reference profile built from the training data (:func:`proxy.drift.profile.build_profile`,
   what ``infermon baseline build`` writes) and golden probes recorded from stable's answers
   (the probe client of ``infermon probe record``), both in a temporary directory;
4. infermon (:class:`~proxy.app.ProxyApp`) in front of both: a 90/10 split, every request sampled
   for drift, feedback on, the probes every few seconds, the canary analysis every 2 s;
5. traffic (:mod:`proxy.demo.traffic`): inference requests, labels a little later, streamed chats;
   after ``--shift-after`` seconds two features move up by 2 standard deviations.

It prints the URLs, then a summary every ``--every`` seconds, read from the admin JSON endpoints
(``/canary``, ``/drift``, ``/quality``, ``/probes``) and the traffic's own counts. Stopping (Ctrl-C,
SIGTERM or the end of ``--duration``) goes from the outside in: the traffic stops sending and its
requests in flight finish, the labels still waiting are posted, the last state is read, the proxy
drains, the model servers stop, and the final summary is printed (``--summary-json FILE`` writes
it as JSON too); exit 0. An address that cannot be bound is one ``cannot listen on`` line and exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import webbrowser
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp import web

from proxy.app import ProxyApp
from proxy.demo import SHIFT_SD, SHIFTED
from proxy.demo.model import CLASSES, FEATURES, MEANS, Models, rows_of, train_models
from proxy.demo.model_server import build_model_app
from proxy.demo.traffic import MODEL, Traffic, TrafficStats, infer_body
from proxy.errors import ListenError
from proxy.settings import ProxyConfig, split_host_port

log = logging.getLogger("infermon.demo")

#: seconds the demo's own requests in flight, then other clients' requests, get to finish on a stop
GRACE = 5.0
#: how each version's model server behaves: base latency (seconds) and share of 500 answers
STABLE_DELAY, STABLE_ERRORS = 0.002, 0.0
CANARY_DELAY, CANARY_ERRORS = 0.005, 0.05
SPLIT = {"stable": 90, "canary": 10}
#: the first quality window: the canary's quality check and the scores shown read it
QUALITY_WINDOW = "10m"
CHECKS = ("errors", "latency", "predictions", "drift", "quality")


@dataclass
class Options:
    listen: str = "127.0.0.1:0"
    admin: str = "127.0.0.1:0"
    rate: float = 50.0
    duration: float | None = None
    shift_after: float | None = None
    every: float = 5.0
    seed: int = 7
    summary_json: str | None = None
    browser: bool = False


def _bind(address: str, flag: str) -> socket.socket:
    """A bound socket for ``address``, or :class:`ListenError` naming the flag to change."""
    host, port = split_host_port(address)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ListenError(address, exc, f"change {flag}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        # listening now holds the port: with SO_REUSEADDR two sockets that only bound could share it
        # (--listen and --admin the same), and the second server's start would fail with a traceback
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ListenError(address, exc, f"change {flag}") from None
    return sock


def _url(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# -- set-up -----------------------------------------------------------------------------------------


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_profile(models: Models, path: str) -> None:
    """The reference profile of the training data: the features and stable's predicted class."""
    from proxy.drift.profile import build_profile

    labels = models.stable.predict(models.x_train)
    rows = [{**row, "label": int(k)} for row, k in zip(rows_of(models.x_train), labels, strict=True)]
    profile = build_profile(
        rows, columns=FEATURES, predictions=["label"], source=f"demo training data ({len(rows)} generated rows)"
    )
    _write(path, profile.to_json())


def probe_requests() -> list[dict[str, Any]]:
    """The golden requests: a typical flower of each class (the class means), and the health route."""
    lines: list[dict[str, Any]] = [
        {"name": f"iris-{cls}", "path": f"/v2/models/{MODEL}/infer", "body": infer_body(np.round(MEANS[i], 2))}
        for i, cls in enumerate(CLASSES)
    ]
    lines.append({"name": "ready", "method": "GET", "path": "/v2/health/ready", "expect": {"status": 200}})
    return lines


async def record_probes(url: str, path: str) -> None:
    """Send each golden request to ``url`` twice with the probe client ``infermon probe record`` uses
    and write the probe file: status and JSON answer expected, what differed between the answers
    ignored, numbers within the default tolerances."""
    from proxy.probes import spec
    from proxy.probes.check import differences
    from proxy.probes.command import PoolSender
    from proxy.probes.runner import run_probe

    sender = PoolSender(url)
    out: list[bytes] = []
    try:
        for n, raw in enumerate(probe_requests(), 1):
            probe = spec.parse_line(raw, n)
            outcomes = [
                await run_probe(sender, "stable", probe, timeout=5.0, max_body_bytes=1 << 20,
                                rel_tol=spec.DEFAULT_REL_TOL, abs_tol=spec.DEFAULT_ABS_TOL)
                for _ in range(2)
            ]  # fmt: skip
            bad = next((o for o in outcomes if not o.ok), None)
            if bad is not None:
                raise RuntimeError(f"the stable model server answered probe {probe.name} wrong: {bad.reason}")
            expect = dict(raw.get("expect") or {})
            expect.setdefault("status", outcomes[0].status)
            if raw["path"].endswith("/infer"):
                expect["json"] = outcomes[0].answer
                ignore = differences([o.answer for o in outcomes], spec.DEFAULT_REL_TOL, spec.DEFAULT_ABS_TOL)
                # the canary is version 2 of the same model: its answers are compared, not its version
                expect["ignore"] = sorted({*ignore, "$.model_version"})
                expect["rel_tol"], expect["abs_tol"] = spec.DEFAULT_REL_TOL, spec.DEFAULT_ABS_TOL
            out.append(orjson.dumps({**raw, "expect": expect}))
    finally:
        sender.close()
    await asyncio.to_thread(_write, path, b"\n".join(out) + b"\n")


def proxy_config(opts: Options, stable: str, canary: str, profile: str, probes: str) -> ProxyConfig:
    return ProxyConfig.model_validate(
        {
            "listen": opts.listen,
            "admin": opts.admin,
            "upstream": stable,
            "upstreams": {"canary": canary},
            "split": {"weights": SPLIT},
            "readiness": {"path": "/v2/health/ready", "interval": 2.0},
            "drain": {"timeout": GRACE},
            "sampling": {"rate": 1.0},  # every request: the demo's rate is low
            # PSI decides (its noise on a few hundred rows stays far below 0.25, a 2 sd shift far above)
            "drift": {
                "reference": profile,
                "interval": 2.0,
                "window_size": 500,
                "min_samples": 150,
                "features": {f: {"method": "psi"} for f in FEATURES},
            },
            "feedback": {"enabled": True},
            "quality": {
                "interval": 1.0,
                "min_labels": 20,
                "windows": {QUALITY_WINDOW: {"seconds": 600.0, "max_labels": 10_000}},
            },
            "canary": {"interval": 120.0, "evaluate_every": 2.0, "min_requests": 30, "min_predictions": 30},
            "probes": {"file": probes, "interval": 3.0, "timeout": 5.0},
        }
    )


# -- reading the state --------------------------------------------------------------------------------


class Watcher:
    """Reads the admin JSON endpoints; remembers when the canary verdict first failed."""

    def __init__(self, admin_url: str, started_wall: float) -> None:
        self.admin_url = admin_url
        self.started_wall = started_wall
        self.docs: dict[str, Any] = {}
        self.first_fail_s: float | None = None
        self.session: aiohttp.ClientSession | None = None

    async def get(self, name: str) -> Any:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self.session.get(f"{self.admin_url}/{name}", headers={"Accept": "application/json"}) as resp:
                doc = await resp.json(loads=orjson.loads, content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return self.docs.get(name)
        if not isinstance(doc, dict):  # every admin JSON endpoint answers an object
            return self.docs.get(name)
        self.docs[name] = doc
        if name == "canary":
            self._note_verdict(doc)
        return doc

    def _note_verdict(self, doc: dict[str, Any]) -> None:
        variant = (doc.get("variants") or {}).get("canary") or {}
        at = doc.get("evaluated_at")
        if self.first_fail_s is None and variant.get("result") == "fail" and isinstance(at, (int, float)):
            self.first_fail_s = round(at - self.started_wall, 1)

    async def settle(self, since: float, timeout: float = 3.0) -> None:
        """Wait (at most ``timeout``) for a quality evaluation after ``since`` (wall time): the final
        scores then count the labels posted at the stop."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = await self.get("quality")
            at = doc.get("evaluated_at") if isinstance(doc, dict) else None
            if not isinstance(at, (int, float)) or at > since:
                return
            await asyncio.sleep(0.2)

    async def refresh(self) -> None:
        for name in ("canary", "drift", "quality", "probes"):
            await self.get(name)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _drift(doc: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant, v in ((doc or {}).get("variants") or {}).items():
        drifted = list(v.get("drifted") or [])
        out[variant] = {
            "drifted_features": [c for c in drifted if c in FEATURES],
            "drifted_predictions": [c for c in drifted if c not in FEATURES],
            "insufficient": list(v.get("insufficient") or []),
            "rows": v.get("rows", 0),
        }
    return out


def _canary(doc: Any, first_fail_s: float | None) -> dict[str, Any]:
    v = ((doc or {}).get("variants") or {}).get("canary") or {}
    checks = {name: (c or {}).get("result") for name, c in (v.get("checks") or {}).items()}
    return {
        "verdict": v.get("verdict"),
        "result": v.get("result"),
        "reason": v.get("reason"),
        "checks": checks,
        "requests": (doc or {}).get("requests") or {},
        "first_fail_s": first_fail_s,
    }


def _quality(doc: Any) -> dict[str, Any]:
    best: dict[str, dict[str, Any]] = {}
    for ls in (doc or {}).get("label_sets") or []:
        if ls.get("task") != "classification":
            continue
        window = (ls.get("windows") or {}).get(QUALITY_WINDOW) or {}
        labels = int(window.get("labels") or 0)
        variant = str(ls.get("variant"))
        if variant in best and best[variant]["labels"] >= labels:
            continue
        scores = window.get("scores") or {}
        best[variant] = {
            "labels": labels,
            **{k: scores[k] for k in ("accuracy", "f1_macro", "roc_auc", "log_loss", "join_rate") if k in scores},
        }
    return best


def _probes(doc: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for upstream, u in ((doc or {}).get("upstreams") or {}).items():
        last = u.get("last_round") or {}
        failed = list(last.get("failed") or [])
        out[upstream] = {
            "outcome": last.get("outcome"),
            "passed": last.get("passed", 0),
            "failed": failed,
            "rounds": u.get("rounds") or {},
        }
    return out


def snapshot(
    stats: TrafficStats, watcher: Watcher, models: Models, elapsed: float, urls: dict[str, str]
) -> dict[str, Any]:
    """Everything the summary shows, as plain data (also what ``--summary-json`` writes)."""
    rate = stats.error_rate()
    p50, p99 = stats.percentile_ms(50), stats.percentile_ms(99)
    return {
        "elapsed_s": round(elapsed, 1),
        "urls": urls,
        "models": {
            m.name: {"accuracy": round(m.accuracy, 4), "train_rows": m.rows, "train_seconds": round(m.train_seconds, 3)}
            for m in (models.stable, models.canary)
        },
        "train_seconds": round(models.seconds, 3),
        "traffic": {
            "requests": stats.sent,
            "inference": stats.infer,
            "chats": stats.chats,
            "statuses": {str(k): v for k, v in sorted(stats.by_status.items())},
            "failures": stats.failures,
            "error_rate": None if rate is None else round(rate, 4),
            "p50_ms": None if p50 is None else round(p50, 2),
            "p99_ms": None if p99 is None else round(p99, 2),
            "labels_posted": stats.labels_posted,
            "label_outcomes": dict(sorted(stats.label_outcomes.items())),
        },
        "shift": {
            "features": list(SHIFTED),
            "sd": SHIFT_SD,
            "started_s": stats.shift_started,
            "requests": stats.shifted,
        },
        "drift": _drift(watcher.docs.get("drift")),
        "canary": _canary(watcher.docs.get("canary"), watcher.first_fail_s),
        "quality": _quality(watcher.docs.get("quality")),
        "probes": _probes(watcher.docs.get("probes")),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def format_summary(s: dict[str, Any]) -> list[str]:
    """The summary as lines: a head line, then indented ones (drift, canary, scores, probes)."""
    t = s["traffic"]
    c = s["canary"]
    per = c.get("requests") or {}
    split = ", ".join(f"{k} {per[k]}" for k in ("stable", "canary") if k in per)
    split = f" (canary analysis: {split})" if split else ""
    err = "-" if t["error_rate"] is None else f"{t['error_rate'] * 100:.1f}%"
    lines = [
        f"{t['requests']} requests{split}, "
        f"p50 {_ms(t['p50_ms'])}, p99 {_ms(t['p99_ms'])}, errors {err}, {t['labels_posted']} labels posted"
    ]
    shift = s["shift"]
    shifted = (
        f"shifted {', '.join(shift['features'])} +{shift['sd']:g} sd since {shift['started_s']:g} s"
        if shift["started_s"] is not None else "no shift yet"
    )  # fmt: skip
    parts = []
    for variant in ("stable", "canary"):
        d = s["drift"].get(variant)
        if d is None:
            parts.append(f"{variant} -")
            continue
        found = d["drifted_features"] + d["drifted_predictions"]
        what = ", ".join(found) if found else "insufficient data" if d["insufficient"] else "none"
        parts.append(f"{variant} {what} ({d['rows']} rows)")
    lines.append(f"  drift     {' | '.join(parts)}; {shifted}")
    checks = ", ".join(f"{k} {v}" for k, v in c["checks"].items() if v) or "no evaluation yet"
    verdict = (c["result"] or "-").upper()
    when = f", failed first at {c['first_fail_s']:g} s" if c.get("first_fail_s") is not None else ""
    lines.append(f"  canary    {verdict} ({checks}){when}")
    scores = []
    for variant in ("stable", "canary"):
        q = s["quality"].get(variant)
        if q is None or "accuracy" not in q:
            scores.append(f"{variant} - ({0 if q is None else q['labels']} labels)")
        else:
            f1 = f", f1 {q['f1_macro']:.3f}" if "f1_macro" in q else ""
            scores.append(f"{variant} accuracy {q['accuracy']:.3f}{f1} ({q['labels']} labels)")
    lines.append(f"  scores    {' | '.join(scores)}")
    probes = []
    for upstream, p in s["probes"].items():
        total = p["passed"] + len(p["failed"])
        failing = f": {', '.join(p['failed'])} failing" if p["failed"] else ""
        probes.append(f"{upstream} {p['outcome'] or '-'} ({p['passed']} of {total} passed{failing})")
    lines.append(f"  probes    {' | '.join(probes) or '-'}")
    return lines


# -- running --------------------------------------------------------------------------------------------


def _open_browser(url: str) -> None:
    """Open the status page without ever holding the demo up (a thread of its own), and only where a
    graphical browser can exist: a text browser would take the terminal the summary is printed to."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return

    def go() -> None:
        with contextlib.suppress(Exception):
            webbrowser.open(url, new=2)

    threading.Thread(target=go, name="infermon-demo-browser", daemon=True).start()


async def _start_server(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, _url(sock.getsockname())


async def demo(opts: Options) -> int:
    listen = _bind(opts.listen, "--listen")
    try:
        admin = _bind(opts.admin, "--admin")
    except ListenError:
        listen.close()
        raise
    runners: list[web.AppRunner] = []
    try:
        with tempfile.TemporaryDirectory(prefix="infermon-demo-") as tmp:
            models = await asyncio.to_thread(train_models, opts.seed)
            profile = os.path.join(tmp, "profile.json")
            await asyncio.to_thread(write_profile, models, profile)
            stable_runner, stable_url = await _start_server(
                build_model_app(models.stable, seed=opts.seed, delay=STABLE_DELAY, error_rate=STABLE_ERRORS)
            )
            runners.append(stable_runner)
            canary_runner, canary_url = await _start_server(
                build_model_app(
                    models.canary, version="2", seed=opts.seed + 1, delay=CANARY_DELAY, error_rate=CANARY_ERRORS
                )
            )
            runners.append(canary_runner)
            probes = os.path.join(tmp, "probes.jsonl")
            await record_probes(stable_url, probes)
            cfg = proxy_config(opts, stable_url, canary_url, profile, probes)
            return await _serve(opts, cfg, listen, admin, models, stable_url, canary_url)
    finally:
        listen.close()
        admin.close()
        for runner in reversed(runners):
            await runner.cleanup()  # last: nothing reaches the model servers any more


async def _serve(
    opts: Options, cfg: ProxyConfig, listen: socket.socket, admin: socket.socket, models: Models,
    stable_url: str, canary_url: str,
) -> int:  # fmt: skip
    app = ProxyApp(cfg)
    await app.start(listen=listen, admin=admin)
    app.install_signal_handlers()
    proxy_url, admin_url = _url(app.proxy_address), _url(app.admin_address)
    urls = {
        "status_page": f"{admin_url}/",
        "metrics": f"{admin_url}/metrics",
        "proxy": proxy_url,
        "stable": stable_url,
        "canary": canary_url,
    }
    example = orjson.dumps(infer_body(np.array([5.9, 2.8, 4.3, 1.3]))).decode()
    print(
        f"infermon demo\n"
        f"  status page    {urls['status_page']}\n"
        f"  metrics        {urls['metrics']}\n"
        f"  JSON           {admin_url}/canary  /drift  /quality  /probes  /split  /readyz\n"
        f"  proxy          {proxy_url}   (try: curl -si {proxy_url}/v2/models/{MODEL}/infer -d '{example}')\n"
        f"  model servers  stable {stable_url}   canary {canary_url}   (Open Inference Protocol v2, "
        f"/v1/chat/completions)\n"
        f"models trained on {models.stable.rows} generated rows in {models.seconds:.2f} s: stable accuracy "
        f"{models.stable.accuracy:.3f}, canary {models.canary.accuracy:.3f} (trained on {models.canary.rows} "
        f"mislabelled rows)\n"
        f"split stable {SPLIT['stable']} / canary {SPLIT['canary']}; ~{opts.rate:g} requests/s"
        f"{'' if opts.duration is None else f' for {opts.duration:g} s'}; {' and '.join(SHIFTED)} shift by "
        f"+{SHIFT_SD:g} sd after {opts.shift_after:.3g} s; Ctrl-C to stop",
        flush=True,
    )
    if opts.browser:
        _open_browser(urls["status_page"])
    stats = TrafficStats()
    stop = asyncio.Event()
    started, started_wall = time.monotonic(), time.time()
    watcher = Watcher(admin_url, started_wall)
    traffic = Traffic(
        proxy_url, opts.rate, stats, admin_url=admin_url, duration=opts.duration, shift_after=opts.shift_after,
        seed=opts.seed, stop=stop, grace=GRACE,
    )  # fmt: skip
    sending = asyncio.create_task(traffic.run())
    signalled = asyncio.create_task(app.wait_for_signal())
    reporter = asyncio.create_task(_report(opts.every, stats, watcher, models, started, urls))
    try:
        await asyncio.wait({sending, signalled}, return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        await sending  # no new requests; the ones in flight finish (or are cancelled after GRACE)
    finally:
        for task in (signalled, reporter, sending):
            task.cancel()
        await asyncio.gather(signalled, reporter, sending, return_exceptions=True)
        with contextlib.suppress(Exception):
            await watcher.settle(time.time())  # the labels posted at the stop are scored
            await watcher.refresh()  # the last state, before the proxy stops
        await watcher.close()
        await app.shutdown()  # then the proxy drains what other clients still have in flight
    final = snapshot(stats, watcher, models, time.monotonic() - started, urls)
    print("final summary after " + f"{final['elapsed_s']:g} s", flush=True)
    for line in format_summary(final):
        print(f"  {line}" if not line.startswith("  ") else line, flush=True)
    if opts.summary_json:
        try:
            await asyncio.to_thread(_write, opts.summary_json, orjson.dumps(final, option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as exc:
            print(f"cannot write {opts.summary_json}: {exc.strerror or exc}", file=sys.stderr)
    return 0


async def _report(every: float, stats: TrafficStats, watcher: Watcher, models: Models, started: float,
                  urls: dict[str, str]) -> None:  # fmt: skip
    next_print = started + every
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        if now < next_print:
            await watcher.get("canary")  # every second: when the verdict first fails
            continue
        next_print += every
        await watcher.refresh()
        lines = format_summary(snapshot(stats, watcher, models, now - started, urls))
        print(f"[{now - started:4.0f} s] {lines[0]}", flush=True)
        for line in lines[1:]:
            print(f"        {line.strip()}", flush=True)
