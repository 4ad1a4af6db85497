"""The one owner of keeping every tenant's index in step with the store of record.

Everything that changes an index goes through :class:`IndexSync`:

- **this replica's writes**: a gallery write takes the tenant's write lock
  (:meth:`IndexSync.writing`), writes the store, then tells the index (:meth:`added`,
  :meth:`removed`, :meth:`tenant_dropped`), so that two writes of one item cannot reach the
  index in the opposite order from the store;
- **rebuilds**: at start-up (:meth:`ensure_loaded`), after the store was unreachable, when the
  change feed lost entries, and for a model switch (:meth:`rebuild_all` on the new model's
  indexes); items stored without an embedding for the served model are re-embedded from their
  stored image first (:meth:`backfill`);
- **other replicas' writes**: a follower task tails the store's change feed (every gallery write
  appends to it in its own transaction): an "add" looks the items' vectors up in the store (so
  an item deleted in the meantime is not resurrected; items this replica's index already holds
  are skipped), a "remove" drops seqs, a "drop_tenant" drops the index. Applying a change twice
  is harmless; the feed is read from the position taken before the rebuild. When the store
  reports that entries after this replica's position were trimmed before it read them, or that
  it moved backwards under this replica (restored from an older snapshot, a failover to a
  lagging replica: the item counter went back, so new items would reuse seqs the indexes still
  hold), it answers a "resync" change and every index is rebuilt from the store.

No single stored value can stop this: a tenant whose stored gallery cannot be indexed is
quarantined at rebuild (logged, counted, the others load), and a feed entry that keeps failing
for a reason other than the store being down is skipped after ``FEED_ATTEMPTS`` tries
(``tcm_quarantined_total``).

The served model can change underneath (``service.domain.serving.ServingSlot``): every method
works on the ``Serving`` it is given or the one current when it takes the slot's gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.domain import consistency
from service.domain.serving import Serving, ServingSlot
from service.engine.index import TenantIndex
from service.engine.preparing import decode_for
from service.errors import InvalidInputError, StoreUnavailableError
from service.metrics import ServiceMetrics
from service.store import Change, Store

log = logging.getLogger(__name__)

FEED_ATTEMPTS = 3  # tries of one change-feed entry before it is skipped as poisoned
FEED_JOIN_S = 5.0  # the longest stop_follower waits for an interrupted read to return


class IndexSync:
    def __init__(
        self,
        *,
        store: Store,
        slot: ServingSlot,
        metrics: ServiceMetrics,
        embed_chunk: int,
        max_image_pixels: int,
        holds: Callable[[str], bool] | None = None,
        holds_version: int = 0,
    ) -> None:
        self.store = store
        # which tenants this replica loads and follows (shard groups: its group's under the
        # placement table it has applied; else all), and that table's version once every one
        # of them is loaded (0 before any table). A new table comes in through request_holds
        # and is applied by the follower between two feed reads (_reconcile).
        self.holds: Callable[[str], bool] = holds or (lambda _tenant: True)
        self.holds_version = holds_version
        self._wanted: tuple[Callable[[str], bool], int] | None = None
        self._target_version = holds_version
        # tenants this replica now holds whose index is being built aside (a tenant moving
        # into its group): their feed changes wait here and are applied to the new index
        # before it is installed
        self._loading: dict[str, list[Change]] = {}
        self._loader: asyncio.Task[None] | None = None
        self.slot = slot
        self.metrics = metrics
        self.embed_chunk = max(1, embed_chunk)
        self.max_image_pixels = max_image_pixels
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._load_lock = asyncio.Lock()
        self._follower: asyncio.Task[None] | None = None
        # the follower's blocking reads run in this one thread, joined at stop_follower: an
        # abandoned read could still sit in a socket call when the interpreter exits
        self._feed_pool: ThreadPoolExecutor | None = None
        self._reading: Future[tuple[str, list[Change]]] | None = None
        self.loaded = False  # every index was built from the store at least once
        self.skipped_items = 0  # left out at the last rebuild: no embedding and no image
        self.feed_cursor: str | None = None  # the change feed's position the indexes reflect
        self._cursor_moved = asyncio.Event()  # set (and replaced) whenever feed_cursor moves
        self.reads_waiting = 0  # reads waiting for a consistency token (caught_up)
        self.changes_applied = 0
        self.items_read_back = 0  # items the change feed made this replica read from the store
        self.resyncs = 0  # full rebuilds because the feed lost entries this replica had not read
        self.rebuilds = 0  # rebuilds of every index (start-up, resync, model switch)
        # tenants whose gallery could not be indexed at the last rebuild, and feed entries
        # skipped because applying them kept failing (tcm_quarantined_total)
        self.quarantined_tenants: set[str] = set()
        self.changes_quarantined = 0

    # --- this replica's writes ---------------------------------------------------------------
    def write_lock(self, tenant_id: str) -> asyncio.Lock:
        """Serialises the tenant's writes on this replica from store to index (take it inside
        the slot's gate, around the store write and the index update only)."""
        return self._locks[tenant_id]

    @contextlib.asynccontextmanager
    async def writing(self, tenant_id: str) -> AsyncIterator[Serving]:
        """The gate (shared: no model switch meanwhile) and the tenant's write lock, for a
        write with nothing to embed; yields the model it must use."""
        async with self.slot.gate.shared(), self._locks[tenant_id]:
            yield self.slot.current

    async def added(
        self,
        serving: Serving,
        tenant_id: str,
        seqs: Sequence[int],
        item_ids: list[str],
        subjects: list[str],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any]],
    ) -> None:
        await run_in_threadpool(
            serving.indexes.get(tenant_id).add, seqs, item_ids, subjects, vectors, metadata
        )

    async def removed(self, serving: Serving, tenant_id: str, seqs: Sequence[int]) -> None:
        await run_in_threadpool(serving.indexes.get(tenant_id).remove, list(seqs))

    def tenant_created(self, tenant_id: str) -> None:
        if self.holds(tenant_id):  # (shard groups: another group's tenant has no index here)
            self.slot.current.indexes.get(tenant_id)
            self.publish_sizes()

    def tenant_dropped(self, tenant_id: str) -> None:
        """Drops the index (call under :meth:`writing`, after the store dropped the tenant)."""
        self.slot.current.indexes.drop(tenant_id)
        self.metrics.forget_tenant(tenant_id)
        self.publish_sizes()

    async def written(self, tenant_id: str, *, publish: bool = True) -> None:
        """After a gallery write of ``tenant_id`` in this request: the size metrics
        (``publish``) and the write's consistency token, the feed's position now, for the
        response (``service.domain.consistency``; none without a feed)."""
        if publish:
            self.publish_sizes()
        if self.feed_cursor is not None:
            consistency.record(await run_in_threadpool(self.store.change_cursor, tenant_id))

    async def caught_up(self, token: str, timeout_s: float, tenant_id: str) -> bool:
        """Whether the indexes reflect the feed up to ``token`` (a valid consistency token of
        a write of ``tenant_id``), waiting up to ``timeout_s`` for the follower to get there.
        Without a feed every write went through this process: met at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            cursor = self.feed_cursor
            if cursor is None or self.store.feed_covers(cursor, token, tenant_id):
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.reads_waiting += 1
            try:
                await asyncio.wait_for(self._cursor_moved.wait(), left)
            except TimeoutError:
                return False
            finally:
                self.reads_waiting -= 1

    def _set_cursor(self, cursor: str | None) -> None:
        """The feed position the indexes now reflect; wakes the reads waiting for one."""
        self.feed_cursor = cursor
        self._cursor_moved.set()
        self._cursor_moved = asyncio.Event()

    def request_holds(self, holds: Callable[[str], bool], version: int) -> None:
        """Which tenants this replica holds changed (placement table ``version``): after its
        current read the follower releases the indexes of the tenants no longer held and
        starts loading the new ones aside (:meth:`_reconcile`); the others are untouched."""
        self._wanted = (holds, version)

    def serves(self, tenant_id: str) -> bool:
        """Whether this replica's index of ``tenant_id`` is loaded and followed: it may answer
        the tenant's requests."""
        return self.loaded and self.holds(tenant_id) and tenant_id not in self._loading

    def forget_lock(self, tenant_id: str) -> None:
        self._locks.pop(tenant_id, None)

    def publish_sizes(self) -> None:
        indexes = self.slot.current.indexes
        self.metrics.set_gallery_size(indexes.sizes(), indexes.shapes())

    # --- rebuilds ------------------------------------------------------------------------------
    async def ensure_loaded(self) -> None:
        """Rebuilds all indexes from the store unless done, then follows the change feed;
        raises StoreUnavailableError."""
        if self.loaded:
            return
        async with self._load_lock:
            if self.loaded:
                return
            async with self.slot.gate.exclusive():
                await self.rebuild_all(self.slot.current)
            self.loaded = True
            self.start_follower()

    async def rebuild_all(self, serving: Serving) -> dict[str, int]:
        """Every tenant's index of ``serving`` from the store (re-embedding stored images that
        lack its embedding), and the feed position to follow on from (taken first: a write
        that lands during the rebuild is applied again from the feed). Returns, per tenant,
        how many items had to be left out (no embedding for this model and no image)."""
        self.rebuilds += 1
        cursor = await run_in_threadpool(self.store.change_cursor)
        tenants = [  # (a tenant loading aside is left to its loader)
            t
            for t in await run_in_threadpool(self.store.list_tenants)
            if self.holds(t.tenant_id) and t.tenant_id not in self._loading
        ]
        skipped: dict[str, int] = {}
        for tenant in tenants:
            try:
                left_out = await self.backfill(serving, tenant.tenant_id)
                if left_out:
                    skipped[tenant.tenant_id] = left_out
                await run_in_threadpool(self._rebuild_tenant, serving, tenant.tenant_id)
            except StoreUnavailableError:
                raise
            except Exception:
                # a stored value that cannot be indexed must not stop start-up for every
                # tenant: this one keeps what its index held (empty at start-up) and is named
                log.exception(
                    "tenant %s: its gallery could not be indexed and is left out of "
                    "this rebuild (quarantined; fix or delete the item named above "
                    "and restart)",
                    tenant.tenant_id,
                )
                self.quarantined_tenants.add(tenant.tenant_id)
                self.metrics.quarantined.labels(stage="startup").inc()
                continue
            self.quarantined_tenants.discard(tenant.tenant_id)
        live = {t.tenant_id for t in tenants} | set(self._loading)
        for tenant_id in set(serving.indexes.sizes()) - live:  # deleted meanwhile
            serving.indexes.drop(tenant_id)
        self.skipped_items = sum(skipped.values())
        self._set_cursor(cursor)
        sizes = serving.indexes.sizes()
        self.metrics.set_gallery_size(sizes, serving.indexes.shapes())
        log.info(
            "indexes of %s rebuilt: %d tenants, %d items%s",
            serving.model_version,
            len(sizes),
            sum(sizes.values()),
            f", {self.skipped_items} items without an "
            "embedding for it and without an image were left out"
            if skipped
            else "",
        )
        return skipped

    def _rebuild_tenant(self, serving: Serving, tenant_id: str) -> None:
        """Streams the tenant's stored gallery into its index (blocking: a worker thread, the
        one the store may read through); the store's reader is closed here even when a chunk
        cannot be indexed."""
        self._fill(serving, tenant_id, serving.indexes.get(tenant_id))

    async def backfill(
        self,
        serving: Serving,
        tenant_id: str,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Embeds, with ``serving``'s model, the tenant's items stored with an image but without
        an embedding for it (enrolled under another model version), chunk by chunk, reporting
        ``on_progress(embedded, skipped)`` after each. Returns how many had to be skipped."""
        missing = await run_in_threadpool(
            lambda: self.store.items_without_embedding(
                tenant_id, model_version=serving.model_version
            )
        )
        if not missing:
            return 0
        with_image = [(iid, img) for iid, img in missing if img is not None]
        skipped = len(missing) - len(with_image)
        if on_progress is not None and skipped:
            on_progress(0, skipped)
        for start in range(0, len(with_image), self.embed_chunk):
            embedded, bad = await self._embed_stored(
                serving, tenant_id, with_image[start : start + self.embed_chunk]
            )
            skipped += bad
            if on_progress is not None:
                on_progress(embedded, bad)
        log.info(
            "tenant %s: re-embedded %d stored images for model %s",
            tenant_id,
            len(with_image),
            serving.model_version,
        )
        return skipped

    async def _embed_stored(
        self, serving: Serving, tenant_id: str, images: Sequence[tuple[str, bytes]]
    ) -> tuple[int, int]:
        """Decodes stored images (item id, bytes), embeds them with ``serving``'s model in one
        batch and stores the embeddings; returns (embedded, undecodable)."""
        arrays, ids = [], []
        for iid, img in images:
            try:
                arrays.append(
                    await run_in_threadpool(
                        decode_for,
                        serving.batcher.preparer,
                        img,
                        max_pixels=self.max_image_pixels,
                        where=f"item {iid}",
                    )
                )
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
                await run_in_threadpool(
                    lambda: self.store.put_embeddings(
                        tenant_id,
                        dict(zip(ids, vectors, strict=True)),
                        model_version=serving.model_version,
                    )
                )
        return len(ids), len(images) - len(ids)

    async def embed_items(self, serving: Serving, tenant_id: str, item_ids: Sequence[str]) -> None:
        """Embeds the stored images of these items with ``serving``'s model (items without
        an image, or gone, are left as they are)."""
        images = []
        for iid in item_ids:
            item = await run_in_threadpool(
                lambda i=iid: self.store.get_item(
                    tenant_id, i, model_version=serving.model_version, with_image=True
                )
            )
            if item is not None and item.image is not None and item.embedding is None:
                images.append((iid, item.image))
        if images:
            await self._embed_stored(serving, tenant_id, images)

    # --- the change feed -----------------------------------------------------------------------
    def start_follower(self) -> None:
        """Tails the change feed from ``feed_cursor`` (no-op without a feed, or if running)."""
        if self.feed_cursor is not None and self._follower is None:
            if self._feed_pool is None:
                self._feed_pool = ThreadPoolExecutor(1, thread_name_prefix="change-feed")
            self._follower = asyncio.create_task(
                self._follow_changes(), name="store-change-follower"
            )

    async def stop_follower(self) -> None:
        """Cancels the follower, wakes its blocking read (:meth:`Store.interrupt_changes`) and
        waits for the reading thread to return (bounded), so that no thread is left inside a
        socket call: shutdown need not wait for a blocking read to time out, and an interpreter
        exit never finds one running (it aborted now and then, "terminate called without an
        active exception")."""
        if self._loader is not None:
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loader
            self._loader = None
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        reading, self._reading = self._reading, None
        if reading is not None and not reading.done():
            self.store.interrupt_changes()
            await asyncio.to_thread(futures_wait, [reading], FEED_JOIN_S)
        if self._feed_pool is not None:
            self._feed_pool.shutdown(wait=False)
            self._feed_pool = None

    async def _follow_changes(self) -> None:
        """Applies the store's change feed to the indexes until cancelled. ``feed_cursor``
        moves past a batch once all of it is applied (a batch cut short is applied again)."""
        while True:
            try:
                # on cancel, stop_follower wakes this read and joins its thread
                assert self.feed_cursor is not None and self._feed_pool is not None
                self._reading = self._feed_pool.submit(
                    self.store.read_changes, self.feed_cursor, block_ms=1000
                )
                cursor, changes = await asyncio.wrap_future(self._reading)
                if (wanted := self._wanted) is not None:  # the tenants it holds changed
                    await self._reconcile(*wanted)  # (from the cursor before this read)
                    if self._wanted is wanted:  # (kept if it failed, or another came meanwhile)
                        self._wanted = None
                    continue
                if any(change.op == "resync" for change in changes):
                    log.warning(
                        "the change feed lost entries this replica had not read yet "
                        "(it was cut off for longer than the feed's cap lasts), or the "
                        "store went back in time (restored from an older snapshot, or "
                        "failed over to a replica that lagged): rebuilding every index "
                        "from the store"
                    )
                    async with self.slot.gate.shared():
                        await self.rebuild_all(self.slot.current)
                    self.resyncs += 1
                    self.metrics.feed_resyncs.inc()
                    continue
                for change in changes:
                    await self._apply_or_quarantine(change)
                self._set_cursor(cursor)
            except asyncio.CancelledError:
                raise
            except StoreUnavailableError as exc:
                log.warning("change feed unavailable, retrying: %s", exc.message)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("applying the change feed failed; retrying")
                await asyncio.sleep(0.5)

    # --- placement changes (shard groups): tenants moving in and out ------------------------
    async def _reconcile(self, holds: Callable[[str], bool], version: int) -> None:
        """Applies a new set of held tenants, in the follower, between two reads: releases the
        indexes of the tenants no longer held, and starts loading the newly held ones aside
        (their feed changes from here on are kept for them), so that no other tenant's index
        is touched and the follower keeps applying every other change meanwhile."""
        serving = self.slot.current
        listed = [t.tenant_id for t in await run_in_threadpool(self.store.list_tenants)]
        have = set(serving.indexes.sizes()) | set(self._loading)
        for tenant_id in sorted(t for t in have if not holds(t)):
            serving.indexes.release(tenant_id)
            self._loading.pop(tenant_id, None)
            self.forget_lock(tenant_id)
            self.metrics.forget_tenant(tenant_id)
            log.info("tenant %s: released (placement table version %d)", tenant_id, version)
        cursor = self.feed_cursor
        new = [t for t in listed if holds(t) and t not in have]
        for tenant_id in new:
            # its feed from now on (where the store keeps one stream per tenant, the follower
            # reads the tenant's stream from here); the load reads the store after this
            position = await run_in_threadpool(self.store.change_cursor, tenant_id)
            if cursor is not None and position is not None:
                cursor = self.store.cursor_with(cursor, tenant_id, position)
            self._loading[tenant_id] = []
        self.holds, self._target_version = holds, version
        self.feed_cursor = cursor  # (moved for the new tenants only: no read is woken)
        self.publish_sizes()
        if new and (self._loader is None or self._loader.done()):
            self._loader = asyncio.create_task(self._load_aside(), name="tenant-loader")
        elif not self._loading:
            self.holds_version = version

    async def _load_aside(self) -> None:
        """Builds each newly held tenant's index aside from the store, applies the feed changes
        kept for it meanwhile, then installs it, one tenant at a time; retries while the store
        is down. ``holds_version`` then says this replica holds every tenant of its table."""
        while self._loading:
            tenant_id = next(iter(self._loading))
            try:
                async with self.slot.gate.shared():  # one model from store read to install
                    serving = self.slot.current
                    index = serving.indexes.fresh()
                    await self.backfill(serving, tenant_id)
                    await run_in_threadpool(self._fill, serving, tenant_id, index)
                    await self._install(serving, tenant_id, index)
            except asyncio.CancelledError:
                raise
            except StoreUnavailableError as exc:
                log.warning("tenant %s: loading it waits for the store: %s", tenant_id, exc.message)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception(
                    "tenant %s: its gallery could not be indexed; it is installed without it "
                    "(quarantined; fix or delete the item named above and restart)",
                    tenant_id,
                )
                self.quarantined_tenants.add(tenant_id)
                self.metrics.quarantined.labels(stage="startup").inc()
                serving = self.slot.current
                await self._install(serving, tenant_id, serving.indexes.fresh())
        self.holds_version = self._target_version
        self.publish_sizes()

    def _fill(self, serving: Serving, tenant_id: str, index: TenantIndex) -> None:
        """The tenant's stored gallery into ``index`` (blocking), closing the store's reader."""
        chunks = self.store.iter_gallery_vectors(tenant_id, model_version=serving.model_version)
        try:
            index.rebuild_chunks(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    async def _install(self, serving: Serving, tenant_id: str, index: TenantIndex) -> None:
        """Applies the changes kept for ``tenant_id`` to ``index``, then makes it the tenant's,
        with no await between the last kept change and the install."""
        async with self._locks[tenant_id]:
            while (buffer := self._loading.get(tenant_id)) is not None and buffer:
                change = buffer.pop(0)
                if change.op == "drop_tenant":  # deleted meanwhile
                    serving.indexes.drop(tenant_id)
                    del self._loading[tenant_id]
                    return
                if change.op == "remove":
                    await run_in_threadpool(index.remove, list(change.seqs))
                elif change.op == "add":
                    await self._apply_add(
                        serving, tenant_id, change.item_ids, change.seqs, index=index
                    )
            if self._loading.pop(tenant_id, None) is not None and serving.indexes.put(
                tenant_id, index
            ):
                log.info("tenant %s: loaded, %d items", tenant_id, len(index))

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
                    log.exception(
                        "change feed entry %s of tenant %s (items %s) failed %d "
                        "times: skipped (quarantined)",
                        change.op,
                        change.tenant_id,
                        list(change.item_ids[:10]),
                        attempt,
                    )
                    self.metrics.quarantined.labels(stage="change_feed").inc()
                    self.changes_quarantined += 1
                    return
                log.warning(
                    "applying change feed entry %s of tenant %s failed (attempt %d of %d)",
                    change.op,
                    change.tenant_id,
                    attempt,
                    FEED_ATTEMPTS,
                    exc_info=True,
                )
                await asyncio.sleep(0.1 * attempt)

    async def _apply(self, change: Change) -> None:
        if not self.holds(change.tenant_id):
            return  # another group's tenant (its index, if any, was released at _reconcile)
        buffer = self._loading.get(change.tenant_id)
        if buffer is not None:  # its index is being built aside: applied before installing
            buffer.append(change)
            return
        async with self.slot.gate.shared():
            serving = self.slot.current
            indexes = serving.indexes
            if change.op == "drop_tenant":
                indexes.drop(change.tenant_id)
                self.forget_lock(change.tenant_id)
            elif change.op == "remove":
                await run_in_threadpool(indexes.get(change.tenant_id).remove, list(change.seqs))
            elif change.op == "add":
                # after any write of this tenant in flight on this replica has reached the index,
                # so that its own items are seen as held and not read back
                async with self._locks[change.tenant_id]:
                    await self._apply_add(serving, change.tenant_id, change.item_ids, change.seqs)
            self.changes_applied += 1
            self.metrics.set_gallery_size(indexes.sizes(), indexes.shapes())

    async def _apply_add(
        self,
        serving: Serving,
        tenant_id: str,
        item_ids: Sequence[str],
        seqs: Sequence[int] = (),
        index: TenantIndex | None = None,
    ) -> None:
        """``index``: the tenant's index being built aside (else the registered one)."""
        version = serving.model_version
        target = index if index is not None else serving.indexes.get(tenant_id)
        if len(seqs) == len(item_ids):  # read back only what this replica's index lacks
            held = target.held(seqs)
            item_ids = [i for i, h in zip(item_ids, held, strict=True) if not h]
            if not item_ids:
                return
        vectors = await run_in_threadpool(
            lambda: self.store.vectors_of_items(tenant_id, item_ids, model_version=version)
        )
        if len(vectors) < len(item_ids):
            # enrolled by a replica still serving another model: embed the stored images
            have = set(vectors.item_ids)
            lacking = [i for i in item_ids if i not in have]
            await self.embed_items(serving, tenant_id, lacking)
            vectors = await run_in_threadpool(
                lambda: self.store.vectors_of_items(tenant_id, item_ids, model_version=version)
            )
        self.items_read_back += len(vectors)
        if len(vectors):
            await run_in_threadpool(
                target.add,
                vectors.seqs,
                vectors.item_ids,
                vectors.subjects,
                vectors.vectors,
                vectors.metadata,
            )
