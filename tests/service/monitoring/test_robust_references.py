"""One tenant's crafted gallery must not move the model-wide drift signals (issue 25, item 8):
the pooled OPIS across subjects leaves its most influential tenant out (its reference pools each
draw the same way), the across-tenants deviation bound leaves the farthest tenant out, and that
reference is re-measured as soon as a tenant it was measured on leaves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.store import Store
from tcm.drift import Summary, pooled_opis
from tests.service.monitoring.test_drift_signals import (
    artefact_dir,
    config_factor,
    gallery,
    monitor_for,
)
from tests.service.monitoring.test_monitor import DIM, add_gallery, new_tenant

HEALTHY = 5


def attacker_gallery(
    store: Store, name: str, rng: np.random.Generator, subjects: int, *, mixed: bool
) -> None:
    """A crafted gallery of 2 images per subject at random directions. ``mixed``: half the
    subjects are two copies of one image (genuine score 1: utility ~1 over the range), half an
    image and its opposite (genuine score -1: utility 0), the most inconsistent subjects there
    are; else every subject is of the second kind (the tenant's curve is as far from the
    others' as it gets)."""
    c = rng.standard_normal((subjects, DIM))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    sign = np.where(np.arange(subjects) % 2 == 0, 1.0, -1.0) if mixed else -np.ones(subjects)
    x = np.concatenate([c, sign[:, None] * c], axis=0).astype(np.float32)
    labels = [f"a{k}" for k in range(subjects)] * 2
    new_tenant(store, name)
    add_gallery(store, name, labels, x)


def healthy_tenants(store: Store, *, drifted: int = 0, per_subject: int = 3) -> None:
    for i in range(HEALTHY):
        gallery(store, f"t{i}", np.random.default_rng(40 + i), 20, per_subject, drifted=drifted)


def test_trimmed_pool_leaves_out_the_most_influential_group() -> None:
    from tcm.drift import trimmed_pooled_opis  # new here (old-code runs)

    rng = np.random.default_rng(0)
    groups = [rng.uniform(0.6, 0.8, (10, 7)) for _ in range(4)]
    wild = np.repeat([[0.0], [1.0]], 10, axis=0) * np.ones((1, 7))
    parts = [Summary.of(g) for g in [*groups, wild]]
    value, left_out = trimmed_pooled_opis(parts, min_subjects=5)
    assert left_out == 4
    assert value == pytest.approx(pooled_opis(parts[:4]), rel=1e-9)
    assert pooled_opis(parts) > 5 * value
    # fewer than 3 groups with min_subjects curves: the plain pool
    assert trimmed_pooled_opis(parts[:2], min_subjects=5) == (pooled_opis(parts[:2]), None)


def test_one_tenant_cannot_fire_the_pooled_subjects_alert(tmp_path: Path, sqlite_stores) -> None:
    """Five healthy tenants and one whose gallery is crafted to maximise OPIS: the pooled
    signal stays under the alert's factor x its reference's upper bound (the attacker is left
    out); drift in every tenant still crosses it."""
    factor = config_factor("subjects_opis_factor")
    path = artefact_dir(tmp_path)

    def pooled_ratio(store: Store) -> tuple[float, object]:
        pooled = monitor_for(store, path).refresh(force=True).subjects.pooled
        assert pooled.reference is not None and pooled.reference.matched
        return pooled.opis / pooled.reference.hi, pooled

    store = sqlite_stores()
    healthy_tenants(store)
    healthy, _ = pooled_ratio(store)
    attacker_gallery(store, "attacker", np.random.default_rng(1), 100, mixed=True)
    attacked, pooled = pooled_ratio(store)
    drifting = sqlite_stores()
    healthy_tenants(drifting, drifted=10)
    drift, _ = pooled_ratio(drifting)
    print(
        f"pooled across subjects, live / reference hi: healthy {healthy:.3g}, "
        f"with an attacker {attacked:.3g} (alert above {factor}), every tenant drifting "
        f"{drift:.3g}; pooled {pooled}"
    )
    assert healthy < factor
    assert attacked < factor
    assert pooled.left_out_tenant == "attacker"
    assert pooled.opis_all_tenants > factor * pooled.reference.hi  # what the plain pool says
    assert drift > factor


def measured(store: Store, path: Path, *, attacker: bool):
    """The monitor and its first snapshot over the healthy tenants (and the attacker: one
    tenant whose subjects' genuine pairs are all opposite images)."""
    healthy_tenants(store, per_subject=4)
    if attacker:
        attacker_gallery(store, "attacker", np.random.default_rng(2), 60, mixed=False)
    mon = monitor_for(store, path, min_pairs=10)
    snap = mon.refresh(force=True)
    assert snap.tenants_reference is not None
    # the attacker would alert against the others' bound: it is left out of the reference
    assert snap.tenants_reference.tenants == HEALTHY
    assert snap.tenants_reference.left_out_tenant == ("attacker" if attacker else None)
    return mon, snap


def test_an_outlier_tenant_does_not_widen_the_deviation_bound(
    tmp_path: Path, sqlite_stores
) -> None:
    """The across-tenants deviation bound measured with an attacker present stays near the
    healthy tenants' own (about the plain farthest healthy tenant's, where healthy-only leaves
    that one out: within 3x, not the attacker's hundreds), so the attacker stands out."""
    path = artefact_dir(tmp_path)
    _, clean = measured(sqlite_stores(), path, attacker=False)
    _, snap = measured(sqlite_stores(), path, attacker=True)
    healthy, attacked = (
        clean.tenants_reference.deviation["hi"],
        snap.tenants_reference.deviation["hi"],
    )
    factor = config_factor("tenant_deviation_factor")
    bound = factor * max(attacked, config_factor("opis_reference_floor"))
    print(
        f"deviation bound (hi) healthy {healthy:.4g}, with the attacker at measurement "
        f"{attacked:.4g} ({attacked / healthy:.3g}x); attacker's deviation "
        f"{snap.tenants['attacker'].deviation:.4g} vs alert bound {bound:.4g}"
    )
    assert attacked < 3.0 * healthy
    assert snap.tenants["attacker"].deviation > bound


def test_the_reference_is_remeasured_when_a_tenant_leaves(tmp_path: Path, sqlite_stores) -> None:
    """Measured with the attacker present (and left out); once it is deleted, the next
    refresh re-measures the reference on the tenants left, which gives exactly the
    healthy-only reference. A healthy tenant joining re-measures it too, with the newcomer in
    (the reference follows the fleet)."""
    path = artefact_dir(tmp_path)
    _, clean = measured(sqlite_stores(), path, attacker=False)
    store = sqlite_stores()
    mon, snap = measured(store, path, attacker=True)
    before = snap.tenants_reference
    assert store.delete_tenant("attacker")
    after = mon.refresh(force=True).tenants_reference
    print(
        f"deviation bound (hi): measured with the attacker {before.deviation['hi']:.4g} over "
        f"{before.tenants} tenants; after it left {after.deviation['hi']:.4g} over "
        f"{after.tenants} (healthy-only {clean.tenants_reference.deviation['hi']:.4g})"
    )
    assert after.tenants == HEALTHY
    ref = clean.tenants_reference
    assert after.deviation["hi"] == pytest.approx(ref.deviation["hi"], rel=1e-9)
    assert after.opis == pytest.approx(ref.opis, rel=1e-9)
    doc, _ = store.get_model_registry()
    assert doc["tenant_reference_members"][after.model_version] == [f"t{i}" for i in range(HEALTHY)]
    assert before.deviation == after.deviation  # the attacker had been left out already
    gallery(store, "late", np.random.default_rng(77), 20, 4)
    grown = mon.refresh(force=True).tenants_reference
    assert grown.tenants == HEALTHY + 1 and grown.left_out_tenant is None
    doc, _ = store.get_model_registry()
    assert "late" in doc["tenant_reference_members"][after.model_version]
    assert mon.refresh(force=True).tenants_reference == grown  # no change, no re-measure
