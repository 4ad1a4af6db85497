"""The embedding batcher's own ceiling, and image decoding in worker processes (issue 32).

    .venv/bin/python -m bench.bench_batcher [--seconds 4] [--jpegs 256] [--processes 2]
        [--json out.json]

Part 1, the ceiling: clients each embed one decoded 224 x 224 RGB uint8 image at a time through
the service's ``EmbeddingBatcher`` with a model that does nothing, three ways side by side:
``queued`` (the image is already staged, so it joins the queue from the event loop, and the
device stage only stacks the batch's uint8 pixels: the batcher's own ceiling, what it can hand a
GPU), ``thread hop`` (the same, but each request hops through a worker thread first, as a
request whose images need staging does) and ``+ normalisation on the device`` (the real device
stage, here on this CPU: uint8 -> float, scaled and normalised; ``bench.gpu_proof`` runs the
same on a GPU).

Part 2, decoding: real 227 x 227 CUB JPEGs (``../shared/data``; random-noise JPEGs when the data
is absent, said in the output) decoded and staged (resized to 224 x 224 as training did) by
``--processes`` worker processes (``service.engine.decoding``). The baseline is the workers
alone: the pool maps the worker function over the files and sends nothing back (the best of
chunk sizes 1 and 16), the strictest reading of "what the same worker processes reach outside
the service"; the pool's own transfer into this process from a plain loop is printed too.
``service`` sends one image per request through the service's input path (base64, header
check, the pool's dispatcher and shared-memory slots, the batcher with the do-nothing device
stage), 64 requests in flight; ``threads`` is the same path decoding in the request's thread
(``TCM_DECODE_PROCESSES=0``, the default on a CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import time
import zipfile
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.soak import rss_kib
from service.domain.inputs import InputResolver
from service.engine.decoding import DecodePool, decode_and_stage
from service.engine.embedding import EmbeddingBatcher
from service.engine.preparing import PixelPreparer
from tcm import Preprocessing

ROOT = Path(__file__).resolve().parents[1]
SPEC = Preprocessing(
    image_size=(224, 224), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
MAX_PIXELS = 40_000_000


class DoNothing(torch.nn.Module):
    """A model that costs nothing: what is measured is everything around it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)[:, :8].float() + 1.0


class StackOnly(PixelPreparer):
    """The device stage cut to handing the batch over: the staged pixels stacked once and moved
    to the device, no conversion (what a GPU's own kernels would then do)."""

    def to_device(self, staged: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.stack(staged)).to(device)


async def drive(
    batcher: EmbeddingBatcher,
    request: Callable[[int], Awaitable[object]],
    *,
    clients: int,
    seconds: float,
) -> dict[str, float]:
    """``clients`` tasks each awaiting ``request(i)`` in a loop for ``seconds``: images/s (one
    image per request) and the mean forward batch."""
    await request(0)  # warm-up
    stop = time.perf_counter() + seconds
    batches, images = batcher.batches_run, batcher.images_embedded

    async def client(i: int) -> None:
        while time.perf_counter() < stop:
            await request(i)
            i += clients

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    n = batcher.images_embedded - images
    return {
        "clients": clients,
        "images_per_s": n / elapsed,
        "mean_batch": n / max(batcher.batches_run - batches, 1),
    }


def _batcher(preparer: PixelPreparer, max_batch: int, device: str = "cpu") -> EmbeddingBatcher:
    return EmbeddingBatcher(
        DoNothing(), preparer, device=torch.device(device), max_batch=max_batch, max_wait_s=0.002
    )


async def ceiling(
    clients: int, max_batch: int, seconds: float, *, device: str = "cpu"
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(64)]
    rows: dict[str, Any] = {}
    ways: dict[str, tuple[PixelPreparer, bool]] = {
        "queued": (StackOnly(SPEC), False),
        "thread hop": (StackOnly(SPEC), True),
        "+ normalisation on the device": (PixelPreparer(SPEC), False),
    }
    for name, (preparer, hop) in ways.items():
        batcher = _batcher(preparer, max_batch, device)
        await batcher.start()

        async def request(i: int, batcher: EmbeddingBatcher = batcher, hop: bool = hop) -> object:
            img = images[i % len(images)]
            if hop:
                return await batcher.embed_prepared(lambda: [img])
            return await batcher.embed([img])

        rows[name] = await drive(batcher, request, clients=clients, seconds=seconds)
        await batcher.stop()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"clients": clients, "max_batch": max_batch, "device": device, "ways": rows}


