"""Issue 31's paper plan: 1,000 tenants x 1M items, from the committed scale benchmark.

    .venv/bin/python -m studies.capacity_plan [--tenants 1000] [--items 1000000]
        [--queries-per-tenant 1.0] [--json docs/results/capacity_plan.json]

Reads ``docs/results/bench_scale_idle.json`` (SQLite rows) and ``bench_scale_idle_redis.json``
(Redis rows), measured on the idle 2-core VM (``docs/benchmarks.md``, "Scale benchmark"), and
scales their 1M-item rows: the server's memory per item beyond the model (RSS after enrolment or
cold start, whichever is higher, less the server's RSS at 10k items less those 10k items' raw
vectors), exact-search cores for a query rate (one FAISS thread's one-query-per-call and
1,000-per-call rates at 1M items), and the cold start of one 1M-item tenant. Arithmetic only:
nothing here was measured at 1,000 tenants.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _rows() -> list[dict[str, Any]]:
    sqlite = json.loads((RESULTS / "bench_scale_idle.json").read_text())["rows"]
    redis = json.loads((RESULTS / "bench_scale_idle_redis.json").read_text())["rows"]
    return [r for r in sqlite if r["store"] == "sqlite"] + [
        r for r in redis if r["store"] == "redis"
    ]


def plan(tenants: int, items: int, queries_per_tenant: float) -> dict[str, Any]:
    rows = _rows()
    out: dict[str, Any] = {
        "tenants": tenants,
        "items_per_tenant": items,
        "queries_per_s_per_tenant": queries_per_tenant,
        "by_dim_store": [],
    }
    for big in (r for r in rows if r["items"] == 1_000_000):
        small = next(
            r
            for r in rows
            if r["items"] == 10_000 and r["dim"] == big["dim"] and r["store"] == big["store"]
        )
        base = small["rss_mib"] - small["raw_vectors_mib"]  # the server and model, no gallery
        peak = max(big["rss_mib"], big["rss_after_cold_start_mib"])
        per_item = (peak - base) * 2**20 / big["items"]  # bytes per item in the server
        raw = big["dim"] * 4
        total = tenants * items
        one, batched = big["faiss"]["one_query_per_call_qps"], big["faiss"]["batched_qps"]
        rate = tenants * queries_per_tenant
        out["by_dim_store"].append(
            {
                "dim": big["dim"],
                "store": big["store"],
                "server_bytes_per_item": per_item,
                "x_raw": per_item / raw,
                "index_ram_per_copy_tib": total * per_item / 2**40,
                "raw_vectors_tib": total * raw / 2**40,
                "one_thread_qps_at_1m_one_query": one,
                "one_thread_qps_at_1m_batched": batched,
                "cores_for_rate_one_query": rate * items / 1_000_000 / one,
                "cores_for_rate_batched": rate * items / 1_000_000 / batched,
                "cold_start_s_per_1m_tenant_2_cores": big["cold_start_s"],
            }
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--queries-per-tenant", type=float, default=1.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = plan(args.tenants, args.items, args.queries_per_tenant)
    rate = result["tenants"] * result["queries_per_s_per_tenant"]
    for r in result["by_dim_store"]:
        print(
            f"dim {r['dim']:>3} {r['store']:>6}: {r['server_bytes_per_item']:6.0f} B/item "
            f"({r['x_raw']:.2f}x raw), index RAM per copy {r['index_ram_per_copy_tib']:.2f} TiB "
            f"(raw {r['raw_vectors_tib']:.2f}); cores at {rate:.0f} q/s: "
            f"{r['cores_for_rate_one_query']:.0f} one query per search, "
            f"{r['cores_for_rate_batched']:.1f} batched; cold start of one 1M tenant "
            f"{r['cold_start_s_per_1m_tenant_2_cores']:.1f} s"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
