"""Throughput at scale, in one run: a real ``tcm-serve`` per store and dimension, galleries grown
to each size, with the in-process FAISS limit measured beside each row.

For each dimension (``--dims``) a random-weight model of that dimension is exported (only
embeddings are sent, the model is never run), and for each store (``--stores``: a fresh SQLite
file; a ``redis-server`` this script starts on a free port, append-only file with fsync every
second, removed afterwards) one ``tcm-serve`` runs while one tenant's gallery grows through
``--sizes``. At each size:

- **enrol items/s**: the items added since the previous size, sent as base64 float32 in batches
  of ``--enrol-batch`` by ``--enrol-clients`` threads;
- **match q/s** at each of ``--clients`` threads (``/v1/match`` by embedding, k=10, each client
  its own keep-alive connection, ``--seconds`` each), with p50/p99 latency;
- **RSS** of the server, and **cold start**: the server is stopped and started again on the same
  store; seconds until ``/readyz`` answers 200, and RSS after it;
- **in-process FAISS** on the same vectors: ``IndexFlatIP.add`` items/s, one query per
  ``search`` call (q/s), and all queries in one call (q/s).

Queries are random unit vectors (not gallery items), as in issue 20's measurement.

    nice -n 10 python -m bench.bench_scale --json docs/results/bench_scale.json
    python -m bench.bench_scale --sizes 10000 --dims 128 --stores sqlite --seconds 3  # smoke
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np

from bench.bench_service import random_artefact
from bench.soak import rss_kib, serve

K = 10


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(30)


def enrol(
    base: str, auth: dict[str, str], vectors: np.ndarray, first: int, *, batch: int, clients: int
) -> float:
    """Sends rows as items ``first..``; returns items/s."""

    def send(lo: int) -> None:
        hi = min(len(vectors), lo + batch)
        items = [
            {
                "subject": f"s{(first + r) // 4}",
                "item_id": f"i{first + r}",
                "embedding_b64": base64.b64encode(vectors[r].astype("<f4").tobytes()).decode(),
            }
            for r in range(lo, hi)
        ]
        body = json.dumps({"items": items}, separators=(",", ":"))
        r = client.post("/v1/gallery", content=body, headers={"Content-Type": "application/json"})
        if r.status_code != 201:
            raise RuntimeError(f"enrol failed: {r.status_code} {r.text[:300]}")

    started = time.perf_counter()
    with (
        httpx.Client(
            base_url=base, headers=auth, timeout=600, limits=httpx.Limits(max_connections=clients)
        ) as client,
        ThreadPoolExecutor(clients) as pool,
    ):
        list(pool.map(send, range(0, len(vectors), batch)))
    return len(vectors) / (time.perf_counter() - started)


def match_load(
    base: str, auth: dict[str, str], queries: np.ndarray, *, clients: int, seconds: float
) -> dict[str, float]:
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(w: int) -> None:
        mine: list[float] = []
        bad = 0
        with httpx.Client(base_url=base, headers=auth, timeout=120) as c:
            i = w
            while time.monotonic() < stop_at:
                body = {"embedding": queries[i % len(queries)].tolist(), "k": K}
                t = time.perf_counter()
                try:
                    ok = c.post("/v1/match", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                mine.append(time.perf_counter() - t)
                bad += not ok
                i += clients
        with lock:
            lat.extend(mine)
            errors[0] += bad

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    ms = np.asarray(lat) * 1e3
    return {
        "qps": len(lat) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests": len(lat),
        "errors": errors[0],
    }


def faiss_limits(vectors: np.ndarray, queries: np.ndarray, seconds: float) -> dict[str, float]:
    index = faiss.IndexFlatIP(vectors.shape[1])
    t = time.perf_counter()
    index.add(vectors)
    add_rate = len(vectors) / (time.perf_counter() - t)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        index.search(queries[n % len(queries)][None], K)
        n += 1
    one = n / (time.perf_counter() - t)
    batch = queries[:1000]
    rounds, t = 0, time.perf_counter()
    while rounds == 0 or time.perf_counter() - t < seconds:
        index.search(batch, K)
        rounds += 1
    batched = rounds * len(batch) / (time.perf_counter() - t)
    return {"add_items_per_s": add_rate, "one_query_per_call_qps": one, "batched_qps": batched}


def cold_start(
    artefact: Path, store_url: str, workdir: Path, prefix: str | None, env: dict[str, str]
) -> tuple[float, float]:
    started = time.perf_counter()
    with serve(
        artefact, store_url, workdir, redis_prefix=prefix, extra_env=env, start_timeout_s=1800
    ) as server:
        seconds = time.perf_counter() - started
        rss = rss_kib(server.pid) / 1024
    return seconds, rss


def run(args: argparse.Namespace) -> dict[str, Any]:
    faiss.omp_set_num_threads(args.faiss_threads)  # the in-process limit, as the service runs
    rows: list[dict[str, Any]] = []
    env = {
        "TCM_MONITOR_ENABLED": "false",
        "TCM_MAX_BODY_BYTES": str(256 * 1024 * 1024),
        "TCM_INDEX_THREADS": str(args.faiss_threads),
        # a 5,000-item MULTI/EXEC on a busy 2-core VM can take longer than the 2 s default
        "TCM_STORE_TIMEOUT_S": "30",
        "TCM_MAX_ENROL_ITEMS": str(args.enrol_batch),
    }
    sizes = sorted(args.sizes)
    for dim in args.dims:
        dim_sizes = [s for s in sizes if s <= (args.max_size_512 if dim >= 512 else s)]
        with tempfile.TemporaryDirectory(prefix="tcm-scale-") as tmp:
            tmpdir = Path(tmp)
            artefact = random_artefact(tmpdir / "model", dim=dim)
            gallery = unit_rows(max(dim_sizes), dim, seed=dim)
            queries = unit_rows(2000, dim, seed=dim + 1)
            limits = {n: faiss_limits(gallery[:n], queries, args.seconds) for n in dim_sizes}
            for store in args.stores:
                work = tmpdir / store
                work.mkdir()
                with contextlib.ExitStack() as stack:
                    prefix = None
                    if store == "sqlite":
                        url = f"sqlite:///{work / 'tcm.db'}"
                    else:
                        (work / "redis").mkdir()
                        url = stack.enter_context(redis_server(work / "redis"))
                        prefix = f"scale:{uuid.uuid4().hex}:"
                    done = 0
                    api_key = None
                    for n in dim_sizes:
                        with serve(
                            artefact,
                            url,
                            work,
                            redis_prefix=prefix,
                            extra_env=env,
                            start_timeout_s=1800,
                        ) as server:
                            if api_key is None:
                                api_key = httpx.post(
                                    f"{server.base}/v1/tenants",
                                    json={"name": "scale"},
                                    headers={"Authorization": f"Bearer {server.admin_token}"},
                                    timeout=60,
                                ).json()["api_key"]
                            auth = {"Authorization": f"Bearer {api_key}"}
                            rate = enrol(
                                server.base,
                                auth,
                                gallery[done:n],
                                done,
                                batch=args.enrol_batch,
                                clients=args.enrol_clients,
                            )
                            done = n
                            match = {
                                c: match_load(
                                    server.base, auth, queries, clients=c, seconds=args.seconds
                                )
                                for c in args.clients
                            }
                            rss = rss_kib(server.pid) / 1024
                        cold_s, cold_rss = cold_start(artefact, url, work, prefix, env)
                        row = {
                            "dim": dim,
                            "store": store,
                            "items": n,
                            "enrol_items_per_s": rate,
                            "match": match,
                            "rss_mib": rss,
                            "cold_start_s": cold_s,
                            "rss_after_cold_start_mib": cold_rss,
                            "raw_vectors_mib": n * dim * 4 / 2**20,
                            "faiss": limits[n],
                        }
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if args.json is not None:  # partial results survive an interruption
                            args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
                shutil.rmtree(work, ignore_errors=True)
    return {
        "command": "python -m bench.bench_scale " + " ".join(args.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "k": K,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    head = (
        "| dim | store | items | enrol items/s (FAISS add) | match q/s 1 / 4 / 16 clients | "
        "p50 / p99 ms at 4 | FAISS 1-per-call / batched q/s | RSS MiB (raw vectors) | "
        "cold start s (RSS) |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in result["rows"]:
        m = r["match"]
        qps = " / ".join(f"{m[c]['qps']:.0f}" for c in sorted(m, key=int))
        mid = m.get(4) or m.get("4") or next(iter(m.values()))
        f = r["faiss"]
        lines.append(
            f"| {r['dim']} | {r['store']} | {r['items']:,} | {r['enrol_items_per_s']:,.0f} "
            f"({f['add_items_per_s']:,.0f}) | {qps} | {mid['p50_ms']:.1f} / {mid['p99_ms']:.1f} "
            f"| {f['one_query_per_call_qps']:,.0f} / {f['batched_qps']:,.0f} | "
            f"{r['rss_mib']:,.0f} ({r['raw_vectors_mib']:,.0f}) | {r['cold_start_s']:.1f} "
            f"({r['rss_after_cold_start_mib']:,.0f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    p.add_argument(
        "--max-size-512",
        type=int,
        default=100_000,
        help="largest gallery at dim >= 512 (1M x 512 takes hours on 2 cores)",
    )
    p.add_argument("--stores", nargs="+", default=["sqlite", "redis"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--enrol-batch", type=int, default=5000)
    p.add_argument("--enrol-clients", type=int, default=2)
    p.add_argument(
        "--faiss-threads",
        type=int,
        default=1,
        help="FAISS OpenMP threads, in the service (TCM_INDEX_THREADS) and here",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    result = run(args)
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
