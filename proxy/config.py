"""Configuration: one schema per command, merged from defaults < file < environment < flags.

Each command (``proxy``, ``agent``) has a pydantic model. :func:`load` builds a plain dict from the
YAML file, overlays ``INFERMON_*`` environment variables and then command-line flags, and validates
the result once. Every problem becomes a :class:`~proxy.errors.ConfigError` whose message names the
key, the bad value, where it came from and what is allowed::

    config error: limits.max_header_bytes = 'lots' (from env INFERMON_LIMITS__MAX_HEADER_BYTES):
    Input should be a valid integer, unable to parse string as an integer

Environment variables map to keys by upper-casing and joining nesting levels with ``__``:
``INFERMON_LISTEN`` is ``listen``, ``INFERMON_LIMITS__MAX_IN_FLIGHT`` is ``limits.max_in_flight``.
A model may also name other variables it reads (``ENV_ALIASES``: the standard ``OTEL_*`` ones for
``tracing``); they are applied after the file and before the ``INFERMON_*`` variables, so the more
specific ``INFERMON_TRACING__SAMPLER`` wins over ``OTEL_TRACES_SAMPLER``, and a flag over both.
A value that starts with ``[`` or ``{`` is read as JSON (for lists and maps). Unknown keys are errors
everywhere: in the file, in the environment (within the command's prefix) and on the command line.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ValidationError

from proxy.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
#: another environment variable a model reads: (dotted key, conversion of the raw value or None)
EnvAlias = tuple[str, Callable[[str], Any] | None]

#: Environment variables with the prefix that are not configuration keys.
RESERVED_ENV = frozenset({"INFERMON_CONFIG", "INFERMON_AGENT_CONFIG", "INFERMON_PURE_PYTHON"})


def load(
    model: type[M],
    *,
    file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    env_prefix: str = "INFERMON_",
    ignore_env_prefixes: tuple[str, ...] = (),
    flags: Mapping[str, Any] | None = None,
    config_env: str = "INFERMON_CONFIG",
    flag_names: Mapping[str, str] | None = None,
) -> M:
    """Merge the layers and validate them against ``model``.

    ``flags`` maps dotted keys (``"limits.max_in_flight"``) to values; ``None`` values are skipped so an
    argparse namespace can be passed as it is; ``flag_names`` maps a dotted key to its flag's name
    where that is not the last part of the key (``admin.listen`` is set by ``--admin``). ``file``
    falls back to the variable named by ``config_env`` (``$INFERMON_CONFIG`` for the proxy,
    ``$INFERMON_AGENT_CONFIG`` for the agent).
    """
    environ = os.environ if env is None else env
    flag_names = flag_names or {}
    sources: dict[tuple[str, ...], str] = {}
    merged: dict[str, Any] = {}

    path = file if file is not None else environ.get(config_env) or None
    if path is not None:
        data = _read_file(Path(path))
        _merge(merged, data, sources, f"file {path}", ())

    aliases: Mapping[str, EnvAlias] = getattr(model, "ENV_ALIASES", {})
    shorthands: Mapping[str, str] = getattr(model, "SHORTHANDS", {})
    for name, (dotted, convert) in aliases.items():
        raw = environ.get(name)
        if raw is None or not raw.strip():
            continue
        keys = tuple(dotted.split("."))
        value: Any = raw
        if convert is not None:
            with contextlib.suppress(ValueError):  # validation then names the variable and raw value
                value = convert(raw)
        _set(merged, keys, value, shorthands)
        _blame(sources, keys, f"env {name}")

    for name in sorted(environ):
        if not name.startswith(env_prefix) or name in RESERVED_ENV:
            continue
        if any(name.startswith(p) for p in ignore_env_prefixes):
            continue
        keys = tuple(part.lower() for part in name[len(env_prefix) :].split("__"))
        _set(merged, keys, _env_value(environ[name]), shorthands)
        _blame(sources, keys, f"env {name}")

    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        keys = tuple(dotted.split("."))
        _set(merged, keys, value, shorthands)
        _blame(sources, keys, "flag --" + flag_names.get(dotted, keys[-1].replace("_", "-")))

    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources, model)) from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config error: cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config error: {path} must hold a mapping of keys at the top level, not {type(data).__name__}"
        )
    return data


def _env_value(raw: str) -> Any:
    stripped = raw.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return raw
    return raw


def _set(
    target: dict[str, Any], keys: tuple[str, ...], value: Any, shorthands: Mapping[str, str] | None = None
) -> None:
    node = target
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if not isinstance(child, dict):
            # a section written as one string (``admin: HOST:PORT``) keeps that value under its key
            short = shorthands.get(key) if shorthands and depth == 0 else None
            child = {short: child} if short is not None and isinstance(child, str) else {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _blame(sources: dict[tuple[str, ...], str], keys: tuple[str, ...], origin: str) -> None:
    """Record that ``keys`` (and everything below it, which the new value replaced) came from ``origin``."""
    depth = len(keys)
    for known in [k for k in sources if len(k) > depth and k[:depth] == keys]:
        del sources[known]
    sources[keys] = origin


def _merge(
    target: dict[str, Any],
    data: Mapping[str, Any],
    sources: dict[tuple[str, ...], str],
    origin: str,
    prefix: tuple[str, ...],
) -> None:
    for key, value in data.items():
        keys = (*prefix, str(key))
        if isinstance(value, Mapping):
            child = target.setdefault(str(key), {})
            if isinstance(child, dict):
                _merge(child, value, sources, origin, keys)
                if not value:  # an empty section has no keys below it to carry the origin
                    sources.setdefault(keys, origin)
                continue
        target[str(key)] = value
        sources[keys] = origin


def _describe(exc: ValidationError, sources: Mapping[tuple[str, ...], str], model: type[BaseModel]) -> str:
    secrets: frozenset[str] = getattr(model, "SECRET_KEYS", frozenset())
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(str(part) for part in err["loc"])
        key = ".".join(loc) or "(top level)"
        origin = _origin(loc, sources)
        where = f" (from {origin})" if origin else ""
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(loc[-1], _keys_at(model, loc[:-1]), n=1) if loc else []
            guess = f"; did you mean {hint[0]}?" if hint else ""
            lines.append(f"config error: unknown key {key!s}{where}: remove it or check its spelling{guess}")
            continue
        value = err.get("input")
        if err["type"] == "missing":
            shown = ""
        elif any(key == secret or key.startswith(secret + ".") for secret in secrets):
            shown = " = ***"  # a secret never reaches an error message or a log
        else:
            shown = f" = {_short(value)}"
        lines.append(f"config error: {key}{shown}{where}: {err['msg']}")
    return "\n".join(lines)


def _origin(loc: tuple[str, ...], sources: Mapping[tuple[str, ...], str]) -> str | None:
    """Where the value at ``loc`` came from: the layer that set it or a section above it, else the
    layers that set keys below it (a whole unknown section), in the order they were applied."""
    if not loc:
        return None
    for depth in range(len(loc), 0, -1):
        found = sources.get(loc[:depth])
        if found:
            return found
    depth = len(loc)
    below = [origin for keys, origin in sources.items() if len(keys) > depth and keys[:depth] == loc]
    return ", ".join(dict.fromkeys(below)) or None


def _keys_at(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The keys the section at ``loc`` of ``model`` accepts (empty when ``loc`` is no section)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = current.model_fields[part].annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def mask_url(url: str) -> str:
    """Hide the password of ``user:password@`` in a URL, for /config and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    # the host part is kept as written: IPv6 brackets, case and port stay as they were
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))
