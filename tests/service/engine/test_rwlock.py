"""The index's readers-writer lock: searches share it, changes take it alone, and a waiting
change goes before searches that come after it. Ordering is observed through the lock's own
counters (a thread is known to wait once it is counted), never through sleeps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from service.engine.index import IndexRegistry
from service.engine.rwlock import ReadWriteLock
from tests.service.conftest import DIM


def until(condition: Callable[[], bool], what: str) -> None:
    """Waits for a state another thread reaches (bounded only so a broken build fails)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.001)


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_readers_share_and_a_waiting_writer_goes_before_later_readers() -> None:
    lock = ReadWriteLock()
    events: list[str] = []

    def reader(name: str) -> Callable[[], None]:
        def run() -> None:
            with lock.shared():
                events.append(name)

        return run

    def writer() -> None:
        with lock.exclusive():
            events.append("writer")

    with lock.shared():
        second = in_thread(reader("second reader"))
        second.join(30)
        assert not second.is_alive(), "a second reader waited for the first"
        w = in_thread(writer)
        until(lambda: lock._writers_waiting == 1, "the writer waits")
        late = in_thread(reader("late reader"))
        until(lambda: lock._readers_waiting == 1, "the late reader waits")
        assert events == ["second reader"]  # neither has run while the first reader holds it
    w.join(30)
    late.join(30)
    assert events == ["second reader", "writer", "late reader"]


def test_a_writer_holds_the_lock_alone() -> None:
    lock = ReadWriteLock()
    events: list[str] = []

    def reader() -> None:
        with lock.shared():
            events.append("reader")

    with lock.exclusive():
        r = in_thread(reader)
        until(lambda: lock._readers_waiting == 1, "the reader waits")
        assert events == []
    r.join(30)
    assert events == ["reader"]


def test_a_tenants_searches_share_its_index_and_changes_wait_for_them() -> None:
    """A search runs while another holds the index (shared); an enrolment waits until no
    search does, then lands, and later searches see it."""
    index = IndexRegistry(DIM, "Flat").get("t")
    rng = np.random.default_rng(0)
    v = rng.standard_normal((20, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    index.add(np.arange(10), [f"i{i}" for i in range(10)], ["s"] * 10, v[:10])
    found: list[int] = []
    with index._lock.shared():  # a search in progress
        s = in_thread(lambda: found.append(len(index.search(v[:1], 5)[0])))
        s.join(30)
        assert not s.is_alive() and found == [5], "a search waited for another search"
        a = in_thread(
            lambda: index.add(
                np.arange(10, 20), [f"i{i}" for i in range(10, 20)], ["s"] * 10, v[10:]
            )
        )
        until(lambda: index._lock._writers_waiting == 1, "the enrolment waits")
        assert len(index) == 10
    a.join(30)
    assert len(index) == 20
    assert index.search(v[15:16], 1)[0][0].item_id == "i15"
