"""Image files decoded and staged in worker processes (issue 32).

A request's images are decoded (PIL, shrunk while decoding towards the model's size) and
staged (``tcm.preprocess.stage_image``: resized as training resized them, or left uint8 at the
model's size) by a pool of worker processes, so that this per-image CPU work runs on every
core in parallel instead of under the server process's GIL; the server only stacks the staged
images of a batch and hands them to the device (``service.engine.embedding``). The workers
return exactly what the request's own thread would have computed (same functions, same
inputs), so embeddings do not change with the setting (``tests/service/engine/
test_decoding.py``).

What it costs: each worker is a spawned interpreter with torch imported (244 MiB resident each
on the 2-core VM, ``bench/bench_batcher.py``). Spawned workers import the server's main module
as ``__mp_main__``: ``tcm-serve`` and uvicorn guard theirs; a script embedding the service must
keep its start-up under ``if __name__ == "__main__":``. It pays where the forward outruns the CPU's
decoding (a GPU); on a CPU-only machine the forward binds and the request's thread decodes
(``TCM_DECODE_PROCESSES``: -1 picks processes on CUDA only).

A worker that dies (killed for memory, a decoder that crashed) breaks the pool: it is rebuilt
and the request's images are sent again once; a second break answers 503, so that no image
can take the server process down with it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import torch

from service.engine.cores import cores_but_one
from service.engine.preparing import PixelPreparer, decode_for
from service.errors import InvalidInputError, NotReadyError
from tcm import Preprocessing

log = logging.getLogger(__name__)

# ("ok", staged, None, None) or ("error", message, code, detail)
Outcome = tuple[str, Any, Any, Any]


_SLOTS: shared_memory.SharedMemory | None = None  # in a worker: the pool's result slots


def _start_worker(slots_name: str) -> None:
    """In each worker (this module's imports, torch's among them, are paid as it starts): one
    torch thread (the pool is the parallelism) and the result slots attached."""
    global _SLOTS
    torch.set_num_threads(1)
    _SLOTS = shared_memory.SharedMemory(name=slots_name)


def _ping() -> int:
    return os.getpid()


def decode_and_stage(raw: bytes, where: str, spec: Preprocessing, max_pixels: int) -> Outcome:
    """One image file -> ("ok", its staged pixels) or ("error", message, code, detail), by the
    request's thread's own two steps (``decode_for``, ``PixelPreparer.stage``); errors travel
    as plain values (an exception with keyword arguments does not survive pickling)."""
    preparer = PixelPreparer(spec)
    try:
        arr = decode_for(preparer, raw, max_pixels=max_pixels, where=where)
        return ("ok", preparer.stage([arr], [where])[0][0], None, None)
    except InvalidInputError as exc:
        return ("error", exc.message, exc.code, exc.detail)
    except ValueError as exc:
        return ("error", f"cannot preprocess the image: {exc}", "invalid_input", None)


def _stage_chunk(
    jobs: list[tuple[bytes, str, Preprocessing, int, int]], size: int
) -> list[Outcome]:
    """In a worker: :func:`decode_and_stage` for each (raw, where, spec, max_pixels, offset),
    its pixels written to the result slot at ``offset`` (``size`` bytes) instead of pickled
    back through a pipe: ("slot", dtype, shape, None). A result larger than the slot (a model
    with a larger input than the pool was sized for) travels pickled."""
    out: list[Outcome] = []
    for raw, where, spec, max_pixels, offset in jobs:
        kind, value, code, detail = decode_and_stage(raw, where, spec, max_pixels)
        if kind != "ok" or _SLOTS is None or value.nbytes > size:
            out.append((kind, value, code, detail))
            continue
        flat = value.reshape(-1).view(np.uint8)
        np.frombuffer(_SLOTS.buf, np.uint8, value.nbytes, offset)[:] = flat
        out.append(("slot", value.dtype.str, value.shape, None))
    return out


@dataclass
class _Item:
    raw: bytes
    where: str
    spec: Preprocessing
    max_pixels: int
    future: asyncio.Future[Outcome]


class DecodePool:
    """``processes`` spawned workers that decode and stage image files.

    Images wait in one queue; a dispatcher task sends them to the workers in chunks (up to
    ``CHUNK`` images, fewer while the queue is short, so a lone image is not delayed) with at
    most two chunks per worker in flight. One chunk pays the inter-process hops (submission,
    wake-ups, the result) once for all its images; the pixels come back through shared-memory
    slots, one per image in flight.
    """

    CHUNK = 8

    def __init__(self, processes: int, *, slot_bytes: int = 3 * 224 * 224 * 4) -> None:
        """``slot_bytes``: the largest staged image passed back through shared memory (float32
        pixels of the served model's input; larger ones travel pickled)."""
        if processes < 1:
            raise ValueError("a decoding pool needs at least one process")
        self.processes = processes
        self.slot_bytes = slot_bytes
        self.max_in_flight = 2 * processes  # chunks: one running and one queued per worker
        self.slots = self.max_in_flight * self.CHUNK
        self._shm = shared_memory.SharedMemory(create=True, size=self.slots * slot_bytes)
        self._free = list(range(self.slots))
        self._pending: deque[_Item] = deque()
        self._in_flight = 0
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        self._pool = self._new_pool()
        self.rebuilt = 0
        self.chunks_sent = 0

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server has threads (torch, the event loop's pool) a fork would copy
        return ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self._shm.name,),
        )

    def warm(self) -> list[int]:
        """Starts every worker now, not on the first requests, and waits for a task to run;
        their pids. A spawning pool otherwise starts a worker per submission that finds none
        idle, which depends on timing; CPython's own launcher (what it uses under fork) starts
        them all, and is called while the pool is fresh."""
        launch = getattr(self._pool, "_launch_processes", None)
        if launch is not None and self._pool._executor_manager_thread is None:
            launch()
        for f in [self._pool.submit(_ping) for _ in range(self.processes)]:
            f.result()
        return self.pids()

    def pids(self) -> list[int]:
        return sorted(p.pid for p in list(self._pool._processes.values()) if p.pid)

    def _rebuild(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:  # another request may have rebuilt it already
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                self.rebuilt += 1
                log.error("a decoding worker died; the pool of %d was rebuilt", self.processes)

    async def stage(
        self, raws: Sequence[tuple[str, bytes]], spec: Preprocessing, *, max_pixels: int
    ) -> list[np.ndarray]:
        """(where, image bytes) pairs -> their staged pixels, in order. InvalidInputError for
        the first image that is not a readable image (as the request's thread would raise it),
        NotReadyError when the workers died twice on these images."""
        for attempt in range(2):
            pool = self._pool
            outcomes = await asyncio.gather(
                *(self._queue(raw, where, spec, max_pixels) for where, raw in raws),
                return_exceptions=True,
            )
            broken = [o for o in outcomes if isinstance(o, BrokenProcessPool)]
            if broken:
                self._rebuild(pool)
                if attempt == 0:
                    continue
                raise NotReadyError(
                    "the image decoding workers stopped twice on this request; retry later, "
                    "and report the images if it happens again"
                ) from None
            staged = []
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
                kind, value, code, detail = outcome
                if kind == "error":
                    raise InvalidInputError(value, code=code, detail=detail)
                staged.append(value)
            return staged
        raise AssertionError("unreachable")

    def _queue(
        self, raw: bytes, where: str, spec: Preprocessing, max_pixels: int
    ) -> asyncio.Future[Outcome]:
        loop = asyncio.get_running_loop()
        if self._dispatcher is None or self._dispatcher.get_loop() is not loop:
            self._wake = asyncio.Event()  # both belong to the running event loop
            self._dispatcher = loop.create_task(self._dispatch(), name="decode-dispatcher")
        item = _Item(raw, where, spec, max_pixels, loop.create_future())
        self._pending.append(item)
        assert self._wake is not None
        self._wake.set()
        return item.future

    async def _dispatch(self) -> None:
        wake = self._wake
        assert wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await wake.wait()
            wake.clear()
            while self._pending and self._in_flight < self.max_in_flight and self._free:
                # share what waits between the workers; a short queue goes out one by one
                share = -(-len(self._pending) // self.processes)
                n = min(self.CHUNK, share, len(self._free))
                items = [self._pending.popleft() for _ in range(n)]
                items = [i for i in items if not i.future.done()]  # the request went away
                if not items:
                    continue
                slots = [self._free.pop() for _ in items]
                jobs = [
                    (i.raw, i.where, i.spec, i.max_pixels, slot * self.slot_bytes)
                    for i, slot in zip(items, slots, strict=True)
                ]
                self._in_flight += 1
                self.chunks_sent += 1
                try:
                    chunk = loop.run_in_executor(self._pool, _stage_chunk, jobs, self.slot_bytes)
                except BrokenProcessPool as exc:
                    self._finish(items, slots, exc)
                    continue
                except RuntimeError:  # the pool was shut down (closed): no request may hang
                    self._finish(items, slots, NotReadyError("image decoding has stopped"))
                    continue
                chunk.add_done_callback(functools.partial(self._chunk_done, items, slots))

    def _chunk_done(
        self, items: list[_Item], slots: list[int], chunk: asyncio.Future[list[Outcome]]
    ) -> None:
        if chunk.cancelled():
            self._finish(items, slots, NotReadyError("the image decoding workers stopped"))
        elif (exc := chunk.exception()) is not None:
            self._finish(items, slots, exc)
        else:
            self._finish(items, slots, chunk.result())

    def _finish(
        self, items: list[_Item], slots: list[int], result: list[Outcome] | BaseException
    ) -> None:
        """Hands each item its outcome (its pixels copied out of its slot), frees the slots."""
        for n, (item, slot) in enumerate(zip(items, slots, strict=True)):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
                continue
            out = result[n]
            if out[0] == "slot":
                dtype, shape = np.dtype(out[1]), out[2]
                offset = slot * self.slot_bytes
                view = np.frombuffer(self._shm.buf, dtype, math.prod(shape), offset)
                out = ("ok", view.reshape(shape).copy(), None, None)
            item.future.set_result(out)
        self._free.extend(slots)
        self._in_flight -= 1
        if self._wake is not None:
            self._wake.set()

    def close(self) -> None:
        task = self._dispatcher
        if task is not None and not task.done() and not task.get_loop().is_closed():
            task.get_loop().call_soon_threadsafe(task.cancel)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._shm.close()
        self._shm.unlink()


AUTO_MAX = 8  # -1 never starts more: a container may see the host's cores, not its CPU quota


def decode_processes_for(setting: int, device_type: str) -> int:
    """``TCM_DECODE_PROCESSES``: -1 (auto) = on a CUDA device, one per core this process may
    run on but one (the server's own: its per-image work is what the workers' rate is read
    against), at least 1 and at most ``AUTO_MAX``; none on a CPU."""
    if setting >= 0:
        return setting
    if device_type != "cuda":
        return 0
    return min(AUTO_MAX, cores_but_one())
