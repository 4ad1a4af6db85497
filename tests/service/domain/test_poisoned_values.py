"""No single stored value may stop start-up or the change feed (issue 25, item 1).

The attack: metadata ``{"n": <a 401-digit integer>}``. The schema used to accept it, the filter
code's ``float()`` raised ``OverflowError``, the enrolment answered 500 after the item was stored,
a restart exited with code 3 (every tenant down) and a follower replica retried the entry forever.
Now the request is a 422 naming the field before anything is stored; a value outside the domain
that is already stored (written before the domain was enforced) is served but not filterable;
and whatever stored value still cannot be indexed is quarantined (logged, counted, skipped) so
that the rest of the fleet serves.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.metadata_filter import MAX_METADATA_KEYS, canonical, domain_problem, terms
from service.settings import Settings
from service.store import NewItem, open_store
from tests.service.conftest import ADMIN_TOKEN, STORES, Api, Tenant, b64, make_settings, unit

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HUGE = 10**400  # 401 digits: beyond float64's range
VERSION = "digits-test-v1"  # the test artefact's model version


# --- the domain, as pure functions ---------------------------------------------------------
def test_canonical_is_total_and_refuses_what_float64_cannot_hold() -> None:
    assert canonical(HUGE) is None and canonical(-HUGE) is None
    assert canonical(2**60) == canonical(float(2**60))  # big but finite: compares as a number
    assert canonical(1) == canonical(1.0) == "1"
    assert list(terms({"n": HUGE, "m": 2, "s": "x" * 2000, "k" * 300: 1})) == [("m", "2")]


def test_domain_problem_names_the_path() -> None:
    assert domain_problem({"a": 1, "b": [1.5, "x", {"c": None}]}) is None
    problem = domain_problem({"a": [{"b": 1}, {"b": HUGE}]})
    assert problem is not None and problem.startswith("metadata.a[1].b: ")
    assert "401 digits" in problem
    assert domain_problem({"x y": -HUGE}) is not None
    assert domain_problem({"x y": -HUGE}).startswith('metadata["x y"]: ')  # type: ignore[union-attr]
    wide = {f"k{i}": i for i in range(MAX_METADATA_KEYS + 1)}
    assert f"limit is {MAX_METADATA_KEYS}" in (domain_problem(wide) or "")
    assert domain_problem({f"k{i}": i for i in range(MAX_METADATA_KEYS)}) is None


# --- over HTTP: refused before anything is stored ------------------------------------------
def _gone(api: Api, tenant: Tenant, item_id: str) -> bool:
    return api.client.get(f"/v1/gallery/{item_id}", headers=tenant.auth).status_code == 404


def test_huge_integer_in_metadata_is_a_422_naming_the_field(api: Api, tenant: Tenant) -> None:
    for metadata, path in [({"n": HUGE}, "metadata.n"), ({"a": [{"b": -HUGE}]}, "metadata.a[0].b")]:
        r = api.client.post(
            "/v1/gallery",
            headers=tenant.auth,
            json={
                "items": [
                    {"item_id": "ok", "subject": "s", "embedding": unit(1)},
                    {"item_id": "bad", "subject": "s", "embedding": unit(2), "metadata": metadata},
                ]
            },
        )
        assert r.status_code == 422, r.text
        assert path in r.text and "float64" in r.text
        assert r.json()["detail"][0]["loc"] == ["body", "items", 1, "metadata"]
        assert _gone(api, tenant, "ok") and _gone(api, tenant, "bad")  # all or nothing
        r = api.client.put(
            "/v1/gallery/bad",
            headers=tenant.auth,
            json={"subject": "s", "embedding": unit(2), "metadata": metadata},
        )
        assert r.status_code == 422 and path in r.text, r.text
        assert _gone(api, tenant, "bad")


def test_too_many_top_level_keys_is_a_422(api: Api, tenant: Tenant) -> None:
    metadata = {f"k{i}": i for i in range(MAX_METADATA_KEYS + 1)}
    r = api.client.put(
        "/v1/gallery/wide",
        headers=tenant.auth,
        json={"subject": "s", "embedding": unit(3), "metadata": metadata},
    )
    assert r.status_code == 422 and f"the limit is {MAX_METADATA_KEYS}" in r.text, r.text
    assert _gone(api, tenant, "wide")


def test_upload_form_metadata_obeys_the_same_domain(api: Api, tenant: Tenant, digits: Any) -> None:
    from tests.service.conftest import png_bytes

    for text in ['{"n": 1' + "0" * 400 + "}", '{"n": 1e400}']:
        r = api.client.post(
            "/v1/gallery/upload",
            headers=tenant.auth,
            files={"file": ("a.png", png_bytes(digits.images[0]), "image/png")},
            data={"subject": "s", "item_id": "up", "metadata": text},
        )
        assert r.status_code == 422, r.text
        assert "metadata" in r.text
        assert _gone(api, tenant, "up")


def test_filter_with_a_huge_integer_is_a_422_not_a_500(api: Api, tenant: Tenant) -> None:
    api.enrol(
        tenant, [{"item_id": "f", "subject": "s", "embedding": unit(4), "metadata": {"n": 1}}]
    )
    for path, body in [
        ("/v1/match", {"embedding": unit(4), "filter": {"n": HUGE}}),
        ("/v1/verify", {"a": {"embedding": unit(4)}, "b": {"item_id": "f"}, "filter": {"n": HUGE}}),
    ]:
        r = api.client.post(path, headers=tenant.auth, json=body)
        assert r.status_code == 422, (path, r.text)
        assert "float64" in r.text
    r = api.client.post(
        "/v1/match", headers=tenant.auth, json={"embedding": unit(4), "filter": {"n": 1.0}}
    )
    assert r.status_code == 200 and r.json()["candidates"][0]["item_id"] == "f"


# --- values already stored: start-up and the change feed never stop -----------------------
@pytest.fixture(params=STORES)
def settings(
    request: pytest.FixtureRequest, artefact: Path, store_settings: Callable[[str], dict[str, Any]]
) -> Iterator[Settings]:
    yield make_settings(artefact, store_settings(request.param))


def _new_tenant(client: TestClient) -> tuple[str, dict[str, str]]:
    name = f"t-{uuid.uuid4().hex[:8]}"  # tenant names are unique in a store
    body = client.post("/v1/tenants", json={"name": name}, headers=ADMIN).json()
    return body["tenant_id"], {"Authorization": f"Bearer {body['api_key']}"}


def _write_behind_the_api(settings: Settings, tenant_id: str, items: list[NewItem]) -> None:
    """What a store holds from before the domain was enforced, or from a bug elsewhere."""
    store = open_store(settings)
    try:
        store.add_items(tenant_id, items, model_version=VERSION, created_at=time.time())
    finally:
        store.close()


def _quarantined(client: TestClient, stage: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'tcm_quarantined_total{{stage="{stage}"}}'):
            return float(line.split()[-1])
    raise AssertionError("tcm_quarantined_total is not exported")


def test_stored_huge_integer_is_served_after_a_restart(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        tid, auth = _new_tenant(client)
    vec = np.asarray(unit(7), np.float32)
    _write_behind_the_api(settings, tid, [NewItem("old", "s", vec, {"n": HUGE, "k": "v"})])
    with TestClient(create_app(settings)) as client:  # used to exit with code 3
        assert client.get("/readyz").status_code == 200
        r = client.post("/v1/match", headers=auth, json={"embedding": unit(7)})
        assert r.status_code == 200 and r.json()["decision"]["subject"] == "s"
        r = client.post(
            "/v1/match", headers=auth, json={"embedding": unit(7), "filter": {"k": "v"}}
        )
        assert [c["item_id"] for c in r.json()["candidates"]] == ["old"]
        assert client.get("/v1/gallery/old", headers=auth).status_code == 200
        assert client.delete("/v1/gallery/old", headers=auth).status_code == 204
        assert _quarantined(client, "startup") == 0


def test_an_unindexable_tenant_is_quarantined_and_the_others_serve(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        bad, bad_auth = _new_tenant(client)
        _, good_auth = _new_tenant(client)
        assert (
            client.post(
                "/v1/gallery",
                headers=good_auth,
                json={"items": [{"item_id": "g", "subject": "s", "embedding": unit(8)}]},
            ).status_code
            == 201
        )
    # a stored vector of the wrong length: no index can take it
    _write_behind_the_api(settings, bad, [NewItem("x", "s", np.ones(3, np.float32))])
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        r = client.post("/v1/match", headers=good_auth, json={"embedding": unit(8)})
        assert r.status_code == 200 and r.json()["candidates"][0]["item_id"] == "g"
        assert _quarantined(client, "startup") == 1
        assert client.app.state.runtime.sync.quarantined_tenants == {bad}  # type: ignore[attr-defined]
        # the API can still remove the poisoned item
        assert client.delete("/v1/gallery/x", headers=bad_auth).status_code == 204


@pytest.mark.redis
def test_a_poisoned_feed_entry_is_skipped_and_later_entries_still_arrive(
    artefact: Path, store_settings: Callable[[str], dict[str, Any]]
) -> None:
    settings = make_settings(artefact, store_settings("redis"))
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        bad, _ = _new_tenant(a)
        _, auth = _new_tenant(a)
        _write_behind_the_api(
            settings,
            bad,
            [
                NewItem("x", "s", np.ones(3, np.float32)),
                NewItem("n", "s", np.asarray(unit(9), np.float32), {"n": HUGE}),
            ],
        )
        r = a.post(
            "/v1/gallery",
            headers=auth,
            json={
                "items": [
                    {
                        "item_id": "later",
                        "subject": "s",
                        "embedding_b64": b64(np.asarray(unit(10), "<f4").tobytes()),
                    }
                ]
            },
        )
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 15
        while True:
            r = b.post("/v1/match", headers=auth, json={"embedding": unit(10)})
            if r.json()["candidates"]:
                break
            assert time.monotonic() < deadline, "replica b never applied the later entry"
            time.sleep(0.05)
        assert r.json()["candidates"][0]["item_id"] == "later"
        runtime = b.app.state.runtime  # type: ignore[attr-defined]
        assert runtime.sync.changes_quarantined == 1
        assert _quarantined(b, "change_feed") == 1
