"""Per-tenant rate limiting: a token bucket per tenant, in Redis (shared by replicas, atomic Lua
script) or in-process (SQLite). Real stores and real apps; short windows keep it fast."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.errors import StoreUnavailableError
from service.settings import Settings
from service.store.ratelimit import LocalRateLimiter, RedisRateLimiter, burst_of
from tests.service.conftest import ADMIN_TOKEN, REDIS_URL, STORES, make_settings, unit
from tests.service.test_redis_down import free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# one token every 2 s: the burst is spent long before a token comes back, even on a busy machine
RATE, BURST = 0.5, 3


def new_tenant(c: TestClient) -> dict[str, str]:
    r = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


@pytest.fixture
def limited(artefact: Path, store_settings: Callable[[str], dict[str, Any]],
            request: pytest.FixtureRequest) -> Iterator[TestClient]:
    settings = make_settings(artefact, store_settings(request.param), rate_limit_per_s=RATE,
                             rate_limit_burst=BURST, monitor_enabled=False)
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
    for method, path in (("GET", "/v1/gallery/x"), ("DELETE", "/v1/subjects/s"),
                         ("POST", "/v1/feedback"), ("GET", "/v1/monitor")):
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

    time.sleep(retry_after + 0.05)
    assert c.get("/v1/gallery", headers=a).status_code == 200
    assert c.get("/v1/gallery", headers=a).status_code == 429  # one token came back, not more


def test_limit_off_by_default(artefact: Path,
                              store_settings: Callable[[str], dict[str, Any]]) -> None:
    settings = make_settings(artefact, store_settings("sqlite"), monitor_enabled=False)
    assert settings.rate_limit_per_s == 0
    with TestClient(create_app(settings)) as c:
        a = new_tenant(c)
        assert all(c.get("/v1/gallery", headers=a).status_code == 200 for _ in range(30))
        assert c.app.state.runtime.rate_limiter is None


@pytest.mark.redis
def test_redis_bucket_is_shared_by_replicas(artefact: Path,
                                            store_settings: Callable[[str], dict[str, Any]]
                                            ) -> None:
    """Two replicas on one Redis share each tenant's bucket: together they allow the burst."""
    store = store_settings("redis")
    settings = make_settings(artefact, store, rate_limit_per_s=RATE, rate_limit_burst=BURST,
                             monitor_enabled=False)
    with ExitStack() as stack:
        one = stack.enter_context(TestClient(create_app(settings)))
        two = stack.enter_context(TestClient(create_app(settings)))
        a = new_tenant(one)
        codes = [(one if i % 2 else two).get("/v1/gallery", headers=a).status_code
                 for i in range(BURST + 2)]
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
        store_settings: Callable[[str], dict[str, Any]]) -> None:
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
    for bad in ({"rate_limit_per_s": -1}, {"rate_limit_per_s": float("inf")},
                {"rate_limit_burst": -1}):
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
