"""Feature and prediction extraction: what an adapter reads from a sampled request and response.

Side path only (the worker thread). :meth:`Extractor.extract` parses both bodies (orjson; bodies are
already capped at ``sampling.max_body_bytes`` by the sampler), checks the bounds (nesting depth,
values per body, time), redacts them, then lets one adapter turn them into rows (one per instance of
a batched request) and predictions (one per instance of the response). It raises :class:`Dropped`
and nothing else: an adapter that meets a body it did not foresee gives ``Dropped("unparsable")``.

Adapters (``sampling.adapter``; ``auto`` detects from the path, then from the body's shape):
``kserve_v1``, ``tfserving``, ``oip_v2``, ``openai``, ``mapping`` (``sampling.mapping`` JSON paths)
and ``none`` (no features: the bodies only, still redacted). docs/drift.md has the naming rules.
"""

from __future__ import annotations

import json
import math
import re
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from proxy.sampling.llm import response_usage, sse_data, stream_usage, usage_from_tail
from proxy.sampling.redact import Redactor
from proxy.sampling.sample import Extracted, Sample
from proxy.settings import Sampling

DropReason = Literal["unparsable", "hostile"]

#: a string feature value longer than this is cut to it (a category that long is an identifier)
MAX_VALUE_CHARS = 256
#: the clock is read once per this many values walked or produced
CHECK_EVERY = 2048


class Dropped(Exception):
    """A sample that gives no extraction: ``reason`` is "unparsable" or "hostile"."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: DropReason = reason
        self.detail = detail


class _Budget:
    """The bounds of one extraction: values per body, and time for all of it."""

    __slots__ = ("_next", "deadline", "elements", "max_elements", "max_seconds", "work")

    def __init__(self, max_seconds: float, max_elements: int) -> None:
        self.max_seconds = max_seconds
        self.deadline = time.perf_counter() + max_seconds
        self.max_elements = max_elements
        self.elements = 0
        self.work = 0
        self._next = CHECK_EVERY

    def start_body(self) -> None:
        self.elements = 0

    def step(self, n: int = 1) -> None:
        """``n`` more units of work (values walked, produced, matched)."""
        self.work += n
        if self.work >= self._next:
            self._next = self.work + CHECK_EVERY
            self.clock()

    def clock(self) -> None:
        if time.perf_counter() > self.deadline:
            raise Dropped("hostile", f"extraction longer than {self.max_seconds} s")


class _NotJson:
    __slots__ = ()


_NOT_JSON = _NotJson()


def _check(obj: Any, max_depth: int, budget: _Budget) -> None:
    """Depth and value count of parsed JSON, without recursion (the clock read every CHECK_EVERY values)."""
    total = budget.elements + 1
    limit = budget.max_elements
    if total > limit:
        raise Dropped("hostile", f"more than {limit} values in one body")
    if type(obj) is dict or type(obj) is list:
        clock_at = total + CHECK_EVERY
        stack: list[tuple[Any, int]] = [(obj, 1)]
        pop = stack.pop
        push = stack.append
        while stack:
            node, depth = pop()
            if depth > max_depth:
                raise Dropped("hostile", f"nested deeper than {max_depth}")
            total += len(node)
            if total > limit:
                raise Dropped("hostile", f"more than {limit} values in one body")
            if total >= clock_at:
                clock_at = total + CHECK_EVERY
                budget.clock()
            below = depth + 1
            for child in node.values() if type(node) is dict else node:
                kind = type(child)
                if kind is dict or kind is list:
                    push((child, below))
    budget.elements = total


def _int_or_float(text: str) -> int | float:
    # integers beyond 64 bits become floats, as orjson reads them, so that they encode again
    return int(text) if len(text) <= 18 else float(text)


def _load(body: bytes | str, max_depth: int, budget: _Budget) -> Any:
    """Parsed and checked JSON, or ``_NOT_JSON``; raises Dropped("hostile") past the bounds."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise Dropped("hostile", f"nested deeper than {max_depth}") from None
        # TensorFlow Serving reads and writes NaN, Infinity and -Infinity, which orjson rejects
        if isinstance(body, str):
            raw = body
        else:
            try:
                raw = body.decode("utf-8")
            except UnicodeDecodeError:
                return _NOT_JSON
        if "NaN" not in raw and "Infinity" not in raw:
            return _NOT_JSON
        try:
            obj = json.loads(raw, parse_int=_int_or_float)
        except RecursionError:
            raise Dropped("hostile", f"nested deeper than {max_depth}") from None
        except ValueError:
            return _NOT_JSON
    if type(obj) is dict or type(obj) is list:
        size = len(body)
        # nesting needs an opening bracket per level, and every value takes at least one byte: a
        # body with few brackets and room for all its bytes cannot pass either bound, so the walk
        # is skipped (counting the body as one value per byte, an upper bound)
        raw_bytes = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
        if budget.elements + size <= budget.max_elements and raw_bytes.count(b"[") + raw_bytes.count(b"{") <= max_depth:
            budget.elements += size
            return obj
    _check(obj, max_depth, budget)
    return obj


