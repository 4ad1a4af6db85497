"""The embedding model behind a dynamic batcher.

Concurrent requests put their staged images (``service.engine.preparing``: each image's own
work done, on the CPU) on one queue; a single worker task takes what is queued, waits at most
``max_wait`` for more until ``max_batch`` images are gathered, and runs one pass for all of them
in a worker thread: the batch's input made on the device (uint8 pixels stacked once, converted
and normalised there) and the forward. Under load, batches fill up while the previous pass
runs, so throughput grows with concurrency instead of requests queueing behind one another's
forward passes. The worker only waits while other requests are still being prepared (about to
join): a lone request is never delayed.

Nothing per image runs after a batch is formed, and images that are already staged (decoded at
the model's size) join the queue from the event loop without a thread hop: the batcher's own
ceiling is far above a GPU's forward rate (``bench/gpu_proof.py --only batcher_ceiling``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool
from torch import nn

from service.engine.preparing import Preparer
from service.errors import InvalidInputError, NotReadyError
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device(device)


@dataclass
class _Job:
    staged: list[np.ndarray]  # per image, what the preparer's ``stage`` gave (CPU)
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return len(self.staged)


class EmbeddingBatcher:
    def __init__(
        self,
        model: nn.Module,
        preparer: Preparer,
        *,
        device: torch.device,
        max_batch: int,
        max_wait_s: float,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        """``preparer`` (``service.engine.preparing``) turns decoded images into the model's
        input in the request's thread (a face model's detection and alignment included), so
        only the forward pass is batched."""
        self.model = model
        self.preparer = preparer
        self.device = device
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.batches_run = 0
        self.images_embedded = 0
        self.largest_batch = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: deque[_Job] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._preparing = 0  # requests being preprocessed, i.e. about to join the queue

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name="embedding-batcher")
        log.info(
            "embedding batcher on %s: max_batch=%d max_wait=%.1f ms",
            self.device,
            self.max_batch,
            self.max_wait_s * 1e3,
        )

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        pending = list(self._carry)
        self._carry.clear()
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(NotReadyError("the service is shutting down"))

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    # --- public ---------------------------------------------------------------------------
    async def embed(
        self, images: Sequence[np.ndarray], wheres: Sequence[str] | None = None
    ) -> np.ndarray:
        """Decoded uint8 images (``service.engine.preparing.decode_for``) -> float32 (n, d)
        L2-normalised embeddings. ``wheres`` names the images in errors. Images already at the
        model's input size are staged on the event loop (a check) and join the queue at once;
        others are staged in a worker thread."""
        if not images:
            raise InvalidInputError("no images given")
        if all(self.preparer.ready(img) for img in images):
            return await self.embed_from(self._staged_here(images, wheres))
        return await self.embed_prepared(lambda: self.preparer.stage(images, wheres)[0])

    async def _staged_here(
        self, images: Sequence[np.ndarray], wheres: Sequence[str] | None
    ) -> list[np.ndarray]:
        """Staged on the event loop: only for images ``ready`` says cost a check."""
        return self.preparer.stage(images, wheres)[0]

    async def embed_prepared(self, prepare: Callable[[], list[np.ndarray]]) -> np.ndarray:
        """Embeds what ``prepare`` (run in a worker thread) returns: staged images, e.g. built
        image by image as they are decoded, so that no more than one full-size image is held at
        a time."""
        return await self.embed_from(run_in_threadpool(prepare))

    async def embed_from(self, staging: Awaitable[list[np.ndarray]]) -> np.ndarray:
        """Embeds the staged images ``staging`` gives (a thread, or decoding processes); while
        it runs the request counts as about to join, so the worker waits for it."""
        self._preparing += 1
        try:
            try:
                staged = await staging
            except ValueError as exc:
                raise InvalidInputError(f"cannot preprocess the image: {exc}") from exc
            futures = self._enqueue(staged)
        finally:
            self._preparing -= 1
        return await self._gather(futures)

    async def embed_staged(self, staged: list[np.ndarray]) -> np.ndarray:
        """Staged images (the preparer's ``stage``, done elsewhere) -> embeddings."""
        if not staged:
            raise InvalidInputError("no images given")
        return await self._gather(self._enqueue(staged))

    def _enqueue(self, staged: list[np.ndarray]) -> list[asyncio.Future[np.ndarray]]:
        if self._queue is None or not self.running:
            raise NotReadyError("the embedding model is not running")
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(staged), self.max_batch):
            job = _Job(staged[start : start + self.max_batch], loop.create_future())
            futures.append(job.future)
            self._queue.put_nowait(job)
        return futures

    @staticmethod
    async def _gather(futures: list[asyncio.Future[np.ndarray]]) -> np.ndarray:
        if len(futures) == 1:
            return await futures[0]
        return np.concatenate(await asyncio.gather(*futures))

    # --- worker ----------------------------------------------------------------------------
    async def _next(self, timeout: float | None) -> _Job | None:
        assert self._queue is not None
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            assert first is not None
            jobs, size = [first], first.size
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                # wait only if someone is about to join; else take what is queued and go
                wait = deadline - loop.time() if self._preparing else 0.0
                job = await self._next(wait)
                if job is None:
                    break
                if size + job.size > self.max_batch:
                    self._carry.append(job)
                    break
                jobs.append(job)
                size += job.size
            jobs = [j for j in jobs if not j.future.done()]  # cancelled by disconnected clients
            if jobs:
                await self._forward_jobs(jobs)

    async def _forward_jobs(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        staged = jobs[0].staged if len(jobs) == 1 else [s for j in jobs for s in j.staged]
        try:
            out = await run_in_threadpool(self._forward, staged)
        except Exception as exc:
            log.exception("forward pass failed for a batch of %d images", len(staged))
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        n = len(staged)
        self.batches_run += 1
        self.images_embedded += n
        self.largest_batch = max(self.largest_batch, n)
        if self.metrics is not None:
            self.metrics.embed_batch_images.observe(n)
            self.metrics.embed_forward_seconds.observe(time.perf_counter() - started)
            self.metrics.embedded_images.inc(n)
            for j in jobs:
                self.metrics.embed_queue_wait_seconds.observe(started - j.enqueued)
        offset = 0
        for j in jobs:
            if not j.future.done():
                j.future.set_result(out[offset : offset + j.size])
            offset += j.size

    def _forward(self, staged: list[np.ndarray]) -> np.ndarray:
        """One batch: its input made on the device, the forward, L2-normalised rows."""
        with torch.inference_mode():
            out = self.model(self.preparer.to_device(staged, self.device))
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
