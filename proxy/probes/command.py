"""``infermon probe record`` and ``infermon probe check``: a probe set against a model server, once.

Neither needs a running proxy: each opens a connection pool of its own to ``--upstream`` and sends
through the same own-request code and checks as ``infermon proxy --probes`` (so a set that passes in
CI passes in the sidecar, and the other way round).

- ``record`` replays a requests file (the probe format; ``expect`` optional) against a model server
  known to be good and writes each line back with the answer as its expectation: the status, the JSON
  body (numbers within ``--rel-tol`` / ``--abs-tol``), and the fields that differed between
  ``--repeat`` answers to the same request (ids, timestamps, sampled text) listed in ``ignore``.
  Expectations the line already has (labels, conditions, a latency bound, a status) are kept and
  must hold for the good server too.
- ``check`` runs a set once and exits 1 on any failure, for pipelines that gate a model release.

Exit statuses: 0 every probe passed (``record``: the file was written), 1 a probe failed or got no
answer (``record``: a request did; nothing is written), 2 bad usage, a bad probe file or upstream URL.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from proxy import loop
from proxy.dataplane.exchange import Headers
from proxy.dataplane.own import DEFAULT_MAX_BODY, OwnRequest, OwnResult, build_request
from proxy.dataplane.upstream import UpstreamPool
from proxy.errors import ConfigError
from proxy.probes import spec
from proxy.probes.check import Outcome, differences, has_float, path_text, writable
from proxy.probes.runner import run_probe, run_set
from proxy.probes.spec import UNSET, Probe
from proxy.sampling.extract import parse_path
from proxy.settings import Upstream, check_upstream_url

UPSTREAM = "stable"


class PoolSender:
    """Own requests through a pool of this process's own (the proxy's :meth:`DataPlane.send`, alone)."""

    def __init__(self, url: str) -> None:
        self.pool = UpstreamPool(asyncio.get_running_loop(), UPSTREAM, url, Upstream())

    def send(
        self,
        upstream: str,
        method: str,
        target: bytes,
        headers: Headers,
        body: bytes,
        callback: Callable[[OwnResult], None],
        *,
        timeout: float,
        max_body_bytes: int = DEFAULT_MAX_BODY,
    ) -> OwnRequest:
        if upstream != UPSTREAM:
            raise KeyError(f"no upstream named {upstream!r}")
        request = build_request(
            self.pool, method, target, headers, body, callback, timeout=timeout, max_body_bytes=max_body_bytes
        )
        request.begin()
        return request

    def close(self) -> None:
        self.pool.close()


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _json_path(text: str) -> str:
    try:
        parse_path(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _count(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= {low}")
        return int(text)

    return parse


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "probe",
        help="record or check golden-request probes against a model server",
        description="Golden-request probes: requests whose correct answers are known (see docs/probes.md).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--upstream", required=True, metavar="URL", help="the model server, http://host:port")
        p.add_argument("--timeout", type=_positive, default=10.0, metavar="SECONDS", help="per request (10)")
        p.add_argument(
            "--max-body-bytes",
            type=_count(1),
            default=1_048_576,
            metavar="BYTES",
            help="longest answer kept for the checks (1048576)",
        )
        p.add_argument(
            "--rel-tol",
            type=_tolerance,
            default=spec.DEFAULT_REL_TOL,
            metavar="X",
            help=f"relative tolerance for numbers, where a probe sets none ({spec.DEFAULT_REL_TOL:g})",
        )
        p.add_argument(
            "--abs-tol",
            type=_tolerance,
            default=spec.DEFAULT_ABS_TOL,
            metavar="X",
            help=f"absolute tolerance for numbers, where a probe sets none ({spec.DEFAULT_ABS_TOL:g})",
        )

    record = actions.add_parser(
        "record",
        help="replay requests against a good model server and write its answers as the expected ones",
        description="Replay each request of FILE (one JSON object per line: method, path, headers, body) "
        "against a model server known to be good and write it with its answer as the expectation.",
    )
    record.add_argument("--requests", required=True, metavar="FILE", help="the requests (the probe format)")
    record.add_argument("--out", required=True, metavar="FILE", help="the probe file to write (- for stdout)")
    record.add_argument(
        "--repeat",
        type=_count(1),
        default=2,
        metavar="N",
        help="answers per request; fields that differ between them are not compared (2)",
    )
    record.add_argument(
        "--ignore",
        type=_json_path,
        action="append",
        default=[],
        metavar="PATH",
        help="a JSON path never compared, in every recorded probe (repeat it; e.g. $.created, a timestamp "
        "that may agree between repeats)",
    )
    record.add_argument(
        "--match",
        choices=("json", "status"),
        default="json",
        help="what a recorded probe expects: the whole JSON answer (default) or the status only",
    )
    common(record)
    record.set_defaults(func=record_main)

    check = actions.add_parser(
        "check",
        help="run a probe set once; exit 1 when a probe fails",
        description="Send every probe of FILE to the model server once and compare the answers; exit 0 "
        "when all match, 1 when one does not (or gets no answer), 2 on a bad file or usage.",
    )
    check.add_argument("file", metavar="FILE", help="the probe file")
    check.add_argument("--concurrency", type=_count(1), default=1, metavar="N", help="probes in flight at once (1)")
    check.add_argument("--json", action="store_true", help="print a JSON report instead of lines")
    common(check)
    check.set_defaults(func=check_main)


def _upstream(url: str) -> str:
    try:
        return check_upstream_url(url)
    except ValueError as exc:
        raise ConfigError(f"config error: --upstream {url!r} {exc}") from None


# -- check ------------------------------------------------------------------------------------------


def check_main(args: argparse.Namespace) -> int:
    url = _upstream(args.upstream)
    probes = spec.load(args.file)
    outcomes = loop.run(_check(url, probes, args))
    failed = sum(1 for o in outcomes if not o.ok)
    if args.json:
        report = {
            "upstream": url,
            "file": args.file,
            "passed": len(outcomes) - failed,
            "failed": failed,
            "probes": [{"name": p.name, "line": p.line, **o.to_dict()} for p, o in zip(probes, outcomes, strict=True)],
        }
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        width = max(len(p.name) for p in probes)
        for probe, outcome in zip(probes, outcomes, strict=True):
            print(_line(probe, outcome, width))
        print(f"{len(probes)} probes against {url}: {len(probes) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _line(probe: Probe, outcome: Outcome, width: int) -> str:
    status = str(outcome.status) if outcome.status else "-"
    head = f"{'PASS' if outcome.ok else 'FAIL'}  {probe.name:<{width}}  {status:>3}  {outcome.duration * 1000:8.1f} ms"
    if outcome.ok:
        return head
    if outcome.error_kind is not None:
        return f"{head}  {outcome.error_kind}: {outcome.error}"
    lines = [f"{head}  {outcome.mismatches[0]}"] if outcome.mismatches else [head]
    pad = " " * (len(head) + 2)
    lines += [pad + str(m) for m in outcome.mismatches[1:]]
    if outcome.more:
        lines.append(f"{pad}... and {outcome.more} more")
    return "\n".join(lines)


async def _check(url: str, probes: list[Probe], args: argparse.Namespace) -> list[Outcome]:
    sender = PoolSender(url)
    try:
        return await run_set(
            sender,
            UPSTREAM,
            probes,
            concurrency=args.concurrency,
            timeout=args.timeout,
            max_body_bytes=args.max_body_bytes,
            rel_tol=args.rel_tol,
            abs_tol=args.abs_tol,
        )
    finally:
        sender.close()


# -- record -----------------------------------------------------------------------------------------


def record_main(args: argparse.Namespace) -> int:
    url = _upstream(args.upstream)
    probes = spec.load(args.requests)
    say = sys.stderr if args.out == "-" else sys.stdout
    lines, problems = loop.run(_record(url, probes, args, say))
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"nothing written: {len(problems)} of {len(probes)} requests did not get a good answer", file=sys.stderr)
        return 1
    text = "".join(line + "\n" for line in lines)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        tmp = f"{args.out}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, args.out)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {len(lines)} probes to {args.out} (answers of {url})", file=say)
    return 0


def _prune(paths: Sequence[str]) -> list[str]:
    """Paths without those inside another one of the list (``$.a`` covers ``$.a.b`` and ``$.a[0]``)."""
    keep = []
    for p in sorted(set(paths)):
        if not any(p != q and p.startswith(q) and p[len(q)] in ".[" for q in paths):
            keep.append(p)
    return keep


async def _record(url: str, probes: list[Probe], args: argparse.Namespace, say: Any) -> tuple[list[str], list[str]]:
    sender = PoolSender(url)
    lines: list[str] = []
    problems: list[str] = []
    try:
        for probe in probes:
            # the answer becomes expect.json: only the line's other expectations are checked now
            trial = dataclasses.replace(probe, expect=dataclasses.replace(probe.expect, json=UNSET))
            outcomes = []
            for _ in range(args.repeat):
                outcome = await run_probe(
                    sender,
                    UPSTREAM,
                    trial,
                    timeout=args.timeout,
                    max_body_bytes=args.max_body_bytes,
                    rel_tol=args.rel_tol,
                    abs_tol=args.abs_tol,
                )
                outcomes.append(outcome)
                if not outcome.ok:
                    break
            bad = next((o for o in outcomes if not o.ok), None)
            if bad is not None:
                problems.append(f"{args.requests}:{probe.line}: {probe.name}: {bad.reason}")
                continue
            line, note = _recorded(probe, outcomes, args)
            lines.append(line)
            print(f"recorded {probe.name}: {note}", file=say)
    finally:
        sender.close()
    return lines, problems


def _redact(doc: Any, secrets: dict[str, str]) -> tuple[Any, list[str]]:
    """``doc`` with every string that holds a secret replaced by ``<redacted: ${NAME}>`` (in place),
    and the paths of those strings (a server that echoes the caller's token in its answer)."""
    paths: list[str] = []

    def clean(value: str, steps: tuple[str | int, ...]) -> str | None:
        for var, secret in secrets.items():
            if secret in value:
                paths.append(path_text(writable(steps)))
                return f"<redacted: ${{{var}}}>"
        return None

    if not secrets:
        return doc, paths
    if type(doc) is str:
        cleaned = clean(doc, ())
        return (doc if cleaned is None else cleaned), paths
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(doc, ())]
    while stack:  # no recursion: an answer may nest deeper than Python's stack
        node, steps = stack.pop()
        items = enumerate(node) if type(node) is list else node.items() if type(node) is dict else ()
        for key, value in items:
            if type(value) is str:
                cleaned = clean(value, (*steps, key))
                if cleaned is not None:
                    node[key] = cleaned
            elif type(value) is list or type(value) is dict:
                stack.append((value, (*steps, key)))
    return doc, sorted(paths)


