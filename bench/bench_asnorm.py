"""The cost of serve-time AS-norm (``tcm.asnorm``), side by side in one run: a tenant index of
``--n`` items (``--dim``, FAISS ``Flat``, the service's ``TenantIndex``) without a cohort and
with one (``--cohort`` embeddings, top-k ``--top-k``), filled with the same vectors.

* match: one query per ``search`` call (k=10), what ``/v1/match`` runs per request; with a
  cohort it also computes the probe's cohort statistics and normalises the k candidates;
* enrolment: one item per ``add`` (and a block of ``--block`` items), what ``/v1/gallery``
  runs after the store accepted the write; with a cohort it computes the items' statistics;
* start-up: filling the index from the store's vectors in chunks of 10,000.

Measurements of the two indexes alternate (ABBA...), so load from other jobs on the machine
and the order of cache use fall on both alike; medians are reported with the ratio
with/without, and the probe's statistics alone (what a match adds, before the few candidates'
normalisation).

    nice -n 10 python -m bench.bench_asnorm --json docs/results/bench_asnorm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.index import TenantIndex
from tcm.asnorm import Cohort

K = 10


def unit_rows(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(index: TenantIndex, vectors: np.ndarray, chunk: int = 10_000) -> float:
    started = time.perf_counter()
    for lo in range(0, len(vectors), chunk):
        part = vectors[lo : lo + chunk]
        seqs = np.arange(lo + 1, lo + 1 + len(part), dtype=np.int64)
        index.add(seqs, [f"i{s}" for s in seqs], [f"s{s // 4}" for s in seqs], part)
    return time.perf_counter() - started


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--cohort", type=int, default=2000)
    ap.add_argument("--top-k", type=int, default=200)
    ap.add_argument("--queries", type=int, default=300, help="single-query searches per index")
    ap.add_argument("--enrols", type=int, default=300, help="single-item adds per index")
    ap.add_argument("--block", type=int, default=100, help="items of a block enrolment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    gallery = unit_rows(args.n, args.dim, rng)
    cohort = Cohort.of(unit_rows(args.cohort, args.dim, rng), dim=args.dim, top_k=args.top_k)
    queries = unit_rows(args.queries, args.dim, rng)
    extra = unit_rows(args.enrols + 10 * args.block, args.dim, rng)

    plain = TenantIndex(args.dim, "Flat")
    normed = TenantIndex(args.dim, "Flat", cohort=cohort)
    fill_s = {"raw": fill(plain, gallery), "as_norm": fill(normed, gallery)}

    match: dict[str, list[float]] = {"raw": [], "as_norm": []}
    probe_stats: list[float] = []
    for i, q in enumerate(queries):  # ABBA order, so load and cache order fall on both alike
        order = [("raw", plain), ("as_norm", normed)]
        for name, index in order if i % 2 == 0 else order[::-1]:
            match[name].append(timed(lambda q=q, index=index: index.search(q[None], K)))
        probe_stats.append(timed(lambda q=q: cohort.stats(q[None])))

    enrol: dict[str, list[float]] = {"raw": [], "as_norm": []}
    seq = args.n + 1
    for i in range(args.enrols):
        v = extra[i : i + 1]
        ids = np.array([seq + i])
        order = [("raw", plain), ("as_norm", normed)]
        for name, index in order if i % 2 == 0 else order[::-1]:
            enrol[name].append(timed(lambda v=v, ids=ids, ix=index: ix.add(ids, ["x"], ["y"], v)))
    block = {"raw": [], "as_norm": []}
    seq += args.enrols
    for b in range(10):
        v = extra[args.enrols + b * args.block : args.enrols + (b + 1) * args.block]
        ids = np.arange(seq, seq + len(v))
        names = [f"b{s}" for s in ids]
        block["raw"].append(timed(lambda v=v, ids=ids, n=names: plain.add(ids, n, n, v)))
        block["as_norm"].append(timed(lambda v=v, ids=ids, n=names: normed.add(ids, n, n, v)))
        seq += len(v)

    def row(name: str, samples: dict[str, list[float]], unit: float, label: str) -> dict:
        raw, asn = statistics.median(samples["raw"]), statistics.median(samples["as_norm"])
        print(
            f"{name:<28} raw {raw * unit:9.3f} {label}   as-norm {asn * unit:9.3f} {label}   "
            f"ratio {asn / raw:5.2f}   added {(asn - raw) * unit:8.3f} {label}"
        )
        return {
            "raw_median_s": raw,
            "as_norm_median_s": asn,
            "ratio": asn / raw,
            "added_s": asn - raw,
            "samples": len(samples["raw"]),
        }

    print(f"probe statistics alone (1 query): {statistics.median(probe_stats) * 1e3:.3f} ms")
    machine = {
        "node": platform.node(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "numpy": np.__version__,
    }
    print(
        f"# {args.n:,} items x {args.dim} dim, FAISS Flat; cohort {args.cohort:,} x top-k "
        f"{args.top_k}; {machine['node']} ({machine['cpus']} CPUs, "
        f"load {machine['loadavg_at_start'][0]:.2f})"
    )
    out = {
        "config": vars(args) | {"json": str(args.json) if args.json else None, "k": K},
        "machine": machine,
        "match_one_query": row("match (1 query, k=10)", match, 1e3, "ms"),
        "probe_statistics_median_s": statistics.median(probe_stats),
        "enrol_one_item": row("enrol (1 item)", enrol, 1e6, "us"),
        f"enrol_block_{args.block}": row(f"enrol ({args.block} items)", block, 1e3, "ms"),
        "startup_fill": row(
            f"start-up fill ({args.n:,})", {k: [v] for k, v in fill_s.items()}, 1.0, "s "
        ),
        "stats_memory_bytes_per_item_estimate": None,
    }
    import tracemalloc

    tracemalloc.start()
    probe = TenantIndex(args.dim, "Flat", cohort=cohort)
    before = tracemalloc.get_traced_memory()[0]
    fill(probe, gallery[:20_000])
    with_stats = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    tracemalloc.start()
    probe = TenantIndex(args.dim, "Flat")
    before = tracemalloc.get_traced_memory()[0]
    fill(probe, gallery[:20_000])
    without = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    out["stats_memory_bytes_per_item_estimate"] = (with_stats - without) / 20_000
    print(
        f"statistics kept per item: ~{out['stats_memory_bytes_per_item_estimate']:.0f} "
        "bytes (Python heap)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
