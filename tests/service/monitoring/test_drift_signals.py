"""The two drift signals on synthetic identities, through the real Monitor and an artefact
directory with a reference file: the histogram math against tcm, a healthy gallery with 3
images per subject raises no alert (over seeds: the false-alert rate), drifting subjects do, one
tenant is enough, older artefacts fall back to the baseline, and the across-tenants reference is
measured once and names the drifting tenant."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry

from service.metrics import ServiceMetrics
from service.monitoring import MonitorConfig
from service.monitoring.monitor import Monitor
from service.monitoring.subjects import tenant_subjects
from service.store import Decision, Feedback, MatchRecord, Store
from tcm import consistency_from_scores, read_manifest, save_reference
from tcm.drift import Grid, Rules, bootstrap_interval, class_histograms, curves, opis_of
from tests.service.monitoring.test_monitor import (
    add_gallery,
    identities,
    new_tenant,
    synthetic_manifest,
)

RULES = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "rules"


def config_factor(name: str) -> float:
    for group in yaml.safe_load((RULES / "tcm_recording.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("record") == f"tcm_config:{name}":
                return float(re.fullmatch(r"vector\((.+)\)", rule["expr"].strip()).group(1))
    raise AssertionError(name)


def artefact_dir(tmp_path: Path, *, with_reference: bool = True) -> Path:
    """The synthetic model's manifest, and (as training exports it) held-out embeddings."""
    out = tmp_path / "artefact"
    out.mkdir()
    m = synthetic_manifest()
    if with_reference:
        x, y = identities(np.random.default_rng(321), 120, 10, noise=0.9)
        name = save_reference(out, torch.from_numpy(x), torch.from_numpy(y))
        m = dataclasses.replace(m, baseline=dataclasses.replace(m.baseline, reference_file=name))
    (out / "manifest.json").write_text(json.dumps(m.to_dict()))
    return out


def monitor_for(store: Store, path: Path | None, **cfg: object) -> Monitor:
    metrics = ServiceMetrics(CollectorRegistry(), tenant_label_cap=50)
    manifest = read_manifest(path) if path is not None else synthetic_manifest()
    return Monitor(
        store,
        manifest,
        metrics,
        MonitorConfig(**cfg),  # type: ignore[arg-type]
        clock=lambda: 1000.0,
        artefact_path=path,
    )


def gallery(
    store: Store,
    tenant: str,
    rng: np.random.Generator,
    subjects: int,
    per_subject: int,
    *,
    noise: float = 0.9,
    drifted: int = 0,
) -> None:
    """``drifted`` of the subjects are blurred (noise 2.5): their genuine scores collapse."""
    x, y = identities(rng, subjects, per_subject, noise=noise)
    if drifted:
        xd, _ = identities(rng, drifted, per_subject, noise=2.5)
        x[: len(xd)] = xd
    new_tenant(store, tenant)
    add_gallery(store, tenant, [f"s{k}" for k in y], x)


def test_histogram_opis_equals_tcm() -> None:
    rng = np.random.default_rng(0)
    x, y = identities(rng, 12, 4, noise=1.0)
    grid = Grid.of(0.1, 0.6, 31, 0.35)
    classes, pos, neg = class_histograms(x, y, grid)
    cv = curves(classes, pos, neg, grid, Rules())
    # brute force: every pair's score, per class
    s = x @ x.T
    gen = {
        c: [s[i, j] for i in range(len(y)) for j in range(i + 1, len(y)) if y[i] == y[j] == int(c)]
        for c in classes
    }
    imp = {
        c: [
            s[i, j]
            for i in range(len(y))
            for j in range(len(y))
            if (y[i] == int(c)) != (y[j] == int(c)) and i < j
        ]
        for c in classes
    }
    rep = consistency_from_scores(gen, imp, tau_range=(0.1, 0.6), num_thresholds=31, tau=0.35)
    assert opis_of(cv.utility) == pytest.approx(rep.opis, rel=1e-9)
    assert cv.genuine_pairs.tolist() == [6.0] * 12
    lo, hi = bootstrap_interval(cv.utility, resamples=300)
    assert lo < rep.opis < hi


def test_feedback_pairs_land_on_the_candidates_subject() -> None:
    grid = Grid.of(0.1, 0.6, 11, 0.35)

    def d(subject: str, score: float, genuine: bool) -> Decision:
        m = MatchRecord("m", "t", score >= 0.35, None, "i", subject, score, 0.35, "v", 1.0)
        return Decision(m, Feedback("m", "t", None, None, genuine, "true_accept", 1.0))

    ts = tenant_subjects(
        [],
        np.zeros((0, 4)),
        [d("a", 0.9, True), d("a", 0.5, False), d("b", 0.2, False), d("a", 0.9, True)],
        grid=grid,
        max_items=10,
        seed=0,
        model_version="v",
    )
    assert ts.subjects == ["a", "b"]
    assert ts.pos.sum(axis=1).tolist() == [2.0, 0.0]
    assert ts.neg_feedback.sum(axis=1).tolist() == [1.0, 1.0]


