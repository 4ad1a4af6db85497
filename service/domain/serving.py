"""One served model and everything tied to it: weights, batcher, input resolver, matcher and the
per-tenant indexes of its embeddings.

A :class:`Serving` is built whole (:func:`build_serving`) and never changed model-wise; a model
switch builds a new one beside it and swaps it into the :class:`ServingSlot` in one assignment.
A request takes the slot's current ``Serving`` once, at its start, and uses only that object, so
it is answered by one model from start to end, and one index only ever holds one model version's
embeddings.

:class:`SwitchGate` orders gallery writes against a switch: writes share the gate, the switch's
final step (catch-up, build the new indexes, swap) takes it alone, so no write can land in the
old model's indexes after the new ones were built from the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from starlette.concurrency import run_in_threadpool
from torch import nn

from service.domain.inputs import InputResolver
from service.domain.matching import Matcher
from service.engine.cpu_forward import RUNTIMES, optimised_for_cpu
from service.engine.decoding import DecodePool
from service.engine.embedding import EmbeddingBatcher
from service.engine.faces import load_served_model
from service.engine.index import IndexRegistry
from service.engine.search import SearchBatcher, search_lanes
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import Store
from tcm import Manifest, load_cohort, load_openset
from tcm.asnorm import Cohort


@dataclass
class Serving:
    manifest: Manifest
    model: nn.Module
    device: torch.device
    path: Path
    batcher: EmbeddingBatcher
    resolver: InputResolver
    indexes: IndexRegistry
    matcher: Matcher
    cohort: Cohort | None = None  # AS-norm: decisions use normalised scores (tcm.asnorm)

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def threshold(self) -> float:
        return float(self.manifest.calibration.tau)

    async def close(self) -> None:
        await self.batcher.stop()
        self.matcher.search.close()
        self.indexes.clear()


async def build_serving(
    settings: Settings,
    path: Path,
    *,
    device: torch.device,
    store: Store,
    metrics: ServiceMetrics,
    decoding: DecodePool | None = None,
) -> Serving:
    """Loads the artefact at ``path`` and starts its batcher; the indexes start empty.
    ``decoding``: the replica's decoding processes (owned by the runtime, shared by models)."""
    model, manifest, preparer = await run_in_threadpool(load_served_model, path, device=device)
    cohort = await run_in_threadpool(load_cohort, path, manifest)
    indexes = IndexRegistry(
        manifest.embedding_dim,
        settings.index_factory,
        device=str(device.type),
        search_params=settings.index_search_params,
        threads=settings.index_threads,
        cohort=cohort,
    )
    forward = model
    if settings.cpu_traced_forward and device.type == "cpu" and manifest.face is None:
        pre = manifest.preprocessing
        shape = (pre.channels, *pre.image_size)
        runtimes = RUNTIMES if settings.cpu_onnxruntime else ("torchscript",)
        forward = await run_in_threadpool(optimised_for_cpu, model, shape, runtimes)
    batcher = EmbeddingBatcher(
        forward,
        preparer,
        device=device,
        max_batch=settings.embed_max_batch,
        max_wait_s=settings.embed_max_wait_ms / 1e3,
        metrics=metrics,
    )
    resolver = InputResolver(
        batcher=batcher,
        store=store,
        dim=manifest.embedding_dim,
        max_image_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels,
        model_version=manifest.model_version,
        decoding=decoding,
    )
    matcher = Matcher(
        store=store,
        indexes=indexes,
        resolver=resolver,
        metrics=metrics,
        threshold=manifest.calibration.tau,
        model_version=manifest.model_version,
        max_k=settings.max_k,
        max_verify_pairs=settings.max_verify_pairs,
        cohort=cohort,
        search=SearchBatcher(
            indexes,
            max_batch=settings.search_max_batch,
            max_wait_s=settings.search_max_wait_ms / 1e3,
            lanes=search_lanes(settings.search_lanes, indexes),
        ),
    )
    await batcher.start()
    return Serving(
        manifest=manifest,
        model=model,
        device=device,
        path=Path(path),
        batcher=batcher,
        resolver=resolver,
        indexes=indexes,
        matcher=matcher,
        cohort=cohort,
    )


class ServingSlot:
    """The model this replica serves now, and the gate that orders gallery writes against a
    switch to another. A request takes ``current`` once, at its start, and keeps it; a switch
    (``service.runtime.lifecycle``) holds the gate alone while it calls :meth:`swap`."""

    def __init__(self, serving: Serving, metrics: ServiceMetrics) -> None:
        self.current = serving
        self.gate = SwitchGate()
        self._metrics = metrics
        self.publish()

    def swap(self, new: Serving) -> Serving:
        """Serves ``new`` from now on (call with the gate held exclusively); returns the old
        one, which finishes the requests it started."""
        old, self.current = self.current, new
        self.publish()
        return old

    def publish(self) -> None:
        """The served model's info and threshold on /metrics."""
        m = self.current.manifest
        self._metrics.model.info(
            {
                "model_version": m.model_version,
                "architecture": m.architecture,
                "embedding_dim": str(m.embedding_dim),
                "device": str(self.current.device),
            }
        )
        self._metrics.threshold.set(m.calibration.tau)
        # the open-set tails are cosine scores: they say nothing about an as-norm tau
        tails = load_openset(self.current.path, m) if m.threshold_units == "cosine" else None
        self._metrics.set_openset(tails, m.calibration.tau)


class SwitchGate:
    """An asyncio read-write gate: many ``shared()`` holders (gallery writes) or one
    ``exclusive()`` holder (a model switch), the switch preferred once it waits."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            try:
                await self._cond.wait_for(lambda: self._shared == 0)
            except BaseException:
                self._exclusive = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()
