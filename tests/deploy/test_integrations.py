"""deploy/datadog, deploy/cloudwatch, deploy/elk, deploy/jaeger: the other backends' files, checked.

None of those services runs here. Each file is parsed the way its consumer parses it; every metric it
names is one infermon documents (with the labels it uses as dimensions), the CloudWatch agent's
Prometheus file passes promtool, and the Filebeat pipeline is replayed on a real access log line of
a real proxy (its script processor run by Node.js, as Filebeat's goja would run it) to give exactly
the ECS document docs/logging.md describes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.observe.accesslog import FIELDS
from proxy.settings import ProxyConfig
from tests.conftest import ProxyFactory
from tests.deploy.promql import DEPLOY, DOCS, documented_labels, load_yaml, needs_promtool, promtool
from tests.helpers import Client, wait_until

NODE = shutil.which("node")


def _sample_names(family: str) -> set[str]:
    return {family, f"{family}_sum", f"{family}_count", f"{family}_bucket"}


# -- Datadog -------------------------------------------------------------------------------------


def test_datadog_openmetrics_check_names_documented_families() -> None:
    doc = load_yaml(DEPLOY / "datadog" / "conf.d" / "openmetrics.d" / "conf.yaml")
    assert "init_config" in doc
    proxy_families = set(re.findall(r"`(infermon_[a-z0-9_]+)`", (DOCS / "metrics.md").read_text()))
    agent_families = set(re.findall(r"`(infermon_[a-z0-9_]+)`", (DOCS / "agent.md").read_text()))
    ports = set()
    for instance in doc["instances"]:
        endpoint = urlsplit(instance["openmetrics_endpoint"])
        assert endpoint.path == "/metrics"
        ports.add(endpoint.port)
        families = {9464: proxy_families, 9465: agent_families}[endpoint.port]
        assert instance["namespace"] == "infermon" and instance["raw_metric_prefix"] == "infermon_"
        for name in instance["metrics"]:
            assert not name.endswith("_total"), f"{name}: counters are named without _total (Agent 7.32+)"
            full = instance["raw_metric_prefix"] + name
            assert full in families or f"{full}_total" in families, name
    assert ports == {9464, 9465}


# -- AWS CloudWatch ------------------------------------------------------------------------------


@needs_promtool
def test_cloudwatch_scrape_config_is_prometheus_config() -> None:
    result = promtool("check", "config", str(DEPLOY / "cloudwatch" / "prometheus.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_cloudwatch_declarations_select_documented_metrics_by_their_labels() -> None:
    agent = json.loads((DEPLOY / "cloudwatch" / "amazon-cloudwatch-agent.json").read_text())
    prom = agent["logs"]["metrics_collected"]["prometheus"]
    assert Path(prom["prometheus_config_path"]).name == "prometheus.yaml"
    jobs = {s["job_name"] for s in load_yaml(DEPLOY / "cloudwatch" / "prometheus.yaml")["scrape_configs"]}
    emf = prom["emf_processor"]
    labels = documented_labels()
    samples = {sample: family for family in labels for sample in _sample_names(family)}
    for name in emf["metric_unit"]:
        assert name in samples, name
    matched_jobs = set()
    for decl in emf["metric_declaration"]:
        matcher = re.compile(decl["label_matcher"])
        assert decl["source_labels"][0] == "job"
        example = {"code": "503"}  # a value each other source label may take
        matched_jobs |= {
            j for j in jobs if matcher.fullmatch(";".join([j, *(example[k] for k in decl["source_labels"][1:])]))
        }
        selected = {s for s in samples for sel in decl["metric_selectors"] if re.fullmatch(sel.strip("^$"), s)}
        assert selected, decl["metric_selectors"]
        for sel in decl["metric_selectors"]:
            assert any(re.fullmatch(sel.strip("^$"), s) for s in samples), f"{sel} selects no documented metric"
        for sample in selected:
            available = labels[samples[sample]] | {"instance", "job"}
            for dims in decl["dimensions"]:
                assert set(dims) <= available, (sample, dims)
            assert set(decl["source_labels"][1:]) <= available
    assert matched_jobs == jobs


# -- Elasticsearch (Filebeat) --------------------------------------------------------------------


def _ecs_mapping() -> dict[str, str]:
    """access-log field -> its ECS name, from the table of docs/logging.md."""
    out = {}
    for line in (DOCS / "logging.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            ecs = re.findall(r"`([^`]+)`", cells[4])
            for field, target in zip(re.findall(r"`(\w+)`", cells[0]), ecs, strict=True):
                out[field] = target
    return out


def _put(doc: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        doc = doc.setdefault(part, {})
    doc[last] = value


def _get(doc: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def _delete(doc: dict[str, Any], key: str) -> None:
    *parents, last = key.split(".")
    for part in parents:
        doc = doc.get(part, {})
    doc.pop(last, None)


_GO_LAYOUT = {"2006": "%Y", "01": "%m", "02": "%d", "15": "%H", "04": "%M", "05": "%S", ".000": ".%f"}
#: Filebeat's event API (Get, Put, Delete on dotted keys) around the script's process(event)
_SCRIPT_HARNESS = """
const fs = require("fs");
const doc = JSON.parse(fs.readFileSync(0, "utf8"));
function walk(key, create) {
  const parts = key.split(".");
  let d = doc;
  for (const p of parts.slice(0, -1)) {
    if (typeof d[p] !== "object" || d[p] === null) {
      if (!create) return [null, null];
      d[p] = {};
    }
    d = d[p];
  }
  return [d, parts[parts.length - 1]];
}
const event = {
  Get(key) { const [d, k] = walk(key, false); return d !== null && k in d ? d[k] : null; },
  Put(key, value) { const [d, k] = walk(key, true); d[k] = value; },
  Delete(key) { const [d, k] = walk(key, false); if (d !== null) delete d[k]; },
};
%SOURCE%
process(event);
fs.writeSync(1, JSON.stringify(doc));
"""


def _run_filebeat(line: str, processors: list[dict[str, Any]]) -> dict[str, Any]:
    """The processors Filebeat would apply to one ndjson line (target ""), as far as the file uses them."""
    doc: dict[str, Any] = json.loads(line)
    for proc in processors:
        ((kind, cfg),) = proc.items()
        if kind == "timestamp":
            layout = cfg["layouts"][0]
            for go, py in _GO_LAYOUT.items():
                layout = layout.replace(go, py)
            for sample in cfg.get("test", []):
                datetime.strptime(sample, layout)  # the layout reads the documented form
            value = doc[cfg["field"]]
            doc["@timestamp"] = datetime.strptime(value, layout).replace(tzinfo=UTC).isoformat()
        elif kind == "drop_fields":
            for name in cfg["fields"]:
                _delete(doc, name)
        elif kind == "rename":
            for item in cfg["fields"]:
                if item["from"] in doc:
                    value = doc.pop(item["from"])
                    _put(doc, item["to"], value)
        elif kind == "script":
            assert cfg["lang"] == "javascript"
            assert NODE is not None
            harness = _SCRIPT_HARNESS.replace("%SOURCE%", cfg["source"])
            result = subprocess.run([NODE, "-e", harness], input=json.dumps(doc), capture_output=True, text=True,
                                    timeout=30, check=False)  # fmt: skip
            assert result.returncode == 0, result.stderr
            doc = json.loads(result.stdout)
        elif kind == "add_fields":
            for key, value in cfg["fields"].items():
                _put(doc, f"{cfg['target']}.{key}" if cfg["target"] else key, value)
        else:
            raise AssertionError(f"processor {kind} is not replayed here")
    return doc


def test_filebeat_renames_every_field_to_the_documented_ecs_name() -> None:
    cfg = load_yaml(DEPLOY / "elk" / "filebeat.yml")
    mapping = _ecs_mapping()
    assert set(mapping) == set(FIELDS)  # the table documents every field of a line
    renames = {r["from"]: r["to"] for p in cfg["processors"] if "rename" in p for r in p["rename"]["fields"]}
    special = {"timestamp": "@timestamp", "duration_ms": "event.duration"}  # a processor of their own each
    assert {**renames, **special} == mapping
    for source in cfg["filebeat.inputs"]:
        ndjson = [p["ndjson"] for p in source["parsers"] if "ndjson" in p]
        assert ndjson == [{"target": "", "add_error_key": True}]
    kubernetes = cfg["filebeat.inputs"][1]
    assert kubernetes["parsers"][0] == {"container": {"stream": "stdout"}}  # diagnostics are on stderr


@pytest.mark.skipif(NODE is None, reason="node is needed to run the script processor's JavaScript")
async def test_filebeat_turns_a_real_access_log_line_into_the_ecs_document(
    make_proxy: ProxyFactory, upstream: str, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    app = await make_proxy(
        upstream, access_log={"enabled": True, "path": str(log), "success_ratio": 1.0, "flush_interval": 0.05}
    )
    client = await Client.connect(app.proxy_address)
    ok = await client.request("POST", "/v2/models/iris/versions/2/infer", headers={"User-Agent": "e2e/1"}, body=b"{}")
    failed = await client.request("GET", "/status/503")
    assert (ok.status, failed.status) == (200, 503)
    await client.close()

    async def written() -> bool:
        return log.exists() and len(log.read_text().splitlines()) == 2

    await wait_until(written)
    lines = log.read_text().splitlines()
    processors = load_yaml(DEPLOY / "elk" / "filebeat.yml")["processors"]
    mapping = _ecs_mapping()
    for line, outcome in zip(lines, ("success", "failure"), strict=True):
        raw = json.loads(line)
        doc = _run_filebeat(line, processors)
        for field, target in mapping.items():
            if field == "timestamp":
                assert doc["@timestamp"].startswith(raw["timestamp"][:19])
            elif field == "duration_ms":
                assert doc["event"]["duration"] == round(raw["duration_ms"] * 1_000_000)
            else:
                assert _get(doc, target) == raw[field], (field, target)
        left = {f for f in FIELDS if f in doc and not isinstance(doc[f], dict)}  # `error` is an ECS object
        assert left == set(), "fields left under their own names"
        assert doc["event"]["outcome"] == outcome
        assert doc["log"]["level"] == ("info" if outcome == "success" else "error")
    assert _get(_run_filebeat(lines[0], processors), "labels.model") == "iris"


# -- Jaeger ----------------------------------------------------------------------------------------


def test_jaeger_config_sends_otlp_straight_to_jaeger() -> None:
    cfg = ProxyConfig.model_validate(yaml.safe_load((DEPLOY / "jaeger" / "infermon.yaml").read_text()))
    assert cfg.tracing.enabled
    assert cfg.tracing.endpoint is not None
    port = urlsplit(cfg.tracing.endpoint).port
    assert (cfg.tracing.protocol, port) in {("http/protobuf", 4318), ("grpc", 4317)}


def test_the_documented_autodiscovery_annotation_is_the_check_s_json() -> None:
    text = (DOCS / "integrations.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "ad.datadoghq.com" in b]
    annotations = yaml.safe_load(block)["metadata"]["annotations"]
    checks = json.loads(annotations["ad.datadoghq.com/infermon.checks"])
    (instance,) = checks["openmetrics"]["instances"]
    shipped = load_yaml(DEPLOY / "datadog" / "conf.d" / "openmetrics.d" / "conf.yaml")["instances"][0]
    for key in ("namespace", "raw_metric_prefix", "histogram_buckets_as_distributions"):
        assert instance[key] == shipped[key], key
    assert set(instance["metrics"]) <= set(shipped["metrics"])
    assert urlsplit(instance["openmetrics_endpoint"].replace("%%host%%", "pod")).port == 9464
