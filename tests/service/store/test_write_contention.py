"""Writes under contention: the SQLite store's one writer thread (group commit, bounded queue)
and a bounded 200-client load against a real ``tcm-serve`` on both stores with 0 errors.

Before the writer, each worker thread took SQLite's write lock itself; under 200 clients a
match-record write waited longer than ``busy_timeout`` and the request failed 503 ("database is
locked": 7 of 3,766 requests in a 20 s run of ``bench/contention.py``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.contention import report, run_contention
from service.errors import ConflictError, StoreUnavailableError
from service.store import MatchRecord
from service.store.sqlite import SQLiteStore
from tests.service.conftest import REDIS_URL, STORES
from tests.service.store.test_store import items, tenant

V1 = "m-v1"


def record(i: int, tenant_id: str = "t") -> MatchRecord:
    return MatchRecord(
        match_id=f"m{i}",
        tenant_id=tenant_id,
        accepted=False,
        subject=None,
        top_item_id=None,
        top_subject=None,
        score=None,
        threshold=0.5,
        model_version=V1,
        created_at=float(i),
    )


def count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_concurrent_writes_never_see_a_locked_database(tmp_path: Path) -> None:
    # a 10 ms busy timeout: threads racing for the write lock themselves would fail at once
    s = SQLiteStore(tmp_path / "tcm.db", timeout_s=0.01)
    tenant(s, "t")
    barrier = threading.Barrier(64)

    def work(w: int) -> None:
        barrier.wait(timeout=30)
        for j in range(25):
            s.add_match(record(w * 100 + j))

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(work, range(64)))
    assert count(tmp_path / "tcm.db", "matches") == 64 * 25
    assert s._writer.largest_group > 1  # writes queued together were committed together
    assert s._writer.groups < 64 * 25 + 1
    s.close()


def _hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Another connection holds SQLite's write lock for a while (the writer thread waits)."""
    taken = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()

    t = threading.Thread(target=hold)
    t.start()
    assert taken.wait(5)
    return t


def test_a_failing_write_in_a_group_leaves_the_others(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "tcm.db", timeout_s=5.0)
    tenant(s, "t")
    s.add_items("t", items(1, prefix="dup"), model_version=V1, created_at=1.0)
    holder = _hold_write_lock(tmp_path / "tcm.db", 0.5)  # the next writes queue up meanwhile
    results: dict[str, object] = {}

    def run(name: str, fn) -> None:
        try:
            results[name] = fn()
        except Exception as exc:
            results[name] = exc

    calls = [
        ("a", lambda: s.add_items("t", items(3, prefix="a"), model_version=V1, created_at=2.0)),
        ("dup", lambda: s.add_items("t", items(2, prefix="dup"), model_version=V1, created_at=2.0)),
        ("m", lambda: s.add_match(record(1))),
    ]
    threads = [threading.Thread(target=run, args=c) for c in calls]
    for t in threads:
        t.start()
        time.sleep(0.05)
    holder.join()
    for t in threads:
        t.join()
    assert isinstance(results["dup"], ConflictError)
    assert isinstance(results["a"], list) and len(results["a"]) == 3
    assert results["m"] is None
    # dup1 (the half before the conflict check failed) is not there; a0..a2 and dup0 are
    assert sorted(i.item_id for i in s.list_items("t")) == ["a0", "a1", "a2", "dup0"]
    assert s._writer.largest_group >= 2
    s.close()


def test_a_full_write_queue_is_unavailable_at_once(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "tcm.db", timeout_s=5.0, max_write_queue=2)
    tenant(s, "t")
    holder = _hold_write_lock(tmp_path / "tcm.db", 1.0)
    pool = ThreadPoolExecutor(3)
    first = pool.submit(s.add_match, record(1))
    time.sleep(0.2)  # the writer has taken it and waits for the lock
    queued = [pool.submit(s.add_match, record(i)) for i in (2, 3)]
    time.sleep(0.2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="writes queued"):
        s.add_match(record(4))
    assert time.monotonic() - started < 0.5  # answered at once, not after a timeout
    holder.join()
    first.result(timeout=10)
    for f in queued:
        f.result(timeout=10)
    pool.shutdown()
    assert count(tmp_path / "tcm.db", "matches") == 3
    s.close()


def test_add_items_fault_mid_request_writes_nothing(tmp_path: Path) -> None:
    """A real constraint fires on the 700th of 1,000 items: the 699 before it are undone."""
    path = tmp_path / "tcm.db"
    s = SQLiteStore(path)
    tenant(s, "t")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON items WHEN NEW.item_id = 'b699' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned item'); END"
        )
    with pytest.raises(ConflictError) as err:  # the store's answer to a constraint failure
        s.add_items("t", items(1000, prefix="b"), model_version=V1, created_at=1.0)
    assert "poisoned" in str(err.value.__cause__)
    assert s.count_items("t") == 0 and count(path, "embeddings") == 0
    s.add_items("t", items(3, prefix="c"), model_version=V1, created_at=2.0)  # still writes
    assert s.count_items("t") == 3
    s.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORES)
def test_200_clients_zero_errors(kind: str, artefact: Path) -> None:
    res = run_contention(
        artefact=artefact,
        duration_s=8.0,
        clients=200,
        gallery=2000,
        store_url=None if kind == "sqlite" else REDIS_URL,
    )
    print(report(res))
    assert res.requests > 50, "the load hardly ran"
    assert res.per_op["enrol"]["count"] > 0 and res.per_op["match"]["count"] > 0
    assert res.errors == 0, (res.errors_by_kind, res.error_samples)
    assert res.missing_acknowledged == 0
