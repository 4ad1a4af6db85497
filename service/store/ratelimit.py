"""Per-tenant rate limiting: a token bucket per tenant, shared by replicas when the store is Redis.

A tenant's bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per second; each
authenticated request takes one. An empty bucket refuses the request with
:class:`RateLimitedError` (HTTP 429, ``Retry-After`` = seconds until a token is back).

- With a Redis store the bucket is one hash ``P ratelimit:T`` (fields ``tokens``, ``ts``), read
  and updated by one Lua script, so the check-and-take is atomic across every replica, and timed
  with the Redis server's clock (``TIME``), so replicas' clock skew does not matter. The key
  expires once the bucket would be full again, so idle tenants cost nothing.
- With SQLite (one process per file) the buckets live in this process.

``rate_limit_per_s = 0`` (the default) turns the limiter off.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis
from starlette.concurrency import run_in_threadpool

from service.errors import RateLimitedError, StoreUnavailableError
from service.ids import key_part
from service.store import Store
from service.store.redis_store import UNAVAILABLE as REDIS_UNAVAILABLE
from service.store.redis_store import RedisStore

# KEYS[1] bucket key; ARGV rate (tokens/s), burst (capacity), cost (tokens this request takes).
# Returns {allowed (0/1), seconds until the cost is available (string: Lua numbers become
# integers when returned to the client)}.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, string.format('%.17g', wait)}
"""


class RateLimiter(Protocol):
    rate: float
    burst: int

    async def check(self, tenant_id: str) -> None:
        """Takes one token from the tenant's bucket, or raises :class:`RateLimitedError`."""


def _refuse(wait_s: float, rate: float, burst: int) -> RateLimitedError:
    retry_after = max(1, math.ceil(wait_s))
    return RateLimitedError(
        f"too many requests for this tenant: the limit is {rate:g} per second with bursts "
        f"of {burst}; retry after {retry_after} s",
        detail={"limit_per_s": rate, "burst": burst, "retry_after_s": retry_after},
        retry_after_s=retry_after)


class LocalRateLimiter:
    """Token buckets in this process (one process per SQLite file, so they are exact)."""

    #: beyond this many buckets, the ones that are full again (idle tenants) are dropped
    PRUNE_AT = 10_000

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, tenant_id: str, cost: float = 1.0) -> float:
        """Takes ``cost`` tokens; returns 0 if allowed, else the seconds until they are there."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(tenant_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
            wait = 0.0
            if tokens >= cost:
                tokens -= cost
            else:
                wait = (cost - tokens) / self.rate
            self._buckets[tenant_id] = (tokens, now)
            if len(self._buckets) > self.PRUNE_AT:
                self._prune(now)
            return wait

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {t: (tok, at) for t, (tok, at) in self._buckets.items()
                         if now - at < full_after}

    async def check(self, tenant_id: str) -> None:
        wait = self.take(tenant_id)  # no I/O: fine on the event loop
        if wait > 0:
            raise _refuse(wait, self.rate, self.burst)


class RedisRateLimiter:
    """Token buckets in Redis, one atomic Lua script per request; shared by all replicas. Uses
    the store's client, so a Sentinel-managed primary is followed across failovers."""

    def __init__(self, client: redis.Redis, *, prefix: str, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.prefix = prefix
        self._script = client.register_script(TOKEN_BUCKET_LUA)

    def key(self, tenant_id: str) -> str:
        return f"{self.prefix}ratelimit:{key_part(tenant_id)}"

    def take(self, tenant_id: str, cost: float = 1.0) -> float:
        try:
            allowed, wait = self._script(keys=[self.key(tenant_id)],
                                         args=[repr(self.rate), self.burst, repr(cost)])
        except REDIS_UNAVAILABLE as exc:  # the store's own list: down, timeout, failover
            raise StoreUnavailableError(
                f"the Redis store cannot be reached (rate limit): {exc}",
                detail={"store": "redis"}) from exc
        return 0.0 if int(allowed) == 1 else max(float(wait), 1e-9)

    async def check(self, tenant_id: str) -> None:
        wait = await run_in_threadpool(self.take, tenant_id)
        if wait > 0:
            raise _refuse(wait, self.rate, self.burst)


def burst_of(rate_per_s: float, burst: int = 0) -> int:
    """The bucket capacity: ``burst``, or one second's worth of requests when 0."""
    return burst or max(1, math.ceil(rate_per_s))


def open_rate_limiter(store: Store, *, rate_per_s: float, burst: int = 0
                      ) -> RateLimiter | None:
    """The limiter for this store (None when ``rate_per_s`` is 0)."""
    if rate_per_s <= 0:
        return None
    rate, burst = rate_per_s, burst_of(rate_per_s, burst)
    if isinstance(store, RedisStore):
        return RedisRateLimiter(store.r, prefix=store.prefix, rate=rate, burst=burst)
    return LocalRateLimiter(rate, burst)
