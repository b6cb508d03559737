"""What the deploy/ tests share: the Prometheus tools, and the metric names infermon documents.

CI installs promtool and amtool (Debian's prometheus and prometheus-alertmanager packages, see
.ci/run): there a missing tool is a failure, elsewhere a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCS = REPO / "docs"
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
#: Debian names the server prometheus-alertmanager; upstream's tarball and image call it alertmanager
ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
PROMETHEUS = shutil.which("prometheus")
IN_CI = bool(os.environ.get("CI"))
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not IN_CI, reason="promtool not installed (apt-get install prometheus)"
)
needs_amtool = pytest.mark.skipif(
    AMTOOL is None and not IN_CI, reason="amtool not installed (apt-get install prometheus-alertmanager)"
)
needs_servers = pytest.mark.skipif(
    (PROMETHEUS is None or ALERTMANAGER is None) and not IN_CI,
    reason="prometheus and alertmanager not installed (apt-get install prometheus prometheus-alertmanager)",
)

#: every alert's runbook is its section of docs/alerts.md under this base (docs/alerts.md, "Runbook links")
RUNBOOK_BASE = "https://infermon.example/docs/alerts.md"
RULE_FILES = (DEPLOY / "prometheus" / "infermon.rules.yml", DEPLOY / "prometheus" / "drift.rules.yml")
#: series Prometheus makes itself, not infermon
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_NAME = re.compile(r"(?<![\w:])(infermon[a-z0-9_:]*)")
_DOCUMENTED = re.compile(r"`(infermon_[a-z0-9_]+)`")
_HISTOGRAM_SAMPLE = re.compile(r"_(bucket|sum|count)$")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is missing: CI must install it (apt-get install prometheus)"
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False)


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert AMTOOL is not None, "amtool is missing: CI must install it (apt-get install prometheus-alertmanager)"
    return subprocess.run([AMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def documented_metrics() -> set[str]:
    """Every family docs/metrics.md lists: the proxy's and the node agent's (the issue's one reference;
    tests/observe/test_metrics.py and tests/agent/test_command.py hold it to what each exports)."""
    return set(_DOCUMENTED.findall((DOCS / "metrics.md").read_text()))


def recorded_names() -> set[str]:
    """The series the shipped recording rules make."""
    return {r["record"] for path in RULE_FILES for g in load_yaml(path)["groups"] for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    """The infermon metric and recording-rule names an expression reads (label values excluded)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    names = set(_NAME.findall(without_strings))
    if re.search(r"(?<![\w:])up\s*\{", without_strings):
        names.add("up")
    return names


def undocumented(names: set[str]) -> set[str]:
    """The names neither documented, nor recorded by the shipped rules, nor Prometheus' own."""
    documented = documented_metrics()
    known = documented | recorded_names() | PROMETHEUS_SERIES
    out = set()
    for name in names:
        if name in known:
            continue
        family = _HISTOGRAM_SAMPLE.sub("", name)
        if family != name and family in documented:
            continue
        out.add(name)
    return out


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alerts(path: Path) -> list[dict[str, Any]]:
    return [r for g in load_yaml(path)["groups"] for r in g["rules"] if "alert" in r]


def check_exprs(tmp_path: Path, exprs: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` on each expression written as a recording rule: does it parse?"""
    rules = {
        "groups": [
            {
                "name": "check",
                "rules": [{"record": f"check:expr{i}", "expr": e} for i, e in enumerate(exprs.values())],
            }
        ]
    }
    path = tmp_path / "exprs.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    return promtool("check", "rules", str(path))


#: the labels of every per-device series of the agent (docs/metrics.md, "Node agent"; docs/agent.md)
DEVICE_LABELS = frozenset({"gpu", "uuid", "model_name", "hostname", "gpu_instance_id", "mig_profile"})


def _label_names(cell: str) -> set[str]:
    """A labels cell: ``model, version``, names in backquotes, values in parentheses, or ``x = ...; y = ...``."""
    cell = re.sub(r"\([^)]*\)", "", cell).replace("`", "")
    names: set[str] = set()
    for part in cell.split(";"):
        if "=" in part:
            names.add(part.split("=")[0].strip())
            continue
        for item in part.split(","):
            word = re.match(r"\s*([a-z_][a-z0-9_]*)", item)
            if word:
                names.add(word.group(1))
    return names


def documented_labels() -> dict[str, set[str]]:
    """Family -> its labels, from the tables of docs/metrics.md (a header names the column; an
    ``extra labels`` column is the agent's per-device series, which carry the device labels too)."""
    out: dict[str, set[str]] = {}
    column: int | None = None
    device = False
    for line in (DOCS / "metrics.md").read_text().splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "metric":
            column = next((i for i, c in enumerate(cells) if "labels" in c), None)
            device = "extra labels" in cells
            continue
        name = re.fullmatch(r"`(infermon_[a-z0-9_]+)`", cells[0])
        if name is None or column is None:
            continue
        labels = _label_names(cells[column]) | (set(DEVICE_LABELS) if device else set())
        out.setdefault(name.group(1), set()).update(labels)
    return out
