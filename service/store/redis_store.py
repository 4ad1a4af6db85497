"""Redis store, shared by several service replicas.

Layout (every key starts with the configured prefix ``P``, default ``tcm:``; ``T`` is a tenant id,
hex; every id in a key goes through :func:`service.ids.key_part`, so no id contains the ``:``
separator and no key is a prefix-collision of another)::

    P tenants                   zset   tenant_id -> created_at
    P tenant:T                  hash   name, created_at
    P tenant_name:H             string tenant_id holding the name whose tenant_name_digest is H
                                       (tenant names are unique; set with the tenant, in its
                                       transaction, and deleted with it)
    P tenant_names:v1           string set once every tenant older than the name keys has one
                                       (a one-time backfill of older stores, oldest first)
    P tenant:T:keys             set    key ids of the tenant
    P key:K                     hash   tenant_id, key_hash, created_at, revoked_at ("" = active)
    P seq                       string counter behind every item's seq (FAISS id), never reused
    P tenant:T:items            zset   item_id -> seq            (listing order, rebuilds)
    P tenant:T:subject:S        zset   item_id -> seq            (one per subject)
    P tenant:T:subjects         zset   subject -> 0 (lexicographic: the subject listing; may
                                       hold emptied subjects, dropped when a listing meets them)
    P tenant:T:item:I           hash   seq, subject, metadata (JSON), created_at, has_image,
                                       image (bytes, when enrolled from an image),
                                       emb:<model_version> (float32 little-endian bytes)
    P tenant:T:matches          zset   match_id -> created_at
    P tenant:T:match:M          hash   decision fields of the match record
    P tenant:T:feedback:M       hash   feedback fields
    P tenant:T:staged:B:i       hash   an enrolment's item i while it is staged (batch B); renamed
                                       to tenant:T:item:I when committed, else expires in 1 h
    P tenant:T:idem:K           hash   fingerprint, result: an Idempotency-Key recorded with its
                                       enrolment, in the same script (expires: 24 h by default)
    P tenant:T:labelled         zset   match_id -> created_at of the matches that have feedback
                                       (what the monitor reads: its window of labelled ones)
    P labelled:v1               string set once every feedback older than the labelled zsets
                                       is in them (a one-time backfill of older stores)
    P changes                   stream op (add | remove | drop_tenant), tenant, items / seqs (JSON)
    P monitor:snapshot          string the monitor's latest snapshot (JSON), shared by replicas
    P models                    hash   rev, body: the model registry (JSON), compare-and-set on rev;
                                       writer: the last write's token (a resend knows its own)
    P ratelimit:T               hash   tokens, ts: the tenant's rate-limit bucket (with a TTL;
                                       written only by ``service.store.ratelimit``'s Lua script)
    P acks                      string counter written right before each ``WAIT`` (below)

Multi-key writes run in MULTI/EXEC transactions (all-or-nothing); checks that must hold when
they commit (feedback not yet given, an upserted item's previous version) WATCH their keys. A
bulk enrolment stages its item hashes in small pipelines, then commits them with one short Lua
script (:data:`ADD_ITEMS_LUA`: checks, renames into place and indexes, in one atomic step),
and the start-up read pages through a gallery with :data:`GALLERY_PAGE_LUA`. Every gallery write
appends its change to the ``changes`` stream inside the same transaction, so a replica tailing
the stream (XREAD) sees exactly the committed writes, in order; the stream is capped at about
``CHANGES_MAXLEN`` entries (hours at normal rates). A replica that falls further behind than
that (cut off from Redis, or stalled) is told so by a "resync" change and rebuilds its indexes
from the store (:meth:`RedisStore.read_changes`). Connection failures become
:class:`StoreUnavailableError`; the client reconnects on the next call.

**Acknowledged writes** (``wait_replicas`` > 0, ``TCM_REDIS_WAIT_REPLICAS``): Redis replicates
asynchronously, so a write the primary confirmed can still be lost when the primary dies before
its replica received it and the replica is promoted (Sentinel, Cluster). With ``wait_replicas``
= N, every write of record (tenants, keys, gallery writes, feedback, the model registry; not the
match records a match writes) is confirmed only once N replicas hold it, by ``WAIT N``: else
the call raises :class:`StoreUnavailableError` (503) and the write stays on the primary, where
a retry finds it (an enrolment retried with its ``Idempotency-Key`` is replayed, and
acknowledged, not applied twice). ``WAIT`` counts the writes of the connection it is sent on,
while a redis-py transaction gives its pooled connection back when it executes; so the store
writes one more key (``P acks``) and sends ``WAIT`` right behind it, in one pipeline on one
connection: the primary's replication stream is one sequence, so replicas that hold that
later write hold the acknowledged one (:meth:`RedisStore._acknowledge`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import redis
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from service.errors import ConflictError, NotFoundError, StoreUnavailableError
from service.ids import glob_escape, key_part, key_part_decode
from service.settings import SENTINEL_SCHEME, SentinelURL
from service.store.base import (
    GALLERY_CHUNK_ROWS,
    ApiKey,
    Change,
    Decision,
    Feedback,
    GalleryItem,
    GalleryVectors,
    Idempotent,
    IdempotentReplay,
    MatchRecord,
    NewItem,
    Tenant,
    decode_vector,
    decode_vectors,
    duplicate_name,
    encode_vector,
    metadata_of,
    tenant_name_digest,
)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
_CHUNK = 500
CHANGES_MAXLEN = 100_000

# One page of a tenant's gallery, for the start-up read. KEYS: 1 the items zset. ARGV: 1 the
# page's lowest seq ("-inf" or "(<last seq of the previous page>": by score, not rank, so that a
# delete between two pages cannot shift an item past the cursor), 2 the page size, 3 the item
# key prefix ("P tenant:T:item:"), 4 the embedding field, 5 the mode. Item keys are built as
# service.ids.key_part builds them ("%" -> "%25", ":" -> "%3A"). Mode "vectors" returns
# {members scanned, last seq, ids, seqs, subjects, metadata, vectors}, leaving out items without
# the field (vectors of unequal length are an error; returned as an array, not concatenated in
# Lua, which was 2x slower at 512-d); mode "plain" the same with no metadata read (an empty
# list: the monitor uses vectors only); mode "missing" returns {members scanned, last seq, ids of
# the items without the field}.
GALLERY_PAGE_LUA = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0,
                          ARGV[2])
local missing = ARGV[5] == 'missing'
local plain = ARGV[5] == 'plain'
local ids, seqs, subjects, metas, vecs = {}, {}, {}, {}, {}
local width = nil
for i = 1, #members, 2 do
  local id = members[i]
  local key = ARGV[3] .. string.gsub(string.gsub(id, '%%', '%%25'), ':', '%%3A')
  if missing then
    if redis.call('HEXISTS', key, ARGV[4]) == 0 then ids[#ids + 1] = id end
  else
    local v
    if plain then v = redis.call('HMGET', key, 'subject', ARGV[4])
    else v = redis.call('HMGET', key, 'subject', ARGV[4], 'metadata') end
    if v[2] then
      if width == nil then width = #v[2] end
      if #v[2] ~= width then
        return redis.error_reply('vectors of unequal length in one gallery: item ' .. id)
      end
      local n = #ids + 1
      ids[n], seqs[n], vecs[n] = id, members[i + 1], v[2]
      subjects[n] = v[1] or ''
      if not plain then metas[n] = v[3] or '{}' end
    end
  end
end
local last = members[#members] or ''
if missing then return {#members / 2, last, ids} end
return {#members / 2, last, ids, seqs, subjects, metas, vecs}
"""
_PAGE_ROWS = 1024  # items per page script (faster than 8,192 at 128-d and 512-d, measured)

