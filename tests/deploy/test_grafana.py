"""The Grafana dashboard and its provisioning: generated JSON up to date, panels well formed,
every PromQL expression parses and names only metrics the code defines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.deploy.conftest import (
    BUILTIN_SERIES,
    DEPLOY,
    ROOT,
    check_exprs_parse,
    defined_metric_names,
    grafana_to_promql,
    recording_rule_names,
    series_names,
)

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tcm.json"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(d: dict) -> list[str]:
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def test_dashboard_json_is_built_from_the_script() -> None:
    r = subprocess.run([sys.executable, str(GRAFANA / "build_dashboard.py"), "--check"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr


def test_panels_are_well_formed() -> None:
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    datasource_uid = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]["uid"]
    titles = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        titles.add(p["title"])
        assert p["datasource"]["uid"] == datasource_uid
        assert p["targets"] and all(t["datasource"]["uid"] == datasource_uid
                                    for t in p["targets"])
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
    # what the dashboard is for
    for needed in ("OPIS: live vs baseline", "eps-OPIS: live vs baseline",
                   "FAR / target FAR, log10 (feedback, 1h)", "Impostor scores",
                   "Genuine scores", "Requests by route", "Latency p50 / p99 by route",
                   "Embedding batch size"):
        assert needed in titles
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"tenant", "threshold", "source"} <= variables


def test_every_expression_parses(promtool: str, tmp_path: Path) -> None:
    d = dashboard()
    queries = [grafana_to_promql(e) for e in exprs(d)]
    queries += [grafana_to_promql(v["query"]["query"].split("(", 1)[1].split(",")[0])
                for v in d["templating"]["list"] if v["type"] == "query"]
    check_exprs_parse(promtool, queries, tmp_path)


def test_every_expression_names_defined_metrics() -> None:
    known = defined_metric_names() | recording_rule_names() | BUILTIN_SERIES
    d = dashboard()
    used: set[str] = set()
    for e in exprs(d):
        names = series_names(grafana_to_promql(e))
        assert names, f"no metric in {e!r}"
        assert names <= known, f"{e!r} names undefined series {names - known}"
        used |= names
    # the consistency and per-tenant metrics are all on the dashboard
    for m in ("tcm_opis", "tcm_eps_opis", "tcm_opis_baseline", "tcm_eps_opis_baseline",
              "tcm_impostor_score_bucket", "tcm_genuine_score_bucket", "tcm_tenant_pairs",
              "tcm_tenant_utility_ratio", "tcm_decisions_total", "tcm_embed_batch_images_bucket",
              "tenant:tcm_far_over_target:log10_ratio_rate1h"):
        assert m in used, m


def test_provisioning_points_at_the_mounted_dashboards() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "tcm.yml").read_text())["providers"][0]
    dash_dir = provider["options"]["path"]
    host = next(h for h, c in mounts.items() if c == dash_dir)
    assert (ROOT / host / "tcm.json").is_file()
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    ds = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
