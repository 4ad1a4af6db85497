"""Match records are bounded (issue 25, item 7): retention by age and count, and the monitor's
read of labelled decisions costs what the labelled ones cost, not every match in its window."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from service.runtime.retention import Retention
from service.settings import Settings
from service.store import ApiKey, Feedback, MatchRecord, Store, Tenant, open_store
from service.store.redis_store import RedisStore
from tests.service.conftest import STORES
from tests.service.store.test_redis_down import RedisProcess


@pytest.fixture(params=STORES)
def store(
    request: pytest.FixtureRequest, artefact: Path, store_settings: Callable[[str], dict[str, Any]]
) -> Iterator[Store]:
    s = open_store(Settings(artefact_path=artefact, **store_settings(request.param)))
    yield s
    s.close()


def _tenant(store: Store) -> str:
    tid = uuid.uuid4().hex
    store.create_tenant(Tenant(tid, tid, 1.0), ApiKey(uuid.uuid4().hex[:16], tid, "h" * 64, 1.0))
    return tid


def _matches(store: Store, tid: str, times: list[float], *, label_every: int = 0) -> list[str]:
    records = [
        MatchRecord(f"{tid[:6]}-m{i:04d}", tid, True, "s", "i", "s", 0.9, 0.5, "v", t)
        for i, t in enumerate(times)
    ]
    store.add_matches(records)
    for i, r in enumerate(records):
        if label_every and i % label_every == 0:
            store.add_feedback(
                Feedback(r.match_id, tid, "s", True, True, "true_accept", r.created_at + 1)
            )
    return [r.match_id for r in records]


def _ids(store: Store, tid: str, **kw: Any) -> list[str]:
    return [d.match.match_id for d in store.list_decisions(tid, **kw)]


def test_prune_by_age_and_by_count(store: Store) -> None:
    tid, other = _tenant(store), _tenant(store)
    ids = _matches(store, tid, [float(t) for t in range(100, 120)], label_every=3)
    _matches(store, other, [100.0, 101.0])
    assert store.prune_decisions(tid, before=105.0, keep=1000) == 5  # m0000..m0004
    assert _ids(store, tid) == ids[5:]
    assert store.prune_decisions(tid, before=0.0, keep=10) == 5  # the oldest beyond 10
    assert _ids(store, tid) == ids[10:]
    # their feedback went with them; the others' stayed
    assert _ids(store, tid, labelled_only=True) == [ids[i] for i in (12, 15, 18)]
    assert store.prune_decisions(tid, before=0.0, keep=10) == 0
    assert _ids(store, other) == [f"{other[:6]}-m0000", f"{other[:6]}-m0001"]  # untouched


def test_labelled_only_is_the_labelled_part_of_the_window(store: Store) -> None:
    tid = _tenant(store)
    _matches(store, tid, [float(t) for t in range(30)], label_every=4)
    everything = store.list_decisions(tid, since=10.0)
    want = [d.match.match_id for d in everything if d.feedback is not None]
    assert _ids(store, tid, since=10.0, labelled_only=True) == want
    assert want == [f"{tid[:6]}-m{i:04d}" for i in (12, 16, 20, 24, 28)]


def test_retention_task_prunes_every_tenant(store: Store) -> None:
    a, b = _tenant(store), _tenant(store)
    _matches(store, a, [10.0, 20.0, 30.0])
    _matches(store, b, [10.0, 40.0])
    retention = Retention(store, max_age_s=25.0, keep=2, clock=lambda: 40.0)
    assert asyncio.run(retention.prune_once()) == 2  # a's 10 (old, and beyond 2), b's 10 (old)
    assert _ids(store, a) == [f"{a[:6]}-m0001", f"{a[:6]}-m0002"]
    assert _ids(store, b) == [f"{b[:6]}-m0001"]


def test_retention_must_cover_the_monitor_window(artefact: Path) -> None:
    with pytest.raises(ValidationError, match="must cover"):
        Settings(artefact_path=artefact, match_retention_days=0.5, monitor_window_s=86400.0)


def _hgetall_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


@pytest.mark.redis
def test_redis_reads_only_labelled_records(private_redis: RedisProcess) -> None:
    """Regression: every monitor pass read every match record of its window (two HGETALLs
    each): 51,200 records took 3.56 s a pass. It now reads the labelled ones only."""
    store = RedisStore(private_redis.url, prefix="ret:", timeout_s=5.0)
    admin = redis.Redis(port=private_redis.port)
    try:
        tid = _tenant(store)
        _matches(store, tid, [float(t) for t in range(2000)], label_every=100)
        before = _hgetall_calls(admin)
        got = _ids(store, tid, since=0.0, labelled_only=True)
        assert len(got) == 20
        assert _hgetall_calls(admin) - before == 2 * 20  # match + feedback of each labelled
    finally:
        store.close()
        admin.close()


@pytest.mark.redis
def test_redis_store_from_before_the_labelled_index_is_backfilled(
    private_redis: RedisProcess,
) -> None:
    store = RedisStore(private_redis.url, prefix="old:", timeout_s=5.0)
    admin = redis.Redis(port=private_redis.port)
    try:
        tid = _tenant(store)
        ids = _matches(store, tid, [float(t) for t in range(10)], label_every=2)
        # what an older version left: feedback without the labelled zset or the marker
        admin.delete(f"old:tenant:{tid}:labelled")
        admin.delete("old:labelled:v1")
        fresh = RedisStore(private_redis.url, prefix="old:", timeout_s=5.0)
        try:
            assert _ids(fresh, tid, labelled_only=True) == ids[::2]
            assert admin.get("old:labelled:v1") == b"1"
        finally:
            fresh.close()
    finally:
        store.close()
        admin.close()


@pytest.mark.redis
def test_redis_gallery_read_for_the_monitor_sends_no_metadata(private_redis: RedisProcess) -> None:
    """Regression (issue 25, item 12): the monitor's gallery read (vectors and subjects only)
    pulled every item's metadata too. Counted in the bytes Redis sends back."""
    import numpy as np

    from service.store import NewItem

    store = RedisStore(private_redis.url, prefix="gv:", timeout_s=5.0)
    admin = redis.Redis(port=private_redis.port)
    try:
        tid = _tenant(store)
        vec = np.ones(16, np.float32) / 4
        store.add_items(
            tid,
            [NewItem(f"i{i}", f"s{i % 5}", vec, {"blob": "x" * 2000}) for i in range(300)],
            model_version="v",
            created_at=1.0,
        )

        def sent(**kw: Any) -> tuple[int, Any]:
            before = int(admin.info("stats")["total_net_output_bytes"])
            got = store.gallery_vectors(tid, model_version="v", **kw)
            return int(admin.info("stats")["total_net_output_bytes"]) - before, got

        plain_bytes, plain = sent()
        full_bytes, full = sent(with_metadata=True)
        assert plain.metadata is None and full.metadata[0] == {"blob": "x" * 2000}
        assert plain.item_ids == full.item_ids and (plain.vectors == full.vectors).all()
        assert full_bytes - plain_bytes > 300 * 2000  # the metadata, and only it
        assert plain_bytes < 300 * 200
    finally:
        store.close()
        admin.close()
