"""Model lifecycle: stage artefact versions, activate one without downtime, roll back.

Activating a version (``ModelLifecycle.activate``) runs in the background of one replica:

1. **begin**: the registry records the activation (compare-and-set: one at a time).
2. **prepare**: load the artefact and start its batcher beside the served model; re-embed every
   tenant's stored images that lack its embedding (stored next to the old model's: an index is
   only ever built from one version's embeddings). Requests, writes included, keep being served
   by the old model; the heartbeat in the registry says the activation is alive; progress is on
   ``GET /v1/model``, ``GET /v1/models`` and ``tcm_model_activation_*``.
3. **switch**: with gallery writes held back for a moment (``SwitchGate``), catch up on items
   enrolled meanwhile, build the new indexes from the store, commit the registry (active =
   the new version) and swap the serving slot's ``Serving`` in one assignment. The old model
   finishes the requests it started (``model_retire_grace_s``), then stops. The monitor resets
   to the new artefact's baseline.
4. **retention**: embeddings of versions no longer among the last ``model_retain_versions``
   active ones are dropped.

Rollback is the same activation back to the version active before (its embeddings are kept, so
only items enrolled since need embedding; the answers are those it gave before).

Other replicas poll the registry (``model_poll_s``): when the active version is not theirs they
build it and switch the same way (the embeddings are already in the store). An activation whose
heartbeat stops (its process died) is taken over by any replica, the restarted one included,
after three heartbeats: it resumes where the embeddings stop, or, when the version cannot be
loaded any more, is abandoned with the old model still active. No index ever mixes versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from service.domain import model_registry as reg
from service.domain.index_sync import IndexSync
from service.domain.model_registry import ModelRegistry
from service.domain.serving import Serving, ServingSlot, build_serving
from service.engine.decoding import DecodePool
from service.engine.faces import load_served_model
from service.errors import ConflictError, InvalidInputError, StoreUnavailableError
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import Store
from tcm import read_manifest

log = logging.getLogger(__name__)


def startup_model(store: Store, settings: Settings) -> Path:
    """Which artefact a starting replica serves: the registry's active version.

    Starting a process never changes which model the fleet serves; only an activation
    (``tcm-serve models activate``, ``POST /v1/models/{version}/activate``) or a rollback does.
    The configured artefact (``TCM_ARTEFACT_PATH``) becomes active only on a store whose
    registry has no active version yet (the first start); otherwise a configured version the
    registry does not know is staged (registered) for an activation to pick, and one that
    cannot be staged (its version names other weights) is logged and left out. When the store
    cannot be read the configured artefact is served and the lifecycle's watcher follows the
    registry once the store is back."""
    configured = settings.artefact_path
    manifest = read_manifest(configured)
    version = manifest.model_version
    registry = ModelRegistry(store)
    now = time.time()
    try:
        doc = registry.read()
        if doc["active"] is None:

            def first_start(d: reg.Doc) -> reg.Doc:
                if d["active"] is not None:  # another replica's first start won the race
                    return d
                d = reg.commit(
                    reg.register(d, manifest, configured, now=now), version, kind="startup", now=now
                )
                d["configured"] = version
                return d

            doc = registry.update(first_start)
        elif version not in doc["versions"]:
            try:
                doc = registry.update(lambda d: reg.register(d, manifest, configured, now=now))
            except ConflictError as exc:
                log.error("the configured artefact %s is not staged: %s", configured, exc.message)
        if doc["active"] != version:
            log.warning(
                "the configured artefact %s (%s) is not the active model: serving %s, "
                "the registry's active version; to switch every replica to it: "
                "tcm-serve models activate %s",
                configured,
                version,
                doc["active"],
                version,
            )
    except StoreUnavailableError as exc:
        log.warning(
            "model registry unreadable at start-up, serving %s: %s", configured, exc.message
        )
        return configured
    return Path(doc["versions"][doc["active"]]["path"])


@dataclass
class Progress:
    """One activation as this replica runs it (JSON-able with :meth:`as_dict`)."""

    version: str
    from_version: str | None
    kind: str
    state: str = "loading"  # loading | embedding | switching | done | failed
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    tenants_total: int = 0
    tenants_done: int = 0
    items_total: int = 0
    items_embedded: int = 0
    items_skipped: int = 0
    skipped_by_tenant: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["from"] = d.pop("from_version")
        return d


class ModelLifecycle:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        slot: ServingSlot,
        sync: IndexSync,
        metrics: ServiceMetrics,
        device: torch.device,
        decoding: DecodePool | None = None,
    ) -> None:
        self.settings = settings
        self.decoding = decoding
        self.store = store
        self.slot = slot
        self.sync = sync
        self.metrics = metrics
        self.device = device
        self.registry = ModelRegistry(store)
        self.owner = uuid.uuid4().hex[:12]
        self.progress: Progress | None = None  # the latest activation run here
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.switch_listeners: list[Any] = []  # called with the new Serving after a switch

    # --- admin operations -------------------------------------------------------------------
    async def stage(self, path: str) -> tuple[str, reg.Doc]:
        """Registers the artefact at ``path`` (loaded once here to prove it is usable);
        returns its version and the registry as written."""
        p = Path(path)
        try:
            _, manifest, _ = await run_in_threadpool(load_served_model, p, device="cpu")
        except (ValueError, OSError, RuntimeError) as exc:
            raise InvalidInputError(
                f"{path} is not a usable artefact: {exc}",
                code="invalid_artefact",
                detail={"path": path},
            ) from exc
        now = time.time()
        doc = await run_in_threadpool(
            self.registry.update, lambda d: reg.register(d, manifest, p, now=now)
        )
        return manifest.model_version, doc

    async def activate(self, version: str, *, kind: str = "activate") -> dict[str, Any]:
        """Starts switching to ``version`` in the background; returns the activation."""
        if self.busy:
            raise ConflictError(
                "this replica is already switching models; wait for it",
                code="activation_in_progress",
                detail={"activation": self.status()},
            )
        now = time.time()
        await run_in_threadpool(
            self.registry.update,
            lambda d: reg.begin(d, version, kind=kind, owner=self.owner, now=now),
        )
        self._run_in_background(version, kind=kind, commit=True)
        assert self.progress is not None
        return self.progress.as_dict()

    async def rollback(self) -> dict[str, Any]:
        doc = await run_in_threadpool(self.registry.read)
        target = reg.previous(doc)
        if target is None:
            raise ConflictError(
                "there is no previous model version to roll back to",
                code="no_previous_version",
                detail={"active": doc["active"]},
            )
        return await self.activate(target, kind="rollback")

    def status(self) -> dict[str, Any] | None:
        return None if self.progress is None else self.progress.as_dict()

    # --- the background ---------------------------------------------------------------------
    def start(self) -> None:
        """Starts the registry watcher (it also takes over an activation left running by a
        process that died, this one's predecessor included)."""
        self._watcher = asyncio.create_task(self._watch(), name="model-registry-watcher")

    async def close(self) -> None:
        for task in [self._watcher, self._task, *self._retiring]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._watcher = self._task = None

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def _run_in_background(self, version: str, *, kind: str, commit: bool) -> None:
        self.progress = Progress(
            version=version, kind=kind, from_version=self.slot.current.model_version
        )
        self._task = asyncio.create_task(
            self._run(version, kind=kind, commit=commit), name=f"activate-{version}"
        )

    async def _watch(self) -> None:
        """Follows the registry: switches to a version another replica activated, and takes
        over an activation whose owner stopped beating."""
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            try:
                if self.busy or not self.sync.loaded:
                    continue
                doc = await run_in_threadpool(self.registry.read)
                act = doc["activation"]
                if doc["active"] is not None and doc["active"] != self.slot.current.model_version:
                    log.info("the registry's active model is %s: switching to it", doc["active"])
                    self._run_in_background(doc["active"], kind="follow", commit=False)
                elif act is not None and act["state"] == "running" and self._stale(act):
                    await self._take_over(act)
            except asyncio.CancelledError:
                raise
            except StoreUnavailableError as exc:
                log.debug("model registry unreadable, retrying: %s", exc.message)
            except Exception:
                log.exception("watching the model registry failed; retrying")

    def _stale(self, act: dict[str, Any]) -> bool:
        return time.time() - float(act["heartbeat"]) > 3 * self.settings.model_heartbeat_s

    async def _take_over(self, act: dict[str, Any]) -> None:
        version, now = act["version"], time.time()

        def claim(d: reg.Doc) -> reg.Doc:
            cur = d["activation"]
            if cur is None or cur["version"] != version or cur["owner"] != act["owner"]:
                raise ConflictError("claimed by another replica", code="concurrent_update")
            d["activation"] = {**cur, "owner": self.owner, "heartbeat": now}
            return d

        try:
            await run_in_threadpool(self.registry.update, claim)
        except ConflictError:
            return
        log.warning(
            "resuming the activation of %s left by %s (its heartbeat stopped)",
            version,
            act["owner"],
        )
        self._run_in_background(version, kind=act["kind"], commit=True)

    async def _beat(self, version: str) -> None:
        now = time.time()

        def beat(d: reg.Doc) -> reg.Doc:
            cur = d["activation"]
            if cur is not None and cur["version"] == version and cur["owner"] == self.owner:
                d["activation"] = {**cur, "heartbeat": now}
            return d

        await run_in_threadpool(self.registry.update, beat)

    async def _run(self, version: str, *, kind: str, commit: bool) -> None:
        progress = self.progress
        assert progress is not None
        metrics = self.metrics
        metrics.model_activation_running.set(1)
        new: Serving | None = None
        try:
            doc = await run_in_threadpool(self.registry.read)
            record = doc["versions"].get(version)
            if record is None:
                raise ValueError(f"model version {version} is not registered")
            new = await build_serving(
                self.settings,
                Path(record["path"]),
                device=self.device,
                store=self.store,
                metrics=metrics,
                decoding=self.decoding,
            )
            if new.model_version != version:
                raise ValueError(f"{record['path']} now holds {new.model_version}, not {version}")
            await self._prepare(new, progress, beat=commit)
            progress.state = "switching"
            await self._switch(new, progress, commit=commit)
            new = None  # it is the served one now
            progress.state, progress.finished_at = "done", time.time()
            metrics.model_activations.labels(result="completed").inc()
            log.info(
                "switched to model %s (%s): %d items re-embedded, %d left out",
                version,
                kind,
                progress.items_embedded,
                progress.items_skipped,
            )
            await self._purge()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception(
                "activating model %s failed; %s stays active",
                version,
                self.slot.current.model_version,
            )
            progress.state, progress.error = "failed", f"{type(exc).__name__}: {exc}"
            progress.finished_at = time.time()
            metrics.model_activations.labels(result="failed").inc()
            if commit:
                with contextlib.suppress(Exception):
                    await run_in_threadpool(
                        self.registry.update,
                        lambda d: reg.abandon(d, version, error=progress.error or "failed"),
                    )
        finally:
            metrics.model_activation_running.set(0)
            if new is not None:
                await new.close()

    async def _prepare(self, new: Serving, progress: Progress, *, beat: bool) -> None:
        """Re-embeds, with the new model, every stored image lacking its embedding."""
        metrics = self.metrics
        tenants = await run_in_threadpool(self.store.list_tenants)
        progress.tenants_total = len(tenants)
        counts = [await run_in_threadpool(self.store.count_items, t.tenant_id) for t in tenants]
        progress.items_total = sum(counts)
        progress.state = "embedding"
        gauge = metrics.model_activation_items
        gauge.labels(state="total").set(progress.items_total)
        gauge.labels(state="embedded").set(0)
        gauge.labels(state="skipped").set(0)
        last_beat = time.monotonic()
        for tenant in tenants:
            tid = tenant.tenant_id

            def on_progress(embedded: int, skipped: int, tid: str = tid) -> None:
                progress.items_embedded += embedded
                progress.items_skipped += skipped
                if skipped:
                    progress.skipped_by_tenant[tid] = (
                        progress.skipped_by_tenant.get(tid, 0) + skipped
                    )
                gauge.labels(state="embedded").set(progress.items_embedded)
                gauge.labels(state="skipped").set(progress.items_skipped)

            await self.sync.backfill(new, tid, on_progress)
            progress.tenants_done += 1
            if beat and time.monotonic() - last_beat > self.settings.model_heartbeat_s:
                await self._beat(new.model_version)
                last_beat = time.monotonic()
        if beat:
            await self._beat(new.model_version)

    async def _switch(self, new: Serving, progress: Progress, *, commit: bool) -> None:
        # gate -> stop follower -> rebuild -> registry commit -> swap (+ publish) -> follower
        async with self.slot.gate.exclusive():
            await self.sync.stop_follower()
            skipped = await self.sync.rebuild_all(new)  # catches up on writes made meanwhile
            if commit:
                now = time.time()
                await run_in_threadpool(
                    self.registry.update,
                    lambda d: reg.commit(
                        d, new.model_version, kind=progress.kind, now=now, skipped=skipped
                    ),
                )
            old = self.slot.swap(new)
        self.sync.start_follower()
        progress.skipped_by_tenant = skipped
        progress.items_skipped = sum(skipped.values())
        self.metrics.model_activation_items.labels(state="skipped").set(progress.items_skipped)
        for listener in self.switch_listeners:
            try:
                listener(new)
            except Exception:
                log.exception("a model switch listener failed")
        task = asyncio.create_task(self._retire(old), name=f"retire-{old.model_version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: Serving) -> None:
        """The old model finishes the requests it started, then stops."""
        try:
            await asyncio.sleep(self.settings.model_retire_grace_s)
        finally:
            await old.close()

    async def _purge(self) -> None:
        """Drops the embeddings of versions retention no longer keeps."""
        keep = self.settings.model_retain_versions
        doc = await run_in_threadpool(self.registry.read)
        for version in reg.to_purge(doc, keep):
            removed = await run_in_threadpool(self.store.delete_embeddings, version)

            def mark(d: reg.Doc, v: str = version) -> reg.Doc:
                if v not in reg.retained(d, keep) and v not in d["purged"]:
                    d["purged"].append(v)
                return d

            await run_in_threadpool(self.registry.update, mark)
            log.info("retention: dropped %d embeddings of model %s", removed, version)