def _header(headers: list[tuple[str, str]], name: str) -> str:
    for key, value in headers:
        if key.lower() == name:
            return value.strip().lower()
    return ""


def _inflate(body: bytes, headers: list[tuple[str, str]], limit: int) -> bytes | None:
    """The body without its gzip or deflate content coding (at most ``limit`` bytes); None: unreadable."""
    coding = _header(headers, "content-encoding")
    if not coding or coding == "identity":
        return body
    tries: tuple[int, ...]
    if coding in ("gzip", "x-gzip"):
        tries = (16 + zlib.MAX_WBITS,)
    elif coding == "deflate":
        tries = (zlib.MAX_WBITS, -zlib.MAX_WBITS)  # zlib-wrapped as the RFC says, or raw as some send
    else:
        return None  # br, zstd, a chain of codings: not read
    for wbits in tries:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        return out if len(out) <= limit else None
    return None


def _clip(value: str) -> str:
    return value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS]


def _scalar(value: Any) -> Any:
    """A feature value: a scalar as it is (strings clipped), anything else missing (None)."""
    kind = type(value)
    if kind is str:
        return _clip(value)
    if value is None or kind is bool or kind is int or kind is float:
        return value
    return None


def _put(row: dict[str, Any], name: str, value: Any) -> None:
    """A scalar becomes ``name``; a list of scalars ``name[0]``, ``name[1]``...; anything deeper is left out."""
    kind = type(value)
    if kind is list:
        for i, item in enumerate(value):
            item_kind = type(item)
            if item_kind is str:
                row[f"{name}[{i}]"] = _clip(item)
            elif item is None or item_kind is bool or item_kind is int or item_kind is float:
                row[f"{name}[{i}]"] = item
    elif kind is str:
        row[name] = _clip(value)
    elif value is None or kind is bool or kind is int or kind is float:
        row[name] = value


@dataclass(slots=True)
class _Context:
    columns: list[str] | None
    max_rows: int
    budget: _Budget
    redactor: Redactor


# ---------------------------------------------------------------------------------------------
# KServe v1 and TensorFlow Serving: instances (rows) and columnar inputs


def _instance_rows(instances: list[Any], ctx: _Context) -> list[dict[str, Any]]:
    """One row per instance: an object (keys are names), a row of values (names from the
    reference's columns when the width matches, else "0", "1", ...), or a scalar (one feature)."""
    columns = ctx.columns
    hidden = [i for i, name in enumerate(columns) if ctx.redactor.removes(name)] if columns else []
    rows: list[dict[str, Any]] = []
    step = ctx.budget.step
    for instance in instances[: ctx.max_rows]:
        row: dict[str, Any] = {}
        kind = type(instance)
        if kind is dict:
            pairs: Iterable[tuple[str, Any]] = instance.items()
        elif kind is list:
            if columns is not None and len(columns) == len(instance):
                for i in hidden:
                    instance[i] = None  # a redacted column: nulled in the body too
                pairs = zip(columns, instance, strict=True)
            else:
                pairs = zip(_positions(len(instance)), instance, strict=True)
        else:
            _put(row, columns[0] if columns is not None and len(columns) == 1 else "0", instance)
            step()
            rows.append(row)
            continue
        for name, value in pairs:
            value_kind = type(value)
            if value_kind is float or value_kind is int:
                row[name] = value  # the common case, without a call
            else:
                _put(row, name, value)
        step(len(instance) + 1)
        rows.append(row)
    return rows


