"""Does an answer match a probe's expectations? Pure functions, safe in any thread.

:func:`check` takes what came back (status, body, duration, or the error that stopped it) and gives
an :class:`Outcome`: ok, or the mismatches, each with the check that failed, the JSON path inside
the answer (``$.predictions[0][1]``), what was expected and what came. Numbers agree when
``|got - expected| <= max(rel_tol * max(|got|, |expected|), abs_tol)`` (``math.isclose``); NaN agrees
with NaN; two integers (no fraction, no exponent in the JSON) agree only when equal. Booleans are not
numbers, and ``1`` equals ``1.0``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.probes.spec import UNSET, Condition, Expect, LabelCheck, Probe, parse_json
from proxy.sampling.extract import JsonPath

#: mismatches listed per probe result; the rest are counted (``more``)
MAX_MISMATCHES = 20
#: characters of a value shown in a mismatch
MAX_SHOWN = 200
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Steps = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Mismatch:
    check: str  # status, json, label, condition, latency, body
    path: str  # the JSON path inside the answer; "" for status and latency
    expected: Any
    got: Any
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {"check": self.check, "path": self.path, "expected": self.expected, "got": self.got}
        if self.detail:
            out["detail"] = self.detail
        return out

    def __str__(self) -> str:
        where = f" {self.path}" if self.path else ""
        text = f"{self.check}{where}: expected {_text(self.expected)}, got {_text(self.got)}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(slots=True)
class Outcome:
    """One run of one probe against one upstream."""

    ok: bool
    status: int = 0
    duration: float = 0.0  # seconds from the send to the end of the answer or the failure
    error_kind: str | None = None  # the answer never came: connect, timeout, reset, protocol, pool_exhausted ...
    error: str | None = None
    mismatches: list[Mismatch] = field(default_factory=list)
    more: int = 0  # mismatches beyond MAX_MISMATCHES, not listed
    answer: Any = UNSET  # the parsed JSON answer (for ``probe record``), when it was JSON

    @property
    def reason(self) -> str:
        """One line: why it failed ("" when ok)."""
        if self.ok:
            return ""
        if self.error_kind is not None:
            return f"{self.error_kind}: {self.error}"
        if not self.mismatches:
            return "failed"
        extra = len(self.mismatches) - 1 + self.more
        return str(self.mismatches[0]) + (f" (and {extra} more)" if extra else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "status": self.status,
            "duration_seconds": round(self.duration, 6),
            "error": None if self.error_kind is None else {"kind": self.error_kind, "reason": self.error},
            "mismatches": [m.to_dict() for m in self.mismatches],
            "more_mismatches": self.more,
        }


def _text(value: Any) -> str:
    if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
        return value[1:-1]  # <missing>, <absent>: a description, not a value
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)


def show(value: Any) -> Any:
    """``value`` as a mismatch shows it: small values whole, long strings and big containers cut to
    text; always something orjson can write (NaN, Infinity and huge integers become text)."""
    if isinstance(value, str):
        return value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + "..."
    if isinstance(value, list | dict):
        text = json.dumps(value, ensure_ascii=False)  # the stdlib writes NaN and huge integers
        try:
            orjson.dumps(value, option=orjson.OPT_STRICT_INTEGER)
        except TypeError:
            return _cut(text)
        return value if len(text) <= MAX_SHOWN and "NaN" not in text and "Infinity" not in text else _cut(text)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if type(value) is int and not -(2**63) <= value < 2**64:
        return _cut(str(value))
    return value


def _cut(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def path_text(steps: Steps) -> str:
    """The path of a concrete value, in the syntax a probe file reads back (``ignore``, conditions).

    That syntax has no escapes: a key holding ``'`` is written ``["..."]``; one holding both quotes
    cannot be written at all and is shown as RFC 9535 would (``['it\\'s "x"']``), for a reader only.
    """
    parts = ["$"]
    for step in steps:
        if isinstance(step, int):
            parts.append(f"[{step}]")
        elif _IDENT.fullmatch(step):
            parts.append(f".{step}")
        elif "'" not in step:
            parts.append(f"['{step}']")
        elif '"' not in step:
            parts.append(f'["{step}"]')
        else:
            parts.append("['" + step.replace("\\", "\\\\").replace("'", "\\'") + "']")
    return "".join(parts)


def writable(steps: Steps) -> Steps:
    """``steps`` up to the first key no path can name (one holding both quotes)."""
    for i, step in enumerate(steps):
        if isinstance(step, str) and "'" in step and '"' in step:
            return steps[:i]
    return steps


def walk(path: JsonPath, doc: Any) -> list[tuple[Steps, Any]]:
    """Every (concrete steps, value) ``path`` reaches in ``doc``, in document order; wildcards expanded."""
    matches: list[tuple[Steps, Any]] = [((), doc)]
    for step in path.steps:
        found: list[tuple[Steps, Any]] = []
        for steps, node in matches:
            if step is None:
                if type(node) is list:
                    found.extend(((*steps, i), v) for i, v in enumerate(node))
                elif type(node) is dict:
                    found.extend(((*steps, k), v) for k, v in node.items())
            elif type(step) is int:
                if type(node) is list and -len(node) <= step < len(node):
                    i = step % len(node)
                    found.append(((*steps, i), node[i]))
            elif type(node) is dict and step in node:
                found.append(((*steps, step), node[step]))
        matches = found
        if not matches:
            break
    return matches


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def close(got: float, expected: float, rel_tol: float, abs_tol: float) -> bool:
    """Numbers within the tolerances; two integers (JSON numbers without a fraction or an exponent:
    class indices, counts, timestamps) only when equal."""
    if type(got) is int and type(expected) is int:
        return got == expected
    try:
        if math.isnan(got) or math.isnan(expected):
            return math.isnan(got) and math.isnan(expected)
        if got == expected:
            return True
        return math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol)
    except OverflowError:  # an integer beyond the range of a float, and a float: never close
        return False


def _differs(got: float, expected: float) -> str:
    """How far apart two numbers are, for a mismatch ("" when a float cannot say)."""
    try:
        if type(got) is int and type(expected) is int:
            return f"differs by {abs(got - expected):.3g}; "
        return f"differs by {abs(float(got) - float(expected)):.3g}; "
    except OverflowError:
        return ""


class _Ignore:
    """``expect.ignore`` patterns matched against a concrete path while walking the answer."""

    def __init__(self, paths: tuple[JsonPath, ...]) -> None:
        self.patterns = [p.steps for p in paths]

    def __call__(self, steps: Steps, sizes: tuple[int, ...]) -> bool:
        for pattern in self.patterns:
            if len(pattern) != len(steps):
                continue
            for want, have, size in zip(pattern, steps, sizes, strict=True):
                if want is None:
                    continue
                if type(want) is int:
                    if type(have) is not int or not (want == have or (want < 0 and want + size == have)):
                        break
                elif want != have:
                    break
            else:
                return True
        return False


def scrub(value: Any, secrets: tuple[tuple[str, str], ...]) -> Any:
    """``value``, or ``<redacted: holds ${NAME}>`` when it holds (anywhere inside) the value of a
    secret: a model server may echo the caller's token in an answer this module reports."""
    if not secrets or value is None or type(value) in (bool, int, float):
        return value
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    for var, secret in secrets:
        # in a list or an object (JSON text) a secret with a quote or a backslash is escaped
        escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
        if secret in text or (escaped != secret and escaped in text):
            return f"<redacted: holds ${{{var}}}>"
    return value


class _Report:
    def __init__(self, secrets: tuple[tuple[str, str], ...] = ()) -> None:
        self.mismatches: list[Mismatch] = []
        self.more = 0
        self.secrets = secrets

    def add(self, check: str, steps: Steps | str, expected: Any, got: Any, detail: str = "") -> None:
        if len(self.mismatches) >= MAX_MISMATCHES:
            self.more += 1
            return
        where = steps if isinstance(steps, str) else path_text(steps)
        if self.secrets:  # before show() cuts a value: a token across the cut would still show in part
            expected, got, detail = (scrub(v, self.secrets) for v in (expected, got, detail))
        self.mismatches.append(Mismatch(check, where, show(expected), show(got), detail))


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"<a list of {len(value)}>"
    if isinstance(value, dict):
        return f"<an object of {len(value)} keys>"
    return value  # type: ignore[no-any-return]


def compare(
    expected: Any,
    got: Any,
    *,
    rel_tol: float,
    abs_tol: float,
    ignore: tuple[JsonPath, ...] = (),
    report: _Report | None = None,
) -> list[Mismatch]:
    """Where ``got`` differs from ``expected`` (the whole documents), ignored paths left out."""
    out = report or _Report()
    _compare(expected, got, (), (), rel_tol, abs_tol, _Ignore(ignore), out)
    return out.mismatches


def _compare(
    expected: Any,
    got: Any,
    steps: Steps,
    sizes: tuple[int, ...],
    rel_tol: float,
    abs_tol: float,
    ignore: _Ignore,
    out: _Report,
) -> None:
    if ignore.patterns and ignore(steps, sizes):  # $ itself too: an answer that differs as a whole
        return
    te, tg = type(expected), type(got)
    if _is_number(expected) and _is_number(got):
        if not close(got, expected, rel_tol, abs_tol):
            out.add("json", steps, expected, got, f"{_differs(got, expected)}rel_tol {rel_tol:g}, abs_tol {abs_tol:g}")
        return
    if te is dict and tg is dict:
        for key, value in expected.items():
            child = (*steps, key)
            if key not in got:
                if not (ignore.patterns and ignore(child, (*sizes, 0))):
                    out.add("json", child, show(value), "<missing>")
                continue
            _compare(value, got[key], child, (*sizes, 0), rel_tol, abs_tol, ignore, out)
        for key, value in got.items():
            if key not in expected:
                child = (*steps, key)
                if not (ignore.patterns and ignore(child, (*sizes, 0))):
                    out.add("json", child, "<absent>", value, "a key the expected answer does not have")
        return
    if te is list and tg is list:
        if len(expected) != len(got):
            out.add("json", steps, _describe(expected), _describe(got), "the lists differ in length")
        for i in range(min(len(expected), len(got))):
            _compare(expected[i], got[i], (*steps, i), (*sizes, len(got)), rel_tol, abs_tol, ignore, out)
        return
    if te is not tg or expected != got:
        out.add("json", steps, _describe(expected) if te in (list, dict) else expected,
                _describe(got) if tg in (list, dict) else got)  # fmt: skip


def _value_equal(got: Any, expected: Any, rel_tol: float, abs_tol: float) -> bool:
    if _is_number(got) and _is_number(expected):
        return close(got, expected, rel_tol, abs_tol)
    if type(got) is not type(expected):
        return False
    if isinstance(got, list):
        return len(got) == len(expected) and all(
            _value_equal(a, b, rel_tol, abs_tol) for a, b in zip(got, expected, strict=True)
        )
    if isinstance(got, dict):
        return got.keys() == expected.keys() and all(_value_equal(got[k], expected[k], rel_tol, abs_tol) for k in got)
    return bool(got == expected)


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if type(value) is bool:
        return "boolean"
    if type(value) is int:
        return "integer"
    if type(value) is float:
        return "integer" if value.is_integer() else "number"
    if type(value) is str:
        return "string"
    if type(value) is list:
        return "array"
    return "object"


def _has_type(value: Any, wanted: tuple[str, ...]) -> bool:
    kind = _type_of(value)
    return kind in wanted or (kind == "integer" and "number" in wanted)


def _check_label(label: LabelCheck, doc: Any, rel_tol: float, abs_tol: float, out: _Report) -> None:
    found = walk(label.path, doc)
    if not found:
        out.add(
            "label", label.path.text, label.value if label.argmax is None else f"argmax {label.argmax}", "<missing>"
        )
        return
    for steps, value in found:
        if label.argmax is not None:
            if type(value) is not list or not value or not all(_is_number(v) for v in value):
                out.add("label", steps, f"<a list of numbers, argmax {label.argmax}>", value)
                continue
            best = max(range(len(value)), key=lambda i: (value[i], -i))  # the first of equal maxima
            if best != label.argmax:
                out.add("label", steps, label.argmax, best, f"argmax of {show(value)}")
        elif not _value_equal(value, label.value, rel_tol, abs_tol):
            out.add("label", steps, label.value, value)


def _check_condition(cond: Condition, doc: Any, rel_tol: float, abs_tol: float, out: _Report) -> None:
    found = walk(cond.path, doc)
    if not cond.exists:
        for steps, value in found:
            out.add("condition", steps, "<absent>", value, "exists: false")
        return
    if not found:
        out.add("condition", cond.path.text, "<a value>", "<missing>")
        return
    for steps, value in found:
        if cond.type is not None and not _has_type(value, cond.type):
            out.add("condition", steps, f"<{' or '.join(cond.type)}>", value, f"type {_type_of(value)}")
            continue
        if cond.equals is not UNSET and not _value_equal(value, cond.equals, rel_tol, abs_tol):
            out.add("condition", steps, cond.equals, value, "equals")
        if cond.one_of is not None and not any(_value_equal(value, v, rel_tol, abs_tol) for v in cond.one_of):
            out.add("condition", steps, list(cond.one_of), value, "one_of")
        if cond.min is not None or cond.max is not None:
            if not _is_number(value):
                out.add("condition", steps, "<a number>", value, "min/max")
            else:
                if cond.min is not None and not value >= cond.min:
                    out.add("condition", steps, f"<at least {cond.min:g}>", value, "min")
                if cond.max is not None and not value <= cond.max:
                    out.add("condition", steps, f"<at most {cond.max:g}>", value, "max")
        if cond.min_length is not None or cond.max_length is not None:
            if type(value) not in (str, list, dict):
                out.add("condition", steps, "<a string or a list>", value, "length")
            else:
                n = len(value)
                if cond.min_length is not None and n < cond.min_length:
                    out.add("condition", steps, f"<length at least {cond.min_length}>", value, f"length {n}")
                if cond.max_length is not None and n > cond.max_length:
                    out.add("condition", steps, f"<length at most {cond.max_length}>", value, f"length {n}")
        if cond.matches is not None and (type(value) is not str or cond.matches.search(value) is None):
            out.add("condition", steps, f"<a string matching {cond.matches.pattern}>", value, "matches")


def parse_body(body: bytes) -> Any:
    """The answer's JSON, or UNSET when it is not JSON (NaN and Infinity accepted, integers exact)."""
    if not body.strip():
        return UNSET
    try:
        return parse_json(body)
    except ValueError:
        return UNSET


def _snippet(body: bytes, secrets: tuple[tuple[str, str], ...]) -> str:
    """The start of a body, as a mismatch shows it; redacted when a secret begins within it."""
    longest = max((len(secret.encode("utf-8")) for _, secret in secrets), default=0)
    head = body[: MAX_SHOWN + longest].decode("utf-8", "replace")
    cleaned = scrub(head, secrets)
    return str(cleaned) if cleaned is not head else body[:MAX_SHOWN].decode("utf-8", "replace")


def tolerances(expect: Expect, rel_tol: float, abs_tol: float) -> tuple[float, float]:
    """The probe's own tolerances, or the defaults given."""
    return (
        expect.rel_tol if expect.rel_tol is not None else rel_tol,
        expect.abs_tol if expect.abs_tol is not None else abs_tol,
    )


def check(
    probe: Probe,
    *,
    status: int,
    body: bytes,
    duration: float,
    truncated: bool = False,
    error_kind: str | None = None,
    error: str | None = None,
    rel_tol: float,
    abs_tol: float,
) -> Outcome:
    """What one answer (or failure) says about one probe."""
    if error_kind is not None:
        return Outcome(False, status, duration, error_kind, error or error_kind)
    expect = probe.expect
    out = _Report(probe.secrets)
    if expect.max_latency_ms is not None and duration * 1000.0 > expect.max_latency_ms:
        out.add("latency", "", f"<at most {expect.max_latency_ms:g} ms>", f"<{duration * 1000.0:.1f} ms>")
    wanted = expect.status
    if (wanted is None and not 200 <= status < 300) or (wanted is not None and status not in wanted):
        shown = wanted[0] if wanted is not None and len(wanted) == 1 else list(wanted) if wanted else "<2xx>"
        snippet = _snippet(body, probe.secrets)
        out.add("status", "", shown, status, f"body: {snippet}" if snippet.strip() else "")
        return Outcome(False, status, duration, mismatches=out.mismatches, more=out.more)
    doc = parse_body(body) if not truncated else UNSET
    if expect.needs_json:
        if truncated:
            out.add("body", "$", "<a JSON answer>", "<a body over the size limit, cut>")
        elif doc is UNSET:
            out.add("body", "$", "<a JSON answer>", _snippet(body, probe.secrets) or "<empty>")
        else:
            rtol, atol = tolerances(expect, rel_tol, abs_tol)
            if expect.json is not UNSET:
                compare(expect.json, doc, rel_tol=rtol, abs_tol=atol, ignore=expect.ignore, report=out)
            for label in expect.labels:
                _check_label(label, doc, rtol, atol, out)
            for cond in expect.conditions:
                _check_condition(cond, doc, rtol, atol, out)
    ok = not out.mismatches and not out.more
    return Outcome(ok, status, duration, mismatches=out.mismatches, more=out.more, answer=doc)


def differences(answers: list[Any], rel_tol: float, abs_tol: float) -> list[str]:
    """Paths (concrete, sorted) where repeated answers to one request differ: what ``probe record``
    leaves out of the comparison (ids, timestamps, sampled text)."""
    paths: set[str] = set()
    for other in answers[1:]:
        _compare(answers[0], other, (), (), rel_tol, abs_tol, _Ignore(()), _Unbounded(paths))
    return sorted(paths)


class _Unbounded(_Report):
    """Collects every differing path, none dropped."""

    def __init__(self, paths: set[str]) -> None:
        super().__init__()
        self.paths = paths

    def add(self, check: str, steps: Steps | str, expected: Any, got: Any, detail: str = "") -> None:
        self.paths.add(steps if isinstance(steps, str) else path_text(writable(steps)))


def has_float(doc: Any) -> bool:
    """Whether a document holds a number with a fraction or an exponent (what a tolerance is for)."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if type(node) is list:
            stack.extend(node)
        elif type(node) is dict:
            stack.extend(node.values())
        elif type(node) is float:
            return True
    return False


__all__ = [
    "MAX_MISMATCHES",
    "Mismatch",
    "Outcome",
    "check",
    "compare",
    "differences",
    "parse_body",
    "path_text",
    "walk",
    "writable",
]
