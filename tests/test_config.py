"""proxy.config.load: the layers (defaults < file < env < flags), env key mapping and the error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from proxy.config import load, mask_url
from proxy.errors import ConfigError
from proxy.settings import ProxyConfig


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "infermon.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _load(
    file: Path | None = None, env: dict[str, str] | None = None, flags: dict[str, object] | None = None
) -> ProxyConfig:
    return load(ProxyConfig, file=file, env=env or {}, flags=flags, ignore_env_prefixes=("INFERMON_AGENT_",))


def _error(file: Path | None = None, env: dict[str, str] | None = None, flags: dict[str, object] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        _load(file, env, flags)
    return str(info.value)


# -- precedence -------------------------------------------------------------------------------


def test_defaults_when_no_layer_sets_anything() -> None:
    cfg = _load()
    assert cfg.listen == "0.0.0.0:8080"
    assert cfg.upstream == "http://127.0.0.1:8000"
    assert cfg.admin.listen == "0.0.0.0:9464"
    assert cfg.limits.max_in_flight == 4096
    assert cfg.labels.variant == "stable"


def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = _file(tmp_path, "listen: 127.0.0.1:1111\nlimits:\n  max_in_flight: 11\n")
    cfg = _load(path)
    assert cfg.listen == "127.0.0.1:1111"
    assert cfg.limits.max_in_flight == 11
    assert cfg.limits.max_connections == 10_000  # siblings keep their defaults


def test_env_overrides_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "listen: 127.0.0.1:1111\nlimits:\n  max_in_flight: 11\n  max_connections: 5\n")
    cfg = _load(path, env={"INFERMON_LISTEN": "127.0.0.1:2222", "INFERMON_LIMITS__MAX_IN_FLIGHT": "22"})
    assert cfg.listen == "127.0.0.1:2222"
    assert cfg.limits.max_in_flight == 22
    assert cfg.limits.max_connections == 5  # the file's other keys in the same section survive


def test_flags_override_env_and_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "listen: 127.0.0.1:1111\nadmin: 127.0.0.1:9001\n")
    cfg = _load(
        path,
        env={"INFERMON_LISTEN": "127.0.0.1:2222", "INFERMON_ADMIN": "127.0.0.1:9002"},
        flags={"listen": "127.0.0.1:3333", "admin": None, "limits.max_in_flight": 33},
    )
    assert cfg.listen == "127.0.0.1:3333"
    assert cfg.admin.listen == "127.0.0.1:9002"  # a None flag is "not given": env still wins over the file
    assert cfg.limits.max_in_flight == 33


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = _file(tmp_path, "log_level: debug\n")
    assert _load(env={"INFERMON_CONFIG": str(path)}).log_level == "debug"


def test_explicit_file_wins_over_infermon_config(tmp_path: Path) -> None:
    chosen = _file(tmp_path, "log_level: error\n")
    other = tmp_path / "other.yaml"
    other.write_text("log_level: debug\n")
    assert _load(chosen, env={"INFERMON_CONFIG": str(other)}).log_level == "error"


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert _load(_file(tmp_path, "# nothing here\n")) == ProxyConfig()


# -- environment mapping ----------------------------------------------------------------------


def test_nested_env_keys() -> None:
    cfg = _load(
        env={
            "INFERMON_LIMITS__MAX_IN_FLIGHT": "7",
            "INFERMON_UPSTREAM_POOL__CONNECT_TIMEOUT": "1.5",
            "INFERMON_READINESS__PATH": "/v2/health/ready",
        }
    )
    assert cfg.limits.max_in_flight == 7
    assert cfg.upstream_pool.connect_timeout == 1.5
    assert cfg.readiness.path == "/v2/health/ready"


def test_json_list_values_from_env() -> None:
    cfg = _load(
        env={
            "INFERMON_LABELS__ALLOW__MODEL": '["iris", "churn"]',
            "INFERMON_METRICS__DURATION_BUCKETS": "[0.1, 1, 10]",
        }
    )
    assert cfg.labels.allow.model == ["iris", "churn"]
    assert cfg.labels.allow.version is None
    assert cfg.metrics.duration_buckets == [0.1, 1.0, 10.0]


def test_json_mapping_value_from_env() -> None:
    cfg = _load(env={"INFERMON_DRAIN": '{"delay": 1.5, "timeout": 4}'})
    assert (cfg.drain.delay, cfg.drain.timeout) == (1.5, 4.0)


def test_other_prefixes_and_reserved_names_are_not_keys() -> None:
    cfg = _load(env={"INFERMON_AGENT_INTERVAL": "3", "OTHER_LISTEN": "x", "PATH": "/bin"})
    assert cfg == ProxyConfig()


# -- unknown keys -----------------------------------------------------------------------------


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "limits:\n  max_inflight: 3\n")
    message = _error(path)
    assert "unknown key limits.max_inflight" in message
    assert f"file {path}" in message


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "listen: 127.0.0.1:1\nupstrem: http://x\n")
    message = _error(path)
    assert "unknown key upstrem" in message
    assert "listen" not in message


def test_unknown_top_level_section_in_file_names_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "readines:\n  path: /ready\n")
    message = _error(path)
    assert message.startswith(f"config error: unknown key readines (from file {path})")
    assert "did you mean readiness?" in message


def test_unknown_empty_section_in_file_names_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "readines: {}\n")
    assert f"unknown key readines (from file {path})" in _error(path)


def test_unknown_nested_section_in_file_names_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "readiness:\n  checks:\n    http: /ready\n")
    assert f"unknown key readiness.checks (from file {path})" in _error(path)


def test_unknown_top_level_section_in_env_names_the_variable() -> None:
    message = _error(env={"INFERMON_READINES__PATH": "x"})
    assert message.startswith("config error: unknown key readines (from env INFERMON_READINES__PATH)")


def test_unknown_section_from_two_layers_names_both(tmp_path: Path) -> None:
    path = _file(tmp_path, "readines:\n  path: /ready\n")
    message = _error(path, env={"INFERMON_READINES__INTERVAL": "1"})
    assert f"unknown key readines (from file {path}, env INFERMON_READINES__INTERVAL)" in message


def test_unknown_nested_key_suggests_the_close_one(tmp_path: Path) -> None:
    message = _error(_file(tmp_path, "limits:\n  max_inflight: 3\n"))
    assert "did you mean max_in_flight?" in message


def test_unknown_key_in_env() -> None:
    message = _error(env={"INFERMON_LIMITS__MAX_INFLIGHT": "3"})
    assert "unknown key limits.max_inflight" in message
    assert "env INFERMON_LIMITS__MAX_INFLIGHT" in message


def test_unknown_key_in_flags() -> None:
    message = _error(flags={"limits.bogus": 1})
    assert "unknown key limits.bogus" in message
    assert "flag --bogus" in message


def test_every_problem_is_reported(tmp_path: Path) -> None:
    path = _file(tmp_path, "lisen: 1\nlimits:\n  max_in_flight: 0\n")
    lines = _error(path).splitlines()
    assert len(lines) == 2
    assert any("unknown key lisen" in line for line in lines)
    assert any(line.startswith("config error: limits.max_in_flight = 0") for line in lines)


# -- bad values -------------------------------------------------------------------------------


def test_bad_value_from_env_names_key_value_source_and_rule() -> None:
    message = _error(env={"INFERMON_LIMITS__MAX_HEADER_BYTES": "lots"})
    assert message.startswith("config error: limits.max_header_bytes = 'lots'")
    assert "(from env INFERMON_LIMITS__MAX_HEADER_BYTES)" in message
    assert "valid integer" in message


def test_bad_value_from_file_names_key_value_source_and_rule(tmp_path: Path) -> None:
    path = _file(tmp_path, "upstream: ftp://model:21\n")
    message = _error(path)
    assert "upstream = 'ftp://model:21'" in message
    assert f"(from file {path})" in message
    assert "http:// or https://" in message


def test_bad_value_from_flag() -> None:
    message = _error(flags={"log_level": "loud"})
    assert "log_level = 'loud'" in message
    assert "(from flag --log-level)" in message
    assert "'debug'" in message  # the allowed values are listed


def test_bad_value_below_minimum(tmp_path: Path) -> None:
    message = _error(_file(tmp_path, "limits:\n  max_header_bytes: 100\n"))
    assert "limits.max_header_bytes = 100" in message
    assert "greater than or equal to 1024" in message


def test_bad_list_element_points_at_the_element() -> None:
    message = _error(env={"INFERMON_METRICS__SIZE_BUCKETS": '[64, "big"]'})
    assert "metrics.size_buckets.1 = 'big'" in message
    assert "env INFERMON_METRICS__SIZE_BUCKETS" in message


def test_buckets_must_increase() -> None:
    message = _error(env={"INFERMON_METRICS__GAP_BUCKETS": "[1, 0.5]"})
    assert "metrics.gap_buckets" in message
    assert "strictly increasing" in message


def test_malformed_json_is_kept_as_text_and_rejected() -> None:
    message = _error(env={"INFERMON_LABELS__ALLOW__MODEL": "[iris"})
    assert "labels.allow.model = '[iris'" in message
    assert "valid list" in message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("8080", "expected HOST:PORT"),
        ("127.0.0.1:99999", "from 0 to 65535"),
        ("bad host!:80", "not a host name"),
        ("[nope]:80", "not an IPv6 address"),
    ],
)
def test_bad_listen_addresses(value: str, fragment: str) -> None:
    message = _error(flags={"listen": value})
    assert f"listen = {value!r}" in message
    assert fragment in message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("http://", "has no host"),
        ("http://h:notaport", "invalid port"),
        ("http://h:8000/v2", "must not carry a path"),
        ("http://h:8000?x=1", "must not carry a path"),
    ],
)
def test_bad_upstream_urls(value: str, fragment: str) -> None:
    message = _error(env={"INFERMON_UPSTREAM": value})
    assert fragment in message
    assert "env INFERMON_UPSTREAM" in message


def test_readiness_path_must_be_absolute() -> None:
    assert "must start with '/'" in _error(env={"INFERMON_READINESS__PATH": "health"})


def test_header_names_are_validated_and_lowered() -> None:
    assert _load(env={"INFERMON_LABELS__VARIANT_HEADER": "X-Variant"}).labels.variant_header == "x-variant"
    assert "not a valid HTTP header name" in _error(env={"INFERMON_REQUEST_ID_HEADER": "x id"})
    # "$" alone matches before a final line break: a name ending in one must still be refused
    assert "not a valid HTTP header name" in _error(env={"INFERMON_REQUEST_ID_HEADER": "x-id\n"})


def test_names_ending_in_a_line_break_are_refused(tmp_path: Path) -> None:
    variants = 'upstream: http://127.0.0.1:8000\nupstreams:\n  "canary\\n": http://127.0.0.1:8001\n'
    assert "upstreams" in _error(_file(tmp_path, variants))
    windows = 'quality:\n  windows:\n    "1h\\n": {seconds: 3600, max_labels: 10}\n'
    assert "quality.windows" in _error(_file(tmp_path, windows))


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    message = _error(_file(tmp_path, "limits: 5\n"))
    assert "limits = 5" in message
    assert "valid dictionary" in message


def test_env_replacing_a_file_value_is_blamed_on_env(tmp_path: Path) -> None:
    path = _file(tmp_path, "limits:\n  max_in_flight: 3\n")
    message = _error(path, env={"INFERMON_LIMITS": '{"max_in_flight": "many"}'})
    assert "limits.max_in_flight = 'many'" in message
    assert "env INFERMON_LIMITS" in message
    assert "file" not in message


# -- the file itself --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "str"), ("42\n", "int")])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = _file(tmp_path, text)
    message = _error(path)
    assert str(path) in message
    assert f"must hold a mapping of keys at the top level, not {kind}" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _file(tmp_path, "listen: [unclosed\n")
    message = _error(path)
    assert f"{path} is not valid YAML" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = _error(path)
    assert f"cannot read config file {path}" in message
    assert "No such file" in message


def test_missing_file_named_by_infermon_config(tmp_path: Path) -> None:
    path = tmp_path / "gone.yaml"
    assert f"cannot read config file {path}" in _error(env={"INFERMON_CONFIG": str(path)})


# -- mask_url ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("http://user:s3cret@model:8000", "http://user:***@model:8000"),
        ("https://user:s3cret@model", "https://user:***@model"),
        ("http://:s3cret@model:8000", "http://:***@model:8000"),
        ("http://user:s3cret@[::1]:8000", "http://user:***@[::1]:8000"),
        ("http://user:s3cret@@model:8000", "http://user:***@model:8000"),
        ("http://User:s3cret@Model.Example:8000", "http://User:***@Model.Example:8000"),
        ("http://user@model:8000", "http://user@model:8000"),
        ("http://model:8000", "http://model:8000"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "s3cret" not in mask_url(url)


# -- docs/configuration.md --------------------------------------------------------------------


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _keys(annotation, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_key_is_documented() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    missing = []
    for key in _keys(ProxyConfig):
        section, _, leaf = key.rpartition(".")
        # a table row of the section (`leaf` under "## `section`"), or the full dotted key
        in_section = section and f"`{key}`" in docs
        if not in_section and f"| `{leaf}` |" not in docs and f"`{key}`" not in docs:
            missing.append(key)
    assert missing == []


@pytest.mark.parametrize("endpoint", ["notaurl", "collector:4317", "ftp://x:4318", "http://:99", "http://c:99999"])
def test_otlp_endpoint_must_be_an_http_url(endpoint: str) -> None:
    message = _error(env={"INFERMON_TRACING__ENABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert "tracing.endpoint" in message
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in message


# -- the admin section ---------------------------------------------------------------------------

TOKEN = "0123456789abcdef0123"


def test_admin_string_is_the_listen_address_and_a_section_works_too(tmp_path: Path) -> None:
    assert _load(_file(tmp_path, "admin: 127.0.0.1:9100\n")).admin.listen == "127.0.0.1:9100"
    cfg = _load(_file(tmp_path, f"admin:\n  listen: 127.0.0.1:9101\n  token: {TOKEN}\n"))
    assert cfg.admin.listen == "127.0.0.1:9101" and cfg.admin.resolved_token() == TOKEN


def test_admin_token_from_env_keeps_the_listen_address_given_as_a_string(tmp_path: Path) -> None:
    cfg = _load(_file(tmp_path, "admin: 127.0.0.1:9100\n"), env={"INFERMON_ADMIN__TOKEN": TOKEN})
    assert cfg.admin.listen == "127.0.0.1:9100" and cfg.admin.resolved_token() == TOKEN
    cfg = _load(env={"INFERMON_ADMIN": "127.0.0.1:9102", "INFERMON_ADMIN__TOKEN": TOKEN})
    assert cfg.admin.listen == "127.0.0.1:9102" and cfg.admin.resolved_token() == TOKEN


def test_admin_flags() -> None:
    cfg = load(
        ProxyConfig,
        env={},
        flags={"admin.listen": "127.0.0.1:9103", "admin.token": TOKEN},
        flag_names={"admin.listen": "admin", "admin.token": "admin-token"},
    )
    assert cfg.admin.listen == "127.0.0.1:9103" and cfg.admin.resolved_token() == TOKEN
    with pytest.raises(ConfigError) as info:
        load(ProxyConfig, env={}, flags={"admin.token": "my secret"}, flag_names={"admin.token": "admin-token"})
    assert "admin.token = ***" in str(info.value) and "flag --admin-token" in str(info.value)
    assert "visible ASCII" in str(info.value)
    assert "my secret" not in str(info.value)  # a secret never reaches an error message


def test_admin_token_may_name_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "admin-token"
    secret.write_text(TOKEN + "\n", encoding="utf-8")
    cfg = _load(env={"INFERMON_ADMIN__TOKEN": str(secret)})
    assert cfg.admin.resolved_token() == TOKEN
    assert cfg.public_dict()["admin"]["token"] == "***"


def test_admin_token_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n", encoding="utf-8")
    cfg = _load(env={"INFERMON_ADMIN__TOKEN_FILE": str(secret)})
    assert cfg.admin.resolved_token() == TOKEN
    message = _error(env={"INFERMON_ADMIN__TOKEN_FILE": str(tmp_path / "missing")})
    assert "admin.token_file" in message and "cannot read the token file" in message
    assert "INFERMON_ADMIN__TOKEN_FILE" in message
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    assert "empty" in _error(env={"INFERMON_ADMIN__TOKEN_FILE": str(empty)})
    both = _error(env={"INFERMON_ADMIN__TOKEN_FILE": str(secret), "INFERMON_ADMIN__TOKEN": TOKEN})
    assert "not both" in both


def test_admin_token_is_masked_in_public_config() -> None:
    cfg = _load(env={"INFERMON_ADMIN__TOKEN": TOKEN})
    public = cfg.public_dict()
    assert public["admin"]["token"] == "***"
    assert TOKEN not in repr(public) and TOKEN not in repr(cfg)
    assert _load().public_dict()["admin"]["token"] is None


# -- sampling, drift and sinks ----------------------------------------------------------------


def test_sample_rate_flag_is_checked_and_named() -> None:
    assert _load(flags={"sampling.rate": 0.25}).sampling.rate == 0.25
    message = _error(env={"INFERMON_SAMPLING__RATE": "1.5"})
    assert "sampling.rate" in message and "INFERMON_SAMPLING__RATE" in message


def test_a_missing_reference_profile_says_how_to_build_one(tmp_path: Path) -> None:
    message = _error(env={"INFERMON_DRIFT__REFERENCE": str(tmp_path / "nope.json")})
    assert "drift.reference" in message and "infermon baseline build" in message


@pytest.mark.parametrize(
    ("path", "says"),
    [("{tmp}/missing/samples.jsonl", "does not exist"), ("{tmp}", "names a directory")],
)
def test_jsonl_sink_path_must_be_writable(tmp_path: Path, path: str, says: str) -> None:
    message = _error(env={"INFERMON_SINKS__JSONL__PATH": path.format(tmp=tmp_path)})
    assert "sinks.jsonl.path" in message and says in message


def test_status_rules_are_statuses_or_classes() -> None:
    assert _load(env={"INFERMON_SAMPLING__ALWAYS__STATUS": '["5xx", "429"]'}).sampling.always.status == ["5xx", "429"]
    message = _error(env={"INFERMON_SAMPLING__ALWAYS__STATUS": '["5x"]'})
    assert "sampling.always.status" in message and "status class" in message


# -- review findings (issue 8) ------------------------------------------------------------------


def test_a_drift_window_smaller_than_min_samples_is_a_config_error(tmp_path: Path) -> None:
    """drift.window_size 50 with drift.min_samples 100 (its default) can never hold enough rows:
    every feature reads "insufficient data" forever and no drift is ever flagged, silently. The
    working rule: bad config is a config error naming the key and the fix."""
    message = _error(_file(tmp_path, "upstream: http://127.0.0.1:8000\ndrift:\n  window_size: 50\n"))
    assert "drift.window_size" in message and "min_samples" in message


def test_psi_warn_above_psi_drift_is_a_config_error(tmp_path: Path) -> None:
    """drift.psi_warn 0.5 with psi_drift 0.25: /drift's level never reads "warn" (drift wins first)."""
    message = _error(_file(tmp_path, "upstream: http://127.0.0.1:8000\ndrift:\n  psi_warn: 0.5\n"))
    assert "drift.psi_warn" in message


