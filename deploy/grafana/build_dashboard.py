"""Builds the Grafana dashboard of the threshold-consistent retrieval service.

    python deploy/grafana/build_dashboard.py            # writes deploy/grafana/dashboards/tcm.json
    python deploy/grafana/build_dashboard.py --check    # exits 1 if the JSON is out of date

The JSON is generated so that panels stay uniform and every PromQL expression sits in one
readable list; ``tests/deploy/test_grafana.py`` checks that each expression parses (promtool) and
names only metrics the code defines or recording rules in ``deploy/prometheus/rules``.

Reading across replicas: counters and latency histograms are summed; the monitor's gauges mirror
one shared snapshot, identical on every replica, so they are taken with ``max``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "tcm.json"
# every panel reads the Prometheus the ``datasource`` variable names (provisioned: uid prometheus)
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
UID = "tcm-service"
T = '{tenant=~"$tenant"}'
# per-tenant rates of the monitor's pairs: both sources pooled (the other values of ``source``
# are feedback and gallery alone; aggregating over all three would mix them)
TP = '{tenant=~"$tenant",source="pooled"}'
TG = 'tenant=~"$tenant",source="gallery"'
FLOOR = "scalar(tcm_config:opis_reference_floor)"
# tenant names (tcm_tenant_info, one series per value of the capped tenant label): a per-tenant
# series joined with it gains a ``name`` label for its legend. topk keeps one name per tenant
# while replicas briefly disagree (a rename between two scrapes).
NAMES = "topk by (tenant) (1, max by (tenant, name) (tcm_tenant_info))"
WHO = "{{name}} ({{tenant}})"
ALERTS = "max by (alertname, alertstate, severity, action, tenant) (ALERTS)"
# how far back a carried-forward rate may come from
CARRY = "7d"


def named(expr: str) -> str:
    """``expr`` (one series per tenant) with the tenant's name as a label."""
    return f"({expr}) * on(tenant) group_left(name) {NAMES}"


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "refId": ref,
        "range": True,
        **extra,
    }


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(pairs)]


class Layout:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1
        self.panels: list[dict[str, Any]] = []

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": self._id(),
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def add(self, panel: dict[str, Any], w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel.setdefault("datasource", DATASOURCE)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        self.y += self.row_h
        self.x, self.row_h = 0, 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def timeseries(
    title: str,
    description: str,
    tgts: list[dict[str, Any]],
    *,
    unit: str = "short",
    log: bool = False,
    thresholds: list[tuple[float, str]] | None = None,
    min_: float | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 2,
            "fillOpacity": 5,
            "showPoints": "never",
            "spanNulls": True,
        },
    }
    if log:
        defaults["custom"]["scaleDistribution"] = {"type": "log", "log": 10}
    if min_ is not None:
        defaults["min"] = min_
    if thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": c, "value": v} for v, c in [(None, "green"), *thresholds]],
        }
        defaults["custom"]["thresholdsStyle"] = {"mode": "dashed"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "targets": tgts,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "right",
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    description: str,
    tgts: list[dict[str, Any]],
    *,
    unit: str = "short",
    thresholds: list[tuple[float, str]] | None = None,
    text_mode: str = "auto",
    decimals: int | None = None,
    mappings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    steps = [{"color": c, "value": v} for v, c in [(None, "green"), *(thresholds or [])]]
    defaults: dict[str, Any] = {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}}
    if decimals is not None:
        defaults["decimals"] = decimals
    if mappings:
        defaults["mappings"] = mappings
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "targets": tgts,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "textMode": text_mode,
        },
    }


