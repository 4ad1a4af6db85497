"""In-memory FAISS indexes, one per tenant, rebuilt from the store at start-up.

Each index is ``IndexIDMap2`` over an inner-product index built from the configured factory string
(``Flat`` by default: exact search), holding L2-normalised float32 vectors so that inner product is
cosine similarity. FAISS ids are the store's int64 ``seq`` of each item; the index keeps the map
from id to (item_id, subject) so that a search needs no store round trip.

Metadata filters (``service.engine.metadata_filter``) are applied inside the FAISS search: each
index
keeps postings ``(key, canonical value) -> seqs`` of its items' top-level scalar metadata, and a
filtered search passes the intersection as an ``IDSelectorBatch`` in ``SearchParameters``, so it
returns the k best among the matching items (not the matching ones among the k best). Where the
index cannot take a selector (GPU indexes), the matching vectors are reconstructed and scored
exactly.

Deletes call ``remove_ids`` where the index supports it. GPU indexes and some CPU ones (HNSW)
cannot remove: their ids become tombstones that searches over-fetch past and filter out, and the
index is rebuilt from the live vectors once tombstones pile up. Factories that need training (IVF,
PQ) are trained on the tenant's vectors at rebuild when there are enough of them; until then the
tenant gets an exact flat index.

``Torch`` (the factory string) is an exact engine in torch instead of FAISS (:class:`TorchFlat`):
a matrix product and a top-k, blockwise over the gallery, the same code on CPU and CUDA; on CPU
it returns what ``Flat`` returns (``tests/service/engine/test_index.py``). It is the GPU path
when this faiss build has no GPU support: with ``Flat``, a CUDA device and ``device`` not
``cpu``, the indexes use ``TorchFlat`` on the GPU.

The GPU is used only when this faiss build has GPU support (or the torch engine serves) and CUDA
is present: decided once per process, and logged. Every method is blocking and guarded by a
per-tenant lock: call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import faiss
import numpy as np

from service.engine.metadata_filter import filter_terms, terms
from service.engine.rwlock import ReadWriteLock
from tcm.asnorm import Cohort, CohortStats, as_norm

log = logging.getLogger(__name__)

_MIN_TRAIN_PER_CENTROID = 39  # faiss's own warning threshold for k-means


@dataclass(frozen=True)
class Hit:
    """A candidate. ``score`` is what decisions use: the cosine, or with an AS-norm cohort the
    AS-normalised score, with the raw ``cosine`` beside it (None without a cohort, where the
    score is the cosine). Candidates are ranked by cosine either way."""

    seq: int
    item_id: str
    subject: str
    score: float
    cosine: float | None = None


TORCH_FACTORY = "Torch"


# An indexed item's id and subject in one string, "<item id>\x00<subject>": at a million
# items per tenant this saves about 90 MB over a tuple of two strings (a tuple and one string
# object fewer per item). Ids containing NUL (possible only for items stored before ids had a
# pattern) keep the tuple.
PackedItem = str | tuple[str, str]


_omp_thread = threading.local()  # the OpenMP thread count set in this thread (0: none)


def use_omp_threads(threads: int) -> None:
    """Sets FAISS's OpenMP thread count for the calling thread (once per thread; 0: leave
    OpenMP's default). OpenMP keeps the count per thread: ``omp_set_num_threads`` in the main
    thread at start-up left every worker thread that searches at the default, one thread per
    core (issue 32: the service searched with 2 threads while ``TCM_INDEX_THREADS=1``)."""
    if threads > 0 and getattr(_omp_thread, "threads", 0) != threads:
        faiss.omp_set_num_threads(threads)
        _omp_thread.threads = threads


def _pack(item_id: str, subject: str) -> PackedItem:
    return (item_id, subject) if "\x00" in item_id else f"{item_id}\x00{subject}"


def _unpack(packed: PackedItem) -> tuple[str, str]:
    if isinstance(packed, tuple):
        return packed
    cut = packed.index("\x00")
    return packed[:cut], packed[cut + 1 :]


class GalleryChunk(Protocol):
    """Row-aligned items to index (the store's ``GalleryVectors``; the index does not import
    the store)."""

    seqs: np.ndarray
    item_ids: list[str]
    subjects: list[str]
    vectors: np.ndarray
    metadata: list[dict[str, Any]] | None

    def __len__(self) -> int: ...


class TorchFlat:
    """Exact inner-product search in torch, with FAISS's index interface where the service uses
    it (``add_with_ids``, ``search``, ``remove_ids``, ``reconstruct_batch``, ``ntotal``).

    Vectors live in one preallocated tensor (grown by doubling) on ``device``; a search multiplies
    the queries with a block of gallery rows at a time and keeps a running top-k, so its memory is
    ``queries x block`` scores, not ``queries x gallery``. The block is as large as
    ``max_scores`` allows (at least ``block`` rows), so a few queries score a large gallery in
    one product and one top-k rather than a chain of small ones (on a GPU each launch and the
    running merge cost more than the product; docs/benchmarks.md). Removal moves the last row
    into the hole (O(1) per id).
    """

    def __init__(
        self, dim: int, device: str = "cpu", *, block: int = 65536, max_scores: int = 1 << 24
    ) -> None:
        import torch

        self._torch = torch
        self.d = dim
        self.device = torch.device(device)
        self.block = block
        self.max_scores = max_scores
        self._vectors = torch.zeros((0, dim), dtype=torch.float32, device=self.device)
        self._ids = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._row: dict[int, int] = {}
        self.ntotal = 0

    def _reserve(self, n: int) -> None:
        cap = self._vectors.shape[0]
        if n <= cap:
            return
        new_cap = max(n, 2 * cap, 1024)
        grown = self._torch.zeros((new_cap, self.d), dtype=self._torch.float32, device=self.device)
        grown[: self.ntotal] = self._vectors[: self.ntotal]
        ids = self._torch.full((new_cap,), -1, dtype=self._torch.int64, device=self.device)
        ids[: self.ntotal] = self._ids[: self.ntotal]
        self._vectors, self._ids = grown, ids

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        n = len(ids)
        self._reserve(self.ntotal + n)
        lo = self.ntotal
        self._vectors[lo : lo + n] = self._torch.from_numpy(np.ascontiguousarray(vectors)).to(
            self.device
        )
        self._ids[lo : lo + n] = self._torch.from_numpy(np.asarray(ids, np.int64)).to(self.device)
        for i, x in enumerate(np.asarray(ids, np.int64).tolist()):
            self._row[x] = lo + i
        self.ntotal += n

    def remove_ids(self, ids: np.ndarray) -> int:
        removed = 0
        for x in np.asarray(ids, np.int64).tolist():
            row = self._row.pop(x, None)
            if row is None:
                continue
            last = self.ntotal - 1
            if row != last:
                self._vectors[row] = self._vectors[last]
                moved = int(self._ids[last])
                self._ids[row] = moved
                self._row[moved] = row
            self._ids[last] = -1
            self.ntotal -= 1
            removed += 1
        return removed

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        rows = [self._row[int(x)] for x in np.asarray(ids, np.int64)]
        return self._vectors[rows].cpu().numpy()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        nq = q.shape[0]
        best_s = torch.full((nq, k), -float("inf"), device=self.device)
        best_i = torch.full((nq, k), -1, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            block = max(self.block, self.max_scores // max(nq, 1))
            for lo in range(0, self.ntotal, block):
                hi = min(self.ntotal, lo + block)
                scores = q @ self._vectors[lo:hi].T
                kk = min(k, hi - lo)
                s, i = torch.topk(scores, kk, dim=1)
                cand_s = torch.cat([best_s, s], dim=1)
                cand_i = torch.cat([best_i, self._ids[lo:hi][i]], dim=1)
                best_s, pos = torch.topk(cand_s, k, dim=1)
                best_i = torch.gather(cand_i, 1, pos)
            best_i = torch.where(torch.isinf(best_s), -1, best_i)  # fewer than k: pad as FAISS
        return best_s.cpu().numpy(), best_i.cpu().numpy()


def torch_cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


def gpu_available(device: str) -> bool:
    """Whether indexes go to the GPU: needs faiss GPU support, a CUDA device, and device != cpu."""
    if device == "cpu":
        return False
    has_gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if not has_gpu_faiss:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return True


class TenantIndex:
    def __init__(
        self,
        dim: int,
        factory: str,
        *,
        gpu_resources: object | None = None,
        tombstone_limit: int = 1024,
        torch_device: str | None = None,
        search_params: str = "",
        cohort: Cohort | None = None,
        threads: int = 0,
    ) -> None:
        self.dim = dim
        self.search_params = search_params
        self.factory = factory
        self.threads = threads  # FAISS's OpenMP threads in whichever thread calls (0: default)
        # AS-norm (the artefact's cohort): each item's cohort statistics are computed when it
        # enters the index, whatever the path (enrolment, start-up, resync, re-embed, change
        # feed, compaction), and kept beside it; a probe's per search
        self.cohort = cohort
        self._stats: dict[int, tuple[float, float]] = {}  # seq -> (mean, std)
        # the torch engine: for factory "Torch", or for "Flat" on a GPU faiss cannot use
        self._torch_device = torch_device or ("cpu" if factory == TORCH_FACTORY else None)
        self._gpu_res = gpu_resources
        self._tombstone_limit = tombstone_limit
        # searches share the lock, changes take it alone (a GPU index searches alone too:
        # faiss's GPU resources are not for concurrent use)
        self._lock = ReadWriteLock()
        self._search_lock = self._lock.exclusive if gpu_resources is not None else self._lock.shared
        self._items: dict[int, PackedItem] = {}  # seq -> item id and subject (_pack)
        # seq -> its metadata terms, each term one shared object (see _add_locked)
        self._terms: dict[int, tuple[tuple[str, str], ...]] = {}
        self._postings: dict[tuple[str, str], set[int]] = {}
        self._canon: dict[tuple[str, str], tuple[str, str]] = {}  # a term -> its shared object
        self._tombstones: set[int] = set()
        # the gallery's shape for the expected FPIR (tcm.openset.fpir_gallery): live photos per
        # subject, and how many subjects have each photo count (one dict entry per subject)
        self._photos: dict[str, int] = {}
        self._shape: dict[int, int] = {}
        self._index = self._empty_index(trainable_vectors=None)

    # --- construction ----------------------------------------------------------------------
    def _empty_index(self, trainable_vectors: np.ndarray | None) -> faiss.Index | TorchFlat:
        if self._torch_device is not None:
            return TorchFlat(self.dim, self._torch_device)
        base = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        if not base.is_trained:
            n = 0 if trainable_vectors is None else len(trainable_vectors)
            nlist = int(getattr(faiss.extract_index_ivf(base), "nlist", 1)) if _is_ivf(base) else 1
            if n >= max(nlist * _MIN_TRAIN_PER_CENTROID, 256):
                base.train(trainable_vectors)
            else:
                base = faiss.IndexFlatIP(self.dim)
        if self.search_params and not isinstance(base, faiss.IndexFlat):
            faiss.ParameterSpace().set_index_parameters(base, self.search_params)
        index = faiss.IndexIDMap2(base)
        if self._gpu_res is not None:
            index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
        return index

    def rebuild(
        self,
        seqs: np.ndarray,
        item_ids: list[str],
        subjects: list[str],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Replaces the contents (training the factory's index on these vectors if it needs it)."""
        use_omp_threads(self.threads)
        vectors = _as_matrix(vectors, self.dim)
        with self._lock.exclusive():
            self._reset_locked(vectors)
            self._add_locked(
                np.asarray(seqs, np.int64),
                item_ids,
                subjects,
                vectors,
                [list(terms(m)) for m in metadata] if metadata is not None else None,
            )

    def rebuild_chunks(self, chunks: Iterable[GalleryChunk]) -> None:
        """Replaces the contents with streamed chunks (start-up, resync): vectors go into the
        index chunk by chunk, so the peak memory is the index plus one chunk, not every row at
        once. A factory that must be trained first (IVF) needs all vectors for training: its
        chunks are gathered (as arrays only) for one :meth:`rebuild`. The new contents are
        built aside and swapped in, so searches meanwhile answer from the old ones instead of
        waiting for the whole store read."""
        fresh = TenantIndex(
            self.dim,
            self.factory,
            gpu_resources=self._gpu_res,
            tombstone_limit=self._tombstone_limit,
            torch_device=self._torch_device,
            search_params=self.search_params,
            cohort=self.cohort,
            threads=self.threads,
        )
        if self._needs_training():
            parts = list(chunks)
            if parts:
                fresh.rebuild(
                    np.concatenate([c.seqs for c in parts]),
                    [i for c in parts for i in c.item_ids],
                    [x for c in parts for x in c.subjects],
                    np.concatenate([_as_matrix(c.vectors, self.dim) for c in parts]),
                    [m for c in parts for m in (c.metadata or [{}] * len(c))],
                )
        else:
            for c in chunks:
                fresh.add(c.seqs, c.item_ids, c.subjects, c.vectors, c.metadata)
        with self._lock.exclusive():
            self._index, self._items, self._terms = fresh._index, fresh._items, fresh._terms
            self._postings, self._tombstones = fresh._postings, fresh._tombstones
            self._canon, self._photos, self._shape = fresh._canon, fresh._photos, fresh._shape
            self._stats = fresh._stats

    def _needs_training(self) -> bool:
        if self._torch_device is not None:
            return False
        return not faiss.index_factory(
            self.dim, self.factory, faiss.METRIC_INNER_PRODUCT
        ).is_trained

    # --- mutation --------------------------------------------------------------------------
    def add(
        self,
        seqs: list[int] | np.ndarray,
        item_ids: list[str],
        subjects: list[str],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """``metadata``, row-aligned, makes the items findable by a filtered search."""
        use_omp_threads(self.threads)
        with self._lock.exclusive():
            self._add_locked(
                np.asarray(seqs, np.int64),
                item_ids,
                subjects,
                _as_matrix(vectors, self.dim),
                [list(terms(m)) for m in metadata] if metadata is not None else None,
            )

    def _add_locked(
        self,
        seqs: np.ndarray,
        item_ids: list[str],
        subjects: list[str],
        vectors: np.ndarray,
        item_terms: list[list[tuple[str, str]]] | None,
    ) -> None:
        assert len(seqs) == len(item_ids) == len(subjects) == len(vectors)
        fresh = np.array([int(s) not in self._items for s in seqs], dtype=bool)
        if not fresh.any():
            return
        self._index.add_with_ids(vectors[fresh], seqs[fresh])
        if self.cohort is not None:
            st = self.cohort.stats(vectors[fresh])
            pairs = zip(st.mean.tolist(), st.std.tolist(), strict=True)
            self._stats.update(zip(seqs[fresh].tolist(), pairs, strict=True))
        for row, (s, iid, subj, ok) in enumerate(zip(seqs, item_ids, subjects, fresh, strict=True)):
            if ok:
                seq = int(s)  # one int object per item, shared by its postings
                self._items[seq] = _pack(iid, subj)
                self._count_photo_locked(subj, +1)
                if item_terms is not None and item_terms[row]:
                    # a term (key, value) shared by many items is one object, referenced from
                    # each item's tuple: ~8 bytes per item and term instead of a tuple and two
                    # strings each (191 -> 55 B per term with the posting: test_index.py prints it)
                    shared = tuple(self._canon.setdefault(t, t) for t in item_terms[row])
                    self._terms[seq] = shared
                    for t in shared:
                        self._postings.setdefault(t, set()).add(seq)

    def _count_photo_locked(self, subject: str, delta: int) -> None:
        before = self._photos.get(subject, 0)
        after = before + delta
        for photos, change in ((before, -1), (after, +1)):
            if photos > 0:
                left = self._shape.get(photos, 0) + change
                if left:
                    self._shape[photos] = left
                else:
                    del self._shape[photos]
        if after:
            self._photos[subject] = after
        else:
            del self._photos[subject]

    def _forget_terms_locked(self, seq: int) -> None:
        for t in self._terms.pop(seq, ()):
            posting = self._postings.get(t)
            if posting is not None:
                posting.discard(seq)
                if not posting:
                    del self._postings[t]
                    self._canon.pop(t, None)

    def remove(self, seqs: list[int]) -> None:
        use_omp_threads(self.threads)
        with self._lock.exclusive():
            present = [s for s in seqs if s in self._items]
            if not present:
                return
            for s in present:
                self._count_photo_locked(_unpack(self._items.pop(s))[1], -1)
                self._stats.pop(s, None)
                self._forget_terms_locked(s)
            ids = np.asarray(present, np.int64)
            try:
                self._index.remove_ids(ids)
            except RuntimeError:  # GPU, HNSW, ...: not removable; filter at search time
                self._tombstones.update(present)
                if len(self._tombstones) > max(self._tombstone_limit, len(self._items)):
                    self._compact_locked()

    def _reset_locked(self, vectors: np.ndarray) -> None:
        """Empty contents: a new index (trained on ``vectors`` if its factory needs it)."""
        self._index = self._empty_index(trainable_vectors=vectors if len(vectors) else None)
        self._items = {}
        self._terms = {}
        self._postings = {}
        self._canon = {}
        self._tombstones = set()
        self._photos = {}
        self._shape = {}
        self._stats = {}

    def _compact_locked(self) -> None:
        live = np.fromiter(self._items.keys(), dtype=np.int64, count=len(self._items))
        vectors = (
            self._index.reconstruct_batch(live)
            if len(live)
            else np.zeros((0, self.dim), np.float32)
        )
        items, item_terms, stats = dict(self._items), dict(self._terms), self._stats
        self._reset_locked(vectors)
        pairs = [_unpack(items[int(s)]) for s in live]
        self._add_locked(
            live,
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            _as_matrix(vectors, self.dim),
            [list(item_terms.get(int(s), ())) for s in live],
        )
        if self.cohort is not None:  # the items' own statistics, not a lossy index's rebuild
            self._stats = {int(s): stats[int(s)] for s in live}
        log.info("compacted a FAISS index to %d live vectors", len(live))

    # --- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def cohort_stats(self, seqs: Sequence[int]) -> CohortStats:
        """The kept AS-norm statistics of indexed items (KeyError: not indexed; needs a
        cohort)."""
        with self._lock.shared():
            rows = [self._stats[int(s)] for s in seqs]
        mean = np.array([r[0] for r in rows], np.float32)
        return CohortStats(mean, np.array([r[1] for r in rows], np.float32))

    def shape(self) -> dict[int, int]:
        """The gallery's shape: ``{photos: number of subjects with that many live photos}``."""
        with self._lock.shared():
            return dict(self._shape)

    def held(self, seqs: Sequence[int]) -> list[bool]:
        """Whether each seq is in the index (live)."""
        with self._lock.shared():
            return [int(s) in self._items for s in seqs]

    def matching(self, where: Mapping[str, Any]) -> set[int]:
        """Seqs of the live items whose metadata passes the filter."""
        wanted = filter_terms(where)
        with self._lock.shared():
            return self._matching_locked(wanted)

    def _matching_locked(self, wanted: list[tuple[str, str]]) -> set[int]:
        postings = sorted((self._postings.get(t, set()) for t in wanted), key=len)
        if not postings or not postings[0]:
            return set()
        out = set(postings[0])
        for p in postings[1:]:
            out &= p
        return out

    def search(
        self, queries: np.ndarray, k: int, where: Mapping[str, Any] | None = None
    ) -> list[list[Hit]]:
        """Top-k hits per query row, best first (fewer when the gallery is smaller); with
        ``where``, the top k among the items whose metadata passes that filter."""
        use_omp_threads(self.threads)
        queries = _as_matrix(queries, self.dim)
        wanted = filter_terms(where) if where else None
        probes = self.cohort.stats(queries) if self.cohort is not None else None
        with self._search_lock():
            n = len(self._items)
            if n == 0 or k <= 0:
                return [[] for _ in range(len(queries))]
            if wanted is not None:
                allowed = self._matching_locked(wanted)
                if not allowed:
                    return [[] for _ in range(len(queries))]
                scores, ids = self._filtered_search_locked(queries, min(k, len(allowed)), allowed)
            else:
                fetch = min(k + len(self._tombstones), n + len(self._tombstones))
                scores, ids = self._index.search(queries, fetch)
            items = self._items
            out = []
            for row_s, row_i in zip(scores, ids, strict=True):
                hits = []
                for s, i in zip(row_s, row_i, strict=True):
                    packed = items.get(int(i))
                    if i < 0 or packed is None:
                        continue
                    entry = _unpack(packed)
                    hits.append(
                        Hit(int(i), entry[0], entry[1], float(min(1.0, max(-1.0, float(s)))))
                    )
                    if len(hits) == k:
                        break
                out.append(hits)
            if probes is None:
                return out
            item_stats = [[self._stats[h.seq] for h in hits] for hits in out]
        return [
            _normalised(hits, rows, probes.take(np.array([q])))
            for q, (hits, rows) in enumerate(zip(out, item_stats, strict=True))
        ]

    def _params(self, selector: faiss.IDSelector) -> faiss.SearchParameters:
        """Search parameters carrying the selector, of the type the inner index expects (IVF
        ones keep the index's nprobe)."""
        try:
            ivf = faiss.extract_index_ivf(self._index)
        except RuntimeError:
            return faiss.SearchParameters(sel=selector)
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)

    def _filtered_search_locked(
        self, queries: np.ndarray, k: int, allowed: set[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        ids = np.fromiter(sorted(allowed), dtype=np.int64, count=len(allowed))
        if isinstance(self._index, TorchFlat):  # no selector in the torch engine
            return self._exact_among(queries, k, ids)
        # faiss.contrib.torch_utils (imported by pytorch-metric-learning, e.g. in a process
        # that also trains) replaces ``search`` process-wide with a version that takes no
        # ``params``, keeping FAISS's own as ``search_numpy``
        search = getattr(self._index, "search_numpy", self._index.search)
        try:
            return search(queries, k, params=self._params(faiss.IDSelectorBatch(ids)))
        except RuntimeError:  # GPU indexes take no selector: score the few exactly
            return self._exact_among(queries, k, ids)

    def _exact_among(
        self, queries: np.ndarray, k: int, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        vectors = self._index.reconstruct_batch(ids)
        scores = queries @ vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), ids[order]


class IndexRegistry:
    """All tenants' indexes; created on first use, dropped with the tenant."""

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        *,
        device: str = "cpu",
        search_params: str = "",
        threads: int = 0,
        cohort: Cohort | None = None,
    ) -> None:
        self.threads = threads  # set in each thread that calls FAISS (use_omp_threads)
        self.dim = dim
        self.factory = factory
        self.search_params = search_params
        self.cohort = cohort
        if cohort is not None and cohort.dim != dim:
            raise ValueError(f"the AS-norm cohort has dimension {cohort.dim}, the index {dim}")
        self._torch_device: str | None = None
        if factory == TORCH_FACTORY:
            self.on_gpu = device != "cpu" and torch_cuda_available()
            self._torch_device = "cuda" if self.on_gpu else "cpu"
            self._gpu_res = None
        else:
            # check the factory string once, at start-up, not at a tenant's first enrolment
            faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            self.on_gpu = gpu_available(device)
            self._gpu_res = faiss.StandardGpuResources() if self.on_gpu else None
            if not self.on_gpu and factory == "Flat" and device != "cpu" and torch_cuda_available():
                self.on_gpu, self._torch_device = True, "cuda"  # no faiss-gpu: torch on CUDA
        engine = "torch" if self._torch_device else "FAISS"
        log.info(
            "%s indexes: factory=%r dim=%d on %s",
            engine,
            factory,
            dim,
            "GPU" if self.on_gpu else "CPU",
        )
        self._lock = threading.Lock()
        self._indexes: dict[str, TenantIndex] = {}
        # tenants dropped from this registry: ids are never reused, so a late request of a
        # deleted tenant (authenticated just before the delete) gets a throwaway empty index
        # instead of re-creating one that would stay in memory and in the size metric
        self._dropped: set[str] = set()

    @property
    def concurrent_searches(self) -> bool:
        """Whether one tenant's index answers searches from several threads at once (CPU
        FAISS and the torch engine; not FAISS's GPU indexes)."""
        return self._gpu_res is None

    def fresh(self) -> TenantIndex:
        """A new empty index of this registry's kind, not registered (:meth:`put` it)."""
        return TenantIndex(
            self.dim,
            self.factory,
            gpu_resources=self._gpu_res,
            torch_device=self._torch_device,
            search_params=self.search_params,
            cohort=self.cohort,
            threads=self.threads,
        )

    def get(self, tenant_id: str) -> TenantIndex:
        with self._lock:
            index = self._indexes.get(tenant_id)
            if index is None:
                index = self.fresh()
                if tenant_id not in self._dropped:
                    self._indexes[tenant_id] = index
            return index

    def put(self, tenant_id: str, index: TenantIndex) -> bool:
        """Installs ``index`` (built off the registry, e.g. a tenant moving to this replica's
        shard group) as the tenant's; False, and nothing installed, for a deleted tenant."""
        with self._lock:
            if tenant_id in self._dropped:
                return False
            self._indexes[tenant_id] = index
            return True

    def drop(self, tenant_id: str) -> None:
        """The tenant was deleted: its index goes, and a late request gets a throwaway one."""
        with self._lock:
            self._indexes.pop(tenant_id, None)
            self._dropped.add(tenant_id)

    def release(self, tenant_id: str) -> None:
        """The tenant moved to another shard group: its index goes (it may come back)."""
        with self._lock:
            self._indexes.pop(tenant_id, None)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {t: len(ix) for t, ix in self._indexes.items()}

    def shapes(self) -> dict[str, dict[int, int]]:
        """Each tenant's gallery shape (:meth:`TenantIndex.shape`)."""
        with self._lock:
            indexes = dict(self._indexes)
        return {t: ix.shape() for t, ix in indexes.items()}

    def clear(self) -> None:
        with self._lock:
            self._indexes.clear()


def _normalised(hits: list[Hit], items: list[tuple[float, float]], probe: CohortStats) -> list[Hit]:
    """The hits (in their cosine order) with the AS-normalised score, the cosine beside it."""
    if not hits:
        return hits
    cos = np.array([h.score for h in hits], np.float64)
    left = CohortStats(
        np.array([m for m, _ in items], np.float32), np.array([s for _, s in items], np.float32)
    )
    right = probe.take(np.zeros(len(hits), dtype=np.int64))
    scores = as_norm(cos, left, right).tolist()
    return [
        Hit(h.seq, h.item_id, h.subject, float(v), h.score)
        for h, v in zip(hits, scores, strict=True)
    ]


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def _as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim == 1:
        v = v.reshape(1, -1) if v.size else v.reshape(0, dim)
    if v.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got {v.shape}")
    return v
