"""Per-tenant rate limiting: a token bucket per tenant, shared by replicas when the store is Redis.

The limit is on **work**, not on requests: a tenant's bucket holds at most ``burst`` work units
and refills at ``rate`` units per second. A request costs the work it asks for (issue 25 item
6: one token used to buy an enrolment of 10,000 items or a batch match of 256 queries):

- every request authenticated with a tenant key takes **one unit** right after
  authentication (``Runtime.check_rate``), before its body is validated, so a request that is
  then refused for its body (422, 404, 409, ...) still costs that unit;
- a request whose work is ``n > 1`` units (``POST /v1/gallery``: its items, ``POST
  /v1/match/batch``: its queries, ``POST /v1/embed``: its images) takes the other ``n - 1``
  once its body is parsed and checked, before any of the work (``Runtime.charge``). That take
  is atomic and, when refused, gives the unit taken at authentication back in the same step,
  so a request refused with 429 costs nothing and its ``Retry-After`` is the wait for all ``n``;
- a request of more than ``burst`` units could never be admitted: it is a 422
  ``too_many_items`` naming the burst (not a 429: retrying, which clients do on 429, would never
  help), and like any 422 it costs its one unit.

An empty bucket refuses with :class:`RateLimitedError` (HTTP 429, ``Retry-After`` = seconds
until the request's units are back).

- With a Redis store the bucket is one hash ``P ratelimit:T`` (fields ``tokens``, ``ts``), read
  and updated by one Lua script, so the check-and-take is atomic across every replica, and timed
  with the Redis server's clock (``TIME``), so replicas' clock skew does not matter. The key
  expires once the bucket would be full again, so idle tenants cost nothing.
- With SQLite (one process per file) the buckets live in this process, under a lock.

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

from service.errors import InvalidInputError, RateLimitedError, StoreUnavailableError
from service.ids import key_part
from service.store import Store
from service.store.redis_store import UNAVAILABLE as REDIS_UNAVAILABLE
from service.store.redis_store import RedisStore

# KEYS[1] bucket key; ARGV rate (units/s), burst (capacity), cost (units this take needs),
# prepaid (units the same request took before, given back when this take is refused). Returns
# {allowed (0/1), seconds until the cost is available (string: Lua numbers become integers when
# returned to the client)}.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local prepaid = tonumber(ARGV[4]) or 0
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
  tokens = math.min(burst, tokens + prepaid)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, string.format('%.17g', wait)}
"""


class RateLimiter(Protocol):
    rate: float
    burst: int

    async def check(self, tenant_id: str, cost: int = 1, *, prepaid: int = 0) -> None:
        """Takes ``cost`` units from the tenant's bucket in one atomic step, or raises
        :class:`RateLimitedError` (and gives back the ``prepaid`` units the same request took
        before, in that same step); :class:`InvalidInputError` when ``prepaid + cost`` exceeds
        the burst (such a request can never be admitted)."""


def _refuse(wait_s: float, rate: float, burst: int, units: int = 1) -> RateLimitedError:
    retry_after = max(1, math.ceil(wait_s))
    if units == 1:  # the message and detail of a one-unit request, as before costs existed
        return RateLimitedError(
            f"too many requests for this tenant: the limit is {rate:g} per second with bursts "
            f"of {burst}; retry after {retry_after} s",
            detail={"limit_per_s": rate, "burst": burst, "retry_after_s": retry_after},
            retry_after_s=retry_after,
        )
    return RateLimitedError(
        f"too many requests for this tenant: this request is {units} work units, the limit is "
        f"{rate:g} per second with bursts of {burst}; retry after {retry_after} s",
        detail={"limit_per_s": rate, "burst": burst, "retry_after_s": retry_after, "cost": units},
        retry_after_s=retry_after,
    )


def over_capacity(units: int, rate: float, burst: int) -> InvalidInputError:
    """A request of more units than the bucket holds: no wait would ever admit it."""
    return InvalidInputError(
        f"this request is {units} work units (items, queries or images), more than this "
        f"tenant's rate limit ever admits at once (bursts of {burst}, at {rate:g} per second): "
        f"send at most {burst} per request",
        code="too_many_items",
        detail={"cost": units, "burst": burst, "limit_per_s": rate},
    )


def _units(cost: float, prepaid: float) -> int:
    return math.ceil(cost + prepaid)


class LocalRateLimiter:
    """Token buckets in this process (one process per SQLite file, so they are exact)."""

    #: beyond this many buckets, the ones that are full again (idle tenants) are dropped
    PRUNE_AT = 10_000

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, tenant_id: str, cost: float = 1.0, prepaid: float = 0.0) -> float:
        """Takes ``cost`` units; returns 0 if allowed, else the seconds until they are there
        (and then gives back ``prepaid`` units). One step under the lock."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(tenant_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
            wait = 0.0
            if tokens >= cost:
                tokens -= cost
            else:
                wait = (cost - tokens) / self.rate
                tokens = min(float(self.burst), tokens + prepaid)
            self._buckets[tenant_id] = (tokens, now)
            if len(self._buckets) > self.PRUNE_AT:
                self._prune(now)
            return wait

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {
            t: (tok, at) for t, (tok, at) in self._buckets.items() if now - at < full_after
        }

    async def check(self, tenant_id: str, cost: int = 1, *, prepaid: int = 0) -> None:
        if cost + prepaid > self.burst:
            raise over_capacity(_units(cost, prepaid), self.rate, self.burst)
        wait = self.take(tenant_id, cost, prepaid)  # no I/O: fine on the event loop
        if wait > 0:
            raise _refuse(wait, self.rate, self.burst, _units(cost, prepaid))


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

    def take(self, tenant_id: str, cost: float = 1.0, prepaid: float = 0.0) -> float:
        """As :meth:`LocalRateLimiter.take`, in one Lua script (atomic across replicas)."""
        try:
            allowed, wait = self._script(
                keys=[self.key(tenant_id)],
                args=[repr(self.rate), self.burst, repr(float(cost)), repr(float(prepaid))],
            )
        except REDIS_UNAVAILABLE as exc:  # the store's own list: down, timeout, failover
            raise StoreUnavailableError(
                f"the Redis store cannot be reached (rate limit): {exc}", detail={"store": "redis"}
            ) from exc
        return 0.0 if int(allowed) == 1 else max(float(wait), 1e-9)

    async def check(self, tenant_id: str, cost: int = 1, *, prepaid: int = 0) -> None:
        if cost + prepaid > self.burst:
            raise over_capacity(_units(cost, prepaid), self.rate, self.burst)
        wait = await run_in_threadpool(self.take, tenant_id, cost, prepaid)
        if wait > 0:
            raise _refuse(wait, self.rate, self.burst, _units(cost, prepaid))


def burst_of(rate_per_s: float, burst: int = 0) -> int:
    """The bucket capacity: ``burst``, or one second's worth of work units when 0."""
    return burst or max(1, math.ceil(rate_per_s))


def open_rate_limiter(store: Store, *, rate_per_s: float, burst: int = 0) -> RateLimiter | None:
    """The limiter for this store (None when ``rate_per_s`` is 0)."""
    if rate_per_s <= 0:
        return None
    rate, burst = rate_per_s, burst_of(rate_per_s, burst)
    if isinstance(store, RedisStore):
        return RedisRateLimiter(store.r, prefix=store.prefix, rate=rate, burst=burst)
    return LocalRateLimiter(rate, burst)
