"""A readers-writer lock for a tenant's index: searches share it, changes take it alone.

A FAISS CPU index answers concurrent searches safely (``search`` is ``const``), but an ``add``
or ``remove_ids`` must not run beside one; a plain lock made two searches of one tenant wait on
each other, so the search batcher's lanes (``service.engine.search``) could not use a second
core for one busy tenant (issue 32). Writers are preferred: once a writer waits, new readers
wait behind it, so a stream of matches never starves an enrolment.

Written here rather than taken from a package: the two PyPI candidates (``readerwriterlock``,
``rwlock``) are unmaintained since 2021 or earlier, and the whole lock is one condition
variable and two counters.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ReadWriteLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # holding the lock shared
        self._writer = False  # one holds it alone
        self._writers_waiting = 0
        self._readers_waiting = 0  # behind a writer (for tests and debugging)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writer or self._writers_waiting:
                    self._cond.wait()
            finally:
                self._readers_waiting -= 1
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
