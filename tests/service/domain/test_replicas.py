"""Two replicas on one Redis store keep their indexes in sync through the change feed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.ids import glob_escape
from tests.service.conftest import ADMIN_TOKEN, make_settings, unit

pytestmark = pytest.mark.redis
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "replicas did not converge"
        time.sleep(0.05)


def test_replicas_follow_each_others_writes(artefact: Path, store_settings) -> None:
    settings = make_settings(artefact, store_settings("redis"))
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        key = a.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()
        auth = {"Authorization": f"Bearer {key['api_key']}"}

        def ids_seen(client: TestClient) -> list[str]:
            r = client.post("/v1/match", json={"embedding": unit(1), "k": 10}, headers=auth)
            return sorted(x["item_id"] for x in r.json()["candidates"])

        a.post(
            "/v1/gallery",
            headers=auth,
            json={
                "items": [
                    {"subject": "s", "embedding": unit(1), "item_id": "one"},
                    {"subject": "s", "embedding": unit(2), "item_id": "two"},
                    {"subject": "z", "embedding": unit(3), "item_id": "three"},
                ]
            },
        )
        eventually(lambda: ids_seen(b) == ["one", "three", "two"])
        # the writer's own follower sees the same change but reads nothing back: its index
        # already holds those seqs
        eventually(lambda: a.app.state.runtime.sync.changes_applied >= 1)
        assert a.app.state.runtime.sync.items_read_back == 0
        assert b.app.state.runtime.sync.items_read_back == 3
        a.put("/v1/gallery/four", headers=auth, json={"subject": "s", "embedding": unit(4)})
        eventually(lambda: "four" in ids_seen(b))
        assert b.delete("/v1/gallery/four", headers=auth).status_code == 204
        eventually(lambda: "four" not in ids_seen(a))
        assert a.app.state.runtime.sync.items_read_back == 0
        assert b.app.state.runtime.sync.items_read_back == 4
        assert b.delete("/v1/gallery/two", headers=auth).status_code == 204
        eventually(lambda: ids_seen(a) == ["one", "three"])
        assert b.delete("/v1/subjects/z", headers=auth).status_code == 200
        eventually(lambda: ids_seen(a) == ["one"])
        assert ids_seen(b) == ["one"]
        assert (
            a.post("/v1/match", json={"embedding": unit(1)}, headers=auth).json()["decision"][
                "subject"
            ]
            == "s"
        )
        tid = key["tenant_id"]
        assert tid in b.app.state.runtime.serving.indexes.sizes()
        assert a.delete(f"/v1/tenants/{tid}", headers=ADMIN).status_code == 204
        eventually(lambda: tid not in b.app.state.runtime.serving.indexes.sizes())
        assert b.app.state.runtime.sync.changes_applied >= 4


def test_replica_behind_a_trimmed_stream_resyncs(
    artefact: Path, store_settings: Callable[[str], dict[str, Any]]
) -> None:
    """Regression: the change stream is capped; a replica whose next entries were trimmed
    before it read them (cut off from Redis for longer than the cap lasts) used to resume after
    the gap and silently miss those writes. It must notice and rebuild from the store."""
    store = store_settings("redis")
    settings = make_settings(artefact, store)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        key = a.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()
        auth = {"Authorization": f"Bearer {key['api_key']}"}

        def ids_seen(client: TestClient) -> list[str]:
            r = client.post("/v1/match", json={"embedding": unit(1), "k": 10}, headers=auth)
            return sorted(x["item_id"] for x in r.json()["candidates"])

        a.post(
            "/v1/gallery",
            headers=auth,
            json={"items": [{"subject": "s", "embedding": unit(1), "item_id": "before"}]},
        )
        eventually(lambda: ids_seen(b) == ["before"])
        rb = b.app.state.runtime.sync
        b.portal.call(rb.stop_follower)  # B is cut off from the stream ...
        assert rb.feed_cursor is not None
        for i in range(3):  # ... while A writes, and the stream's cap trims those entries
            a.post(
                "/v1/gallery",
                headers=auth,
                json={
                    "items": [{"subject": "s", "embedding": unit(10 + i), "item_id": f"missed-{i}"}]
                },
            )
        assert a.delete("/v1/gallery/before", headers=auth).status_code == 204
        r = redis.Redis.from_url(store["store_url"])
        try:
            assert (
                r.xtrim(f"{store['redis_key_prefix']}changes", maxlen=0, approximate=False) == 5
            )  # "before", 3 adds, 1 remove
        finally:
            r.close()
        a.post(
            "/v1/gallery",
            headers=auth,
            json={"items": [{"subject": "s", "embedding": unit(20), "item_id": "after"}]},
        )
        resyncs = rb.resyncs
        b.portal.call(rb.start_follower)  # B is back, at the cursor it had
        want = ["after", "missed-0", "missed-1", "missed-2"]
        eventually(lambda: ids_seen(b) == want)
        assert ids_seen(a) == want
        assert rb.resyncs == resyncs + 1
        metrics = b.get("/metrics").text
        assert "tcm_change_feed_resyncs_total 1.0" in metrics
        # and it follows the stream again after the rebuild
        assert b.delete("/v1/gallery/missed-0", headers=auth).status_code == 204
        a.post(
            "/v1/gallery",
            headers=auth,
            json={"items": [{"subject": "s", "embedding": unit(30), "item_id": "later"}]},
        )
        eventually(lambda: ids_seen(b) == ["after", "later", "missed-1", "missed-2"])
        eventually(lambda: ids_seen(a) == ["after", "later", "missed-1", "missed-2"])
        assert rb.resyncs == resyncs + 1  # a healthy stream does not trigger rebuilds


def _snapshot(r: redis.Redis, prefix: str) -> dict[bytes, bytes]:
    """DUMP of every key under the prefix: what an RDB snapshot of this store holds."""
    return {k: r.dump(k) for k in r.scan_iter(match=glob_escape(prefix) + "*", count=1000)}


def _restore(r: redis.Redis, prefix: str, dumped: dict[bytes, bytes]) -> None:
    """The store as it was at the snapshot: keys written since are gone, the others restored."""
    now = list(r.scan_iter(match=glob_escape(prefix) + "*", count=1000))
    if now:
        r.unlink(*now)
    for k, v in dumped.items():
        r.restore(k, 0, v, replace=True)


def test_store_restored_from_an_older_snapshot_makes_replicas_resync(
    artefact: Path, store_settings: Callable[[str], dict[str, Any]]
) -> None:
    """Regression (issue 25, item 2): Redis restored from an older snapshot (or a failover to a
    replica that lagged) takes the item counter back; new items then reused seqs the running
    replicas' indexes still held, so both kept answering the lost item with score 1.0 and never
    indexed the new one. They must notice the store went backwards and rebuild from it."""
    store = store_settings("redis")
    prefix = store["redis_key_prefix"]
    settings = make_settings(artefact, store)
    r = redis.Redis.from_url(store["store_url"])
    try:
        with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
            key = a.post("/v1/tenants", json={"name": "t"}, headers=ADMIN).json()
            auth = {"Authorization": f"Bearer {key['api_key']}"}

            def top(client: TestClient, seed: int) -> tuple[str, float] | None:
                body = client.post(
                    "/v1/match", json={"embedding": unit(seed), "k": 1}, headers=auth
                ).json()
                c = body["candidates"]
                return (c[0]["item_id"], round(c[0]["score"], 4)) if c else None

            a.post(
                "/v1/gallery",
                headers=auth,
                json={"items": [{"subject": "s", "embedding": unit(1), "item_id": "kept"}]},
            )
            eventually(lambda: top(b, 1) == ("kept", 1.0))
            dumped = _snapshot(r, prefix)
            a.post(
                "/v1/gallery",
                headers=auth,
                json={"items": [{"subject": "s", "embedding": unit(2), "item_id": "lost"}]},
            )
            eventually(lambda: top(b, 2) == ("lost", 1.0))
            _restore(r, prefix, dumped)  # the store forgets "lost" and its seq
            assert a.get("/v1/gallery/lost", headers=auth).status_code == 404
            a.post(
                "/v1/gallery",
                headers=auth,
                json={"items": [{"subject": "s", "embedding": unit(3), "item_id": "new"}]},
            )
            for client in (a, b):
                eventually(lambda c=client: top(c, 3) == ("new", 1.0))
                eventually(lambda c=client: top(c, 2) != ("lost", 1.0))
                assert client.app.state.runtime.sync.resyncs >= 1  # type: ignore[attr-defined]
            # and both follow the feed again afterwards
            a.post(
                "/v1/gallery",
                headers=auth,
                json={"items": [{"subject": "s", "embedding": unit(4), "item_id": "later"}]},
            )
            eventually(lambda: top(b, 4) == ("later", 1.0))
    finally:
        r.close()


def test_feed_reports_a_store_that_went_back(
    store_settings: Callable[[str], dict[str, Any]],
) -> None:
    """The store's side: a restore that takes the stream back (fewer entries ever added than the
    reader has read, an older last id, or no stream at all) is a resync; a healthy stream, also
    one trimmed by its cap, is not."""
    from service.store import Change
    from service.store.redis_store import RedisStore

    cfg = store_settings("redis")
    store = RedisStore(cfg["store_url"], prefix=cfg["redis_key_prefix"], timeout_s=2.0)
    key = f"{cfg['redis_key_prefix']}changes"
    r = redis.Redis.from_url(cfg["store_url"])
    try:
        r.xadd(key, {"op": "drop_tenant", "tenant": "x"})
        dumped = r.dump(key)
        r.xadd(key, {"op": "drop_tenant", "tenant": "y"})
        cursor, changes = store.read_changes("0-0#0", block_ms=10)
        assert [c.tenant_id for c in changes] == ["x", "y"]
        r.xtrim(key, maxlen=0, approximate=False)  # the cap: not a step back
        assert store.read_changes(cursor, block_ms=10)[1] == []
        r.restore(key, 0, dumped, replace=True)  # one entry ever added; the reader read two
        assert store.read_changes(cursor, block_ms=10) == (cursor, [Change("resync", "")])
        r.xadd(key, {"op": "drop_tenant", "tenant": "z"})  # the count catches up: still back
        assert store.read_changes(cursor, block_ms=10) == (cursor, [Change("resync", "")])
        r.delete(key)
        assert store.read_changes(cursor, block_ms=10) == (cursor, [Change("resync", "")])
        assert store.read_changes("0-0#0", block_ms=10)[1] == []  # a fresh reader: no stream
    finally:
        r.close()
        store.close()


def test_feed_reports_lost_entries_only_when_lost(
    store_settings: Callable[[str], dict[str, Any]],
) -> None:
    """The store's side of the resync: trimming that leaves the reader's entries alone (the
    normal cap) is no gap; entries after the reader's cursor trimmed before it read them is."""
    from service.store import Change
    from service.store.redis_store import RedisStore

    cfg = store_settings("redis")
    store = RedisStore(cfg["store_url"], prefix=cfg["redis_key_prefix"], timeout_s=2.0)
    key = f"{cfg['redis_key_prefix']}changes"
    try:
        fresh = store.change_cursor()
        assert fresh == "0-0#0"  # no stream yet: its start, no entry counted
        for i in (1, 2):
            store.r.xadd(key, {"op": "remove", "tenant": "t", "seqs": f"[{i}]"})
        cursor, changes = store.read_changes(fresh, block_ms=50)
        assert [c.seqs for c in changes] == [(1,), (2,)]  # a new stream: nothing lost
        for i in (3, 4, 5, 6):
            store.r.xadd(key, {"op": "remove", "tenant": "t", "seqs": f"[{i}]"})
        # the cap trims the oldest entry, which the reader has read: no gap
        assert store.r.xtrim(key, maxlen=5, approximate=False) == 1
        _, changes = store.read_changes(cursor, block_ms=50)
        assert [c.seqs for c in changes] == [(3,), (4,), (5,), (6,)]
        # (2,) to (4,) trimmed: (3,) and (4,) were never read by this reader, lost
        store.r.xtrim(key, maxlen=2, approximate=False)
        assert store.read_changes(cursor, block_ms=50) == (cursor, [Change("resync", "")])
        assert store.read_changes(fresh, block_ms=50) == (fresh, [Change("resync", "")])
        # a rebuild takes the position of the last entry ever added, even on an empty stream
        store.r.xtrim(key, maxlen=0, approximate=False)
        end = store.change_cursor()
        assert end.startswith(store.r.xinfo_stream(key)["last-generated-id"].decode())
        store.r.xadd(key, {"op": "remove", "tenant": "t", "seqs": "[9]"})
        assert store.read_changes(end, block_ms=50)[1] == [Change("remove", "t", seqs=(9,))]
    finally:
        store.close()
