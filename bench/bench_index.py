"""Index choices at scale: exact (FAISS Flat, the torch engine) against HNSW and IVF, in one run.

``--data random``: random unit vectors (``--n`` items, ``--dim``) and 1,000 random unit queries,
the worst case for approximate indexes (no structure to exploit). ``--data clustered``: a
gallery shaped like enrolled people, ``--n / --per-subject`` subjects with ``--per-subject``
noisy samples each around a random centre (same-subject cosine about 0.6), queried by 1,000 new
samples of enrolled subjects, as a probe photo would be. k=10. Per index:
build seconds (training included), memory per item (the serialised index's bytes / n; the
torch engine: its tensors), queries/s with all queries in one call and with one query per call
(``--seconds`` each), and recall@10 against ``IndexFlatIP``'s exact top-10 (the mean share of
the exact top-10 ids found). HNSW and IVF are measured at several search settings
(``efSearch`` / ``nprobe``, the service's ``TCM_INDEX_SEARCH_PARAMS``).

    nice -n 10 python -m bench.bench_index --json docs/results/bench_index.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch  # imported before timing: the engine needs it loaded

from service.engine.index import TorchFlat

K = 10


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    rng = np.random.default_rng(seed)
    for lo in range(0, n, 100_000):
        v = rng.standard_normal((min(n, lo + 100_000) - lo, dim), dtype=np.float32)
        out[lo : lo + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def clustered_rows(
    n: int, dim: int, per_subject: int, seed: int, queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """Gallery (n, dim) of n // per_subject subjects and ``queries`` fresh samples of enrolled
    subjects, all unit rows; noise of norm ~0.8 around unit centres."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(max(1, n // per_subject), dim, seed + 100)

    def sample(subjects: np.ndarray) -> np.ndarray:
        out = np.empty((len(subjects), dim), np.float32)
        for lo in range(0, len(subjects), 100_000):
            s = subjects[lo : lo + 100_000]
            v = centres[s] + 0.8 / np.sqrt(dim) * rng.standard_normal(
                (len(s), dim), dtype=np.float32
            )
            out[lo : lo + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return out

    gallery = sample(np.arange(n) % len(centres))
    probes = sample(rng.integers(0, len(centres), queries))
    return gallery, probes


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)])
    )


def rates(search: Any, queries: np.ndarray, seconds: float) -> tuple[float, float, np.ndarray]:
    t = time.perf_counter()
    rounds = 0
    while rounds == 0 or time.perf_counter() - t < seconds:
        _, ids = search(queries)
        rounds += 1
    batched = rounds * len(queries) / (time.perf_counter() - t)
    n, t = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t < seconds:
        search(queries[n % len(queries)][None])
        n += 1
    one = n / (time.perf_counter() - t)
    return batched, one, ids


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--hnsw", default="HNSW32")
    p.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--ivf", default="IVF4096,Flat")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--train", type=int, default=200_000, help="IVF training sample")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS/torch threads for searching (0: the library default)",
    )
    p.add_argument(
        "--build-threads",
        type=int,
        default=None,
        help="threads for training and building (default: as --threads)",
    )
    p.add_argument("--data", choices=["random", "clustered"], default="random")
    p.add_argument("--per-subject", type=int, default=20, help="clustered: samples per subject")
    p.add_argument("--cuda", action="store_true", help="also the torch engine on CUDA")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    default_threads = faiss.omp_get_max_threads()

    def threads(n: int | None) -> None:
        n = args.threads if n is None else n
        faiss.omp_set_num_threads(n if n > 0 else default_threads)
        torch.set_num_threads(n if n > 0 else default_threads)

    threads(args.threads)
    if args.data == "random":
        x, q = unit_rows(args.n, args.dim, 0), unit_rows(1000, args.dim, 1)
    else:
        x, q = clustered_rows(args.n, args.dim, args.per_subject, 0, 1000)
    rows: list[dict[str, Any]] = []

    def record(
        name: str, build_s: float, bytes_: int, search: Any, exact: np.ndarray | None
    ) -> np.ndarray:
        batched, one, ids = rates(search, q, args.seconds)
        row = {
            "index": name,
            "build_s": build_s,
            "bytes_per_item": bytes_ / args.n,
            "batched_qps": batched,
            "one_query_per_call_qps": one,
            "recall_at_10": 1.0 if exact is None else recall(ids, exact),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        return ids

    t = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    exact = record(
        "Flat (FAISS)",
        time.perf_counter() - t,
        args.n * args.dim * 4,
        lambda qq: flat.search(qq, K),
        None,
    )

    t = time.perf_counter()
    engine: TorchFlat | None = TorchFlat(args.dim, "cpu")
    assert engine is not None
    engine.add_with_ids(x, np.arange(args.n, dtype=np.int64))
    record(
        "Torch (exact, CPU)",
        time.perf_counter() - t,
        engine._vectors.numel() * 4 + engine._ids.numel() * 8,
        lambda qq: engine.search(qq, K),
        exact,
    )  # type: ignore[union-attr]
    engine = None  # free its memory before the next index
    if args.cuda and torch.cuda.is_available():
        t = time.perf_counter()
        gpu = TorchFlat(args.dim, "cuda")
        gpu.add_with_ids(x, np.arange(args.n, dtype=np.int64))
        torch.cuda.synchronize()
        record(
            "Torch (exact, CUDA)",
            time.perf_counter() - t,
            args.n * (args.dim * 4 + 8),
            lambda qq: gpu.search(qq, K),
            exact,
        )
        del gpu
        torch.cuda.empty_cache()

    threads(args.build_threads)
    t = time.perf_counter()
    ivf: Any = faiss.index_factory(args.dim, args.ivf, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x[np.random.default_rng(2).choice(args.n, min(args.n, args.train), False)])
    ivf.add(x)
    build = time.perf_counter() - t
    threads(args.threads)
    size = len(faiss.serialize_index(ivf))
    for nprobe in args.nprobe:
        faiss.extract_index_ivf(ivf).nprobe = nprobe
        record(f"{args.ivf} nprobe={nprobe}", build, size, lambda qq: ivf.search(qq, K), exact)
    ivf = None

    threads(args.build_threads)
    t = time.perf_counter()
    hnsw = faiss.index_factory(args.dim, args.hnsw, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(x)
    build = time.perf_counter() - t
    threads(args.threads)
    size = len(faiss.serialize_index(hnsw))
    for ef in args.ef:
        hnsw.hnsw.efSearch = ef
        record(f"{args.hnsw} efSearch={ef}", build, size, lambda qq: hnsw.search(qq, K), exact)

    result = {
        "command": "python -m bench.bench_index " + " ".join(argv or __import__("sys").argv[1:]),
        "n": args.n,
        "dim": args.dim,
        "k": K,
        "data": args.data,
        "per_subject": args.per_subject if args.data == "clustered" else None,
        "search_threads": faiss.omp_get_max_threads(),
        "build_threads": args.threads if args.build_threads is None else args.build_threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "rows": rows,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
