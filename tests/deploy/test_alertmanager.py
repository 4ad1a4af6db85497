"""The Alertmanager example (deploy/alertmanager/alertmanager.yml): valid for Alertmanager's own
checker (``amtool``, from Debian's prometheus-alertmanager, which ``make test`` installs), and
routing the project's alerts as it says: every alert rule labelled ``action: retrain`` in the
rule files to the retrain receiver (an alert name may have a twin labelled ``action:
investigate``, when a retrain cannot help the tenant: that one does not go there), critical
ones to on-call, the rest to the service's channel."""

from __future__ import annotations

import subprocess

import yaml

from tests.deploy.conftest import DEPLOY, RULE_FILES, tool

CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"


def amtool(*args: str) -> str:
    r = subprocess.run(
        [tool("amtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def alert_rules() -> list[dict]:
    return [
        rule
        for f in RULE_FILES
        for group in yaml.safe_load(f.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def test_amtool_accepts_the_config() -> None:
    out = amtool("check-config", str(CONFIG))
    assert "SUCCESS" in out


def test_every_alert_reaches_the_receiver_its_labels_call_for() -> None:
    rules = alert_rules()
    retrain = {r["alert"] for r in rules if r.get("labels", {}).get("action") == "retrain"}
    assert retrain >= {"TCMSubjectsOpisDegraded", "TCMSubjectsOpisPooledDegraded"}
    for rule in rules:
        labels = {"alertname": rule["alert"], **rule.get("labels", {}), "tenant": "t1"}
        pairs = [f"{k}={v}" for k, v in labels.items()]
        got = amtool("config", "routes", "test", f"--config.file={CONFIG}", *pairs).split()
        if rule.get("labels", {}).get("action") == "retrain":
            want = "tcm-retrain"
        elif labels.get("severity") == "critical":
            want = "tcm-oncall"
        else:
            want = "tcm-service"
        assert got == [want], (rule["alert"], got)
