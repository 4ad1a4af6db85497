"""The store's monitoring slot (``put_monitor_snapshot`` / ``get_monitor_snapshot``), checked
against both implementations: what one replica stores, another reads back unchanged."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.settings import Settings
from service.store import ApiKey, Store, Tenant, open_store
from service.store.sqlite import SQLiteStore
from tests.service.conftest import REDIS_URL, STORES

SNAPSHOT = {"format": 2, "computed_at": 1234.5, "opis": 0.0123, "eps_opis": None,
            "tenants": {"b": {"far": 0.5, "label": "b"}, "a": {"far": None, "label": "a"}},
            "score_buckets": [-1.0, 0.35, 0.4012345678901234, 1.0], "name": "caf\u00e9"}


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, store_settings, artefact: Path) -> Iterator[Store]:
    s = open_store(Settings(artefact_path=artefact, **store_settings(request.param)))
    try:
        yield s
    finally:
        s.close()


def test_round_trip_and_replace(store: Store) -> None:
    assert store.get_monitor_snapshot() is None
    store.put_monitor_snapshot(SNAPSHOT)
    got = store.get_monitor_snapshot()
    assert got == SNAPSHOT
    assert list(got["tenants"]) == ["b", "a"]  # order kept (it is the label order)
    assert got["score_buckets"][2] == 0.4012345678901234  # floats bit for bit
    store.put_monitor_snapshot({**SNAPSHOT, "computed_at": 2000.0})
    assert store.get_monitor_snapshot()["computed_at"] == 2000.0


def test_rejects_nan_and_survives_tenant_deletion(store: Store) -> None:
    with pytest.raises(ValueError):
        store.put_monitor_snapshot({"opis": math.nan})
    store.create_tenant(Tenant("t1", "t", 1.0), ApiKey("k1", "t1", "h" * 64, 1.0))
    store.put_monitor_snapshot(SNAPSHOT)
    assert store.delete_tenant("t1")
    assert store.get_monitor_snapshot() == SNAPSHOT


@pytest.mark.parametrize("kind", STORES)
def test_shared_by_two_connections(kind: str, store_settings, artefact: Path) -> None:
    """Another store object over the same data (a second replica on Redis, a restart on
    SQLite) reads what the first stored."""
    settings = Settings(artefact_path=artefact, **store_settings(kind))
    a = open_store(settings)
    a.put_monitor_snapshot(SNAPSHOT)
    if kind == "sqlite":
        a.close()
    b = open_store(settings)
    try:
        assert b.get_monitor_snapshot() == SNAPSHOT
    finally:
        b.close()
        if kind != "sqlite":
            a.close()


@pytest.mark.redis
def test_redis_key_lives_under_the_prefix(store_settings, artefact: Path) -> None:
    fields = store_settings("redis")
    s = open_store(Settings(artefact_path=artefact, **fields))
    try:
        s.put_monitor_snapshot(SNAPSHOT)
        r = redis.Redis.from_url(REDIS_URL)
        assert r.exists(f"{fields['redis_key_prefix']}monitor:snapshot") == 1
        r.close()
    finally:
        s.close()


def test_sqlite_adds_the_table_to_an_existing_file(tmp_path: Path) -> None:
    """A database created before the monitor's table existed gets it on open (additive)."""
    path = tmp_path / "tcm.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE monitor_snapshot")
    s = SQLiteStore(path)
    try:
        assert s.get_monitor_snapshot() is None
        s.put_monitor_snapshot(SNAPSHOT)
        assert s.get_monitor_snapshot() == SNAPSHOT
    finally:
        s.close()
