"""Authentication, key rotation, and tenant isolation on every route."""

from __future__ import annotations

import pytest

from service.domain.tenants import hash_token
from tests.service.conftest import ADMIN_TOKEN, Api, Digits, Tenant, b64_png, png_bytes, unit

TENANT_ROUTES = [
    ("POST", "/v1/gallery", {"json": {"items": [{"subject": "s", "embedding": unit(0)}]}}),
    ("GET", "/v1/gallery", {}),
    ("GET", "/v1/gallery/x", {}),
    ("DELETE", "/v1/gallery/x", {}),
    ("DELETE", "/v1/subjects/s", {}),
    ("POST", "/v1/match", {"json": {"embedding": unit(0)}}),
    ("POST", "/v1/verify", {"json": {"a": {"embedding": unit(0)}, "b": {"embedding": unit(0)}}}),
    ("POST", "/v1/embed", {"json": {"images": ["aGVsbG8="]}}),
    ("POST", "/v1/feedback", {"json": {"match_id": "m", "correct": True}}),
]
ADMIN_ROUTES = [
    ("POST", "/v1/tenants", {"json": {"name": "x"}}),
    ("GET", "/v1/tenants", {}),
    ("DELETE", "/v1/tenants/abc", {}),
    ("POST", "/v1/tenants/abc/keys", {}),
    ("GET", "/v1/tenants/abc/keys", {}),
    ("DELETE", "/v1/tenants/abc/keys/k", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), TENANT_ROUTES + ADMIN_ROUTES)
def test_missing_or_invalid_token_is_401(
    api: Api, tenant: Tenant, method: str, path: str, kwargs: dict
) -> None:
    c = api.client
    tampered = tenant.api_key[:-1] + ("B" if tenant.api_key[-1] != "B" else "C")
    bad_headers = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Bearer tcm_{'0' * 16}_{'A' * 43}"},  # well-formed, unknown
        {"Authorization": f"Bearer {tampered}"},
    ]
    if path.startswith("/v1/tenants"):
        bad_headers.append(tenant.auth)  # a tenant key is not the admin token
    else:
        bad_headers.append({"Authorization": f"Bearer {ADMIN_TOKEN}"})  # nor the reverse
    for h in bad_headers:
        r = c.request(method, path, headers=h, **kwargs)
        assert r.status_code == 401, (h, r.text)
        body = r.json()
        assert set(body) == {"code", "message", "detail"}
        assert r.headers["www-authenticate"] == "Bearer"


def test_cross_tenant_access_is_404(api: Api, digits: Digits) -> None:
    c = api.client
    a, b = api.new_tenant("a"), api.new_tenant("b")
    api.enrol(
        a,
        [
            {"subject": "alice", "embedding": unit(1), "item_id": "a-item"},
            {"subject": "alice", "image": b64_png(digits.images[0]), "item_id": "a-img"},
        ],
    )
    m = c.post("/v1/match", json={"embedding": unit(1)}, headers=a.auth).json()
    assert m["decision"]["subject"] == "alice"

    def same_as_missing(method: str, path: str, **kwargs: object) -> None:
        theirs = c.request(method, path, headers=b.auth, **kwargs)
        assert theirs.status_code == 404, theirs.text
        missing_path = path.replace("a-item", "no-such-item").replace("alice", "nobody")
        missing_kwargs = kwargs
        if "json" in kwargs:
            missing_kwargs = {"json": _replace(kwargs["json"])}
        missing = c.request(method, missing_path, headers=b.auth, **missing_kwargs)
        assert missing.status_code == 404
        assert theirs.json()["code"] == missing.json()["code"] == "not_found"

    same_as_missing("GET", "/v1/gallery/a-item")
    same_as_missing("DELETE", "/v1/gallery/a-item")
    same_as_missing("DELETE", "/v1/subjects/alice")
    same_as_missing(
        "POST", "/v1/verify", json={"a": {"embedding": unit(1)}, "b": {"item_id": "a-item"}}
    )
    same_as_missing(
        "POST", "/v1/verify", json={"a": {"subject": "alice"}, "b": {"embedding": unit(1)}}
    )
    r = c.post("/v1/feedback", json={"match_id": m["match_id"], "correct": True}, headers=b.auth)
    assert r.status_code == 404
    # b sees nothing of a's gallery
    assert c.get("/v1/gallery", headers=b.auth).json()["items"] == []
    assert c.get("/v1/gallery", params={"subject": "alice"}, headers=b.auth).json()["items"] == []
    rb = c.post("/v1/match", json={"embedding": unit(1), "k": 10}, headers=b.auth).json()
    assert rb["candidates"] == [] and rb["decision"]["accepted"] is False
    up = c.post(
        "/v1/match/upload",
        headers=b.auth,
        files={"file": ("q.png", png_bytes(digits.images[0]), "image/png")},
    ).json()
    assert up["candidates"] == []
    # b may use the same item ids and subjects without clashing with a
    api.enrol(b, [{"subject": "alice", "embedding": unit(2), "item_id": "a-item"}])
    assert c.get("/v1/gallery/a-item", headers=b.auth).json()["subject"] == "alice"
    # and a's data is intact after all of b's attempts
    assert c.get("/v1/gallery/a-item", headers=a.auth).status_code == 200
    fb = c.post("/v1/feedback", json={"match_id": m["match_id"], "correct": True}, headers=a.auth)
    assert fb.status_code == 201


