"""Redis topologies. Sentinel: ``TCM_STORE_URL=redis+sentinel://...`` finds the primary through
Sentinel, and a failover (the primary killed, its replica promoted) costs 503s for a moment, then
every replica writes to and follows the new primary without a restart, the acknowledged data
still there (its own primary, replica and ``redis-server --sentinel`` on free loopback ports).
Cluster: why it is not supported, shown on the key layout.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.ids import glob_escape
from service.settings import SentinelURL, Settings
from tests.service.conftest import ADMIN_TOKEN, make_settings, unit
from tests.service.store.test_redis_down import free_port

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("redis_server_binary")]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SERVICE = "tcmprimary"


def test_sentinel_urls_parse() -> None:
    u = SentinelURL.parse("redis+sentinel://s1:26379,10.0.0.2:26380/mymaster/3")
    assert u == SentinelURL((("s1", 26379), ("10.0.0.2", 26380)), "mymaster", 3)
    u = SentinelURL.parse("redis+sentinel://:p%40ss@s1:26379/mymaster?sentinel_password=x")
    assert (u.username, u.password, u.db, u.sentinel_password) == (None, "p@ss", 0, "x")
    u = SentinelURL.parse("redis+sentinel://app:pw@s1:26379/m")
    assert (u.username, u.password) == ("app", "pw")
    assert Settings(store_url="redis+sentinel://s1:26379/m").store_url.startswith("redis+")
    for bad in (
        "redis+sentinel://s1/m",
        "redis+sentinel://s1:26379",
        "redis+sentinel://s1:x/m",
        "redis+sentinel://s1:26379/m/zero",
        "redis+sentinel://s1:26379/m?db=1",
    ):
        with pytest.raises(ValidationError):
            Settings(store_url=bad)


@dataclass
class Topology:
    primary: subprocess.Popen[bytes]
    primary_port: int
    replica: subprocess.Popen[bytes]
    replica_port: int
    sentinel: subprocess.Popen[bytes]
    sentinel_port: int

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/0"


def _redis(port: int, data: Path, *extra: str) -> subprocess.Popen[bytes]:
    data.mkdir()
    return subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(data),
            # a replica's first sync starts at once (the default waits 5 s for more replicas)
            "--repl-diskless-sync-delay",
            "0",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except redis.exceptions.RedisError:
            pass
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    pp, rp, sp = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_redis(pp, tmp_path / "primary"))
        procs.append(_redis(rp, tmp_path / "replica", "--replicaof", "127.0.0.1", str(pp)))
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {sp}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {pp} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 500\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )
        procs.append(
            subprocess.Popen(
                ["redis-server", str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        replica = redis.Redis(port=rp, socket_timeout=0.5)
        sentinel = redis.Redis(port=sp, socket_timeout=0.5)
        _wait(
            lambda: replica.info("replication")["master_link_status"] == "up",
            15,
            "the replica did not sync",
        )
        _wait(
            lambda: len(sentinel.sentinel_slaves(SERVICE)) == 1,
            15,
            "Sentinel did not discover the replica",
        )
        replica.close()
        sentinel.close()
        yield Topology(procs[0], pp, procs[1], rp, procs[2], sp)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_service_on_sentinel_survives_a_failover(topology: Topology, artefact: Path) -> None:
    settings = make_settings(
        artefact, {"store_url": topology.url, "redis_key_prefix": "tcm:"}, store_timeout_s=0.5
    )
    with TestClient(create_app(settings)) as c, TestClient(create_app(settings)) as other:
        key = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN)
        assert key.status_code == 201, key.text
        auth = {"Authorization": f"Bearer {key.json()['api_key']}"}
        r = c.post(
            "/v1/gallery",
            headers=auth,
            json={"items": [{"subject": "a", "embedding": unit(1), "item_id": "before"}]},
        )
        assert r.status_code == 201
        primary = redis.Redis(port=topology.primary_port)
        assert primary.exists(f"tcm:tenant:{key.json()['tenant_id']}:item:before")
        assert primary.wait(1, 2000) == 1  # replicated before the crash (replication is async)
        primary.close()

        topology.primary.kill()  # the primary dies; Sentinel promotes the replica
        topology.primary.wait(timeout=10)
        started = time.monotonic()
        statuses = set()
        while True:
            r = c.post(
                "/v1/gallery",
                headers=auth,
                json={"items": [{"subject": "b", "embedding": unit(2), "item_id": "after"}]},
            )
            statuses.add(r.status_code)
            if r.status_code == 201:
                break
            assert r.status_code == 503, r.text  # unavailable, never a wrong answer
            assert time.monotonic() - started < 30, "no failover"
            time.sleep(0.2)
        print(f"\nSentinel failover: writes refused (503) for {time.monotonic() - started:.1f} s")
        assert 503 in statuses
        promoted = redis.Redis(port=topology.replica_port)
        try:
            assert promoted.info("replication")["role"] == "master"
            # everything is on the new primary: the write before the crash and the one after
            ids = sorted(
                m.decode()
                for m in promoted.zrange(f"tcm:tenant:{key.json()['tenant_id']}:items", 0, -1)
            )
            assert ids == ["after", "before"]
        finally:
            promoted.close()

        # the other replica's change-feed follower found the new primary too: the write made
        # on this replica after the failover reaches its index
        def seen_by_other() -> bool:
            r = other.post("/v1/match", json={"embedding": unit(2), "k": 5}, headers=auth)
            return r.status_code == 200 and [x["item_id"] for x in r.json()["candidates"]] == [
                "after",
                "before",
            ]

        _wait(seen_by_other, 15, "the other replica did not follow the new primary's stream")
        assert c.get("/readyz").status_code == 200 and other.get("/readyz").status_code == 200


def test_key_layout_spans_cluster_slots(
    store_settings: Callable[[str], dict[str, Any]],
) -> None:
    """Why the one-server layout cannot run on Redis Cluster (deploy/README.md): one
    enrolment's transaction touches keys in several hash slots (Cluster refuses it: CROSSSLOT),
    unless the prefix is a hash tag, which puts every key in one slot, i.e. on one shard. The
    Cluster store (``redis+cluster://``) tags each tenant's keys with the tenant instead, its
    counter and stream included: one enrolment, one slot; tenants spread over the slots."""
    from redis.crc import key_slot

    from service.store import NewItem, Tenant
    from service.store.base import ApiKey
    from service.store.redis_cluster import RedisClusterStore
    from service.store.redis_store import RedisStore

    cfg, clustered = store_settings("redis"), store_settings("cluster")
    cases: list[tuple[RedisStore, bool, str]] = [
        (RedisStore(cfg["store_url"], prefix=cfg["redis_key_prefix"], timeout_s=2.0), False, "t"),
        (
            RedisStore(
                cfg["store_url"],
                prefix="{" + cfg["redis_key_prefix"].rstrip(":") + "}:",
                timeout_s=2.0,
            ),
            True,
            "t",
        ),
        (
            RedisClusterStore(
                clustered["store_url"], prefix=clustered["redis_key_prefix"], timeout_s=2.0
            ),
            True,
            "{t}",
        ),
    ]
    for store, one_slot, tag in cases:
        prefix = store.prefix

        def keys(store: RedisStore = store, prefix: str = prefix) -> set[bytes]:
            if isinstance(store, RedisClusterStore):
                return {
                    k
                    for node in store.r.get_primaries()  # type: ignore[attr-defined]
                    for k in node.redis_connection.scan_iter(match=glob_escape(prefix) + "*")
                }
            return set(store.r.scan_iter(match=glob_escape(prefix) + "*"))

        try:
            before = keys()
            store.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))
            after_tenant = keys()
            store.add_items(
                "t",
                [NewItem("i", "s", np.ones(8, np.float32) / np.sqrt(8))],
                model_version="v",
                created_at=1.0,
            )
            touched = keys() - after_tenant
            assert before == set()
            # the enrolment wrote the item, three sorted sets (items, the subject's items, the
            # subject listing), the seq counter and the stream
            per_tenant = tag != "t"
            assert {k.decode().removeprefix(prefix) for k in touched} == {
                f"tenant:{tag}:item:i",
                f"tenant:{tag}:items",
                f"tenant:{tag}:subject:s",
                f"tenant:{tag}:subjects",
                f"tenant:{tag}:seq" if per_tenant else "seq",
                f"tenant:{tag}:changes" if per_tenant else "changes",
            }
            slots = {key_slot(k) for k in touched}
            assert (len(slots) == 1) is one_slot, slots
        finally:
            if not isinstance(store, RedisClusterStore):
                store.r.delete(*keys())
            store.close()