def _recorded(probe: Probe, outcomes: list[Outcome], args: argparse.Namespace) -> tuple[str, str]:
    raw = {"name": probe.name, **{k: v for k, v in probe.raw.items() if k != "name"}}
    expect: dict[str, Any] = dict(raw.get("expect") or {})
    first = outcomes[0]
    if "status" not in expect:
        expect["status"] = first.status
    notes = [f"status {first.status}"]
    answers = [o.answer for o in outcomes]
    if args.match == "json" and first.answer is not UNSET:
        rel = probe.expect.rel_tol if probe.expect.rel_tol is not None else args.rel_tol
        abs_ = probe.expect.abs_tol if probe.expect.abs_tol is not None else args.abs_tol
        differ = differences(answers, rel, abs_)
        secrets = dict(probe.secrets)  # the environment values its headers use: never written
        expect["json"], redacted = _redact(first.answer, secrets)
        if has_float(first.answer):
            expect.setdefault("rel_tol", rel)
            expect.setdefault("abs_tol", abs_)
            notes.append(f"numbers within rel_tol {rel:g} / abs_tol {abs_:g}")
        ignore = _prune([*expect.get("ignore", []), *args.ignore, *differ, *redacted])
        if ignore:
            expect["ignore"] = ignore
        if differ:
            notes.append(f"not compared (they differed between {len(answers)} answers): {', '.join(_prune(differ))}")
        if redacted:
            names = ", ".join(f"${{{var}}}" for var in secrets)
            notes.append(f"redacted (they hold the value of {names}): {', '.join(_prune(redacted))}")
        notes.insert(1, "JSON answer")
    elif args.match == "json":
        notes.append("the answer is not JSON: status only")
    raw["expect"] = expect
    # the stdlib writes NaN and Infinity (orjson would write null); the loader reads them back
    return json.dumps(raw, ensure_ascii=False, separators=(",", ":")), "; ".join(notes)


__all__ = ["PoolSender", "register"]
