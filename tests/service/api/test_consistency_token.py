"""Read-your-writes: a gallery write answers ``X-Consistency-Token`` (the change feed's
position after it; none with the embedded store, which has no feed), and a match or verify
carrying a token waits until this replica's indexes reflect it: met at once here, 503
``not_caught_up`` (with ``Retry-After``) for a position the feed never reaches, 422 (the
header's pattern) for a token that is not one. Across real replicas:
``tests/service/test_replicas_processes.py``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.domain import consistency
from service.store.redis_store import stream_position
from tests.service.conftest import ADMIN_TOKEN, STORES, make_settings, unit

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HEADER = consistency.HEADER


def valid_token(token: str) -> bool:
    """What the API's header pattern accepts."""
    return re.fullmatch(consistency.TOKEN_PATTERN, token) is not None


@pytest.fixture(params=STORES)
def served(request: pytest.FixtureRequest, artefact: Path, store_settings) -> Iterator[tuple]:
    settings = make_settings(artefact, store_settings(request.param), consistency_wait_ms=50.0)
    with TestClient(create_app(settings)) as c:
        key = c.post("/v1/tenants", json={"name": "ct"}, headers=ADMIN).json()["api_key"]
        yield c, {"Authorization": f"Bearer {key}"}, request.param


def test_tokens_are_parsed_and_ordered_as_the_feed() -> None:
    assert valid_token("1733500000000-0") and valid_token("0-0#0")
    assert valid_token("1733500000000")  # "<ms>" alone is "<ms>-0", as in Redis
    for bad in (
        "",
        "-1",
        "1-2#",
        "a-1",
        "1-2#3#4",
        "1-2 ",
        "*",
        "1-2\n",
        "9" * 21 + "-0",
    ):
        assert not valid_token(bad), bad
    order = ["0-0#0", "5", "5-1#9", "5-10", "40-0#1", "1733500000000-2"]
    assert sorted(order, key=stream_position) == order
    assert stream_position("7-3#100") == stream_position("7-3")


def test_writes_answer_a_token_and_reads_carrying_it_see_them(served) -> None:
    c, auth, store = served
    r = c.post(
        "/v1/gallery",
        json={"items": [{"subject": "ann", "item_id": "ann-1", "embedding": unit(1)}]},
        headers=auth,
    )
    assert r.status_code == 201
    token = r.headers.get(HEADER)
    if store == "sqlite":  # one process holds every write: nothing to wait for, no token
        assert token is None
        token = "1733500000000-0"  # any well-formed token is met at once
    else:
        assert token is not None and valid_token(token)
    m = c.post("/v1/match", json={"embedding": unit(1), "k": 1}, headers={**auth, HEADER: token})
    assert m.status_code == 200 and m.json()["candidates"][0]["item_id"] == "ann-1"
    v = c.post(
        "/v1/verify",
        json={"a": {"embedding": unit(1)}, "b": {"item_id": "ann-1"}},
        headers={**auth, HEADER: token},
    )
    assert v.status_code == 200 and v.json()["accepted"]
    # every kind of write answers one (the delete's 204 included), each at or past the last
    put = c.put("/v1/gallery/ann-2", json={"subject": "ann", "embedding": unit(2)}, headers=auth)
    gone = c.delete("/v1/gallery/ann-2", headers=auth)
    assert put.status_code in (200, 201) and gone.status_code == 204
    if store == "redis":
        tokens = [token, put.headers[HEADER], gone.headers[HEADER]]
        assert [stream_position(t) for t in tokens] == sorted(stream_position(t) for t in tokens)
    # a read never answers one
    assert HEADER not in m.headers


@pytest.mark.redis
def test_a_position_the_feed_never_reaches_is_a_503_after_the_bounded_wait(
    artefact: Path, store_settings
) -> None:
    settings = make_settings(artefact, store_settings("redis"), consistency_wait_ms=50.0)
    with TestClient(create_app(settings)) as c:
        key = c.post("/v1/tenants", json={"name": "ct"}, headers=ADMIN).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}", HEADER: "99999999999999-0"}
        r = c.post("/v1/match", json={"embedding": unit(1), "k": 1}, headers=auth)
        assert r.status_code == 503 and r.json()["code"] == "not_caught_up"
        assert r.headers["Retry-After"] == "1"
        assert HEADER in r.json()["message"]


def test_a_token_that_is_not_one_is_a_422(served) -> None:
    c, auth, _ = served
    for bad in ("x", "1-2#3#4", "{tenant}*", "1" * 40, "-"):
        r = c.post("/v1/match", json={"embedding": unit(1), "k": 1}, headers={**auth, HEADER: bad})
        assert r.status_code == 422, (bad, r.text)
        body = r.json()
        assert body["code"] == "invalid_input" and HEADER in str(body["detail"]), body


@pytest.mark.redis
def test_a_lagging_replica_waits_for_the_write_the_token_names(
    artefact: Path, store_settings
) -> None:
    """Two replicas on one Redis. Replica b's feed follower is paused (deterministically, not
    by timing): a plain match on b misses the item a just enrolled, the same match carrying the
    write's token waits, and is answered with the item once b's follower runs again."""
    import threading
    import time

    store = store_settings("redis")
    with (
        TestClient(create_app(make_settings(artefact, store))) as a,
        TestClient(create_app(make_settings(artefact, store, consistency_wait_ms=30_000.0))) as b,
    ):
        key = a.post("/v1/tenants", json={"name": "lag"}, headers=ADMIN).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        assert b.get("/v1/gallery", headers=auth).status_code == 200  # b has loaded, follows
        sync_b = b.app.state.runtime.sync
        b.portal.call(sync_b.stop_follower)  # b now lags behind the feed
        r = a.post(
            "/v1/gallery",
            json={"items": [{"subject": "bo", "item_id": "bo-1", "embedding": unit(5)}]},
            headers=auth,
        )
        assert r.status_code == 201
        token = r.headers[HEADER]
        query = {"embedding": unit(5), "k": 1}
        stale = b.post("/v1/match", json=query, headers=auth).json()["candidates"]
        assert [c["item_id"] for c in stale] != ["bo-1"]  # the stale read the token prevents
        answer: list = []
        waiting = threading.Thread(
            target=lambda: answer.append(
                b.post("/v1/match", json=query, headers={**auth, HEADER: token})
            )
        )
        waiting.start()
        deadline = time.monotonic() + 30  # (bounded only so that a broken build fails)
        while sync_b.reads_waiting == 0:  # the read is parked on the token, not answered
            assert waiting.is_alive() and time.monotonic() < deadline, answer
            time.sleep(0.005)
        b.portal.call(sync_b.start_follower)
        waiting.join(60)
        assert answer and answer[0].status_code == 200, answer
        assert answer[0].json()["candidates"][0]["item_id"] == "bo-1"
