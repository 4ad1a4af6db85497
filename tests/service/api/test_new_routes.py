"""The routes users look for, on both stores: subjects with counts (paged), PUT upsert
(idempotent), match and verify filtered by metadata (inside the index search, equal to a
brute-force filter), X-Request-ID (accepted, generated, echoed, logged), Allow on 405."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.metadata_filter import canonical, matches
from tests.service.conftest import ADMIN_TOKEN, DIM, Api, Tenant, make_settings, unit

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _vec(seed: int) -> np.ndarray:
    return np.asarray(unit(seed), np.float32)


def test_filtered_match_equals_brute_force(api: Api, tenant: Tenant) -> None:
    c, h = api.client, tenant.auth
    n = 60
    metas = [
        {
            "colour": ["red", "blue", "green"][i % 3],
            "n": i % 4,
            "even": i % 2 == 0,
            "f": 1.0 if i % 5 == 0 else 1,
        }
        for i in range(n)
    ]
    api.enrol(
        tenant,
        [
            {
                "subject": f"s{i % 7}",
                "embedding": unit(i),
                "item_id": f"it{i}",
                "metadata": metas[i],
            }
            for i in range(n)
        ],
    )
    vectors = np.stack([_vec(i) for i in range(n)])
    filters = [
        {"colour": "red"},
        {"colour": "blue", "n": 1},
        {"even": True, "n": 2},
        {"n": 1.0},
        {"even": 1},
        {"f": 1},
        {"colour": "nope"},
        {"missing": None},
    ]
    for where in filters:
        for q in (3, 11, 1000):
            k = 5
            r = c.post("/v1/match", json={"embedding": unit(q), "k": k, "filter": where}, headers=h)
            assert r.status_code == 200, r.text
            got = [x["item_id"] for x in r.json()["candidates"]]
            allowed = [i for i in range(n) if matches(metas[i], where)]
            scores = vectors[allowed] @ _vec(q)
            expected = [f"it{allowed[j]}" for j in np.argsort(-scores, kind="stable")[:k]]
            assert got == expected, (where, got, expected)
            # k results still come back when k items match (the filter is not a post-filter)
            assert len(got) == min(k, len(allowed))
    # JSON equality: true is not 1, 1 is 1.0
    assert canonical(True) != canonical(1) and canonical(1) == canonical(1.0)


def test_filtered_verify(api: Api, tenant: Tenant) -> None:
    c, h = api.client, tenant.auth
    api.enrol(
        tenant,
        [
            {"subject": "p", "embedding": unit(1), "item_id": "p1", "metadata": {"cam": "a"}},
            {"subject": "p", "embedding": unit(2), "item_id": "p2", "metadata": {"cam": "b"}},
        ],
    )
    body = {"a": {"subject": "p"}, "b": {"embedding": unit(2)}}
    best = c.post("/v1/verify", json=body, headers=h).json()["score"]
    only_a = c.post("/v1/verify", json=body | {"filter": {"cam": "a"}}, headers=h).json()
    assert best == pytest.approx(1.0, abs=1e-5)
    assert only_a["score"] == pytest.approx(float(_vec(1) @ _vec(2)), abs=1e-5)
    r = c.post(
        "/v1/verify",
        json={"a": {"item_id": "p2"}, "b": {"embedding": unit(2)}, "filter": {"cam": "a"}},
        headers=h,
    )
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = c.post("/v1/verify", json=body | {"filter": {"cam": "z"}}, headers=h)
    assert r.status_code == 404


def test_put_upserts_idempotently(api: Api, tenant: Tenant) -> None:
    c, h = api.client, tenant.auth
    body = {"subject": "x", "embedding": unit(5), "metadata": {"v": 1}}
    r = c.put("/v1/gallery/up1", json=body, headers=h)
    assert r.status_code == 201 and r.json() == {"item_id": "up1", "created": True}
    first = c.get("/v1/gallery/up1", headers=h).json()
    for _ in range(2):  # the same request again: the same item
        r = c.put("/v1/gallery/up1", json=body, headers=h)
        assert r.status_code == 200 and r.json()["created"] is False
        assert c.get("/v1/gallery/up1", headers=h).json() == first
    # replacing moves it: new subject, vector and metadata, in the store and the index
    r = c.put(
        "/v1/gallery/up1",
        json={"subject": "y", "embedding": unit(6), "metadata": {"v": 2}},
        headers=h,
    )
    assert r.status_code == 200
    item = c.get("/v1/gallery/up1", headers=h).json()
    assert (item["subject"], item["metadata"], item["created_at"]) == (
        "y",
        {"v": 2},
        first["created_at"],
    )
    m = c.post("/v1/match", json={"embedding": unit(6), "k": 10}, headers=h).json()
    assert [x["item_id"] for x in m["candidates"]] == ["up1"]
    assert m["candidates"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert (
        c.post("/v1/match", json={"embedding": unit(6), "filter": {"v": 1}}, headers=h).json()[
            "candidates"
        ]
        == []
    )
    listing = c.get("/v1/gallery", headers=h).json()["items"]
    assert [i["item_id"] for i in listing] == ["up1"]
    r = c.put("/v1/gallery/up1", json={"subject": "y"}, headers=h)
    assert r.status_code == 422
    r = c.put("/v1/gallery/up1", json={"subject": "y", "embedding": [0.0] * DIM}, headers=h)
    assert r.status_code == 422


def test_subjects_with_counts_paged(api: Api, tenant: Tenant) -> None:
    c, h = api.client, tenant.auth
    counts = {"b": 2, "a": 1, "e.x@y": 3, "c_d": 1, "Z": 2}
    items = [
        {"subject": s, "embedding": unit(i * 10 + j)}
        for i, (s, n) in enumerate(counts.items())
        for j in range(n)
    ]
    api.enrol(tenant, items)
    seen: list[tuple[str, int]] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        r = c.get("/v1/subjects", params=params, headers=h)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["subjects"]) <= 2
        seen += [(s["subject"], s["items"]) for s in page["subjects"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(counts.items())  # code-point order, every subject once
    # deleting items updates the counts; an emptied subject disappears
    ids = [
        i["item_id"]
        for i in c.get("/v1/gallery", params={"subject": "a"}, headers=h).json()["items"]
    ]
    assert c.delete(f"/v1/gallery/{ids[0]}", headers=h).status_code == 204
    assert c.delete("/v1/subjects/b", headers=h).json() == {"deleted": 2}
    names = [s["subject"] for s in c.get("/v1/subjects", headers=h).json()["subjects"]]
    assert names == sorted(set(counts) - {"a", "b"})
    assert c.get("/v1/subjects", params={"cursor": "zz"}, headers=h).status_code == 422
    assert c.get("/v1/subjects", params={"cursor": "ff"}, headers=h).status_code == 200


def test_request_id_echoed_generated_logged(
    api: Api, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    c, h = api.client, tenant.auth
    caplog.set_level(logging.INFO, logger="service.requests")
    r = c.get("/v1/gallery", headers=h | {"X-Request-ID": "ticket-42.a:b"})
    assert r.headers["x-request-id"] == "ticket-42.a:b"
    assert any("request_id=ticket-42.a:b" in rec.getMessage() for rec in caplog.records)
    generated = c.get("/healthz").headers["x-request-id"]
    other = c.get("/v1/gallery/nope", headers=h).headers["x-request-id"]
    assert len(generated) == 32 and generated != other
    for bad in ("two words", "x" * 129, "a\tb"):
        r = c.get("/v1/gallery", headers=h | {"X-Request-ID": bad})
        assert r.status_code == 400 and r.json()["code"] == "invalid_request_id"
        assert r.headers["x-request-id"] != bad


def test_every_operation_documents_the_request_id_400(api: Api) -> None:
    """Every route validates X-Request-ID, so every operation's contract lists 400 (a route
    added without it, e.g. POST /v1/monitor/reference once, fails schemathesis' ST103)."""
    doc = api.client.get("/openapi.json").json()
    missing = [
        f"{method.upper()} {path}"
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if "400" not in op.get("responses", {})
    ]
    assert missing == []