def test_healthy_three_image_galleries_raise_no_alert_drift_does(
    tmp_path: Path, sqlite_stores
) -> None:
    """One tenant, 60 subjects of 3 images each, from the model's own distribution: live OPIS
    across subjects stays under factor x its count-matched reference on every seed (the
    full-count baseline would be far below it: comparing with it would alert every time).
    Blurring a third of the subjects lifts it above."""
    factor = config_factor("subjects_opis_factor")
    path = artefact_dir(tmp_path)
    base = synthetic_manifest().baseline.opis
    ratios, above_baseline = [], 0
    for seed in range(8):
        store = sqlite_stores()
        gallery(store, "solo", np.random.default_rng(seed), 60, 3)
        snap = monitor_for(store, path).refresh(force=True)
        row = snap.tenants["solo"].subjects
        ref = row.reference
        assert ref.matched and ref.draws >= 10
        assert snap.subjects.pooled.opis == pytest.approx(row.opis)
        ratios.append(row.opis / ref.hi)
        above_baseline += row.opis > factor * base
    false_alerts = sum(r > factor for r in ratios)
    print(
        f"healthy 3-image galleries: live/reference-hi {np.round(ratios, 3).tolist()}, "
        f"false alerts {false_alerts}/8; above {factor} x full-count baseline "
        f"({base:.4g}): {above_baseline}/8"
    )
    assert false_alerts == 0
    assert above_baseline == 8  # the unlike comparison the issue describes

    store = sqlite_stores()
    gallery(store, "solo", np.random.default_rng(99), 60, 3, drifted=20)
    snap = monitor_for(store, path).refresh(force=True)
    row = snap.tenants["solo"].subjects
    print(f"drifted: live {row.opis:.4g}, reference {row.reference}")
    assert row.opis > factor * row.reference.hi


def test_older_artefact_falls_back_to_the_baseline(tmp_path: Path, sqlite_stores) -> None:
    path = artefact_dir(tmp_path, with_reference=False)
    d = json.loads((path / "manifest.json").read_text())
    for key in (
        "opis_interval",
        "eps_opis_interval",
        "interval_level",
        "bootstrap_resamples",
        "reference_file",
    ):
        d["baseline"].pop(key)
    (path / "manifest.json").write_text(json.dumps(d))
    m = read_manifest(path)  # an artefact exported before these fields loads
    assert m.baseline.opis_interval is None and m.baseline.reference_file == ""
    store = sqlite_stores()
    gallery(store, "solo", np.random.default_rng(0), 20, 3)
    mon = monitor_for(store, path)
    snap = mon.refresh(force=True)
    ref = snap.subjects.pooled.reference
    assert ref.matched is False and "no bootstrap interval" in ref.note
    assert ref.hi == ref.mid == m.baseline.opis
    text = "\n".join(
        f"{s.name} {s.value}" for fam in mon.metrics.snapshot.collect() for s in fam.samples
    )
    assert "tcm_subjects_opis_pooled " in text  # the live value is exposed
    assert "tcm_subjects_opis_pooled_reference" not in text  # an unlike reference is not


def test_subjects_undefined_with_too_few(tmp_path: Path, sqlite_stores) -> None:
    store = sqlite_stores()
    gallery(store, "tiny", np.random.default_rng(0), 3, 3)
    snap = monitor_for(store, artefact_dir(tmp_path)).refresh(force=True)
    row = snap.tenants["tiny"].subjects
    assert row.opis is None and "needs 5" in row.unavailable_reason
    assert snap.subjects.pooled.opis is None


def test_across_tenants_reference_leaves_a_drifting_newcomer_out_and_names_it(
    tmp_path: Path, sqlite_stores
) -> None:
    path = artefact_dir(tmp_path)
    store = sqlite_stores()
    for i in range(4):
        gallery(store, f"t{i}", np.random.default_rng(10 + i), 15, 4)
    mon = monitor_for(store, path, min_pairs=10)
    snap = mon.refresh(force=True)
    ref = snap.tenants_reference
    assert ref is not None and ref.tenants == 4
    lo, hi = ref.opis_interval
    assert lo <= ref.opis <= hi
    assert snap.opis == pytest.approx(ref.opis)
    # it is kept in the model registry, for this version
    doc, _ = store.get_model_registry()
    assert doc["tenant_references"] == {ref.model_version: ref.model_dump(mode="json")}
    # a drifting tenant joins: the reference is re-measured and leaves it out (it falls short
    # of the others by more than the alert factor x their bound), so the numbers are the
    # healthy fleet's; its shortfall leaves the bound
    gallery(store, "drifter", np.random.default_rng(5), 15, 4, noise=2.5)
    snap = mon.refresh(force=True)
    assert snap.tenants_reference.left_out_tenant == "drifter"
    keep = {"left_out_tenant"}
    assert snap.tenants_reference.model_dump(exclude=keep) == ref.model_dump(exclude=keep)
    doc, _ = store.get_model_registry()
    assert doc["tenant_reference_members"][ref.model_version] == ["drifter", "t0", "t1", "t2", "t3"]
    ref = snap.tenants_reference
    factor = config_factor("tenant_deviation_factor")
    devs = {t: row.deviation for t, row in snap.tenants.items()}
    bound = factor * max(ref.deviation["hi"], config_factor("opis_reference_floor"))
    assert {t for t, e in devs.items() if e > bound} == {"drifter"}, (devs, bound)
    assert snap.opis > config_factor("opis_degraded_factor") * hi
