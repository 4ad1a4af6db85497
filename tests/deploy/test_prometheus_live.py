"""A real Prometheus scraping the monitor's metrics and evaluating the project's rules.

The metrics come from the monitor code itself (``service.monitoring.monitor``), served by
prometheus_client's HTTP server on a free loopback port; Prometheus (the ``prometheus`` binary,
1 s scrape and evaluation intervals) loads ``deploy/prometheus/prometheus.yml`` with only the
target and the intervals changed, and the rule files as they are. A scripted pattern feeds
feedback: three tenants stay healthy, then one drifts (its impostors score above tau). The
recording rule shows the drifter's FAR rising while the healthy tenants stay within target, and
the monitor's snapshot (OPIS, gauge histograms) arrives intact.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, start_http_server

from service.metrics import ServiceMetrics, decision_outcome
from service.monitoring import MonitorConfig
from service.monitoring.monitor import Monitor
from service.store import ApiKey, Feedback, MatchRecord, Store, Tenant
from service.store.sqlite import SQLiteStore
from tests.deploy.conftest import RULE_FILES, sample_manifest
from tests.deploy.promserver import Prometheus, free_port, running_prometheus, wait_for

pytestmark = pytest.mark.slow
HEALTHY = ("alpha", "beta", "gamma")
DRIFTER = "delta"
TENANTS = (*HEALTHY, DRIFTER)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """The monitor's store (SQLite): the script's tenants, with empty galleries, and the
    decisions it makes."""
    (tmp_path / "store").mkdir()
    s = SQLiteStore(tmp_path / "store" / "tcm.db")
    for i, t in enumerate(TENANTS):
        s.create_tenant(Tenant(t, t, float(i)), ApiKey(f"k-{t}", t, "0" * 64, float(i)))
    yield s
    s.close()


@pytest.fixture
def metrics_server() -> Iterator[tuple[int, CollectorRegistry]]:
    port = free_port()
    registry = CollectorRegistry(auto_describe=True)
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield port, registry
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def prometheus(
    tmp_path: Path, metrics_server: tuple[int, CollectorRegistry]
) -> Iterator[Prometheus]:
    with running_prometheus(tmp_path, metrics_server[0]) as prom:
        yield prom


class Script:
    """Feedback on 1:N decisions at a steady rate; ``drift`` shifts the drifter's impostors."""

    def __init__(self, monitor: Monitor, metrics: ServiceMetrics, store: Store, tau: float) -> None:
        self.monitor, self.metrics, self.store, self.tau = monitor, metrics, store, tau
        self.rng = np.random.default_rng(5)
        self.ids = itertools.count()
        self.drift = False
        self.last_refresh = 0.0

    def decide(self, tenant: str, genuine: bool) -> tuple[MatchRecord, Feedback]:
        if genuine:
            score = self.rng.normal(self.tau + 0.2, 0.05)
        elif tenant == DRIFTER and self.drift:
            score = self.rng.normal(self.tau + 0.05, 0.03)  # a new camera: everyone alike
        else:
            score = self.rng.normal(self.tau - 0.3, 0.08)
        score = float(np.clip(score, -1.0, 1.0))
        accepted = score >= self.tau
        now = time.time()
        mid = f"m{next(self.ids)}"
        match = MatchRecord(
            mid,
            tenant,
            accepted,
            "s" if accepted else None,
            "i",
            "s",
            score,
            self.tau,
            self.monitor.manifest.model_version,
            now,
        )
        outcome = decision_outcome(accepted=accepted, genuine=genuine)
        fb = Feedback(mid, tenant, None, None, genuine, outcome, now)
        # what the feedback endpoint counts on the request path (Matcher.feedback)
        self.metrics.decisions.labels(
            tenant=self.metrics.tenant_label(tenant), outcome=outcome
        ).inc()
        return match, fb

    def tick(self) -> None:
        made = [
            self.decide(tenant, genuine=genuine)
            for tenant in TENANTS
            for genuine in (False, False, False, False, True)
        ]
        self.store.add_matches([m for m, _ in made])
        with ThreadPoolExecutor(8) as pool:  # concurrent writes share the store's commits
            list(pool.map(self.store.add_feedback, [fb for _, fb in made]))
        if time.monotonic() - self.last_refresh >= 1.0:  # the monitor's schedule, sped up
            self.monitor.refresh(force=True)
            self.last_refresh = time.monotonic()

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(0.1)


