"""The store's monitoring slot (``put_monitor_snapshot`` / ``get_monitor_snapshot``), checked
against both implementations: what one replica stores, another reads back unchanged; and the
typed snapshot's stored form, which is the previous version's."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from service.metrics import ServiceMetrics, decision_outcome
from service.monitoring import MonitorConfig
from service.monitoring.monitor import Monitor
from service.monitoring.snapshot_schema import from_stored, to_stored
from service.settings import Settings
from service.store import ApiKey, Feedback, MatchRecord, NewItem, Store, Tenant, open_store
from service.store.sqlite import SQLiteStore
from tcm import read_manifest
from tests.service.conftest import REDIS_URL, STORES
from tests.service.monitoring.test_drift_signals import artefact_dir
from tests.service.monitoring.test_monitor import identities

SNAPSHOT = {
    "format": 2,
    "computed_at": 1234.5,
    "opis": 0.0123,
    "eps_opis": None,
    "tenants": {"b": {"far": 0.5, "label": "b"}, "a": {"far": None, "label": "a"}},
    "score_buckets": [-1.0, 0.35, 0.4012345678901234, 1.0],
    "name": "caf\u00e9",
}


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, store_settings, artefact: Path) -> Iterator[Store]:
    s = open_store(Settings(artefact_path=artefact, **store_settings(request.param)))
    try:
        yield s
    finally:
        s.close()


def test_round_trip_and_replace(store: Store) -> None:
    assert store.get_monitor_snapshot() is None
    store.put_monitor_snapshot(SNAPSHOT)
    got = store.get_monitor_snapshot()
    assert got == SNAPSHOT
    assert list(got["tenants"]) == ["b", "a"]  # order kept (it is the label order)
    assert got["score_buckets"][2] == 0.4012345678901234  # floats bit for bit
    store.put_monitor_snapshot({**SNAPSHOT, "computed_at": 2000.0})
    assert store.get_monitor_snapshot()["computed_at"] == 2000.0


def test_rejects_nan_and_survives_tenant_deletion(store: Store) -> None:
    with pytest.raises(ValueError):
        store.put_monitor_snapshot({"opis": math.nan})
    store.create_tenant(Tenant("t1", "t", 1.0), ApiKey("k1", "t1", "h" * 64, 1.0))
    store.put_monitor_snapshot(SNAPSHOT)
    assert store.delete_tenant("t1")
    assert store.get_monitor_snapshot() == SNAPSHOT


@pytest.mark.parametrize("kind", STORES)
def test_shared_by_two_connections(kind: str, store_settings, artefact: Path) -> None:
    """Another store object over the same data (a second replica on Redis, a restart on
    SQLite) reads what the first stored."""
    settings = Settings(artefact_path=artefact, **store_settings(kind))
    a = open_store(settings)
    a.put_monitor_snapshot(SNAPSHOT)
    if kind == "sqlite":
        a.close()
    b = open_store(settings)
    try:
        assert b.get_monitor_snapshot() == SNAPSHOT
    finally:
        b.close()
        if kind != "sqlite":
            a.close()


@pytest.mark.redis
def test_redis_key_lives_under_the_prefix(store_settings, artefact: Path) -> None:
    fields = store_settings("redis")
    s = open_store(Settings(artefact_path=artefact, **fields))
    try:
        s.put_monitor_snapshot(SNAPSHOT)
        r = redis.Redis.from_url(REDIS_URL)
        assert r.exists(f"{fields['redis_key_prefix']}monitor:snapshot") == 1
        r.close()
    finally:
        s.close()


def test_sqlite_adds_the_table_to_an_existing_file(tmp_path: Path) -> None:
    """A database created before the monitor's table existed gets it on open (additive)."""
    path = tmp_path / "tcm.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE monitor_snapshot")
    s = SQLiteStore(path)
    try:
        assert s.get_monitor_snapshot() is None
        s.put_monitor_snapshot(SNAPSHOT)
        assert s.get_monitor_snapshot() == SNAPSHOT
    finally:
        s.close()


# --- the stored snapshot and its model ------------------------------------------------------
# A snapshot as the code before the typed model stored it (commit 87963d0, format 3): written by
# ``Monitor.refresh`` over ``populate``'s data at clock 5000.0 with MONITOR_CONFIG and the
# synthetic artefact of test_drift_signals (held-out embeddings: count-matched references).
STORED_V3 = Path(__file__).parent / "golden" / "monitor_snapshot_v3.json"
# The same, as format 4 stores it (issue 29: the per-tenant deviation is a one-sided shortfall
# below the other tenants' median, reference draws are independent per tenant, the registry's
# across-tenants reference says what it measures and whom it left out, rows carry the share of
# exportable items and the level signal's reference). Written by this test's builder on the
# branch that introduced format 4.
STORED_V4 = Path(__file__).parent / "golden" / "monitor_snapshot_v4.json"
MONITOR_CONFIG = {
    "min_pairs": 5,
    "tenant_label_cap": 2,
    "fine_step": 0.1,
    "coarse_step": 0.1,
    "reference_draws": 4,
    "bootstrap_resamples": 20,
    "min_subjects": 3,
}


