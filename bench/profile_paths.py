"""Where a request's time goes: the pieces of ``/v1/match`` and of a bulk enrolment, timed
in-process one by one (no HTTP), and FAISS's OpenMP threads on a busy machine.

    nice -n 10 python -m bench.profile_paths [--index-memory]

Prints one line per piece (ms per call, or items/s); the figures in ``docs/benchmarks.md``
("Per-request costs") come from it.
"""

from __future__ import annotations

import base64
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service.api.schemas import Candidate, DecisionOut, EnrolRequest, MatchRequest, MatchResponse
from service.domain.inputs import InputResolver, as_unit_vector
from service.engine.index import TenantIndex
from service.store import ApiKey, MatchRecord, NewItem, Tenant
from service.store.redis_store import RedisStore
from service.store.sqlite import SQLiteStore

DIM = 128


def per_call_ms(f: Callable[[], Any], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


def unit_rows(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def omp_threads() -> None:
    q1, q64 = unit_rows(1, 1), unit_rows(64, 2)
    for n in (10_000, 100_000):
        index = faiss.IndexFlatIP(DIM)
        index.add(unit_rows(n, 0))
        for threads in (2, 1):
            faiss.omp_set_num_threads(threads)
            one = per_call_ms(lambda: index.search(q1, 10), 50)  # noqa: B023
            batched = per_call_ms(lambda: index.search(q64, 10), 5) / 64  # noqa: B023
            print(
                f"FAISS Flat {n:>7,} x {DIM}, {threads} OpenMP threads: one query "
                f"{one:.2f} ms, 64 queries in one call {batched:.3f} ms/query"
            )
    faiss.omp_set_num_threads(1)


def match_path(tmp: Path) -> None:
    gallery = unit_rows(10_000, 3)
    index = TenantIndex(DIM, "Flat")
    index.add(np.arange(1, 10_001), [f"i{i}" for i in range(10_000)], ["s"] * 10_000, gallery)
    q = np.random.default_rng(4).standard_normal(DIM).tolist()
    body = json.dumps({"embedding": q, "k": 10})
    unit = as_unit_vector(q, DIM, where="e")[None]
    hits = index.search(unit, 10)[0]
    block = np.repeat(unit, 16, 0)

    def response() -> str:
        return MatchResponse(
            match_id="x",
            decision=DecisionOut(accepted=False, subject=None, score=0.1),
            candidates=[
                Candidate(item_id=h.item_id, subject=h.subject, score=h.score) for h in hits
            ],
            threshold=0.5,
            model_version="v",
        ).model_dump_json()

    store = SQLiteStore(tmp / "match.db")
    store.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))

    def record() -> MatchRecord:
        return MatchRecord(
            uuid.uuid4().hex, "t", False, None, None, None, None, 0.5, "v", time.time()
        )

    rows = [
        (
            "JSON + MatchRequest validation",
            per_call_ms(lambda: MatchRequest.model_validate_json(body), 300),
        ),
        (
            "embedding check + normalise",
            per_call_ms(lambda: as_unit_vector(q, DIM, where="e"), 300),
        ),
        ("index search, 1 query, 10k items", per_call_ms(lambda: index.search(unit, 10), 100)),
        (
            "index search, 16 queries in one call, per query",
            per_call_ms(lambda: index.search(block, 10), 20) / 16,
        ),
        ("response model + JSON", per_call_ms(response, 300)),
        (
            "SQLite match record, one commit (fsync)",
            per_call_ms(lambda: store.add_match(record()), 100),
        ),
        (
            "SQLite 16 match records in one commit, per record",
            per_call_ms(lambda: store.add_matches([record() for _ in range(16)]), 20) / 16,
        ),
    ]
    store.close()
    for name, ms in rows:
        print(f"/v1/match piece: {name:52s} {ms:8.3f} ms")