def test_recording_rules_see_one_tenant_drift(
    prometheus: Prometheus, metrics_server: tuple[int, CollectorRegistry], store: Store
) -> None:
    manifest = sample_manifest()
    target = manifest.calibration.target_far
    metrics = ServiceMetrics(metrics_server[1], tenant_label_cap=10)
    monitor = Monitor(
        store, manifest, metrics, MonitorConfig(interval_s=1.0, min_pairs=10, tenant_label_cap=10)
    )
    script = Script(monitor, metrics, store, manifest.calibration.tau)
    # what the service publishes from its indexes: one item each, so that each tenant's FPIR
    # target (1 - (1 - target FAR)^items) is the target FAR itself
    metrics.set_gallery_size(dict.fromkeys(TENANTS, 1))

    # phase 1: everyone healthy, until Prometheus has a FAR for every tenant
    def all_far() -> bool:
        far = prometheus.query("tenant:tcm_fpir:ratio_rate5m")
        return set(far) == set(TENANTS) and "" in prometheus.query("tcm:opis_over_reference:ratio")

    wait_for(all_far, 30, "per-tenant FAR and OPIS from the rules", prometheus, script.tick)
    script.run_for(2.0)
    healthy_far = prometheus.query("tenant:tcm_fpir:ratio_rate5m")
    assert all(v <= target for v in healthy_far.values()), healthy_far
    opis_before = prometheus.value("tcm:opis_over_reference:ratio")

    # phase 2: the drifter's impostors pass the threshold; its FAR climbs, the others' do not
    script.drift = True
    rising: list[float] = []

    def drifter_far_high() -> bool:
        far = prometheus.query("tenant:tcm_fpir:ratio_rate5m")
        rising.append(far[DRIFTER])
        return far[DRIFTER] > 0.3

    wait_for(drifter_far_high, 30, "the drifter's FAR to rise", prometheus, script.tick)
    far = prometheus.query("tenant:tcm_fpir:ratio_rate5m")
    assert far[DRIFTER] > 30 * target
    for t in HEALTHY:
        assert far[t] <= target, (t, far)
    # it rose steadily (the 5m window still holds the healthy minutes, so it climbs)
    assert all(b >= a - 0.01 for a, b in itertools.pairwise(rising)), rising
    # the evidence behind it, and the log-ratio chart's series
    log_ratio = prometheus.query("tenant:tcm_fpir_over_target:log10_ratio_rate1h")
    assert log_ratio[DRIFTER] > 1.0  # more than ten times its FPIR target
    assert all(log_ratio[t] < 0 for t in HEALTHY)  # -Inf when no false accept at all

    # the monitor's snapshot came through: OPIS left its baseline, the gauge histograms parse
    def opis_high() -> bool:
        return prometheus.query("tcm:opis_over_reference:ratio")[""] > 2.0

    wait_for(opis_high, 20, "live OPIS above twice its baseline", prometheus, script.tick)
    assert opis_before < 2.0
    pair_far = prometheus.query("max by (tenant) (tcm_tenant_far_ratio)")
    assert pair_far[DRIFTER] > pair_far["alpha"]
    tau = manifest.calibration.tau
    from_buckets = prometheus.query(
        f'1 - sum by (tenant) (tcm_impostor_score_bucket{{le="{tau!r}",source="feedback"}}) '
        '/ sum by (tenant) (tcm_impostor_score_gcount{source="feedback"})'
    )
    assert from_buckets[DRIFTER] > 10 * from_buckets["alpha"]
    assert from_buckets["alpha"] <= target

    # every rule evaluates cleanly against the real metrics
    groups = prometheus.get("/api/v1/rules")["groups"]
    assert {g["file"] for g in groups} == {str(f) for f in RULE_FILES}
    broken = [
        (r["name"], r.get("lastError"))
        for g in groups
        for r in g["rules"]
        if r.get("health") != "ok"
    ]
    assert not broken, broken