def table(title: str, description: str, expr: str, columns: list[str]) -> dict[str, Any]:
    """An instant query as a table, one row per series, showing ``columns`` (labels)."""
    keep = {c: False for c in columns}
    return {
        "type": "table",
        "title": title,
        "description": description,
        "targets": [target(expr, ref="A", format="table", instant=True, range=False)],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True, "footer": {"show": False}},
        "transformations": [
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "Value": True, "__name__": True},
                    "indexByName": {c: i for i, c in enumerate(columns)},
                    "renameByName": {},
                },
            },
            {"id": "filterFieldsByName", "options": {"include": {"names": list(keep)}}},
        ],
    }


def heatmap(title: str, description: str, expr: str) -> dict[str, Any]:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "targets": [target(expr, "{{le}}", format="heatmap")],
        "options": {
            "calculate": False,
            "yAxis": {"unit": "short"},
            "cellGap": 1,
            "color": {"scheme": "Oranges", "mode": "scheme"},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"show": True},
        },
        "fieldConfig": {"defaults": {}, "overrides": []},
    }


TENANT_QUERY = "query_result(max by (name, tenant) (tcm_tenant_info))"
THRESHOLD_QUERY = (
    "query_result(sort(abs(max by (le) (tcm_monitor_score_bound) - "
    "scalar(max(tcm_model_threshold_score)))))"
)
# model switches and failed activations as annotations on every panel
ANNOTATIONS = [
    {
        "name": "Model switches",
        "enable": True,
        "hide": False,
        "iconColor": "purple",
        "datasource": DATASOURCE,
        "step": "30s",
        "useValueForTime": False,
        "expr": "count by (model_version) (tcm_model_info unless tcm_model_info offset 1m)",
        "titleFormat": "model switch",
        "textFormat": "now serving {{model_version}}",
    },
    {
        "name": "Failed activations",
        "enable": True,
        "hide": False,
        "iconColor": "red",
        "datasource": DATASOURCE,
        "step": "30s",
        "expr": 'sum(increase(tcm_model_activations_total{result="failed"}[1m])) > 0',
        "titleFormat": "model activation failed",
        "textFormat": "see GET /v1/models",
    },
]


