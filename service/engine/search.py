"""Search batching: concurrent queries of a tenant coalesce into one FAISS search, and tenants
take turns.

FAISS answers a block of queries far faster than the same queries one call at a time (one pass
over the gallery, BLAS matrix-matrix instead of matrix-vector: ~30x for ``IndexFlatIP`` at 100k
items on this project's VM, ``docs/benchmarks.md``). Concurrent ``/v1/match`` requests of a
tenant are that block. Each tenant's queries wait in their own queue; a drain task serves the
tenants with waiting queries **round robin**, one *turn* at a time: a turn takes the tenant's
waiting queries in arrival order up to ``max_batch`` rows (a larger multi-query request goes
alone: requests are not split), runs one ``search`` (with the largest ``k`` asked, each query's
hits cut to its own ``k``) in a worker thread, and hands each request its rows. The tenant then
goes to the back of the ring, behind every tenant that queued meanwhile, so a query waits behind
at most the turn in progress and one turn of each other tenant waiting before it, never behind
another tenant's whole backlog (issue 25 item 5: one tenant's batch searches stalled every other
tenant's plain match for seconds, in the one process-wide queue this replaced). Queries of the
tenant arriving during its turn form its next turn, so turns grow with load and a lone query is
never delayed. ``max_wait`` (default 0) additionally holds a turn open until its oldest query has
waited that long, for deployments where a few ms of latency buy larger batches (e.g. a GPU
index). Same shape as the embedding batcher (``service.engine.embedding``), but without a
permanent worker: the drain task exists only while there is work, so there is nothing to start
or stop.

**Lanes** (``lanes``, ``TCM_SEARCH_LANES``): up to that many turns search at once, each in its own
worker thread, so that the searches of one busy tenant, or of several, use several cores. With
several lanes free, a tenant's waiting rows are shared among them (a flat index costs the same
per row together or apart); a tenant whose turn runs joins the ring again at once only while a
lane is free, so with one lane the order is exactly the one-turn-at-a-time order above.

A caller may pass ``then`` (:meth:`SearchBatcher.search_then`), a function of the tenant and the
hits of its rows, run in the same worker thread right after the search, once per turn over all
the turn's queries that passed it: the matcher's record write, so that a match costs one thread
hop and one store write per turn instead of one more hop per request (issue 32). Its per-row
results come back beside the hits; an exception it raises fails only the queries that passed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.engine.cores import cores_but_one
from service.engine.index import Hit, IndexRegistry
from service.errors import NotReadyError

log = logging.getLogger(__name__)

# (tenant id, the hits of each row of the queries that passed it) -> one result per row
Then = Callable[[str, list[list[Hit]]], Sequence[Any]]
_Answer = tuple[list[list[Hit]], Sequence[Any]]  # a query's hits and its rows' ``then`` results


@dataclass
class _Query:
    tenant_id: str
    vectors: np.ndarray  # float32 (n, d), L2-normalised
    k: int
    future: asyncio.Future[_Answer]
    then: Then | None = None
    enqueued: float = field(default_factory=time.perf_counter)


class SearchBatcher:
    def __init__(
        self, indexes: IndexRegistry, *, max_batch: int, max_wait_s: float = 0.0, lanes: int = 1
    ) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, not {lanes}")
        self.indexes = indexes
        self.max_batch = max_batch  # rows of one tenant's turn (one index search)
        self.max_wait_s = max_wait_s
        self.lanes = lanes  # turns searching at once (see the module's docstring)
        self.searches_run = 0  # index searches (one per turn)
        self.queries_searched = 0
        self.largest_batch = 0
        # tenant -> its waiting queries; a tenant is in the dict while it is in the ring, has
        # turns in flight or waiting queries (its queue outlives a turn that emptied it)
        self._queues: dict[str, deque[_Query]] = {}
        self._ring: deque[str] = deque()  # tenants with waiting queries, in turn order
        self._in_ring: set[str] = set()  # the ring's tenants (a set: enqueue checks it per query)
        self._running: dict[str, int] = {}  # tenant -> its turns in flight
        self._in_flight = 0  # lanes in use
        self._lane_free: asyncio.Future[None] | None = None  # the drain waits for a lane
        self._turns: set[asyncio.Task[None]] = set()
        self._drain_task: asyncio.Task[None] | None = None
        # up to ``lanes`` turns search at once, and the thens of earlier turns may still wait on
        # the store (one thread per turn); threads start on demand and end with the batcher
        self._threads = ThreadPoolExecutor(max_workers=32, thread_name_prefix="search")
        self._wait_over: asyncio.Future[None] | None = None  # see _run
        self.then_seconds = 0.0  # moving average of a turn's thens (see _run)

    def close(self) -> None:
        """Ends the worker threads once their work is done (the model is retired); a search
        arriving later fails with NotReadyError (503)."""
        self._threads.shutdown(wait=False)

    async def search(self, tenant_id: str, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k hits of each row of ``vectors`` in the tenant's index, best first."""
        hits, _ = await self._enqueue(tenant_id, vectors, k, None)
        return hits

    async def search_then(
        self, tenant_id: str, vectors: np.ndarray, k: int, then: Then
    ) -> tuple[list[list[Hit]], Sequence[Any]]:
        """:meth:`search`, and ``then(tenant_id, hits)`` run in the search's worker thread,
        once per turn over the rows of every query of the turn that passed an equal ``then``:
        (hits, ``then``'s result for each of this query's rows)."""
        return await self._enqueue(tenant_id, vectors, k, then)

    async def _enqueue(
        self, tenant_id: str, vectors: np.ndarray, k: int, then: Then | None
    ) -> _Answer:
        future: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(tenant_id)
        if queue is None:
            queue = self._queues[tenant_id] = deque()
            if self._wait_over is not None:  # a turn's thens are not worth this tenant's wait
                _resolve(self._wait_over)
        queue.append(_Query(tenant_id, vectors, k, future, then))
        # a tenant whose turn runs queues behind the tenants that come meanwhile (it is put
        # back in the ring when its turn ends), unless a lane is free for it now
        if tenant_id not in self._in_ring and (
            not self._running.get(tenant_id) or self._in_flight < self.lanes
        ):
            self._to_ring(tenant_id)
        self._ensure_drain()
        return await future

    def _to_ring(self, tenant_id: str) -> None:
        self._ring.append(tenant_id)
        self._in_ring.add(tenant_id)

    def _ensure_drain(self) -> None:
        if self._ring and (self._drain_task is None or self._drain_task.done()):
            self._drain_task = asyncio.create_task(self._drain(), name="search-batcher")

    async def _drain(self) -> None:
        """Starts the ring's turns, each on a free lane, until no tenant waits."""
        loop = asyncio.get_running_loop()
        while self._ring:
            if self._in_flight >= self.lanes:
                self._lane_free = loop.create_future()
                await self._lane_free
                continue
            tenant_id = self._ring.popleft()
            self._in_ring.discard(tenant_id)
            queue = self._queues[tenant_id]
            if self.max_wait_s > 0 and queue and self._rows(queue) < self.max_batch:
                held = time.perf_counter() - queue[0].enqueued
                if held < self.max_wait_s:
                    await asyncio.sleep(self.max_wait_s - held)
            # with several free lanes a tenant's waiting rows are shared among them (a flat
            # index costs the same per row whether rows go together or not), so that its
            # turns search on several cores at once
            free = self.lanes - self._in_flight
            turn = self._take_turn(queue, -(-self._rows(queue) // free))
            if not turn:
                self._settle(tenant_id, queue)
                continue
            self._in_flight += 1
            self._running[tenant_id] = self._running.get(tenant_id, 0) + 1
            if queue and tenant_id not in self._in_ring and self._in_flight < self.lanes:
                self._to_ring(tenant_id)  # the rest of its rows, on the next free lane
            task = asyncio.create_task(self._lane(tenant_id, queue, turn))
            self._turns.add(task)
            task.add_done_callback(self._turns.discard)

    async def _lane(self, tenant_id: str, queue: deque[_Query], turn: list[_Query]) -> None:
        try:
            await self._run(tenant_id, turn)
        finally:  # also when cancelled: the tenant's waiting queries stay reachable
            self._in_flight -= 1
            left = self._running[tenant_id] - 1
            if left:
                self._running[tenant_id] = left
            else:
                del self._running[tenant_id]
            self._settle(tenant_id, queue)
            if self._lane_free is not None:
                _resolve(self._lane_free)
            self._ensure_drain()

    def _settle(self, tenant_id: str, queue: deque[_Query]) -> None:
        """After a turn (or an empty one): a tenant with waiting queries goes to the back of
        the ring, behind the tenants that queued meanwhile; one with none and no turn in
        flight leaves the batcher."""
        if queue:
            if tenant_id not in self._in_ring:
                self._to_ring(tenant_id)
        elif (
            not self._running.get(tenant_id)
            and tenant_id not in self._in_ring
            and self._queues.get(tenant_id) is queue
        ):
            del self._queues[tenant_id]

    def _take_turn(self, queue: deque[_Query], rows_wanted: int) -> list[_Query]:
        """The tenant's next turn: its waiting queries in order, up to ``max_batch`` rows and
        about ``rows_wanted`` (at least one query); queries cancelled by their clients are
        dropped."""
        cap = max(1, min(self.max_batch, rows_wanted))
        turn: list[_Query] = []
        rows = 0
        while queue:
            q = queue[0]
            if q.future.done():  # cancelled by its client
                queue.popleft()
                continue
            if turn and rows + len(q.vectors) > cap:
                break
            turn.append(queue.popleft())
            rows += len(q.vectors)
        return turn

    @staticmethod
    def _rows(queries: Iterable[_Query]) -> int:
        return sum(len(q.vectors) for q in queries)

    async def _run(self, tenant_id: str, turn: list[_Query]) -> None:
        """The turn's search in a worker thread. When other tenants wait, the turn ends with
        the search: its ``then`` functions go on in that thread while the next turn searches,
        so a slow ``then`` (a record write waiting for its fsync) never holds another tenant's
        turn. When none waits and the search took less than the thens usually do (10k x 128:
        0.4 ms against a 3 ms commit), the turn also waits for its thens, so that the tenant's
        queries arriving meanwhile gather into its next turn (one search, one write) instead
        of trickling into small ones; a tenant that queues meanwhile ends that wait. A longer
        search (100k x 128: ~10 ms for 4 queries) goes on at once, beside the commit."""
        loop = asyncio.get_running_loop()
        searched: asyncio.Future[None] = loop.create_future()

        search_s = [0.0]

        def search_done(seconds: float) -> None:  # in the worker thread, before the thens
            search_s[0] = seconds
            with contextlib.suppress(RuntimeError):  # the loop closed: the thens still run
                loop.call_soon_threadsafe(_resolve, searched)

        # the batcher's own threads, through the loop's executor interface: one hop costs
        # less than through anyio's pool (no task, cancel scope or limiter per turn)
        try:
            work = loop.run_in_executor(self._threads, self._search, tenant_id, turn, search_done)
        except RuntimeError:  # closed (the model was retired): a late query is not lost silently
            for q in turn:
                if not q.future.done():
                    q.future.set_exception(NotReadyError("this model version has been retired"))
            return
        finished: asyncio.Future[None] = loop.create_future()  # or another tenant queued
        work.add_done_callback(lambda done: self._deliver(turn, done))
        work.add_done_callback(lambda _: (_resolve(searched), _resolve(finished)))
        try:
            await searched  # (a failed search ends it too)
            if self._wait_over is None and not self._ring and search_s[0] < self.then_seconds:
                # no other tenant waits and the search was quicker than the thens take: this
                # tenant's next turn waits for them, so that its queries arriving meanwhile
                # gather into one search and one write (until another tenant queues: _enqueue
                # ends the wait); a longer search goes on at once, beside the thens
                self._wait_over = finished
                await finished
        except asyncio.CancelledError:  # the drain itself is cancelled (shutdown)
            for q in turn:
                q.future.cancel()
            raise
        finally:
            if self._wait_over is finished:
                self._wait_over = None
        rows = self._rows(turn)
        self.queries_searched += rows
        self.largest_batch = max(self.largest_batch, rows)

    @staticmethod
    def _deliver(turn: list[_Query], work: asyncio.Future[list[_Answer | Exception]]) -> None:
        """Each query's answer, once its turn's search and ``then`` functions are done."""
        if work.cancelled():
            for q in turn:
                q.future.cancel()
            return
        exc = work.exception()
        if exc is not None:  # a bug, not bad input (that was rejected before)
            log.error("a batched index search failed", exc_info=exc)
            for q in turn:
                if not q.future.done():
                    q.future.set_exception(exc)
            return
        for q, answer in zip(turn, work.result(), strict=True):
            if q.future.done():
                continue
            if isinstance(answer, BaseException):
                q.future.set_exception(answer)
            else:
                q.future.set_result(answer)

    def _search(
        self, tenant_id: str, queries: list[_Query], search_done: Callable[[float], None]
    ) -> list[_Answer | Exception]:
        """One index search for the turn's queries; each query's rows, cut to its ``k``, then
        (after ``search_done``) each distinct ``then`` once over the rows of its queries."""
        vectors = (
            queries[0].vectors
            if len(queries) == 1
            else np.concatenate([q.vectors for q in queries])
        )
        k = max(q.k for q in queries)
        started = time.perf_counter()
        hits = self.indexes.get(tenant_id).search(vectors, k)
        self.searches_run += 1
        per_query: list[list[list[Hit]]] = []
        offset = 0
        for q in queries:
            per_query.append([h[: q.k] for h in hits[offset : offset + len(q.vectors)]])
            offset += len(q.vectors)
        thens_started = time.perf_counter()
        search_done(thens_started - started)
        out: list[_Answer | Exception] = [(h, ()) for h in per_query]
        groups: dict[Then, list[int]] = {}
        for i, q in enumerate(queries):
            if q.then is not None:
                groups.setdefault(q.then, []).append(i)
        for then, members in groups.items():
            rows = [row for i in members for row in per_query[i]]
            try:
                results = then(tenant_id, rows)
            except Exception as exc:  # e.g. the store is down: those queries fail, others not
                for i in members:
                    out[i] = exc
                continue
            offset = 0
            for i in members:
                n = len(per_query[i])
                out[i] = (per_query[i], results[offset : offset + n])
                offset += n
        if groups:  # a moving average of the thens' time (a lost update between threads is
            # harmless: it only steers whether a lone tenant's next turn waits)
            spent = time.perf_counter() - thens_started
            self.then_seconds += 0.2 * (spent - self.then_seconds)
        return out


def search_lanes(requested: int, indexes: IndexRegistry) -> int:
    """``TCM_SEARCH_LANES``: as set, or (0) one per core this process may run on but one, left
    to the event loop (one on a 2-core machine, where a second lane measured no faster: the
    loop's own work needs that core); one where the indexes do not take concurrent searches
    (GPU FAISS)."""
    if not indexes.concurrent_searches:
        return 1
    return requested if requested > 0 else cores_but_one()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
