"""Prometheus configuration and rules: promtool accepts them, their unit tests pass, and every
expression names metrics the code defines."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.conftest import (
    BUILTIN_SERIES,
    PROM_DIR,
    RULE_FILES,
    defined_metric_names,
    recording_rule_names,
    run_promtool,
    series_names,
)


def all_rules() -> list[dict]:
    return [
        r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
    ]


def test_promtool_check_config(promtool: str) -> None:
    out = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS" in out
    # the config loads the rule files this suite checks
    assert "rules/*.yml" in yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["rule_files"]


def test_promtool_check_rules(promtool: str) -> None:
    assert RULE_FILES, "no rule files in deploy/prometheus/rules"
    out = run_promtool(promtool, "check", "rules", *[str(f) for f in RULE_FILES])
    assert out.count("SUCCESS") == len(RULE_FILES)


def test_promtool_test_rules(promtool: str) -> None:
    tests = sorted((PROM_DIR / "tests").glob("*.yml"))
    assert tests
    out = run_promtool(promtool, "test", "rules", *[str(t) for t in tests])
    assert "SUCCESS" in out and "FAILED" not in out


def test_rule_unit_tests_cover_every_alert() -> None:
    alerts = {r["alert"] for r in all_rules() if "alert" in r}
    tested = set()
    for t in (PROM_DIR / "tests").glob("*.yml"):
        for case in yaml.safe_load(t.read_text())["tests"]:
            for a in case.get("alert_rule_test", []):
                if a["exp_alerts"]:  # a firing case, not only a quiet one
                    tested.add(a["alertname"])
    assert alerts - tested == set(), "alerts without a firing unit test"
    assert {"TCMOpisDegraded", "TCMTenantFPIRHigh", "TCMFeedbackSilent", "TCMServiceDown"} <= alerts


@pytest.mark.parametrize("rule", all_rules(), ids=lambda r: r.get("record") or r["alert"])
def test_rule_names_and_metrics(rule: dict) -> None:
    known = defined_metric_names() | recording_rule_names() | BUILTIN_SERIES
    unknown = series_names(rule["expr"]) - known
    assert not unknown, f"{rule.get('record') or rule['alert']} names undefined series {unknown}"
    if "record" in rule:
        # level:metric:operations (colons are reserved for recording rules)
        assert re.fullmatch(r"[a-z_]+(:[a-z0-9_]+){1,2}", rule["record"]), rule["record"]
    else:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_code_metrics_follow_the_naming_convention() -> None:
    for name in defined_metric_names():
        assert name.startswith("tcm_") and ":" not in name, name
