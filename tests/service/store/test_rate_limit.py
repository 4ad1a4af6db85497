"""Per-tenant rate limiting: a token bucket per tenant, in Redis (shared by replicas, atomic Lua
script) or in-process (SQLite). Real stores and real apps; short windows keep it fast."""

from __future__ import annotations

import asyncio
import base64
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.errors import InvalidInputError, StoreUnavailableError
from service.settings import Settings
from service.store.ratelimit import LocalRateLimiter, RedisRateLimiter, burst_of
from tests.service.conftest import (
    ADMIN_TOKEN,
    REDIS_URL,
    STORES,
    Digits,
    b64_png,
    make_settings,
    png_bytes,
    unit,
)
from tests.service.store.test_redis_down import free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# one token every 2 s: the burst is spent long before a token comes back, even on a busy machine
RATE, BURST = 0.5, 3


def new_tenant(c: TestClient) -> dict[str, str]:
    name = f"t-{uuid.uuid4().hex[:8]}"  # tenant names are unique in a store
    r = c.post("/v1/tenants", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


@pytest.fixture
def limited(
    artefact: Path, store_settings: Callable[[str], dict[str, Any]], request: pytest.FixtureRequest
) -> Iterator[TestClient]:
    settings = make_settings(
        artefact,
        store_settings(request.param),
        rate_limit_per_s=RATE,
        rate_limit_burst=BURST,
        monitor_enabled=False,
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize("limited", STORES, indirect=True)
def test_limit_hit_is_429_other_tenant_unaffected_and_refills(limited: TestClient) -> None:
    c = limited
    a, b = new_tenant(c), new_tenant(c)
    started = time.monotonic()
    for _ in range(BURST):
        assert c.get("/v1/gallery", headers=a).status_code == 200
    r = c.post("/v1/match", json={"embedding": unit(1)}, headers=a)
    assert time.monotonic() - started < 1 / RATE, "too slow for the test's window"
    assert r.status_code == 429, r.text
    body = r.json()
    assert set(body) == {"code", "message", "detail"} and body["code"] == "rate_limited"
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= math.ceil(1 / RATE)
    assert body["detail"]["retry_after_s"] == retry_after
    assert body["detail"]["limit_per_s"] == RATE and body["detail"]["burst"] == BURST
    # every tenant route is behind the limit, and refused requests take no token
    for method, path in (
        ("GET", "/v1/gallery/x"),
        ("DELETE", "/v1/subjects/s"),
        ("POST", "/v1/feedback"),
        ("GET", "/v1/monitor"),
    ):
        assert c.request(method, path, headers=a).status_code == 429, path

    # another tenant has its own bucket
    for _ in range(BURST):
        assert c.get("/v1/gallery", headers=b).status_code == 200
    assert c.get("/v1/gallery", headers=b).status_code == 429
    # admin routes, public routes and unauthenticated requests are not limited by it
    for _ in range(BURST + 2):
        assert c.get("/v1/tenants", headers=ADMIN).status_code == 200
        assert c.get("/v1/model").status_code == 200
        assert c.get("/v1/gallery").status_code == 401
    assert 'tcm_rate_limited_total{tenant="' in c.get("/metrics").text

    # refills: drained again right before, so that only two requests follow the wait (the work
    # above took an unknown time on a busy machine, and the bucket refilled meanwhile)
    for _ in range(BURST + 1):
        r = c.get("/v1/gallery", headers=a)
        if r.status_code == 429:
            break
    assert r.status_code == 429
    time.sleep(int(r.headers["retry-after"]) + 0.05)
    assert c.get("/v1/gallery", headers=a).status_code == 200
    assert c.get("/v1/gallery", headers=a).status_code == 429  # one token came back, not more


def test_limit_off_by_default(
    artefact: Path, store_settings: Callable[[str], dict[str, Any]]
) -> None:
    settings = make_settings(artefact, store_settings("sqlite"), monitor_enabled=False)
    assert settings.rate_limit_per_s == 0
    with TestClient(create_app(settings)) as c:
        a = new_tenant(c)
        assert all(c.get("/v1/gallery", headers=a).status_code == 200 for _ in range(30))
        assert c.app.state.runtime.rate_limiter is None


@pytest.mark.redis
def test_redis_bucket_is_shared_by_replicas(
    artefact: Path, store_settings: Callable[[str], dict[str, Any]]
) -> None:
    """Two replicas on one Redis share each tenant's bucket: together they allow the burst."""
    store = store_settings("redis")
    settings = make_settings(
        artefact, store, rate_limit_per_s=RATE, rate_limit_burst=BURST, monitor_enabled=False
    )
    with ExitStack() as stack:
        one = stack.enter_context(TestClient(create_app(settings)))
        two = stack.enter_context(TestClient(create_app(settings)))
        a = new_tenant(one)
        codes = [
            (one if i % 2 else two).get("/v1/gallery", headers=a).status_code
            for i in range(BURST + 2)
        ]
        assert codes == [200] * BURST + [429, 429]
        r = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(r.scan_iter(match=store["redis_key_prefix"] + "ratelimit:*"))
            assert len(keys) == 1
            ttl_ms = r.pttl(keys[0])
            # expires once the bucket would be full again: (BURST - tokens) / RATE + 1 s
            assert 0 < ttl_ms <= (BURST / RATE + 1) * 1000
        finally:
            r.close()


@pytest.mark.redis
def test_redis_script_is_atomic_under_concurrency(
    store_settings: Callable[[str], dict[str, Any]],
) -> None:
    """16 threads on 4 connections race for one bucket: exactly ``burst`` requests get in."""
    prefix = store_settings("redis")["redis_key_prefix"]
    burst = 25
    clients = [redis.Redis.from_url(REDIS_URL) for _ in range(4)]
    limiters = [RedisRateLimiter(cl, prefix=prefix, rate=0.01, burst=burst) for cl in clients]
    allowed: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker(i: int) -> None:
        lim = limiters[i % len(limiters)]
        barrier.wait()
        for _ in range(10):
            ok = lim.take("tenant-x") == 0
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for cl in clients:
        cl.close()
    assert len(allowed) == 160 and sum(allowed) == burst


def test_local_bucket_refills_at_rate_and_caps_at_burst() -> None:
    now = [100.0]
    lim = LocalRateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [lim.take("t") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.take("t") == pytest.approx(0.5)  # one token every 0.5 s
    assert lim.take("u") == 0.0  # other tenants are independent
    now[0] += 0.25
    assert lim.take("t") == pytest.approx(0.25)  # half a token is not a token
    now[0] += 0.25
    assert lim.take("t") == 0.0
    assert lim.take("t") > 0
    now[0] += 3600  # a long idle period refills to the burst, not beyond
    assert sum(lim.take("t") == 0.0 for _ in range(10)) == 3


def test_local_buckets_are_pruned(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    lim = LocalRateLimiter(rate=10.0, burst=2, clock=lambda: now[0])
    monkeypatch.setattr(LocalRateLimiter, "PRUNE_AT", 5)
    for i in range(5):
        lim.take(f"idle-{i}")
    now[0] += 1.0  # all full again
    lim.take("busy")
    lim.take("busy")
    assert set(lim._buckets) == {"busy"}


def test_redis_limiter_down_is_store_unavailable() -> None:
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    lim = RedisRateLimiter(client, prefix="tcmtest:nothing:", rate=1.0, burst=1)
    with pytest.raises(StoreUnavailableError, match="rate limit"):
        lim.take("t")
    client.close()


def test_settings() -> None:
    assert burst_of(0.5) == 1
    assert burst_of(7.5) == 8
    assert burst_of(7.5, 100) == 100
    for bad in (
        {"rate_limit_per_s": -1},
        {"rate_limit_per_s": float("inf")},
        {"rate_limit_burst": -1},
    ):
        with pytest.raises(ValidationError):
            Settings(**bad)


@pytest.mark.redis
def test_redis_bucket_caps_at_burst() -> None:
    """The Lua script's ``min(burst, ...)``: a bucket idle for a million seconds holds
    ``burst`` tokens, not a million (issue 15: dropping the cap went unnoticed)."""
    prefix = f"tcmtest:{uuid.uuid4().hex}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        limiter = RedisRateLimiter(client, prefix=prefix, rate=1.0, burst=3)
        now = float(client.time()[0])
        client.hset(limiter.key("t"), mapping={"tokens": "0", "ts": str(now - 1e6)})
        assert [limiter.take("t") for _ in range(3)] == [0.0, 0.0, 0.0]
        assert limiter.take("t") > 0.5  # the fourth waits for a refill
        assert float(client.hget(limiter.key("t"), "tokens")) < 1.0
    finally:
        client.delete(limiter.key("t"))
        client.close()


# --- the cost of a request is its work (issue 25 item 6) -------------------------------------
# one unit every 1,000 s: no unit comes back while a test runs, so every count below is exact
# (no timing assumption), and a 5-unit bucket keeps the counting short
SLOW, CAP = 1e-3, 5


@pytest.fixture
def costly(
    artefact: Path, store_settings: Callable[[str], dict[str, Any]], request: pytest.FixtureRequest
) -> Iterator[TestClient]:
    settings = make_settings(
        artefact,
        store_settings(request.param),
        rate_limit_per_s=SLOW,
        rate_limit_burst=CAP,
        monitor_enabled=False,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def units_left(c: TestClient, auth: dict[str, str]) -> int:
    """Spends the tenant's bucket one GET (one unit) at a time: how many units it held."""
    for n in range(CAP + 1):
        r = c.get("/v1/gallery", headers=auth)
        if r.status_code == 429:
            return n
        assert r.status_code == 200, r.text
    raise AssertionError(f"more than the burst ({CAP}) was left")


def embedded(n: int, seed: int = 0) -> list[dict[str, Any]]:
    return [{"subject": f"s{i}", "embedding": unit(seed + i)} for i in range(n)]


def columns(n: int, seed: int = 0) -> dict[str, Any]:
    """``n`` items as the columnar enrolment's body."""
    rows = np.asarray([unit(seed + i) for i in range(n)], dtype="<f4")
    return {
        "subjects": [f"s{i}" for i in range(n)],
        "embeddings_b64": base64.b64encode(rows.tobytes()).decode(),
    }


@pytest.mark.parametrize("costly", STORES, indirect=True)
def test_enrolment_costs_one_unit_per_item(costly: TestClient) -> None:
    """Burst B: one enrolment of B+1 items is refused (422, it could never be admitted) and
    stores nothing; B single-item enrolments pass; one enrolment of B items takes the whole
    bucket. Before, every request took one unit whatever its size."""
    c = costly
    a, b, e = new_tenant(c), new_tenant(c), new_tenant(c)

    r = c.post("/v1/gallery", json={"items": embedded(CAP + 1)}, headers=a)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "too_many_items"
    assert body["detail"] == {"cost": CAP + 1, "burst": CAP, "limit_per_s": SLOW}
    assert f"at most {CAP} per request" in body["message"]
    # like any 422 it cost its one unit (taken on authentication), no more
    assert c.get("/v1/gallery", headers=a).json()["items"] == []
    assert units_left(c, a) == CAP - 2

    for i in range(CAP):
        r = c.post("/v1/gallery", json={"items": embedded(1, i)}, headers=b)
        assert r.status_code == 201, (i, r.text)
    r = c.post("/v1/gallery", json={"items": embedded(1)}, headers=b)
    assert r.status_code == 429 and r.json()["code"] == "rate_limited"

    assert c.post("/v1/gallery", json={"items": embedded(CAP)}, headers=e).status_code == 201
    assert c.get("/v1/gallery", headers=e).status_code == 429


@pytest.mark.parametrize("costly", STORES, indirect=True)
def test_batch_match_costs_one_unit_per_query(costly: TestClient) -> None:
    """A batch match of n queries takes n units; refused (429), it takes none, not even the
    one taken on authentication, and its Retry-After is the wait for all n."""
    c = costly
    a = new_tenant(c)
    assert c.post("/v1/gallery", json={"items": embedded(1)}, headers=a).status_code == 201
    queries = [{"embedding": unit(i)} for i in range(3)]
    r = c.post("/v1/match/batch", json={"queries": queries, "k": 1}, headers=a)
    assert r.status_code == 200, r.text  # 1 + 3 units taken, 1 left
    r = c.post("/v1/match/batch", json={"queries": queries[:2], "k": 1}, headers=a)
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["code"] == "rate_limited" and body["detail"]["cost"] == 2
    assert "2 work units" in body["message"]
    # 1 unit is there, 2 are needed: one more comes back in 1 / SLOW seconds
    assert int(r.headers["retry-after"]) == body["detail"]["retry_after_s"] == round(1 / SLOW)
    assert units_left(c, a) == 1  # the refused batch gave its first unit back

    # the limits that existed before answer as before, ahead of the cost
    b = new_tenant(c)
    r = c.post("/v1/match/batch", json={"queries": queries[:1] * 65}, headers=b)
    assert r.status_code == 422 and r.json()["detail"] == {"max_batch_items": 64}
    r = c.post("/v1/match/batch", json={"queries": queries[:1] * (CAP + 1)}, headers=b)
    assert r.status_code == 422 and r.json()["detail"]["cost"] == CAP + 1


@pytest.mark.parametrize("costly", STORES, indirect=True)
def test_each_route_costs_its_work(costly: TestClient, digits: Digits) -> None:
    """The documented cost of every tenant route (service/README.md, "Rate limiting"): the
    units a fresh tenant has left after one request of each."""
    c = costly
    img, png = b64_png(digits.images[0]), png_bytes(digits.images[0])
    emb = {"embedding": unit(0)}
    upload = {"file": ("x.png", png, "image/png")}
    cases: list[tuple[str, str, dict[str, Any], int, int]] = [
        # method, path, request keywords, status, cost
        ("POST", "/v1/gallery", {"json": {"items": embedded(3)}}, 201, 3),
        ("POST", "/v1/gallery/columns", {"json": columns(3)}, 201, 3),
        ("POST", "/v1/gallery/upload", {"files": upload, "data": {"subject": "s"}}, 201, 1),
        ("PUT", "/v1/gallery/x", {"json": {"subject": "s", **emb}}, 201, 1),
        ("GET", "/v1/gallery", {}, 200, 1),
        ("GET", "/v1/gallery/nope", {}, 404, 1),
        ("DELETE", "/v1/gallery/nope", {}, 404, 1),
        ("GET", "/v1/subjects", {}, 200, 1),
        ("DELETE", "/v1/subjects/nope", {}, 404, 1),
        ("POST", "/v1/match", {"json": {"image": img}}, 200, 1),
        ("POST", "/v1/match/upload", {"files": upload}, 200, 1),
        ("POST", "/v1/match/batch", {"json": {"queries": [emb] * 4}}, 200, 4),
        ("POST", "/v1/verify", {"json": {"a": emb, "b": {"image": img}}}, 200, 1),
        (
            "POST",
            "/v1/verify/upload",
            {"files": {"a": ("a.png", png, "image/png"), "b": ("b.png", png, "image/png")}},
            200,
            1,
        ),
        ("POST", "/v1/embed", {"json": {"images": [img] * 2}}, 200, 2),
        ("POST", "/v1/embed/upload", {"files": upload}, 200, 1),
        ("POST", "/v1/feedback", {"json": {"match_id": "nope", "correct": True}}, 404, 1),
        ("GET", "/v1/monitor", {}, 404, 1),  # monitoring is off here: still one unit
        ("POST", "/v1/gallery", {"json": {"items": "not a list"}}, 422, 1),  # invalid: one
    ]
    for method, path, kwargs, status, cost in cases:
        auth = new_tenant(c)
        r = c.request(method, path, headers=auth, **kwargs)
        assert r.status_code == status, (method, path, r.text)
        assert units_left(c, auth) == CAP - cost, (method, path)


@pytest.mark.parametrize("kind", ["local", pytest.param("redis", marks=pytest.mark.redis)])
def test_limiters_charge_costs(kind: str, store_settings: Callable[[str], dict[str, Any]]) -> None:
    """Both limiters, directly: a take of n units takes n; a refused take takes nothing and
    gives back what the same request prepaid; more than the burst is never admissible."""
    client = None
    if kind == "redis":
        client = redis.Redis.from_url(REDIS_URL)
        lim: Any = RedisRateLimiter(
            client, prefix=store_settings("redis")["redis_key_prefix"], rate=SLOW, burst=CAP
        )
    else:
        lim = LocalRateLimiter(SLOW, CAP)
    try:
        for cost, prepaid in ((CAP + 1, 0), (CAP, 1)):
            with pytest.raises(InvalidInputError) as err:
                asyncio.run(lim.check("big", cost, prepaid=prepaid))
            assert err.value.code == "too_many_items"
            assert err.value.detail == {"cost": CAP + 1, "burst": CAP, "limit_per_s": SLOW}
        # the refusals took nothing: B single units are there
        assert [lim.take("big") == 0 for _ in range(CAP + 1)] == [True] * CAP + [False]

        assert lim.take("n", 3) == 0  # 2 left
        assert lim.take("n", 3) == pytest.approx(1 / SLOW, rel=1e-3)  # refused: 1 missing
        assert lim.take("n", 2) == 0  # the refusal took nothing
        assert lim.take("n") > 0

        assert lim.take("p", 3) == 0  # 2 left
        assert lim.take("p") == 0  # a request's first unit: 1 left
        wait = lim.take("p", 2, 1)  # its other 2: refused, its first unit given back
        assert wait == pytest.approx(1 / SLOW, rel=1e-3)  # for all 3: 2 there, 1 missing
        assert lim.take("p", 2) == 0
        assert lim.take("p") > 0
    finally:
        if client is not None:
            client.close()


@pytest.mark.parametrize("kind", ["local", pytest.param("redis", marks=pytest.mark.redis)])
def test_costly_takes_are_atomic_under_concurrency(
    kind: str, store_settings: Callable[[str], dict[str, Any]]
) -> None:
    """16 threads take 3 units at a time from one bucket of 25: exactly 8 get in (24 units),
    whatever the interleaving."""
    burst, cost = 25, 3
    clients = []
    if kind == "redis":
        prefix = store_settings("redis")["redis_key_prefix"]
        clients = [redis.Redis.from_url(REDIS_URL) for _ in range(4)]
        limiters: list[Any] = [
            RedisRateLimiter(cl, prefix=prefix, rate=1e-4, burst=burst) for cl in clients
        ]
    else:
        limiters = [LocalRateLimiter(1e-4, burst)]
    allowed: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker(i: int) -> None:
        lim = limiters[i % len(limiters)]
        barrier.wait()
        for _ in range(4):
            ok = lim.take("tenant-x", cost) == 0
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for cl in clients:
        cl.close()
    assert len(allowed) == 64 and sum(allowed) == burst // cost
