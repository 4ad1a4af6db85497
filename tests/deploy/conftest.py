"""Shared pieces of the deploy suite: the Prometheus tools, the metric names the code defines,
and a PromQL name extractor."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tcm import Baseline, Calibration, Manifest, Preprocessing

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
# series Prometheus itself makes: scrape health, and the alerts' state (ALERTS{alertstate},
# ALERTS_FOR_STATE = when each pending or firing alert became active)
BUILTIN_SERIES = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "ALERTS",
    "ALERTS_FOR_STATE",
}
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `apt-get install prometheus` (make test does it)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool")


def run_promtool(promtool: str, *args: str, cwd: Path = PROM_DIR) -> str:
    r = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def defined_metric_names() -> set[str]:
    """Every series name the service exposes: the service's metrics and the monitor's, as
    exposed (counter ``_total``, histogram ``_bucket``/``_count``/``_sum``, gauge histogram
    ``_bucket``/``_gcount``/``_gsum``, info ``_info``)."""
    from service.metrics import ServiceMetrics
    from service.monitoring.monitor import MonitorConfig, MonitorMetrics

    registry = CollectorRegistry()
    ServiceMetrics(registry, tenant_label_cap=3)
    MonitorMetrics(registry, sample_manifest(), MonitorConfig())
    suffixes = {
        "counter": ["_total"],
        "gauge": [""],
        "histogram": ["_bucket", "_count", "_sum"],
        "gaugehistogram": ["_bucket", "_gcount", "_gsum"],
        "info": ["_info"],
        "summary": ["", "_count", "_sum"],
    }
    names: set[str] = set()
    for fam in registry.collect():
        names.update(fam.name + s for s in suffixes[fam.type])
    return names


def recording_rule_names() -> set[str]:
    names = set()
    for f in RULE_FILES:
        for group in yaml.safe_load(f.read_text())["groups"]:
            names.update(r["record"] for r in group["rules"] if "record" in r)
    return names


def sample_manifest() -> Manifest:
    return Manifest(
        model_version="deploy-test",
        architecture="small_cnn",
        architecture_kwargs={},
        preprocessing=Preprocessing(image_size=(16, 16), channels=1, mean=(0.5,), std=(0.5,)),
        embedding_dim=8,
        calibration=Calibration(
            tau=0.5, target_far=0.01, far_at_tau=0.01, frr_at_tau=0.05, tau_lo=0.4, tau_hi=0.6
        ),
        baseline=Baseline(
            opis=0.002,
            eps_opis=0.02,
            eps=0.05,
            recall_at_1=0.9,
            map_at_r=0.5,
            num_classes=10,
            num_images=100,
        ),
    )


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*")


def grafana_to_promql(expr: str) -> str:
    """Substitutes the dashboard's variables with values that keep the expression valid."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    expr = expr.replace("$threshold", "0.5")
    return re.sub(r"\$\{?[A-Za-z_]+\}?", ".*", expr)


def series_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, label names and values,
    durations and numbers removed)."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\boffset\s+\w+", "", s)
    names = set()
    for m in _IDENT.finditer(s):
        rest = s[m.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function or aggregation
        if m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def check_exprs_parse(promtool: str, exprs: Iterable[str], tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule) or the check fails."""
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    f = tmp_path / "exprs.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(f), cwd=tmp_path)