# add_items commits a batch whose item hashes were staged beforehand (see RedisStore.add_items),
# in one atomic step. KEYS: 1 tenant record, 2 seq counter, 3 items zset, 4 subjects zset,
# 5 change stream, then the n item hashes, then the n staged hashes, then one zset per distinct
# subject, then (with an idempotency key) its hash. ARGV: 1 n, 2 stream maxlen, 3 tenant id,
# 4 item ids (JSON, for the change entry), 5 m, the m distinct subjects, then 2 per item:
# item_id, subject slot (0-based), then (with an idempotency key) its fingerprint, the result
# and the seconds to keep it. Returns {-1} (tenant gone), {2, fingerprint, result} (the key is
# recorded already), {0, ids...} (ids taken), {-2} (a staged hash is gone: expired or swept) or
# {1, last seq}. Nothing is written unless every check passes. The vectors and images are not
# in this call: each staged hash is RENAMEd into place (no copy), so Redis is held for a few
# operations per item, not for the bytes of the batch. ZADDs go in slices: Lua's unpack takes
# a bounded number of values.
ADD_ITEMS_LUA = """
local n, m = tonumber(ARGV[1]), tonumber(ARGV[5])
local base = 5 + m  -- item i's arguments are ARGV[base + 2i - 1 .. base + 2i]
local idem = KEYS[6 + 2 * n + m]  -- nil without an idempotency key
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if idem then
  local prior = redis.call('HMGET', idem, 'fingerprint', 'result')
  if prior[1] then return {2, prior[1], prior[2]} end
end
local taken = {0}
for i = 1, n do
  if redis.call('EXISTS', KEYS[5 + i]) == 1 then taken[#taken + 1] = ARGV[base + 2 * i - 1] end
end
if #taken > 1 then return taken end
for i = 1, n do
  if redis.call('EXISTS', KEYS[5 + n + i]) == 0 then return {-2} end
end
local last = redis.call('INCRBY', KEYS[2], n)
local first = last - n
local by_item, by_subject = {}, {}
for i = 1, n do
  local seq = first + i
  local id, slot = ARGV[base + 2 * i - 1], tonumber(ARGV[base + 2 * i])
  redis.call('RENAME', KEYS[5 + n + i], KEYS[5 + i])
  redis.call('PERSIST', KEYS[5 + i])
  redis.call('HSET', KEYS[5 + i], 'seq', seq)
  by_item[#by_item + 1] = seq
  by_item[#by_item + 1] = id
  local members = by_subject[slot + 1]
  if members == nil then
    members = {}
    by_subject[slot + 1] = members
  end
  members[#members + 1] = seq
  members[#members + 1] = id
end
local function zadd(key, pairs)
  for j = 1, #pairs, 2000 do
    redis.call('ZADD', key, unpack(pairs, j, math.min(j + 1999, #pairs)))
  end
end
zadd(KEYS[3], by_item)
local subjects = {}
for j = 1, m do
  zadd(KEYS[5 + 2 * n + j], by_subject[j])
  subjects[#subjects + 1] = 0
  subjects[#subjects + 1] = ARGV[5 + j]
end
zadd(KEYS[4], subjects)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[2], '*', 'op', 'add', 'tenant', ARGV[3],
           'items', ARGV[4], 'first', first + 1, 'last', last)
if idem then
  local a = base + 2 * n
  redis.call('HSET', idem, 'fingerprint', ARGV[a + 1], 'result', ARGV[a + 2])
  redis.call('EXPIRE', idem, ARGV[a + 3])
end
return {1, last}
"""
STAGE_CHUNK = 256  # items per staging pipeline
# KEYS: 1 an API key's hash; ARGV: 1 the revocation time. 1 if it was active (now revoked)
REVOKE_LUA = (
    "if redis.call('HGET', KEYS[1], 'revoked_at') == '' then "
    "redis.call('HSET', KEYS[1], 'revoked_at', ARGV[1]) return 1 end return 0"
)
STAGE_TTL_S = 3600  # a staged batch not committed by then is dropped by Redis
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
    *((redis.exceptions.MasterDownError,) if hasattr(redis.exceptions, "MasterDownError") else ()),
    # Redis Cluster: a shard without a master (until its replica is promoted), a slot being
    # moved (TRYAGAIN), or redirections that did not settle
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterError,
    redis.exceptions.SlotNotCoveredError,
)


def _connection_lost(exc: BaseException) -> bool:
    """redis-py reports a connection that died while keys were WATCHed as a WatchError (raised
    while handling the connection error): that is the store being unavailable, not a conflict."""
    seen: BaseException | None = exc.__context__ or exc.__cause__
    while seen is not None:
        if isinstance(seen, UNAVAILABLE):
            return True
        seen = seen.__context__ or seen.__cause__
    return "occurred while watching" in str(exc)


