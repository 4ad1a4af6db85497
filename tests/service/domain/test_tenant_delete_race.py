"""Deleting a tenant while its clients keep writing, on both stores.

Regression (issue 15): eight threads enrolling while the admin deleted the tenant. On Redis
(two replicas) every delete answered 204 yet left 56-108 keys of the tenant behind forever, and
both replicas rebuilt indexes for the deleted tenant; on SQLite about 8 enrolments per trial
were 500s (an untranslated ``FOREIGN KEY constraint failed``). Now a write is wholly before the
delete (and swept with the tenant) or refused (401 once the key is gone, 409
``tenant_deleted`` inside the window); no 5xx, no key left, no index left on any replica.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.ids import glob_escape, key_part
from tests.service.conftest import ADMIN_TOKEN, REDIS_URL, make_settings, unit

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
THREADS = 8
TRIALS = 3


def _storm(clients: list[TestClient], victim: dict, bystander: dict) -> Counter:
    """THREADS writers (enrol and match, round robin over the replicas) on ``victim`` while
    the admin deletes it; the bystander tenant enrols meanwhile. Returns the status counts."""
    auth = {"Authorization": f"Bearer {victim['api_key']}"}
    statuses: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    started = threading.Barrier(THREADS + 1)

    def writer(n: int) -> None:
        c = clients[n % len(clients)]
        started.wait()
        i = 0
        while not stop.is_set():
            i += 1
            if i % 3:
                r = c.post(
                    "/v1/gallery",
                    headers=auth,
                    json={
                        "items": [
                            {
                                "subject": f"s{n}",
                                "embedding": unit(1000 * n + i),
                                "metadata": {"i": i},
                            },
                            {"subject": f"z{i % 2}", "embedding": unit(5000 * n + i)},
                        ]
                    },
                )
            else:
                r = c.post("/v1/match", headers=auth, json={"embedding": unit(n), "k": 3})
            with lock:
                statuses[r.status_code] += 1
            if r.status_code == 401:  # the tenant's key is gone: this client is done
                return

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)
    r = clients[0].delete(f"/v1/tenants/{victim['tenant_id']}", headers=ADMIN)
    assert r.status_code == 204, r.text
    for t in threads:  # each writer stops at its first 401 (the key is gone)
        t.join(60)
    stop.set()  # only a safety net: every writer must have seen the delete
    assert not any(t.is_alive() for t in threads)
    b_auth = {"Authorization": f"Bearer {bystander['api_key']}"}
    assert (
        clients[-1]
        .post(
            "/v1/gallery", headers=b_auth, json={"items": [{"subject": "b", "embedding": unit(7)}]}
        )
        .status_code
        == 201
    )
    return statuses


def _check_statuses(statuses: Counter) -> None:
    assert not [s for s in statuses if s >= 500], statuses
    assert set(statuses) <= {200, 201, 401, 409}, statuses
    # writes before the delete, and every writer refused after it (each stops at its 401)
    assert statuses[201] > 0 and statuses[401] == THREADS * TRIALS, statuses


def test_delete_under_enrolment_sqlite(artefact: Path, store_settings) -> None:
    store = store_settings("sqlite")
    with TestClient(create_app(make_settings(artefact, store))) as c:
        total: Counter = Counter()
        for trial in range(TRIALS):  # each victim is deleted; bystanders stay (names are unique)
            victim = c.post("/v1/tenants", json={"name": "victim"}, headers=ADMIN).json()
            bystander = c.post("/v1/tenants", json={"name": f"b{trial}"}, headers=ADMIN).json()
            total += _storm([c], victim, bystander)
            tid = victim["tenant_id"]
            db = sqlite3.connect(store["store_url"].removeprefix("sqlite:///"))
            try:
                for table in ("tenants", "api_keys", "items", "matches"):
                    n = db.execute(
                        f"SELECT COUNT(*) FROM {table} WHERE tenant_id=?", (tid,)
                    ).fetchone()[0]
                    assert n == 0, (table, n)
                orphans = db.execute(
                    "SELECT COUNT(*) FROM embeddings e LEFT JOIN items i "
                    "ON i.seq = e.seq WHERE i.seq IS NULL"
                ).fetchone()[0]
                assert orphans == 0
            finally:
                db.close()
            assert tid not in c.app.state.runtime.serving.indexes.sizes()
            assert bystander["tenant_id"] in c.app.state.runtime.serving.indexes.sizes()
        _check_statuses(total)


@pytest.mark.redis
def test_delete_under_enrolment_two_redis_replicas(artefact: Path, store_settings) -> None:
    store = store_settings("redis")
    prefix = store["redis_key_prefix"]
    settings = make_settings(artefact, store)
    r = redis.Redis.from_url(REDIS_URL)

    def keys_of(tid: str) -> list[bytes]:
        return list(
            r.scan_iter(match=glob_escape(f"{prefix}tenant:{key_part(tid)}:") + "*", count=1000)
        )

    def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    try:
        with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
            total: Counter = Counter()
            for trial in range(TRIALS):  # each victim is deleted; bystanders stay
                victim = a.post("/v1/tenants", json={"name": "victim"}, headers=ADMIN).json()
                bystander = b.post("/v1/tenants", json={"name": f"b{trial}"}, headers=ADMIN).json()
                before = len(keys_of(bystander["tenant_id"]))
                total += _storm([a, b], victim, bystander)
                tid = victim["tenant_id"]
                assert keys_of(tid) == []  # no orphan key, ever
                assert r.hgetall(f"{prefix}tenant:{tid}") == {}
                assert r.exists(f"{prefix}key:{victim['key_id']}") == 0
                assert len(keys_of(bystander["tenant_id"])) > before
                for app in (a, b):  # both replicas drop the index, and keep it dropped
                    sizes = app.app.state.runtime.serving.indexes.sizes
                    eventually(lambda s=sizes, t=tid: t not in s())
                    eventually(lambda s=sizes, t=bystander["tenant_id"]: t in s())
                time.sleep(0.3)  # late changes on the feed must not bring it back
                assert all(tid not in x.app.state.runtime.serving.indexes.sizes() for x in (a, b))
            _check_statuses(total)
    finally:
        r.close()
