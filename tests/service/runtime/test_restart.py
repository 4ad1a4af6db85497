"""A new app on the same store rebuilds its indexes and answers as the old one did."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import (
    ADMIN_TOKEN,
    STORES,
    Digits,
    b64_png,
    make_settings,
    make_version,
    unit,
)

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
def test_restart_rebuilds_indexes(
    kind: str, artefact: Path, store_settings, digits: Digits
) -> None:
    settings = make_settings(artefact, store_settings(kind))
    queries = [{"embedding": unit(i), "k": 4} for i in range(5)] + [
        {"image": b64_png(digits.images[i]), "k": 4} for i in range(40, 44)
    ]
    with TestClient(create_app(settings)) as c:
        tenants = []
        for t in range(3):
            r = c.post("/v1/tenants", json={"name": f"t{t}"}, headers=ADMIN).json()
            auth = {"Authorization": f"Bearer {r['api_key']}"}
            items = [{"subject": f"s{i % 3}", "embedding": unit(i + 10 * t)} for i in range(8)]
            items += [
                {"subject": f"d{i}", "image": b64_png(digits.images[40 + i])} for i in range(4)
            ]
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


def _served(c: TestClient) -> str:
    return c.get("/v1/model").json()["model_version"]


def _switch(c: TestClient, path: str, *, version: str | None = None) -> None:
    """Activates ``version`` (or rolls back when None) and waits for the switch."""
    r = c.post(
        f"/v1/models/{version}/activate" if version else "/v1/models/rollback", headers=ADMIN
    )
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    want = version or r.json()["version"]
    while _served(c) != want:
        assert time.monotonic() < deadline, c.get("/v1/models", headers=ADMIN).json()
        time.sleep(0.05)


@pytest.mark.parametrize("kind", STORES)
def test_new_model_version_reembeds_stored_images(
    kind: str, artefact: Path, store_settings, digits: Digits, tmp_path: Path
) -> None:
    """Items enrolled from images are re-embedded by a new model; embedding-only items cannot
    be and are left out of its index (but stay listed)."""
    store = store_settings(kind)
    v2 = make_version(artefact, tmp_path / "v2", "digits-test-v2", 123)
    with TestClient(create_app(make_settings(artefact, store))) as c:
        r = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()
        auth = {"Authorization": f"Bearer {r['api_key']}"}
        c.post(
            "/v1/gallery",
            headers=auth,
            json={
                "items": [
                    {"subject": "img", "image": b64_png(digits.images[7]), "item_id": "img"},
                    {"subject": "vec", "embedding": unit(1), "item_id": "vec"},
                ]
            },
        )
    # restarted with v2 configured: it is staged, the fleet keeps serving v1 until activated
    with TestClient(create_app(make_settings(v2, store, **FAST_SWITCH))) as c:
        assert _served(c) == "digits-test-v1"
        models = c.get("/v1/models", headers=ADMIN).json()
        assert models["active"] == "digits-test-v1"
        assert "digits-test-v2" in {v["model_version"] for v in models["versions"]}
        _switch(c, str(v2), version="digits-test-v2")
        runtime = c.app.state.runtime
        assert runtime.serving.model_version == "digits-test-v2" and runtime.sync.skipped_items == 1
        m = c.post(
            "/v1/match", json={"image": b64_png(digits.images[7]), "k": 5}, headers=auth
        ).json()
        assert m["model_version"] == "digits-test-v2"
        assert [x["item_id"] for x in m["candidates"]] == ["img"]
        assert m["candidates"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        listed = c.get("/v1/gallery", headers=auth).json()["items"]
        assert [x["item_id"] for x in listed] == ["img", "vec"]
        r = c.post(
            "/v1/verify", json={"a": {"item_id": "vec"}, "b": {"item_id": "img"}}, headers=auth
        )
        assert r.status_code == 409 and r.json()["code"] == "not_embedded"
        # the old model still finds both: its embeddings were kept
        _switch(c, str(artefact))
        m = c.post("/v1/match", json={"embedding": unit(1), "k": 5}, headers=auth).json()
        assert sorted(x["item_id"] for x in m["candidates"]) == ["img", "vec"]


FAST_SWITCH = {"model_poll_s": 0.1, "model_retire_grace_s": 0.1}


@pytest.mark.parametrize("kind", STORES)
def test_starting_a_process_never_switches_the_served_model(
    kind: str, artefact: Path, store_settings, tmp_path: Path
) -> None:
    """Regression (issue 25): a second process started with another artefact (on Redis: a
    replica; on SQLite: after the first stopped) used to make the registry's active model its
    own, and the running fleet switched to it. Starting never switches: only an activation
    does, and the configured artefact is staged for one."""
    store = store_settings(kind)
    v2 = make_version(artefact, tmp_path / "v2", "digits-test-v2", 5)
    first = make_settings(artefact, store, **FAST_SWITCH)
    with TestClient(create_app(first)) as a:
        if kind == "redis":  # a replica beside the running one
            with TestClient(create_app(make_settings(v2, store, **FAST_SWITCH))) as b:
                assert b.get("/v1/models", headers=ADMIN).json()["active"] == "digits-test-v1"
                assert _served(a) == _served(b) == "digits-test-v1"
                _switch(b, str(v2), version="digits-test-v2")
                deadline = time.monotonic() + 30
                while _served(a) != "digits-test-v2":  # the activation reaches every replica
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        else:
            assert _served(a) == "digits-test-v1"
    if kind == "sqlite":
        with TestClient(create_app(make_settings(v2, store, **FAST_SWITCH))) as b:
            assert _served(b) == "digits-test-v1"
            assert b.get("/v1/models", headers=ADMIN).json()["active"] == "digits-test-v1"
            assert "digits-test-v2" in {
                v["model_version"] for v in b.get("/v1/models", headers=ADMIN).json()["versions"]
            }


def test_a_second_server_on_one_sqlite_store_is_refused(
    artefact: Path, store_settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SQLite store has no change feed: a second serving process's indexes would never see
    the first one's writes (and, before, its start-up switched the first one's model). It is
    refused with a message that says what to do; the first keeps serving; once the first has
    stopped, a new one starts."""
    from service.store import StoreInUseError

    store = store_settings("sqlite")
    v2 = make_version(artefact, tmp_path / "v2", "digits-test-v2", 9)
    with TestClient(create_app(make_settings(artefact, store))) as a:
        with (
            pytest.raises(StoreInUseError, match="already served by pid"),
            TestClient(create_app(make_settings(v2, store))),
        ):
            pass
        assert "run replicas on Redis" in caplog.text
        assert a.get("/readyz").status_code == 200
        assert (
            a.get("/v1/models", headers=ADMIN).json()["versions"][0]["model_version"]
            == "digits-test-v1"
        )
        assert len(a.get("/v1/models", headers=ADMIN).json()["versions"]) == 1  # not staged
    with TestClient(create_app(make_settings(artefact, store))) as a:
        assert a.get("/readyz").status_code == 200


def test_sqlite_locked_is_503_then_recovers(artefact: Path, store_settings) -> None:
    """A SQLite file another process holds the write lock on answers 503, then recovers."""
    store = store_settings("sqlite")
    settings = make_settings(artefact, store, store_timeout_s=0.3)
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()
        auth = {"Authorization": f"Bearer {r['api_key']}"}
        blocker = sqlite3.connect(
            store["store_url"].removeprefix("sqlite:///"), isolation_level=None
        )
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            r = c.post(
                "/v1/gallery",
                json={"items": [{"subject": "s", "embedding": unit(1)}]},
                headers=auth,
            )
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "store_unavailable"
            assert "locked" in r.json()["message"]
            assert time.monotonic() - started < 5
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        r = c.post(
            "/v1/gallery", json={"items": [{"subject": "s", "embedding": unit(1)}]}, headers=auth
        )
        assert r.status_code == 201
        assert "tcm_store_errors_total 1.0" in c.get("/metrics").text