def enrol_path(tmp: Path, n: int = 5000) -> None:
    vecs = unit_rows(n, 5)
    body = json.dumps(
        {
            "items": [
                {
                    "subject": f"s{i}",
                    "item_id": f"i{i}",
                    "embedding_b64": base64.b64encode(vecs[i].tobytes()).decode(),
                }
                for i in range(n)
            ]
        }
    )
    resolver = InputResolver.__new__(InputResolver)
    resolver.dim = DIM
    timings: dict[str, float] = {}

    def timed(name: str, f: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = f()
        timings[name] = time.perf_counter() - t
        return out

    req = timed("JSON + validation of the items", lambda: EnrolRequest.model_validate_json(body))
    texts = [it.embedding_b64 or "" for it in req.items]
    timed(
        "base64 embeddings, checked row by row",
        lambda: [resolver.embedding_b64(t, where="x") for t in texts],
    )
    unit = timed(
        "base64 embeddings, checked in one pass", lambda: resolver.embeddings_b64(texts, ["x"] * n)
    )
    items = [
        NewItem(item_id=it.item_id or "", subject=it.subject, embedding=e)
        for it, e in zip(req.items, unit, strict=True)
    ]
    store = SQLiteStore(tmp / "enrol.db")
    store.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))
    seqs = timed(
        "SQLite add_items (one transaction)",
        lambda: store.add_items("t", items, model_version="v", created_at=1.0),
    )
    store.close()
    redis_store = RedisStore("redis://127.0.0.1:6379/0", prefix=f"profile-{uuid.uuid4().hex}:")
    try:
        redis_store.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))
        timed(
            "Redis add_items (staged, then one commit script)",
            lambda: redis_store.add_items("t", items, model_version="v", created_at=1.0),
        )
        redis_store.delete_tenant("t")
    finally:
        for key in redis_store.r.scan_iter(match=redis_store.prefix + "*"):
            redis_store.r.delete(key)
        redis_store.close()
    index = TenantIndex(DIM, "Flat")
    timed(
        "FAISS index add",
        lambda: index.add(seqs, [i.item_id for i in items], [i.subject for i in items], unit),
    )
    for name, seconds in timings.items():
        print(
            f"enrol piece ({n:,} items): {name:44s} {seconds * 1e3:8.1f} ms "
            f"({n / seconds:>10,.0f} items/s)"
        )


def gallery_read(n: int = 200_000) -> None:
    """A start-up rebuild's read of an n-item Redis gallery (dim 128, empty metadata), with
    redis-py's pure-Python reply parser and with hiredis, side by side."""
    import redis
    from redis._parsers import _HiredisParser, _RESP2Parser

    url = "redis://127.0.0.1:6379/0"
    store = RedisStore(url, prefix=f"profile-{uuid.uuid4().hex}:", timeout_s=30)
    try:
        store.create_tenant(Tenant("t", "t", 1.0), ApiKey("k", "t", "h" * 64, 1.0))
        vecs = unit_rows(n, 9)
        for lo in range(0, n, 10_000):
            store.add_items(
                "t",
                [
                    NewItem(item_id=f"i{i}", subject=f"s{i // 4}", embedding=vecs[i])
                    for i in range(lo, lo + 10_000)
                ],
                model_version="v",
                created_at=1.0,
            )
        for name, parser in (("pure Python", _RESP2Parser), ("hiredis", _HiredisParser)) * 2:
            pool = redis.ConnectionPool.from_url(url, parser_class=parser, socket_timeout=30)
            reader = RedisStore(url, prefix=store.prefix, client=redis.Redis(connection_pool=pool))
            t = time.perf_counter()
            got = sum(len(c) for c in reader.iter_gallery_vectors("t", model_version="v"))
            seconds = time.perf_counter() - t
            assert got == n
            print(
                f"gallery read ({n:,} items, Redis, {name:11s} parser): {seconds:6.2f} s "
                f"({n / seconds:>9,.0f} items/s)"
            )
            pool.disconnect()
    finally:
        for key in store.r.scan_iter(match=store.prefix + "*"):
            store.r.delete(key)
        store.close()


def index_memory(n: int = 1_000_000, dim: int = DIM) -> None:
    """RSS growth of one tenant's FAISS index with n items (ids, subjects, empty metadata)."""

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    x = (
        unit_rows(n, 11)
        if dim == DIM
        else np.random.default_rng(11).standard_normal((n, dim), dtype=np.float32)
    )
    before = rss_mib()
    index = TenantIndex(dim, "Flat")
    for lo in range(0, n, 65_536):
        hi = min(n, lo + 65_536)
        index.add(
            np.arange(lo, hi) + 1,
            [f"i{i}" for i in range(lo, hi)],
            [f"s{i // 4}" for i in range(lo, hi)],
            x[lo:hi],
            [{}] * (hi - lo),
        )
    grown = rss_mib() - before
    raw = n * dim * 4 / 2**20
    print(
        f"index memory ({n:,} x {dim}): +{grown:,.0f} MiB for {raw:,.0f} MiB of raw vectors "
        f"({grown / raw:.2f}x)"
    )


def main() -> None:
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        omp_threads()
        match_path(Path(tmp))
        enrol_path(Path(tmp))
    gallery_read()
    if "--index-memory" in sys.argv:  # 1M items: half a minute and ~1 GiB
        index_memory()


if __name__ == "__main__":
    main()
