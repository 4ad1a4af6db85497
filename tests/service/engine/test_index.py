"""FAISS per tenant: exact search against brute force, deletes, non-removable indexes."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from service.engine.index import IndexRegistry, TenantIndex, TorchFlat, gpu_available
from service.store.base import GalleryVectors

DIM = 16


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(gallery: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    scores = gallery @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(ids[i]) for i in order]


def fill(
    index: TenantIndex, n: int, seed: int = 0, first_id: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    x = unit_rows(n, seed)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    index.add(ids, [f"item{i}" for i in ids], [f"s{i % 5}" for i in ids], x)
    return x, ids


@pytest.mark.parametrize("factory", ["Flat", "Torch", "HNSW16", "IVF4,Flat"])
def test_search_matches_brute_force_with_deletes(factory: str) -> None:
    index = TenantIndex(DIM, factory, tombstone_limit=8)
    x, ids = fill(index, 300)
    exact = factory in ("Flat", "Torch")
    if not exact:  # approximate indexes trained / built at rebuild
        index.rebuild(ids, [f"item{i}" for i in ids], [f"s{i % 5}" for i in ids], x)
    queries = unit_rows(5, 99)
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


@pytest.mark.parametrize(
    ("block", "max_scores"),
    [
        (1000, 0),  # fixed 1,000-row blocks: five blocks and the running top-k merge
        (1, 64 * 1700),  # the block sized by the score budget: 1,700 rows for 64 queries
        (65536, 1 << 24),  # the defaults: the whole gallery in one block
    ],
)
def test_torch_engine_equals_faiss_flat(block: int, max_scores: int) -> None:
    """The torch exact engine returns FAISS IndexFlatIP's ids and scores, blockwise top-k over
    the gallery included, after removals too."""
    n, dim = 5000, 48
    x = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(10, 10 + n, dtype=np.int64)
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    engine = TorchFlat(dim, "cpu", block=block, max_scores=max_scores)
    for lo in range(0, n, 1700):  # several adds: the engine's storage grows
        flat.add_with_ids(x[lo : lo + 1700], ids[lo : lo + 1700])
        engine.add_with_ids(x[lo : lo + 1700], ids[lo : lo + 1700])
    q = np.random.default_rng(2).standard_normal((64, dim)).astype(np.float32)
    for k in (1, 10, 100):
        fs, fi = flat.search(q, k)
        ts, ti = engine.search(q, k)
        np.testing.assert_array_equal(ti, fi)
        np.testing.assert_allclose(ts, fs, atol=1e-5)
    gone = ids[::7]
    assert engine.remove_ids(gone) == len(gone) == flat.remove_ids(gone)
    fs, fi = flat.search(q, 20)
    ts, ti = engine.search(q, 20)
    np.testing.assert_array_equal(ti, fi)
    np.testing.assert_allclose(engine.reconstruct_batch(ids[1:4]), x[1:4])
    small = TorchFlat(dim, block=block, max_scores=max_scores)
    small.add_with_ids(x[:3], ids[:3])
    _s, i = small.search(q[:1], 5)  # k over the gallery: -1 ids, as FAISS pads
    assert i[0, 3:].tolist() == [-1, -1] and sorted(i[0, :3].tolist()) == ids[:3].tolist()


def test_torch_factory_in_the_registry() -> None:
    reg = IndexRegistry(DIM, "Torch", device="cpu")
    assert reg.on_gpu is False
    x, ids = fill(reg.get("a"), 50)
    assert isinstance(reg.get("a")._index, TorchFlat)
    (hits,) = reg.get("a").search(x[7][None], 3)
    assert hits[0].seq == ids[7] and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_search_params_reach_approximate_indexes() -> None:
    hnsw = TenantIndex(DIM, "HNSW16", search_params="efSearch=77")
    assert faiss.downcast_index(hnsw._index.index).hnsw.efSearch == 77
    ivf = TenantIndex(DIM, "IVF4,Flat", search_params="nprobe=3")
    x, ids = fill(ivf, 400)
    ivf.rebuild(ids, [f"item{i}" for i in ids], ["s"] * 400, x)  # trained: a real IVF now
    assert faiss.extract_index_ivf(ivf._index.index).nprobe == 3


FILTERED_SEARCH = """
import sys
import numpy as np
if sys.argv[1] == "patched":
    import faiss.contrib.torch_utils  # what pytorch-metric-learning imports
