"""Writes under contention: N client threads against a real ``tcm-serve``, 0 errors expected.

The load that made the SQLite store answer ``503 store_unavailable`` ("database is locked")
before its writes went through one writer thread (issue 20): ``--clients`` threads (200 by
default), each with its own keep-alive connection, one tenant with a ``--gallery`` of random unit
vectors (2,000), and a mix of 80 % ``/v1/match`` by embedding (each writes a match record) and
20 % single-item enrolments by embedding, for ``--duration`` seconds. Every answer other than
200 (match) / 201 (enrol), and every transport failure, is an error.

Starts ``tcm-serve`` (``python -m service.cli``) on a free loopback port with a fresh SQLite file,
or on ``--store-url redis://...`` under a fresh key prefix that is deleted afterwards. Reports
requests, errors (by status code and with samples), throughput, p50/p99/max latency per
operation, and checks that every acknowledged enrolment is in the gallery afterwards.

    python -m bench.contention --duration 60
    python -m bench.contention --duration 600 --store-url redis://127.0.0.1:6390/0 --json r.json

Exit status 0 only if there were no errors and nothing acknowledged was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.bench_service import random_artefact
from bench.soak import scratch_store, serve

MATCH_SHARE = 0.8


def _vector(rng: np.random.Generator, dim: int) -> list[float]:
    v = rng.standard_normal(dim)
    return (v / np.linalg.norm(v)).tolist()


@dataclass
class _Shared:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"match": [], "enrol": []})
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)


def _client(
    worker: int,
    base: str,
    auth: dict[str, str],
    dim: int,
    stop_at: float,
    shared: _Shared,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed * 10_000 + worker)
    pick = random.Random(seed * 10_000 + worker)
    lat: dict[str, list[float]] = {"match": [], "enrol": []}
    acked: list[str] = []
    errors: Counter[str] = Counter()
    samples: list[str] = []
    n = 0
    with httpx.Client(base_url=base, headers=auth, timeout=120.0) as c:
        while time.monotonic() < stop_at:
            n += 1
            if pick.random() < MATCH_SHARE:
                op, expected = "match", 200
                body: dict[str, Any] = {"embedding": _vector(rng, dim), "k": 5}
                path = "/v1/match"
            else:
                op, expected = "enrol", 201
                item_id = f"w{worker}-{n}"
                body = {
                    "items": [
                        {
                            "subject": f"s{worker}-{n % 7}",
                            "item_id": item_id,
                            "embedding": _vector(rng, dim),
                        }
                    ]
                }
                path = "/v1/gallery"
            started = time.perf_counter()
            try:
                r = c.post(path, json=body)
                status = str(r.status_code)
                text = r.text[:200]
            except httpx.HTTPError as exc:
                status, text = type(exc).__name__, str(exc)[:200]
            lat[op].append(time.perf_counter() - started)
            if status != str(expected):
                errors[f"{op} {status}"] += 1
                if len(samples) < 5:
                    samples.append(f"{op} {status}: {text}")
            elif op == "enrol":
                acked.append(item_id)
    with shared.lock:
        for op in lat:
            shared.latencies[op] += lat[op]
        shared.errors.update(errors)
        shared.error_samples += samples[: max(0, 10 - len(shared.error_samples))]
        shared.acknowledged += acked


@dataclass
class ContentionResult:
    store: str
    clients: int
    duration_s: float
    gallery: int
    requests: int
    requests_per_s: float
    errors: int
    errors_by_kind: dict[str, int]
    error_samples: list[str]
    per_op: dict[str, dict[str, float]]
    acknowledged_enrolments: int
    missing_acknowledged: int
    machine: str


def _count_listed(base: str, auth: dict[str, str], wanted: set[str]) -> int:
    seen: set[str] = set()
    cursor: str | None = None
    with httpx.Client(base_url=base, headers=auth, timeout=120.0) as c:
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = c.get("/v1/gallery", params=params).json()
            seen.update(i["item_id"] for i in page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                break
    return len(wanted - seen)


def run_contention(
    *,
    artefact: Path,
    duration_s: float = 10.0,
    clients: int = 200,
    gallery: int = 2000,
    store_url: str | None = None,
    seed: int = 0,
    extra_env: dict[str, str] | None = None,
) -> ContentionResult:
    env = {"TCM_MONITOR_ENABLED": "false", **(extra_env or {})}
    with (
        scratch_store(store_url, "contention") as (workdir, url, prefix),
        serve(artefact, url, workdir, redis_prefix=prefix, extra_env=env) as server,
    ):
        admin = {"Authorization": f"Bearer {server.admin_token}"}
        dim = int(httpx.get(f"{server.base}/v1/model", timeout=10).json()["embedding_dim"])
        created = httpx.post(
            f"{server.base}/v1/tenants",
            json={"name": "contention"},
            headers=admin,
            timeout=30,
        ).json()
        auth = {"Authorization": f"Bearer {created['api_key']}"}
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.base, headers=auth, timeout=120) as c:
            for start in range(0, gallery, 64):
                items = [
                    {
                        "subject": f"g{i // 2}",
                        "item_id": f"g{i}",
                        "embedding": _vector(rng, dim),
                    }
                    for i in range(start, min(gallery, start + 64))
                ]
                c.post("/v1/gallery", json={"items": items}).raise_for_status()
        shared = _Shared()
        stop_at = time.monotonic() + duration_s
        threads = [
            threading.Thread(
                target=_client, args=(w, server.base, auth, dim, stop_at, shared, seed)
            )
            for w in range(clients)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        missing = _count_listed(server.base, auth, set(shared.acknowledged))
    per_op = {}
    for op, values in shared.latencies.items():
        lat = np.asarray(values) * 1e3
        per_op[op] = {
            "count": int(lat.size),
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "max_ms": float(lat.max()) if lat.size else float("nan"),
        }
    requests = sum(int(v["count"]) for v in per_op.values())
    return ContentionResult(
        store=url.split(":", 1)[0],
        clients=clients,
        duration_s=duration_s,
        gallery=gallery,
        requests=requests,
        requests_per_s=requests / elapsed,
        errors=sum(shared.errors.values()),
        errors_by_kind=dict(shared.errors),
        error_samples=shared.error_samples,
        per_op=per_op,
        acknowledged_enrolments=len(shared.acknowledged),
        missing_acknowledged=missing,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
    )


def report(res: ContentionResult) -> str:
    lines = [
        f"{res.store}: {res.clients} clients x {res.duration_s:.0f} s, gallery "
        f"{res.gallery}: {res.requests} requests ({res.requests_per_s:.0f}/s), "
        f"{res.errors} errors {res.errors_by_kind or ''}"
    ]
    for op, s in res.per_op.items():
        lines.append(
            f"  {op:6s} n={s['count']:6d} p50 {s['p50_ms']:8.1f} ms  "
            f"p99 {s['p99_ms']:8.1f} ms  max {s['max_ms']:8.1f} ms"
        )
    lines.append(
        f"  acknowledged enrolments {res.acknowledged_enrolments}, missing "
        f"{res.missing_acknowledged}"
    )
    lines += [f"  sample: {s}" for s in res.error_samples]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--artefact",
        type=Path,
        default=None,
        help="default: a random-weight model (only embeddings are sent)",
    )
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--gallery", type=int, default=2000)
    p.add_argument("--store-url", default=None, help="default: a fresh SQLite file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tcm-artefact-") as tmp:
        artefact = args.artefact or random_artefact(Path(tmp) / "model")
        res = run_contention(
            artefact=artefact,
            duration_s=args.duration,
            clients=args.clients,
            gallery=args.gallery,
            store_url=args.store_url,
            seed=args.seed,
        )
    print(report(res))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(res), indent=2) + "\n")
    return 0 if res.errors == 0 and res.missing_acknowledged == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