def test_an_empty_cloudevents_source_is_a_config_error(tmp_path: Path) -> None:
    """CloudEvents 1.0: source is REQUIRED and "MUST be a non-empty URI-reference"; an empty
    sinks.cloudevents.source goes out as an empty ce-source on every event, which SDK receivers
    refuse."""
    text = "upstream: http://127.0.0.1:8000\nsinks:\n  cloudevents:\n    url: http://127.0.0.1:9/\n    source: ''\n"
    message = _error(_file(tmp_path, text))
    assert "sinks.cloudevents.source" in message


def test_every_upstream_password_is_masked_in_public_config() -> None:
    """The variants' and the shadow's URLs are shown like ``upstream``: without their password."""
    from proxy.settings import ProxyConfig

    cfg = ProxyConfig.model_validate(
        {
            "upstream": "http://u:s3cret-stable@127.0.0.1:8000",
            "upstreams": {"canary": "http://u:s3cret-canary@127.0.0.1:8001", "blue": "http://127.0.0.1:8003"},
            "shadow": {"url": "https://u:s3cret-shadow@127.0.0.1:8002"},
        }
    )
    public = cfg.public_dict()
    assert "s3cret" not in repr(public)
    assert public["upstreams"] == {"canary": "http://u:***@127.0.0.1:8001", "blue": "http://127.0.0.1:8003"}
    assert public["shadow"]["url"] == "https://u:***@127.0.0.1:8002"


def test_canary_baseline_must_be_a_variant_of_the_split() -> None:
    """With a split the variants are known: a baseline that is none of them would leave every
    verdict inconclusive for ever, so it is a config error naming the key and the variants."""
    from pydantic import ValidationError

    from proxy.settings import ProxyConfig

    def config(upstreams: dict[str, str], **canary: object) -> ProxyConfig:
        return ProxyConfig.model_validate({"upstreams": upstreams, "canary": canary})

    with pytest.raises(ValidationError, match=r"canary\.baseline") as info:
        config({"canary": "http://127.0.0.1:8001"}, baseline="stabel")
    assert "canary, stable" in str(info.value)
    assert config({"v2": "http://127.0.0.1:8001"}, baseline="v2").canary.baseline == "v2"
    # no split (a mesh names the variants), or the analysis off: nothing to check it against
    assert config({}, baseline="v1").canary.baseline == "v1"
    assert config({"canary": "http://127.0.0.1:8001"}, baseline="x", enabled=False).canary.baseline == "x"
