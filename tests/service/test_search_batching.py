"""Search batching: concurrent queries coalesce into one index search per tenant and each gets
exactly the hits a search of its own would give; multi-query match answers each query with its
own match id."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.index import IndexRegistry
from service.engine.search import SearchBatcher
from tests.service.conftest import ADMIN_TOKEN, DIM, STORES, Digits, b64_png, make_settings

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def units(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_concurrent_searches_coalesce_and_equal_single_searches() -> None:
    reg = IndexRegistry(DIM, "Flat")
    for t, seed in (("a", 1), ("b", 2)):
        v = units(500, seed)
        reg.get(t).add(
            np.arange(500) + (0 if t == "a" else 1000),
            [f"{t}{i}" for i in range(500)],
            [f"s{i % 50}" for i in range(500)],
            v,
        )
    queries = units(64, 3)
    batcher = SearchBatcher(reg, max_batch=32)

    async def go() -> list[list[list]]:
        return await asyncio.gather(
            *[
                batcher.search("a" if i % 3 else "b", queries[i : i + 1 + (i % 2)], 1 + i % 7)
                for i in range(60)
            ]
        )

    got = asyncio.run(go())
    for i, hits in enumerate(got):
        want = reg.get("a" if i % 3 else "b").search(queries[i : i + 1 + (i % 2)], 1 + i % 7)
        assert [[(h.item_id, h.score) for h in row] for row in hits] == [
            [(h.item_id, h.score) for h in row] for row in want
        ]
    assert batcher.queries_searched == sum(1 + (i % 2) for i in range(60))
    assert batcher.searches_run < 60 / 2  # coalesced (first query alone, then batches <= 32)
    assert 1 < batcher.largest_batch <= 32


@pytest.fixture(params=STORES)
def client(request: pytest.FixtureRequest, artefact: Path, store_settings) -> Iterator[TestClient]:
    settings = make_settings(artefact, store_settings(request.param), search_max_wait_ms=20.0)
    with TestClient(create_app(settings)) as c:
        yield c


def test_multi_query_match_and_concurrent_matches(client: TestClient, digits: Digits) -> None:
    c = client
    auth = {
        "Authorization": "Bearer "
        + c.post("/v1/tenants", json={"name": "sb"}, headers=ADMIN).json()["api_key"]
    }
    gallery = units(200, 7)
    items = [
        {"subject": f"s{i // 2}", "item_id": f"g{i}", "embedding": v.tolist()}
        for i, v in enumerate(gallery)
    ]
    for lo in range(0, 200, 50):
        assert (
            c.post("/v1/gallery", json={"items": items[lo : lo + 50]}, headers=auth).status_code
            == 201
        )
    q = units(3, 8)
    queries = [
        {"embedding": gallery[5].tolist()},
        {"embedding_b64": base64.b64encode(gallery[17].astype("<f4").tobytes()).decode()},
        {"image": b64_png(digits.images[0])},
        {"embedding": q[0].tolist()},
    ]
    r = c.post("/v1/match/batch", json={"queries": queries, "k": 3}, headers=auth)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 4 and len({x["match_id"] for x in results}) == 4
    assert results[0]["candidates"][0]["item_id"] == "g5" and results[0]["decision"]["accepted"]
    assert results[1]["candidates"][0]["item_id"] == "g17"
    for res, single in zip(
        results,
        [
            {"embedding": gallery[5].tolist()},
            {"embedding": gallery[17].tolist()},
            {"image": b64_png(digits.images[0])},
            {"embedding": q[0].tolist()},
        ],
        strict=True,
    ):
        one = c.post("/v1/match", json={**single, "k": 3}, headers=auth).json()
        assert [x["item_id"] for x in one["candidates"]] == [
            x["item_id"] for x in res["candidates"]
        ]
    # every match id is a stored record: feedback on each is accepted once
    for res in results:
        fb = c.post(
            "/v1/feedback", json={"match_id": res["match_id"], "correct": True}, headers=auth
        )
        assert fb.status_code == 201, fb.text

    bad = c.post(
        "/v1/match/batch", json={"queries": [queries[0], {"embedding": [1.0, 2.0]}]}, headers=auth
    )
    assert bad.status_code == 422 and "queries[1].embedding" in bad.json()["message"]
    many = c.post("/v1/match/batch", json={"queries": [queries[0]] * 65}, headers=auth)
    assert many.status_code == 422 and many.json()["code"] == "too_many_items"

    # concurrent single matches meet in one search (20 ms max wait) and stay correct
    start = threading.Barrier(16)

    def one(i: int) -> str:
        start.wait(timeout=30)
        m = c.post("/v1/match", json={"embedding": gallery[i].tolist(), "k": 1}, headers=auth)
        assert m.status_code == 200, m.text
        return m.json()["candidates"][0]["item_id"]

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(16))) == [f"g{i}" for i in range(16)]
    batcher = c.app.state.runtime.serving.matcher.search
    assert batcher.largest_batch > 1
