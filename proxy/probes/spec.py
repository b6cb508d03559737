"""The probe file: one golden request per JSON line, and what a correct answer looks like.

A line (docs/probes.md has the whole format and examples)::

    {"name": "iris-setosa", "method": "POST", "path": "/v1/models/iris:predict",
     "headers": {"authorization": "Bearer ${MODEL_TOKEN}"},
     "body": {"instances": [[5.1, 3.5, 1.4, 0.2]]},
     "expect": {"status": 200, "json": {"predictions": [0]}, "max_latency_ms": 500}}

:func:`load` reads and checks a whole file; every problem is a :class:`ProbeFileError` naming the file,
the line and the key (``probes.jsonl:3: unknown key 'expct' in the probe ...``). Header values may
name environment variables (``${NAME}``), so a token need not be written in the file; header values
never appear in an error message, in ``/probes`` or in a log.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from proxy.errors import ConfigError
from proxy.sampling.extract import JsonPath, parse_path

#: a probe name becomes the ``probe`` label: short, and only these characters. These patterns are
#: used with ``fullmatch``: ``$`` would also match before a final newline, which would then be sent
NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_METHOD = re.compile(r"[A-Z]{1,20}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: ``${NAME}`` in a header value: the environment variable NAME
ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: header fields a probe may not set: the data plane frames the request itself, and names the probe
FRAMING = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "x-infermon-probe",  # the probe's name, added to every probe request
    }
)
#: tolerances a recorded probe gets (and a line without its own, unless the configuration says
#: otherwise): about 80 float32 ulps relative, float32's epsilon absolute (docs/probes.md: why)
DEFAULT_REL_TOL = 1e-5
DEFAULT_ABS_TOL = 1e-7
#: a value a header takes from the environment (``${NAME}``) this long or longer is a secret: never
#: shown in a report of the answer (a server may echo it) nor written by record; shorter ones (a
#: tenant "1") would be found everywhere
SECRET_MIN_CHARS = 8

LINE_KEYS = ("name", "method", "path", "headers", "body", "body_text", "expect")
EXPECT_KEYS = ("status", "json", "ignore", "abs_tol", "rel_tol", "label", "conditions", "max_latency_ms")
LABEL_KEYS = ("path", "value", "argmax")
CONDITION_KEYS = ("path", "exists", "equals", "one_of", "type", "min", "max", "min_length", "max_length", "matches")
TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")


#: a run of 20 digits: maybe an integer beyond 64 bits, which orjson would read as a float
_LONG_DIGITS = re.compile(rb"[0-9]{20}")


def parse_json(raw: bytes) -> Any:
    """One JSON document, as probes compare it; ValueError when it is not JSON.

    orjson, but integers of any size stay exact integers (orjson reads one beyond 64 bits as a
    float, so two different ones would agree within a relative tolerance), and ``NaN`` and
    ``Infinity`` (which TensorFlow Serving writes and orjson refuses) are read. The stdlib reads
    what orjson does not.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:  # NaN, Infinity, an integer beyond the range of a double
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise ValueError(str(exc)) from None  # orjson's message: where, never what
    if _LONG_DIGITS.search(raw) is not None:
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            return doc
    return doc


class ProbeFileError(ConfigError):
    """A probe file that cannot be used; ``str(exc)`` names the file and line (``FILE:LINE: ...``)."""


class _LineError(ValueError):
    pass


#: ``expect.json`` absent (null is a valid expected document)
class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


@dataclass(frozen=True, slots=True)
class LabelCheck:
    """The class at ``path``: the value itself (``value``) or the index of the largest number of the
    list there (``argmax``, for a vector of probabilities or logits)."""

    path: JsonPath
    value: Any = UNSET
    argmax: int | None = None


