"""FAISS per tenant: exact search against brute force, deletes, non-removable indexes."""

from __future__ import annotations

import numpy as np
import pytest

from service.index import IndexRegistry, TenantIndex, gpu_available

DIM = 16


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(gallery: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    scores = gallery @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(ids[i]) for i in order]


def fill(index: TenantIndex, n: int, seed: int = 0, first_id: int = 1
         ) -> tuple[np.ndarray, np.ndarray]:
    x = unit_rows(n, seed)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    index.add(ids, [f"item{i}" for i in ids], [f"s{i % 5}" for i in ids], x)
    return x, ids


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_search_matches_brute_force_with_deletes(factory: str) -> None:
    index = TenantIndex(DIM, factory, tombstone_limit=8)
    x, ids = fill(index, 300)
    if factory != "Flat":  # approximate indexes trained / built at rebuild
        index.rebuild(ids, [f"item{i}" for i in ids], [f"s{i % 5}" for i in ids], x)
    queries = unit_rows(5, 99)
    exact = factory == "Flat"
    for q in queries:
        (hits,) = index.search(q[None], 10)
        assert len(hits) == 10
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        got = [h.seq for h in hits]
        if exact:
            assert got == brute_force(x, ids, q, 10)
        for h in hits:
            assert h.item_id == f"item{h.seq}" and h.subject == f"s{h.seq % 5}"
            assert h.score == pytest.approx(float(x[h.seq - 1] @ q), abs=1e-5)
    # delete the current top hits: they never come back, whatever the index type
    removed = set()
    for q in queries:
        (hits,) = index.search(q[None], 3)
        drop = [h.seq for h in hits]
        index.remove(drop)
        removed.update(drop)
    assert len(index) == 300 - len(removed)
    keep = np.array([i not in removed for i in ids])
    for q in queries:
        (hits,) = index.search(q[None], 20)
        assert not {h.seq for h in hits} & removed
        if exact:
            assert [h.seq for h in hits] == brute_force(x[keep], ids[keep], q, 20)
    # k larger than the gallery (approximate indexes may return fewer: they visit a part)
    (hits,) = index.search(queries[0][None], 1000)
    assert len(hits) == len(index) if exact else 0 < len(hits) <= len(index)


def test_hnsw_tombstones_compact() -> None:
    index = TenantIndex(DIM, "HNSW16", tombstone_limit=4)
    x, _ids = fill(index, 20)
    index.remove([1, 2, 3])
    assert index._tombstones == {1, 2, 3}
    index.remove(list(range(4, 15)))  # over the limit and over the live count: compacted
    assert index._tombstones == set() and len(index) == 6
    (hits,) = index.search(x[15][None], 10)
    assert {h.seq for h in hits} == set(range(15, 21))
    assert hits[0].seq == 16 and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_ivf_without_enough_vectors_is_exact() -> None:
    index = TenantIndex(DIM, "IVF64,Flat")
    x, ids = fill(index, 50)
    index.rebuild(ids, [f"item{i}" for i in ids], ["s"] * 50, x)
    q = unit_rows(1, 5)[0]
    (hits,) = index.search(q[None], 5)
    assert [h.seq for h in hits] == brute_force(x, ids, q, 5)


def test_adds_are_idempotent_and_empty_search() -> None:
    index = TenantIndex(DIM, "Flat")
    assert index.search(unit_rows(2, 1), 5) == [[], []]
    x, ids = fill(index, 3)
    index.add(ids, ["a", "b", "c"], ["x", "y", "z"], x)
    assert len(index) == 3
    (hits,) = index.search(x[:1], 5)
    assert len(hits) == 3 and hits[0].item_id == "item1"
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((1, DIM + 1), np.float32), 1)


def test_registry_and_gpu_decision() -> None:
    reg = IndexRegistry(DIM, "Flat", device="cpu")
    assert reg.on_gpu is False and gpu_available("cpu") is False
    fill(reg.get("a"), 4)
    assert reg.sizes() == {"a": 4}
    reg.get("b")
    reg.drop("a")
    assert reg.sizes() == {"b": 0}
    # a late request of the deleted tenant gets a throwaway index, never a registered one
    fill(reg.get("a"), 2)
    assert reg.sizes() == {"b": 0} and len(reg.get("a")) == 0
    with pytest.raises(RuntimeError):
        IndexRegistry(DIM, "NotAFactory")