def _replace(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _replace(v) for k, v in obj.items()}
    if obj == "a-item":
        return "no-such-item"
    if obj == "alice":
        return "nobody"
    return obj


def test_key_rotation_and_revocation(api: Api) -> None:
    c = api.client
    t = api.new_tenant("rotating")
    old = t.auth
    assert c.get("/v1/gallery", headers=old).status_code == 200

    r = c.post(f"/v1/tenants/{t.tenant_id}/keys", headers=api.admin)
    assert r.status_code == 201
    new = r.json()
    assert new["revoked_key_ids"] == [] and new["tenant_id"] == t.tenant_id
    new_auth = {"Authorization": f"Bearer {new['api_key']}"}
    # zero-downtime: both keys work until the old one is revoked
    assert c.get("/v1/gallery", headers=old).status_code == 200
    assert c.get("/v1/gallery", headers=new_auth).status_code == 200
    keys = c.get(f"/v1/tenants/{t.tenant_id}/keys", headers=api.admin).json()["keys"]
    assert [k["key_id"] for k in keys] == [t.key_id, new["key_id"]]
    assert all(k["active"] for k in keys) and "api_key" not in keys[0]

    assert (
        c.delete(f"/v1/tenants/{t.tenant_id}/keys/{t.key_id}", headers=api.admin).status_code == 204
    )
    assert c.get("/v1/gallery", headers=old).status_code == 401
    assert c.get("/v1/gallery", headers=new_auth).status_code == 200
    # revoking again is idempotent; unknown keys and other tenants' keys are 404
    assert (
        c.delete(f"/v1/tenants/{t.tenant_id}/keys/{t.key_id}", headers=api.admin).status_code == 204
    )
    other = api.new_tenant("other")
    assert (
        c.delete(
            f"/v1/tenants/{other.tenant_id}/keys/{new['key_id']}", headers=api.admin
        ).status_code
        == 404
    )
    assert c.get("/v1/gallery", headers=new_auth).status_code == 200

    # emergency rotation revokes everything else at once
    r = c.post(
        f"/v1/tenants/{t.tenant_id}/keys", json={"revoke_existing": True}, headers=api.admin
    ).json()
    assert r["revoked_key_ids"] == [new["key_id"]]
    assert c.get("/v1/gallery", headers=new_auth).status_code == 401
    assert (
        c.get("/v1/gallery", headers={"Authorization": f"Bearer {r['api_key']}"}).status_code == 200
    )
    keys = c.get(f"/v1/tenants/{t.tenant_id}/keys", headers=api.admin).json()["keys"]
    assert [k["active"] for k in keys] == [False, False, True]


def test_only_key_hashes_are_stored(api: Api) -> None:
    t = api.new_tenant()
    key = api.client.app.state.runtime.store.get_key(t.key_id)
    assert key.key_hash == hash_token(t.api_key) and t.api_key not in repr(key)


def test_tenant_admin(api: Api) -> None:
    c = api.client
    t = api.new_tenant("to-delete")
    api.enrol(t, [{"subject": "s", "embedding": unit(1), "item_id": "i"}])
    listed = c.get("/v1/tenants", headers=api.admin).json()["tenants"]
    assert t.tenant_id in [x["tenant_id"] for x in listed]
    got = c.get(f"/v1/tenants/{t.tenant_id}", headers=api.admin).json()
    assert got["name"] == "to-delete"
    assert c.delete(f"/v1/tenants/{t.tenant_id}", headers=api.admin).status_code == 204
    assert c.get("/v1/gallery", headers=t.auth).status_code == 401
    assert c.delete(f"/v1/tenants/{t.tenant_id}", headers=api.admin).status_code == 404
    assert c.get(f"/v1/tenants/{t.tenant_id}", headers=api.admin).status_code == 404
    assert c.post(f"/v1/tenants/{t.tenant_id}/keys", headers=api.admin).status_code == 404
    store = c.app.state.runtime.store
    assert store.count_items(t.tenant_id) == 0 and store.list_keys(t.tenant_id) == []
    bad = c.post("/v1/tenants", json={"name": ""}, headers=api.admin)
    assert bad.status_code == 422
