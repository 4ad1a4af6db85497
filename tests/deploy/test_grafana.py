"""The Grafana dashboard and its provisioning: generated JSON up to date, panels well formed,
every PromQL expression parses and names only metrics the code defines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import (
    BUILTIN_SERIES,
    DEPLOY,
    ROOT,
    RULE_FILES,
    check_exprs_parse,
    defined_metric_names,
    grafana_to_promql,
    recording_rule_names,
    run_promtool,
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
        "FPIR by tenant vs its FPIR target (labelled 1:N decisions)",
        "FPIR / FPIR target, log10 (labelled 1:N decisions)",
        "FRR by tenant (labelled 1:N decisions) vs calibration FRR",
        "Age of the last labelled decision by tenant",
        "Pair FAR at tau (gallery pairs) vs target pair FAR",
        "Target pair FAR",
        "Retrain advised for",
        "Alerts now",
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
        "tenant:tcm_fpir:ratio_rate1h_observed",
        "tenant:tcm_frr:ratio_rate1h_observed",
        "tenant:tcm_fpir_target:ratio",
        "tenant:tcm_labelled_decisions:last_timestamp_seconds",
        "tcm_tenant_info",
        "ALERTS",
        "ALERTS_FOR_STATE",
    ):
        assert m in used, m


def test_per_tenant_pair_rates_read_one_source() -> None:
    """Regression: max over ``source`` (feedback, gallery, pooled) showed the worst source's
    FRR and the best source's utility, not the pooled value. FRR and utility read the pooled
    source; the pair FAR reads the gallery pairs, the one pair FAR compared with the target."""
    wanted = {
        "tcm_tenant_frr_ratio": "pooled",
        "tcm_tenant_utility_ratio": "pooled",
        "tcm_tenant_far_ratio": "gallery",
    }
    seen = set()
    for e in exprs(dashboard()):
        for metric, source in wanted.items():
            if metric in e:
                assert f'{metric}{{tenant=~"$tenant",source="{source}"}}' in e, e
                seen.add(metric)
    assert seen == set(wanted)


def test_each_rate_sits_next_to_its_own_target() -> None:
    """Issue 29: FPIR (probes of 1:N decisions) is shown with its FPIR target, the pair FAR
    with the target pair FAR, and no panel plots an FPIR against the target pair FAR."""
    for p in dashboard()["panels"]:
        es = [t["expr"] for t in p.get("targets", [])]
        text = " ".join(es)
        if "tcm_fpir:" in text:
            assert "tcm_fpir_target:ratio" in text, p["title"]
            assert "tcm_model_target_far_ratio" not in text, p["title"]
            assert "FPIR" in p["title"] and "FPIR" in p["description"]
        if "tcm_tenant_far_ratio" in text:
            assert "tcm_model_target_far_ratio" in text and "Pair FAR" in p["title"]
    # per-tenant series are shown with the tenant's name (tcm_tenant_info)
    per_tenant = [
        t for p in dashboard()["panels"] for t in p.get("targets", []) if '"$tenant"' in t["expr"]
    ]
    assert per_tenant
    for t in per_tenant:
        if "{{tenant}}" in t["legendFormat"]:
            assert "group_left(name)" in t["expr"] and "{{name}}" in t["legendFormat"], t


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


def panel_exprs(title: str) -> list[str]:
    (p,) = [p for p in dashboard()["panels"] if p.get("title") == title]
    return [grafana_to_promql(t["expr"]) for t in p["targets"]]


def test_feedback_rate_panels_answer_when_no_feedback_arrived(
    promtool: str, tmp_path: Path
) -> None:
    """Issue 29: the feedback FAR/FRR panels were NaN whenever no feedback arrived in their
    window. A tenant labels decisions for an hour, then none for two: at 3h its hourly rates
    hold no observation, and the panels' own queries (read from the dashboard JSON) still give
    the last hour's FPIR and FRR by the tenant's name, with how old they are. Prometheus's own
    rule engine (``promtool test rules``) evaluates them over hours of data without waiting."""
    per_min = {"false_accept": 2, "true_reject": 98, "true_accept": 8, "wrong_accept": 1}
    per_min["false_reject"] = 1
    series = [
        {
            "series": f'tcm_decisions_total{{job="tcm-service",instance="a",tenant="quiet",'
            f'outcome="{o}"}}',
            "values": f"0+{n}x60 {60 * n}x120",  # an hour of labels, then none
        }
        for o, n in per_min.items()
    ]
    constant = {
        'tcm_model_target_far_ratio{job="tcm-service",instance="a"}': 0.01,
        'tcm_model_calibration_frr_ratio{job="tcm-service",instance="a"}': 0.05,
        'tcm_gallery_items{job="tcm-service",instance="a",tenant="quiet"}': 1,
        'tcm_tenant_info{job="tcm-service",instance="a",tenant="quiet",name="Quiet Ltd"}': 1,
    }
    series += [{"series": k, "values": f"{v}x180"} for k, v in constant.items()]
    who = '{name="Quiet Ltd",tenant="quiet"}'
    fpir, fpir_target = panel_exprs("FPIR by tenant vs its FPIR target (labelled 1:N decisions)")
    frr, calibration_frr = panel_exprs("FRR by tenant (labelled 1:N decisions) vs calibration FRR")
    (fpir_log, _) = panel_exprs("FPIR / FPIR target, log10 (labelled 1:N decisions)")
    (frr_log,) = panel_exprs("FRR / calibration FRR, log10 (labelled 1:N decisions)")
    (age,) = panel_exprs("Age of the last labelled decision by tenant")
    checks = [
        # no fresh observation: the hourly rates have nothing to say at 3h
        ("tenant:tcm_fpir:ratio_rate1h_observed", []),
        ("tenant:tcm_frr:ratio_rate1h_observed", []),
        # the panels carry the last hour's values: FPIR 2/100, FRR 1/10 (wrong accepts in
        # the denominator), against FPIR target 1 - 0.99^1
        (f"round({fpir}, 0.0001)", [(who, 0.02)]),
        (f"round({fpir_target}, 0.0001)", [(who, 0.01)]),
        (f"round({frr}, 0.0001)", [(who, 0.1)]),
        (calibration_frr, [("{}", 0.05)]),
        (f"round({fpir_log}, 0.001)", [(who, 0.301)]),
        (f"round({frr_log}, 0.001)", [(who, 0.301)]),
        # last labels at about 1h, seen at 3h: two hours old
        (f"round(({age}) / 3600)", [(who, 2)]),
    ]
    test = {
        "rule_files": [str(f) for f in RULE_FILES],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "180m",
                        "exp_samples": [{"labels": lab, "value": v} for lab, v in want],
                    }
                    for expr, want in checks
                ],
            }
        ],
    }
    path = tmp_path / "carried_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    run_promtool(promtool, "test", "rules", str(path), cwd=tmp_path)


@pytest.mark.slow
def test_new_panels_answer_from_a_real_prometheus(tmp_path: Path) -> None:
    """A real Prometheus (the project's config and rule files, 1 s intervals, every alert's
    ``for:`` cut to 1 s) scrapes a real registry: the service's metrics (ServiceMetrics, with
    tcm_tenant_info from the store's tenant list and feedback counted as Matcher.feedback
    does) plus the monitor's gauges that the retrain alerts read, set by hand to a drift. The
    new panels' queries, read from the dashboard JSON, answer: names joined on the tenant id,
    the tenant variable lists names, the retrain stat is 0 until an ``action: retrain`` alert
    fires and counts seconds after, the alert table lists it, and a tenant alert's summary
    names the tenant."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from service.metrics import ServiceMetrics
    from tests.deploy.promserver import free_port, running_prometheus, wait_for

    registry = CollectorRegistry(auto_describe=True)
    metrics = ServiceMetrics(registry, tenant_label_cap=5)
    tid = "4f1c0a9e2b7d4e38a1c5"
    metrics.set_tenant_names([(tid, "Acme Birds"), ("9e0d", "Zoo Zurich")])
    metrics.set_gallery_size({tid: 10, "9e0d": 4})
    gauge = {
        name: Gauge(name, "set by the test", labels, registry=registry)
        for name, labels in (
            ("tcm_model_target_far_ratio", []),
            ("tcm_model_calibration_frr_ratio", []),
            ("tcm_subjects_opis", ["tenant"]),
            ("tcm_subjects_opis_reference", ["tenant", "bound"]),
            ("tcm_subjects_opis_pooled", []),
            ("tcm_subjects_opis_pooled_reference", ["bound"]),
        )
    }
    gauge["tcm_model_target_far_ratio"].set(0.01)
    gauge["tcm_model_calibration_frr_ratio"].set(0.05)

    def feedback() -> None:
        for outcome, n in (("false_accept", 1), ("true_reject", 9), ("true_accept", 5)):
            metrics.decisions.labels(tenant=tid, outcome=outcome).inc(n)

    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    d = dashboard()
    by_title = {p["title"]: p for p in d["panels"] if p["type"] != "row"}

    def panel(title: str, i: int = 0) -> str:
        return grafana_to_promql(by_title[title]["targets"][i]["expr"])

    try:
        with running_prometheus(tmp_path, port, alert_for="1s") as prom:

            def result(expr: str) -> list[dict]:
                return prom.get("/api/v1/query", query=expr)["result"]

            retrain = panel("Retrain advised for")
            # scraped and evaluated, and no retrain alert: the stat reads 0 ("not advised")
            wait_for(
                lambda: bool(result("tenant:tcm_fpir_target:ratio")),
                30,
                "the FPIR target rule",
                prom,
                feedback,
            )
            assert [float(r["value"][1]) for r in result(retrain)] == [0.0]
            # names joined onto the per-tenant series
            fpir = panel("FPIR by tenant vs its FPIR target (labelled 1:N decisions)")
            wait_for(lambda: bool(result(fpir)), 30, "the FPIR panel", prom, feedback)
            (row,) = result(fpir)
            assert row["metric"] == {"tenant": tid, "name": "Acme Birds"}
            assert float(row["value"][1]) == pytest.approx(0.1)
            target = {
                r["metric"]["name"]: float(r["value"][1])
                for r in result(
                    panel("FPIR by tenant vs its FPIR target (labelled 1:N decisions)", 1)
                )
            }
            assert target == pytest.approx({"Acme Birds": 1 - 0.99**10, "Zoo Zurich": 1 - 0.99**4})
            (tenants,) = [v for v in d["templating"]["list"] if v["name"] == "tenant"]
            listed = {
                (r["metric"]["name"], r["metric"]["tenant"])
                for r in result(variable_promql(tenants))
            }
            assert listed == {("Acme Birds", tid), ("Zoo Zurich", "9e0d")}

            # the tenant's subjects drift apart: a retrain alert fires for it
            gauge["tcm_subjects_opis"].labels(tenant=tid).set(0.05)
            gauge["tcm_subjects_opis_reference"].labels(tenant=tid, bound="hi").set(0.01)
            wait_for(
                lambda: ("TCMSubjectsOpisDegraded", tid) in prom.alerts("firing"),
                30,
                "TCMSubjectsOpisDegraded to fire",
                prom,
                feedback,
            )
            wait_for(
                lambda: float(result(retrain)[0]["value"][1]) > 0,
                30,
                "the retrain stat to count",
                prom,
                feedback,
            )
            rows = [r["metric"] for r in result(panel("Alerts now"))]
            assert {
                "alertname": "TCMSubjectsOpisDegraded",
                "alertstate": "firing",
                "severity": "warning",
                "action": "retrain",
                "tenant": tid,
                "name": "Acme Birds",
            } in rows
            # an alert of no tenant is listed too, once: the name join does not drop it
            gauge["tcm_subjects_opis_pooled"].set(0.05)
            gauge["tcm_subjects_opis_pooled_reference"].labels(bound="hi").set(0.01)

            def pooled_rows() -> list[dict]:
                return [
                    r["metric"]
                    for r in result(panel("Alerts now"))
                    if r["metric"]["alertname"] == "TCMSubjectsOpisPooledDegraded"
                ]

            wait_for(lambda: bool(pooled_rows()), 30, "the pooled alert", prom, feedback)
            assert len(pooled_rows()) == 1 and "name" not in pooled_rows()[0]
            (alert,) = [
                a
                for a in prom.get("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == "TCMSubjectsOpisDegraded"
            ]
            assert alert["annotations"]["summary"].startswith(f"Tenant {tid} (Acme Birds):")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
