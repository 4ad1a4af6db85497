"""The monitor wired into the real app, on both stores: feedback through the API moves
``tcm_decisions_total``, the snapshot computed from the real store shows on ``/metrics`` and on
``GET /v1/monitor`` (a tenant key sees its own row only), the what-if view, and replicas on Redis
reporting the same snapshot."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.monitoring.monitor import Monitor
from service.monitoring.snapshot_schema import from_stored, to_stored
from tests.service.conftest import ADMIN_TOKEN, STORES, make_settings, unit

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def setup_tenants(client: TestClient) -> list[tuple[str, dict[str, str]]]:
    """Two tenants with 3 subjects x 2 items each; four rejected-impostor feedbacks for the
    first."""
    out = []
    for t in range(2):
        key = client.post("/v1/tenants", json={"name": f"t{t}"}, headers=ADMIN).json()
        auth = {"Authorization": f"Bearer {key['api_key']}"}
        out.append((key["tenant_id"], auth))
        items = [
            {"subject": f"s{s}", "embedding": unit(100 * t + 10 * s + j)}
            for s in range(3)
            for j in range(2)
        ]
        assert client.post("/v1/gallery", json={"items": items}, headers=auth).status_code == 201
    _, auth = out[0]
    for seed in range(4):
        body = client.post("/v1/match", json={"embedding": unit(seed), "k": 1}, headers=auth).json()
        r = client.post(
            "/v1/feedback", headers=auth, json={"match_id": body["match_id"], "true_subject": None}
        )
        assert r.status_code == 201
    return out


def monitor_of(client: TestClient) -> Monitor:
    mon = client.app.state.monitor  # type: ignore[attr-defined]
    assert isinstance(mon, Monitor)
    return mon


@pytest.mark.parametrize("kind", STORES)
def test_snapshot_metrics_and_views(kind: str, artefact: Path, store_settings: Callable) -> None:
    settings = make_settings(
        artefact, store_settings(kind), monitor_min_pairs=2, monitor_interval_s=3600.0
    )
    with TestClient(create_app(settings)) as client:
        mon = monitor_of(client)
        tau = client.app.state.runtime.serving.threshold  # type: ignore[attr-defined]
        (a, a_auth), (b, b_auth) = setup_tenants(client)
        snap = mon.refresh(force=True)  # the schedule's first run saw no tenants yet

        # --- /metrics: counters from the request path, gauges from the snapshot
        got = scrape(client)
        outcomes = {
            lab[0][1]: v
            for (n, lab), v in got.items()
            if n == "tcm_decisions_total" and ("tenant", a) in lab
        }
        assert sum(outcomes.values()) == 4 and set(outcomes) == {
            "true_accept",
            "false_accept",
            "true_reject",
            "false_reject",
            "wrong_accept",
        }
        assert ("tcm_feedback_total", ()) not in got and not any(
            n.startswith("tcm_feedback") for n, _ in got
        )  # one counter, the spec'd name
        row = snap.tenants[a]
        assert row.by_source.feedback.impostor_pairs == 4
        assert row.by_source.gallery.genuine_pairs == 3  # 3 subjects x 1 pair
        assert row.by_source.gallery.impostor_pairs == 15 - 3
        assert snap.eligible_tenants == 2 and snap.opis is not None
        assert got[("tcm_opis", ())] == snap.opis
        assert (
            got[("tcm_tenant_pairs", (("kind", "impostor"), ("source", "feedback"), ("tenant", a)))]
            == 4
        )
        assert snap.tau == tau and ("tcm_model_threshold_score", ()) in got
        # the store holds it, for the other replicas
        stored = client.app.state.runtime.store.get_monitor_snapshot()  # type: ignore
        assert stored == to_stored(snap) and from_stored(stored) == snap

        # --- admin: everything
        r = client.get("/v1/monitor", headers=ADMIN)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["scope"] == "admin" and body["status"] == "ok" and body["what_if"] is None
        assert set(body["snapshot"]["tenants"]) == {a, b}
        assert body["snapshot"] == snap.model_dump(mode="json")
        assert body["age_s"] >= 0 and body["stale"] is False and body["message"] is None
        # the snapshot's age, on the monitor's own clock: stale past twice its interval
        monitor = client.app.state.monitor  # type: ignore[attr-defined]
        real_clock, interval = monitor.clock, monitor.config.interval_s
        try:
            monitor.clock = lambda: snap.computed_at + 2 * interval + 7
            body = client.get("/v1/monitor", headers=ADMIN).json()
        finally:
            monitor.clock = real_clock
        assert body["age_s"] == 2 * interval + 7 and body["stale"] is True
        assert "may have stopped" in body["message"] and body["status"] == "ok"

        # --- a tenant: its own row, nothing about the other tenant
        for me, auth, other in ((a, a_auth, b), (b, b_auth, a)):
            r = client.get("/v1/monitor", headers=auth, params={"threshold": tau})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["scope"] == "tenant" and body["tenant_id"] == me
            assert body["snapshot"]["tenant"] == snap.tenants[me].model_dump(mode="json")
            assert "opis" not in body["snapshot"] and "tenants" not in body["snapshot"]
            assert set(body["what_if"]["tenants"]) == {me}
            assert "pooled_over_tenants" not in body["what_if"]
            assert other not in r.text
            assert body["what_if"]["tenants"][me]["far"] == snap.tenants[me].far

        # --- what-if for the admin: every tenant, and pooled
        r = client.get("/v1/monitor", headers=ADMIN, params={"threshold": -1.0})
        w = r.json()["what_if"]
        assert set(w["tenants"]) == {a, b}
        assert w["pooled_over_tenants"]["far"] == 1.0 and w["pooled_over_tenants"]["frr"] == 0.0
        assert w["in_calibration_range"] is False


@pytest.mark.parametrize("bad", ["2", "-1.5", "nan", "inf", "x"])
def test_bad_threshold_is_422(bad: str, artefact: Path, store_settings: Callable) -> None:
    settings = make_settings(artefact, store_settings("sqlite"), monitor_interval_s=3600.0)
    with TestClient(create_app(settings)) as client:
        r = client.get("/v1/monitor", headers=ADMIN, params={"threshold": bad})
        assert r.status_code == 422, r.text
        assert set(r.json()) == {"code", "message", "detail"}


def test_auth_pending_and_disabled(artefact: Path, store_settings: Callable) -> None:
    settings = make_settings(artefact, store_settings("sqlite"), monitor_interval_s=3600.0)
    with TestClient(create_app(settings)) as client:
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": f"Bearer tcm_{'0' * 16}_{'A' * 43}"},
        ):
            r = client.get("/v1/monitor", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        mon = monitor_of(client)
        mon.metrics.snapshot.snapshot = None  # as before the first run
        body = client.get("/v1/monitor", headers=ADMIN).json()
        assert body["status"] == "pending" and body["snapshot"] is None
        assert "3600s" in body["message"]
    off = make_settings(artefact, store_settings("sqlite"), monitor_enabled=False)
    with TestClient(create_app(off)) as client:
        assert client.app.state.monitor is None  # type: ignore[attr-defined]
        r = client.get("/v1/monitor", headers=ADMIN)
        assert r.status_code == 404 and r.json()["code"] == "monitor_disabled"
        got = scrape(client)
        assert ("tcm_opis_baseline", ()) not in got
        assert not any(n == "tcm_decisions_total" for n, _ in got)  # no series before feedback


def test_fewer_than_two_tenants_is_reported(artefact: Path, store_settings: Callable) -> None:
    settings = make_settings(artefact, store_settings("sqlite"), monitor_interval_s=3600.0)
    with TestClient(create_app(settings)) as client:
        snap = monitor_of(client).refresh(force=True)
        assert snap.opis is None and "at least 2" in snap.opis_unavailable_reason
        body: dict[str, Any] = client.get("/v1/monitor", headers=ADMIN).json()
        assert body["snapshot"]["opis_unavailable_reason"] == snap.opis_unavailable_reason
        got = scrape(client)
        assert ("tcm_opis", ()) not in got
        assert got[("tcm_monitor_tenants", (("status", "eligible"),))] == 0
        json.dumps(body, allow_nan=False)


@pytest.mark.redis
def test_replicas_report_the_same_snapshot(artefact: Path, store_settings: Callable) -> None:
    settings = make_settings(
        artefact, store_settings("redis"), monitor_min_pairs=2, monitor_interval_s=3600.0
    )
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        setup_tenants(a)
        snap = monitor_of(a).refresh(force=True)
        runs = ("tcm_monitor_runs_total", (("result", "adopted"),))
        # b's start-up run may have adopted a's start-up snapshot already: count from here
        adopted_before = scrape(b).get(runs, 0.0)
        adopted = monitor_of(b).refresh()  # young and same configuration: adopted, not computed
        assert adopted == snap
        assert scrape(b)[("tcm_opis", ())] == scrape(a)[("tcm_opis", ())] == snap.opis
        assert scrape(b)[runs] == adopted_before + 1
        assert (
            b.get("/v1/monitor", headers=ADMIN).json()["snapshot"]
            == a.get("/v1/monitor", headers=ADMIN).json()["snapshot"]
            == snap.model_dump(mode="json")
        )
        # the what-if on the replica that did not compute reloads the same pairs
        tau = snap.tau
        wa = a.get("/v1/monitor", headers=ADMIN, params={"threshold": tau}).json()["what_if"]
        wb = b.get("/v1/monitor", headers=ADMIN, params={"threshold": tau}).json()["what_if"]
        assert wa["tenants"] == wb["tenants"]
