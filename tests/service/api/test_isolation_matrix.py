"""Tenant isolation, route by route: tenant B's key against tenant A's data.

For every tenant route and every way to name a resource (item id, subject, match id, feedback),
B's request about A's resource must be indistinguishable from the same request about a resource
that does not exist (same status, same body once the name is swapped), must not change any of
A's data, and no response B gets may carry anything of A's (tenant id, key id, key, subjects,
item ids or metadata B never named). Admin routes refuse tenant keys. Secrets (API keys, the
admin token) never appear in logs or error bodies. `test_access.py` covers the 401 matrix for
bad tokens and key rotation; this file is the cross-tenant matrix. Both stores.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from service.app import create_app
from service.monitoring.monitor import Monitor
from tests.service.conftest import (
    ADMIN_TOKEN,
    Api,
    Digits,
    Tenant,
    b64_png,
    make_settings,
    png_bytes,
    unit,
)

# names B uses on purpose (each has a same-length twin that exists nowhere)
A_ITEM, NO_ITEM = "a-item-0001", "z-item-0001"
A_SUBJECT, NO_SUBJECT = "alice-0001", "nobod-0001"
# things of A that B never names: any of them in a response to B is a leak
A_HIDDEN_ITEM = "a-hidden-item-q7x"
A_HIDDEN_SUBJECT = "a-hidden-subject-q7x"
A_IMAGE_ITEM = "a-image-item-q7x"
A_META = "a-metadata-marker-q7x"
NO_MATCH = "0" * 32


@dataclass
class World:
    api: Api
    a: Tenant
    b: Tenant
    open_match: str  # A's match without feedback
    labelled_match: str  # A's match with feedback
    image: bytes

    def leaks(self) -> list[str]:
        return [
            self.a.tenant_id,
            self.a.key_id,
            self.a.api_key,
            ADMIN_TOKEN,
            A_HIDDEN_ITEM,
            A_HIDDEN_SUBJECT,
            A_IMAGE_ITEM,
            A_META,
            self.open_match,
            self.labelled_match,
        ]

    def assert_no_leak(self, r: Response, *, named: tuple[str, ...] = ()) -> None:
        """Nothing of A's in ``r`` except the names B itself put in the request."""
        text = r.text + json.dumps(dict(r.headers))
        for secret in self.leaks():
            if secret not in named:
                assert secret not in text, (secret, r.request.url, text[:500])

    def state_of_a(self) -> dict[str, Any]:
        """Everything A can observe of its own data (read-only requests)."""
        c, h = self.api.client, self.a.auth
        listing = c.get("/v1/gallery", params={"limit": 1000}, headers=h).json()
        items = {
            i["item_id"]: c.get(
                f"/v1/gallery/{i['item_id']}", headers=h, params={"include_embedding": True}
            ).json()
            for i in listing["items"]
        }
        verify = c.post(
            "/v1/verify", headers=h, json={"a": {"item_id": A_ITEM}, "b": {"subject": A_SUBJECT}}
        ).json()
        return {"listing": listing, "items": items, "verify": verify}


@pytest.fixture
def world(api: Api, digits: Digits) -> World:
    a, b = api.new_tenant(), api.new_tenant()  # fresh names: the module shares one store
    image = png_bytes(digits.images[0])
    api.enrol(
        a,
        [
            {
                "subject": A_SUBJECT,
                "embedding": unit(1),
                "item_id": A_ITEM,
                "metadata": {"note": A_META},
            },
            {"subject": A_SUBJECT, "image": b64_png(digits.images[0]), "item_id": A_IMAGE_ITEM},
            {"subject": A_HIDDEN_SUBJECT, "embedding": unit(2), "item_id": A_HIDDEN_ITEM},
        ],
    )
    api.enrol(b, [{"subject": "bob", "embedding": unit(50), "item_id": "b-item"}])
    c = api.client
    m1 = c.post("/v1/match", json={"embedding": unit(1)}, headers=a.auth).json()["match_id"]
    m2 = c.post("/v1/match", json={"embedding": unit(2)}, headers=a.auth).json()["match_id"]
    r = c.post(
        "/v1/feedback", json={"match_id": m2, "true_subject": A_HIDDEN_SUBJECT}, headers=a.auth
    )
    assert r.status_code == 201
    return World(api, a, b, open_match=m1, labelled_match=m2, image=image)