def populate(store: Store, version: str, tau: float) -> None:
    """Three tenants: alpha and beta with 6 subjects of 3 images and 30 labelled decisions
    (one without a candidate, one of another model), gamma with 2 subjects of 2 images and 3
    decisions (not in OPIS, folded into ``other`` by the label cap)."""
    rng = np.random.default_rng(2024)
    for i, (name, subjects, per, n) in enumerate(
        (("alpha", 6, 3, 30), ("beta", 6, 3, 30), ("gamma", 2, 2, 3))
    ):
        at = float(i)
        store.create_tenant(Tenant(name, name, at), ApiKey(f"k-{name}", name, "0" * 64, at))
        x, y = identities(rng, subjects, per, noise=0.9 + 0.3 * i)
        store.add_items(
            name,
            [NewItem(f"i{j}", f"s{k}", x[j]) for j, k in enumerate(y)],
            model_version=version,
            created_at=0.0,
        )
        for d in range(n):
            genuine = d % 2 == 0
            score = float(np.clip(rng.normal(tau + (0.2 if genuine else -0.25), 0.1), -1, 1))
            accepted = score >= tau
            top = None if d == n - 1 else f"s{d % subjects}"
            match = MatchRecord(
                f"m-{name}-{d}",
                name,
                accepted,
                top if accepted else None,
                None if top is None else "i0",
                top,
                None if top is None else score,
                tau,
                "older-model" if d == 1 else version,
                4000.0 + d,
            )
            store.add_match(match)
            if top is None:  # an empty gallery's reject: an outcome, no pair
                label, outcome = None, "true_reject"
            else:
                label, outcome = genuine, decision_outcome(accepted=accepted, genuine=genuine)
            store.add_feedback(
                Feedback(match.match_id, name, None, None, label, outcome, 4500.0 + d)
            )


def assert_same_document(got: Any, want: Any, path: str = "") -> None:
    """The same keys, lists and types all the way down; floats equal up to rounding (another
    BLAS may round a score differently)."""
    assert type(got) is type(want), (path, got, want)
    if isinstance(want, dict):
        assert set(got) == set(want), (path, set(got) ^ set(want))
        for k in want:
            assert_same_document(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_document(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), path
    else:
        assert got == want, path


def stored_variants() -> list[dict[str, Any]]:
    """The stored snapshot, and the same with what else earlier versions stored: a baseline
    reference with a ``note``, a tenant row without ``subjects``, no subjects signal and no
    across-tenants reference."""
    doc = json.loads(STORED_V3.read_text())
    assert "note" not in doc["subjects"]["pooled"]["reference"]  # optional keys left out
    v4 = json.loads(STORED_V4.read_text())
    other = json.loads(STORED_V3.read_text())
    other["tenants"]["alpha"]["subjects"]["reference"] = {
        "lo": 0.01,
        "mid": 0.02,
        "hi": 0.02,
        "matched": False,
        "draws": 0,
        "note": "the artefact keeps no held-out embeddings",
    }
    del other["tenants"]["beta"]["subjects"]
    other["subjects"] = other["tenants_reference"] = None
    return [doc, v4, other]


def test_a_stored_snapshot_round_trips_through_the_model_unchanged(store: Store) -> None:
    """What the previous version stored loads into the model, and the model stores it back
    as it was, key for key (a key left out stays out) and value for value."""
    for doc in stored_variants():
        store.put_monitor_snapshot(doc)
        stored = store.get_monitor_snapshot()
        assert stored == doc
        snap = from_stored(stored)
        assert to_stored(snap) == doc
        # and the model's own stored form round-trips through the store
        store.put_monitor_snapshot(to_stored(snap))
        assert from_stored(store.get_monitor_snapshot()) == snap


def key_paths(doc: Any, prefix: str = "") -> set[str]:
    if not isinstance(doc, dict):
        return set()
    return {p for k, v in doc.items() for p in {f"{prefix}.{k}", *key_paths(v, f"{prefix}.{k}")}}


def test_format_4_only_adds_keys_to_format_3() -> None:
    """Every key format 3 stored is still stored (an older replica reads a newer snapshot;
    replicas never adopt one of another format, the configuration key differs), and the only
    new ones are these."""
    v3, v4 = (json.loads(p.read_text()) for p in (STORED_V3, STORED_V4))
    assert key_paths(v3) - key_paths(v4) == set()
    level = [
        ".draws",
        *(f".{r}{b}" for r in ("frr", "utility") for b in ("", ".lo", ".mid", ".hi")),
    ]
    assert key_paths(v4) - key_paths(v3) == {
        ".tenants_reference.deviation_kind",
        ".tenants_reference.left_out_tenant",
        *(f".tenants.{t}.exportable_ratio" for t in ("alpha", "beta", "gamma")),
        *(f".tenants.{t}.subjects.level_reference" for t in ("alpha", "beta", "gamma")),
        *(
            f".tenants.{t}.subjects.level_reference{k}"
            for t in ("alpha", "beta", "gamma")
            for k in level
        ),
    }
    assert (v3["format"], v4["format"]) == (3, 4) and v3["config_key"] != v4["config_key"]


def test_the_builder_stores_what_the_previous_version_stored(tmp_path: Path, sqlite_stores) -> None:
    """The same data and configuration give the same stored document as the golden one of
    this format (the stored shape is a contract between replicas of different versions)."""
    path = artefact_dir(tmp_path)
    manifest = read_manifest(path)
    store = sqlite_stores()
    populate(store, manifest.model_version, manifest.calibration.tau)
    mon = Monitor(
        store,
        manifest,
        ServiceMetrics(CollectorRegistry(), tenant_label_cap=2),
        MonitorConfig(**MONITOR_CONFIG),
        clock=lambda: 5000.0,
        artefact_path=path,
    )
    snap = mon.refresh(force=True)
    assert snap.tenants_reference is not None and snap.excluded_tenants == ["gamma"]
    got = store.get_monitor_snapshot()
    # the one addition since: each tenant's outcome counts hold wrong_accept (issue 29). The
    # previous version's OutcomeCounts ignores a key it does not know (pydantic's default), and
    # this version reads a document without it as 0 (test above)
    for row in got["tenants"].values():
        assert isinstance(row["outcomes"].pop("wrong_accept"), int)
    assert_same_document(got, json.loads(STORED_V4.read_text()))
