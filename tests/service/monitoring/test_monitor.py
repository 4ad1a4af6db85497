"""The monitoring core, on synthetic tenants: labelled pairs, rates, histograms, the snapshot
(checked against tcm and against brute force), its metrics, the schedule, replicas sharing one
snapshot, and the what-if view."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import (
    OTHER_TENANTS,
    ServiceMetrics,
    TenantLabels,
    decision_outcome,
    tenant_label_values,
)
from service.monitoring import (
    LabelledScores,
    MonitorConfig,
    compute_snapshot,
    error_rates,
    feedback_scores,
    gallery_scores,
    score_buckets,
    seed_for,
    tenant_view,
    what_if,
)
from service.monitoring.monitor import Monitor, PairCache
from service.monitoring.snapshot import cumulative_counts
from service.monitoring.snapshot_schema import from_stored, to_stored
from service.store import ApiKey, Decision, Feedback, MatchRecord, NewItem, Store, Tenant
from tcm import (
    Baseline,
    Calibration,
    Manifest,
    Preprocessing,
    calibrate_threshold,
    consistency_from_scores,
    consistency_report,
)

DIM = 32
VERSION = "synthetic-v1"


# --- synthetic open-world data: identities as noisy directions ------------------------------
def identities(
    rng: np.random.Generator,
    n_subjects: int,
    per_subject: int,
    *,
    noise: float,
    shared: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around random subject centres. ``shared`` adds one direction common to
    every image (a tenant whose new camera the model has not seen: everyone looks alike, so
    impostor scores rise)."""
    c = rng.standard_normal((n_subjects, DIM))
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_subjects), per_subject)
    x = c[labels] + noise * rng.standard_normal((len(labels), DIM)) / math.sqrt(DIM)
    common = rng.standard_normal(DIM)
    x = x + shared * common / np.linalg.norm(common)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@functools.cache
def synthetic_manifest() -> Manifest:
    """Calibrated on held-out synthetic identities, as training would do."""
    rng = np.random.default_rng(123)
    x, y = identities(rng, 40, 8, noise=0.9)
    cal = calibrate_threshold(x, y, target_far=1e-2)
    rep = consistency_report(x, y)
    return Manifest(
        model_version=VERSION,
        architecture="small_cnn",
        architecture_kwargs={},
        preprocessing=Preprocessing(image_size=(16, 16), channels=1, mean=(0.5,), std=(0.5,)),
        embedding_dim=DIM,
        calibration=Calibration(
            tau=cal.tau,
            target_far=1e-2,
            far_at_tau=cal.far,
            frr_at_tau=cal.frr,
            tau_lo=rep.tau_lo,
            tau_hi=rep.tau_hi,
        ),
        baseline=Baseline(
            opis=rep.opis,
            eps_opis=rep.eps_opis,
            eps=rep.eps,
            recall_at_1=0.9,
            map_at_r=0.5,
            num_classes=40,
            num_images=len(y),
        ),
    )


# --- synthetic tenants in a real store (tests/service/conftest.py: sqlite_stores) -----------
def new_tenant(store: Store, name: str) -> None:
    """A tenant younger than every one before it (the monitor lists them oldest first)."""
    at = float(len(store.list_tenants()))
    store.create_tenant(Tenant(name, name, at), ApiKey(f"k-{name}", name, "0" * 64, at))


def add_gallery(store: Store, tenant: str, subjects: Sequence[str], x: np.ndarray) -> None:
    store.add_items(
        tenant,
        [NewItem(f"i{j}", s, x[j]) for j, s in enumerate(subjects)],
        model_version=VERSION,
        created_at=0.0,
    )


def record(store: Store, decisions: Sequence[Decision]) -> None:
    """Writes the match records, then their feedback (concurrently: the store commits the
    writes in groups, so a few hundred take a fraction of a second)."""
    store.add_matches([d.match for d in decisions])
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(store.add_feedback, [d.feedback for d in decisions if d.feedback]))


def tenant_ids(store: Store) -> list[str]:
    return [t.tenant_id for t in store.list_tenants()]


_ids = itertools.count()


