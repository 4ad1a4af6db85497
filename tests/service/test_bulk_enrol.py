"""Bulk enrolment: thousands of items a request, embeddings as JSON or base64 float32, bad items
named in the 422, and each request all or nothing, also when the store fails in its middle."""

from __future__ import annotations

import base64
import random
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import StoreUnavailableError
from service.store import NewItem, Tenant
from service.store.redis_store import RedisStore
from tests.service.conftest import ADMIN_TOKEN, DIM, STORES, make_settings
from tests.service.test_redis_down import RedisProcess, free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BULK = 1500


def b64(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()


def units(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(params=STORES)
def client(request: pytest.FixtureRequest, artefact: Path, store_settings) -> Iterator[TestClient]:
    settings = make_settings(
        artefact,
        store_settings(request.param),
        max_enrol_items=BULK,
        max_body_bytes=8 * 1024 * 1024,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def new_tenant(c: TestClient) -> dict[str, str]:
    r = c.post("/v1/tenants", json={"name": "bulk"}, headers=ADMIN)
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def count(c: TestClient, auth: dict[str, str]) -> int:
    n, cursor = 0, None
    while True:
        page = c.get(
            "/v1/gallery",
            params={"limit": 1000, **({"cursor": cursor} if cursor else {})},
            headers=auth,
        ).json()
        n += len(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return n


def test_bulk_enrol_base64_and_json_lists(client: TestClient) -> None:
    c = client
    auth = new_tenant(c)
    vecs = units(BULK)
    items = [
        {"subject": f"s{i // 3}", "item_id": f"b{i}", "embedding_b64": b64(v)}
        for i, v in enumerate(vecs)
    ]
    items[7] = {"subject": "json", "item_id": "b7", "embedding": vecs[7].tolist()}
    r = c.post("/v1/gallery", json={"items": items}, headers=auth)
    assert r.status_code == 201, r.text[:300]
    assert r.json()["item_ids"] == [f"b{i}" for i in range(BULK)]
    assert count(c, auth) == BULK
    # both encodings give the same stored vector and are found by match
    got = c.get("/v1/gallery/b1234", params={"include_embedding": True}, headers=auth).json()
    np.testing.assert_allclose(got["embedding"], vecs[1234], atol=1e-6)
    for i in (7, 1234):
        m = c.post("/v1/match", json={"embedding_b64": b64(vecs[i]), "k": 1}, headers=auth)
        assert m.status_code == 422  # match takes JSON embeddings only: not part of this API
        m = c.post("/v1/match", json={"embedding": vecs[i].tolist(), "k": 1}, headers=auth)
        assert m.json()["candidates"][0]["item_id"] == f"b{i}"


def test_bulk_limits_and_bad_items_are_named(client: TestClient) -> None:
    c = client
    auth = new_tenant(c)
    vecs = units(BULK + 1, seed=1)
    over = [{"subject": "s", "embedding_b64": b64(v)} for v in vecs]
    r = c.post("/v1/gallery", json={"items": over}, headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "too_many_items"
    assert str(BULK) in r.json()["message"]

    good = [
        {"subject": "s", "item_id": f"g{i}", "embedding_b64": b64(v)}
        for i, v in enumerate(vecs[:1000])
    ]
    nan = vecs[0].copy()
    nan[3] = np.nan
    inf = vecs[0].copy()
    inf[0] = np.inf
    cases = {
        "short": base64.b64encode(np.zeros(DIM - 1, "<f4").tobytes()).decode(),
        "long": base64.b64encode(np.ones(DIM + 1, "<f4").tobytes()).decode(),
        "nan": b64(nan),
        "inf": b64(inf),
        "zero": b64(np.zeros(DIM)),
        "not base64": "%%%not-base64%%%",
    }
    for name, text in cases.items():
        items = [dict(it) for it in good]
        items[617]["embedding_b64"] = text
        r = c.post("/v1/gallery", json={"items": items}, headers=auth)
        assert r.status_code == 422, (name, r.text[:200])
        body = r.json()
        if name == "not base64":  # refused by the schema's base64 pattern, the item named
            assert body["code"] == "invalid_input", body
            assert body["detail"][0]["loc"][-3:] == ["items", 617, "embedding_b64"], body
            continue
        assert body["code"] == "invalid_embedding", (name, body)
        assert "items[617].embedding_b64" in body["message"], (name, body)
    assert count(c, auth) == 0  # nothing half-written
    both = [{"subject": "s", "embedding": vecs[0].tolist(), "embedding_b64": b64(vecs[0])}]
    assert c.post("/v1/gallery", json={"items": both}, headers=auth).status_code == 422


# --- a fault in the middle of a request, on a real Redis ----------------------------------------
@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_connection_killed_mid_enrolment_is_all_or_nothing(tmp_path: Path) -> None:
    """The store's connections are killed (CLIENT KILL) while a 4,000-item enrolment is on the
    wire: each request is then wholly there or wholly absent, never a part of it."""
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    admin = redis.Redis(port=server.port)
    store = RedisStore(server.url, prefix=f"bulk:{uuid.uuid4().hex}:", timeout_s=5.0)
    try:
        from service.store import ApiKey

        store.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))
        vecs = units(4000, seed=3, dim=512)
        rng = random.Random(0)
        outcomes: list[tuple[str, int]] = []
        # kills spread over one request's own duration (the 8 MB upload comes first)
        t0 = time.perf_counter()
        store.add_items("t", [NewItem(item_id=f"warm-{i}", subject="w", embedding=v)
                              for i, v in enumerate(vecs)], model_version="v", created_at=1.0)
        duration = time.perf_counter() - t0
        for attempt in range(16):
            batch = [
                NewItem(item_id=f"a{attempt}-{i}", subject=f"s{i % 50}", embedding=v)
                for i, v in enumerate(vecs)
            ]
            result: dict[str, object] = {}

            def enrol(batch: list[NewItem] = batch, result: dict[str, object] = result) -> None:
                try:
                    result["seqs"] = store.add_items("t", batch, model_version="v", created_at=1.0)
                except StoreUnavailableError as exc:
                    result["error"] = exc

            t = threading.Thread(target=enrol)
            t.start()
            time.sleep(rng.uniform(0.0, duration))
            admin.client_kill_filter(_type="normal", skipme=True)
            t.join(30)
            present = sum(
                1 for it in batch if store.get_item("t", it.item_id, model_version="v") is not None
            )
            outcomes.append(("error" if "error" in result else "ok", present))
            assert present in (0, len(batch)), (attempt, result, present)
            if "seqs" in result:
                assert present == len(batch)
        interrupted = [o for o in outcomes if o == ("error", 0)]
        assert interrupted, f"no kill landed mid-request: {outcomes}"
        assert store.count_items("t") == len(vecs) + sum(p for _, p in outcomes)
    finally:
        store.close()
        admin.close()
        server.kill()
