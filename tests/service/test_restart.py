"""A new app on the same store rebuilds its indexes and answers as the old one did."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from tcm import build_embedder, read_manifest, save_artefact
from tests.service.conftest import ADMIN_TOKEN, DIM, STORES, Digits, b64_png, make_settings, unit

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _answers(c: TestClient, auth: dict, queries: list[dict]) -> list[dict]:
    out = []
    for q in queries:
        r = c.post("/v1/match", json=q, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        body.pop("match_id")
        out.append(body)
    return out


@pytest.mark.parametrize("kind", STORES)
def test_restart_rebuilds_indexes(kind: str, artefact: Path, store_settings, digits: Digits
                                  ) -> None:
    settings = make_settings(artefact, store_settings(kind))
    queries = ([{"embedding": unit(i), "k": 4} for i in range(5)]
               + [{"image": b64_png(digits.images[i]), "k": 4} for i in range(40, 44)])
    with TestClient(create_app(settings)) as c:
        tenants = []
        for t in range(3):
            r = c.post("/v1/tenants", json={"name": f"t{t}"}, headers=ADMIN).json()
            auth = {"Authorization": f"Bearer {r['api_key']}"}
            items = [{"subject": f"s{i % 3}", "embedding": unit(i + 10 * t)} for i in range(8)]
            items += [{"subject": f"d{i}", "image": b64_png(digits.images[40 + i])}
                      for i in range(4)]
            assert c.post("/v1/gallery", json={"items": items}, headers=auth).status_code == 201
            tenants.append(auth)
        # some deletes, which the rebuilt index must not resurrect
        first = c.get("/v1/gallery", params={"limit": 1}, headers=tenants[0]).json()
        c.delete(f"/v1/gallery/{first['items'][0]['item_id']}", headers=tenants[0])
        c.delete("/v1/subjects/s2", headers=tenants[1])
        before = [_answers(c, auth, queries) for auth in tenants]
        sizes_before = c.app.state.runtime.serving.indexes.sizes()
    with TestClient(create_app(settings)) as c:
        assert c.app.state.runtime.serving.indexes.sizes() == sizes_before
        after = [_answers(c, auth, queries) for auth in tenants]
        assert c.get("/readyz").status_code == 200
    assert after == before


@pytest.mark.parametrize("kind", STORES)
def test_new_model_version_reembeds_stored_images(kind: str, artefact: Path, store_settings,
                                                  digits: Digits, tmp_path: Path) -> None:
    """Items enrolled from images are re-embedded by a new model; embedding-only items cannot
    be and are left out of its index (but stay listed)."""
    store = store_settings(kind)
    v2 = tmp_path / "v2"
    shutil.copytree(artefact, v2)
    manifest = json.loads((v2 / "manifest.json").read_text())
    manifest["model_version"] = "digits-test-v2"
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    torch.manual_seed(123)
    save_artefact(v2, build_embedder("small_cnn", in_channels=1, embedding_dim=DIM, width=16),
                  read_manifest(v2))
    with TestClient(create_app(make_settings(artefact, store))) as c:
        r = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()
        auth = {"Authorization": f"Bearer {r['api_key']}"}
        c.post("/v1/gallery", headers=auth, json={"items": [
            {"subject": "img", "image": b64_png(digits.images[7]), "item_id": "img"},
            {"subject": "vec", "embedding": unit(1), "item_id": "vec"}]})
    with TestClient(create_app(make_settings(v2, store))) as c:
        runtime = c.app.state.runtime
        assert runtime.serving.model_version == "digits-test-v2" and runtime.sync.skipped_items == 1
        m = c.post("/v1/match", json={"image": b64_png(digits.images[7]), "k": 5},
                   headers=auth).json()
        assert m["model_version"] == "digits-test-v2"
        assert [x["item_id"] for x in m["candidates"]] == ["img"]
        assert m["candidates"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        listed = c.get("/v1/gallery", headers=auth).json()["items"]
        assert [x["item_id"] for x in listed] == ["img", "vec"]
        r = c.post("/v1/verify", json={"a": {"item_id": "vec"}, "b": {"item_id": "img"}},
                   headers=auth)
        assert r.status_code == 409 and r.json()["code"] == "not_embedded"
    # the old model still finds both: its embeddings were kept
    with TestClient(create_app(make_settings(artefact, store))) as c:
        m = c.post("/v1/match", json={"embedding": unit(1), "k": 5}, headers=auth).json()
        assert sorted(x["item_id"] for x in m["candidates"]) == ["img", "vec"]


def test_sqlite_locked_is_503_then_recovers(artefact: Path, store_settings) -> None:
    """A SQLite file another process holds the write lock on answers 503, then recovers."""
    store = store_settings("sqlite")
    settings = make_settings(artefact, store, store_timeout_s=0.3)
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()
        auth = {"Authorization": f"Bearer {r['api_key']}"}
        blocker = sqlite3.connect(store["store_url"].removeprefix("sqlite:///"),
                                  isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            r = c.post("/v1/gallery", json={"items": [{"subject": "s", "embedding": unit(1)}]},
                       headers=auth)
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "store_unavailable"
            assert "locked" in r.json()["message"]
            assert time.monotonic() - started < 5
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        r = c.post("/v1/gallery", json={"items": [{"subject": "s", "embedding": unit(1)}]},
                   headers=auth)
        assert r.status_code == 201
        assert "tcm_store_errors_total 1.0" in c.get("/metrics").text