_POSITIONS = [str(i) for i in range(64)]


def _positions(n: int) -> list[str]:
    """ "0", "1", ... "n-1": the names of a row of values no reference names."""
    return _POSITIONS[:n] if n <= len(_POSITIONS) else [str(i) for i in range(n)]


def _prediction_rows(predictions: Any, ctx: _Context) -> list[dict[str, Any]]:
    """One row per instance: a scalar is "prediction", a vector "prediction[k]", an object its keys."""
    if type(predictions) is not list:
        predictions = [predictions]
    rows: list[dict[str, Any]] = []
    step = ctx.budget.step
    for prediction in predictions[: ctx.max_rows]:
        row: dict[str, Any] = {}
        if type(prediction) is dict:
            for key, value in prediction.items():
                _put(row, key, value)
            step(len(prediction) + 1)
        else:
            _put(row, "prediction", prediction)
            step(len(prediction) + 1 if type(prediction) is list else 1)
        rows.append(row)
    return rows


def _columnar_rows(columns: dict[str, Any], ctx: _Context) -> list[dict[str, Any]]:
    """Named tensors in their nested form, batch first: row n takes element n of each list; a
    scalar (not batched) goes into every row."""
    lengths = [len(value) for value in columns.values() if type(value) is list]
    n = min(max(lengths) if lengths else (1 if columns else 0), ctx.max_rows)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    step = ctx.budget.step
    for name, value in columns.items():
        if type(value) is list:
            for row, item in zip(rows, value[:n], strict=False):
                _put(row, name, item)
        else:
            for row in rows:
                _put(row, name, value)
        step(n + 1)
    return rows


def _v1_request(request: Any, ctx: _Context) -> list[dict[str, Any]]:
    instances = request["instances"]
    return _instance_rows(instances if type(instances) is list else [instances], ctx)


def _v1_response(response: Any, ctx: _Context) -> list[dict[str, Any]]:
    if type(response) is dict and "predictions" in response:
        return _prediction_rows(response["predictions"], ctx)
    return []


def _tf_request(request: Any, ctx: _Context) -> list[dict[str, Any]]:
    if "instances" in request:
        instances = request["instances"]
        return _instance_rows(instances if type(instances) is list else [instances], ctx)
    inputs = request["inputs"]
    if type(inputs) is dict:
        return _columnar_rows(inputs, ctx)
    return _instance_rows(inputs if type(inputs) is list else [inputs], ctx)


def _tf_response(response: Any, ctx: _Context) -> list[dict[str, Any]]:
    if type(response) is not dict:
        return []
    if "predictions" in response:
        return _prediction_rows(response["predictions"], ctx)
    outputs = response.get("outputs")
    if type(outputs) is dict:
        return _columnar_rows(outputs, ctx)
    if outputs is not None:
        return _prediction_rows(outputs, ctx)
    return []


# ---------------------------------------------------------------------------------------------
# Open Inference Protocol (KServe v2, Triton, MLServer)


def _flatten(data: Any, budget: _Budget) -> list[Any]:
    """Row-major values of a tensor's data, however it is nested, each a feature value (_scalar)."""
    if type(data) is not list:
        return [_scalar(data)]
    out: list[Any] = []
    append = out.append
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            kind = type(item)
            if kind is float or kind is int:
                append(item)
            elif kind is list:
                stack.append(iter(item))
                break
            else:
                append(_scalar(item))
        else:
            stack.pop()
    budget.step(len(out))
    return out


def _bool(value: Any) -> Any:
    if type(value) is int and value in (0, 1):
        return value == 1
    return _scalar(value)