def _swap(obj: Any, old: str, new: str) -> Any:
    return json.loads(json.dumps(obj).replace(old, new))


# (name, method, path, json body); {item}, {subject}, {match}, {labelled} name A's resources
NAMED = [
    ("get item", "GET", "/v1/gallery/{item}", None),
    ("get item with embedding", "GET", "/v1/gallery/{item}?include_embedding=true", None),
    ("delete item", "DELETE", "/v1/gallery/{item}", None),
    ("delete subject", "DELETE", "/v1/subjects/{subject}", None),
    ("list by subject", "GET", "/v1/gallery?subject={subject}", None),
    (
        "verify a=item",
        "POST",
        "/v1/verify",
        {"a": {"item_id": "{item}"}, "b": {"embedding": unit(1)}},
    ),
    (
        "verify b=item",
        "POST",
        "/v1/verify",
        {"a": {"embedding": unit(1)}, "b": {"item_id": "{item}"}},
    ),
    (
        "verify a=subject",
        "POST",
        "/v1/verify",
        {"a": {"subject": "{subject}"}, "b": {"embedding": unit(1)}},
    ),
    (
        "verify b=subject",
        "POST",
        "/v1/verify",
        {"a": {"item_id": "b-item"}, "b": {"subject": "{subject}"}},
    ),
    (
        "verify item-subject",
        "POST",
        "/v1/verify",
        {"a": {"item_id": "{item}"}, "b": {"subject": "{subject}"}},
    ),
    ("feedback correct", "POST", "/v1/feedback", {"match_id": "{match}", "correct": True}),
    ("feedback wrong", "POST", "/v1/feedback", {"match_id": "{match}", "correct": False}),
    (
        "feedback subject",
        "POST",
        "/v1/feedback",
        {"match_id": "{match}", "true_subject": "{subject}"},
    ),
    (
        "feedback unknown subject",
        "POST",
        "/v1/feedback",
        {"match_id": "{match}", "true_subject": None},
    ),
    # a 409 feedback_exists here would tell B that A's match exists
    (
        "feedback on labelled match",
        "POST",
        "/v1/feedback",
        {"match_id": "{labelled}", "correct": True},
    ),
    # PUT of A's item id creates B's own item, exactly as a free id does (A's is untouched)
    (
        "put item",
        "PUT",
        "/v1/gallery/{item}",
        {"subject": "{subject}", "embedding": unit(3), "metadata": {"k": "v"}},
    ),
    (
        "verify filtered by A's metadata",
        "POST",
        "/v1/verify",
        {
            "a": {"item_id": "{item}"},
            "b": {"embedding": unit(1)},
            "filter": {"note": "a-metadata-marker-q7x"},
        },
    ),
    (
        "verify subject filtered",
        "POST",
        "/v1/verify",
        {
            "a": {"subject": "{subject}"},
            "b": {"embedding": unit(1)},
            "filter": {"note": "a-metadata-marker-q7x"},
        },
    ),
]


def _fill(template: Any, names: dict[str, str]) -> Any:
    text = json.dumps(template)
    for k, v in names.items():
        text = text.replace("{" + k + "}", v)
    return json.loads(text)


@pytest.mark.parametrize(("name", "method", "path", "body"), NAMED, ids=[n[0] for n in NAMED])
def test_b_naming_a_resource_is_the_same_as_naming_nothing(
    world: World, name: str, method: str, path: str, body: Any
) -> None:
    c, b = world.api.client, world.b
    theirs_names = {
        "item": A_ITEM,
        "subject": A_SUBJECT,
        "match": world.open_match,
        "labelled": world.labelled_match,
    }
    missing_names = {
        "item": NO_ITEM,
        "subject": NO_SUBJECT,
        "match": NO_MATCH,
        "labelled": "1" * 32,
    }
    before = world.state_of_a()

    def send(names: dict[str, str]) -> Response:
        kwargs = {} if body is None else {"json": _fill(body, names)}
        return c.request(method, _fill(path, names), headers=b.auth, **kwargs)

    theirs, missing = send(theirs_names), send(missing_names)
    assert theirs.status_code in (200, 201, 404), theirs.text
    assert theirs.status_code == missing.status_code
    expected = missing.json()
    for k in ("item", "subject", "match", "labelled"):
        expected = _swap(expected, missing_names[k], theirs_names[k])
    assert theirs.json() == expected, (theirs.text, missing.text)
    if theirs.status_code == 200:  # a listing: empty, like the missing subject's
        assert theirs.json()["items"] == []
    if method == "PUT":  # B's own new item, not A's
        assert theirs.status_code == 201 and theirs.json()["created"] is True
    world.assert_no_leak(theirs, named=tuple(theirs_names.values()))
    # nothing of A's changed, and A can still label its open match
    assert world.state_of_a() == before
    r = c.post(
        "/v1/feedback", json={"match_id": world.open_match, "correct": True}, headers=world.a.auth
    )
    assert r.status_code == 201, r.text


