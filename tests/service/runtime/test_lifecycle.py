"""Model lifecycle: registry, hot swap under traffic, rollback, interrupted swaps, replicas,
retention, and the monitor following the served model."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.domain import model_registry as reg
from service.errors import ConflictError, NotFoundError
from service.settings import Settings
from service.store import open_store
from tcm import read_manifest
from tests.service.conftest import (
    ADMIN_TOKEN,
    STORES,
    Digits,
    b64_png,
    make_settings,
    make_version,
    unit,
)
from tests.service.runtime.test_restart import _answers as answers

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FAST = {
    "model_poll_s": 0.1,
    "model_heartbeat_s": 0.2,
    "model_retire_grace_s": 0.5,
    "monitor_interval_s": 3600.0,
}


def wait_for(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def switched(c: TestClient, version: str) -> bool:
    body = c.get("/v1/models", headers=ADMIN).json()
    prog = body["progress"]
    assert prog is None or prog["state"] != "failed", prog
    return body["served"] == version and body["active"] == version


def new_tenant(c: TestClient, name: str) -> dict[str, str]:
    r = c.post("/v1/tenants", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def enrol_digits(c: TestClient, auth: dict[str, str], digits: Digits, idx: range) -> None:
    items = [
        {
            "subject": f"d{int(digits.labels[i])}",
            "image": b64_png(digits.images[i]),
            "item_id": f"img-{i}",
        }
        for i in idx
    ]
    for start in range(0, len(items), 50):
        r = c.post("/v1/gallery", json={"items": items[start : start + 50]}, headers=auth)
        assert r.status_code == 201, r.text


def index_matches_store(c: TestClient, tenant_id: str) -> None:
    """The served index holds exactly the store's embeddings of the served version."""
    rt = c.app.state.runtime
    vectors = rt.store.gallery_vectors(tenant_id, model_version=rt.serving.model_version)
    index = rt.serving.indexes.get(tenant_id)
    assert len(index) == len(vectors)
    if len(vectors):
        got = index._index.reconstruct_batch(vectors.seqs)
        np.testing.assert_array_equal(got, vectors.vectors)


# --- the registry document, pure -------------------------------------------------------------
def test_rollback_steps_back_through_the_history() -> None:
    """Regression: a second rollback toggled back to the model the first one left."""

    def switch(doc: dict, version: str, kind: str) -> dict:
        return reg.commit(
            reg.begin(doc, version, kind=kind, owner="a", now=1.0), version, kind=kind, now=1.0
        )

    doc = reg.empty()
    for v in ("v1", "v2", "v3", "v4"):
        doc["versions"][v] = {"path": v}
    doc = reg.commit(doc, "v1", kind="startup", now=0.0)
    doc = switch(switch(doc, "v2", "activate"), "v3", "activate")
    assert reg.previous(doc) == "v2"
    doc = switch(doc, "v2", "rollback")
    assert reg.previous(doc) == "v1" and reg.retained(doc, 2) == ["v2", "v1"]
    doc = switch(doc, "v1", "rollback")
    assert reg.previous(doc) is None  # the first model: nothing before it
    doc = switch(doc, "v4", "activate")
    assert reg.previous(doc) == "v1"
    # a capped history starts its stack at the oldest entry's `from`
    doc["history"] = doc["history"][-1:]
    assert reg.previous(doc) == "v1"