@dataclass(slots=True)
class _Tensor:
    name: str
    rows: int
    width: int
    values: list[Any]
    source: dict[str, Any]


def _tensors(items: Any, ctx: _Context) -> list[_Tensor]:
    """The well-formed tensors of an ``inputs`` or ``outputs`` list; redacted ones leave the list.

    A tensor is left out when its shape is not a list of non-negative ints or its data does not hold
    exactly the shape's number of values (a BYTES tensor may give its strings' length as its last
    dimension, as MLServer's string codec does: that dimension is then not a feature axis).
    """
    if type(items) is not list:
        return []
    removes = ctx.redactor.removes
    if ctx.redactor.names:
        items[:] = [t for t in items if not (type(t) is dict and type(t.get("name")) is str and removes(t["name"]))]
    tensors: list[_Tensor] = []
    for item in items:
        if type(item) is not dict:
            continue
        name = item.get("name")
        shape = item.get("shape")
        data = item.get("data")
        if type(name) is not str or type(shape) is not list or data is None:
            continue
        if not all(type(d) is int and d >= 0 for d in shape):
            continue
        values = _flatten(data, ctx.budget)
        size = math.prod(shape)
        # BYTES may count bytes in the last dimension (MLServer's string codec: ["hello", "bye"] with
        # shape [2, 11]): one string per element of the other dimensions
        bytes_length_last = item.get("datatype") == "BYTES" and len(shape) >= 2
        if size != len(values) and bytes_length_last and math.prod(shape[:-1]) == len(values):
            shape = shape[:-1]
            size = len(values)
        if size != len(values):
            continue
        n = shape[0] if shape else 1
        width = size // n if n else 1
        if item.get("datatype") == "BOOL":
            values = [_bool(v) for v in values]
        tensors.append(_Tensor(_clip(name), n, width, values, item))
    return tensors


def _tensor_rows(tensors: list[_Tensor], ctx: _Context, named_columns: bool) -> list[dict[str, Any]]:
    """Row n holds value n of each [N] or [N, 1] tensor (named by the tensor), and the n-th row of
    an [N, F] tensor (named by the reference's columns when it is the only tensor and F matches,
    else "<name>[i]", i the row-major index within the row)."""
    if not tensors:
        return []
    n = min(max(t.rows for t in tensors), ctx.max_rows)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    columns = ctx.columns
    step = ctx.budget.step
    for tensor in tensors:
        width = tensor.width
        values = tensor.values
        if width == 1:
            names = [tensor.name]
        elif named_columns and len(tensors) == 1 and columns is not None and len(columns) == width:
            names = columns
            hidden = [i for i, column in enumerate(columns) if ctx.redactor.removes(column)]
            if hidden:
                # a redacted column is nulled in the body too: the data written back flat (row-major)
                for r in range(tensor.rows):
                    for i in hidden:
                        values[r * width + i] = None
                tensor.source["data"] = values
        else:
            names = [f"{tensor.name}[{i}]" for i in range(width)]
        for r in range(min(tensor.rows, n)):
            base = r * width
            rows[r].update(zip(names, values[base : base + width], strict=True))
            step(width)
    return rows


def _v2_request(request: Any, ctx: _Context) -> list[dict[str, Any]]:
    return _tensor_rows(_tensors(request["inputs"], ctx), ctx, named_columns=True)


def _v2_response(response: Any, ctx: _Context) -> list[dict[str, Any]]:
    if type(response) is not dict:
        return []
    return _tensor_rows(_tensors(response.get("outputs"), ctx), ctx, named_columns=False)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible chat, completions, embeddings

#: the key paths prompt_chars is measured from: when redaction takes any of them, it is not measured
_PROMPT_PATHS = (("messages",), ("messages", "content"), ("messages", "content", "text"), ("prompt",), ("input",))


def _content_chars(content: Any) -> int:
    """Characters of a message's content: a string, or the text of an array of content parts."""
    if type(content) is str:
        return len(content)
    total = 0
    if type(content) is list:
        for part in content:
            if type(part) is str:
                total += len(part)
            elif type(part) is dict:
                text = part.get("text")
                if type(text) is str:
                    total += len(text)
    return total