def test_b_searches_and_lists_see_only_b(world: World, digits: Digits) -> None:
    c, b = world.api.client, world.b
    responses = [
        c.post("/v1/match", json={"embedding": unit(1), "k": 50}, headers=b.auth),
        c.post("/v1/match", json={"embedding": unit(2), "k": 50}, headers=b.auth),
        c.post("/v1/match", json={"image": b64_png(digits.images[0]), "k": 50}, headers=b.auth),
        c.post(
            "/v1/match/upload",
            data={"k": "50"},
            headers=b.auth,
            files={"file": ("q.png", world.image, "image/png")},
        ),
    ]
    for r in responses:
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["item_id"] for x in body["candidates"]] == ["b-item"]
        assert body["decision"]["subject"] in (None, "bob")
        world.assert_no_leak(r)
    # a filter naming A's metadata finds nothing of A's (and k candidates of B's otherwise)
    r = c.post(
        "/v1/match",
        json={"embedding": unit(1), "k": 50, "filter": {"note": A_META}},
        headers=b.auth,
    )
    assert r.status_code == 200 and r.json()["candidates"] == []
    world.assert_no_leak(r, named=(A_META,))
    # subjects: only B's, whatever the cursor (even one made from A's subject names)
    for params in ({}, {"limit": 1}, {"cursor": A_SUBJECT.encode().hex()}, {"cursor": "00"}):
        r = c.get("/v1/subjects", params=params, headers=b.auth)
        assert r.status_code == 200, r.text
        assert r.json()["subjects"] in ([{"subject": "bob", "items": 1}], [])
        world.assert_no_leak(r)
    for params in ({}, {"cursor": "0"}, {"limit": 1}, {"subject": "bob"}):
        r = c.get("/v1/gallery", params=params, headers=b.auth)
        assert r.status_code == 200, r.text
        assert [i["item_id"] for i in r.json()["items"]] == ["b-item"]
        assert r.json()["next_cursor"] is None
        world.assert_no_leak(r)
    # a cursor taken from A's listing (seqs are global) still lists only B's items
    a_page = c.get("/v1/gallery", params={"limit": 1}, headers=world.a.auth).json()
    r = c.get("/v1/gallery", params={"cursor": a_page["next_cursor"]}, headers=b.auth)
    assert r.status_code == 200 and all(i["item_id"] == "b-item" for i in r.json()["items"])
    # verifying against its own data and embedding things touches nothing of A's
    r = c.post(
        "/v1/verify", json={"a": {"subject": "bob"}, "b": {"embedding": unit(1)}}, headers=b.auth
    )
    assert r.status_code == 200
    world.assert_no_leak(r)
    r = c.post(
        "/v1/verify/upload",
        headers=b.auth,
        files={"a": ("a.png", world.image, "image/png"), "b": ("b.png", world.image, "image/png")},
    )
    assert r.status_code == 200 and r.json()["accepted"] is True
    world.assert_no_leak(r)