def decision(
    tenant: str,
    score: float | None,
    threshold: float,
    *,
    genuine: bool | None,
    version: str = VERSION,
    at: float = 1000.0,
    labelled_at: float | None = None,
    outcome: str | None = None,
) -> Decision:
    accepted = score is not None and score >= threshold
    mid = f"m{next(_ids)}"
    match = MatchRecord(
        mid,
        tenant,
        accepted,
        "s" if accepted else None,
        None if score is None else "item",
        None if score is None else "s",
        score,
        threshold,
        version,
        at,
    )
    if outcome is None:
        outcome = decision_outcome(accepted=accepted, genuine=bool(genuine))
    fb = Feedback(
        mid,
        tenant,
        None,
        None,
        genuine,
        outcome,  # type: ignore[arg-type]
        at + 1 if labelled_at is None else labelled_at,
    )
    return Decision(match, fb)


def add_tenant(
    store: Store, name: str, rng: np.random.Generator, *, n_feedback: int = 200, drift: bool = False
) -> None:
    """A gallery of 30 subjects x 4 images, and feedback on 1:N decisions against it."""
    tau = synthetic_manifest().calibration.tau
    x, y = identities(rng, 30, 4, noise=0.9, shared=1.0 if drift else 0.0)
    new_tenant(store, name)
    add_gallery(store, name, [f"{name}-s{k}" for k in y], x)
    # genuine decisions well above tau; impostors well below, or just above tau when drifting
    imp_mean = tau + 0.05 if drift else tau - 0.35
    ds = [
        decision(name, float(np.clip(rng.normal(tau + 0.25, 0.08), -1, 1)), tau, genuine=True)
        for _ in range(n_feedback // 2)
    ]
    ds += [
        decision(name, float(np.clip(rng.normal(imp_mean, 0.08), -1, 1)), tau, genuine=False)
        for _ in range(n_feedback // 2)
    ]
    record(store, ds)


def healthy_and_drifting(store: Store, *, drift: bool) -> Store:
    """Five healthy tenants and one that drifts (or not), written to ``store``."""
    rng = np.random.default_rng(7)
    for i in range(5):
        add_tenant(store, f"t{i}", rng)
    add_tenant(store, "drifter", rng, drift=drift)
    return store


def new_monitor(
    store: Store, *, now: float = 2000.0, registry: CollectorRegistry | None = None, **cfg: Any
) -> Monitor:
    cap = cfg.setdefault("tenant_label_cap", 50)
    metrics = ServiceMetrics(
        registry or CollectorRegistry(auto_describe=True), tenant_label_cap=cap
    )
    return Monitor(store, synthetic_manifest(), metrics, MonitorConfig(**cfg), clock=lambda: now)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


# --- labelled pairs -------------------------------------------------------------------------
def test_decision_outcome_table() -> None:
    assert decision_outcome(accepted=True, genuine=True) == "true_accept"
    assert decision_outcome(accepted=True, genuine=False) == "false_accept"
    assert decision_outcome(accepted=False, genuine=False) == "true_reject"
    assert decision_outcome(accepted=False, genuine=True) == "false_reject"


def test_feedback_scores_outcomes_at_each_decisions_own_threshold() -> None:
    ds = [
        decision("a", 0.80, 0.5, genuine=True),  # true accept
        decision("a", 0.60, 0.5, genuine=False),  # false accept
        decision("a", 0.60, 0.7, genuine=False),  # same score, stricter tau: true reject
        decision("a", 0.40, 0.5, genuine=True),  # false reject
        decision("a", 0.50, 0.5, genuine=False),  # score == tau is accepted: false accept
        decision("a", None, 0.5, genuine=None, outcome="true_reject"),  # empty gallery
        decision("a", 0.90, 0.5, genuine=True, version="old-model"),  # another model: skipped
        # a probe of an enrolled subject ranked to another one: its pair is an impostor's, its
        # outcome the probe's as labelled (accepted: wrong accept; rejected: false reject)
        decision("a", 0.70, 0.5, genuine=False, outcome="wrong_accept"),
        decision("a", 0.30, 0.5, genuine=False, outcome="false_reject"),
    ]
    s = feedback_scores(ds, model_version=VERSION)
    assert s.outcomes == {
        "true_accept": 1,
        "false_accept": 2,
        "true_reject": 2,
        "false_reject": 2,
        "wrong_accept": 1,
    }
    np.testing.assert_allclose(s.genuine, [0.4, 0.8])  # sorted
    np.testing.assert_allclose(s.impostor, [0.3, 0.5, 0.6, 0.6, 0.7])
    assert (
        feedback_scores([Decision(ds[0].match, None)], model_version=VERSION).outcomes[
            "true_accept"
        ]
        == 0
    )
    # max_pairs keeps the most recent pairs of each kind (the last impostor pair scored 0.3)
    np.testing.assert_allclose(
        feedback_scores(ds, model_version=VERSION, max_pairs=1).impostor, [0.3]
    )
    # until: decisions made, or labelled, later are left out
    late = [
        decision("a", 0.8, 0.5, genuine=True, at=10.0),
        decision("a", 0.8, 0.5, genuine=True, at=10.0, labelled_at=30.0),
        decision("a", 0.8, 0.5, genuine=True, at=25.0),
    ]
    assert len(feedback_scores(late, model_version=VERSION, until=20.0).genuine) == 1


def test_gallery_scores_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    x, y = identities(rng, 5, 3, noise=1.0)
    s = gallery_scores([f"s{k}" for k in y], x, max_items=100, max_pairs=10_000, seed=1)
    gen, imp = [], []
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            (gen if y[i] == y[j] else imp).append(float(x[i] @ x[j]))
    np.testing.assert_allclose(s.genuine, sorted(gen), atol=1e-6)
    np.testing.assert_allclose(s.impostor, sorted(imp), atol=1e-6)
    assert len(s.genuine) == 5 * 3 and len(s.impostor) == 15 * 14 // 2 - 15


def test_gallery_scores_cap_items_and_pairs_deterministically() -> None:
    rng = np.random.default_rng(0)
    x, y = identities(rng, 50, 4, noise=1.0)
    subjects = [f"s{k}" for k in y]
    a = gallery_scores(subjects, x, max_items=40, max_pairs=300, seed=seed_for("t", "v"))
    b = gallery_scores(subjects, x, max_items=40, max_pairs=300, seed=seed_for("t", "v"))
    # 40 items = 10 whole subjects of 4: 60 genuine pairs (sampling items would lose most)
    assert len(a.genuine) == 60
    assert len(a.impostor) == 300  # capped from 40*39/2 - 60 = 720
    np.testing.assert_array_equal(a.genuine, b.genuine)
    np.testing.assert_array_equal(a.impostor, b.impostor)
    c = gallery_scores(subjects, x, max_items=40, max_pairs=300, seed=seed_for("u", "v"))
    assert not np.array_equal(a.impostor, c.impostor)  # another tenant, another sample
    assert gallery_scores(["x"], x[:1], max_items=10, max_pairs=10, seed=0).size == 0
    with pytest.raises(ValueError, match="subjects"):
        gallery_scores(["x", "y"], x[:3], max_items=10, max_pairs=10, seed=0)


# --- rates and histograms -------------------------------------------------------------------
def test_error_rates_accept_iff_score_at_or_above_threshold() -> None:
    g, i = np.sort([0.5, 0.7, 0.2, 0.9]), np.sort([0.5, 0.1, 0.3, 0.49])
    r = error_rates(g, i, 0.5)
    assert (r.far, r.frr) == (0.25, 0.25)
    assert r.utility == pytest.approx(0.75)  # harmonic mean of TPR 0.75 and TNR 0.75
    assert (r.genuine_pairs, r.impostor_pairs) == (4, 4)
    empty = error_rates(np.zeros(0), np.zeros(0), 0.5)
    assert empty.far is None and empty.frr is None and empty.utility is None


def test_score_buckets_fine_around_the_calibration_range() -> None:
    b = score_buckets(tau_lo=0.31234567, tau_hi=0.5, tau=0.4012345)
    assert list(b) == sorted(set(b)) and b[0] == -1.0 and b[-1] == 1.0
    fine = [x for x in b if 0.21 <= x <= 0.6]
    # 0.01 steps over [tau_lo - 0.1, tau_hi + 0.1] (rounded outwards to the grid), and tau
    assert fine == sorted([round(0.21 + 0.01 * k, 2) for k in range(40)] + [0.4012345])
    assert {-0.9, 0.0, 0.1, 0.7, 0.9} <= set(b)  # coarse outside
    assert not {0.05, 0.65, 0.15} & set(b)
    assert len(b) < 80  # bounded series per tenant label
    assert all(repr(x) == str(round(x, 2)) for x in b if x != 0.4012345)  # readable le labels
    assert cumulative_counts(np.array([0.1, 0.2, 0.2, 0.9]), [0.0, 0.2, 0.5, 1.0]) == [0, 3, 3, 4]


def test_what_if_moves_far_and_frr_in_opposite_directions() -> None:
    def parts(g: list[float], i: list[float]) -> dict[str, LabelledScores]:
        return {"feedback": LabelledScores(np.sort(g), np.sort(i)), "gallery": LabelledScores()}

    pairs = {
        "a": parts([0.6, 0.7, 0.8, 0.9], [0.1, 0.2, 0.52, 0.3]),
        "b": parts([0.45, 0.55], [0.5, 0.6]),
    }
    w = what_if(pairs, 0.55, tau=0.5, beta=1.0)
    a = w["tenants"]["a"]
    assert (a["far"], a["frr"], a["genuine_pairs"], a["impostor_pairs"]) == (0.0, 0.0, 4, 4)
    assert a["at_tau"] == {"far": 0.25, "frr": 0.0}
    assert a["by_source"]["gallery"]["far"] is None  # no gallery pairs: no number
    assert w["tenants"]["b"]["far"] == 0.5 and w["tenants"]["b"]["frr"] == 0.5
    assert w["pooled_over_tenants"] == {
        "far": 1 / 6,
        "frr": 1 / 6,
        "genuine_pairs": 6,
        "impostor_pairs": 6,
    }
    # stricter threshold: FAR falls, FRR rises
    strict = what_if(pairs, 0.95, tau=0.5, beta=1.0)["pooled_over_tenants"]
    assert strict["far"] == 0.0 and strict["frr"] == 1.0
    assert "pooled_over_tenants" not in what_if(pairs, 0.5, tau=0.5, beta=1.0, include_pooled=False)
    for bad in (float("nan"), 1.5, -2):
        with pytest.raises(ValueError, match="threshold"):
            what_if(pairs, bad, tau=0.5, beta=1.0)


def test_config_validation_and_identity() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        MonitorConfig(interval_s=0)
    with pytest.raises(ValueError, match="fine_step"):
        MonitorConfig(fine_step=0.2, coarse_step=0.1)
    c = MonitorConfig(interval_s=5.0)
    assert c.key("v1") == MonitorConfig(interval_s=60.0).key("v1")  # interval is not identity
    assert c.key("v1") != c.key("v2") != MonitorConfig(window_s=60).key("v2")


def test_tenant_labels_policy_and_sync() -> None:
    assert tenant_label_values(["a", "b", "c"], 2) == {"a": "a", "b": "b", "c": OTHER_TENANTS}
    assert tenant_label_values(["a"], 0) == {"a": OTHER_TENANTS}
    issued: list[str] = []
    labels = TenantLabels(2, on_new_label=issued.append)
    assert [labels(t) for t in ("a", "b", "c", "a")] == ["a", "b", OTHER_TENANTS, "a"]
    # "b" deleted: the oldest two now are a and c, on every replica that syncs
    assert labels.sync(["a", "c", "d"]) == {"a": "a", "c": "c", "d": OTHER_TENANTS}
    assert labels("c") == "c" and labels("b") == OTHER_TENANTS
    assert issued == ["a", "b", OTHER_TENANTS, "c"]  # each label value announced once


# --- the snapshot: healthy tenants vs a drifting one ----------------------------------------
def test_drifting_tenant_raises_opis_above_baseline(sqlite_stores) -> None:
    healthy = new_monitor(healthy_and_drifting(sqlite_stores(), drift=False)).refresh()
    drifting = new_monitor(healthy_and_drifting(sqlite_stores(), drift=True)).refresh()
    m = synthetic_manifest()
    base = m.baseline.opis
    assert healthy.eligible_tenants == drifting.eligible_tenants == 6
    # six statistically identical tenants: live OPIS is of the baseline's order
    assert healthy.opis < 2 * base
    # one tenant drifting: OPIS and eps-OPIS far above the baseline (the "retrain" signal)
    assert drifting.opis > 5 * base and drifting.opis > 5 * healthy.opis
    assert drifting.eps_opis > 3 * m.baseline.eps_opis
    # per-tenant rates at tau: the drifter's FAR is far above the target, the others' near it
    target = m.calibration.target_far
    d = drifting.tenants["drifter"]
    assert d.far > 10 * target
    assert d.by_source.feedback.far > 0.5 and d.by_source.gallery.far > target
    for t in ("t0", "t1", "t2", "t3", "t4"):
        assert drifting.tenants[t].far < 3 * target, t
    assert d.utility < min(drifting.tenants[t].utility for t in ("t0", "t1"))
    assert d.mean_utility < min(drifting.tenants[t].mean_utility for t in ("t0", "t1"))
    assert drifting.baseline.opis == base and drifting.opis_unavailable_reason is None
    json.dumps(to_stored(drifting), allow_nan=False)  # JSON-able as is


def test_snapshot_agrees_with_tcm_and_brute_force(sqlite_stores) -> None:
    """The numbers are tcm's, and the rates are plain counts: recompute both."""
    store = healthy_and_drifting(sqlite_stores(), drift=True)
    mon = new_monitor(store)
    snap = mon.refresh()
    scores = mon.load_scores(tenant_ids(store), now=2000.0)
    gen = {
        t: np.concatenate([s["feedback"].genuine, s["gallery"].genuine]) for t, s in scores.items()
    }
    imp = {
        t: np.concatenate([s["feedback"].impostor, s["gallery"].impostor])
        for t, s in scores.items()
    }
    m = synthetic_manifest()
    cal = m.calibration
    rep = consistency_from_scores(
        gen,
        imp,
        tau_range=(cal.tau_lo, cal.tau_hi),
        num_thresholds=cal.num_thresholds,
        beta=cal.beta,
        eps=m.baseline.eps,
        tau=cal.tau,
    )
    assert snap.opis == pytest.approx(rep.opis, rel=1e-12)
    assert snap.eps_opis == pytest.approx(rep.eps_opis, rel=1e-12)
    assert rep.at_tau is not None
    for row, t in enumerate(rep.classes):
        s = snap.tenants[t]
        assert s.far == pytest.approx(rep.at_tau.far[row], abs=1e-12)
        assert s.frr == pytest.approx(rep.at_tau.frr[row], abs=1e-12)
        assert s.utility == pytest.approx(rep.at_tau.utility[row])
        assert s.genuine_pairs == rep.num_positive[row]
        # brute force, source by source
        for src, bs in s.by_source:
            g = scores[t][src].genuine.tolist()
            i = scores[t][src].impostor.tolist()
            assert bs.far == sum(v >= cal.tau for v in i) / len(i)
            assert bs.frr == sum(v < cal.tau for v in g) / len(g)
            assert (bs.genuine_pairs, bs.impostor_pairs) == (len(g), len(i))
        assert s.by_source.feedback.impostor_pairs == 100
        assert s.by_source.gallery.genuine_pairs == 30 * 6
        assert sum(s.outcomes.model_dump().values()) == 200


def test_window_min_pairs_and_cap(sqlite_stores) -> None:
    store = healthy_and_drifting(sqlite_stores(), drift=True)
    new_tenant(store, "newcomer")  # no gallery, no feedback yet
    record(store, [decision("t0", 0.9, 0.5, genuine=True, at=10.0)])  # too old
    snap = new_monitor(store, window_s=1500.0, tenant_label_cap=3).refresh()
    assert snap.tenants["t0"].by_source.feedback.genuine_pairs == 100
    assert snap.excluded_tenants == ["newcomer"] and snap.eligible_tenants == 6
    assert snap.tenants["newcomer"].far is None
    assert snap.tenants_total == 7
    labels = {t: r.label for t, r in snap.tenants.items()}
    assert labels["t0"] == "t0" and labels["t2"] == "t2" and labels["t3"] == OTHER_TENANTS
    other = snap.labels[OTHER_TENANTS]
    assert other.tenants == 4  # t3, t4, drifter, newcomer
    # the folded label's FAR is pooled over its tenants' pairs
    members = ("t3", "t4", "drifter")
    n_imp = sum(snap.tenants[t].impostor_pairs for t in members)
    fa = sum(snap.tenants[t].far * snap.tenants[t].impostor_pairs for t in members)
    assert other.pooled.far == pytest.approx(fa / n_imp)
    assert other.pooled.impostor_pairs == n_imp


def test_fewer_than_two_eligible_tenants_is_reported_not_raised(sqlite_stores) -> None:
    store = healthy_and_drifting(sqlite_stores(), drift=False)
    few = new_monitor(store, min_pairs=10_000).refresh()
    assert few.opis is None and few.eps_opis is None
    assert "needs at least 2" in few.opis_unavailable_reason
    assert few.tenants["t0"].far is not None  # per-tenant rates still there
    empty = new_monitor(sqlite_stores()).refresh()
    assert empty.opis is None and empty.tenants == {} and empty.labels == {}
    one = sqlite_stores()
    add_tenant(one, "solo", np.random.default_rng(0))
    snap = new_monitor(one).refresh()
    assert snap.eligible_tenants == 1 and snap.opis is None
    json.dumps(to_stored(snap), allow_nan=False)


def test_tenant_view_hides_everything_about_other_tenants(sqlite_stores) -> None:
    snap = new_monitor(healthy_and_drifting(sqlite_stores(), drift=True)).refresh()
    view = tenant_view(snap, "t1")
    assert view.tenant == snap.tenants["t1"]
    text = view.model_dump_json()
    for other in ("t0", "t2", "drifter"):
        assert f'"{other}"' not in text
    assert not {
        "opis",
        "eps_opis",
        "global",
        "labels",
        "tenants",
        "excluded_tenants",
        "score_buckets",
    } & set(view.model_dump())
    assert tenant_view(snap, "unknown").tenant is None


# --- metrics --------------------------------------------------------------------------------
def test_metrics_mirror_the_snapshot(sqlite_stores) -> None:
    registry = CollectorRegistry(auto_describe=True)
    mon = new_monitor(healthy_and_drifting(sqlite_stores(), drift=True), registry=registry)
    m = synthetic_manifest()
    before = samples(registry)
    assert ("tcm_opis", ()) not in before  # nothing made up before the first snapshot
    assert before[("tcm_opis_baseline", ())] == m.baseline.opis
    snap = mon.refresh()
    got = samples(registry)
    assert got[("tcm_opis", ())] == snap.opis
    assert got[("tcm_eps_opis", ())] == snap.eps_opis
    assert got[("tcm_model_target_far_ratio", ())] == 1e-2
    assert got[("tcm_monitor_snapshot_timestamp_seconds", ())] == 2000.0
    assert got[("tcm_monitor_tenants", (("status", "eligible"),))] == 6
    assert got[("tcm_monitor_runs_total", (("result", "computed"),))] == 1
    d = snap.tenants["drifter"]
    assert got[("tcm_tenant_far_ratio", (("source", "pooled"), ("tenant", "drifter")))] == d.far
    assert (
        got[("tcm_tenant_far_ratio", (("source", "feedback"), ("tenant", "drifter")))]
        == d.by_source.feedback.far
    )
    assert (
        got[
            (
                "tcm_tenant_pairs",
                (("kind", "impostor"), ("source", "feedback"), ("tenant", "drifter")),
            )
        ]
        == 100
    )
    # the request-path counter's series exist at 0 for every label (rate ratios exist too)
    assert got[("tcm_decisions_total", (("outcome", "false_accept"), ("tenant", "drifter")))] == 0
    # FAR at tau read from the gauge histogram as PromQL would: tau is a bucket bound
    tau = m.calibration.tau
    assert tau in snap.score_buckets
    n = {
        s: got[("tcm_impostor_score_gcount", (("source", s), ("tenant", "drifter")))]
        for s in ("feedback", "gallery")
    }
    below = sum(
        got[
            ("tcm_impostor_score_bucket", (("le", repr(tau)), ("source", s), ("tenant", "drifter")))
        ]
        for s in n
    )
    imp = np.concatenate(
        [p.impostor for p in mon.load_scores(["drifter"], now=2000.0)["drifter"].values()]
    )
    # 1 - le/gcount counts scores > tau; the service accepts >= tau: equal unless a score is tau
    assert 1 - below / sum(n.values()) == pytest.approx(float(np.mean(imp > tau)))
    assert float(np.mean(imp > tau)) == pytest.approx(d.far)


def test_request_path_counter_uses_the_snapshots_capped_labels(sqlite_stores) -> None:
    store = sqlite_stores()
    for t in ("a", "b", "c"):
        new_tenant(store, t)
    registry = CollectorRegistry()
    mon = new_monitor(store, registry=registry, tenant_label_cap=2)
    service_metrics_labels = mon.labels
    # before any snapshot, first come first served; c came first here
    assert service_metrics_labels("c") == "c"
    mon.refresh()  # the snapshot re-applies "oldest first": a, b keep ids, c is folded
    assert service_metrics_labels("c") == OTHER_TENANTS
    assert service_metrics_labels("a") == "a"
    assert mon.snapshot is not None
    assert {r.label for r in mon.snapshot.tenants.values()} == {"a", "b", OTHER_TENANTS}
    with pytest.raises(ValueError, match="tenant_label_cap"):
        Monitor(
            store,
            synthetic_manifest(),
            ServiceMetrics(CollectorRegistry(), tenant_label_cap=3),
            MonitorConfig(tenant_label_cap=2),
        )


# --- replicas share one snapshot ------------------------------------------------------------
def test_replicas_adopt_the_stored_snapshot_until_it_ages(sqlite_stores) -> None:
    store = healthy_and_drifting(sqlite_stores(), drift=True)
    now = [1000.0]
    cfg = MonitorConfig(interval_s=60.0)

    def replica(registry: CollectorRegistry) -> Monitor:
        return Monitor(
            store,
            synthetic_manifest(),
            ServiceMetrics(registry, tenant_label_cap=50),
            cfg,
            clock=lambda: now[0],
        )

    a = replica(CollectorRegistry())
    b_registry = CollectorRegistry()
    b = replica(b_registry)
    first = a.refresh()
    reads = store.reads
    now[0] += 20.0
    adopted = b.refresh()
    assert adopted == first and store.reads == reads  # adopted: no pair reads
    got = samples(b_registry)
    assert got[("tcm_monitor_runs_total", (("result", "adopted"),))] == 1
    assert got[("tcm_opis", ())] == first.opis
    now[0] += 15.0  # 35 s old: older than half an interval -> recomputed
    second = b.refresh()
    assert second.computed_at == 1035.0 and store.get_monitor_snapshot() == to_stored(second)
    # another model or configuration never adopts it
    other = Monitor(
        store,
        synthetic_manifest(),
        ServiceMetrics(CollectorRegistry(), tenant_label_cap=50),
        MonitorConfig(window_s=10.0),
        clock=lambda: now[0],
    )
    assert not other.is_current(second) and a.is_current(second)


def test_failed_refresh_is_counted_and_keeps_the_last_numbers(sqlite_stores) -> None:
    store = healthy_and_drifting(sqlite_stores(), drift=False)
    registry = CollectorRegistry()
    mon = new_monitor(store, registry=registry)
    snap = mon.refresh()

    def down(*a: object, **k: object) -> list:
        raise ConnectionError("store down")

    store.list_tenants = down  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        mon.refresh(force=True)
    got = samples(registry)
    assert got[("tcm_monitor_runs_total", (("result", "failed"),))] == 1
    assert got[("tcm_opis", ())] == snap.opis
    assert mon.snapshot is snap


def test_schedule_runs_in_the_background_and_stops(sqlite_stores) -> None:
    store = healthy_and_drifting(sqlite_stores(), drift=False)

    async def scenario() -> int:
        mon = Monitor(
            store,
            synthetic_manifest(),
            ServiceMetrics(CollectorRegistry(), tenant_label_cap=50),
            MonitorConfig(interval_s=0.05),
        )
        await mon.start()
        for _ in range(200):
            if mon.snapshot is not None and store.reads >= 12:
                break
            await asyncio.sleep(0.02)
        await mon.close()
        reads = store.reads
        await asyncio.sleep(0.2)
        assert store.reads == reads  # stopped
        return reads

    assert asyncio.run(scenario()) >= 12  # at least two cycles of 6 tenants


# --- what-if from the snapshot's pairs ------------------------------------------------------
def test_what_if_uses_the_snapshots_pairs_cached_and_bounded(sqlite_stores) -> None:
    store = healthy_and_drifting(sqlite_stores(), drift=True)
    mon = new_monitor(store)
    snap = mon.refresh()
    tau = synthetic_manifest().calibration.tau
    reads = store.reads
    w = mon.what_if(tau)
    assert store.reads == reads  # the computing replica kept the pairs
    for t, row in snap.tenants.items():  # at tau, what-if reproduces the snapshot
        assert w["tenants"][t]["far"] == row.far and w["tenants"][t]["frr"] == row.frr
    assert w["in_calibration_range"] and w["pairs_as_of"] == snap.computed_at
    # a later decision is not part of the snapshot's pairs
    record(store, [decision("t0", 0.99, tau, genuine=False, at=2500.0)])
    strict = mon.what_if(tau + 0.2, ["t0"])
    assert set(strict["tenants"]) == {"t0"} and "pooled_over_tenants" not in strict
    assert strict["tenants"]["t0"]["far"] <= w["tenants"]["t0"]["far"]
    assert strict["tenants"]["t0"]["frr"] >= w["tenants"]["t0"]["frr"]
    # a replica that adopted the snapshot reloads the pairs once, as of the snapshot
    replica = Monitor(
        store,
        synthetic_manifest(),
        ServiceMetrics(CollectorRegistry(), tenant_label_cap=50),
        MonitorConfig(),
        clock=lambda: 2010.0,
    )
    replica.refresh()
    assert replica.pairs.size == 0
    r1 = replica.what_if(tau)
    reads = store.reads
    r2 = replica.what_if(tau - 0.1)
    assert store.reads == reads and r1["tenants"] == w["tenants"]
    assert r2["pooled_over_tenants"]["far"] >= r1["pooled_over_tenants"]["far"]


def test_pair_cache_evicts_least_recently_used() -> None:
    def parts(n: int) -> dict[str, LabelledScores]:
        return {"feedback": LabelledScores(np.zeros(n), np.zeros(0))}

    cache = PairCache(budget=10)
    loads: list[list[str]] = []

    def load(ts: list[str]) -> dict[str, dict[str, LabelledScores]]:
        loads.append(ts)
        return {t: parts(4) for t in ts}

    cache.get_many("k", ["a", "b"], load)
    cache.get_many("k", ["a"], load)  # a is now the most recent
    cache.get_many("k", ["c"], load)  # 12 > 10: b goes
    assert loads == [["a", "b"], ["c"]] and cache.size == 8
    cache.get_many("k", ["a", "b"], load)
    assert loads[-1] == ["b"]
    cache.reset("k", {"huge": parts(11)})  # larger than the budget: not kept
    assert cache.size == 0
    cache.get_many("k2", ["a"], load)  # another snapshot: nothing of "k" is used
    assert loads[-1] == ["a"]
    cache.get_many(None, ["a"], load)  # no snapshot: never cached
    cache.get_many(None, ["a"], load)
    assert loads[-2:] == [["a"], ["a"]]


def test_compute_snapshot_order_and_json(sqlite_stores) -> None:
    """Tenants absent from ``tenant_order`` come last; the snapshot survives a JSON round
    trip."""
    store = healthy_and_drifting(sqlite_stores(), drift=False)
    mon = new_monitor(store)
    scores = mon.load_scores(tenant_ids(store), now=2000.0)
    snap = compute_snapshot(
        scores,
        manifest=synthetic_manifest(),
        config=MonitorConfig(),
        tenant_order=["t3"],
        now=2000.0,
    )
    assert next(iter(snap.tenants)) == "t3"
    doc = to_stored(snap)
    assert "subjects" not in doc["tenants"]["t3"]  # not computed: not stored (as before)
    assert from_stored(json.loads(json.dumps(doc, allow_nan=False))) == snap