def _text_chars(prompt: Any) -> int | None:
    """Characters of a completions prompt or an embeddings input: a string or a list of them
    (token arrays are not characters: None)."""
    if type(prompt) is str:
        return len(prompt)
    if type(prompt) is list:
        strings = [p for p in prompt if type(p) is str]
        if strings or not prompt:
            return sum(len(p) for p in strings)
    return None


def _openai_row(request: dict[str, Any], measure_prompt: bool) -> dict[str, Any]:
    row: dict[str, Any] = {}
    messages = request.get("messages")
    chars: int | None = None
    if type(messages) is list:
        row["messages"] = len(messages)
        chars = sum(_content_chars(m.get("content")) for m in messages if type(m) is dict)
    elif "prompt" in request:
        chars = _text_chars(request["prompt"])
    elif "input" in request:
        chars = _text_chars(request["input"])
    if chars is not None and measure_prompt:
        row["prompt_chars"] = chars
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    if max_tokens is not None:
        _put(row, "max_tokens", _scalar(max_tokens))
    if "temperature" in request:
        _put(row, "temperature", _scalar(request["temperature"]))
    model = request.get("model")
    if type(model) is str:
        row["model"] = _clip(model)
    return row


# ---------------------------------------------------------------------------------------------
# the JSONPath subset of the mapping adapter

_STEP = re.compile(
    r"""\.(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)|\.\*|\[\*\]|\[(?P<index>-?[0-9]+)\]|\['(?P<sq>[^']*)'\]|\["(?P<dq>[^"]*)"\]"""
)

Step = str | int | None  # a key, an index, a wildcard


@dataclass(frozen=True, slots=True)
class JsonPath:
    """A parsed path: ``$`` then steps: ``.key``, ``['key']`` or ``["key"]``, ``[n]`` (negative
    counts from the end), ``[*]`` or ``.*`` (every element of a list, every value of an object)."""

    text: str
    steps: tuple[Step, ...]

    @property
    def wildcard(self) -> int | None:
        """The index of the first wildcard step (the one that makes rows), None without one."""
        for i, step in enumerate(self.steps):
            if step is None:
                return i
        return None


def parse_path(text: str) -> JsonPath:
    """Parses a path of the subset; ValueError names what is wrong and the forms accepted."""
    if not text.startswith("$"):
        raise ValueError(f"JSON path {text!r} must start with '$' (for example $.instances[*].age)")
    steps: list[Step] = []
    pos = 1
    while pos < len(text):
        found = _STEP.match(text, pos)
        if found is None:
            raise ValueError(
                f"JSON path {text!r}: cannot read {text[pos:]!r}; the steps are .key, ['key'], [n], [*] and .*"
            )
        if found.group("name") is not None:
            steps.append(found.group("name"))
        elif found.group("index") is not None:
            steps.append(int(found.group("index")))
        elif found.group("sq") is not None:
            steps.append(found.group("sq"))
        elif found.group("dq") is not None:
            steps.append(found.group("dq"))
        else:
            steps.append(None)
        pos = found.end()
    return JsonPath(text, tuple(steps))


def _children(node: Any) -> list[Any]:
    if type(node) is list:
        return node
    if type(node) is dict:
        return list(node.values())
    return []


def evaluate(steps: Iterable[Step], doc: Any, budget: _Budget | None = None) -> list[Any]:
    """Every value the steps reach from ``doc``, in document order."""
    matches = [doc]
    for step in steps:
        found: list[Any] = []
        for node in matches:
            if step is None:
                found.extend(_children(node))
            elif type(step) is int:
                if type(node) is list and -len(node) <= step < len(node):
                    found.append(node[step])
            elif type(node) is dict and step in node:
                found.append(node[step])
        if budget is not None:
            budget.step(len(found) + 1)
        matches = found
        if not matches:
            break
    return matches


