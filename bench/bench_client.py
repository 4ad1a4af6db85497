"""The Python client's bulk enrolment next to the raw HTTP path, side by side in one run.

One ``tcm-serve`` (a subprocess, SQLite, a random-weight model of each ``--dims``: only
embeddings are sent) and, per dimension, ``--items`` items into a fresh tenant per arm, the arms
taking turns for ``--rounds`` rounds (the median round is reported):

- **raw**: ``httpx`` posting base64 float32 items to ``POST /v1/gallery`` (the best path before
  issue 30; bench_scale's enrolment), ``--batch`` items per request, from one thread, and from
  ``--parallel`` threads (**raw xN**);
- **client enrol, JSON floats**: ``Client.enrol(..., encoding="json")`` in ``--batch`` items, the
  client's old default (dim 128 only);
- **client enrol**: ``Client.enrol`` (base64 float32, its default now);
- **client upload**: ``Client.upload`` (columnar ``POST /v1/gallery/columns``: one base64
  matrix per request, content ids, an Idempotency-Key per batch), one request at a time, and
  with ``parallel=--parallel``.

Every arm's items are checked stored (the tenant's item count) before its time counts. The
client runs in this process on the same cores as the service: the figures are what one loaded
machine does, the ratios to **raw** are the point. Before the arms, per dimension, the service's
pieces in this process (no HTTP): validating a ``--batch`` of items as the item body and as the
columnar body, and SQLite's ``add_items`` of them (``--pieces-only``: just these).

    python -m bench.bench_client                     # dims 128 and 512, 20,000 items
    python -m bench.bench_client --dims 128 --items 5000 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.bench_service import random_artefact
from bench.soak import serve
from tcm_client import Client

Arm = Callable[[str, np.ndarray, list[str]], None]


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def raw(threads: int, batch: int) -> Arm:
    """httpx posting base64 items, ``threads`` requests in flight."""

    def run(base_key: str, vectors: np.ndarray, subjects: list[str]) -> None:
        base, key = base_key.split(" ", 1)

        def send(lo: int) -> None:
            hi = min(len(vectors), lo + batch)
            items = [
                {
                    "subject": subjects[r],
                    "item_id": f"i{r}",
                    "embedding_b64": base64.b64encode(vectors[r].astype("<f4").tobytes()).decode(),
                }
                for r in range(lo, hi)
            ]
            body = json.dumps({"items": items}, separators=(",", ":"))
            r = http.post("/v1/gallery", content=body, headers={"Content-Type": "application/json"})
            if r.status_code != 201:
                raise RuntimeError(f"enrol failed: {r.status_code} {r.text[:300]}")

        with (
            httpx.Client(
                base_url=base,
                headers={"Authorization": f"Bearer {key}"},
                timeout=600,
                limits=httpx.Limits(max_connections=threads),
            ) as http,
            ThreadPoolExecutor(threads) as pool,
        ):
            list(pool.map(send, range(0, len(vectors), batch)))

    return run


def client_enrol(batch: int, encoding: str) -> Arm:
    def run(base_key: str, vectors: np.ndarray, subjects: list[str]) -> None:
        base, key = base_key.split(" ", 1)
        with Client(base, key, timeout_s=600) as tcm:
            for lo in range(0, len(vectors), batch):
                items = [
                    {"subject": subjects[r], "embedding": vectors[r], "item_id": f"i{r}"}
                    for r in range(lo, min(len(vectors), lo + batch))
                ]
                tcm.enrol(items, encoding=encoding)  # type: ignore[arg-type]

    return run


def client_upload(parallel: int, batch: int | None) -> Arm:
    def run(base_key: str, vectors: np.ndarray, subjects: list[str]) -> None:
        base, key = base_key.split(" ", 1)
        with Client(base, key, timeout_s=600) as tcm:
            result = tcm.upload(vectors, subjects, batch_size=batch, parallel=parallel)
            if result.stored != len(vectors):
                raise RuntimeError(f"upload stored {result.stored} of {len(vectors)}")

    return run


def measure(base: str, admin: str, arm: Arm, vectors: np.ndarray, subjects: list[str]) -> float:
    """Items/s of one arm into a fresh tenant, checked stored."""
    with Client(base, admin) as tcm:
        key = tcm.create_tenant(f"bench-{time.monotonic_ns()}").api_key
    started = time.perf_counter()
    arm(f"{base} {key}", vectors, subjects)
    seconds = time.perf_counter() - started
    with Client(base, key) as tcm:
        stored, cursor = 0, None
        while True:
            page = tcm.list_subjects(cursor=cursor, limit=1000)
            stored += sum(s.items for s in page.subjects)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    if stored != len(vectors):
        raise RuntimeError(f"{stored} items stored of {len(vectors)}")
    return len(vectors) / seconds


def pieces(dim: int, items: int, batch: int) -> dict[str, float]:
    """The service's costs per ``batch`` items, in this process, no HTTP: validating an item
    body and a columnar body (JSON parse + pydantic), and SQLite's ``add_items`` (the write);
    medians over the batches of ``items``."""
    from service.api.schemas import EnrolColumns, EnrolRequest
    from service.store import ApiKey, NewItem, Tenant
    from service.store.sqlite import SQLiteStore
    from tcm_client.upload import plan

    vectors = unit_rows(items, dim, seed=dim)
    subjects = [f"s{i // 4}" for i in range(items)]
    batches = list(plan(vectors, subjects, None, None, batch).batches)
    item_bodies = [
        json.dumps(
            {
                "items": [
                    {
                        "subject": s,
                        "item_id": i,
                        "embedding_b64": base64.b64encode(r.astype("<f4").tobytes()).decode(),
                    }
                    for s, i, r in zip(b.subjects, b.ids, b.rows, strict=True)
                ]
            }
        )
        for b in batches
    ]
    out: dict[str, list[float]] = {"items body": [], "columns body": [], "sqlite add_items": []}
    for body in item_bodies:
        started = time.perf_counter()
        EnrolRequest.model_validate(json.loads(body))
        out["items body"].append(time.perf_counter() - started)
    for b in batches:
        body = b.body()
        started = time.perf_counter()
        EnrolColumns.model_validate(json.loads(body))
        out["columns body"].append(time.perf_counter() - started)
    with tempfile.TemporaryDirectory(prefix="tcm-bench-store-") as tmp:
        store = SQLiteStore(Path(tmp) / "t.db")
        store.create_tenant(Tenant("t", "t", 0.0), ApiKey("k", "t", "0" * 64, 0.0))
        for b in batches:
            new = [
                NewItem(item_id=i, subject=s, embedding=r, metadata={}, image=None)
                for s, i, r in zip(b.subjects, b.ids, b.rows, strict=True)
            ]
            started = time.perf_counter()
            store.add_items("t", new, model_version="m", created_at=0.0)
            out["sqlite add_items"].append(time.perf_counter() - started)
        store.close()
    return {name: statistics.median(v) for name, v in out.items()}


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    env = {
        "TCM_MONITOR_ENABLED": "false",
        "TCM_INDEX_THREADS": "1",
        "TCM_STORE_TIMEOUT_S": "30",
        "TCM_MAX_ENROL_ITEMS": str(max(args.batch, 2000)),
    }
    for dim in args.dims:
        costs = pieces(dim, args.items, args.batch)
        print(f"\ndim {dim}: the service's pieces per {args.batch} items, in-process (median ms):")
        for name, seconds in costs.items():
            print(f"  {name:42s} {seconds * 1000:9.1f} ms  ({args.batch / seconds:,.0f} items/s)")
        rows += [
            {"dim": dim, "piece": name, "ms_per_batch": round(s * 1000, 1), "batch": args.batch}
            for name, s in costs.items()
        ]
        if args.pieces_only:
            continue
        with tempfile.TemporaryDirectory(prefix="tcm-bench-client-") as tmp:
            work = Path(tmp)
            artefact = random_artefact(work / "model", dim=dim)
            vectors = unit_rows(args.items, dim, seed=dim)
            subjects = [f"s{i // 4}" for i in range(args.items)]
            arms: dict[str, Arm] = {
                "raw (httpx, base64 items)": raw(1, args.batch),
                f"raw x{args.parallel} threads": raw(args.parallel, args.batch),
            }
            if dim <= 128:
                arms["client enrol, JSON floats (old default)"] = client_enrol(args.batch, "json")
            arms["client enrol (base64)"] = client_enrol(args.batch, "base64")
            arms["client upload (columnar)"] = client_upload(1, None)
            arms[f"client upload parallel={args.parallel}"] = client_upload(args.parallel, None)
            rates: dict[str, list[float]] = {name: [] for name in arms}
            with serve(
                artefact, f"sqlite:///{work / 'tcm.db'}", work, extra_env=env, start_timeout_s=600
            ) as server:
                for _ in range(args.rounds):
                    for name, arm in arms.items():
                        rates[name].append(
                            measure(server.base, server.admin_token, arm, vectors, subjects)
                        )
            base_rate = statistics.median(rates["raw (httpx, base64 items)"])
            print(f"\ndim {dim}, {args.items} items, median of {args.rounds} rounds (items/s):")
            for name, values in rates.items():
                median = statistics.median(values)
                row = {
                    "dim": dim,
                    "arm": name,
                    "items_per_s": round(median),
                    "ratio_to_raw": round(median / base_rate, 2),
                    "rounds": [round(v) for v in values],
                }
                rows.append(row)
                print(
                    f"  {name:42s} {median:9,.0f}  x{median / base_rate:4.2f} raw   "
                    f"(rounds: {', '.join(f'{v:,.0f}' for v in values)})",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=2000, help="items per request (raw, enrol)")
    p.add_argument("--parallel", type=int, default=2, help="threads / requests in flight")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--pieces-only", action="store_true", help="only the in-process pieces")
    args = p.parse_args(argv)
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at start"
    )
    rows = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