def test_registry_transitions(artefact: Path, tmp_path: Path) -> None:
    m1 = read_manifest(artefact)
    m2 = read_manifest(make_version(artefact, tmp_path / "v2", "v2", 2))
    doc = reg.register(reg.empty(), m1, artefact, now=1.0)
    doc = reg.commit(doc, m1.model_version, kind="startup", now=1.0)
    assert doc["active"] == m1.model_version and reg.previous(doc) is None
    with pytest.raises(NotFoundError):
        reg.begin(doc, "v2", kind="activate", owner="a", now=2.0)
    doc = reg.register(doc, m2, tmp_path / "v2", now=2.0)
    assert reg.register(doc, m2, tmp_path / "v2", now=3.0) == doc  # idempotent
    with pytest.raises(ConflictError):
        reg.begin(doc, m1.model_version, kind="activate", owner="a", now=2.0)  # already active
    doc = reg.begin(doc, "v2", kind="activate", owner="a", now=2.0)
    with pytest.raises(ConflictError):  # one activation at a time
        reg.begin(doc, "v2", kind="activate", owner="b", now=2.0)
    abandoned = reg.abandon(json.loads(json.dumps(doc)), "v2", error="boom")
    assert abandoned["activation"]["state"] == "failed" and abandoned["active"] == m1.model_version
    doc = reg.commit(doc, "v2", kind="activate", now=3.0, skipped={"t": 1})
    assert doc["active"] == "v2" and doc["activation"] is None
    assert reg.previous(doc) == m1.model_version
    assert reg.retained(doc, 2) == ["v2", m1.model_version] and reg.retained(doc, 1) == ["v2"]
    assert reg.to_purge(doc, 1) == [m1.model_version] and reg.to_purge(doc, 2) == []
    # the same version from another artefact is refused; the same artefact moved is not
    other = make_version(artefact, tmp_path / "other", "v2", 3)
    with pytest.raises(ConflictError):
        reg.register(doc, read_manifest(other), other, now=4.0)
    shutil.copytree(tmp_path / "v2", tmp_path / "moved")
    moved = reg.register(doc, m2, tmp_path / "moved", now=4.0)
    assert moved["versions"]["v2"]["path"] == str((tmp_path / "moved").resolve())


