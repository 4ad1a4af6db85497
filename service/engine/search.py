"""Search batching: concurrent queries coalesce into one FAISS search per tenant.

FAISS answers a block of queries far faster than the same queries one call at a time (one pass
over the gallery, BLAS matrix-matrix instead of matrix-vector: ~30x for ``IndexFlatIP`` at 100k
items on this project's VM, ``docs/benchmarks.md``). Concurrent ``/v1/match`` requests are that
block. Queries wait in a list; whenever no search is running, a drain task takes every waiting
query (up to ``max_batch`` rows; a larger multi-query request goes alone), groups them by tenant,
runs one ``search`` per tenant (with the largest ``k`` asked, each query's hits cut to its own
``k``) in one worker thread, and hands each request its rows. Queries arriving meanwhile form the
next batch, so batches grow with load and a lone query is never delayed. ``max_wait`` (default 0)
additionally holds each batch open that long, for deployments where a few ms of latency buy
larger batches (e.g. a GPU index). Same shape as the embedding batcher
(``service.engine.embedding``), but without a permanent worker: the drain task exists only while
there
is work, so there is nothing to start or stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.engine.index import Hit, IndexRegistry

log = logging.getLogger(__name__)


@dataclass
class _Query:
    tenant_id: str
    vectors: np.ndarray  # float32 (n, d), L2-normalised
    k: int
    future: asyncio.Future[list[list[Hit]]]
    enqueued: float = field(default_factory=time.perf_counter)


class SearchBatcher:
    def __init__(self, indexes: IndexRegistry, *, max_batch: int, max_wait_s: float = 0.0) -> None:
        self.indexes = indexes
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.searches_run = 0  # index searches (one per tenant per batch)
        self.queries_searched = 0
        self.largest_batch = 0
        self._pending: list[_Query] = []
        self._drain_task: asyncio.Task[None] | None = None

    async def search(self, tenant_id: str, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k hits of each row of ``vectors`` in the tenant's index, best first."""
        future: asyncio.Future[list[list[Hit]]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Query(tenant_id, vectors, k, future))
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain(), name="search-batcher")
        return await future

    async def _drain(self) -> None:
        while self._pending:
            if self.max_wait_s > 0 and self._rows(self._pending) < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            batch, rows = [], 0
            while self._pending:
                q = self._pending[0]
                if batch and rows + len(q.vectors) > self.max_batch:
                    break
                batch.append(self._pending.pop(0))
                rows += len(q.vectors)
            batch = [q for q in batch if not q.future.done()]  # cancelled by their clients
            if batch:
                await self._run(batch)

    @staticmethod
    def _rows(queries: list[_Query]) -> int:
        return sum(len(q.vectors) for q in queries)

    async def _run(self, batch: list[_Query]) -> None:
        by_tenant: defaultdict[str, list[_Query]] = defaultdict(list)
        for q in batch:
            by_tenant[q.tenant_id].append(q)
        try:
            results = await run_in_threadpool(self._search_groups, by_tenant)
        except Exception as exc:  # a bug, not bad input (that was rejected before)
            log.exception("a batched index search failed")
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(exc)
            return
        rows = self._rows(batch)
        self.queries_searched += rows
        self.largest_batch = max(self.largest_batch, rows)
        for q, hits in results:
            if not q.future.done():
                q.future.set_result(hits)

    def _search_groups(
        self, by_tenant: dict[str, list[_Query]]
    ) -> list[tuple[_Query, list[list[Hit]]]]:
        out = []
        for tenant_id, queries in by_tenant.items():
            vectors = (
                queries[0].vectors
                if len(queries) == 1
                else np.concatenate([q.vectors for q in queries])
            )
            k = max(q.k for q in queries)
            hits = self.indexes.get(tenant_id).search(vectors, k)
            self.searches_run += 1
            offset = 0
            for q in queries:
                out.append((q, [h[: q.k] for h in hits[offset : offset + len(q.vectors)]]))
                offset += len(q.vectors)
        return out
