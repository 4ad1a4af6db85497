"""The HELP text of the metrics an operator reads next to a target says which rate it is and
what it is compared with (issue 29: three FARs for one tenant), and every recording rule a HELP
text names exists in deploy/prometheus/rules."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from service.metrics import OUTCOMES, ServiceMetrics
from service.monitoring.monitor import MonitorConfig, MonitorMetrics
from tests.deploy.conftest import recording_rule_names, sample_manifest


def helps() -> dict[str, str]:
    registry = CollectorRegistry()
    ServiceMetrics(registry, tenant_label_cap=3)
    MonitorMetrics(registry, sample_manifest(), MonitorConfig())
    return {fam.name: fam.documentation for fam in registry.collect()}


def test_rates_say_what_they_measure_and_their_target() -> None:
    h = helps()
    far = h["tcm_tenant_far_ratio"]
    assert "pair FAR" in far and "gallery" in far and "tcm_model_target_far_ratio" in far
    assert "FPIR" in far and "tenant:tcm_fpir_target:ratio" in far
    assert "pair FAR" in h["tcm_model_target_far_ratio"]
    decisions = h["tcm_decisions"]  # the counter's family name has no _total
    assert all(o in decisions for o in OUTCOMES)
    assert "genuine probes" in decisions and "impostor probes" in decisions
    assert "tcm_tenant_info" in h and "group_left(name)" in h["tcm_tenant_info"]


def test_rules_named_in_help_texts_exist() -> None:
    rules = recording_rule_names()
    named = {
        m.group(0).rstrip("*")
        for text in helps().values()
        for m in re.finditer(r"\b[a-z_]+:[a-z_0-9]+:[a-z_0-9*]*", text)
    }
    assert named, "no rule named in any HELP text"
    for name in named:
        if name.endswith(":"):  # a family, e.g. tenant:tcm_fpir:*
            assert any(r.startswith(name) for r in rules), name
        else:
            assert name in rules, name