def test_b_reusing_a_names_creates_b_own_data(world: World) -> None:
    """A's item ids and subjects are free in B's namespace: no 409 that would reveal them, and
    B's items never show in A's views."""
    c, a, b = world.api.client, world.a, world.b
    before = world.state_of_a()
    r = c.post(
        "/v1/gallery",
        headers=b.auth,
        json={"items": [{"subject": A_SUBJECT, "embedding": unit(1), "item_id": A_ITEM}]},
    )
    assert r.status_code == 201, r.text
    r = c.post(
        "/v1/gallery/upload",
        headers=b.auth,
        data={"subject": A_HIDDEN_SUBJECT, "item_id": A_HIDDEN_ITEM},
        files={"file": ("a.png", world.image, "image/png")},
    )
    assert r.status_code == 201, r.text
    assert world.state_of_a() == before
    got = c.get(f"/v1/gallery/{A_ITEM}", headers=b.auth).json()
    assert got["metadata"] == {} and A_META not in json.dumps(got)
    m = c.post("/v1/match", json={"embedding": unit(1), "k": 50}, headers=a.auth).json()
    assert sorted(x["item_id"] for x in m["candidates"]) == sorted(
        [A_ITEM, A_IMAGE_ITEM, A_HIDDEN_ITEM]
    )
    # B deleting "its" subject of the same name removes only B's items
    assert c.delete(f"/v1/subjects/{A_SUBJECT}", headers=b.auth).json() == {"deleted": 1}
    assert world.state_of_a() == before


def test_b_monitor_view_shows_only_b(world: World) -> None:
    c, b = world.api.client, world.b
    monitor = c.app.state.monitor  # type: ignore[attr-defined]
    assert isinstance(monitor, Monitor)
    monitor.refresh(force=True)
    for params in ({}, {"threshold": 0.5}, {"threshold": -1.0}):
        r = c.get("/v1/monitor", params=params, headers=b.auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["scope"] == "tenant" and body["tenant_id"] == b.tenant_id
        assert "tenants" not in body["snapshot"]
        if body["what_if"] is not None:
            assert set(body["what_if"]["tenants"]) == {b.tenant_id}
        world.assert_no_leak(r)
    # while the admin view does include A
    admin = c.get("/v1/monitor", headers=world.api.admin).json()
    assert world.a.tenant_id in admin["snapshot"]["tenants"]


def test_admin_routes_refuse_tenant_keys(world: World) -> None:
    c, a, b = world.api.client, world.a, world.b
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/tenants", {}),
        ("POST", "/v1/tenants", {"json": {"name": "sneaky"}}),
        ("GET", f"/v1/tenants/{a.tenant_id}", {}),
        ("GET", f"/v1/tenants/{b.tenant_id}", {}),
        ("DELETE", f"/v1/tenants/{a.tenant_id}", {}),
        ("POST", f"/v1/tenants/{a.tenant_id}/keys", {"json": {"revoke_existing": True}}),
        ("POST", f"/v1/tenants/{b.tenant_id}/keys", {}),
        ("GET", f"/v1/tenants/{a.tenant_id}/keys", {}),
        ("DELETE", f"/v1/tenants/{a.tenant_id}/keys/{a.key_id}", {}),
    ]
    tenants_before = c.get("/v1/tenants", headers=world.api.admin).json()
    for method, path, kwargs in routes:
        for key in (b, a):  # not even a tenant's own record
            r = c.request(method, path, headers=key.auth, **kwargs)
            assert r.status_code in (401, 403), (method, path, r.text)
            assert set(r.json()) == {"code", "message", "detail"}
            world.assert_no_leak(
                r, named=(a.tenant_id, a.key_id) if key is b else tuple(world.leaks())
            )
    assert c.get("/v1/tenants", headers=world.api.admin).json() == tenants_before
    assert c.get("/v1/gallery", headers=a.auth).status_code == 200  # A's key still works
    keys = c.get(f"/v1/tenants/{a.tenant_id}/keys", headers=world.api.admin).json()["keys"]
    assert [k["key_id"] for k in keys] == [a.key_id] and keys[0]["active"]