def _mapped_rows(paths: dict[str, JsonPath], doc: Any, ctx: _Context) -> list[dict[str, Any]]:
    """A path without a wildcard gives one value, in every row; a path with one gives a value per
    element of its first wildcard (the rest of the path evaluated from that element): rows line up by
    that index. A path reaching several values gives a vector (name[i])."""
    single: dict[str, Any] = {}
    batched: dict[str, tuple[list[Any], tuple[Step, ...]]] = {}
    for name, path in paths.items():
        at = path.wildcard
        if at is None:
            found = evaluate(path.steps, doc, ctx.budget)
            if found:
                single[name] = found[0]
        else:
            elements: list[Any] = []
            for node in evaluate(path.steps[:at], doc, ctx.budget):
                elements.extend(_children(node))
            batched[name] = (elements, path.steps[at + 1 :])
    n = max(len(elements) for elements, _ in batched.values()) if batched else int(bool(single))
    rows: list[dict[str, Any]] = []
    for r in range(min(n, ctx.max_rows)):
        row: dict[str, Any] = {}
        for name, value in single.items():
            _put(row, name, value)
        for name, (elements, rest) in batched.items():
            if r < len(elements):
                found = evaluate(rest, elements[r], ctx.budget)
                if len(found) == 1:
                    _put(row, name, found[0])
                elif found:
                    _put(row, name, found)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# detection

_V2_PATH = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer\Z")
_V1_PATH = re.compile(r"/v1/models/[^/:]+(?:/versions/[^/:]+)?:predict\Z")
_OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def adapter_for_path(path: str) -> str | None:
    """The adapter a path names: ``openai``, ``oip_v2``, ``kserve_v1`` (which TF Serving shares), or None."""
    if path.endswith(_OPENAI_PATHS):
        return "openai"
    if _V2_PATH.search(path):
        return "oip_v2"
    if _V1_PATH.search(path):
        return "kserve_v1"
    return None


def adapter_for_response(response: Any) -> str | None:
    """The adapter a response body's shape names, or None: what reads a response kept without its
    request (feedback) on a path that names no protocol."""
    if type(response) is not dict:
        return None
    if "outputs" in response and _is_tensor_list(response["outputs"]):
        return "oip_v2"
    if "predictions" in response:
        return "kserve_v1"
    if "outputs" in response:
        return "tfserving"
    return None


def _is_tensor_list(inputs: Any) -> bool:
    """A list holding an object with a name and a datatype or shape: tensors (the rest may be wrong)."""
    return type(inputs) is list and any(
        type(t) is dict and "name" in t and ("datatype" in t or "shape" in t) for t in inputs
    )


def adapter_for_body(request: Any) -> str | None:
    """The adapter a request body's shape names, or None."""
    if type(request) is not dict:
        return None
    if "inputs" in request and _is_tensor_list(request["inputs"]):
        return "oip_v2"
    if "instances" in request:
        return "tfserving" if "signature_name" in request else "kserve_v1"
    if "inputs" in request:
        return "tfserving"
    if type(request.get("messages")) is list:
        return "openai"
    if ("prompt" in request or "input" in request) and "model" in request:
        return "openai"
    return None


def _fits(adapter: str, request: Any) -> bool:
    """Whether a request body has the shape an explicitly configured adapter reads."""
    if adapter in ("none", "mapping"):
        return True
    if type(request) is not dict:
        return False
    if adapter == "kserve_v1":
        return type(request.get("instances")) is list
    if adapter == "tfserving":
        return "instances" in request or "inputs" in request
    if adapter == "oip_v2":
        return type(request.get("inputs")) is list
    return "messages" in request or "prompt" in request or "input" in request  # openai


# ---------------------------------------------------------------------------------------------


