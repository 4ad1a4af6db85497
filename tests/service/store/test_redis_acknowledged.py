"""Writes acknowledged only once a replica holds them (``TCM_REDIS_WAIT_REPLICAS``, issue 31).

Redis replicates asynchronously: a write the primary confirmed is lost if the primary dies
before its replica received it and the replica is promoted. With ``redis_wait_replicas`` = 1 a
write of record is confirmed only after ``WAIT 1``; a replica that cannot acknowledge (here:
stopped with SIGSTOP, so it cannot answer, deterministically) makes the write a 503 that keeps
the data on the primary, and a retry with the same ``Idempotency-Key`` is replayed, once the
replica is back, never applied twice. Own primary and replica on free loopback ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.errors import StoreUnavailableError
from service.settings import Settings
from service.store import NewItem, Tenant
from service.store.base import ApiKey
from service.store.redis_store import RedisStore
from tests.service.conftest import ADMIN_TOKEN, make_settings, unit
from tests.service.store.test_redis_down import free_port
from tests.service.store.test_redis_topologies import _redis, _wait

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("redis_server_binary")]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# a refusal does not depend on the timeout (a stopped replica never acknowledges); a
# confirmation must not hinge on a busy machine answering within it: generous where it passes
REFUSE_MS, CONFIRM_MS = 200, 1500


@dataclass
class Pair:
    primary_port: int
    replica: subprocess.Popen[bytes]
    replica_port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.primary_port}/0"

    def stop_replica(self) -> None:
        """SIGSTOP: the replica stays connected but cannot acknowledge anything."""
        os.kill(self.replica.pid, signal.SIGSTOP)

    def resume_replica(self) -> None:
        os.kill(self.replica.pid, signal.SIGCONT)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    pp, rp = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_redis(pp, tmp_path / "primary"))
        procs.append(_redis(rp, tmp_path / "replica", "--replicaof", "127.0.0.1", str(pp)))
        replica = redis.Redis(port=rp, socket_timeout=0.5)
        _wait(
            lambda: replica.info("replication")["master_link_status"] == "up",
            15,
            "the replica did not sync",
        )
        replica.close()
        yield Pair(pp, procs[1], rp)
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGCONT) if p.poll() is None else None
            p.kill()
            p.wait(timeout=10)


def _store(pair: Pair, wait_replicas: int, wait_ms: int = CONFIRM_MS) -> RedisStore:
    return RedisStore(
        pair.url, prefix="tcm:", timeout_s=3.0, wait_replicas=wait_replicas, wait_timeout_ms=wait_ms
    )


def _item(item_id: str, seed: int) -> NewItem:
    return NewItem(item_id, "s", np.asarray(unit(seed, 8), dtype=np.float32))


def test_every_write_of_record_waits_for_the_replica(pair: Pair) -> None:
    """With the replica stopped, each write of record is refused (503) and stays on the
    primary; the same write without WAIT is confirmed while the replica lacks it: the loss an
    unacknowledged failover would cause."""
    store, refusing, plain = _store(pair, 1), _store(pair, 1, REFUSE_MS), _store(pair, 0)
    replica = redis.Redis(port=pair.replica_port)
    try:
        store.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))
        # acknowledged: already on the replica, with no wait of the test's own
        assert replica.exists("tcm:tenant:t", "tcm:key:k") == 2
        store.add_items("t", [_item("a", 1)], model_version="v", created_at=1.0)
        assert replica.exists("tcm:tenant:t:item:a") == 1

        pair.stop_replica()
        writes = {
            "create tenant": lambda: refusing.create_tenant(
                Tenant("u", "u", 2.0), ApiKey("k2", "u", "h" * 64, 2.0)
            ),
            "add key": lambda: refusing.add_key(ApiKey("k3", "t", "i" * 64, 2.0)),
            "revoke key": lambda: refusing.revoke_key("t", "k3", 3.0),
            "add items": lambda: refusing.add_items(
                "t", [_item("b", 2)], model_version="v", created_at=2.0
            ),
            "put item": lambda: refusing.put_item(
                "t", _item("c", 3), model_version="v", created_at=2.0
            ),
            "delete item": lambda: refusing.delete_item("t", "c"),
            "delete subject": lambda: refusing.delete_subject("t", "s"),
            "put model registry": lambda: refusing.put_model_registry({"x": 1}, expected_rev=0),
            "delete tenant": lambda: refusing.delete_tenant("u"),
        }
        for what, write in writes.items():
            with pytest.raises(StoreUnavailableError, match="0 of the 1 replica") as info:
                write()
            assert what in info.value.message
        # each refused write is on the primary all the same (the last one deleted tenant u)
        assert store.get_key("k3") is not None and store.get_key("k3").revoked_at == 3.0
        assert store.count_items("t") == 0 and store.get_tenant("u") is None
        assert store.get_model_registry()[1] == 1

        # the control: without WAIT the write is confirmed though the replica lacks it
        plain.put_item("t", _item("d", 4), model_version="v", created_at=3.0)
        pair.resume_replica()
        store.put_item("t", _item("e", 5), model_version="v", created_at=3.0)
        assert replica.exists("tcm:tenant:t:item:d", "tcm:tenant:t:item:e") == 2
    finally:
        pair.resume_replica()
        replica.close()
        for client in (store, refusing, plain):
            client.close()


def test_an_unacknowledged_enrolment_is_a_503_and_its_retry_a_single_write(
    pair: Pair, artefact: Path
) -> None:
    settings = make_settings(
        artefact,
        {"store_url": pair.url, "redis_key_prefix": "tcm:"},
        store_timeout_s=3.0,
        redis_wait_replicas=1,
        redis_wait_timeout_ms=CONFIRM_MS,
    )
    replica = redis.Redis(port=pair.replica_port)
    with TestClient(create_app(settings)) as c:
        created = c.post("/v1/tenants", json={"name": "t"}, headers=ADMIN)
        assert created.status_code == 201, created.text
        tid = created.json()["tenant_id"]
        auth = {"Authorization": f"Bearer {created.json()['api_key']}"}
        body = {"items": [{"subject": "a", "embedding": unit(1), "item_id": "one"}]}
        r = c.post("/v1/gallery", json=body, headers={**auth, "Idempotency-Key": "first"})
        assert r.status_code == 201, r.text
        assert replica.exists(f"tcm:tenant:{tid}:item:one") == 1

        pair.stop_replica()
        body = {"items": [{"subject": "b", "embedding": unit(2), "item_id": "two"}]}
        headers = {**auth, "Idempotency-Key": "second"}
        for _ in range(2):  # the write, then its retry (a replay): neither is confirmed
            r = c.post("/v1/gallery", json=body, headers=headers)
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] == "1"
            assert r.json()["code"] == "store_unavailable"
            assert "Idempotency-Key" in r.json()["message"]
        pair.resume_replica()
        r = c.post("/v1/gallery", json=body, headers=headers)
        assert r.status_code == 201, r.text
        assert r.json()["item_ids"] == ["two"]
        assert replica.exists(f"tcm:tenant:{tid}:item:two") == 1
        listed = c.get("/v1/gallery?limit=10", headers=auth).json()["items"]
        assert sorted(i["item_id"] for i in listed) == ["one", "two"]  # once each
        m = c.post("/v1/match", json={"embedding": unit(2), "k": 2}, headers=auth)
        assert m.json()["candidates"][0]["item_id"] == "two"
    replica.close()


def test_the_wait_must_end_before_the_socket_gives_up() -> None:
    with pytest.raises(ValidationError, match="redis_wait_timeout_ms"):
        Settings(redis_wait_replicas=1, redis_wait_timeout_ms=2000, store_timeout_s=2.0)
    Settings(redis_wait_replicas=0, redis_wait_timeout_ms=5000, store_timeout_s=2.0)
    with pytest.raises(ValueError, match="shorter than the store's socket"):
        RedisStore("redis://127.0.0.1:1/0", timeout_s=1.0, wait_replicas=1, wait_timeout_ms=1000)
