"""Two replicas on one Redis store keep their indexes in sync through the change feed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import ADMIN_TOKEN, make_settings, unit

pytestmark = pytest.mark.redis
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "replicas did not converge"
        time.sleep(0.05)


def test_replicas_follow_each_others_writes(artefact: Path, store_settings) -> None:
    settings = make_settings(artefact, store_settings("redis"))
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        key = a.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()
        auth = {"Authorization": f"Bearer {key['api_key']}"}

        def ids_seen(client: TestClient) -> list[str]:
            r = client.post("/v1/match", json={"embedding": unit(1), "k": 10}, headers=auth)
            return sorted(x["item_id"] for x in r.json()["candidates"])

        a.post("/v1/gallery", headers=auth, json={"items": [
            {"subject": "s", "embedding": unit(1), "item_id": "one"},
            {"subject": "s", "embedding": unit(2), "item_id": "two"},
            {"subject": "z", "embedding": unit(3), "item_id": "three"}]})
        eventually(lambda: ids_seen(b) == ["one", "three", "two"])
        assert b.delete("/v1/gallery/two", headers=auth).status_code == 204
        eventually(lambda: ids_seen(a) == ["one", "three"])
        assert b.delete("/v1/subjects/z", headers=auth).status_code == 200
        eventually(lambda: ids_seen(a) == ["one"])
        assert ids_seen(b) == ["one"]
        assert a.post("/v1/match", json={"embedding": unit(1)}, headers=auth).json() \
            ["decision"]["subject"] == "s"
        tid = key["tenant_id"]
        assert tid in b.app.state.runtime.indexes.sizes()
        assert a.delete(f"/v1/tenants/{tid}", headers=ADMIN).status_code == 204
        eventually(lambda: tid not in b.app.state.runtime.indexes.sizes())
        assert b.app.state.runtime.changes_applied >= 4