class Extractor:
    """Reads samples with the configured (or detected) adapter; see the module docstring."""

    def __init__(self, cfg: Sampling, columns: Callable[[], list[str] | None]) -> None:
        self.cfg = cfg
        self._columns = columns
        self.redactor = Redactor(cfg.redact_fields, cfg.redact_headers)
        self._mapping = self._paths("sampling.mapping", cfg.mapping)
        self._prediction_mapping = self._paths("sampling.prediction_mapping", cfg.prediction_mapping)
        covers = self.redactor.covers
        self._measure_prompt = not any(covers(path) for path in _PROMPT_PATHS)
        self._usage_hidden = covers(("usage",))
        self._finish_hidden = covers(("choices",)) or covers(("choices", "finish_reason"))

    @staticmethod
    def _paths(key: str, mapping: dict[str, str]) -> dict[str, JsonPath]:
        paths: dict[str, JsonPath] = {}
        for name, text in mapping.items():
            try:
                paths[name] = parse_path(text)
            except ValueError as exc:
                raise ValueError(f"{key}.{name}: {exc}") from None
        return paths

    def extract(self, sample: Sample, response_only: bool = False) -> Extracted:
        """The sample read by its adapter; raises :class:`Dropped` and never anything else.

        ``response_only=True``: a response kept without its request, for its predictions (feedback).
        With ``adapter: auto`` on a path that names no protocol, the response's shape chooses the
        adapter (:func:`adapter_for_response`), and the redacted bodies are not encoded again
        (``request_body`` and ``response_body`` stay empty).
        """
        try:
            return self._extract(sample, not response_only)
        except Dropped:
            raise
        except Exception as exc:  # an adapter meeting a body it did not foresee: never a crash
            raise Dropped("unparsable", f"{type(exc).__name__} while reading the sample") from exc

    # -- bodies

    def _body(self, raw: bytes, headers: list[tuple[str, str]], budget: _Budget) -> Any:
        """Parsed, checked JSON; None for an empty body; ``_NOT_JSON`` otherwise."""
        if not raw:
            return None
        body = _inflate(raw, headers, self.cfg.max_body_bytes)
        if body is None:
            return _NOT_JSON
        if not body.strip():
            return None
        budget.start_body()
        return _load(body, self.cfg.max_depth, budget)

    def _stream(self, raw: bytes, budget: _Budget) -> list[tuple[bool, Any]]:
        """The events of an event stream: (True, parsed JSON) or (False, the data as it came)."""
        budget.start_body()
        events: list[tuple[bool, Any]] = []
        for data in sse_data(raw):
            parsed = _load(data, self.cfg.max_depth, budget) if data != "[DONE]" else _NOT_JSON
            events.append((False, data) if parsed is _NOT_JSON else (True, parsed))
        return events

    def _encode(self, obj: Any, raw: bytes) -> bytes:
        if obj is None:
            return b""
        if obj is _NOT_JSON:
            return raw if not self.redactor.active else b""  # what cannot be redacted does not leave
        return orjson.dumps(obj)

    def _encode_stream(self, events: list[tuple[bool, Any]]) -> bytes:
        parts: list[bytes] = []
        for is_json, value in events:
            if is_json:
                parts.append(b"data: " + orjson.dumps(value) + b"\n\n")
            elif value == "[DONE]" or not self.redactor.active:
                parts.append(b"data: " + "\ndata: ".join(value.split("\n")).encode("utf-8") + b"\n\n")
        return b"".join(parts)

    # -- the adapter

    def _choose(self, path: str, request: Any, response: Any = None) -> str:
        configured = self.cfg.adapter
        if configured != "auto":
            if request is not None and not _fits(configured, request):
                raise Dropped("unparsable", f"the request body is not what adapter {configured!r} reads")
            return configured
        by_path = adapter_for_path(path)
        if request is None:
            return by_path or adapter_for_response(response) or "none"
        by_body = adapter_for_body(request)
        if by_body is not None:
            return by_body
        if by_path == "openai" and type(request) is dict:
            return "openai"
        return "none"

    def _extract(self, sample: Sample, bodies: bool = True) -> Extracted:
        cfg = self.cfg
        budget = _Budget(cfg.max_parse_seconds, cfg.max_elements)
        redactor = self.redactor

        request = self._body(sample.request_body, sample.request_headers, budget)
        events: list[tuple[bool, Any]] | None = None
        if sample.response_stream:
            events = self._stream(sample.response_body, budget)
            response: Any = [value for is_json, value in events if is_json]
        else:
            response = self._body(sample.response_body, sample.response_headers, budget)

        if request is _NOT_JSON:
            if cfg.adapter != "none":
                raise Dropped("unparsable", "the request body is not JSON")
            adapter = "none"
        else:
            redactor.redact(request)
            adapter = self._choose(sample.path, request, None if bodies else response)
        if response is not _NOT_JSON:
            redactor.redact(response)
        budget.clock()

        ctx = _Context(self._columns(), cfg.max_rows, budget, redactor)
        rows: list[dict[str, Any]] = []
        predictions: list[dict[str, Any]] = []
        usage: dict[str, int] | None = None
        finish: str | None = None
        have_request = request is not None and request is not _NOT_JSON
        have_response = response is not None and response is not _NOT_JSON
        plain_response = have_response and events is None
        if adapter == "kserve_v1":
            rows = _v1_request(request, ctx) if have_request else []
            predictions = _v1_response(response, ctx) if plain_response else []
        elif adapter == "tfserving":
            rows = _tf_request(request, ctx) if have_request else []
            predictions = _tf_response(response, ctx) if plain_response else []
        elif adapter == "oip_v2":
            rows = _v2_request(request, ctx) if have_request else []
            predictions = _v2_response(response, ctx) if plain_response else []
        elif adapter == "openai":
            rows = [_openai_row(request, self._measure_prompt)] if have_request else []
            usage, finish = self._openai_usage(sample, response if have_response else None, events)
            prediction: dict[str, Any] = {}
            if usage is not None:
                for key in ("prompt_tokens", "completion_tokens"):
                    if key in usage:
                        prediction[key] = usage[key]
            if finish is not None:
                prediction["finish_reason"] = _clip(finish)
            predictions = [prediction] if prediction else []
        elif adapter == "mapping":
            rows = _mapped_rows(self._mapping, request, ctx) if have_request else []
            if have_response:
                predictions = _mapped_rows(self._prediction_mapping, response, ctx)
        budget.clock()

        rows, predictions = self._names(rows, predictions, ctx.columns)
        return Extracted(
            adapter=adapter,
            rows=rows,
            predictions=predictions,
            request=request if have_request else None,
            response=response if have_response else None,
            request_body=self._encode(request, sample.request_body) if bodies else b"",
            response_body=(
                b""
                if not bodies
                else self._encode_stream(events)
                if events is not None
                else self._encode(response, sample.response_body)
            ),
            usage=usage,
            finish_reason=finish,
        )

    def _openai_usage(
        self, sample: Sample, response: Any, events: list[tuple[bool, Any]] | None
    ) -> tuple[dict[str, int] | None, str | None]:
        if events is None:
            usage, finish = response_usage(response)
        else:
            usage, finish = stream_usage([value for is_json, value in events if is_json])
            if sample.response_truncated and sample.response_tail:
                # the events after the cap are gone; the tail holds the stream's last ones
                tail_usage, tail_finish = usage_from_tail(sample.response_tail, stream=True)
                if tail_usage is not None and not self._usage_hidden:
                    usage = tail_usage
                if tail_finish is not None and not self._finish_hidden:
                    finish = tail_finish
        return usage, finish

    def _names(
        self, rows: list[dict[str, Any]], predictions: list[dict[str, Any]], columns: list[str] | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Redacted names left out; a prediction named like a feature gets the prefix "prediction."."""
        removes = self.redactor.removes
        if self.redactor.names:
            # each distinct name is looked at once; rows are rebuilt only when one of them goes
            for which in (rows, predictions):
                names: set[str] = set()
                for row in which:
                    names.update(row)
                gone = {name for name in names if removes(name)}
                if gone:
                    which[:] = [{k: v for k, v in row.items() if k not in gone} for row in which]
        if predictions:
            taken = set(columns or ())
            for row in rows:
                taken.update(row)
            if any(key in taken for p in predictions for key in p):
                predictions = [{(f"prediction.{k}" if k in taken else k): v for k, v in p.items()} for p in predictions]
        return rows, predictions