def test_405_allows_every_method_of_the_path(api: Api, tenant: Tenant) -> None:
    c, h = api.client, tenant.auth
    r = c.patch("/v1/gallery/x", headers=h)
    assert r.status_code == 405
    assert r.headers["allow"] == "DELETE, GET, PUT"
    assert c.post("/v1/gallery/x", headers=h).headers["allow"] == "DELETE, GET, PUT"
    assert c.delete("/v1/gallery", headers=h).headers["allow"] == "GET, POST"
    assert c.put("/v1/tenants/abc/keys", headers=h).headers["allow"] == "GET, POST"
    # a literal path answers with its own methods, not those of a template it also fits
    assert c.options("/v1/gallery/upload", headers=h).headers["allow"] == "POST"


def test_cursor_pattern_is_exactly_what_parse_cursor_accepts() -> None:
    """The schema's cursor pattern states the domain check (ASCII digits, <= 2**63 - 1)."""
    import random
    import re

    from service.api.schemas import CURSOR_PATTERN
    from service.domain.gallery import parse_cursor
    from service.errors import InvalidInputError

    def accepted(c: str) -> bool:
        try:
            parse_cursor(c)
        except InvalidInputError:
            return False
        return True

    rng = random.Random(0)
    edge = [
        "0",
        "9223372036854775807",
        "9223372036854775808",
        "9" * 19,
        "0" * 18 + "1",
        "0" * 20,
        "",
        "²",
        "-1",
        "1" * 19,
        "9223372036854775799",
    ]
    numbers = [str(rng.randint(0, 10**19 + 10)) for _ in range(5000)]
    for c in edge + numbers + [n.zfill(19) for n in numbers]:
        assert bool(re.match(CURSOR_PATTERN, c)) == accepted(c), c


@pytest.mark.redis
def test_filters_and_put_follow_the_change_feed_on_another_replica(
    artefact: Path, store_settings: Any
) -> None:
    """Metadata reaches the other replica's index with the vectors (change feed), and a PUT
    there replaces the item, so filtered matches agree on both replicas."""
    settings = make_settings(artefact, store_settings("redis"), monitor_enabled=False)
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        created = one.post("/v1/tenants", json={"name": "r"}, headers=ADMIN).json()
        h = {"Authorization": f"Bearer {created['api_key']}"}
        two.get("/v1/gallery", headers=h)  # the second replica follows from here
        items = [
            {"subject": "s", "embedding": unit(i), "item_id": f"r{i}", "metadata": {"zone": i % 2}}
            for i in range(6)
        ]
        assert one.post("/v1/gallery", json={"items": items}, headers=h).status_code == 201
        assert (
            one.put(
                "/v1/gallery/r1",
                json={"subject": "s", "embedding": unit(1), "metadata": {"zone": 0}},
                headers=h,
            ).status_code
            == 200
        )
        body = {"embedding": unit(1), "k": 10, "filter": {"zone": 0}}
        want = sorted(["r0", "r1", "r2", "r4"])
        deadline = time.monotonic() + 10
        while True:
            got = sorted(
                c["item_id"]
                for c in two.post("/v1/match", json=body, headers=h).json()["candidates"]
            )
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got == want
        mine = one.post("/v1/match", json=body, headers=h).json()["candidates"]
        assert sorted(c["item_id"] for c in mine) == want