from service.engine.index import TenantIndex
from tests.service.engine.test_index import brute_force, unit_rows
for factory in ("Flat", "Torch"):
    index = TenantIndex(16, factory)
    x, ids = unit_rows(200, 0), np.arange(1, 201, dtype=np.int64)
    meta = [{"cam": i % 3} for i in range(200)]
    index.add(ids, [f"item{i}" for i in ids], [f"s{i}" for i in ids], x, meta)
    keep = np.array([m["cam"] == 1 for m in meta])
    for q in unit_rows(3, 5):
        got = [h.seq for h in index.search(q[None], 7, where={"cam": 1})[0]]
        assert got == brute_force(x[keep], ids[keep], q, 7), (factory, got)
print("ok")
"""


@pytest.mark.parametrize("faiss_state", ["plain", "patched"])
def test_filtered_search_equals_brute_force_on_every_engine(faiss_state: str) -> None:
    """Filters inside the search on FAISS (Flat, IVF) and the torch engine equal a brute-force
    filter, also in a process where ``faiss.contrib.torch_utils`` replaced ``Index.search`` (it
    takes no ``params`` then; pytorch-metric-learning imports it, so any process that also
    trains has it). Run in a subprocess: that replacement cannot be undone in-process."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", FILTERED_SEARCH, faiss_state],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("factory", ["Flat", "Torch", "IVF4,Flat", "HNSW16"])
def test_rebuild_from_chunks_equals_rebuild(factory: str) -> None:
    """The start-up path (chunks streamed from the store) builds the index that one
    ``rebuild`` with every row builds: same items, same hits, same filter postings."""
    n = 600
    x = np.random.default_rng(5).standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    seqs = np.arange(100, 100 + n, dtype=np.int64)
    ids = [f"i{i}" for i in range(n)]
    subjects = [f"s{i % 9}" for i in range(n)]
    meta = [{"site": f"x{i % 3}"} if i % 2 else {} for i in range(n)]
    whole = TenantIndex(DIM, factory)
    whole.rebuild(seqs, ids, subjects, x, meta)
    chunked = TenantIndex(DIM, factory)
    chunked.add(seqs[:5], ids[:5], subjects[:5], x[:5])  # replaced, not added to
    chunked.rebuild_chunks(
        GalleryVectors(
            seqs[lo : lo + 250],
            ids[lo : lo + 250],
            subjects[lo : lo + 250],
            x[lo : lo + 250],
            meta[lo : lo + 250],
        )
        for lo in range(0, n, 250)
    )
    assert len(chunked) == len(whole) == n
    assert chunked._items == whole._items and chunked._postings == whole._postings
    q = x[:20] + 0.01
    empty = TenantIndex(DIM, factory)
    empty.rebuild_chunks(iter(()))
    assert len(empty) == 0 and empty.search(q, 3) == [[] for _ in q]
    if factory.startswith("HNSW"):  # a graph built in other batches: approximate either way
        assert [h[0].seq for h in chunked.search(q, 1)] == seqs[:20].tolist()
        return
    assert chunked.search(q, 10) == whole.search(q, 10)
    assert chunked.search(q, 5, where={"site": "x1"}) == whole.search(q, 5, where={"site": "x1"})


def test_items_keep_ids_and_subjects_exactly() -> None:
    """Item id and subject are packed into one string per item (memory); what a search
    returns is still exactly what was added, separators inside the names included (an id
    with NUL can only predate the id pattern, and keeps the unpacked form)."""
    names = [("a", "s"), ("b", "x\x00y"), ("c\x00d", "s\x00t"), ("e", ""), ("f", "ünï:code")]
    x = np.eye(DIM, dtype=np.float32)[: len(names)]
    index = TenantIndex(DIM, "Flat")
    index.add(np.arange(1, len(names) + 1), [n[0] for n in names], [n[1] for n in names], x)
    for row, (iid, subject) in enumerate(names):
        (hit,) = index.search(x[row][None], 1)[0]
        assert (hit.item_id, hit.subject) == (iid, subject)


def test_rebuild_from_chunks_keeps_serving_the_old_contents_meanwhile() -> None:
    """A live resync reads the whole gallery from the store: searches meanwhile answer from
    the old contents instead of waiting for the read, and see the new ones after it."""
    x = np.eye(DIM, dtype=np.float32)[:4]
    index = TenantIndex(DIM, "Flat")
    index.add(np.array([1, 2]), ["old1", "old2"], ["s", "s"], x[:2])
    seen: list[list[str]] = []

    def chunks():  # the store read, with a search from another thread half-way through
        yield GalleryVectors(np.array([3]), ["new3"], ["s"], x[2:3], [{}])
        t = threading.Thread(
            target=lambda: seen.append([h.item_id for h in index.search(x[:1], 4)[0]])
        )
        t.start()
        t.join(5)
        assert not t.is_alive(), "a search waited for the whole rebuild"
        yield GalleryVectors(np.array([4]), ["new4"], ["s"], x[3:4], [{}])

    index.rebuild_chunks(chunks())
    assert seen == [["old1", "old2"]]
    assert sorted(h.item_id for h in index.search(x[:1], 4)[0]) == ["new3", "new4"]


