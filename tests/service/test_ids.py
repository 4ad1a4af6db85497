"""Ids at the API boundary and where they meet Redis keys and globs.

Regression (issue 15): ``DELETE /v1/tenants/*`` on the Redis store deleted every tenant's
gallery: the tenant id from the URL went unescaped into the sweep's ``SCAN MATCH`` pattern, and
the sweep ran even for a tenant that did not exist. Now every id the API takes must match
``service.ids.ID_PATTERN`` (422 otherwise), the store escapes ids in keys and globs on its own,
and it sweeps nothing for a tenant it did not find.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.ids import ID_PATTERN, ID_RULE, glob_escape, key_part
from service.store import ApiKey, NewItem, Tenant
from service.store.redis_store import RedisStore
from tests.service.conftest import REDIS_URL, Api, b64_png, unit

GLOBS = ["*", "?", "[", "]", "\\", "[a-z]*", "?*", "*:*", "\\*", "a[", "]a"]


def _keys(prefix: str) -> set[bytes]:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        return set(r.scan_iter(match=glob_escape(prefix) + "*", count=1000))
    finally:
        r.close()


def _populate(api: Api) -> list:
    tenants = [api.new_tenant() for _ in range(2)]
    for i, t in enumerate(tenants):
        api.enrol(t, [{"subject": f"s{j}", "embedding": unit(10 * i + j)} for j in range(3)])
        r = api.client.post("/v1/match", json={"embedding": unit(10 * i)}, headers=t.auth)
        assert r.status_code == 200
    return tenants


BAD_IDS = [*GLOBS, "..", ".", " a", "a ", "a\tb", "a\nb", "x" * 129, "é", "a%3Ab", "a:b"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_tenant_routes_refuse_ids_outside_the_pattern(api: Api, bad: str) -> None:
    """The ``*`` tenant and every other glob or separator: 422 with the rule, nothing deleted
    (on Redis: not one key of any tenant)."""
    tenants = _populate(api)
    prefix = api.settings.redis_key_prefix if api.settings.store_url.startswith("redis") else None
    before = _keys(prefix) if prefix else None
    from urllib.parse import quote

    for method in ("DELETE", "GET"):
        r = api.client.request(method, f"/v1/tenants/{quote(bad, safe='')}", headers=api.admin)
        # "." and ".." are resolved by the HTTP client into another path: never a delete
        if bad in (".", ".."):
            assert r.status_code in (404, 405, 200), r.text
            continue
        assert r.status_code == 422, (bad, r.status_code, r.text)
        body = r.json()
        assert body["code"] == "invalid_input"
        assert body["detail"][0]["loc"] == ["path", "tenant_id"]
        # the rule in words (which characters), then the pattern; the message names the field
        msg = body["detail"][0]["msg"]
        assert body["message"].startswith("the request does not match the schema: path.tenant_id")
        if len(bad) > 128:
            assert "at most 128 characters" in msg and msg in body["message"]
        else:
            assert ID_RULE in msg and ID_PATTERN in msg and msg in body["message"]
    if prefix:
        assert _keys(prefix) == before
    for t in tenants:
        page = api.client.get("/v1/gallery", headers=t.auth).json()
        assert len(page["items"]) == 3


def test_every_id_the_api_takes_is_checked(api: Api) -> None:
    t = api.new_tenant()
    api.enrol(t, [{"subject": "s", "embedding": unit(1), "item_id": "i1"}])
    c, h = api.client, t.auth
    bad = "a*"
    checks = [
        c.get(f"/v1/gallery/{bad}", headers=h),
        c.delete(f"/v1/gallery/{bad}", headers=h),
        c.delete(f"/v1/subjects/{bad}", headers=h),
        c.get("/v1/gallery", params={"subject": bad}, headers=h),
        c.post("/v1/gallery", json={"items": [{"subject": bad, "embedding": unit(1)}]}, headers=h),
        c.post(
            "/v1/gallery",
            json={"items": [{"subject": "s", "item_id": bad, "embedding": unit(1)}]},
            headers=h,
        ),
        c.post(
            "/v1/gallery/upload",
            files={"file": ("x.png", b"png")},
            data={"subject": bad},
            headers=h,
        ),
        c.post("/v1/verify", json={"a": {"subject": bad}, "b": {"item_id": "i1"}}, headers=h),
        c.post("/v1/verify", json={"a": {"item_id": bad}, "b": {"item_id": "i1"}}, headers=h),
        c.post("/v1/feedback", json={"match_id": bad, "correct": True}, headers=h),
        c.post("/v1/feedback", json={"match_id": "m1", "true_subject": bad}, headers=h),
        c.post(f"/v1/tenants/{bad}/keys", headers=api.admin),
        c.get(f"/v1/tenants/{bad}/keys", headers=api.admin),
        c.delete(f"/v1/tenants/{t.tenant_id}/keys/{bad}", headers=api.admin),
        c.post(f"/v1/models/{bad}/activate", headers=api.admin),
        c.get(f"/v1/models/{bad}/unembedded", headers=api.admin),
    ]
    for r in checks:
        assert r.status_code == 422, (r.request.method, r.request.url, r.text)
    # what the service generates fits the pattern: tenant, key, item and match ids, versions
    m = c.post("/v1/match", json={"embedding": unit(1)}, headers=h).json()
    generated = api.enrol(t, [{"subject": "user@example.com", "embedding": unit(2)}])
    for value in (t.tenant_id, t.key_id, m["match_id"], m["model_version"], *generated):
        assert re.fullmatch(ID_PATTERN, value), value


# --- the store on its own: escaping does not depend on the API's validation -----------------
@pytest.fixture
def rstore() -> Iterator[RedisStore]:
    prefix = f"tcmtest:{uuid.uuid4().hex}:[*]?\\"  # a hostile prefix must be escaped too
    s = RedisStore(REDIS_URL, prefix=prefix)
    try:
        yield s
    finally:
        s.close()
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(match=glob_escape(prefix) + "*", count=1000))
        if keys:
            r.unlink(*keys)
        r.close()


def _tenant_with_data(s: RedisStore, tid: str) -> None:
    s.create_tenant(Tenant(tid, tid, 1.0), ApiKey(uuid.uuid4().hex[:16], tid, "h" * 64, 1.0))
    v = np.ones(4, np.float32) / 2
    s.add_items(
        tid,
        [NewItem(f"i{i}", "s", v, {}, None) for i in range(2)],
        model_version="v",
        created_at=1.0,
    )


@pytest.mark.redis
def test_store_delete_tenant_escapes_and_never_sweeps_a_missing_tenant(rstore: RedisStore) -> None:
    victims = ["ab", "a", "a:items", "x[a]", "x\\", "xa", "a%3Aitems"]
    for tid in victims:
        _tenant_with_data(rstore, tid)
    all_keys = _keys(rstore.prefix)
    for pattern in [*GLOBS, "a:*", "a%", ""]:
        assert rstore.delete_tenant(pattern) is False, pattern
        assert _keys(rstore.prefix) == all_keys, pattern
    # deleting one tenant removes its keys only, whatever the others are called
    for tid in ("a", "x[a]", "a:items"):
        assert rstore.delete_tenant(tid) is True
        assert rstore.get_tenant(tid) is None
    left = _keys(rstore.prefix)
    for tid in ("ab", "x\\", "xa", "a%3Aitems"):
        assert rstore.get_tenant(tid) is not None
        assert rstore.count_items(tid) == 2
        assert len(rstore.gallery_vectors(tid, model_version="v")) == 2
    for tid in ("a", "x[a]", "a:items"):
        gone = (rstore.prefix + "tenant:" + key_part(tid) + ":").encode()
        assert not [k for k in left if k.startswith(gone)], tid


@pytest.mark.redis
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.text(alphabet="ab*?[]\\^-:% ", min_size=1, max_size=5),
        min_size=2,
        max_size=6,
        unique=True,
    )
)
def test_glob_escape_matches_exactly_itself(names: list[str]) -> None:
    """Oracle: Redis itself. ``SCAN MATCH glob_escape(P + name)`` finds exactly that key among
    keys named with every glob character; ``key_part`` keeps distinct ids distinct."""
    prefix = f"tcmtest:{uuid.uuid4().hex}:"
    r = redis.Redis.from_url(REDIS_URL)
    try:
        for n in names:
            r.set(prefix + n, 1)
        for n in names:
            found = list(r.scan_iter(match=glob_escape(prefix + n), count=1000))
            assert found == [(prefix + n).encode()], (n, found)
        assert len({key_part(n) for n in names}) == len(names)
        assert all(":" not in key_part(n) for n in names)
    finally:
        r.delete(*[prefix + n for n in names])
        r.close()


def test_key_part_is_the_identity_on_valid_ids() -> None:
    for tid in (uuid.uuid4().hex, "user@example.com", "digits-test-v1", "a.b_c-d", "Cactus Wren"):
        assert key_part(tid) == tid
    assert key_part("a:b") != key_part("a%3Ab")


def test_upload_with_a_valid_id_still_works(api: Api) -> None:
    t = api.new_tenant()
    img = np.zeros((8, 8), np.uint8)
    import base64

    r = api.client.post(
        "/v1/gallery/upload",
        files={"file": ("x.png", base64.b64decode(b64_png(img)))},
        data={"subject": "a.b@c-d_e", "item_id": "up-1"},
        headers=t.auth,
    )
    assert r.status_code == 201, r.text


def test_a_subject_with_spaces_works_on_every_route(api: Api) -> None:
    """Issue 30: "Cactus Wren" was refused with 422. Interior spaces are allowed (a plain byte in
    Redis keys and globs, a bound parameter in SQLite); enrol, list, match, verify, feedback and
    delete by subject all take it, on both stores, and another tenant's keys stay untouched."""
    other = api.new_tenant()
    api.enrol(other, [{"subject": "Cactus", "embedding": unit(40)}])
    t = api.new_tenant()
    c, h = api.client, t.auth
    ids = api.enrol(
        t,
        [
            {"subject": "Cactus Wren", "embedding": unit(41), "item_id": "wren 1"},
            {"subject": "Cactus Wren", "embedding": unit(42)},
            {"subject": "Cactus  Wren", "embedding": unit(43)},  # two spaces: another subject
        ],
    )
    assert ids[0] == "wren 1"
    listed = c.get("/v1/gallery", params={"subject": "Cactus Wren"}, headers=h).json()["items"]
    assert sorted(i["item_id"] for i in listed) == sorted(ids[:2])
    assert c.get("/v1/gallery/wren 1", headers=h).json()["subject"] == "Cactus Wren"
    subjects = c.get("/v1/subjects", headers=h).json()["subjects"]
    assert {s["subject"]: s["items"] for s in subjects} == {"Cactus Wren": 2, "Cactus  Wren": 1}
    m = c.post("/v1/match", json={"embedding": unit(41), "k": 3}, headers=h).json()
    assert m["decision"]["subject"] == "Cactus Wren" and m["decision"]["accepted"]
    v = c.post(
        "/v1/verify", json={"a": {"subject": "Cactus Wren"}, "b": {"item_id": "wren 1"}}, headers=h
    )
    assert v.status_code == 200 and v.json()["accepted"], v.text
    fb = c.post(
        "/v1/feedback", json={"match_id": m["match_id"], "true_subject": "Cactus Wren"}, headers=h
    )
    assert fb.status_code == 201 and fb.json()["outcome"] == "true_accept", fb.text
    r = c.delete("/v1/subjects/Cactus Wren", headers=h)
    assert r.status_code == 200 and r.json() == {"deleted": 2}
    left = c.get("/v1/subjects", headers=h).json()["subjects"]
    assert [s["subject"] for s in left] == ["Cactus  Wren"]
    assert [s["subject"] for s in c.get("/v1/subjects", headers=other.auth).json()["subjects"]] == [
        "Cactus"
    ]


@pytest.mark.parametrize("bad", [" Wren", "Wren ", "Cactus\tWren", "Cactus\nWren"])
def test_a_refused_subject_is_told_which_characters_are_allowed(api: Api, bad: str) -> None:
    t = api.new_tenant()
    r = api.client.post(
        "/v1/gallery", json={"items": [{"subject": bad, "embedding": unit(1)}]}, headers=t.auth
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["message"] == (
        f"the request does not match the schema: body.items[0].subject: an id must be {ID_RULE} "
        f"(pattern {ID_PATTERN})"
    )