@pytest.mark.parametrize("kind", STORES)
def test_registry_compare_and_set(kind: str, store_settings, artefact: Path) -> None:
    settings = Settings(**{"artefact_path": artefact, **store_settings(kind)})
    store = open_store(settings)
    try:
        assert store.get_model_registry() == (None, 0)
        assert store.put_model_registry({"a": 1}, expected_rev=0)
        assert not store.put_model_registry({"a": 2}, expected_rev=0)  # lost the race
        assert store.get_model_registry() == ({"a": 1}, 1)
        registry = reg.ModelRegistry(store)
        counter = {"n": 0}

        def bump(d: reg.Doc) -> reg.Doc:
            d["n"] = d.get("n", 0) + 1
            counter["n"] += 1
            return d

        threads = [
            threading.Thread(target=lambda: [registry.update(bump) for _ in range(10)])
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert registry.read()["n"] == 40  # no update lost
    finally:
        store.close()


# --- hot swap ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", STORES)
def test_swap_under_traffic_then_rollback(
    kind: str, artefact: Path, store_settings, digits: Digits, tmp_path: Path
) -> None:
    v1 = read_manifest(artefact).model_version
    v2_dir = make_version(artefact, tmp_path / "v2", "digits-test-v2", 7)
    settings = make_settings(artefact, store_settings(kind), embed_max_batch=8, **FAST)
    queries = [{"image": b64_png(digits.images[i]), "k": 5} for i in range(300, 306)]
    with TestClient(create_app(settings)) as c:
        a = new_tenant(c, "a")
        b = new_tenant(c, "b")
        enrol_digits(c, a, digits, range(0, 150))
        enrol_digits(c, b, digits, range(150, 250))
        r = c.post(
            "/v1/gallery",
            headers=b,
            json={"items": [{"subject": "vec", "embedding": unit(1), "item_id": "vec-only"}]},
        )
        assert r.status_code == 201
        tenant_b = c.get("/v1/tenants", headers=ADMIN).json()["tenants"][1]["tenant_id"]
        before = answers(c, a, queries)

        # continuous match traffic from several clients while the swap runs
        stop = threading.Event()
        results: list[list[tuple[float, float, int, str | None]]] = [[] for _ in range(4)]

        def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                q = queries[(n + i) % len(queries)]
                t0 = time.monotonic()
                r = c.post("/v1/match", json=q, headers=a if n % 2 else b)
                results[n].append(
                    (t0, time.monotonic(), r.status_code, r.json().get("model_version"))
                )
                i += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            r = c.post("/v1/models", json={"path": str(v2_dir)}, headers=ADMIN)
            assert r.status_code == 201, r.text
            r = c.post("/v1/models/digits-test-v2/activate", headers=ADMIN)
            assert r.status_code == 202, r.text
            assert (
                c.post("/v1/models/digits-test-v2/activate", headers=ADMIN).json()["code"]
                == "activation_in_progress"
            )
            wait_for(lambda: switched(c, "digits-test-v2"), what="the switch")
            switched_at = time.monotonic()
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        flat = [x for rs in results for x in rs]
        assert len(flat) > 20
        assert [x for x in flat if x[2] != 200] == []  # zero failed requests
        assert all(x[3] == "digits-test-v2" for x in flat if x[0] > switched_at)
        assert any(x[3] == v1 for x in flat)  # traffic was served by v1 during the swap
        for rs in results:  # per client: v1 answers, then v2 answers, never back
            versions = [x[3] for x in rs]
            assert versions == sorted(versions, key=lambda v: v != v1)

        info = c.get("/v1/model").json()
        assert info["model_version"] == "digits-test-v2"
        act = info["activation"]
        assert act["state"] == "done" and act["items_total"] == 251
        assert act["items_embedded"] == 250
        assert act["skipped_by_tenant"] == {tenant_b: 1}
        r = c.get("/v1/models/digits-test-v2/unembedded", headers=ADMIN).json()
        assert r["items"] == {tenant_b: ["vec-only"]}
        for tid in c.app.state.runtime.serving.indexes.sizes():
            index_matches_store(c, tid)
        metrics = c.get("/metrics").text
        assert 'tcm_model_activation_items{state="embedded"} 250.0' in metrics
        assert 'tcm_model_activations_total{result="completed"} 1.0' in metrics
        assert 'model_version="digits-test-v2"' in metrics
        # the monitor follows: its baseline is the new artefact's
        assert c.app.state.monitor.manifest.model_version == "digits-test-v2"
        new_baseline = read_manifest(v2_dir).baseline.opis
        assert (
            f"tcm_opis_baseline {new_baseline!r}" in metrics
            or f"tcm_opis_baseline {new_baseline}" in metrics
        )
        after = answers(c, a, queries)
        assert all(x["model_version"] == "digits-test-v2" for x in after)
        assert [x["candidates"] for x in after] != [x["candidates"] for x in before]

        # rollback: the same switch back; v1's embeddings were kept, answers are identical
        enrol_digits(c, a, digits, range(400, 410))  # enrolled under v2 only
        r = c.post("/v1/models/rollback", headers=ADMIN)
        assert r.status_code == 202, r.text
        assert r.json()["kind"] == "rollback" and r.json()["version"] == v1
        wait_for(lambda: switched(c, v1), what="the rollback")
        assert c.get("/v1/model").json()["activation"]["items_embedded"] == 10
        c.delete("/v1/gallery/" + "img-400", headers=a)
        for i in range(401, 410):
            assert c.delete(f"/v1/gallery/img-{i}", headers=a).status_code == 204
        assert answers(c, a, queries) == before
        body = c.get("/v1/models", headers=ADMIN).json()
        assert [h["kind"] for h in body["history"]] == ["startup", "activate", "rollback"]
        assert body["rollback_to"] is None  # steps back through the history, never toggles
    # a restart keeps what the API activated (the configuration did not change)
    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/model").json()["model_version"] == v1
        assert answers(c, a, queries) == before


def test_admin_errors(artefact: Path, store_settings, tmp_path: Path) -> None:
    settings = make_settings(artefact, store_settings("sqlite"), **FAST)
    with TestClient(create_app(settings)) as c:
        v1 = c.get("/v1/model").json()["model_version"]
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/models", json={"path": str(tmp_path / "nope")}, headers=ADMIN)
        assert r.status_code == 422 and r.json()["code"] == "invalid_artefact"
        r = c.post("/v1/models/nope/activate", headers=ADMIN)
        assert r.status_code == 404 and "stage it first" in r.json()["message"]
        r = c.post(f"/v1/models/{v1}/activate", headers=ADMIN)
        assert r.status_code == 409 and r.json()["code"] == "already_active"
        r = c.post("/v1/models/rollback", headers=ADMIN)
        assert r.status_code == 409 and r.json()["code"] == "no_previous_version"
        other = make_version(artefact, tmp_path / "other", v1, 5)  # same version, other weights
        r = c.post("/v1/models", json={"path": str(other)}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["code"] == "version_conflict"
        body = c.get("/v1/models", headers=ADMIN).json()
        assert [v["model_version"] for v in body["versions"]] == [v1]


# --- interrupted swaps ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", STORES)
def test_interrupted_swap_resumes_after_restart(
    kind: str, artefact: Path, store_settings, digits: Digits, tmp_path: Path
) -> None:
    """A process died mid-activation: the registry says running (heartbeat stopped), half the
    items have the new embedding. The restarted service serves the old model, then takes the
    activation over, finishes it and switches; no index ever held both versions."""
    v1 = read_manifest(artefact).model_version
    v2_dir = make_version(artefact, tmp_path / "v2", "digits-test-v2", 7)
    settings = make_settings(artefact, store_settings(kind), **FAST)
    with TestClient(create_app(settings)) as c:
        a = new_tenant(c, "a")
        enrol_digits(c, a, digits, range(0, 80))
        rt = c.app.state.runtime
        tid = next(iter(rt.serving.indexes.sizes()))
        lifecycle = rt.lifecycle
        c.post("/v1/models", json={"path": str(v2_dir)}, headers=ADMIN)
        # what a crash leaves: the activation begun, 40 items embedded, then silence
        lifecycle.registry.update(
            lambda d: reg.begin(
                d, "digits-test-v2", kind="activate", owner="dead-process", now=time.time()
            )
        )
        v1_vectors = rt.store.gallery_vectors(tid, model_version=v1)
        rt.store.put_embeddings(
            tid,
            dict(zip(v1_vectors.item_ids[:40], -v1_vectors.vectors[:40], strict=True)),
            model_version="digits-test-v2",
        )
    with TestClient(create_app(settings)) as c:
        rt = c.app.state.runtime
        assert rt.serving.model_version == v1  # the old model serves until the switch
        index_matches_store(c, tid)
        wait_for(lambda: switched(c, "digits-test-v2"), what="the resumed switch")
        prog = c.get("/v1/model").json()["activation"]
        assert prog["items_embedded"] == 40  # only what the dead process had not done
        index_matches_store(c, tid)
        doc = c.get("/v1/models", headers=ADMIN).json()
        assert doc["activation"] is None and doc["history"][-1]["version"] == "digits-test-v2"


def test_interrupted_swap_to_a_lost_artefact_is_abandoned(
    artefact: Path, store_settings, digits: Digits, tmp_path: Path
) -> None:
    v1 = read_manifest(artefact).model_version
    v2_dir = make_version(artefact, tmp_path / "v2", "digits-test-v2", 7)
    settings = make_settings(artefact, store_settings("sqlite"), **FAST)
    with TestClient(create_app(settings)) as c:
        a = new_tenant(c, "a")
        enrol_digits(c, a, digits, range(0, 20))
        c.post("/v1/models", json={"path": str(v2_dir)}, headers=ADMIN)
        c.app.state.runtime.lifecycle.registry.update(
            lambda d: reg.begin(
                d, "digits-test-v2", kind="activate", owner="dead-process", now=time.time()
            )
        )
        before = answers(c, a, [{"embedding": unit(3), "k": 3}])
    shutil.rmtree(v2_dir)
    with TestClient(create_app(settings)) as c:
        doc = wait_for(
            lambda: (lambda d: d if d["activation"]["state"] == "failed" else None)(
                c.get("/v1/models", headers=ADMIN).json()
            ),
            what="the abandoned activation",
        )
        assert doc["active"] == v1 and doc["served"] == v1
        assert "manifest.json" in doc["activation"]["error"]
        assert answers(c, a, [{"embedding": unit(3), "k": 3}]) == before
        tid = next(iter(c.app.state.runtime.serving.indexes.sizes()))
        index_matches_store(c, tid)
        # a failed activation does not block the next one
        assert c.post("/v1/models/rollback", headers=ADMIN).json()["code"] == "no_previous_version"


# --- replicas and retention -----------------------------------------------------------------
@pytest.mark.redis
def test_replica_follows_the_registry(
    artefact: Path, store_settings, digits: Digits, tmp_path: Path
) -> None:
    v2_dir = make_version(artefact, tmp_path / "v2", "digits-test-v2", 7)
    store = store_settings("redis")
    settings = make_settings(artefact, store, **FAST)
    with TestClient(create_app(settings)) as c1, TestClient(create_app(settings)) as c2:
        a = new_tenant(c1, "a")
        enrol_digits(c1, a, digits, range(0, 60))
        wait_for(
            lambda: sum(c2.app.state.runtime.serving.indexes.sizes().values()) == 60,
            what="replica 2 to see the enrolment",
        )
        c1.post("/v1/models", json={"path": str(v2_dir)}, headers=ADMIN)
        assert c1.post("/v1/models/digits-test-v2/activate", headers=ADMIN).status_code == 202
        wait_for(lambda: switched(c1, "digits-test-v2"), what="replica 1 to switch")
        wait_for(
            lambda: c2.get("/v1/model").json()["model_version"] == "digits-test-v2",
            what="replica 2 to follow",
        )
        # replica 2 re-embedded nothing: replica 1 had stored the embeddings already
        assert c2.get("/v1/model").json()["activation"]["items_embedded"] == 0
        # an item enrolled on one replica is found with the new model on the other
        enrol_digits(c2, a, digits, range(500, 501))
        tid = next(iter(c1.app.state.runtime.serving.indexes.sizes()))
        wait_for(
            lambda: len(c1.app.state.runtime.serving.indexes.get(tid)) == 61,
            what="replica 1 to index the new item",
        )
        q = [{"image": b64_png(digits.images[500]), "k": 1}]
        assert answers(c1, a, q) == answers(c2, a, q)
        assert answers(c1, a, q)[0]["candidates"][0]["item_id"] == "img-500"
        index_matches_store(c1, tid)
        index_matches_store(c2, tid)


def test_retention_drops_old_embeddings(
    artefact: Path, store_settings, digits: Digits, tmp_path: Path
) -> None:
    v1 = read_manifest(artefact).model_version
    dirs = {
        v: make_version(artefact, tmp_path / v, v, s)
        for v, s in (("digits-test-v2", 7), ("digits-test-v3", 8))
    }
    settings = make_settings(artefact, store_settings("sqlite"), model_retain_versions=2, **FAST)
    with TestClient(create_app(settings)) as c:
        a = new_tenant(c, "a")
        enrol_digits(c, a, digits, range(0, 30))
        rt = c.app.state.runtime
        tid = next(iter(rt.serving.indexes.sizes()))
        for version, path in dirs.items():
            c.post("/v1/models", json={"path": str(path)}, headers=ADMIN)
            assert c.post(f"/v1/models/{version}/activate", headers=ADMIN).status_code == 202
            wait_for(lambda v=version: switched(c, v), what=f"the switch to {version}")
        wait_for(lambda: v1 in rt.lifecycle.registry.read()["purged"], what="the purge")
        store = rt.store
        assert len(store.gallery_vectors(tid, model_version=v1)) == 0
        assert len(store.gallery_vectors(tid, model_version="digits-test-v2")) == 30
        assert len(store.gallery_vectors(tid, model_version="digits-test-v3")) == 30
        # a rollback to a purged version re-embeds from the stored images
        body = c.get("/v1/models", headers=ADMIN).json()
        assert {v["model_version"]: v["embeddings_purged"] for v in body["versions"]}[v1]
        assert c.post(f"/v1/models/{v1}/activate", headers=ADMIN).status_code == 202
        wait_for(lambda: switched(c, v1), what="the switch back to v1")
        assert c.get("/v1/model").json()["activation"]["items_embedded"] == 30
        index_matches_store(c, tid)
