"""Tenant names are unique (issue 30: two tenants could share a name), on both stores.

Names compare under ``tenant_name_key`` (NFKC, case folded, spaces at the ends or repeated
ignored); the store refuses a taken one with 409 ``duplicate_tenant_name`` atomically: of many
concurrent creates of one name exactly one succeeds (SQLite: the writer's unique index; Redis:
a transaction WATCHing the name's key, from several connections as replicas would). Deleting
a tenant frees its name. Stores written before the rule are indexed when opened, the oldest
tenant keeping a name two of them share.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import ConflictError
from service.settings import Settings
from service.store import ApiKey, Store, Tenant, open_store
from service.store.base import tenant_name_digest, tenant_name_key
from tests.service.conftest import ADMIN_TOKEN, REDIS_URL, STORES, make_settings

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(params=STORES)
def stores(
    request: pytest.FixtureRequest, store_settings, artefact: Path
) -> Iterator[Callable[[], Store]]:
    """A factory of stores on one fresh store URL (several connections, as replicas have)."""
    fields = store_settings(request.param)
    made: list[Store] = []

    def make() -> Store:
        made.append(open_store(Settings(artefact_path=artefact, **fields)))
        return made[-1]

    yield make
    for s in made:
        s.close()


def create(store: Store, name: str, t: float = 1.0) -> str:
    tid = uuid.uuid4().hex
    store.create_tenant(Tenant(tid, name, t), ApiKey(uuid.uuid4().hex[:16], tid, "h" * 64, t))
    return tid


def test_name_key_ignores_case_unicode_form_and_spaces() -> None:
    same = ["Acme", "acme", "ACME", " acme ", "Ａｃｍｅ", "ａｃｍｅ"]
    assert {tenant_name_key(n) for n in same} == {"acme"}
    assert tenant_name_key("Acme  Corp") == tenant_name_key("acme corp")
    assert len({tenant_name_key(n) for n in ("acme", "acme2", "acme-corp", "acmé")}) == 4
    assert len(tenant_name_digest("anything at all")) == 64


def test_a_taken_name_is_refused_and_deleting_frees_it(stores: Callable[[], Store]) -> None:
    store = stores()
    first = create(store, "Acme Corp")
    for again in ("Acme Corp", "acme corp", "  ACME   CORP ", "Ａｃｍｅ Corp"):
        with pytest.raises(ConflictError) as err:
            create(store, again)
        assert err.value.code == "duplicate_tenant_name"
        assert err.value.detail == {"name": again, "tenant_id": first}
    assert [t.tenant_id for t in store.list_tenants()] == [first]  # nothing half-written
    other = create(store, "Acme Corporation")  # another name
    assert store.delete_tenant(first)
    second = create(store, "ACME corp")  # free again
    assert {t.tenant_id for t in store.list_tenants()} == {other, second}
    assert store.get_tenant(second).name == "ACME corp"  # kept as given


def race(conns: list[Store], name: str, n: int = 8) -> tuple[list[str], list[str], list[Any]]:
    """``n`` threads create ``name`` (alternately upper-cased) at once on ``conns``: (ids
    created, conflict codes, other exceptions)."""
    start = threading.Barrier(n)
    won: list[str] = []
    refused: list[str] = []
    failed: list[BaseException] = []

    def go(i: int) -> None:
        start.wait()
        try:
            won.append(create(conns[i % len(conns)], name.upper() if i % 2 else name))
        except ConflictError as exc:
            refused.append(exc.code)
        except BaseException as exc:  # recorded, so the test names it
            failed.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return won, refused, failed


def test_concurrent_creates_of_one_name_one_wins(stores: Callable[[], Store]) -> None:
    """Eight threads on four connections create the same name at once, five rounds: exactly
    one per round succeeds, the others get 409 ``duplicate_tenant_name``."""
    conns = [stores() for _ in range(4)]
    for round_ in range(5):
        name = f"race-{round_}"
        won, refused, failed = race(conns, name)
        assert not failed, failed
        assert len(won) == 1, (won, refused)
        assert refused == ["duplicate_tenant_name"] * 7
        holders = [t for t in conns[0].list_tenants() if tenant_name_key(t.name) == name]
        assert [t.tenant_id for t in holders] == won


def test_sqlite_file_from_before_the_rule_is_indexed_on_open(tmp_path: Path) -> None:
    """Two tenants of one name written before names were unique: opening the file indexes the
    older one's name; both stay, and a third of that name is refused naming the older."""
    from service.store.sqlite import SQLiteStore

    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    older = create(store, "shared", 1.0)
    store.close()
    import sqlite3

    conn = sqlite3.connect(path)  # as an older build wrote it: a second "shared", no index rows
    conn.execute("DELETE FROM tenant_names")
    conn.execute("INSERT INTO tenants VALUES ('newer', 'Shared', 2.0)")
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    try:
        assert {t.tenant_id for t in store.list_tenants()} == {older, "newer"}
        with pytest.raises(ConflictError) as err:
            create(store, "SHARED")
        assert err.value.detail["tenant_id"] == older
        assert store.delete_tenant(older)
        create(store, "shared")  # the older one's name was freed with it
    finally:
        store.close()


@pytest.mark.redis
def test_redis_store_from_before_the_rule_is_indexed_once(store_settings, artefact: Path) -> None:
    fields = store_settings("redis")
    prefix = fields["redis_key_prefix"]
    store = open_store(Settings(artefact_path=artefact, **fields))
    older = create(store, "shared", 1.0)
    newer = create(store, "other", 2.0)
    store.close()
    r = redis.Redis.from_url(REDIS_URL)
    try:  # as an older build left it: no name keys, no marker, two tenants named alike
        r.delete(prefix + "tenant_names:v1")
        for key in r.scan_iter(match=prefix + "tenant_name:*"):
            r.delete(key)
        r.hset(f"{prefix}tenant:{newer}", "name", "Shared")
    finally:
        r.close()
    store = open_store(Settings(artefact_path=artefact, **fields))
    try:
        with pytest.raises(ConflictError) as err:
            create(store, "SHARED ")
        assert err.value.detail["tenant_id"] == older
        assert store.delete_tenant(older)
        create(store, "shared")
    finally:
        store.close()


@pytest.mark.parametrize("kind", STORES)
def test_api_answers_409_for_a_taken_name(
    kind: str, artefact: Path, store_settings: Callable[[str], dict[str, Any]]
) -> None:
    settings = make_settings(artefact, store_settings(kind))
    with TestClient(create_app(settings)) as c:
        first = c.post("/v1/tenants", json={"name": "Acme"}, headers=ADMIN)
        assert first.status_code == 201, first.text
        again = c.post("/v1/tenants", json={"name": "acme "}, headers=ADMIN)
        assert again.status_code == 409, again.text
        body = again.json()
        assert body["code"] == "duplicate_tenant_name"
        assert body["detail"] == {"name": "acme ", "tenant_id": first.json()["tenant_id"]}
        assert "exists already" in body["message"]
        listed = c.get("/v1/tenants", headers=ADMIN).json()["tenants"]
        assert [t["name"] for t in listed] == ["Acme"]
        doc = c.get("/openapi.json").json()
        assert "409" in doc["paths"]["/v1/tenants"]["post"]["responses"]
