"""Everything a running service owns, built at start-up and closed at shutdown.

``Runtime.start`` loads the artefact, opens the store, starts the batcher and rebuilds every
tenant's index from the store. Indexes are rebuilt for the served model version; items enrolled
under another version are re-embedded from their stored image when they have one (and the new
embedding stored), otherwise they cannot be searched by this model and are logged as skipped.

If the store is down at start-up the service still starts (``/readyz`` says not ready) and the
first request after the store returns rebuilds the indexes: no restart needed.

Replicas sharing a Redis store keep their indexes in sync by tailing the store's change feed
(every gallery write appends to it in its own transaction): an "add" looks the items' vectors up
in the store (so an item deleted in the meantime is not resurrected), a "remove" drops ids, a
"drop_tenant" drops the index. Applying a change twice is harmless, so a replica applies its own
writes again without harm, and the feed is read from the position taken before the rebuild.
The feed is capped: when the store reports that entries after this replica's position were
trimmed before it read them (a "resync" change: it was cut off for longer than the cap lasts),
the replica rebuilds every index from the store and follows on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import anyio.to_thread
import numpy as np
import torch
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool
from torch import nn

from service.embedding import EmbeddingBatcher, resolve_device
from service.errors import (
    InvalidInputError,
    NotReadyError,
    RateLimitedError,
    StoreUnavailableError,
)
from service.gallery import Gallery
from service.images import decode_image
from service.index import IndexRegistry
from service.inputs import InputResolver
from service.matching import Matcher
from service.metrics import ServiceMetrics
from service.ratelimit import RateLimiter, open_rate_limiter
from service.settings import Settings
from service.store import Change, Store, open_store
from service.tenants import Tenants
from tcm import Manifest, load_artefact

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    manifest: Manifest
    model: nn.Module
    device: torch.device
    registry: CollectorRegistry
    metrics: ServiceMetrics
    store: Store
    indexes: IndexRegistry
    batcher: EmbeddingBatcher
    resolver: InputResolver
    tenants: Tenants
    gallery: Gallery
    matcher: Matcher
    rate_limiter: RateLimiter | None = None
    indexes_loaded: bool = False
    skipped_items: int = 0
    _load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _follower: asyncio.Task[None] | None = None
    changes_applied: int = 0
    feed_cursor: str | None = None  # the change feed's position the indexes reflect
    resyncs: int = 0  # full rebuilds because the feed lost entries this replica had not read

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def threshold(self) -> float:
        return float(self.manifest.calibration.tau)

    @classmethod
    async def start(cls, settings: Settings, metrics: ServiceMetrics) -> Runtime:
        device = resolve_device(settings.device)
        model, manifest = await run_in_threadpool(
            load_artefact, settings.artefact_path, device=device)
        log.info("loaded model %s (%s, dim %d) on %s; tau=%.6f", manifest.model_version,
                 manifest.architecture, manifest.embedding_dim, device, manifest.calibration.tau)
        metrics.model.info({"model_version": manifest.model_version,
                            "architecture": manifest.architecture,
                            "embedding_dim": str(manifest.embedding_dim),
                            "device": str(device)})
        metrics.threshold.set(manifest.calibration.tau)
        store = await run_in_threadpool(open_store, settings)
        try:
            indexes = IndexRegistry(manifest.embedding_dim, settings.index_factory,
                                    device=str(device.type))
        except Exception:
            await run_in_threadpool(store.close)
            raise
        batcher = EmbeddingBatcher(model, manifest.preprocessing, device=device,
                                   max_batch=settings.embed_max_batch,
                                   max_wait_s=settings.embed_max_wait_ms / 1e3, metrics=metrics)
        resolver = InputResolver(batcher=batcher, store=store, dim=manifest.embedding_dim,
                                 channels=manifest.preprocessing.channels,
                                 max_image_pixels=settings.max_image_pixels,
                                 model_version=manifest.model_version)
        runtime = cls(
            settings=settings, manifest=manifest, model=model, device=device,
            registry=metrics.registry, metrics=metrics, store=store, indexes=indexes,
            batcher=batcher, resolver=resolver,
            tenants=Tenants(store, indexes, metrics),
            gallery=Gallery(store=store, indexes=indexes, resolver=resolver, metrics=metrics,
                            model_version=manifest.model_version,
                            max_batch_items=settings.max_batch_items,
                            max_list_limit=settings.max_list_limit),
            matcher=Matcher(store=store, indexes=indexes, resolver=resolver, metrics=metrics,
                            threshold=manifest.calibration.tau,
                            model_version=manifest.model_version, max_k=settings.max_k),
            rate_limiter=open_rate_limiter(settings, store))
        await batcher.start()
        try:
            await runtime.ensure_indexes()
        except StoreUnavailableError as exc:
            log.warning("store unavailable at start-up, indexes will load once it is back: %s",
                        exc.message)
        return runtime

    async def close(self) -> None:
        await self.stop_follower()
        await self.batcher.stop()
        self.indexes.clear()
        await run_in_threadpool(self.store.close)

    async def ensure_indexes(self) -> None:
        """Rebuilds all indexes from the store unless done; raises StoreUnavailableError."""
        if self.indexes_loaded:
            return
        async with self._load_lock:
            if self.indexes_loaded:
                return
            await self._rebuild_all()
            self.indexes_loaded = True
            self.start_follower()

    async def _rebuild_all(self) -> None:
        """Every tenant's index from the store, and the feed position to follow on from (taken
        first: a write that lands during the rebuild is applied again from the feed)."""
        cursor = await run_in_threadpool(self.store.change_cursor)
        tenants = await run_in_threadpool(self.store.list_tenants)
        skipped = 0
        for tenant in tenants:
            skipped += await self._backfill(tenant.tenant_id)
            vectors = await run_in_threadpool(
                lambda t=tenant.tenant_id: self.store.gallery_vectors(
                    t, model_version=self.model_version))
            await run_in_threadpool(self.indexes.get(tenant.tenant_id).rebuild,
                                    vectors.seqs, vectors.item_ids, vectors.subjects,
                                    vectors.vectors if len(vectors) else
                                    np.zeros((0, self.manifest.embedding_dim), np.float32))
        live = {t.tenant_id for t in tenants}
        for tenant_id in set(self.indexes.sizes()) - live:  # deleted while we were not looking
            self.indexes.drop(tenant_id)
        self.skipped_items = skipped
        self.feed_cursor = cursor
        sizes = self.indexes.sizes()
        self.metrics.set_gallery_size(sizes)
        log.info("indexes rebuilt: %d tenants, %d items%s", len(sizes), sum(sizes.values()),
                 f", {skipped} items without an embedding for {self.model_version} and "
                 "without an image were skipped" if skipped else "")

    def start_follower(self) -> None:
        """Tails the change feed from ``feed_cursor`` (no-op without a feed, or if running)."""
        if self.feed_cursor is not None and self._follower is None:
            self._follower = asyncio.create_task(self._follow_changes(),
                                                 name="store-change-follower")

    async def stop_follower(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None

    async def _backfill(self, tenant_id: str) -> int:
        """Embeds, with the served model, items stored with an image but without an embedding
        for it (enrolled under another model version). Returns how many had to be skipped."""
        missing = await run_in_threadpool(lambda: self.store.items_without_embedding(
            tenant_id, model_version=self.model_version))
        if not missing:
            return 0
        skipped = 0
        chunk = max(1, self.settings.embed_max_batch)
        with_image = [(iid, img) for iid, img in missing if img is not None]
        skipped += len(missing) - len(with_image)
        for start in range(0, len(with_image), chunk):
            part = with_image[start:start + chunk]
            arrays, ids = [], []
            for iid, img in part:
                try:
                    arrays.append(await run_in_threadpool(
                        lambda b=img, w=iid: decode_image(
                            b, channels=self.manifest.preprocessing.channels,
                            max_pixels=self.settings.max_image_pixels, where=f"item {w}")))
                    ids.append(iid)
                except InvalidInputError as exc:
                    log.warning("cannot re-embed stored image: %s", exc.message)
                    skipped += 1
            if arrays:
                vectors = await self.batcher.embed(arrays)
                await run_in_threadpool(lambda i=ids, v=vectors: self.store.put_embeddings(
                    tenant_id, dict(zip(i, v, strict=True)), model_version=self.model_version))
        log.info("tenant %s: re-embedded %d stored images for model %s", tenant_id,
                 len(with_image), self.model_version)
        return skipped

    async def _follow_changes(self) -> None:
        """Applies the store's change feed to the indexes until cancelled. ``feed_cursor``
        moves past a batch once all of it is applied (a batch cut short is applied again)."""
        while True:
            try:
                # abandoned on cancel: shutdown need not wait for a blocking read to time out
                assert self.feed_cursor is not None
                cursor, changes = await anyio.to_thread.run_sync(
                    lambda c=self.feed_cursor: self.store.read_changes(c, block_ms=1000),
                    abandon_on_cancel=True)
                if any(change.op == "resync" for change in changes):
                    log.warning("the change feed lost entries this replica had not read yet "
                                "(it was cut off for longer than the feed's cap lasts): "
                                "rebuilding every index from the store")
                    await self._rebuild_all()
                    self.resyncs += 1
                    self.metrics.feed_resyncs.inc()
                    continue
                for change in changes:
                    await self._apply(change)
                self.feed_cursor = cursor
            except asyncio.CancelledError:
                raise
            except StoreUnavailableError as exc:
                log.warning("change feed unavailable, retrying: %s", exc.message)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("applying the change feed failed; retrying")
                await asyncio.sleep(0.5)

    async def _apply(self, change: Change) -> None:
        if change.op == "drop_tenant":
            self.indexes.drop(change.tenant_id)
        elif change.op == "remove":
            await run_in_threadpool(self.indexes.get(change.tenant_id).remove,
                                    list(change.seqs))
        elif change.op == "add":
            vectors = await run_in_threadpool(lambda: self.store.vectors_of_items(
                change.tenant_id, change.item_ids, model_version=self.model_version))
            if len(vectors):
                await run_in_threadpool(self.indexes.get(change.tenant_id).add, vectors.seqs,
                                        vectors.item_ids, vectors.subjects, vectors.vectors)
        self.changes_applied += 1
        self.metrics.set_gallery_size(self.indexes.sizes())

    async def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {"model": "ok"}
        try:
            await run_in_threadpool(self.store.ping)
            checks["store"] = "ok"
        except StoreUnavailableError as exc:
            checks["store"] = exc.message
        if checks["store"] == "ok" and not self.indexes_loaded:
            try:
                await self.ensure_indexes()
            except StoreUnavailableError as exc:
                checks["store"] = exc.message
        checks["indexes"] = "ok" if self.indexes_loaded else "not loaded"
        if not self.batcher.running:
            checks["model"] = "embedding worker not running"
        return checks

    async def check_rate(self, tenant_id: str) -> None:
        """Takes one request from the tenant's rate limit; RateLimitedError (429) when spent."""
        if self.rate_limiter is None:
            return
        try:
            await self.rate_limiter.check(tenant_id)
        except RateLimitedError:
            self.metrics.rate_limited.labels(tenant=self.metrics.tenant_label(tenant_id)).inc()
            raise

    def require_ready(self) -> None:
        if not self.indexes_loaded:
            raise NotReadyError("the gallery indexes are not loaded yet (is the store up?)")