@dataclass(frozen=True, slots=True)
class Condition:
    """A condition on every value ``path`` reaches (at least one must be reached, unless ``exists``
    is false: then none may be)."""

    path: JsonPath
    exists: bool = True
    equals: Any = UNSET
    one_of: tuple[Any, ...] | None = None
    type: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    matches: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class Expect:
    status: tuple[int, ...] | None = None  # None: any 2xx
    json: Any = UNSET
    ignore: tuple[JsonPath, ...] = ()
    abs_tol: float | None = None  # None: the runner's default
    rel_tol: float | None = None
    labels: tuple[LabelCheck, ...] = ()
    conditions: tuple[Condition, ...] = ()
    max_latency_ms: float | None = None

    @property
    def needs_json(self) -> bool:
        return self.json is not UNSET or bool(self.labels) or bool(self.conditions)


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    line: int
    method: str
    target: bytes
    #: as sent: environment variables expanded; never shown anywhere (not in repr either)
    headers: tuple[tuple[bytes, bytes], ...] = field(repr=False)
    body: bytes = field(repr=False)  # a probe body may hold what a header would
    expect: Expect
    #: the line as written (``${NAME}`` unexpanded): what ``probe record`` writes back
    raw: dict[str, Any] = field(repr=False, compare=False)
    #: (NAME, value) of each ``${NAME}`` the headers use, the value SECRET_MIN_CHARS or longer
    secrets: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)

    @property
    def path(self) -> str:
        return self.target.decode("ascii")

    @property
    def header_names(self) -> list[str]:
        return [name.decode("latin-1") for name, _ in self.headers]


