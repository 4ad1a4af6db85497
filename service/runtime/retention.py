"""Retention of match records: a bound on how long and how many are kept.

Every match answer stores a record (so feedback can label it later); without a bound they grow
for ever, and so does every read of them. :class:`Retention` deletes, per tenant, the records
(with their feedback) older than ``TCM_MATCH_RETENTION_DAYS`` and the oldest beyond
``TCM_MATCH_RETENTION_PER_TENANT``, at start-up and every ``interval_s`` after. Every replica
runs it; pruning twice is harmless.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from service.runtime.periodic import Periodic
from service.store import Store

log = logging.getLogger(__name__)


class Retention:
    def __init__(
        self,
        store: Store,
        *,
        max_age_s: float,
        keep: int,
        interval_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.max_age_s = max_age_s
        self.keep = keep
        self.interval_s = interval_s
        self.clock = clock
        self._periodic = Periodic("match-retention", interval_s, self.prune_once)

    async def prune_once(self) -> int:
        """Prunes every tenant now; returns how many records were deleted."""
        before = self.clock() - self.max_age_s
        pruned = 0
        for tenant in await run_in_threadpool(self.store.list_tenants):
            pruned += await run_in_threadpool(
                lambda t=tenant.tenant_id: self.store.prune_decisions(
                    t, before=before, keep=self.keep
                )
            )
        if pruned:
            log.info("retention: deleted %d match records", pruned)
        return pruned

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        await self._periodic.close()
