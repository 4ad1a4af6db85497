"""The Redis store on **Redis Cluster** (``redis+cluster://``; issue 31 item 1).

Cluster runs a command, a transaction or a script only over keys of one hash slot. The layout is
:mod:`service.store.redis_store`'s, with three changes that make every write of a tenant's data
single-slot:

- every tenant key carries the tenant's id as a **hash tag**, ``P tenant:{T}:...``, so a tenant's
  item hashes, sorted sets, staged enrolments, idempotency keys and match records share one
  slot (and one shard);
- the item counter and the change stream are **per tenant**: ``P tenant:{T}:seq`` and
  ``P tenant:{T}:changes`` (an item's seq is unique within its tenant, which is all FAISS needs:
  one index per tenant), so an enrolment stays one script and a put one transaction;
- the records that are not a tenant's data (``P tenants``, ``P tenant_name:H``, ``P key:K``)
  live in slots of their own, so creating and deleting a tenant and adding a key are **ordered
  single-slot writes** instead of one transaction, each order chosen so that a crash between two
  steps leaves nothing a client can see or use (:meth:`RedisClusterStore.create_tenant`,
  :meth:`RedisClusterStore.delete_tenant`); a retry completes them.

The change feed is every tenant's stream: the cursor is a JSON object of tenant id -> that
stream's position, and a read polls the streams of the tenants ``P tenants`` lists (one
pipelined XREAD + XINFO per tenant, grouped by shard; every ``FEED_POLL_MS`` until ``block_ms``),
so a blocking XREAD over many slots, which Cluster refuses, is never needed. A tenant that
leaves ``P tenants`` is a ``drop_tenant`` change. A consistency token is the position of the
written tenant's own stream.

Acknowledged writes (``wait_replicas``): a tenant's write waits on its own shard (a marker in
the tenant's slot, then ``WAIT``, on one connection to that shard); an admin write (tenants,
keys, the model registry), which can touch several slots, waits on every shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import redis
import redis.cluster
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from service.errors import NotFoundError, StoreUnavailableError
from service.ids import key_part
from service.settings import ClusterURL
from service.store.base import ApiKey, Change, MatchRecord, Tenant, duplicate_name
from service.store.redis_store import (
    ADD_ITEMS_LUA,
    RedisStore,
    _cursor,
    _s,
    _tenant_record,
    acknowledged,
    stream_position,
)

FEED_POLL_MS = 50  # how often an idle feed read looks at the tenants' streams again
MAX_DEFERRED_MATCHES = 10_000  # match records one tenant keeps in memory while its shard is down
log = logging.getLogger(__name__)


class RedisClusterStore(RedisStore):
    def __init__(self, url: str, **kwargs: Any) -> None:
        if any(c in kwargs.get("prefix", "") for c in "{}"):
            raise ValueError(
                "on Redis Cluster the key prefix must not contain braces: each tenant's keys "
                "carry the tenant as their hash tag"
            )
        self._cluster = ClusterURL.parse(url)
        self._stop_reading = threading.Event()
        self._scripts_on: set[str] = set()  # shards the enrolment script was loaded on
        self._follows: Callable[[str], bool] = lambda _tenant: True
        # match records whose tenant's shard had no master when written (add_matches)
        self._deferred: dict[str, list[MatchRecord]] = {}
        self._deferred_lock = threading.Lock()
        self._deferred_dropped = 0
        super().__init__(url, **kwargs)
        # a Cluster store is new: no store older than the name and labelled keys to backfill
        self._labelled_ready = self._names_ready = True

    def _connect(self, *, socket_timeout: float, **kwargs: Any) -> redis.Redis:
        kwargs.pop("health_check_interval", None)
        client = redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in self._cluster.nodes],
            username=self._cluster.username,
            password=self._cluster.password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
            **kwargs,
        )
        return client  # type: ignore[return-value]

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """As the one-server store's, plus a slot that moved under a transaction: redis-py
        follows MOVED for single commands but raises it from a MULTI/EXEC (after a failover
        its slot table is stale). The table is refreshed and the call answered 503, so the
        retry goes to the slot's new master."""
        try:
            with super()._translate(what):
                yield
        except (redis.exceptions.MovedError, redis.exceptions.AskError) as exc:
            with contextlib.suppress(redis.exceptions.RedisError):
                self.r.nodes_manager.initialize()  # type: ignore[attr-defined]
            raise StoreUnavailableError(
                f"the Redis Cluster slot moved during the call ({what}); retry",
                detail={"store": "redis"},
            ) from exc

    # --- layout ------------------------------------------------------------------------------
    def _tenant(self, tid: str, *rest: str) -> str:
        return (
            self.prefix
            + "tenant:{"
            + key_part(tid)
            + "}"
            + "".join(":" + key_part(p) for p in rest)
        )

    def _seq_key(self, tenant_id: str) -> str:
        return self._tenant(tenant_id, "seq")

    def _changes_key(self, tenant_id: str) -> str:
        return self._tenant(tenant_id, "changes")

    # --- acknowledged writes -------------------------------------------------------------------
    def _acknowledge(self, what: str, tenant_id: str | None = None) -> None:
        if not self.wait_replicas:
            return
        cluster: Any = self.r
        with self._translate(f"{what}: wait for replicas"):
            if tenant_id is not None:
                marker = self._tenant(tenant_id, "ack")
                targets = [(cluster.get_node_from_key(marker), marker)]
            else:
                targets = self._marker_per_shard()
            for node, marker in targets:
                self._check_held(what, self._wait_behind(node.redis_connection, marker))

    def _marker_per_shard(self) -> list[tuple[Any, str]]:
        """A marker key on each primary (``P ack:{n}``, the smallest n whose slot it owns)."""
        cluster: Any = self.r
        wanted = {node.name for node in cluster.get_primaries()}
        found: dict[str, tuple[Any, str]] = {}
        n = 0
        while len(found) < len(wanted) and n < 1_000_000:
            marker = self._k("ack") + "{" + str(n) + "}"
            node = cluster.get_node_from_key(marker)
            found.setdefault(node.name, (node, marker))
            n += 1
        return list(found.values())

    # --- tenants and keys: ordered single-slot writes -------------------------------------------
    def _followed(self) -> list[str]:
        """The listed tenants this store's feed reader follows (:meth:`follow_only`)."""
        listed = (_s(t) or "" for t in self.r.zrange(self._k("tenants"), 0, -1))
        return [tid for tid in listed if self._follows(tid)]

    def _listed(self, tenant_id: str) -> bool:
        return self.r.zscore(self._k("tenants"), tenant_id) is not None

    @acknowledged("create tenant")
    def create_tenant(self, tenant: Tenant, key: ApiKey) -> None:
        """1. the name (``SET NX``; a name held by a tenant that never got listed, left by a
        crashed create or delete, is taken over); 2. the tenant's record and key set (its
        slot); 3. the key's record; 4. the listing ``P tenants``, which makes the tenant exist
        for every reader. The API key reaches the caller only after step 4, so a crash before
        it leaves records nobody can authenticate with, and the name free again."""
        name_key = self._name_key(tenant.name)
        with self._translate("create tenant"):
            if not self.r.set(name_key, tenant.tenant_id, nx=True):

                def take_over(pipe: redis.client.Pipeline) -> None:
                    holder = _s(pipe.get(name_key))
                    if holder is not None and holder != tenant.tenant_id and self._listed(holder):
                        raise duplicate_name(tenant.name, holder)
                    pipe.multi()
                    pipe.set(name_key, tenant.tenant_id)

                self._tx("create tenant", [name_key], take_over)
            with self.r.pipeline(transaction=True) as pipe:
                pipe.hset(self._tenant(tenant.tenant_id), mapping=_tenant_record(tenant))
                pipe.sadd(self._tenant(tenant.tenant_id, "keys"), key.key_id)
                pipe.execute()
            self._write_key(key)
            self.r.zadd(self._k("tenants"), {tenant.tenant_id: tenant.created_at})

    def _write_key(self, key: ApiKey) -> None:
        pipe = self.r.pipeline(transaction=True)
        self._queue_key(pipe, key, with_set=False)
        pipe.execute()

    @acknowledged("delete tenant")
    def delete_tenant(self, tenant_id: str) -> bool:
        """1. its API keys' records (from then on no key authenticates); 2. its record (every
        write of its data, which checks the record under WATCH, aborts); 3. the listing; 4. its
        name, if still its own; 5. the sweep of its slot. Each step is idempotent, so a delete
        cut short by a crash is finished by the next call, which finds the tenant listed or
        its record still there."""
        record = self._tenant(tenant_id)
        with self._translate("delete tenant"):
            pipe = self.r.pipeline(transaction=True)
            pipe.hget(record, "name")
            pipe.smembers(self._tenant(tenant_id, "keys"))
            name, key_ids = pipe.execute()
            listed = self._listed(tenant_id)
            if name is None and not listed:
                return False
            for kid in sorted(_s(k) or "" for k in key_ids):
                self.r.delete(self._k("key", kid))
            self.r.delete(record)
            self.r.zrem(self._k("tenants"), tenant_id)
            if name is not None:
                name_key = self._name_key(_s(name) or "")
                # freed only if it is still this tenant's (compare and delete, in one step)
                self.r.eval(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                    "return redis.call('DEL', KEYS[1]) end return 0",
                    1,
                    name_key,
                    tenant_id,
                )
            self._sweep(self.r, tenant_id)
        return True

    def _sweep(self, client: redis.Redis, tenant_id: str) -> None:
        """On the tenant's shard: the one node that holds its slot."""
        cluster: Any = self.r
        node = cluster.get_node_from_key(self._tenant(tenant_id))
        super()._sweep(node.redis_connection, tenant_id)

    @acknowledged("add key")
    def add_key(self, key: ApiKey, *, revoke_others_at: float | None = None) -> list[str]:
        """The key's record, then its tenant's key set (checked to exist first); the others
        are revoked after, each its own write."""
        with self._translate("add key"):
            if not self.r.exists(self._tenant(key.tenant_id)):
                raise NotFoundError(
                    f"no tenant {key.tenant_id!r}", detail={"tenant_id": key.tenant_id}
                )
            others = sorted(
                _s(k) or "" for k in self.r.smembers(self._tenant(key.tenant_id, "keys"))
            )
            self._write_key(key)
            self.r.sadd(self._tenant(key.tenant_id, "keys"), key.key_id)
            revoked: list[str] = []
            if revoke_others_at is not None:
                for kid in others:
                    if self._revoke(kid, revoke_others_at):
                        revoked.append(kid)
        return revoked

    def get_key(self, key_id: str) -> ApiKey | None:
        """From the key's shard; while that shard has no master (its replica not promoted
        yet), from its replica: keys are written under ``WAIT`` when acknowledged writes are
        on, so a replica holds every acknowledged key and revocation. Authentication then
        keeps working for tenants whose data lives on the other shards."""
        try:
            return super().get_key(key_id)
        except StoreUnavailableError:
            h = self._read_replica(self._k("key", key_id))
            if h is None:
                raise
            return self._key(key_id, h) if h else None

    def _read_replica(self, key: str) -> dict[bytes, bytes] | None:
        """HGETALL of ``key`` on a replica of its slot (READONLY on that connection), or on
        the master a live node names for it, or None when none answers. The nodes are asked
        of the cluster (``CLUSTER SLOTS``): while a master is down, or just after its replica
        was promoted, the client's own slot table may still name only the dead one."""
        cluster: Any = self.r
        slot = cluster.keyslot(key)
        for host, port in self._nodes_of(slot):
            client = self._node_client(host, port)
            try:
                pipe = client.pipeline(transaction=False)
                pipe.execute_command("READONLY")
                pipe.hgetall(key)
                return pipe.execute()[1]  # type: ignore[no-any-return]
            except redis.exceptions.RedisError:
                continue
            finally:
                client.close()
        return None

    def _node_client(self, host: str, port: int) -> redis.Redis:
        """A plain client of one node, for the reads a failover needs (closed by the caller)."""
        return redis.Redis(
            host=host,
            port=port,
            username=self._cluster.username,
            password=self._cluster.password,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=min(self._timeout_s, 0.5),
        )

    def _nodes_of(self, slot: int) -> list[tuple[str, int]]:
        """The nodes serving ``slot`` as the first reachable node sees them, replicas first."""
        cluster: Any = self.r
        known = {(n.host, n.port) for n in cluster.nodes_manager.nodes_cache.values()}
        for host, port in sorted(known | set(self._cluster.nodes)):
            client = self._node_client(host, port)
            try:
                ranges = client.execute_command("CLUSTER SLOTS")
            except redis.exceptions.RedisError:
                continue
            finally:
                client.close()
            for first, last, *nodes in ranges:
                if int(first) <= slot <= int(last):
                    # replicas first; then the primary it names, which is a promoted replica
                    # when the client's table still names the dead master
                    return [(_s(n[0]) or "", int(n[1])) for n in [*nodes[1:], nodes[0]]]
        return []

    # --- enrolment: its script, loaded on the tenant's shard first ----------------------------
    def _commit_staged(self, tenant_id: str, *args: Any) -> list[int]:
        """A script queued in a Cluster transaction is sent as EVALSHA without the load
        redis-py does for a plain pipeline: load it on the tenant's shard first (again after
        a NOSCRIPT, e.g. on a replica promoted since)."""
        node = self.r.get_node_from_key(self._tenant(tenant_id))  # type: ignore[attr-defined]
        for attempt in range(2):
            if attempt or node.name not in self._scripts_on:
                with self._translate("load the enrolment script"):
                    node.redis_connection.script_load(ADD_ITEMS_LUA)
                self._scripts_on.add(node.name)
            try:
                return super()._commit_staged(tenant_id, *args)
            except redis.exceptions.NoScriptError:
                self._scripts_on.discard(node.name)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    # --- matches: one transaction per tenant (its slot) -----------------------------------------
    def add_matches(self, records: Sequence[MatchRecord]) -> None:
        """One transaction per tenant. While the tenant's shard has no master (a failover,
        seconds) the records are kept in this process, at most ``MAX_DEFERRED_MATCHES`` per
        tenant (the oldest dropped beyond), and written with the tenant's next match or by
        :meth:`flush_deferred` (the runtime calls it every few seconds and at shutdown), so
        that its matches keep being answered: a match record is the trail feedback is checked
        against, not a write the client was promised (feedback on such a match is a 404 until
        it is written; a process killed meanwhile loses them)."""
        by_tenant: dict[str, list[MatchRecord]] = {}
        for r in records:
            by_tenant.setdefault(r.tenant_id, []).append(r)
        for tenant_id, group in by_tenant.items():
            self._write_or_keep(tenant_id, group)

    def _write_or_keep(self, tenant_id: str, records: list[MatchRecord]) -> int | None:
        """Writes ``records`` with those already waiting for ``tenant_id``; keeps them all
        waiting if its shard cannot take them. How many were written, None if kept."""
        with self._deferred_lock:
            waiting = self._deferred.pop(tenant_id, [])
        try:
            super().add_matches([*waiting, *records])
        except StoreUnavailableError as exc:
            with self._deferred_lock:
                kept = [*waiting, *records, *self._deferred.get(tenant_id, [])]
                over = max(0, len(kept) - MAX_DEFERRED_MATCHES)
                self._deferred[tenant_id] = kept[over:]
                self._deferred_dropped += over
            if not waiting:
                log.warning(
                    "tenant %s: match records kept in memory until its shard is back: %s",
                    tenant_id,
                    exc.message,
                )
            if over:
                log.warning(
                    "tenant %s: %d match records dropped, more than %d waited for its shard",
                    tenant_id,
                    over,
                    MAX_DEFERRED_MATCHES,
                )
            return None
        return len(waiting) + len(records)

    def deferred_matches(self) -> tuple[int, int]:
        with self._deferred_lock:
            return sum(map(len, self._deferred.values())), self._deferred_dropped

    def flush_deferred(self, *, until_failure: bool = False) -> int:
        """As the protocol's; ``until_failure`` stops at the first tenant whose shard is
        still down (at shutdown, so that closing waits at most one socket timeout)."""
        with self._deferred_lock:
            tenants = [t for t, waiting in self._deferred.items() if waiting]
        written = 0
        for tenant_id in tenants:
            n = self._write_or_keep(tenant_id, [])
            if n is None and until_failure:
                break
            written += n or 0
        if written:
            log.info("wrote %d match records that had waited for their shard", written)
        return written

    # --- the change feed: every tenant's stream ------------------------------------------------
    def change_cursor(self, tenant_id: str | None = None) -> str | None:
        """With ``tenant_id``: that tenant's stream position (a consistency token); else the
        cursor of every listed tenant's stream, now."""
        with self._translate("read change feed"):
            tenants = [tenant_id] if tenant_id is not None else self._followed()
            pipe = self.r.pipeline(transaction=False)
            for tid in tenants:
                pipe.xinfo_stream(self._changes_key(tid))
            infos = pipe.execute(raise_on_error=False)
        positions = {
            tid: "0-0#0"
            if isinstance(info, Exception)
            else _cursor(_s(info["last-generated-id"]) or "0-0", info.get("entries-added"))
            for tid, info in zip(tenants, infos, strict=True)
        }
        if tenant_id is not None:
            return positions[tenant_id]
        return json.dumps(positions, sort_keys=True)

    def follow_only(self, tenants: Callable[[str], bool]) -> None:
        """Only these tenants' streams are read; one that stops being followed is a
        ``drop_tenant`` change for the reader (its index goes)."""
        self._follows = tenants

    def cursor_with(self, cursor: str, tenant_id: str, position: str) -> str:
        return json.dumps({**json.loads(cursor), tenant_id: position}, sort_keys=True)

    def feed_covers(self, cursor: str, token: str, tenant_id: str) -> bool:
        position = json.loads(cursor).get(tenant_id)
        return position is not None and stream_position(position) >= stream_position(token)

    def interrupt_changes(self) -> None:
        self._stop_reading.set()

    def read_changes(self, cursor: str, *, block_ms: int) -> tuple[str, list[Change]]:
        """Polls the listed tenants' streams until one has entries after ``cursor`` or
        ``block_ms`` passed; a tenant no longer listed is a ``drop_tenant`` change."""
        positions: dict[str, str] = json.loads(cursor)
        deadline = time.monotonic() + block_ms / 1e3
        while True:
            if self._stop_reading.is_set():
                self._stop_reading.clear()
                raise StoreUnavailableError(
                    "the change feed read was interrupted", detail={"store": "redis"}
                )
            with self._translate("read change feed"):
                moved, changes = self._poll(positions)
            if changes and changes[0].op == "resync":
                return cursor, changes
            if changes or moved != positions or time.monotonic() >= deadline:
                return json.dumps(moved, sort_keys=True), changes
            self._stop_reading.wait(min(FEED_POLL_MS / 1e3, max(0.0, deadline - time.monotonic())))

    def _poll(self, positions: Mapping[str, str]) -> tuple[dict[str, str], list[Change]]:
        listed = self._followed()
        changes = [Change("drop_tenant", tid) for tid in sorted(set(positions) - set(listed))]
        pipe = self.r.pipeline(transaction=False)
        for tid in listed:
            key = self._changes_key(tid)
            pipe.xread({key: positions.get(tid, "0-0#0").partition("#")[0]}, count=1000)
            pipe.xinfo_stream(key)
        replies = pipe.execute(raise_on_error=False)
        moved: dict[str, str] = {}
        for i, tid in enumerate(listed):
            reply, info = replies[2 * i], replies[2 * i + 1]
            if isinstance(reply, Exception):
                raise reply
            position = positions.get(tid, "0-0#0")
            if isinstance(info, Exception):
                info = None
                if position.partition("#")[0] != "0-0" and not self._listed(tid):
                    changes.append(Change("drop_tenant", tid))  # deleted since the listing
                    continue
            moved[tid], found = self._read_stream(
                self.r, self._changes_key(tid), position, reply, info
            )
            if found and found[0].op == "resync":
                return dict(positions), found
            changes += found
        return moved, changes

    def close(self) -> None:
        self._stop_reading.set()
        with contextlib.suppress(Exception):
            self.flush_deferred(until_failure=True)
        waiting, _ = self.deferred_matches()
        if waiting:
            log.warning("closing with %d match records unwritten: their shard is down", waiting)
        with contextlib.suppress(Exception):
            self.r.close()