def sentinel_primary(url: SentinelURL, **options: Any) -> redis.Redis:
    """A client of the primary the URL's Sentinels name (asked again on each reconnect)."""
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    if url.sentinel_password is not None:
        sentinel_kwargs["password"] = url.sentinel_password
    sentinel = redis.sentinel.Sentinel(list(url.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(
        url.service, db=url.db, username=url.username, password=url.password, **options
    )


def _s(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def _f(v: bytes | str | None) -> float | None:
    return None if v is None or v in (b"", "") else float(v)


def _b(v: bytes | str | None) -> bool | None:
    return None if v is None or v in (b"", "") else v in (b"1", "1")


def _enc(v: Any) -> str:
    """Hash values: None as "", bools as 0/1."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def acknowledged(what: str, tenant: Callable[..., str] | None = None) -> Callable[[F], F]:
    """A write of record: its method returns (or replays an earlier write, raising
    :class:`IdempotentReplay`) only after :meth:`RedisStore._acknowledge`. ``tenant`` picks the
    tenant whose data the write touches from the method's arguments (None: an admin write,
    which may touch keys of any slot; a Cluster store then waits on every shard)."""

    def wrap(method: F) -> F:
        @functools.wraps(method)
        def run(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
            tid = None if tenant is None else tenant(*args, **kwargs)
            try:
                result = method(self, *args, **kwargs)
            except IdempotentReplay:
                self._acknowledge(what, tid)
                raise
            self._acknowledge(what, tid)
            return result

        return run  # type: ignore[return-value]

    return wrap


def _first(tenant_id: str, *_: Any, **__: Any) -> str:
    return tenant_id


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tcm:",
        timeout_s: float = 2.0,
        client: redis.Redis | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        if wait_replicas < 0 or wait_timeout_ms <= 0:
            raise ValueError("wait_replicas must be >= 0 and wait_timeout_ms > 0")
        if wait_replicas and wait_timeout_ms >= timeout_s * 1000:
            raise ValueError(
                f"wait_timeout_ms ({wait_timeout_ms}) must be shorter than the store's socket "
                f"timeout ({timeout_s * 1000:.0f} ms), or the socket gives up first"
            )
        self.prefix = prefix
        self._url = url
        self._timeout_s = timeout_s
        self.wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._sentinel = SentinelURL.parse(url) if url.startswith(SENTINEL_SCHEME) else None
        self.r = client or self._connect(socket_timeout=timeout_s, health_check_interval=30)
        self._feed: redis.Redis | None = None  # blocking XREADs get their own connection
        # Script objects only hold the sha; EVALSHA loads them on the server when missing
        self._labelled_ready = False  # the labelled zsets hold every feedback (labelled:v1)
        self._names_ready = False  # every tenant's name has its key (tenant_names:v1)
        self._add_items_script = self.r.register_script(ADD_ITEMS_LUA)
        self._page_script = self.r.register_script(GALLERY_PAGE_LUA)

    def _connect(self, *, socket_timeout: float, **kwargs: Any) -> redis.Redis:
        """A client of the primary: from the URL, or the one Sentinel names (asked again on
        every new connection, so a failover is followed by reconnecting)."""
        # one quick retry: a dead server must turn into a 503 within about timeout_s
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": self._timeout_s,
            "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
            **kwargs,
        }
        if self._sentinel is None:
            return redis.Redis.from_url(self._url, **options)
        return sentinel_primary(self._sentinel, **options)

    # --- plumbing --------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(key_part(p) for p in parts)

    def _tenant(self, tid: str, *rest: str) -> str:
        return self._k("tenant", tid, *rest)

    def _seq_key(self, tenant_id: str) -> str:
        """The counter behind ``tenant_id``'s item seqs: one for the whole store here."""
        return self._k("seq")

    def _changes_key(self, tenant_id: str) -> str:
        """The change stream ``tenant_id``'s writes append to: one for the whole store here."""
        return self._k("changes")

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except UNAVAILABLE as exc:
            raise StoreUnavailableError(
                f"the Redis store cannot be reached ({what}): {exc}", detail={"store": "redis"}
            ) from exc

    def _tx(self, what: str, watch: Sequence[str], body: Callable[[redis.client.Pipeline], T]) -> T:
        """Runs ``body`` (which checks state in immediate mode, then calls ``pipe.multi()`` and
        queues writes) under WATCH; a concurrent change to a watched key is a conflict."""
        with self._watched(what, watch) as pipe:
            result = body(pipe)
            pipe.execute()
            return result

    @contextmanager
    def _watched(self, what: str, watch: Sequence[str]) -> Iterator[redis.client.Pipeline]:
        """A pipeline WATCHing ``watch``: a change to one of them before EXEC is a conflict
        (409), a lost connection a 503. While it watches, redis-py does not resend a command
        after a connection error, so a write whose reply was lost is never applied twice."""
        with self._translate(what), self.r.pipeline(transaction=True) as pipe:
            try:
                if watch:
                    pipe.watch(*watch)
                yield pipe
            except redis.exceptions.WatchError as exc:
                if _connection_lost(exc):  # not a conflict: the server went away mid-transaction
                    raise StoreUnavailableError(
                        f"the Redis store connection was lost during a write ({what}); retry",
                        detail={"store": "redis"},
                    ) from exc
                raise ConflictError(
                    f"a concurrent request changed the same data ({what}); retry",
                    code="concurrent_update",
                ) from exc

    def _acknowledge(self, what: str, tenant_id: str | None = None) -> None:
        """Returns once ``wait_replicas`` replicas hold every write this store made before the
        call (nothing to do when it is 0); else raises :class:`StoreUnavailableError`, the
        write kept on the primary. ``WAIT`` acknowledges the writes of its own connection up to
        the primary's replication offset at that connection's last write, so it goes in one
        pipeline (one connection) right behind a write of ``P acks``, made after ``what``
        committed, hence later in the one replication stream. (One primary: ``tenant_id``, the
        tenant whose data was written, does not matter here.)"""
        if not self.wait_replicas:
            return
        with self._translate(f"{what}: wait for replicas"):
            held = self._wait_behind(self.r, self._k("acks"))
        self._check_held(what, held)

    def _wait_behind(self, client: redis.Redis, marker: str) -> int:
        """Writes ``marker`` and sends ``WAIT`` behind it on one connection of ``client``;
        returns how many replicas acknowledged."""
        pipe = client.pipeline(transaction=False)
        pipe.incr(marker)
        pipe.wait(self.wait_replicas, self._wait_timeout_ms)
        _, held = pipe.execute()
        return int(held)

    def _check_held(self, what: str, held: int) -> None:
        if held < self.wait_replicas:
            raise StoreUnavailableError(
                f"the write ({what}) reached the Redis primary but only {held} of the "
                f"{self.wait_replicas} replica(s) it must reach acknowledged it within "
                f"{self._wait_timeout_ms} ms, so it is not confirmed; retry (an enrolment "
                "with the same Idempotency-Key is not applied twice)",
                detail={
                    "store": "redis",
                    "replicas_required": self.wait_replicas,
                    "replicas_acknowledged": int(held),
                },
            )

    def _check_tenant(self, pipe: redis.client.Pipeline, tenant_id: str) -> None:
        """Every write under ``tenant:T:`` WATCHes the tenant record and checks it here: a
        write that would commit after :meth:`delete_tenant` removed the record aborts instead
        (its keys would escape the sweep and stay behind forever)."""
        if not pipe.exists(self._tenant(tenant_id)):
            raise ConflictError(
                "the tenant was deleted while this request ran",
                code="tenant_deleted",
                detail={"tenant_id": tenant_id},
            )

    def ping(self) -> None:
        with self._translate("ping"):
            self.r.ping()

    def claim_serving(self) -> None:
        """Replicas share a Redis store (they follow its change feed): nothing to claim."""

    def close(self) -> None:
        for client in (self.r, self._feed):
            if client is not None:
                client.close()
                client.connection_pool.disconnect()

    def _queue_change(
        self,
        pipe: redis.client.Pipeline,
        op: str,
        tenant_id: str,
        *,
        item_ids: Sequence[str] = (),
        seqs: Sequence[int] = (),
    ) -> None:
        fields = {"op": op, "tenant": tenant_id}
        if item_ids:
            fields["items"] = json.dumps(list(item_ids))
        if seqs:
            fields["seqs"] = json.dumps([int(s) for s in seqs])
        pipe.xadd(
            self._changes_key(tenant_id),
            fields,  # type: ignore[arg-type]
            maxlen=CHANGES_MAXLEN,
            approximate=True,
        )

    # --- tenants and keys ------------------------------------------------------------------
    def _name_key(self, name: str) -> str:
        return self._k("tenant_name", tenant_name_digest(name))

    def _ensure_tenant_names(self) -> None:
        """Stores written before tenant names were unique: each tenant's name key is set if
        free (SET NX, oldest tenant first, so replicas racing here agree), then
        ``tenant_names:v1`` says it is done, for every replica and restart."""
        if self._names_ready:
            return
        marker = self._k("tenant_names", "v1")
        with self._translate("index tenant names"):
            if not self.r.exists(marker):
                for tid in [_s(t) or "" for t in self.r.zrange(self._k("tenants"), 0, -1)]:
                    name = _s(self.r.hget(self._tenant(tid), "name"))
                    if name is not None:
                        self.r.set(self._name_key(name), tid, nx=True)
                self.r.set(marker, "1")
        self._names_ready = True

    @acknowledged("create tenant")
    def create_tenant(self, tenant: Tenant, key: ApiKey) -> None:
        """One transaction WATCHing the name's key: of two concurrent creates of one name, the
        second's EXEC fails and its retry finds the name taken (409 ``duplicate_tenant_name``)."""
        self._ensure_tenant_names()
        name_key = self._name_key(tenant.name)

        def body(pipe: redis.client.Pipeline) -> None:
            holder = _s(pipe.get(name_key))
            if holder is not None and pipe.exists(self._tenant(holder)):
                raise duplicate_name(tenant.name, holder)
            pipe.multi()
            pipe.hset(self._tenant(tenant.tenant_id), mapping=_tenant_record(tenant))
            pipe.zadd(self._k("tenants"), {tenant.tenant_id: tenant.created_at})
            pipe.set(name_key, tenant.tenant_id)
            self._queue_key(pipe, key)

        for attempt in range(3):
            try:
                self._tx("create tenant", [name_key], body)
                return
            except ConflictError as exc:
                if exc.code != "concurrent_update" or attempt == 2:
                    raise

    def _queue_key(
        self, pipe: redis.client.Pipeline, key: ApiKey, *, with_set: bool = True
    ) -> None:
        pipe.hset(
            self._k("key", key.key_id),
            mapping={
                "tenant_id": key.tenant_id,
                "key_hash": key.key_hash,
                "created_at": _enc(key.created_at),
                "revoked_at": _enc(key.revoked_at),
            },
        )
        if with_set:
            pipe.sadd(self._tenant(key.tenant_id, "keys"), key.key_id)

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        with self._translate("get tenant"):
            h = self.r.hgetall(self._tenant(tenant_id))
        if not h:
            return None
        return Tenant(tenant_id, _s(h[b"name"]) or "", float(h[b"created_at"]))

    def list_tenants(self) -> list[Tenant]:
        with self._translate("list tenants"):
            ids = [_s(t) or "" for t in self.r.zrange(self._k("tenants"), 0, -1)]
            pipe = self.r.pipeline(transaction=False)
            for tid in ids:
                pipe.hgetall(self._tenant(tid))
            rows = pipe.execute()
        return [
            Tenant(tid, _s(h[b"name"]) or "", float(h[b"created_at"]))
            for tid, h in zip(ids, rows, strict=True)
            if h
        ]

    @acknowledged("delete tenant")
    def delete_tenant(self, tenant_id: str) -> bool:
        """Removes the tenant record and its keys in one transaction (from then on no key
        authenticates), then sweeps its data. Nothing is swept for a tenant that does not
        exist: the sweep's pattern is built from the escaped id, and only after the record
        was found and removed."""
        record, keys_set = self._tenant(tenant_id), self._tenant(tenant_id, "keys")

        def body(pipe: redis.client.Pipeline) -> bool:
            if not pipe.exists(record):
                pipe.multi()
                return False
            key_ids = [_s(k) or "" for k in pipe.smembers(keys_set)]
            name = _s(pipe.hget(record, "name"))
            name_key = None if name is None else self._name_key(name)
            if name_key is not None:
                pipe.watch(name_key)  # freed only if it is this tenant's
                if _s(pipe.get(name_key)) != tenant_id:
                    name_key = None
            pipe.multi()
            pipe.zrem(self._k("tenants"), tenant_id)
            pipe.delete(record)
            if name_key is not None:
                pipe.delete(name_key)
            for kid in key_ids:
                pipe.delete(self._k("key", kid))
            self._queue_change(pipe, "drop_tenant", tenant_id)
            return True

        if not self._tx("delete tenant", [record, keys_set], body):
            return False
        with self._translate("delete tenant"):
            # the tenant is gone (no key authenticates); sweep its data
            self._sweep(self.r, tenant_id)
        return True

    def _sweep(self, client: redis.Redis, tenant_id: str) -> None:
        """Unlinks every key under ``tenant:T:`` that ``client`` holds (a SCAN), in chunks."""
        pattern = glob_escape(self._tenant(tenant_id) + ":") + "*"
        batch: list[bytes] = []
        for k in client.scan_iter(match=pattern, count=1000):
            batch.append(k)
            if len(batch) >= _CHUNK:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)

    @acknowledged("add key")
    def add_key(self, key: ApiKey, *, revoke_others_at: float | None = None) -> list[str]:
        keys_set = self._tenant(key.tenant_id, "keys")
        record = self._tenant(key.tenant_id)

        def body(pipe: redis.client.Pipeline) -> list[str]:
            if not pipe.exists(record):
                raise NotFoundError(
                    f"no tenant {key.tenant_id!r}", detail={"tenant_id": key.tenant_id}
                )
            revoked: list[str] = []
            if revoke_others_at is not None:
                for kid in sorted(_s(k) or "" for k in pipe.smembers(keys_set)):
                    if pipe.hget(self._k("key", kid), "revoked_at") in (b"", ""):
                        revoked.append(kid)
            pipe.multi()
            for kid in revoked:
                pipe.hset(self._k("key", kid), "revoked_at", _enc(revoke_others_at))
            self._queue_key(pipe, key)
            return revoked

        return self._tx("add key", [keys_set, record], body)

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._translate("get key"):
            h = self.r.hgetall(self._k("key", key_id))
        return self._key(key_id, h) if h else None

    @staticmethod
    def _key(key_id: str, h: Mapping[bytes, bytes]) -> ApiKey:
        return ApiKey(
            key_id=key_id,
            tenant_id=_s(h[b"tenant_id"]) or "",
            key_hash=_s(h[b"key_hash"]) or "",
            created_at=float(h[b"created_at"]),
            revoked_at=_f(h.get(b"revoked_at")),
        )

    def list_keys(self, tenant_id: str) -> list[ApiKey]:
        with self._translate("list keys"):
            ids = sorted(_s(k) or "" for k in self.r.smembers(self._tenant(tenant_id, "keys")))
            pipe = self.r.pipeline(transaction=False)
            for kid in ids:
                pipe.hgetall(self._k("key", kid))
            rows = pipe.execute()
        keys = [self._key(kid, h) for kid, h in zip(ids, rows, strict=True) if h]
        return sorted(keys, key=lambda k: (k.created_at, k.key_id))

    @acknowledged("revoke key")
    def revoke_key(self, tenant_id: str, key_id: str, at: float) -> bool:
        with self._translate("revoke key"):
            if not self.r.sismember(self._tenant(tenant_id, "keys"), key_id):
                return False
            self._revoke(key_id, at)
            return True

    def _revoke(self, key_id: str, at: float) -> bool:
        """Sets the key's ``revoked_at`` if it is still active (the first revocation time is
        kept); whether it was active."""
        return bool(self.r.eval(REVOKE_LUA, 1, self._k("key", key_id), _enc(at)))

    # --- gallery ---------------------------------------------------------------------------
    @acknowledged("add items", _first)
    def add_items(
        self,
        tenant_id: str,
        items: Sequence[NewItem],
        *,
        model_version: str,
        created_at: float,
        idempotency: Idempotent | None = None,
    ) -> list[int]:
        """In two steps, so that a large batch never holds Redis for everyone: its item hashes
        (vectors, images, metadata) are first written to staging keys (``tenant:T:staged:B:i``,
        expiring after :data:`STAGE_TTL_S`, read by nothing), :data:`STAGE_CHUNK` items per
        pipeline, which Redis serves between other clients' commands; then one short script
        (:data:`ADD_ITEMS_LUA`) checks the tenant, the idempotency key and the item ids, and
        renames each staged hash into place and indexes it, atomically: the batch becomes
        visible whole or not at all. A batch refused at commit has its staged hashes deleted
        (or, if that fails too, expired)."""
        if not items:
            return []
        batch = uuid.uuid4().hex
        staged = [self._tenant(tenant_id, "staged", batch, str(i)) for i in range(len(items))]
        field, created = f"emb:{model_version}", _enc(created_at)
        with self._translate("stage items"):
            for lo in range(0, len(items), STAGE_CHUNK):
                pipe = self.r.pipeline(transaction=False)
                for key, it in zip(
                    staged[lo : lo + STAGE_CHUNK], items[lo : lo + STAGE_CHUNK], strict=True
                ):
                    fields: dict[str, Any] = {
                        "subject": it.subject,
                        "created_at": created,
                        "metadata": json.dumps(dict(it.metadata)) if it.metadata else "{}",
                        "has_image": "0" if it.image is None else "1",
                        field: encode_vector(it.embedding),
                    }
                    if it.image is not None:
                        fields["image"] = it.image
                    pipe.hset(key, mapping=fields)
                    pipe.expire(key, STAGE_TTL_S)
                pipe.execute()
        try:
            return self._commit_staged(tenant_id, items, staged, idempotency, created_at)
        except (ConflictError, IdempotentReplay):
            with contextlib.suppress(*UNAVAILABLE):
                for chunk in _chunks(staged):
                    self.r.unlink(*chunk)
            raise

    def _commit_staged(
        self,
        tenant_id: str,
        items: Sequence[NewItem],
        staged: list[str],
        idempotency: Idempotent | None,
        created_at: float,
    ) -> list[int]:
        slots: dict[str, int] = {}
        per_item: list[Any] = []
        for it in items:
            per_item += [it.item_id, slots.setdefault(it.subject, len(slots))]
        args: list[Any] = [
            len(items),
            CHANGES_MAXLEN,
            tenant_id,
            json.dumps([it.item_id for it in items]),
            len(slots),
            *slots,
            *per_item,
        ]
        item_key = self._tenant(tenant_id, "item") + ":"
        subject_key = self._tenant(tenant_id, "subject") + ":"
        keys = [
            self._tenant(tenant_id),
            self._seq_key(tenant_id),
            self._tenant(tenant_id, "items"),
            self._tenant(tenant_id, "subjects"),
            self._changes_key(tenant_id),
            *(item_key + key_part(it.item_id) for it in items),
            *staged,
            *(subject_key + key_part(sub) for sub in slots),
        ]
        if idempotency is not None:
            keys.append(self._tenant(tenant_id, "idem", idempotency.key))
            args += [
                idempotency.fingerprint,
                idempotency.result,
                max(1, math.ceil(idempotency.expires_at - created_at)),
            ]
        # under WATCH (of the tenant record, which the script checks anyway) so that a lost
        # reply is a 503, never a silent resend that would run the script twice
        with self._watched("add items", [keys[0]]) as pipe:
            pipe.multi()
            self._add_items_script(keys=keys, args=args, client=pipe)
            (out,) = pipe.execute()
        status = int(out[0])
        if status == 2:
            assert idempotency is not None
            raise IdempotentReplay(
                Idempotent(
                    idempotency.key, _s(out[1]) or "", _s(out[2]) or "", idempotency.expires_at
                )
            )
        if status == -1:
            raise ConflictError(
                "the tenant was deleted while this request ran",
                code="tenant_deleted",
                detail={"tenant_id": tenant_id},
            )
        if status == 0:
            raise ConflictError(
                "some item ids already exist in this gallery",
                detail={"item_ids": sorted(_s(x) or "" for x in out[1:])},
                code="duplicate_item_id",
            )
        if status == -2:
            raise StoreUnavailableError(
                "the enrolment's staged items expired before it could be committed; retry",
                detail={"store": "redis"},
            )
        last = int(out[1])
        return list(range(last - len(items) + 1, last + 1))

    def get_idempotent(self, tenant_id: str, key: str, *, now: float) -> Idempotent | None:
        k = self._tenant(tenant_id, "idem", key)
        with self._translate("get idempotency key"):
            pipe = self.r.pipeline(transaction=True)
            pipe.hmget(k, ["fingerprint", "result"])
            pipe.ttl(k)
            (fingerprint, result), ttl = pipe.execute()
        if fingerprint is None:
            return None
        # a replay confirms the write it repeats: only once the replicas hold it
        self._acknowledge("replay an enrolment", tenant_id)
        return Idempotent(key, _s(fingerprint) or "", _s(result) or "", now + max(int(ttl), 0))

    @acknowledged("put item", _first)
    def put_item(
        self, tenant_id: str, item: NewItem, *, model_version: str, created_at: float
    ) -> tuple[int, int | None]:
        key = self._tenant(tenant_id, "item", item.item_id)

        def body(pipe: redis.client.Pipeline) -> tuple[int, int | None]:
            self._check_tenant(pipe, tenant_id)
            old_seq, old_subject, old_created = pipe.hmget(key, ["seq", "subject", "created_at"])
            seq = int(pipe.incr(self._seq_key(tenant_id)))
            pipe.multi()
            if old_seq is not None:
                pipe.delete(key)
                pipe.zrem(self._tenant(tenant_id, "subject", _s(old_subject) or ""), item.item_id)
                self._queue_change(pipe, "remove", tenant_id, seqs=[int(old_seq)])
            fields: dict[str, Any] = {
                "seq": seq,
                "subject": item.subject,
                "metadata": json.dumps(dict(item.metadata)),
                "created_at": _s(old_created) if old_created is not None else _enc(created_at),
                "has_image": _enc(item.image is not None),
                f"emb:{model_version}": encode_vector(item.embedding),
            }
            if item.image is not None:
                fields["image"] = item.image
            pipe.hset(key, mapping=fields)
            pipe.zadd(self._tenant(tenant_id, "items"), {item.item_id: seq})
            pipe.zadd(self._tenant(tenant_id, "subject", item.subject), {item.item_id: seq})
            pipe.zadd(self._tenant(tenant_id, "subjects"), {item.subject: 0})
            self._queue_change(pipe, "add", tenant_id, item_ids=[item.item_id], seqs=[seq])
            return seq, None if old_seq is None else int(old_seq)

        return self._tx("put item", [self._tenant(tenant_id), key], body)

    def list_subjects(
        self, tenant_id: str, *, after: str | None = None, limit: int = 100
    ) -> list[tuple[str, int]]:
        index = self._tenant(tenant_id, "subjects")
        out: list[tuple[str, int]] = []
        with self._translate("list subjects"):
            self._index_subjects(tenant_id)
            start = "-" if after is None else "(" + after
            while len(out) < limit:
                names = [
                    _s(n) or ""
                    for n in self.r.zrangebylex(index, start, "+", start=0, num=limit - len(out))
                ]
                if not names:
                    break
                pipe = self.r.pipeline(transaction=False)
                for name in names:
                    pipe.zcard(self._tenant(tenant_id, "subject", name))
                counts = pipe.execute()
                empty = [n for n, c in zip(names, counts, strict=True) if not c]
                for name in empty:  # emptied by item deletes; a later enrolment adds it back
                    self._drop_if_empty(tenant_id, name)
                out += [(n, int(c)) for n, c in zip(names, counts, strict=True) if c]
                start = "(" + names[-1]
        return out

    def _index_subjects(self, tenant_id: str) -> None:
        """Builds the subject listing of a tenant enrolled before it existed (once), in a
        transaction on the tenant record: a tenant deleted meanwhile is not re-created."""
        tkey = self._tenant(tenant_id)
        if self.r.hexists(tkey, "subjects_indexed") or not self.r.exists(tkey):
            return
        subjects: dict[str, int] = {}
        ids = [_s(m) or "" for m in self.r.zrange(self._tenant(tenant_id, "items"), 0, -1)]
        for chunk in _chunks(ids):
            pipe = self.r.pipeline(transaction=False)
            for iid in chunk:
                pipe.hget(self._tenant(tenant_id, "item", iid), "subject")
            subjects |= {_s(x) or "": 0 for x in pipe.execute() if x is not None}

        def body(pipe: redis.client.Pipeline) -> None:
            self._check_tenant(pipe, tenant_id)
            pipe.multi()
            if subjects:
                pipe.zadd(self._tenant(tenant_id, "subjects"), subjects)
            pipe.hset(tkey, "subjects_indexed", "1")

        with contextlib.suppress(ConflictError):  # deleted or raced: the next listing retries
            self._tx("index subjects", [tkey], body)

    def _drop_if_empty(self, tenant_id: str, subject: str) -> None:
        zkey = self._tenant(tenant_id, "subject", subject)

        def body(pipe: redis.client.Pipeline) -> None:
            empty = pipe.zcard(zkey) == 0
            pipe.multi()
            if empty:
                pipe.zrem(self._tenant(tenant_id, "subjects"), subject)

        with contextlib.suppress(ConflictError):  # enrolled into meanwhile: keep it
            self._tx("drop empty subject", [zkey], body)

    def get_item(
        self, tenant_id: str, item_id: str, *, model_version: str, with_image: bool = False
    ) -> GalleryItem | None:
        fields = ["seq", "subject", "metadata", "created_at", "has_image", f"emb:{model_version}"]
        if with_image:
            fields.append("image")
        with self._translate("get item"):
            vals = self.r.hmget(self._tenant(tenant_id, "item", item_id), fields)
        if vals[0] is None:
            return None
        return self._item(item_id, vals, with_embedding=True, image=vals[6] if with_image else None)

    @staticmethod
    def _item(
        item_id: str, vals: Sequence[Any], *, with_embedding: bool, image: bytes | None = None
    ) -> GalleryItem:
        emb = vals[5] if with_embedding and len(vals) > 5 else None
        return GalleryItem(
            seq=int(vals[0]),
            item_id=item_id,
            subject=_s(vals[1]) or "",
            metadata=json.loads(vals[2]),
            created_at=float(vals[3]),
            has_image=bool(_b(vals[4])),
            embedding=None if emb is None else decode_vector(emb),
            image=image,
        )

    def list_items(
        self, tenant_id: str, *, subject: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> list[GalleryItem]:
        zkey = (
            self._tenant(tenant_id, "items")
            if subject is None
            else self._tenant(tenant_id, "subject", subject)
        )
        with self._translate("list items"):
            ids = [
                _s(i) or ""
                for i in self.r.zrangebyscore(zkey, f"({after_seq}", "+inf", start=0, num=limit)
            ]
            pipe = self.r.pipeline(transaction=False)
            for iid in ids:
                pipe.hmget(
                    self._tenant(tenant_id, "item", iid),
                    ["seq", "subject", "metadata", "created_at", "has_image"],
                )
            rows = pipe.execute()
        return [
            self._item(iid, vals, with_embedding=False)
            for iid, vals in zip(ids, rows, strict=True)
            if vals[0] is not None
        ]

    def count_items(self, tenant_id: str) -> int:
        with self._translate("count items"):
            return int(self.r.zcard(self._tenant(tenant_id, "items")))

    @acknowledged("delete item", _first)
    def delete_item(self, tenant_id: str, item_id: str) -> int | None:
        key = self._tenant(tenant_id, "item", item_id)

        def body(pipe: redis.client.Pipeline) -> int | None:
            seq, subject = pipe.hmget(key, ["seq", "subject"])
            if seq is None:
                pipe.multi()
                return None
            pipe.multi()
            pipe.delete(key)
            pipe.zrem(self._tenant(tenant_id, "items"), item_id)
            pipe.zrem(self._tenant(tenant_id, "subject", _s(subject) or ""), item_id)
            self._queue_change(pipe, "remove", tenant_id, seqs=[int(seq)])
            return int(seq)

        return self._tx("delete item", [key], body)

    @acknowledged("delete subject", _first)
    def delete_subject(self, tenant_id: str, subject: str) -> list[int]:
        zkey = self._tenant(tenant_id, "subject", subject)

        def body(pipe: redis.client.Pipeline) -> list[int]:
            members = pipe.zrange(zkey, 0, -1, withscores=True)
            pipe.multi()
            ids = [_s(m) or "" for m, _ in members]
            for chunk in _chunks(ids):
                pipe.delete(*[self._tenant(tenant_id, "item", i) for i in chunk])
                pipe.zrem(self._tenant(tenant_id, "items"), *chunk)
            pipe.delete(zkey)
            pipe.zrem(self._tenant(tenant_id, "subjects"), subject)
            seqs = sorted(int(s) for _, s in members)
            if seqs:
                self._queue_change(pipe, "remove", tenant_id, seqs=seqs)
            return seqs

        return self._tx("delete subject", [zkey], body)

    def gallery_vectors(
        self,
        tenant_id: str,
        *,
        model_version: str,
        subject: str | None = None,
        with_metadata: bool = False,
    ) -> GalleryVectors:
        parts = list(
            self._vector_pages(
                tenant_id, model_version, subject=subject, with_metadata=with_metadata
            )
        )
        if not parts:
            return GalleryVectors(
                np.zeros(0, np.int64),
                [],
                [],
                np.zeros((0, 0), np.float32),
                [] if with_metadata else None,
            )
        return GalleryVectors(
            np.concatenate([p.seqs for p in parts]),
            [i for p in parts for i in p.item_ids],
            [x for p in parts for x in p.subjects],
            np.concatenate([p.vectors for p in parts]),
            [m for p in parts for m in (p.metadata or [])] if with_metadata else None,
        )

    def iter_gallery_vectors(
        self, tenant_id: str, *, model_version: str, chunk_rows: int = GALLERY_CHUNK_ROWS
    ) -> Iterator[GalleryVectors]:
        """Pages of at most :data:`_PAGE_ROWS` items (fewer than ``chunk_rows``: smaller pages
        read faster and block Redis for less time), see :meth:`_vector_pages`."""
        yield from self._vector_pages(tenant_id, model_version, rows=chunk_rows)

    def _vector_pages(
        self,
        tenant_id: str,
        model_version: str,
        *,
        subject: str | None = None,
        rows: int = _PAGE_ROWS,
        with_metadata: bool = True,
    ) -> Iterator[GalleryVectors]:
        """The gallery (or one subject's items) in seq order, page by page with
        :data:`GALLERY_PAGE_LUA`: one script call per page returns its ids, seqs, subjects,
        metadata and vectors, instead of a command and a reply per item. Pages follow on by
        seq, so a delete between two pages moves no item past the cursor. An item added
        meanwhile may be missed or seen; at start-up the change feed (whose cursor the caller
        took first) applies it again either way. Without ``with_metadata`` no item's metadata
        is read at all (the monitor's reads: vectors and subjects only)."""
        mode = "vectors" if with_metadata else "plain"
        for ids, seqs, subjects, metas, blobs in self._pages(
            tenant_id, model_version, mode, rows, subject=subject
        ):
            if ids:
                yield GalleryVectors(
                    np.array([int(float(x)) for x in seqs], dtype=np.int64),
                    [_s(x) or "" for x in ids],
                    [_s(x) or "" for x in subjects],
                    decode_vectors(blobs),
                    [metadata_of(x) for x in metas] if with_metadata else None,
                )

    def _pages(
        self,
        tenant_id: str,
        model_version: str,
        mode: str,
        rows: int = _PAGE_ROWS,
        *,
        subject: str | None = None,
    ) -> Iterator[list[Any]]:
        """:data:`GALLERY_PAGE_LUA`'s replies (less the count scanned), page by page, over the
        tenant's items zset or one subject's."""
        zkey = (
            self._tenant(tenant_id, "items")
            if subject is None
            else self._tenant(tenant_id, "subject", subject)
        )
        item_prefix = self._tenant(tenant_id, "item") + ":"
        page = max(1, min(rows, _PAGE_ROWS))
        after = "-inf"
        while True:
            with self._translate("read gallery"):
                scanned, last, *reply = self._page_script(
                    keys=[zkey], args=[after, page, item_prefix, f"emb:{model_version}", mode]
                )
            if scanned == 0:
                return
            after = "(" + (_s(last) or "")
            yield reply

    def items_without_embedding(
        self, tenant_id: str, *, model_version: str
    ) -> list[tuple[str, bytes | None]]:
        out: list[tuple[str, bytes | None]] = []
        for (ids,) in self._pages(tenant_id, model_version, "missing"):
            with self._translate("read items without embedding"):
                for raw in ids:
                    iid = _s(raw) or ""
                    out.append((iid, self.r.hget(self._tenant(tenant_id, "item", iid), "image")))
        return out

    def put_embeddings(
        self, tenant_id: str, vectors: Mapping[str, np.ndarray], *, model_version: str
    ) -> None:
        field = f"emb:{model_version}"
        with self._translate("put embeddings"):
            for chunk in _chunks(list(vectors.items())):
                pipe = self.r.pipeline(transaction=True)
                for iid, vec in chunk:
                    # only for items that still exist: HSET on a deleted key would resurrect it
                    # (EVAL as a plain command: a Cluster pipeline has no eval())
                    pipe.execute_command(
                        "EVAL",
                        "if redis.call('EXISTS', KEYS[1]) == 1 then "
                        "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end return 1",
                        1,
                        self._tenant(tenant_id, "item", iid),
                        field,
                        encode_vector(vec),
                    )
                self._queue_change(pipe, "add", tenant_id, item_ids=[iid for iid, _ in chunk])
                pipe.execute()

    def vectors_of_items(
        self, tenant_id: str, item_ids: Sequence[str], *, model_version: str
    ) -> GalleryVectors:
        field = f"emb:{model_version}"
        rows = []
        with self._translate("read vectors"):
            for chunk in _chunks(list(item_ids)):
                pipe = self.r.pipeline(transaction=False)
                for iid in chunk:
                    pipe.hmget(
                        self._tenant(tenant_id, "item", iid), ["seq", "subject", field, "metadata"]
                    )
                for iid, (seq, subj, emb, meta) in zip(chunk, pipe.execute(), strict=True):
                    if seq is not None and emb is not None:
                        rows.append(
                            (
                                int(seq),
                                iid,
                                _s(subj) or "",
                                decode_vector(emb),
                                json.loads(meta) if meta is not None else {},
                            )
                        )
        rows.sort(key=lambda r: r[0])
        if not rows:
            return GalleryVectors(np.zeros(0, np.int64), [], [], np.zeros((0, 0), np.float32), [])
        return GalleryVectors(
            np.array([r[0] for r in rows], dtype=np.int64),
            [r[1] for r in rows],
            [r[2] for r in rows],
            np.stack([r[3] for r in rows]),
            [r[4] for r in rows],
        )

    # --- change feed -----------------------------------------------------------------------
    # The cursor is "<entry id>#<n>": the last entry read and how many entries the stream had
    # ever received up to it (XINFO's entries-added, Redis >= 7). Trimming removes the oldest
    # entries first, so entries after the cursor were lost exactly when more than n entries
    # have been removed (entries-added - length). Before Redis 7 the cursor is the bare id.
    def follow_only(self, tenants: Callable[[str], bool]) -> None:
        """One stream holds every tenant's changes: the reader filters them."""

    def change_cursor(self, tenant_id: str | None = None) -> str | None:
        """The position after the last entry ever added (the stream may be trimmed empty);
        the start of the stream before it exists. One stream holds every tenant's changes:
        ``tenant_id`` (whose write the position is a token for) does not matter here."""
        with self._translate("read change feed"):
            try:
                info = self.r.xinfo_stream(self._k("changes"))
            except redis.exceptions.ResponseError:  # no such key: nothing written yet
                return "0-0#0"
        return _cursor(_s(info["last-generated-id"]) or "0-0", info.get("entries-added"))

    def cursor_with(self, cursor: str, tenant_id: str, position: str) -> str:
        return cursor  # one stream: the reader already reads every tenant's changes

    def feed_covers(self, cursor: str, token: str, tenant_id: str) -> bool:
        """Whether a follower at ``cursor`` has read up to the consistency ``token`` of a write
        of ``tenant_id`` (one stream: compare their entry ids)."""
        return stream_position(cursor) >= stream_position(token)

    def interrupt_changes(self) -> None:
        """Shuts the feed connection's socket down (``SHUT_RDWR``), which wakes a blocking XREAD
        in another thread at once; the pool reconnects on the next read."""
        feed = self._feed
        if feed is not None:
            with contextlib.suppress(Exception):  # a socket already gone is what we want
                feed.connection_pool.disconnect(inuse_connections=True)

    def read_changes(self, cursor: str, *, block_ms: int) -> tuple[str, list[Change]]:
        """Entries after ``cursor``; ``[Change("resync", "")]`` (cursor unchanged) when some of
        them were trimmed away before this reader could see them, or when the store moved
        backwards (:meth:`_moved_back`)."""
        if self._feed is None:
            self._feed = self._connect(socket_timeout=self._timeout_s + block_ms / 1e3)
        key = self._k("changes")
        with self._translate("read change feed"):
            reply = self._feed.xread({key: cursor.partition("#")[0]}, count=1000, block=block_ms)
            try:  # one read of the stream's counters serves every check below
                info: Mapping[str, Any] | None = self._feed.xinfo_stream(key)
            except redis.exceptions.ResponseError:  # no stream at all
                info = None
            return self._read_stream(self._feed, key, cursor, reply, info)

    def _read_stream(
        self,
        client: redis.Redis,
        key: str,
        cursor: str,
        reply: Any,
        info: Mapping[str, Any] | None,
    ) -> tuple[str, list[Change]]:
        """The changes in ``reply`` (an XREAD of stream ``key`` after ``cursor``, followed by
        the stream's XINFO ``info``, None when there is no stream) and the cursor after them;
        ``[Change("resync", "")]`` (cursor unchanged) when entries were trimmed away unread or
        the stream went back (:meth:`_moved_back`)."""
        entry_id, _, counted = cursor.partition("#")
        n = int(counted) if counted else None
        if self._moved_back(info, entry_id, n, sum(len(e) for _, e in reply or [])):
            return cursor, [Change("resync", "")]
        if reply and info is not None:
            removed = self._removed(info)
            if n is None:
                if self._oldest_after(info, entry_id):
                    return cursor, [Change("resync", "")]
            elif removed is not None and removed > n:
                # trimmed before or after this read? read and count in one transaction
                pipe = client.pipeline(transaction=True)
                pipe.xread({key: entry_id}, count=1000)
                pipe.xinfo_stream(key)
                reply, info = pipe.execute()
                removed = self._removed(info)
                if removed is not None and removed > n:
                    return cursor, [Change("resync", "")]
        changes: list[Change] = []
        for _stream, entries in reply or []:
            for entry_id_b, fields in entries:
                entry_id = _s(entry_id_b) or entry_id
                n = None if n is None else n + 1
                op = _s(fields.get(b"op"))
                tenant = _s(fields.get(b"tenant")) or ""
                items = json.loads(fields[b"items"]) if b"items" in fields else []
                seqs = json.loads(fields[b"seqs"]) if b"seqs" in fields else []
                if b"first" in fields:  # a bulk add: its items took consecutive seqs
                    seqs = range(int(fields[b"first"]), int(fields[b"last"]) + 1)
                if op in ("add", "remove", "drop_tenant"):
                    changes.append(Change(op, tenant, tuple(items), tuple(seqs)))  # type: ignore[arg-type]
        return _cursor(entry_id, n), changes

    @staticmethod
    def _moved_back(
        info: Mapping[str, Any] | None, entry_id: str, n: int | None, seen: int
    ) -> bool:
        """Whether the store went back in time under this reader: Redis restored from an older
        snapshot, or a failover to a replica that lagged. The item counter went back with it,
        so new items would reuse seqs this replica's indexes still hold for items the store
        lost: only a rebuild from the store is right. The stream's own counters say so, with no
        extra write: ``entries-added`` never decreases and trimming does not lower it, so a
        store that counts fewer entries than this reader has read (``n``) plus those it reads
        now went back; so did one whose last entry id is older than the reader's cursor
        (before Redis 7, the only check), or whose stream is gone after the reader saw one
        (``info`` None)."""
        if info is None:
            return entry_id != "0-0"
        last = _stream_id(_s(info.get("last-generated-id")) or "0-0")
        if last < _stream_id(entry_id):
            return True
        added = info.get("entries-added")
        return n is not None and added is not None and int(added) < n + seen

    @staticmethod
    def _removed(info: Mapping[str, Any]) -> int | None:
        """Entries trimmed from the stream so far (None before Redis 7)."""
        added = info.get("entries-added")
        return None if added is None else int(added) - int(info["length"])

    @staticmethod
    def _oldest_after(info: Mapping[str, Any], entry_id: str) -> bool:
        """Before Redis 7: whether the oldest entry left is newer than ``entry_id``, i.e. the
        entry at the cursor was trimmed and entries after it may have been (a conservative
        resync: the reader is a whole cap behind)."""
        first = info.get("first-entry")
        return entry_id != "0-0" and (
            first is None or _stream_id(_s(first[0]) or "0-0") > _stream_id(entry_id)
        )

    # --- matches and feedback --------------------------------------------------------------
    def add_match(self, record: MatchRecord) -> None:
        self.add_matches([record])

    def add_matches(self, records: Sequence[MatchRecord]) -> None:
        if not records:
            return
        tenants = sorted({r.tenant_id for r in records})

        def body(pipe: redis.client.Pipeline) -> None:
            for tenant_id in tenants:
                self._check_tenant(pipe, tenant_id)
            pipe.multi()
            for r in records:
                pipe.hset(
                    self._tenant(r.tenant_id, "match", r.match_id),
                    mapping={
                        "accepted": _enc(r.accepted),
                        "subject": _enc(r.subject),
                        "subject_set": _enc(r.subject is not None),
                        "top_item_id": _enc(r.top_item_id),
                        "top_subject": _enc(r.top_subject),
                        "has_top": _enc(r.top_item_id is not None),
                        "score": _enc(r.score),
                        "threshold": _enc(r.threshold),
                        "model_version": r.model_version,
                        "created_at": _enc(r.created_at),
                    },
                )
                pipe.zadd(self._tenant(r.tenant_id, "matches"), {r.match_id: r.created_at})

        self._tx("add match", [self._tenant(t) for t in tenants], body)

    @staticmethod
    def _match(tenant_id: str, match_id: str, h: Mapping[bytes, bytes]) -> MatchRecord:
        has_top = _b(h.get(b"has_top"))
        return MatchRecord(
            match_id=match_id,
            tenant_id=tenant_id,
            accepted=bool(_b(h[b"accepted"])),
            subject=_s(h[b"subject"]) if _b(h.get(b"subject_set")) else None,
            top_item_id=_s(h[b"top_item_id"]) if has_top else None,
            top_subject=_s(h[b"top_subject"]) if has_top else None,
            score=_f(h.get(b"score")),
            threshold=float(h[b"threshold"]),
            model_version=_s(h[b"model_version"]) or "",
            created_at=float(h[b"created_at"]),
        )

    @staticmethod
    def _feedback(tenant_id: str, match_id: str, h: Mapping[bytes, bytes]) -> Feedback | None:
        if not h:
            return None
        return Feedback(
            match_id=match_id,
            tenant_id=tenant_id,
            true_subject=_s(h[b"true_subject"]) if _b(h.get(b"true_subject_set")) else None,
            correct=_b(h.get(b"correct")),
            genuine=_b(h.get(b"genuine")),
            outcome=_s(h[b"outcome"]),  # type: ignore[arg-type]
            created_at=float(h[b"created_at"]),
        )

    def deferred_matches(self) -> tuple[int, int]:
        return 0, 0  # add_matches writes or fails: nothing waits

    def flush_deferred(self) -> int:
        return 0

    def get_match(self, tenant_id: str, match_id: str) -> MatchRecord | None:
        with self._translate("get match"):
            h = self.r.hgetall(self._tenant(tenant_id, "match", match_id))
        return self._match(tenant_id, match_id, h) if h else None

    @acknowledged("add feedback", lambda feedback: feedback.tenant_id)
    def add_feedback(self, feedback: Feedback) -> None:
        f = feedback
        key = self._tenant(f.tenant_id, "feedback", f.match_id)
        match_key = self._tenant(f.tenant_id, "match", f.match_id)

        def body(pipe: redis.client.Pipeline) -> None:
            self._check_tenant(pipe, f.tenant_id)
            if pipe.exists(key):
                raise ConflictError(
                    "this match already has feedback",
                    detail={"match_id": f.match_id},
                    code="feedback_exists",
                )
            created = pipe.hget(match_key, "created_at")
            if created is None:
                raise ConflictError("the match record is gone", detail={"match_id": f.match_id})
            pipe.multi()
            pipe.hset(
                key,
                mapping={
                    "true_subject": _enc(f.true_subject),
                    "true_subject_set": _enc(f.true_subject is not None),
                    "correct": _enc(f.correct),
                    "genuine": _enc(f.genuine),
                    "outcome": f.outcome,
                    "created_at": _enc(f.created_at),
                },
            )
            pipe.zadd(self._tenant(f.tenant_id, "labelled"), {f.match_id: float(created)})

        self._tx("add feedback", [self._tenant(f.tenant_id), key, match_key], body)

    def list_decisions(
        self,
        tenant_id: str,
        *,
        since: float = 0.0,
        labelled_only: bool = False,
        limit: int | None = None,
    ) -> list[Decision]:
        out: list[Decision] = []
        with self._translate("list decisions"):
            if labelled_only:
                self._ensure_labelled_index()
            index = self._tenant(tenant_id, "labelled" if labelled_only else "matches")
            ids = [_s(m) or "" for m in self.r.zrangebyscore(index, since, "+inf")]
            for chunk in _chunks(ids):
                pipe = self.r.pipeline(transaction=False)
                for mid in chunk:
                    pipe.hgetall(self._tenant(tenant_id, "match", mid))
                    pipe.hgetall(self._tenant(tenant_id, "feedback", mid))
                rows = pipe.execute()
                for i, mid in enumerate(chunk):
                    m, fb = rows[2 * i], rows[2 * i + 1]
                    if not m or (labelled_only and not fb):
                        continue
                    out.append(
                        Decision(self._match(tenant_id, mid, m), self._feedback(tenant_id, mid, fb))
                    )
                    if limit is not None and len(out) >= limit:
                        return out
        return out

    def _ensure_labelled_index(self) -> None:
        """Stores written before the labelled zsets existed: one pass over their feedback keys
        adds each to its tenant's zset (idempotent, so replicas racing here do no harm), then
        ``labelled:v1`` says it is done, for every replica and restart."""
        if self._labelled_ready:
            return
        marker = self._k("labelled", "v1")
        if not self.r.exists(marker):
            pattern = glob_escape(self._k("tenant")) + ":*:feedback:*"
            for key in self.r.scan_iter(match=pattern, count=1000):
                parts = (_s(key) or "")[len(self._k("tenant")) + 1 :].split(":")
                if len(parts) != 3 or parts[1] != "feedback":
                    continue
                tid, mid = key_part_decode(parts[0]), key_part_decode(parts[2])
                created = self.r.hget(self._tenant(tid, "match", mid), "created_at")
                if created is not None:
                    self.r.zadd(self._tenant(tid, "labelled"), {mid: float(created)})
            self.r.set(marker, "1")
        self._labelled_ready = True

    def prune_decisions(self, tenant_id: str, *, before: float, keep: int) -> int:
        zkey = self._tenant(tenant_id, "matches")
        with self._translate("prune decisions"):
            old = self.r.zrangebyscore(zkey, "-inf", f"({before}")
            excess = max(0, int(self.r.zcard(zkey)) - keep)
            oldest = self.r.zrange(zkey, 0, excess - 1) if excess else []
            victims = sorted({_s(m) or "" for m in [*old, *oldest]})
            for chunk in _chunks(victims):
                pipe = self.r.pipeline(transaction=True)
                for mid in chunk:
                    pipe.delete(
                        self._tenant(tenant_id, "match", mid),
                        self._tenant(tenant_id, "feedback", mid),
                    )
                pipe.zrem(zkey, *chunk)
                pipe.zrem(self._tenant(tenant_id, "labelled"), *chunk)
                pipe.execute()
        return len(victims)

    # --- monitoring ------------------------------------------------------------------------
    def put_monitor_snapshot(self, snapshot: Mapping[str, Any]) -> None:
        body = json.dumps(snapshot, allow_nan=False, separators=(",", ":"))
        with self._translate("put monitor snapshot"):
            self.r.set(self._k("monitor", "snapshot"), body)

    def get_monitor_snapshot(self) -> dict[str, Any] | None:
        with self._translate("get monitor snapshot"):
            raw = self.r.get(self._k("monitor", "snapshot"))
        return None if raw is None else json.loads(raw)

    # --- model registry --------------------------------------------------------------------
    def get_model_registry(self) -> tuple[dict[str, Any] | None, int]:
        return self._get_document("models", "get model registry")

    def _get_document(self, name: str, what: str) -> tuple[dict[str, Any] | None, int]:
        with self._translate(what):
            rev, body = self.r.hmget(self._k(name), ["rev", "body"])
        return (None, 0) if body is None else (json.loads(body), int(rev or 0))

    @acknowledged("put model registry")
    def put_model_registry(self, registry: Mapping[str, Any], *, expected_rev: int) -> bool:
        return self._put_document("models", registry, expected_rev, "put model registry")

    def _put_document(
        self, name: str, doc: Mapping[str, Any], expected_rev: int, what: str
    ) -> bool:
        """Compare-and-set, safe to resend: redis-py resends a command whose reply was lost
        (on a new connection), and the resend must not read its own applied write as a lost
        race (the caller would apply its change a second time). Each call writes a token of
        its own beside the body; a revision one past the expected one carrying this call's
        token is this call's write, reported as done (a body alone would not do: two racing
        writers may compute the same one)."""
        body = json.dumps(doc, allow_nan=False, separators=(",", ":"))
        token = uuid.uuid4().hex
        with self._translate(what):
            done = self.r.eval(
                "local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0') "
                "local want = tonumber(ARGV[1]) "
                "if rev == want + 1 and redis.call('HGET', KEYS[1], 'writer') == ARGV[3] then "
                "return 1 end "
                "if rev ~= want then return 0 end "
                "redis.call('HSET', KEYS[1], 'rev', rev + 1, 'body', ARGV[2], 'writer', ARGV[3]) "
                "return 1",
                1,
                self._k(name),
                expected_rev,
                body,
                token,
            )
        return bool(done)

    # --- shard groups (issue 31 item 2) ------------------------------------------------------
    def get_placement(self) -> tuple[dict[str, Any] | None, int]:
        """The placement table (``P placement``: rev, body), as the model registry is kept."""
        return self._get_document("placement", "get placement")

    @acknowledged("put placement")
    def put_placement(self, table: Mapping[str, Any], *, expected_rev: int) -> bool:
        return self._put_document("placement", table, expected_rev, "put placement")

    def put_replica(self, url: str, info: Mapping[str, Any], *, now: float) -> None:
        """This replica's heartbeat (``P replicas``: its URL -> ``info`` and ``now``)."""
        body = json.dumps({**info, "seen": now}, separators=(",", ":"))
        with self._translate("put replica"):
            self.r.hset(self._k("replicas"), url, body)

    def list_replicas(self, *, now: float, max_age_s: float) -> dict[str, dict[str, Any]]:
        """Replicas heard from within ``max_age_s``; older entries are removed."""
        with self._translate("list replicas"):
            rows = self.r.hgetall(self._k("replicas"))
            live, stale = {}, []
            for url, body in rows.items():
                info = json.loads(body)
                if now - float(info.get("seen", 0)) <= max_age_s:
                    live[_s(url) or ""] = info
                elif now - float(info.get("seen", 0)) > 10 * max_age_s:
                    stale.append(url)
            if stale:
                self.r.hdel(self._k("replicas"), *stale)
        return live

    def delete_embeddings(self, model_version: str) -> int:
        field = f"emb:{model_version}"
        removed = 0
        with self._translate("delete embeddings"):
            for tenant in self.r.zrange(self._k("tenants"), 0, -1):
                tid = _s(tenant) or ""
                ids = [_s(m) or "" for m in self.r.zrange(self._tenant(tid, "items"), 0, -1)]
                for chunk in _chunks(ids):
                    pipe = self.r.pipeline(transaction=False)
                    for iid in chunk:
                        pipe.hdel(self._tenant(tid, "item", iid), field)
                    removed += sum(int(n) for n in pipe.execute())
        return removed


def _cursor(entry_id: str, entries_added: Any) -> str:
    return entry_id if entries_added is None else f"{entry_id}#{int(entries_added)}"


def _tenant_record(tenant: Tenant) -> dict[str, str]:
    """The fields of a tenant's record hash (``P tenant:T``)."""
    return {"name": tenant.name, "created_at": _enc(tenant.created_at), "subjects_indexed": "1"}


def stream_position(token: str) -> tuple[int, int]:
    """A feed position (a cursor or consistency token, ``"<ms>-<seq>[#<entries added>]"``),
    ordered as the stream is: ``(ms, seq)`` of its entry id (``"<ms>"`` is ``"<ms>-0"``)."""
    return _stream_id(token.partition("#")[0])


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _chunks(xs: Sequence[T], n: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]