def test_metadata_terms_cost_bytes_not_objects_per_item() -> None:
    """Regression (issue 25, item 4): each item's top-level metadata terms were a fresh tuple and
    two fresh strings per item (192 B a term, measured; a 12 MiB request of 1,300-key metadata
    kept ~270 MiB). Terms shared by items are now one object each (55 B a term with its posting,
    measured), and metadata has at most 64 top-level keys. tracemalloc counts allocations, so
    this is deterministic."""
    import tracemalloc

    from service.engine.index import TenantIndex

    n, keys = 1000, 64
    meta = [{f"field_{k}": f"value-{(i * 7 + k) % 5}" for k in range(keys)} for i in range(n)]
    vec = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    index = TenantIndex(8, "Flat")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index.add(np.arange(1, n + 1), [f"i{i}" for i in range(n)], ["s"] * n, vec, meta)
        per_term = (tracemalloc.get_traced_memory()[0] - before) / (n * keys)
    finally:
        tracemalloc.stop()
    print(f"metadata in the index: {per_term:.0f} B a term")  # the figure docs/reliability.md cites
    assert per_term < 100, per_term
    # and filters still find exactly the items with the value
    want = {i + 1 for i in range(n) if (i * 7 + 3) % 5 == 2}
    assert set(index.matching({"field_3": "value-2"})) == want
    index.remove([next(iter(want))])
    assert set(index.matching({"field_3": "value-2"})) == want - {next(iter(want))}


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_the_gallery_shape_follows_adds_removes_rebuilds_and_compaction(factory: str) -> None:
    """``shape()`` (photos per subject -> subjects, for the expected FPIR) equals a count over
    the live items after every kind of change, tombstoned removals and compaction included."""
    index = TenantIndex(DIM, factory, tombstone_limit=3)

    def counted() -> dict[int, int]:
        per_subject: dict[str, int] = {}
        for packed in index._items.values():
            subject = packed[1] if isinstance(packed, tuple) else packed.split("\x00", 1)[1]
            per_subject[subject] = per_subject.get(subject, 0) + 1
        shape: dict[int, int] = {}
        for photos in per_subject.values():
            shape[photos] = shape.get(photos, 0) + 1
        return shape

    assert index.shape() == {}
    x, ids = fill(index, 12)  # subject s(i % 5): s1, s2 3 photos; s0, s3, s4 2
    assert index.shape() == counted() == {3: 2, 2: 3}
    index.add(ids[:2], ["again", "again"], ["zz", "zz"], x[:2])  # already held: no change
    assert index.shape() == {3: 2, 2: 3}
    index.remove([5, 11])  # s0 -> 1 photo, s1 -> 2
    assert index.shape() == counted() == {1: 1, 3: 1, 2: 3}
    index.remove(list(range(1, 12)))  # everything but id 12 (s2), compacting HNSW on the way
    assert index.shape() == counted() == {1: 1}
    index.rebuild(ids, [f"i{i}" for i in ids], ["a"] * 12, x)
    assert index.shape() == {12: 1}
    index.rebuild_chunks(
        iter([GalleryVectors(ids[:4], ["p", "q", "r", "s"], ["b", "b", "c", "d"], x[:4], None)])
    )
    assert index.shape() == counted() == {2: 1, 1: 2}


def test_the_registry_reports_every_tenants_shape() -> None:
    registry = IndexRegistry(DIM, "Flat")
    fill(registry.get("t1"), 5)
    registry.get("t2")
    assert registry.shapes() == {"t1": {1: 5}, "t2": {}}


def test_the_faiss_thread_setting_holds_in_the_thread_that_searches() -> None:
    """OpenMP keeps its thread count per thread: set once at start-up in the main thread, it
    left the worker threads that search at OpenMP's default (issue 32). A search sets it in
    the thread it runs in; a count other than this machine's default makes the test able to
    fail on any number of cores."""
    import faiss

    with ThreadPoolExecutor(1) as pool:
        default = pool.submit(faiss.omp_get_max_threads).result()
    wanted = default + 1
    reg = IndexRegistry(4, "Flat", threads=wanted)
    reg.get("t").add([1], ["a"], ["s"], np.eye(4, dtype=np.float32)[:1])

    def search_then_count() -> int:
        reg.get("t").search(np.eye(4, dtype=np.float32)[:1], 1)
        return faiss.omp_get_max_threads()

    with ThreadPoolExecutor(1) as pool:  # a thread that never set it itself
        assert pool.submit(search_then_count).result() == wanted