def cub_jpegs(n: int) -> tuple[list[bytes], str]:
    path = ROOT.parent / "shared" / "data" / "cub200_subset100" / "bird_dataset.zip"
    if path.exists():
        with zipfile.ZipFile(path) as z:
            names = sorted(x for x in z.namelist() if x.lower().endswith(".jpg"))[:n]
            return [z.read(x) for x in names], f"CUB photos ({path.name})"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (227, 227, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out, "random-noise JPEGs (no CUB data here)"


def staged_bytes(raw: bytes, where: str, spec: Preprocessing, max_pixels: int) -> int:
    """In a worker: one file decoded and staged, nothing sent back but its size (the workers'
    own rate, no result to move: the strictest baseline)."""
    kind, value, _, _ = decode_and_stage(raw, where, spec, max_pixels)
    return int(value.nbytes) if kind == "ok" else -1


def workers_alone(pool: ProcessPoolExecutor, jpegs: list[bytes], rounds: int) -> float:
    """The workers' own rate: files decoded and staged by the pool alone, nothing sent back
    (images/s, the best of chunk sizes 1 and 16 and of ``rounds``)."""
    best = 0.0
    for chunk in (1, 16):
        for _ in range(rounds):
            started = time.perf_counter()
            n = sum(
                1
                for _ in pool.map(
                    staged_bytes,
                    jpegs,
                    [f"images[{i}]" for i in range(len(jpegs))],
                    [SPEC] * len(jpegs),
                    [MAX_PIXELS] * len(jpegs),
                    chunksize=chunk,
                )
            )
            best = max(best, n / (time.perf_counter() - started))
    return best


def pool_alone(decoding: DecodePool, jpegs: list[bytes], rounds: int) -> float:
    """The same processes decoding and staging the files into this process (the pool's own
    transfer), driven by a plain loop, no service around it: images/s."""
    raws = [(f"images[{i}]", j) for i, j in enumerate(jpegs)]
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        n = len(asyncio.run(decoding.stage(raws, SPEC, max_pixels=MAX_PIXELS)))
        best = max(best, n / (time.perf_counter() - started))
    return best


async def through_service(
    jpegs: list[bytes], decoding: DecodePool | None, clients: int, seconds: float
) -> dict[str, float]:
    texts = [base64.b64encode(j).decode() for j in jpegs]
    batcher = _batcher(StackOnly(SPEC), 32)
    resolver = InputResolver(
        batcher=batcher,
        store=None,  # type: ignore[arg-type]  # only images() is used
        dim=8,
        max_image_pixels=MAX_PIXELS,
        model_version="bench",
        decoding=decoding,
    )
    await batcher.start()

    async def request(i: int) -> object:
        return await resolver.images([(f"images[{i}]", texts[i % len(texts)])])

    row = await drive(batcher, request, clients=clients, seconds=seconds)
    await batcher.stop()
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--jpegs", type=int, default=256)
    # one core left to the server process, as TCM_DECODE_PROCESSES=-1 leaves it on CUDA
    p.add_argument("--processes", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    result: dict[str, Any] = {
        "machine": f"{platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "load_average_at_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": {k: str(v) for k, v in vars(args).items()},
    }

    print("# 1. ceiling: 224x224 uint8 images already decoded, a do-nothing model, img/s")
    print(
        f"{'clients':>8} {'max_batch':>9} | "
        + " | ".join(f"{w:>22}" for w in ("queued", "thread hop", "+ normalisation on the device"))
    )
    runs = []
    for clients in args.clients:
        max_batch = 32 if clients <= 64 else 128
        run = asyncio.run(ceiling(clients, max_batch, args.seconds))
        runs.append(run)
        w = run["ways"]
        print(
            f"{clients:>8} {max_batch:>9} | "
            + " | ".join(
                f"{w[k]['images_per_s']:>10.0f} (batch {w[k]['mean_batch']:>5.1f})"
                for k in ("queued", "thread hop", "+ normalisation on the device")
            )
        )
    best = max(r["ways"]["queued"]["images_per_s"] for r in runs)
    hop = max(r["ways"]["thread hop"]["images_per_s"] for r in runs)
    print(
        f"ceiling (queued, best): {best:.0f} img/s; goal >= 8,000: {best >= 8000}; "
        f"x{best / hop:.1f} the thread-hop path measured beside it"
    )
    result["ceiling"] = {
        "runs": runs,
        "best_images_per_s": best,
        "goal": 8000,
        "goal_met": best >= 8000,
        "vs_thread_hop": best / hop,
    }

    jpegs, source = cub_jpegs(args.jpegs)
    sizes = sorted({(len(j)) for j in jpegs})
    print(
        f"\n# 2. decoding + resizing {len(jpegs)} {source}, "
        f"{sizes[0]}-{sizes[-1]} bytes, {args.processes} worker processes, img/s"
    )
    decoding = DecodePool(args.processes)
    pids = decoding.warm()
    rss = [rss_kib(pid) / 1024 for pid in pids]
    print(
        f"worker processes' resident memory after start: {', '.join(f'{r:.0f}' for r in rss)} MiB"
    )
    try:
        alone = workers_alone(decoding._pool, jpegs, args.rounds)
        base = pool_alone(decoding, jpegs * 2, args.rounds)
        served = max(
            asyncio.run(through_service(jpegs, decoding, 64, args.seconds))["images_per_s"]
            for _ in range(args.rounds)
        )
    finally:
        decoding.close()
    threads = max(
        asyncio.run(through_service(jpegs, None, 64, args.seconds))["images_per_s"]
        for _ in range(args.rounds)
    )
    print(f"the workers alone, nothing sent back       : {alone:8.0f}")
    print(f"the same pool into this process, no service: {base:8.0f}")
    print(
        f"through the service, processes             : {served:8.0f}  ({served / alone:.2f}x "
        f"the workers alone; goal >= 0.90: {served / alone >= 0.9})"
    )
    print(
        f"through the service, the request's threads : {threads:8.0f}  ({threads / alone:.2f}x "
        "the workers alone)"
    )
    result["decoding"] = {
        "source": source,
        "images": len(jpegs),
        "processes": args.processes,
        "worker_rss_mib_after_start": rss,
        "workers_alone": alone,
        "pool_into_process": base,
        "service_processes": served,
        "service_threads": threads,
        "ratio": served / alone,
        "threads_ratio": threads / alone,
        "goal": 0.9,
        "goal_met": served / alone >= 0.9,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