def test_secrets_never_in_logs_or_error_bodies(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Drive every kind of error with real secrets in play; no log record and no response
    body (other than the one that issues a key) contains a key or the admin token."""
    c, a, b = world.api.client, world.a, world.b
    caplog.set_level(logging.DEBUG)
    responses: list[Response] = []
    r = c.post(f"/v1/tenants/{a.tenant_id}/keys", headers=world.api.admin)
    assert r.status_code == 201
    rotated = r.json()["api_key"]  # shown once, in this response only
    secrets = [a.api_key, b.api_key, rotated, ADMIN_TOKEN]
    tampered = a.api_key[:-2] + ("xx" if not a.api_key.endswith("xx") else "yy")
    for token in (tampered, ADMIN_TOKEN, a.api_key + "x", "Bearer " + a.api_key):
        responses.append(c.get("/v1/gallery", headers={"Authorization": f"Bearer {token}"}))
    responses += [
        c.get("/v1/tenants", headers=a.auth),
        c.get("/v1/gallery", headers={"Authorization": a.api_key}),  # no scheme
        # secrets pasted into bodies, ids and query strings are not echoed back
        c.post("/v1/match", json={"embeding": a.api_key}, headers=a.auth),
        c.post("/v1/match", json={"embedding": [a.api_key]}, headers=a.auth),
        c.post(
            "/v1/gallery",
            json={"items": [{"subject": ADMIN_TOKEN * 20, "embedding": unit(1)}]},
            headers=a.auth,
        ),
        c.post(
            "/v1/tenants", json={"name": a.api_key, "extra": ADMIN_TOKEN}, headers=world.api.admin
        ),
        c.get("/v1/gallery", params={"cursor": a.api_key}, headers=a.auth),
        c.post("/v1/feedback", json={"match_id": a.api_key * 3, "correct": True}, headers=a.auth),
        c.post(
            "/v1/match",
            content='{"embedding": [' + a.api_key,
            headers=a.auth | {"content-type": "application/json"},
        ),
    ]
    assert (
        c.delete(f"/v1/tenants/{a.tenant_id}/keys/{a.key_id}", headers=world.api.admin).status_code
        == 204
    )
    responses.append(c.get("/v1/gallery", headers=a.auth))  # revoked
    for r in responses:
        assert 400 <= r.status_code < 500, (r.request.url, r.text)
        assert set(r.json()) == {"code", "message", "detail"}, r.text
        for s in secrets:
            assert s not in r.text and s not in json.dumps(dict(r.headers)), r.text
    assert caplog.records, "caplog captured nothing: the check below would be vacuous"
    # the test client's own loggers (httpx, httpcore) log request URLs on the client side
    served = [rec for rec in caplog.records if not rec.name.startswith(("httpx", "httpcore"))]
    logged = "\n".join(
        f"{rec.name} {rec.getMessage()} {rec.args!r} {rec.exc_text or ''}" for rec in served
    )
    for s in secrets:
        assert s not in logged
    keys = c.get(f"/v1/tenants/{a.tenant_id}/keys", headers=world.api.admin)
    assert all(s not in keys.text for s in secrets)
    assert c.get("/v1/gallery", headers={"Authorization": f"Bearer {rotated}"}).status_code == 200


@pytest.fixture
def two_replicas(artefact: Path, store_settings: Any) -> Iterator[tuple[TestClient, TestClient]]:
    settings = make_settings(artefact, store_settings("redis"), monitor_enabled=False)
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        yield one, two


@pytest.mark.redis
def test_revoked_key_is_refused_at_once_on_every_replica(
    two_replicas: tuple[TestClient, TestClient],
) -> None:
    one, two = two_replicas
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    created = one.post("/v1/tenants", json={"name": "t"}, headers=admin).json()
    auth = {"Authorization": f"Bearer {created['api_key']}"}
    assert one.get("/v1/gallery", headers=auth).status_code == 200
    assert two.get("/v1/gallery", headers=auth).status_code == 200
    assert (
        two.delete(
            f"/v1/tenants/{created['tenant_id']}/keys/{created['key_id']}", headers=admin
        ).status_code
        == 204
    )
    # no cache, no propagation delay: the very next request on either replica is refused
    assert one.get("/v1/gallery", headers=auth).status_code == 401
    assert two.get("/v1/gallery", headers=auth).status_code == 401
    # and a deleted tenant's new key dies with it everywhere
    new = one.post(f"/v1/tenants/{created['tenant_id']}/keys", headers=admin).json()
    auth2 = {"Authorization": f"Bearer {new['api_key']}"}
    assert two.get("/v1/gallery", headers=auth2).status_code == 200
    assert one.delete(f"/v1/tenants/{created['tenant_id']}", headers=admin).status_code == 204
    assert two.get("/v1/gallery", headers=auth2).status_code == 401
