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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio.to_thread
import torch
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool
from torch import nn

from service.domain.gallery import Gallery
from service.domain.inputs import InputResolver
from service.domain.matching import FeedbackListener, Matcher, MatchListener
from service.domain.serving import Serving, SwitchGate, build_serving
from service.domain.tenants import Tenants
from service.engine.embedding import EmbeddingBatcher, resolve_device
from service.engine.images import decode_image
from service.engine.index import IndexRegistry
from service.errors import (
    InvalidInputError,
    NotReadyError,
    RateLimitedError,
    StoreUnavailableError,
)
from service.metrics import ServiceMetrics
from service.runtime.lifecycle import ModelLifecycle, startup_model
from service.settings import Settings
from service.store import Change, Store, open_store
from service.store.ratelimit import RateLimiter, open_rate_limiter
from tcm import Manifest

log = logging.getLogger(__name__)

FEED_ATTEMPTS = 3  # tries of one change-feed entry before it is skipped as poisoned


@dataclass
class Runtime:
    settings: Settings
    # the served model; replaced whole by a model switch (service.runtime.lifecycle)
    serving: Serving
    registry: CollectorRegistry
    metrics: ServiceMetrics
    store: Store
    tenants: Tenants
    gallery: Gallery
    gate: SwitchGate
    rate_limiter: RateLimiter | None = None
    indexes_loaded: bool = False
    skipped_items: int = 0
    lifecycle: ModelLifecycle | None = None
    _load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _follower: asyncio.Task[None] | None = None
    changes_applied: int = 0
    items_read_back: int = 0  # items the change feed made this replica read from the store
    feed_cursor: str | None = None  # the change feed's position the indexes reflect
    resyncs: int = 0  # full rebuilds because the feed lost entries this replica had not read
    # tenants whose gallery could not be indexed at the last rebuild, and feed entries skipped
    # because applying them kept failing (tcm_quarantined_total)
    quarantined_tenants: set[str] = field(default_factory=set)
    changes_quarantined: int = 0
    match_listeners: list[MatchListener] = field(default_factory=list)
    feedback_listeners: list[FeedbackListener] = field(default_factory=list)

    # the served model's parts, as of now (a request takes ``serving`` once and keeps it)
    @property
    def manifest(self) -> Manifest:
        return self.serving.manifest

    @property
    def model(self) -> nn.Module:
        return self.serving.model

    @property
    def device(self) -> torch.device:
        return self.serving.device

    @property
    def batcher(self) -> EmbeddingBatcher:
        return self.serving.batcher

    @property
    def resolver(self) -> InputResolver:
        return self.serving.resolver

    @property
    def indexes(self) -> IndexRegistry:
        return self.serving.indexes

    @property
    def matcher(self) -> Matcher:
        return self.serving.matcher

    @property
    def model_version(self) -> str:
        return self.serving.model_version

    @property
    def threshold(self) -> float:
        return self.serving.threshold

    @classmethod
    async def start(cls, settings: Settings, metrics: ServiceMetrics) -> Runtime:
        device = resolve_device(settings.device)
        store = await run_in_threadpool(open_store, settings)
        match_listeners: list[MatchListener] = []
        feedback_listeners: list[FeedbackListener] = []
        try:
            path = await run_in_threadpool(startup_model, store, settings)
            serving = await build_serving(settings, path, device=device, store=store,
                                          metrics=metrics, match_listeners=match_listeners,
                                          feedback_listeners=feedback_listeners)
        except Exception:
            await run_in_threadpool(store.close)
            raise
        manifest = serving.manifest
        log.info("loaded model %s (%s, dim %d) on %s; tau=%.6f", manifest.model_version,
                 manifest.architecture, manifest.embedding_dim, device, manifest.calibration.tau)
        gate = SwitchGate()
        holder: dict[str, Runtime] = {}
        runtime = cls(
            settings=settings, serving=serving, registry=metrics.registry, metrics=metrics,
            store=store, gate=gate,
            tenants=Tenants(store, lambda: holder["rt"].indexes, metrics),
            gallery=Gallery(store=store, serving=lambda: holder["rt"].serving, gate=gate,
                            metrics=metrics, max_batch_items=settings.max_batch_items,
                            max_list_limit=settings.max_list_limit,
                            max_enrol_items=settings.max_enrol_items),
            rate_limiter=open_rate_limiter(settings, store),
            match_listeners=match_listeners, feedback_listeners=feedback_listeners)
        holder["rt"] = runtime
        runtime.publish_model()
        try:
            await runtime.ensure_indexes()
        except StoreUnavailableError as exc:
            log.warning("store unavailable at start-up, indexes will load once it is back: %s",
                        exc.message)
        runtime.lifecycle = ModelLifecycle(runtime)
        runtime.lifecycle.start()
        return runtime

    def publish_model(self) -> None:
        """The served model's info and threshold on /metrics."""
        m = self.manifest
        self.metrics.model.info({"model_version": m.model_version,
                                 "architecture": m.architecture,
                                 "embedding_dim": str(m.embedding_dim),
                                 "device": str(self.device)})
        self.metrics.threshold.set(m.calibration.tau)

    async def close(self) -> None:
        if self.lifecycle is not None:
            await self.lifecycle.close()
        await self.stop_follower()
        await self.serving.close()
        await run_in_threadpool(self.store.close)

    async def ensure_indexes(self) -> None:
        """Rebuilds all indexes from the store unless done; raises StoreUnavailableError."""
        if self.indexes_loaded:
            return
        async with self._load_lock:
            if self.indexes_loaded:
                return
            async with self.gate.exclusive():
                await self.rebuild_all(self.serving)
            self.indexes_loaded = True
            self.start_follower()

    async def rebuild_all(self, serving: Serving) -> dict[str, int]:
        """Every tenant's index of ``serving`` from the store (re-embedding stored images that
        lack its embedding), and the feed position to follow on from (taken first: a write
        that lands during the rebuild is applied again from the feed). Returns, per tenant,
        how many items had to be left out (no embedding for this model and no image)."""
        cursor = await run_in_threadpool(self.store.change_cursor)
        tenants = await run_in_threadpool(self.store.list_tenants)
        skipped: dict[str, int] = {}
        version = serving.model_version
        for tenant in tenants:
            try:
                left_out = await self.backfill(serving, tenant.tenant_id)
                if left_out:
                    skipped[tenant.tenant_id] = left_out
                # streamed chunk by chunk into the index, in one worker thread (the store may
                # read through a per-thread connection)
                await run_in_threadpool(self._rebuild_tenant, serving, tenant.tenant_id)
            except StoreUnavailableError:
                raise
            except Exception:
                # a stored value that cannot be indexed must not stop start-up for every
                # tenant: this one keeps what its index held (empty at start-up) and is named
                log.exception("tenant %s: its gallery could not be indexed and is left out of "
                              "this rebuild (quarantined; fix or delete the item named above "
                              "and restart)", tenant.tenant_id)
                self.quarantined_tenants.add(tenant.tenant_id)
                self.metrics.quarantined.labels(stage="startup").inc()
                continue
            self.quarantined_tenants.discard(tenant.tenant_id)
        live = {t.tenant_id for t in tenants}
        for tenant_id in set(serving.indexes.sizes()) - live:  # deleted meanwhile
            serving.indexes.drop(tenant_id)
        self.skipped_items = sum(skipped.values())
        self.feed_cursor = cursor
        sizes = serving.indexes.sizes()
        self.metrics.set_gallery_size(sizes)
        log.info("indexes of %s rebuilt: %d tenants, %d items%s", version, len(sizes),
                 sum(sizes.values()), f", {self.skipped_items} items without an embedding for "
                 "it and without an image were left out" if skipped else "")
        return skipped

    def _rebuild_tenant(self, serving: Serving, tenant_id: str) -> None:
        """Streams the tenant's stored gallery into its index (blocking: a worker thread); the
        store's reader is closed here even when a chunk cannot be indexed."""
        chunks = self.store.iter_gallery_vectors(tenant_id, model_version=serving.model_version)
        try:
            serving.indexes.get(tenant_id).rebuild_chunks(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

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

    async def backfill(self, serving: Serving, tenant_id: str,
                       on_progress: Callable[[int, int], None] | None = None) -> int:
        """Embeds, with ``serving``'s model, the tenant's items stored with an image but without
        an embedding for it (enrolled under another model version), chunk by chunk, reporting
        ``on_progress(embedded, skipped)`` after each. Returns how many had to be skipped."""
        missing = await run_in_threadpool(lambda: self.store.items_without_embedding(
            tenant_id, model_version=serving.model_version))
        if not missing:
            return 0
        chunk = max(1, self.settings.embed_max_batch)
        with_image = [(iid, img) for iid, img in missing if img is not None]
        skipped = len(missing) - len(with_image)
        if on_progress is not None and skipped:
            on_progress(0, skipped)
        for start in range(0, len(with_image), chunk):
            embedded, bad = await self._embed_stored(serving, tenant_id,
                                                     with_image[start:start + chunk])
            skipped += bad
            if on_progress is not None:
                on_progress(embedded, bad)
        log.info("tenant %s: re-embedded %d stored images for model %s", tenant_id,
                 len(with_image), serving.model_version)
        return skipped

    async def _embed_stored(self, serving: Serving, tenant_id: str,
                            images: Sequence[tuple[str, bytes]]) -> tuple[int, int]:
        """Decodes stored images (item id, bytes), embeds them with ``serving``'s model in one
        batch and stores the embeddings; returns (embedded, undecodable)."""
        arrays, ids = [], []
        for iid, img in images:
            try:
                arrays.append(await run_in_threadpool(
                    decode_image, img, channels=serving.manifest.preprocessing.channels,
                    max_pixels=self.settings.max_image_pixels, where=f"item {iid}",
                    # a face model finds the face in the whole photo: no shrink to the chip size
                    target=None if serving.batcher.face is not None
                    else serving.manifest.preprocessing.image_size))
                ids.append(iid)
            except InvalidInputError as exc:
                log.warning("cannot re-embed stored image: %s", exc.message)
        if arrays:
            wheres = [f"item {iid}" for iid in ids]
            try:
                vectors = list(await serving.batcher.embed(arrays, wheres))
            except InvalidInputError:
                # a face model may find no face in one of them: embed one by one, skip those
                kept, vectors = [], []
                for iid, arr, where in zip(ids, arrays, wheres, strict=True):
                    try:
                        vectors.append((await serving.batcher.embed([arr], [where]))[0])
                        kept.append(iid)
                    except InvalidInputError as exc:
                        log.warning("cannot re-embed stored image: %s", exc.message)
                ids = kept
            if ids:
                await run_in_threadpool(lambda: self.store.put_embeddings(
                    tenant_id, dict(zip(ids, vectors, strict=True)),
                    model_version=serving.model_version))
        return len(ids), len(images) - len(ids)

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
                    async with self.gate.shared():
                        await self.rebuild_all(self.serving)
                    self.resyncs += 1
                    self.metrics.feed_resyncs.inc()
                    continue
                for change in changes:
                    await self._apply_or_quarantine(change)
                self.feed_cursor = cursor
            except asyncio.CancelledError:
                raise
            except StoreUnavailableError as exc:
                log.warning("change feed unavailable, retrying: %s", exc.message)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("applying the change feed failed; retrying")
                await asyncio.sleep(0.5)

    async def _apply_or_quarantine(self, change: Change) -> None:
        """Applies one change; one that fails for a reason other than the store being down
        (a stored value no index can take) is tried ``FEED_ATTEMPTS`` times, then logged,
        counted and skipped, so that one poisoned entry never holds up the entries (and the
        tenants) after it."""
        for attempt in range(1, FEED_ATTEMPTS + 1):
            try:
                await self._apply(change)
                return
            except (asyncio.CancelledError, StoreUnavailableError):
                raise
            except Exception:
                if attempt == FEED_ATTEMPTS:
                    log.exception("change feed entry %s of tenant %s (items %s) failed %d "
                                  "times: skipped (quarantined)", change.op, change.tenant_id,
                                  list(change.item_ids[:10]), attempt)
                    self.metrics.quarantined.labels(stage="change_feed").inc()
                    self.changes_quarantined += 1
                    return
                log.warning("applying change feed entry %s of tenant %s failed (attempt %d of "
                            "%d)", change.op, change.tenant_id, attempt, FEED_ATTEMPTS,
                            exc_info=True)
                await asyncio.sleep(0.1 * attempt)

    async def _apply(self, change: Change) -> None:
        async with self.gate.shared():
            serving = self.serving
            indexes = serving.indexes
            if change.op == "drop_tenant":
                indexes.drop(change.tenant_id)
                self.gallery.forget_tenant(change.tenant_id)
            elif change.op == "remove":
                await run_in_threadpool(indexes.get(change.tenant_id).remove, list(change.seqs))
            elif change.op == "add":
                # after any write of this tenant in flight on this replica has reached the index,
                # so that its own items are seen as held and not read back
                async with self.gallery.tenant_lock(change.tenant_id):
                    await self._apply_add(serving, change.tenant_id, change.item_ids,
                                          change.seqs)
            self.changes_applied += 1
            self.metrics.set_gallery_size(indexes.sizes())

    async def _apply_add(self, serving: Serving, tenant_id: str, item_ids: Sequence[str],
                         seqs: Sequence[int] = ()) -> None:
        version = serving.model_version
        if len(seqs) == len(item_ids):  # read back only what this replica's index lacks
            held = serving.indexes.get(tenant_id).held(seqs)
            item_ids = [i for i, h in zip(item_ids, held, strict=True) if not h]
            if not item_ids:
                return
        vectors = await run_in_threadpool(lambda: self.store.vectors_of_items(
            tenant_id, item_ids, model_version=version))
        if len(vectors) < len(item_ids):
            # enrolled by a replica still serving another model: embed the stored images
            have = set(vectors.item_ids)
            lacking = [i for i in item_ids if i not in have]
            await self.embed_items(serving, tenant_id, lacking)
            vectors = await run_in_threadpool(lambda: self.store.vectors_of_items(
                tenant_id, item_ids, model_version=version))
        self.items_read_back += len(vectors)
        if len(vectors):
            await run_in_threadpool(serving.indexes.get(tenant_id).add, vectors.seqs,
                                    vectors.item_ids, vectors.subjects, vectors.vectors,
                                    vectors.metadata)

    async def embed_items(self, serving: Serving, tenant_id: str, item_ids: Sequence[str]
                          ) -> None:
        """Embeds the stored images of these items with ``serving``'s model (items without
        an image, or gone, are left as they are)."""
        images = []
        for iid in item_ids:
            item = await run_in_threadpool(lambda i=iid: self.store.get_item(
                tenant_id, i, model_version=serving.model_version, with_image=True))
            if item is not None and item.image is not None and item.embedding is None:
                images.append((iid, item.image))
        if images:
            await self._embed_stored(serving, tenant_id, images)

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
