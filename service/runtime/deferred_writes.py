"""Match records that wait in this process for their shard (Redis Cluster during a failover:
``RedisClusterStore.add_matches``): :class:`DeferredWrites` writes them once the shard is back
rather than only with the tenant's next match, every ``interval_s``, and publishes how many
wait and how many were dropped over the cap (``tcm_match_records_deferred``,
``tcm_match_records_dropped_total``). On the other stores nothing ever waits and a round
costs one call that returns at once."""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool

from service.metrics import ServiceMetrics
from service.runtime.periodic import Periodic
from service.store import Store

log = logging.getLogger(__name__)


class DeferredWrites:
    def __init__(self, store: Store, metrics: ServiceMetrics, *, interval_s: float = 2.0) -> None:
        self.store = store
        self.metrics = metrics
        self._dropped_seen = 0
        self._periodic = Periodic("deferred-match-records", interval_s, self.flush_once)

    async def flush_once(self) -> int:
        """Writes what waits and can be written now; returns how many were written."""
        try:
            return await run_in_threadpool(self.store.flush_deferred)
        finally:
            self.publish()

    def publish(self) -> None:
        waiting, dropped = self.store.deferred_matches()
        self.metrics.match_records_deferred.set(waiting)
        if dropped > self._dropped_seen:
            self.metrics.match_records_dropped.inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        await self._periodic.close()