def _unknown(obj: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in known:
            raise _LineError(f"unknown key {key!r} in {where} (known: {', '.join(known)})")


def _number(value: Any, where: str, *, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _LineError(f"{where} must be a number, not {_kind(value)}")
    if positive and value <= 0:
        raise _LineError(f"{where} must be above 0")
    if minimum is not None and value < minimum:
        raise _LineError(f"{where} must be at least {minimum:g}")
    return float(value)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _LineError(f"{where} must be a whole number >= 0")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _path(value: Any, where: str) -> JsonPath:
    if not isinstance(value, str):
        raise _LineError(f"{where} must be a JSON path string such as $.predictions[0]")
    try:
        return parse_path(value)
    except ValueError as exc:
        raise _LineError(f"{where}: {exc}") from None


def _status(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise _LineError("expect.status must be a status (200) or a list of them ([200, 201])")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 100 <= v <= 599:
            raise _LineError("expect.status must be a status from 100 to 599, or a list of them")
        out.append(v)
    return tuple(out)


def _label(value: Any, where: str) -> LabelCheck:
    if not isinstance(value, dict):
        raise _LineError(f'{where} must be an object such as {{"path": "$.predictions[0]", "value": "cat"}}')
    _unknown(value, LABEL_KEYS, where)
    if "path" not in value:
        raise _LineError(f"{where} needs a path (where the class is in the answer)")
    if ("value" in value) == ("argmax" in value):
        raise _LineError(f"{where} needs one of value (the class itself) or argmax (the index of the largest number)")
    argmax = None
    if "argmax" in value:
        argmax = _count(value["argmax"], f"{where}.argmax")
    return LabelCheck(_path(value["path"], f"{where}.path"), value.get("value", UNSET), argmax)


def _condition(value: Any, where: str) -> Condition:
    if not isinstance(value, dict):
        raise _LineError(
            f'{where} must be an object such as {{"path": "$.choices[0].message.content", "type": "string"}}'
        )
    _unknown(value, CONDITION_KEYS, where)
    if "path" not in value:
        raise _LineError(f"{where} needs a path")
    if len(value) == 1:
        raise _LineError(f"{where} has a path and nothing to check there (for example exists, equals, type, min)")
    exists = value.get("exists", True)
    if not isinstance(exists, bool):
        raise _LineError(f"{where}.exists must be true or false")
    if not exists and len(value) > 2:
        raise _LineError(f"{where}: exists false cannot be combined with other checks")
    one_of = value.get("one_of")
    if one_of is not None and (not isinstance(one_of, list) or not one_of):
        raise _LineError(f"{where}.one_of must be a non-empty list of values")
    types = value.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        bad = [t for t in types if t not in TYPES]
        if bad or not types:
            raise _LineError(f"{where}.type must be one of {', '.join(TYPES)} (or a list of them)")
    matches = value.get("matches")
    pattern = None
    if matches is not None:
        if not isinstance(matches, str):
            raise _LineError(f"{where}.matches must be a regular expression string")
        try:
            pattern = re.compile(matches)
        except re.error as exc:
            raise _LineError(f"{where}.matches is not a regular expression: {exc}") from None
    return Condition(
        path=_path(value["path"], f"{where}.path"),
        exists=exists,
        equals=value.get("equals", UNSET),
        one_of=tuple(one_of) if one_of is not None else None,
        type=tuple(types) if types is not None else None,
        min=_number(value["min"], f"{where}.min") if "min" in value else None,
        max=_number(value["max"], f"{where}.max") if "max" in value else None,
        min_length=_count(value["min_length"], f"{where}.min_length") if "min_length" in value else None,
        max_length=_count(value["max_length"], f"{where}.max_length") if "max_length" in value else None,
        matches=pattern,
    )


def parse_expect(value: Any) -> Expect:
    if not isinstance(value, dict):
        raise _LineError("expect must be an object (status, json, label, conditions, max_latency_ms ...)")
    _unknown(value, EXPECT_KEYS, "expect")
    ignore = value.get("ignore", [])
    if not isinstance(ignore, list):
        raise _LineError("expect.ignore must be a list of JSON paths")
    labels = value.get("label", [])
    labels = labels if isinstance(labels, list) else [labels]
    conditions = value.get("conditions", [])
    if not isinstance(conditions, list):
        raise _LineError("expect.conditions must be a list of conditions")
    return Expect(
        status=_status(value["status"]) if "status" in value else None,
        json=value.get("json", UNSET),
        ignore=tuple(_path(p, f"expect.ignore[{i}]") for i, p in enumerate(ignore)),
        abs_tol=_number(value["abs_tol"], "expect.abs_tol", minimum=0) if "abs_tol" in value else None,
        rel_tol=_number(value["rel_tol"], "expect.rel_tol", minimum=0) if "rel_tol" in value else None,
        labels=tuple(
            _label(v, f"expect.label[{i}]" if len(labels) > 1 else "expect.label") for i, v in enumerate(labels)
        ),
        conditions=tuple(_condition(c, f"expect.conditions[{i}]") for i, c in enumerate(conditions)),
        max_latency_ms=(
            _number(value["max_latency_ms"], "expect.max_latency_ms", positive=True)
            if "max_latency_ms" in value
            else None
        ),
    )


def _headers(
    value: Any, env: dict[str, str] | os._Environ[str]
) -> tuple[tuple[tuple[bytes, bytes], ...], tuple[tuple[str, str], ...]]:
    if not isinstance(value, dict):
        raise _LineError(
            'headers must be an object of name: value strings, such as {"authorization": "Bearer ${TOKEN}"}'
        )
    out: list[tuple[bytes, bytes]] = []
    secrets: dict[str, str] = {}
    for name, raw in value.items():
        if not _TOKEN.fullmatch(name):
            raise _LineError(f"header name {name!r} is not a valid HTTP field name")
        if name.lower() in FRAMING:
            raise _LineError(f"header {name!r} is set by the proxy for each request: remove it")
        if any(n == name.lower().encode("ascii") for n, _ in out):
            raise _LineError(f"header {name.lower()!r} is given twice (field names are case-insensitive)")
        if not isinstance(raw, str):
            raise _LineError(f"header {name!r} must have a string value")  # the value is never shown

        def expand(m: re.Match[str], name: str = name) -> str:
            var = m.group(1)
            if var not in env:
                raise _LineError(f"header {name!r} uses ${{{var}}}, which is not set in the environment")
            if len(env[var]) >= SECRET_MIN_CHARS:
                secrets[var] = env[var]
            return env[var]

        text = ENV.sub(expand, raw)
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text):
            raise _LineError(f"header {name!r} has a control character (a line break?) in its value")
        try:
            encoded = text.encode("latin-1")
        except UnicodeEncodeError:
            raise _LineError(f"header {name!r} has a value that is not Latin-1 text") from None
        out.append((name.lower().encode("ascii"), encoded))
    return tuple(out), tuple(secrets.items())


def parse_line(obj: Any, line: int, env: dict[str, str] | os._Environ[str] | None = None) -> Probe:
    """One probe from the parsed JSON of a line; raises ValueError naming the key."""
    if not isinstance(obj, dict):
        raise _LineError(f"a probe is a JSON object, not {_kind(obj)}")
    _unknown(obj, LINE_KEYS, "the probe")
    name = obj.get("name", f"line-{line}")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise _LineError("name must be 1 to 64 letters, digits, '_', '.', ':' or '-' (it becomes the probe label)")
    if "body" in obj and "body_text" in obj:
        raise _LineError("give body (JSON) or body_text (sent as it is), not both")
    body = b""
    json_body = False
    if "body" in obj:
        try:
            body = orjson.dumps(obj["body"])
        except TypeError:  # a number orjson cannot write (an integer beyond 64 bits)
            body = json.dumps(obj["body"]).encode()
        json_body = True
    elif "body_text" in obj:
        if not isinstance(obj["body_text"], str):
            raise _LineError("body_text must be a string")
        body = obj["body_text"].encode("utf-8")
    method = obj.get("method", "POST" if "body" in obj or "body_text" in obj else "GET")
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        raise _LineError("method must be an HTTP method in capitals, such as GET or POST")
    if method == "CONNECT":
        raise _LineError("method CONNECT cannot be probed")
    path = obj.get("path")
    if path is None:
        raise _LineError("path is missing (the request target, such as /v1/models/iris:predict)")
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or not path.isascii()
        or any(c <= " " or c == "\x7f" for c in path)
    ):
        raise _LineError("path must start with '/' and be ASCII without spaces (percent-encode the rest)")
    headers, secrets = _headers(obj.get("headers", {}), os.environ if env is None else env)
    if json_body and not any(n == b"content-type" for n, _ in headers):
        headers = (*headers, (b"content-type", b"application/json"))
    expect = parse_expect(obj.get("expect", {}))
    return Probe(name, line, method, path.encode("ascii"), headers, body, expect, obj, secrets)


def loads(
    text: str | bytes,
    source: str,
    *,
    max_probes: int | None = None,
    env: dict[str, str] | os._Environ[str] | None = None,
    allow_empty: bool = False,
) -> list[Probe]:
    """Every probe of a file's content; ProbeFileError names ``source`` and the line."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    probes: list[Probe] = []
    names: dict[str, int] = {}
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            try:
                obj = parse_json(line)
            except ValueError as exc:
                raise _LineError(f"not valid JSON ({exc})") from None
            probe = parse_line(obj, number, env)
        except _LineError as exc:
            raise ProbeFileError(f"{source}:{number}: {exc}") from None
        if probe.name in names:
            raise ProbeFileError(
                f"{source}:{number}: probe name {probe.name!r} is used on line {names[probe.name]} already; "
                "give each probe its own name"
            )
        names[probe.name] = number
        probes.append(probe)
        if max_probes is not None and len(probes) > max_probes:
            raise ProbeFileError(
                f"{source}:{number}: more than {max_probes} probes (each probe name is a metric label, so "
                "their number is capped): split the file or raise probes.max_probes"
            )
    if not probes and not allow_empty:
        raise ProbeFileError(f"{source}: no probes in the file (one JSON object per line)")
    return probes


def load(
    path: str | os.PathLike[str], *, max_probes: int | None = None, env: dict[str, str] | None = None
) -> list[Probe]:
    """Every probe of the file at ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ProbeFileError(f"{os.fspath(path)}: cannot read the probe file: {exc.strerror or exc}") from None
    return loads(data, os.fspath(path), max_probes=max_probes, env=env)


__all__ = [
    "DEFAULT_ABS_TOL",
    "DEFAULT_REL_TOL",
    "ENV",
    "SECRET_MIN_CHARS",
    "UNSET",
    "Condition",
    "Expect",
    "LabelCheck",
    "Probe",
    "ProbeFileError",
    "load",
    "loads",
    "parse_expect",
    "parse_json",
    "parse_line",
]
