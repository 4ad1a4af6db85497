"""The decision rule at exactly tau: accept iff score >= tau, to the last bit.

Issue 15's mutation check: changing the service's rule to ``score > tau`` left 263 tests
passing, because no test ever built a score exactly at tau. Here the served artefact's tau is a
float32 value (every score the service computes is a float32 inner product), and the gallery
holds an item whose stored, normalised embedding has tau itself as its first component: the
query ``e1`` scores exactly tau against it (one product 1 * tau, the rest zeros), in FAISS
(match), in the tiled pairwise max (verify) and in the monitor's error rates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.domain.inputs import as_unit_vector
from service.monitoring.snapshot import accepted, error_rates
from tcm import load_artefact, save_artefact
from tests.service.conftest import DIM, STORES, Api, make_settings


def at_score(score: np.float32) -> list[float]:
    """An embedding whose stored (normalised, float32) form has ``score`` as first component
    and whose other components keep it orthogonal to e1; searched near the obvious choice."""
    t = float(score)
    for cand in (t, *np.nextafter(np.float32(t), np.float32([2, -2])).tolist()):
        for k in range(64):
            first = float(
                np.nextafter(np.float32(cand), np.float32(2 * (k % 2) - 1)) if k else cand
            )
            v = np.zeros(DIM)
            v[0], v[1] = first, np.sqrt(max(0.0, 1 - first * first))
            if as_unit_vector(v, DIM, where="x")[0] == score:
                return v.tolist()
    raise AssertionError(f"no embedding stores {score!r} exactly")


E1 = [1.0] + [0.0] * (DIM - 1)


@pytest.fixture(scope="module")
def tau_artefact(artefact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, manifest = load_artefact(artefact)
    tau = float(np.float32(manifest.calibration.tau))  # representable as a float32 score
    cal = dataclasses.replace(manifest.calibration, tau=tau)
    out = tmp_path_factory.mktemp("tau-artefact")
    save_artefact(out, model, dataclasses.replace(manifest, calibration=cal))
    return out


@pytest.fixture(params=STORES)
def api(request: pytest.FixtureRequest, tau_artefact: Path, store_settings) -> Iterator[Api]:
    settings = make_settings(tau_artefact, store_settings(request.param))
    with TestClient(create_app(settings)) as c:
        yield Api(c, settings)


def test_match_verify_and_monitor_accept_a_score_exactly_at_tau(api: Api) -> None:
    c = api.client
    tau = c.get("/v1/model").json()["threshold"]
    tau32 = np.float32(tau)
    assert float(tau32) == tau
    below = np.nextafter(tau32, np.float32(-2))
    t = api.new_tenant()
    api.enrol(t, [{"subject": "at", "item_id": "at", "embedding": at_score(tau32)}])

    # match: the only candidate scores exactly tau, and is accepted
    m = c.post("/v1/match", json={"embedding": E1, "k": 1}, headers=t.auth).json()
    assert m["threshold"] == tau
    assert m["decision"]["score"] == tau, (m["decision"]["score"], tau)
    assert m["decision"] == {"accepted": True, "subject": "at", "score": tau}

    # verify: item and subject, both ways round
    for a, b in (({"embedding": E1}, {"item_id": "at"}), ({"subject": "at"}, {"embedding": E1})):
        v = c.post("/v1/verify", json={"a": a, "b": b}, headers=t.auth).json()
        assert v["score"] == tau and v["accepted"] is True, v

    # one float32 step below tau is rejected, by both
    t2 = api.new_tenant()
    api.enrol(t2, [{"subject": "below", "item_id": "below", "embedding": at_score(below)}])
    m2 = c.post("/v1/match", json={"embedding": E1, "k": 1}, headers=t2.auth).json()
    assert m2["decision"] == {"accepted": False, "subject": None, "score": float(below)}
    v2 = c.post(
        "/v1/verify", json={"a": {"embedding": E1}, "b": {"item_id": "below"}}, headers=t2.auth
    ).json()
    assert v2["score"] == float(below) and v2["accepted"] is False

    # the monitor: the genuine pair at tau is a true accept, FRR 0 at tau and at threshold=tau
    fb = c.post(
        "/v1/feedback", json={"match_id": m["match_id"], "true_subject": "at"}, headers=t.auth
    ).json()
    assert fb["outcome"] == "true_accept"
    monitor = c.app.state.monitor  # recompute now rather than at the next interval
    monitor.publish(monitor.compute())
    view = c.get("/v1/monitor", params={"threshold": tau}, headers=t.auth).json()
    row = view["what_if"]["tenants"][t.tenant_id]
    assert row["by_source"]["feedback"]["genuine_pairs"] == 1, row
    assert row["by_source"]["feedback"]["frr"] == 0.0, row
    assert row["at_tau"]["frr"] == 0.0, row


def test_monitor_error_rates_count_a_score_at_the_threshold_as_accepted() -> None:
    t = np.float64(np.float32(0.6314))
    scores = np.sort(np.array([np.nextafter(t, -1), t, np.nextafter(t, 2)]))
    assert accepted(scores, float(t)) == 2
    assert accepted(np.array([t]), float(t)) == 1
    rates = error_rates(np.array([t]), np.array([t]), float(t))
    assert rates.frr == 0.0 and rates.far == 1.0
    below = error_rates(np.array([t]), np.array([t]), float(np.nextafter(t, 2)))
    assert below.frr == 1.0 and below.far == 0.0
