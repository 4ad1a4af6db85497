"""``POST /v1/gallery/columns`` (issue 30): bulk enrolment as columns, the vectors as one
base64 float32 matrix, on both stores. It stores what the item form stores for the same items
(bit for bit), and refuses what the item form refuses, with the same limits: dimension (a
matrix of the wrong size names its bytes), NaN/inf/zero rows (named by row), item count, body
size, repeated or existing ids (all or none), metadata; columns of unequal lengths are a 422
``column_lengths``. An ``Idempotency-Key`` makes a resend a replay."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np

from service.engine.metadata_filter import MAX_METADATA_KEYS
from tests.service.conftest import DIM, Api, Tenant


def matrix(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def b64(rows: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(rows, dtype="<f4").tobytes()).decode()


def post(api: Api, tenant: Tenant, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {**tenant.auth, **({"Idempotency-Key": key} if key else {})}
    return api.client.post("/v1/gallery/columns", json=body, headers=headers)


def count(api: Api, tenant: Tenant) -> int:
    r = api.client.get("/v1/gallery?limit=500", headers=tenant.auth)
    return len(r.json()["items"])


def stored(api: Api, tenant: Tenant, item_id: str) -> dict[str, Any]:
    r = api.client.get(f"/v1/gallery/{item_id}?include_embedding=true", headers=tenant.auth)
    assert r.status_code == 200, r.text
    return r.json()


def test_columns_store_what_items_store(api: Api, tenant: Tenant) -> None:
    rows = matrix(5) * 3.0  # not unit: the service normalises both forms alike
    ids = [f"c{i}" for i in range(5)]
    meta = [{"cam": i % 2, "tag": f"t{i}"} for i in range(5)]
    body = {
        "subjects": [f"s{i % 2}" for i in range(5)],
        "embeddings_b64": b64(rows),
        "item_ids": ids,
        "metadata": meta,
    }
    r = post(api, tenant, body)
    assert r.status_code == 201, r.text
    assert r.json()["item_ids"] == ids
    items = [
        {"subject": f"s{i % 2}", "embedding_b64": b64(rows[i]), "item_id": f"i{i}"}
        for i in range(5)
    ]
    assert api.enrol(tenant, items) == [f"i{i}" for i in range(5)]
    for i in range(5):
        col, item = stored(api, tenant, f"c{i}"), stored(api, tenant, f"i{i}")
        assert col["embedding"] == item["embedding"]  # the same float32 values, bit for bit
        assert col["subject"] == f"s{i % 2}" and col["metadata"] == meta[i]
    np.testing.assert_allclose(np.linalg.norm(stored(api, tenant, "c0")["embedding"]), 1, 1e-6)
    # matchable like any item, and filterable by its metadata
    q = (rows[3] / np.linalg.norm(rows[3])).tolist()
    hit = api.client.post(
        "/v1/match", json={"embedding": q, "k": 1, "filter": {"cam": 1}}, headers=tenant.auth
    ).json()
    assert hit["candidates"][0]["item_id"] in {"c3", "i3"}


def test_ids_are_generated_and_metadata_optional(api: Api, tenant: Tenant) -> None:
    r = post(api, tenant, {"subjects": ["a", "b", "a"], "embeddings_b64": b64(matrix(3, 1))})
    assert r.status_code == 201, r.text
    ids = r.json()["item_ids"]
    assert len(set(ids)) == 3
    assert [stored(api, tenant, i)["subject"] for i in ids] == ["a", "b", "a"]
    assert stored(api, tenant, ids[0])["metadata"] == {}


def test_a_matrix_of_the_wrong_size_is_refused_naming_its_bytes(api: Api, tenant: Tenant) -> None:
    body = {"subjects": ["a", "b", "c"], "embeddings_b64": b64(matrix(2))}
    r = post(api, tenant, body)
    assert r.status_code == 422 and r.json()["code"] == "column_lengths", r.text
    detail = r.json()["detail"]
    assert detail["expected_bytes"] == 3 * DIM * 4 and detail["got_bytes"] == 2 * DIM * 4
    assert "3 rows" in r.json()["message"]
    # a row of another dimension: the bytes do not add up either
    short = np.random.default_rng(0).standard_normal((2, DIM - 1)).astype("<f4")
    r = post(api, tenant, {"subjects": ["a", "b"], "embeddings_b64": b64(short)})
    assert r.status_code == 422 and r.json()["code"] == "column_lengths"
    assert count(api, tenant) == 0


def test_bad_rows_are_refused_by_row_and_nothing_is_written(api: Api, tenant: Tenant) -> None:
    for bad in (np.nan, np.inf, 0.0):
        rows = matrix(4)
        rows[2] = bad
        r = post(api, tenant, {"subjects": ["a"] * 4, "embeddings_b64": b64(rows)})
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "invalid_embedding"
        assert "embeddings_b64[2]" in r.json()["message"], r.json()["message"]
    r = post(api, tenant, {"subjects": ["a"], "embeddings_b64": "not base64!"})
    assert r.status_code == 422
    assert count(api, tenant) == 0


def test_columns_of_unequal_lengths(api: Api, tenant: Tenant) -> None:
    base = {"subjects": ["a", "b"], "embeddings_b64": b64(matrix(2))}
    for extra in ({"item_ids": ["x"]}, {"metadata": [{}, {}, {}]}):
        r = post(api, tenant, {**base, **extra})
        assert r.status_code == 422 and r.json()["code"] == "column_lengths", r.text
        assert r.json()["detail"]["items"] == 2
    too_many_keys = {f"k{i}": i for i in range(MAX_METADATA_KEYS + 1)}
    r = post(api, tenant, {**base, "metadata": [{}, too_many_keys]})
    assert r.status_code == 422 and "metadata[1]: " in r.text, r.text
    r = post(api, tenant, {**base, "subjects": ["a", "b/c"]})  # the subject rule of items
    assert r.status_code == 422
    assert count(api, tenant) == 0


def test_limits_and_ids_are_the_item_forms(api: Api, tenant: Tenant) -> None:
    limit = api.settings.max_enrol_items
    over = {"subjects": ["a"] * (limit + 1), "embeddings_b64": b64(matrix(limit + 1))}
    r = post(api, tenant, over)
    assert r.status_code == 422 and r.json()["code"] == "too_many_items", r.text
    big = "A" * (api.settings.max_body_bytes + 4)  # over the body limit: refused unread
    assert post(api, tenant, {"subjects": ["a"], "embeddings_b64": big}).status_code == 413
    twice = {"subjects": ["a", "b"], "embeddings_b64": b64(matrix(2)), "item_ids": ["x", "x"]}
    r = post(api, tenant, twice)
    assert r.status_code == 409 and r.json()["detail"]["item_ids"] == ["x"]
    assert post(api, tenant, {**twice, "item_ids": ["x", "y"]}).status_code == 201
    again = {"subjects": ["a", "b"], "embeddings_b64": b64(matrix(2, 5)), "item_ids": ["z", "y"]}
    r = post(api, tenant, again)  # y exists: all or none
    assert r.status_code == 409 and r.json()["detail"]["item_ids"] == ["y"], r.text
    assert count(api, tenant) == 2


def test_an_idempotency_key_makes_a_resend_a_replay(api: Api, tenant: Tenant) -> None:
    body = {"subjects": ["a", "b"], "embeddings_b64": b64(matrix(2, 7))}  # server ids
    first = post(api, tenant, body, key="cols-1")
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = post(api, tenant, body, key="cols-1")
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["item_ids"] == first.json()["item_ids"]
    assert count(api, tenant) == 2
    other = post(api, tenant, {**body, "subjects": ["a", "c"]}, key="cols-1")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
