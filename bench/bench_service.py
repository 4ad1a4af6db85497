"""Service throughput and latency: does the dynamic batcher pay off under concurrency?

Runs the real app under uvicorn in this process, and N concurrent HTTP clients (httpx) sending
single-image ``/v1/embed`` and ``/v1/match`` requests for a fixed time, once with batching
(``--max-batch``, ``--max-wait-ms``) and once with batching off (max batch 1). Prints what it ran
and measured: requests/s, latency p50/p95/p99, and the mean forward-pass batch size.

    python -m bench.bench_service                      # a random small CNN (28x28, dim 128)
    python -m bench.bench_service --artefact artefacts/default --concurrency 1 8 32

Without ``--artefact`` the model is untrained: timings are real, decisions are meaningless.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tcm import Baseline, Calibration, Manifest, Preprocessing, build_embedder, save_artefact

ADMIN = "bench-admin-token-0123456789"


def random_artefact(directory: Path, dim: int = 128) -> Path:
    """A small CNN with random weights: benchmarks of the service need a model, not a good one."""
    torch.manual_seed(0)
    model = build_embedder("small_cnn", in_channels=1, embedding_dim=dim, width=64)
    save_artefact(
        directory,
        model,
        Manifest(
            model_version="bench-random",
            architecture="small_cnn",
            architecture_kwargs={"in_channels": 1, "embedding_dim": dim, "width": 64},
            preprocessing=Preprocessing(image_size=(28, 28)),
            embedding_dim=dim,
            calibration=Calibration(
                tau=0.5, target_far=0.01, far_at_tau=0.01, frr_at_tau=0.1, tau_lo=0.4, tau_hi=0.6
            ),
            baseline=Baseline(
                opis=0.0,
                eps_opis=0.0,
                eps=0.05,
                recall_at_1=0.0,
                map_at_r=0.0,
                num_classes=0,
                num_images=0,
            ),
        ),
    )
    return directory


def png_b64(seed: int, size: int = 28) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.app = create_app(settings)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def load(
    base: str, route: str, concurrency: int, seconds: float, auth: dict[str, str]
) -> list[float]:
    images = [png_b64(i) for i in range(64)]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(worker: int) -> None:
        async with httpx.AsyncClient(base_url=base, headers=auth, timeout=30) as c:
            i = worker
            while time.perf_counter() < deadline:
                body = (
                    {"images": [images[i % 64]]}
                    if route == "/v1/embed"
                    else {"image": images[i % 64], "k": 5}
                )
                t0 = time.perf_counter()
                r = await c.post(route, json=body)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                i += concurrency

    await asyncio.gather(*(client(w) for w in range(concurrency)))
    return latencies


def run(args: argparse.Namespace, artefact: Path, store_dir: Path) -> list[dict[str, object]]:
    print(
        f"# bench_service: {platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()}, {args.seconds:.0f}s per cell, "
        f"single-image requests, artefact {artefact}"
    )
    print(
        f"{'route':<10} {'batching':<18} {'clients':>7} {'req/s':>8} {'p50 ms':>8} "
        f"{'p95 ms':>8} {'p99 ms':>8} {'mean batch':>10}"
    )
    rows: list[dict[str, object]] = []
    for batching in (True, False):
        max_batch = args.max_batch if batching else 1
        settings = Settings(
            artefact_path=artefact,
            store_url=f"sqlite:///{store_dir / f'b{max_batch}.db'}",
            admin_token=ADMIN,
            device=args.device,
            embed_max_batch=max_batch,
            embed_max_wait_ms=args.max_wait_ms if batching else 0.0,
        )
        with Server(settings) as srv:
            base = f"http://127.0.0.1:{srv.port}"
            key = httpx.post(
                f"{base}/v1/tenants",
                json={"name": "bench"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            ).json()["api_key"]
            auth = {"Authorization": f"Bearer {key}"}
            items = [
                {"subject": f"s{i % 100}", "image": png_b64(1000 + i)} for i in range(args.gallery)
            ]
            for i in range(0, len(items), 200):
                httpx.post(
                    f"{base}/v1/gallery",
                    json={"items": items[i : i + 200]},
                    headers=auth,
                    timeout=120,
                ).raise_for_status()
            batcher = srv.app.state.runtime.serving.batcher
            for route in ("/v1/embed", "/v1/match"):
                for n in args.concurrency:
                    before = (batcher.images_embedded, batcher.batches_run)
                    lat = asyncio.run(load(base, route, n, args.seconds, auth))
                    images = batcher.images_embedded - before[0]
                    passes = max(1, batcher.batches_run - before[1])
                    ms = np.percentile(np.asarray(lat) * 1e3, [50, 95, 99])
                    label = f"{max_batch}/{args.max_wait_ms:g}ms" if batching else "off"
                    print(
                        f"{route:<10} {label:<18} {n:>7} {len(lat) / args.seconds:>8.1f} "
                        f"{ms[0]:>8.1f} {ms[1]:>8.1f} {ms[2]:>8.1f} {images / passes:>10.2f}"
                    )
                    rows.append(
                        {
                            "route": route,
                            "batching": label,
                            "clients": n,
                            "req_per_s": len(lat) / args.seconds,
                            "p50_ms": ms[0],
                            "p95_ms": ms[1],
                            "p99_ms": ms[2],
                            "mean_batch": images / passes,
                        }
                    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artefact", type=Path, default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--gallery", type=int, default=1000, help="items enrolled before /v1/match")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        artefact = args.artefact or random_artefact(Path(tmp) / "artefact")
        rows = run(args, artefact, Path(tmp))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
