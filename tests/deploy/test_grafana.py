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
    r = subprocess.run(
        [sys.executable, str(GRAFANA / "build_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_panels_are_well_formed() -> None:
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    # every panel reads the datasource variable, which opens at the provisioned Prometheus
    datasource_uid = "${datasource}"
    (ds_var,) = [v for v in d["templating"]["list"] if v["name"] == "datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == provisioned["type"]
    assert ds_var["current"]["value"] == provisioned["uid"]
    assert all(
        a["datasource"]["uid"] == datasource_uid
        for a in d["annotations"]["list"]
        if a.get("builtIn") != 1
    )
    titles = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        titles.add(p["title"])
        assert p["datasource"]["uid"] == datasource_uid
        assert p["targets"] and all(t["datasource"]["uid"] == datasource_uid for t in p["targets"])
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
    # what the dashboard is for
    for needed in (
        "OPIS across subjects, all tenants: live vs reference",
        "OPIS across subjects by tenant / reference upper bound",
        "OPIS across tenants: live vs reference",
        "Model version",
        "Threshold tau",
        "Activation progress",
        "eps-OPIS across tenants: live vs reference",
        "FAR / target FAR, log10 (feedback, 1h)",
        "Impostor scores",
        "Genuine scores",
        "Requests by route",
        "Latency p50 / p99 by route",
        "Embedding batch size",
    ):
        assert needed in titles
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"tenant", "threshold", "source", "datasource"} <= variables


def variable_promql(v: dict) -> str:
    """The PromQL inside a query variable: query_result(expr) or label_values(expr, label)."""
    q = v["query"]["query"]
    if q.startswith("query_result("):
        return q[len("query_result(") : -1]
    return grafana_to_promql(q.split("(", 1)[1].split(",")[0])


def test_every_expression_parses(promtool: str, tmp_path: Path) -> None:
    d = dashboard()
    queries = [grafana_to_promql(e) for e in exprs(d)]
    queries += [variable_promql(v) for v in d["templating"]["list"] if v["type"] == "query"]
    queries += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
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
    for m in (
        "tcm_subjects_opis_pooled",
        "tcm_subjects_opis_pooled_reference",
        "tenant:tcm_subjects_opis_over_reference:ratio",
        "tcm_tenants_opis_reference",
        "tcm_tenants_deviation_reference",
        "tcm_tenant_deviation",
        "tcm_model_info",
        "tcm_model_threshold_score",
        "tcm_model_activation_items",
        "tcm:opis_over_reference:ratio",
        "tcm_opis",
        "tcm_eps_opis",
        "tcm_impostor_score_bucket",
        "tcm_genuine_score_bucket",
        "tcm_tenant_pairs",
        "tcm_tenant_utility_ratio",
        "tcm_decisions_total",
        "tcm_embed_batch_images_bucket",
        "tenant:tcm_far_over_target:log10_ratio_rate1h",
    ):
        assert m in used, m


def test_per_tenant_pair_rates_read_the_pooled_source() -> None:
    """Regression: max over ``source`` (feedback, gallery, pooled) showed the worst source's
    FRR and the best source's utility, not the pooled value."""
    for e in exprs(dashboard()):
        for metric in ("tcm_tenant_frr_ratio", "tcm_tenant_utility_ratio", "tcm_tenant_far_ratio"):
            if metric in e:
                assert f'{metric}{{tenant=~"$tenant",source="pooled"}}' in e, e


def test_what_if_threshold_opens_at_tau() -> None:
    (v,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "threshold"]
    # ordered by distance from tau (sort 0 keeps that order), no saved value: tau is chosen
    assert v["sort"] == 0 and not v["current"]
    assert "abs(" in v["query"]["query"] and "tcm_model_threshold_score" in v["query"]["query"]


def test_provisioning_points_at_the_mounted_dashboards() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tcm.yml").read_text())[
        "providers"
    ][0]
    dash_dir = provider["options"]["path"]
    host = next(h for h, c in mounts.items() if c == dash_dir)
    assert (ROOT / host / "tcm.json").is_file()
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
