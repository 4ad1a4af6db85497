"""Everything a running service owns, built at start-up and closed at shutdown.

``Runtime.start`` opens the store, loads the artefact the model registry says is active (or the
configured one), starts its batcher, and has ``service.domain.index_sync`` rebuild every
tenant's index from the store and follow the change feed. If the store is down at start-up the
service still starts (``/readyz`` says not ready) and the first request after the store returns
rebuilds the indexes: no restart needed.

The runtime holds its parts and wires them; it does none of their work: the served model lives
in the :class:`~service.domain.serving.ServingSlot`, the indexes are kept in step by
:class:`~service.domain.index_sync.IndexSync`, model switches are
:class:`~service.runtime.lifecycle.ModelLifecycle`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from service.domain.gallery import Gallery
from service.domain.index_sync import IndexSync
from service.domain.serving import Serving, ServingSlot, build_serving
from service.domain.shard_groups import ShardGroups
from service.domain.tenants import Tenants
from service.engine.decoding import DecodePool, decode_processes_for
from service.engine.embedding import resolve_device
from service.engine.faces import FacesExtraMissing
from service.errors import RateLimitedError, StoreUnavailableError
from service.metrics import ServiceMetrics
from service.runtime.deferred_writes import DeferredWrites
from service.runtime.groups import GroupRouting
from service.runtime.lifecycle import ModelLifecycle, startup_model
from service.runtime.retention import Retention
from service.settings import Settings
from service.store import Store, StoreInUseError, open_store
from service.store.ratelimit import RateLimiter, open_rate_limiter

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    metrics: ServiceMetrics
    store: Store
    slot: ServingSlot
    sync: IndexSync
    tenants: Tenants
    gallery: Gallery
    lifecycle: ModelLifecycle
    retention: Retention
    routing: GroupRouting  # shard groups: which tenants this replica serves, where others go
    deferred: DeferredWrites  # match records waiting for their shard (Redis Cluster)
    rate_limiter: RateLimiter | None = None
    decoding: DecodePool | None = None  # image decoding processes (service.engine.decoding)

    @property
    def serving(self) -> Serving:
        """The served model as of now (a request takes it once and keeps it)."""
        return self.slot.current

    @classmethod
    async def start(cls, settings: Settings, metrics: ServiceMetrics) -> Runtime:
        device = resolve_device(settings.device)
        store = await run_in_threadpool(open_store, settings)
        decoding: DecodePool | None = None
        try:
            await run_in_threadpool(store.claim_serving)
            path = await run_in_threadpool(startup_model, store, settings)
            processes = decode_processes_for(settings.decode_processes, device.type)
            if processes:
                decoding = DecodePool(processes)
                pids = await run_in_threadpool(decoding.warm)
                log.info("image decoding in %d worker processes %s", processes, pids)
            serving = await build_serving(
                settings, path, device=device, store=store, metrics=metrics, decoding=decoding
            )
        except Exception as exc:
            if isinstance(exc, StoreInUseError | FacesExtraMissing):  # what to do, in one line
                log.error("%s", exc)
            if decoding is not None:
                await run_in_threadpool(decoding.close)
            await run_in_threadpool(store.close)
            raise
        manifest = serving.manifest
        log.info(
            "loaded model %s (%s, dim %d) on %s; tau=%.6f",
            manifest.model_version,
            manifest.architecture,
            manifest.embedding_dim,
            device,
            manifest.calibration.tau,
        )
        slot = ServingSlot(serving, metrics)
        groups = ShardGroups(
            store,
            group=settings.shard_group,
            advertise_url=settings.advertise_url,
            poll_s=settings.placement_poll_s,
        )
        if groups.group is not None:
            try:  # the table first: which tenants to load
                await run_in_threadpool(groups.refresh)
            except StoreUnavailableError as exc:
                log.warning("placement table not read at start-up: %s", exc.message)
        sync = IndexSync(
            store=store,
            slot=slot,
            metrics=metrics,
            embed_chunk=settings.embed_max_batch,
            max_image_pixels=settings.max_image_pixels,
            holds=groups.holding(),
            holds_version=groups.version,
        )
        if groups.group is not None:  # (the holdings sync has applied, loading ones included)
            store.follow_only(lambda tenant: sync.holds(tenant))
        runtime = cls(
            settings=settings,
            metrics=metrics,
            store=store,
            slot=slot,
            sync=sync,
            tenants=Tenants(store, sync),
            routing=GroupRouting(groups, sync),
            gallery=Gallery(
                store=store,
                slot=slot,
                sync=sync,
                max_batch_items=settings.max_batch_items,
                max_list_limit=settings.max_list_limit,
                max_enrol_items=settings.max_enrol_items,
                idempotency_ttl_s=settings.idempotency_ttl_s,
            ),
            lifecycle=ModelLifecycle(
                settings=settings,
                store=store,
                slot=slot,
                sync=sync,
                metrics=metrics,
                device=device,
                decoding=decoding,
            ),
            retention=Retention(
                store,
                max_age_s=settings.match_retention_days * 86400.0,
                keep=settings.match_retention_per_tenant,
            ),
            deferred=DeferredWrites(store, metrics),
            rate_limiter=open_rate_limiter(
                store, rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst
            ),
            decoding=decoding,
        )
        try:
            await sync.ensure_loaded()
        except StoreUnavailableError as exc:
            log.warning(
                "store unavailable at start-up, indexes will load once it is back: %s", exc.message
            )
        runtime.lifecycle.start()
        runtime.retention.start()
        runtime.routing.start()
        runtime.deferred.start()
        return runtime

    async def close(self) -> None:
        await self.deferred.close()
        await self.routing.close()
        await self.retention.close()
        await self.lifecycle.close()
        await self.sync.stop_follower()
        await self.slot.current.close()
        if self.decoding is not None:
            await run_in_threadpool(self.decoding.close)
        await run_in_threadpool(self.store.close)

    async def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {"model": "ok"}
        try:
            await run_in_threadpool(self.store.ping)
            checks["store"] = "ok"
        except StoreUnavailableError as exc:
            checks["store"] = exc.message
        if checks["store"] == "ok" and not self.sync.loaded:
            try:
                await self.sync.ensure_loaded()
            except StoreUnavailableError as exc:
                checks["store"] = exc.message
        checks["indexes"] = "ok" if self.sync.loaded else "not loaded"
        if self.routing.groups.group is not None:  # shard groups: it must know where to forward
            checks["placement"] = (
                "ok" if self.routing.polled else "placement table and peers not read yet"
            )
        if not self.slot.current.batcher.running:
            checks["model"] = "embedding worker not running"
        return checks

    async def check_rate(self, tenant_id: str) -> None:
        """Takes a request's first work unit from the tenant's rate limit, right after
        authentication (every tenant request costs at least one); RateLimitedError (429)
        when the bucket is empty."""
        if self.rate_limiter is None:
            return
        await self._limit(self.rate_limiter, tenant_id, 1, 0)

    async def charge(self, tenant_id: str, units: int) -> None:
        """Takes the rest of a request of ``units`` work units (items, queries, images) once its
        body is parsed, before any of its work: ``units - 1`` more, the first having been taken
        by :meth:`check_rate`. Refused (429), the request gives that first unit back and costs
        nothing; ``units`` over the burst is a 422 ``too_many_items`` (never admissible)."""
        if self.rate_limiter is None or units <= 1:
            return
        await self._limit(self.rate_limiter, tenant_id, units - 1, 1)

    async def _limit(self, limiter: RateLimiter, tenant_id: str, cost: int, prepaid: int) -> None:
        try:
            await limiter.check(tenant_id, cost, prepaid=prepaid)
        except RateLimitedError:
            self.metrics.rate_limited.labels(tenant=self.metrics.tenant_label(tenant_id)).inc()
            raise