def build() -> dict[str, Any]:
    lay = Layout()

    lay.row("Model")
    lay.add(
        stat(
            "Model version",
            "The version every replica serves (more than one: a switch "
            "is under way, or a replica cannot load the active artefact).",
            targets(("count by (model_version) (tcm_model_info)", "{{model_version}}")),
            text_mode="name",
        ),
        w=8,
        h=4,
    )
    lay.add(
        stat(
            "Threshold tau",
            "The served model's global cosine threshold.",
            targets(("max(tcm_model_threshold_score)", "tau")),
            unit="none",
            decimals=4,
        ),
        w=4,
        h=4,
    )
    lay.add(
        stat(
            "Target pair FAR",
            "The pair FAR tau was calibrated for: the share of impostor pairs scoring >= tau. "
            "Compare the pair FAR of a tenant's gallery pairs with it; a 1:N false-accept rate "
            "of probes (FPIR) has its own target, which grows with the gallery.",
            targets(("max(tcm_model_target_far_ratio)", "target pair FAR")),
            unit="percentunit",
        ),
        w=4,
        h=4,
    )
    lay.add(
        stat(
            "Activation progress",
            "Gallery items re-embedded by the model switch in "
            "progress, over all items (0 when none runs).",
            targets(
                (
                    'max(tcm_model_activation_items{state="embedded"}) / '
                    'clamp_min(max(tcm_model_activation_items{state="total"}), 1)',
                    "re-embedded",
                )
            ),
            unit="percentunit",
        ),
        w=4,
        h=4,
    )
    lay.add(
        stat(
            "Switching",
            "Replicas preparing a model switch right now.",
            targets(("sum(tcm_model_activation_running)", "replicas")),
            thresholds=[(1, "blue")],
        ),
        w=4,
        h=4,
    )

    lay.row(
        "Drift across subjects (a tenant's subjects at one threshold; retrain when it "
        "leaves its count-matched reference)"
    )
    lay.add(
        timeseries(
            "OPIS across subjects, all tenants: live vs reference",
            "Variance of the subjects' utility curves (every tenant's subjects together). "
            "Reference: held-out classes subsampled to the galleries' images per subject, same "
            "rules; the band is its interval over the draws. Above the dashed line for 30m fires "
            "TCMSubjectsOpisPooledDegraded.",
            targets(
                ("max(tcm_subjects_opis_pooled)", "live"),
                ('max(tcm_subjects_opis_pooled_reference{bound="lo"})', "reference lo"),
                ('max(tcm_subjects_opis_pooled_reference{bound="hi"})', "reference hi"),
                (
                    "scalar(tcm_config:subjects_opis_factor) * clamp_min(max("
                    f'tcm_subjects_opis_pooled_reference{{bound="hi"}}), {FLOOR})',
                    "alert above",
                ),
            ),
            min_=0,
        ),
        w=12,
    )
    lay.add(
        timeseries(
            "OPIS across subjects by tenant / reference upper bound",
            "Each tenant's OPIS across its subjects over the upper bound of its own count-matched "
            "reference (tenants with too few subjects have none). Above the alert factor for 30m "
            "fires TCMSubjectsOpisDegraded.",
            targets(
                (named(f"tenant:tcm_subjects_opis_over_reference:ratio{T}"), WHO),
                ("tcm_config:subjects_opis_factor", "alert above"),
            ),
            min_=0,
        ),
        w=12,
    )

    lay.add(
        timeseries(
            "Tenant level: gallery utility at tau below its reference",
            "The lower bound of the tenant's count-matched reference (held-out classes at its "
            "images per subject) minus its utility at tau on its gallery pairs: above 0 it "
            "matches worse than the model's held-out classes, uniformly or not (OPIS, a spread, "
            "does not see a uniform degradation). Above the margin for 30m fires "
            "TCMTenantLevelDegraded.",
            targets(
                (named(f"tenant:tcm_gallery_utility_below_reference:delta{T}"), WHO),
                ("tcm_config:tenant_utility_margin", "alert above"),
            ),
        ),
        w=12,
    )
    lay.add(
        timeseries(
            "Share of each tenant's items a retrain can learn from",
            "Gallery items with a stored image (export-dataset leaves out items enrolled as "
            "embeddings). Below the line, a tenant's drift alerts say action investigate (check "
            "the client's embedding pipeline), not retrain.",
            targets(
                (named(f"tenant:tcm_tenant_exportable:ratio{T}"), WHO),
                ("tcm_config:exportable_min_ratio", "retrain helps above"),
            ),
            min_=0,
        ),
        w=12,
    )

    lay.row(
        "Drift across tenants (one threshold, many customers; reference measured on the "
        "served galleries at activation)"
    )
    lay.add(
        timeseries(
            "OPIS across tenants: live vs reference",
            "Variance of the tenants' utility curves over the calibration range. Reference: the "
            "same on the served galleries when the model started serving (POST "
            "/v1/monitor/reference re-measures it), with its subject-bootstrap interval. Above the "
            "dashed line for 30m fires TCMOpisDegraded.",
            targets(
                ("max(tcm_opis)", "live"),
                ('max(tcm_tenants_opis_reference{bound="mid"})', "reference"),
                ('max(tcm_tenants_opis_reference{bound="hi"})', "reference hi"),
                (
                    "scalar(tcm_config:opis_degraded_factor) * clamp_min(max("
                    f'tcm_tenants_opis_reference{{bound="hi"}}), {FLOOR})',
                    "alert above",
                ),
            ),
            min_=0,
        ),
        w=9,
    )
    lay.add(
        timeseries(
            "Tenant shortfall below the other tenants vs reference",
            "Mean square, over the calibration range, of how far each tenant's utility curve "
            "lies below the median curve of the other tenants (a tenant better than the fleet "
            "is 0), and the largest in the reference. Above the dashed line for 30m fires "
            "TCMTenantInconsistent for the tenant (action retrain, or investigate when its "
            "items carry no stored images: tcm_tenant_exportable_ratio).",
            targets(
                (named(f"max by (tenant) (tcm_tenant_deviation{T})"), WHO),
                ("max(tcm_tenants_deviation_reference)", "reference"),
                (
                    "scalar(tcm_config:tenant_deviation_factor) * clamp_min("
                    f"max(tcm_tenants_deviation_reference), {FLOOR})",
                    "alert above",
                ),
            ),
            min_=0,
        ),
        w=9,
    )
    lay.add(
        stat(
            "OPIS across tenants / reference",
            "Live over the reference's upper bound.",
            targets(("tcm:opis_over_reference:ratio", "live / reference")),
            thresholds=[(1.5, "orange"), (2, "red")],
        ),
        w=3,
        h=4,
    )
    lay.add(
        stat(
            "Tenants in OPIS",
            "Tenants with enough labelled pairs to enter OPIS "
            "(eligible), and those without (excluded).",
            targets(("max by (status) (tcm_monitor_tenants)", "{{status}}")),
        ),
        w=3,
        h=4,
    )
    lay.add(
        timeseries(
            "eps-OPIS across tenants: live vs reference",
            "Squared gap between the best and worst tenants' utility curves.",
            targets(
                ("max(tcm_eps_opis)", "live"),
                ('max(tcm_tenants_eps_opis_reference{bound="hi"})', "reference hi"),
            ),
            min_=0,
        ),
        w=6,
    )

    lay.row(
        "Should I retrain now? (alerts with action=retrain; routed by "
        "deploy/alertmanager/alertmanager.yml)"
    )
    lay.add(
        stat(
            "Retrain advised for",
            "How long the oldest firing alert labelled action=retrain has been active (its "
            "activeAt: when it started pending; ALERTS_FOR_STATE). 0: no retrain alert fires. "
            "The table beside it names the alerts; docs/operator.md walks from here to a "
            "rollout.",
            targets(
                (
                    'time() - min(ALERTS_FOR_STATE{action="retrain"} and ignoring(alertstate) '
                    'ALERTS{action="retrain",alertstate="firing"}) or on() vector(0)',
                    "retrain advised for",
                )
            ),
            unit="s",
            thresholds=[(1, "red")],
            mappings=[
                {"type": "value", "options": {"0": {"text": "not advised", "color": "green"}}}
            ],
        ),
        w=6,
        h=6,
    )
    lay.add(
        table(
            "Alerts now",
            "Every alert Prometheus has pending or firing (the ALERTS series), with its action "
            "(retrain: a retrain can answer it) and, for a tenant's alert, the tenant's name "
            "and id (tcm_tenant_info; the alert's summary names it too).",
            f"({ALERTS} * on(tenant) group_left(name) {NAMES}) "
            f"or on(alertname, alertstate, tenant) {ALERTS}",
            ["alertname", "alertstate", "severity", "action", "name", "tenant"],
        ),
        w=18,
        h=6,
    )

    lay.row(
        "Per-tenant error rates, each next to the target it is compared with (FPIR: probes "
        "of 1:N decisions; pair FAR: pairs)"
    )
    lay.add(
        timeseries(
            "FPIR by tenant vs its FPIR target (labelled 1:N decisions)",
            "FPIR, the false positive identification rate: the share of a tenant's impostor "
            "probes (subject not enrolled, labelled by feedback) that a 1:N decision accepted, "
            "over the last hour that held labels (carried forward while no feedback arrives: "
            "the age panel says from when). An impostor probe is accepted when the best of the "
            "gallery's items scores >= tau, so compare it with its FPIR target (the model's "
            "expected FPIR at the tenant's gallery size, measured on held-out classes; without "
            "an open-set section in the artefact 1 - (1 - target pair FAR)^(gallery items)), "
            "not with the target pair FAR. TCMTenantFPIRHigh fires "
            "above the alert factor times the target for 15m (>= 100 impostor probes an hour).",
            targets(
                (
                    named(f"last_over_time(tenant:tcm_fpir:ratio_rate1h_observed{T}[{CARRY}])"),
                    f"{WHO} FPIR",
                ),
                (named(f"tenant:tcm_fpir_target:ratio{T}"), f"{WHO} FPIR target"),
            ),
            unit="percentunit",
            log=True,
        )
    )
    lay.add(
        timeseries(
            "FRR by tenant (labelled 1:N decisions) vs calibration FRR",
            "The share of a tenant's genuine probes (subject enrolled) that a 1:N decision "
            "rejected, whoever ranked first, over the last hour that held labels (carried "
            "forward). A genuine probe accepted as another subject is a wrong accept: counted "
            "in the denominator, not here (the outcomes panel shows wrong_accept). Compared "
            "with the model's FRR at tau on its calibration pairs.",
            targets(
                (
                    named(f"last_over_time(tenant:tcm_frr:ratio_rate1h_observed{T}[{CARRY}])"),
                    f"{WHO} FRR",
                ),
                ("max(tcm_model_calibration_frr_ratio)", "calibration FRR"),
            ),
            unit="percentunit",
            log=True,
        )
    )
    lay.add(
        timeseries(
            "FPIR / FPIR target, log10 (labelled 1:N decisions)",
            "log10 of each tenant's FPIR (last hour with labels) over its FPIR target. +1 = ten "
            "times the target. Above the dashed line (alert factor) for 15m fires "
            "TCMTenantFPIRHigh.",
            targets(
                (
                    named(
                        f"log10(last_over_time(tenant:tcm_fpir:ratio_rate1h_observed{T}"
                        f"[{CARRY}]) / on(tenant) tenant:tcm_fpir_target:ratio)"
                    ),
                    WHO,
                ),
                ("log10(tcm_config:fpir_alert_factor)", "alert above"),
            ),
            thresholds=[(0.0, "orange"), (1.0, "red")],
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "FRR / calibration FRR, log10 (labelled 1:N decisions)",
            "log10 of each tenant's FRR of genuine probes (last hour with labels) over the FRR "
            "the model had at tau on its calibration set.",
            targets(
                (
                    named(
                        f"log10(last_over_time(tenant:tcm_frr:ratio_rate1h_observed{T}"
                        f"[{CARRY}]) / scalar(max(tcm_model_calibration_frr_ratio)))"
                    ),
                    WHO,
                )
            ),
            thresholds=[(0.0, "orange"), (1.0, "red")],
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Age of the last labelled decision by tenant",
            "Seconds since the tenant's last feedback (to within 5 minutes): how old the "
            "carried-forward FPIR and FRR are.",
            targets(
                (
                    named(
                        f"time() - last_over_time(tenant:tcm_labelled_decisions:"
                        f"last_timestamp_seconds{T}[{CARRY}])"
                    ),
                    WHO,
                )
            ),
            unit="s",
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Pair FAR at tau (gallery pairs) vs target pair FAR",
            "The share of impostor pairs within the tenant's gallery (different subjects) "
            "scoring >= tau, in the monitor's window: the pair FAR the target pair FAR is "
            "compared with. No alert reads it directly; the drift alerts read the utility "
            "curves it comes from.",
            targets(
                (
                    named(f"max by (tenant) (tcm_tenant_far_ratio{{{TG}}})"),
                    f"{WHO} pair FAR",
                ),
                ("max(tcm_model_target_far_ratio)", "target pair FAR"),
            ),
            unit="percentunit",
            log=True,
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Pair FAR at tau / target pair FAR, log10 (gallery and feedback pairs pooled)",
            "Pair FAR of all labelled pairs in the monitor's window: gallery pairs and the "
            "(probe, best candidate) pairs of feedback, whose impostors are best-of-N and "
            "score higher, so this reads above the gallery pair FAR whenever feedback is in "
            "the window. What OPIS and the utility panel use.",
            targets((named(f"tenant:tcm_tenant_far_over_target:log10_ratio{T}"), WHO)),
            thresholds=[(0.0, "orange"), (1.0, "red")],
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Pair FRR at tau (monitor window)",
            "Genuine pairs rejected at the global tau, gallery and feedback pairs pooled.",
            targets(
                (named(f"max by (tenant) (tcm_tenant_frr_ratio{TP})"), WHO),
                ("max(tcm_model_calibration_frr_ratio)", "calibration FRR"),
            ),
            unit="percentunit",
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Utility at tau by tenant",
            "F-beta of TPR and TNR at the global threshold (1 = perfect), feedback and gallery "
            "pairs pooled.",
            targets((named(f"max by (tenant) (tcm_tenant_utility_ratio{TP})"), WHO)),
            unit="percentunit",
        ),
        w=8,
    )

    lay.row("Scores (monitor window) and what-if threshold")
    src = '{tenant=~"$tenant",source=~"$source"}'
    lay.add(
        heatmap(
            "Impostor scores",
            "Gauge histogram of impostor pair scores in the monitor's window (not a rate).",
            f"sum by (le) (max by (le, tenant, source) (tcm_impostor_score_bucket{src}))",
        ),
        w=8,
    )
    lay.add(
        heatmap(
            "Genuine scores",
            "Gauge histogram of genuine pair scores in the monitor's window.",
            f"sum by (le) (max by (le, tenant, source) (tcm_genuine_score_bucket{src}))",
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Labelled pairs in the window",
            "Pairs behind each tenant's numbers, by kind and source.",
            targets(
                (
                    named(f"max by (tenant, kind, source) (tcm_tenant_pairs{T})"),
                    WHO + " {{kind}} {{source}}",
                )
            ),
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "What-if: FAR at threshold $threshold",
            "Share of each tenant's impostor pairs scoring at or above the chosen threshold (it "
            "opens at tau; the list is ordered by distance from tau, bucket bounds are dense "
            "inside the calibration range).",
            targets(
                (
                    named(
                        "max by (tenant) (1 - sum by (tenant, instance) (tcm_impostor_score_bucket"
                        '{le="$threshold",tenant=~"$tenant"}) / sum by (tenant, instance) '
                        f"(tcm_impostor_score_gcount{T}))"
                    ),
                    WHO,
                ),
                ("max(tcm_model_target_far_ratio)", "target pair FAR"),
            ),
            unit="percentunit",
        )
    )
    lay.add(
        timeseries(
            "What-if: FRR at threshold $threshold",
            "Share of each tenant's genuine pairs scoring at or below the chosen threshold.",
            targets(
                (
                    named(
                        "max by (tenant) (sum by (tenant, instance) (tcm_genuine_score_bucket"
                        '{le="$threshold",tenant=~"$tenant"}) / sum by (tenant, instance) '
                        f"(tcm_genuine_score_gcount{T}))"
                    ),
                    WHO,
                )
            ),
            unit="percentunit",
        )
    )

    lay.row("Serving")
    rate = "[$__rate_interval]"
    lay.add(
        timeseries(
            "Requests by route",
            "Requests per second by route template and status.",
            targets(
                (
                    f"sum by (route, status) (rate(tcm_http_request_duration_seconds_count{rate}))",
                    "{{route}} {{status}}",
                )
            ),
            unit="reqps",
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Decisions and feedback",
            "1:N match and 1:1 verify decisions, and feedback outcomes, per second.",
            targets(
                (
                    f"sum by (decision) (rate(tcm_match_decisions_total{rate}))",
                    "match {{decision}}",
                ),
                (
                    f"sum by (decision) (rate(tcm_verify_decisions_total{rate}))",
                    "verify {{decision}}",
                ),
                (f"sum by (outcome) (rate(tcm_decisions_total{rate}))", "feedback {{outcome}}"),
            ),
            unit="ops",
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Latency p50 / p99 by route",
            "From the request duration histogram.",
            targets(
                (
                    f"histogram_quantile(0.99, sum by (le, route) "
                    f"(rate(tcm_http_request_duration_seconds_bucket{rate})))",
                    "p99 {{route}}",
                ),
                (
                    f"histogram_quantile(0.5, sum by (le, route) "
                    f"(rate(tcm_http_request_duration_seconds_bucket{rate})))",
                    "p50 {{route}}",
                ),
            ),
            unit="s",
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Embedding batch size",
            "Images per forward pass of the dynamic batcher: mean and p90.",
            targets(
                (
                    f"sum(rate(tcm_embed_batch_images_sum{rate})) / "
                    f"sum(rate(tcm_embed_batch_images_count{rate}))",
                    "mean",
                ),
                (
                    f"histogram_quantile(0.9, sum by (le) (rate(tcm_embed_batch_images_bucket"
                    f"{rate})))",
                    "p90",
                ),
            ),
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Embedding queue wait and forward pass p99",
            "Time a request waits for its batch, and the batch's forward pass.",
            targets(
                (
                    "histogram_quantile(0.99, sum by (le) "
                    f"(rate(tcm_embed_queue_wait_seconds_bucket{rate})))",
                    "queue wait p99",
                ),
                (
                    f"histogram_quantile(0.99, sum by (le) (rate(tcm_embed_forward_seconds_bucket"
                    f"{rate})))",
                    "forward p99",
                ),
                (
                    f"histogram_quantile(0.99, sum by (le) (rate(tcm_index_search_seconds_bucket"
                    f"{rate})))",
                    "index search p99",
                ),
            ),
            unit="s",
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Gallery items by tenant",
            "Items indexed for the active model.",
            targets((named(f"max by (tenant) (tcm_gallery_items{T})"), WHO)),
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Replicas up and store errors",
            "Targets up, and requests per second answered 503 because the store was down.",
            targets(
                ('sum(up{job="tcm-service"})', "replicas up"),
                (f"sum(rate(tcm_store_errors_total{rate}))", "store errors/s"),
            ),
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Monitor snapshot age and compute time",
            "Seconds since the monitor's snapshot was computed, and its compute time (p90).",
            targets(
                ("time() - max(tcm_monitor_snapshot_timestamp_seconds)", "snapshot age"),
                (
                    f"histogram_quantile(0.9, sum by (le) "
                    f"(rate(tcm_monitor_compute_duration_seconds_bucket{rate})))",
                    "compute p90",
                ),
            ),
            unit="s",
        ),
        w=8,
    )
    lay.add(
        timeseries(
            "Monitor runs",
            "Monitor cycles per second: computed a snapshot, adopted a replica's, or failed.",
            targets((f"sum by (result) (rate(tcm_monitor_runs_total{rate}))", "{{result}}")),
            unit="ops",
        ),
        w=8,
    )

    # shard groups (docs/scaling.md): shard_group is each pod's group, set by the scrape
    # config (deploy/k8s/monitoring); ungrouped replicas have none and these panels stay empty
    lay.row("Shard groups")
    grouped = 'job="tcm-service", shard_group!=""'
    lay.add(
        timeseries(
            "Replicas up by shard group",
            "Replicas of each group Prometheus scrapes (TCMShardGroupDegraded fires below 2, "
            "TCMShardGroupDown at 0).",
            targets((f"sum by (shard_group) (up{{{grouped}}})", "{{shard_group}}")),
            thresholds=[(1, "orange"), (2, "green")],
            min_=0,
        ),
        w=6,
    )
    lay.add(
        timeseries(
            "Requests by shard group",
            "Requests per second each group's replicas answered, those forwarded on included.",
            targets(
                (
                    "sum by (shard_group) "
                    f'(rate(tcm_http_request_duration_seconds_count{{shard_group!=""}}{rate}))',
                    "{{shard_group}}",
                )
            ),
            unit="reqps",
        ),
        w=6,
    )
    lay.add(
        timeseries(
            "Forwarded to another group",
            "Requests each group's replicas sent on to the owner group of their tenant, by "
            "that group and outcome (unreachable: answered 503 group_unavailable).",
            targets(
                (
                    "sum by (shard_group, group, outcome) "
                    f'(rate(tcm_forwarded_requests_total{{shard_group!=""}}{rate}))',
                    "{{shard_group}} -> {{group}} {{outcome}}",
                )
            ),
            unit="reqps",
        ),
        w=6,
    )
    lay.add(
        timeseries(
            "Gallery items held by shard group",
            "Items in the indexes of each group's tenants (each replica of a group holds them "
            "all: counted once per group); a tenant moving holds in both groups meanwhile.",
            targets(
                (
                    "sum by (shard_group) "
                    '(max by (shard_group, tenant) (tcm_gallery_items{shard_group!=""}))',
                    "{{shard_group}}",
                )
            ),
        ),
        w=6,
    )
    lay.add(
        timeseries(
            "Match records waiting for their shard",
            "Match records each replica answered but could not store yet: their tenant's Redis "
            "Cluster shard had no master (a failover; written once it is back), and those "
            "dropped over the per-tenant cap (TCMMatchRecordsWaiting, TCMMatchRecordsDropped).",
            targets(
                (
                    'sum by (instance) (tcm_match_records_deferred{job="tcm-service"})',
                    "{{instance}} waiting",
                ),
                (
                    "sum by (instance) "
                    f'(increase(tcm_match_records_dropped_total{{job="tcm-service"}}{rate}))',
                    "{{instance}} dropped",
                ),
            ),
            min_=0,
        ),
        w=24,
    )

    variables = [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {"text": "Prometheus", "value": "prometheus"},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "includeAll": False,
            "multi": False,
        },
        # tenants by name (tcm_tenant_info), the id as the value panels filter on
        {
            "name": "tenant",
            "label": "tenant",
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": TENANT_QUERY, "refId": "tenant"},
            "definition": TENANT_QUERY,
            "regex": '/name="(?<text>[^"]*)",tenant="(?<value>[^"]*)"/',
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"text": "All", "value": "$__all"},
            "sort": 1,
        },
        {
            "name": "source",
            "label": "pair source",
            "type": "custom",
            "query": "feedback,gallery",
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"text": "All", "value": "$__all"},
            "options": [
                {"text": "All", "value": "$__all", "selected": True},
                {"text": "feedback", "value": "feedback", "selected": False},
                {"text": "gallery", "value": "gallery", "selected": False},
            ],
        },
        # the histogram's bounds ordered by distance from tau: tau comes first, so the what-if
        # opens at tau (a query variable whose saved value is not among its options selects
        # the first one; sort 0 keeps the query's order)
        {
            "name": "threshold",
            "label": "what-if threshold",
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": THRESHOLD_QUERY, "refId": "threshold"},
            "definition": THRESHOLD_QUERY,
            "regex": '/le="([^"]+)"/',
            "refresh": 2,
            "includeAll": False,
            "multi": False,
            "sort": 0,
            "current": {},
        },
    ]
    return {
        "uid": UID,
        "title": "Threshold-consistent retrieval",
        "description": "Live threshold consistency (OPIS, eps-OPIS vs baseline), per-tenant "
        "FAR/FRR vs target, score distributions, and serving health.",
        "tags": ["tcm", "retrieval", "slo"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-24h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {
            "list": [
                {
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                    "builtIn": 1,
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                },
                *ANNOTATIONS,
            ]
        },
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
