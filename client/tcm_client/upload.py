"""Bulk upload (``Client.upload``, ``AsyncClient.upload``): many items by embedding, batched,
optionally in parallel, resumable.

The input is a numpy matrix (n, d) with its subjects (and optional ids and metadata), or an
iterable of items: ``(subject, vector)``, ``(subject, vector, metadata)``,
``(subject, vector, metadata, item_id)`` or mappings with those keys (``embedding`` for the
vector). Each batch is one ``POST /v1/gallery/columns``: the vectors as one base64 float32
matrix, which the service decodes in one step.

**Resume by id.** Every item has an id: the caller's, or one derived from its content
(:func:`item_id_for`: a hash of subject, float32 vector and metadata), so the same input gives
the same ids on every run. Every batch carries an ``Idempotency-Key`` derived from its body, so
a batch resent (its answer lost, or the whole upload run again within the service's
idempotency window, 24 h by default) gets the first answer and writes nothing; after that
window an item whose id is stored already is answered 409 ``duplicate_item_id``, and the batch
is sent again without the items that 409 names (``resume=False``: raised instead). Either way a
rerun skips what was stored, and never duplicates an item; items the input repeats exactly
(same subject, vector and metadata: the same content id) are stored once. A batch the service
finds too large (413, or more items than its ``max_enrol_items``) is split in halves.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# a batch's body stays under this many bytes (the service's default limit is 16 MiB)
MAX_BATCH_BYTES = 8 * 1024 * 1024
DEFAULT_BATCH_SIZE = 2000
Progress = bool | Callable[[int], None]


def item_id_for(
    subject: str, vector: np.ndarray | Sequence[float], metadata: Mapping[str, Any] | None = None
) -> str:
    """The id :meth:`Client.upload` gives an item that has none: 32 hex digits of a hash of its
    subject, its vector as little-endian float32 and its metadata (as sorted JSON)."""
    row = np.ascontiguousarray(np.asarray(vector, dtype="<f4").reshape(-1)).tobytes()
    return _content_id(subject, row, _meta_bytes(metadata))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _meta_bytes(metadata: Mapping[str, Any] | None) -> bytes:
    if not metadata:
        return b""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()


def _content_id(subject: str, row: bytes, meta: bytes) -> str:
    h = hashlib.blake2b(subject.encode(), digest_size=16)
    h.update(b"\x00")
    h.update(row)
    if meta:
        h.update(b"\x00")
        h.update(meta)
    return h.hexdigest()


@dataclass(frozen=True)
class Batch:
    """Rows ``start..`` of the input, as one columnar request."""

    start: int
    subjects: list[str]
    rows: np.ndarray  # (k, d) little-endian float32
    ids: list[str]
    metadata: list[dict[str, Any]] | None
    repeated: int = 0  # items of these rows left out: the input repeats them (same id)

    def __len__(self) -> int:
        return len(self.ids)

    def body(self) -> bytes:
        """The request's JSON, assembled around the matrix's base64 bytes (base64 needs no
        JSON escaping: the megabytes of it are not scanned again)."""
        parts = [
            b'{"subjects":',
            _json(self.subjects),
            b',"embeddings_b64":"',
            base64.b64encode(np.ascontiguousarray(self.rows, dtype="<f4").tobytes()),
            b'","item_ids":',
            _json(self.ids),
        ]
        if self.metadata is not None:
            parts += [b',"metadata":', _json(self.metadata)]
        parts.append(b"}")
        return b"".join(parts)

    def key(self, body: bytes) -> str:
        """The batch's ``Idempotency-Key``: the same body, the same key."""
        return "upload-" + hashlib.blake2b(body, digest_size=20).hexdigest()

    def without(self, ids: set[str]) -> Batch:
        keep = [i for i, item_id in enumerate(self.ids) if item_id not in ids]
        return self._take(keep)

    def halves(self) -> tuple[Batch, Batch]:
        mid = len(self) // 2
        return self._take(list(range(mid))), self._take(list(range(mid, len(self))))

    def _take(self, keep: list[int]) -> Batch:
        return Batch(
            self.start + (keep[0] if keep else 0),
            [self.subjects[i] for i in keep],
            self.rows[keep],
            [self.ids[i] for i in keep],
            None if self.metadata is None else [self.metadata[i] for i in keep],
        )


@dataclass(frozen=True)
class UploadResult:
    """What an upload did: ``items`` read from the input, ``stored`` by this call, ``already``
    stored before it (an earlier run, or an earlier attempt whose answer was lost; items the
    input repeats count here too), ``requests`` sent (retries under the retry policy not
    counted), ``seconds`` taken."""

    items: int
    stored: int
    already: int
    requests: int
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


class UploadError(Exception):
    """An upload that stopped: the batch of input rows ``rows`` was refused or could not be
    sent (the cause is ``__cause__``: an ``ApiError`` or a ``TransportFailure``). ``done``: the
    result up to then. Run the same upload again to go on: what was stored is skipped."""

    def __init__(self, message: str, *, rows: range, done: UploadResult) -> None:
        super().__init__(message)
        self.rows, self.done = rows, done


@dataclass(frozen=True)
class Plan:
    batches: Iterator[Batch]
    total: int | None  # items in the input, when known up front


def plan(
    source: np.ndarray | Iterable[Any],
    subjects: Sequence[str] | None,
    ids: Sequence[str] | None,
    metadata: Sequence[Mapping[str, Any]] | None,
    batch_size: int | None,
) -> Plan:
    """The input as batches (see the module)."""
    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise ValueError(f"vectors must be an (n, d) matrix, got shape {source.shape}")
        n = len(source)
        if subjects is None or len(subjects) != n:
            raise ValueError(f"give one subject per row: {n} rows, subjects {_len(subjects)}")
        for name, column in (("ids", ids), ("metadata", metadata)):
            if column is not None and len(column) != n:
                raise ValueError(f"{name} has {len(column)} entries for {n} rows")
        size = _batch_size(batch_size, source.shape[1])
        return Plan(_matrix_batches(source, subjects, ids, metadata, size), n)
    if subjects is not None or ids is not None or metadata is not None:
        raise ValueError("subjects, ids and metadata go with a matrix; items carry their own")
    total = len(source) if isinstance(source, Sequence) else None
    return Plan(_item_batches(iter(source), batch_size), total)


def _len(column: Sequence[Any] | None) -> str:
    return "none" if column is None else str(len(column))


def _batch_size(batch_size: int | None, dim: int) -> int:
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        return batch_size
    per_row = (dim * 4 + 2) // 3 * 4 + 120  # base64 of the row, its subject, id, separators
    return max(1, min(DEFAULT_BATCH_SIZE, MAX_BATCH_BYTES // per_row))


def _matrix_batches(
    vectors: np.ndarray,
    subjects: Sequence[str],
    ids: Sequence[str] | None,
    metadata: Sequence[Mapping[str, Any]] | None,
    size: int,
) -> Iterator[Batch]:
    for lo in range(0, len(vectors), size):
        hi = min(len(vectors), lo + size)
        rows = np.ascontiguousarray(vectors[lo:hi], dtype="<f4")
        meta = None if metadata is None else [dict(m) for m in metadata[lo:hi]]
        yield _batch(
            lo,
            list(subjects[lo:hi]),
            rows,
            None if ids is None else list(ids[lo:hi]),
            meta,
        )


def _item_batches(items: Iterator[Any], batch_size: int | None) -> Iterator[Batch]:
    first = next(items, None)
    if first is None:
        return
    parsed = _item(first, 0)
    size = batch_size if batch_size is not None else _batch_size(None, len(parsed[1]))
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    rows_in = enumerate(itertools.chain([first], items))
    start = 0
    while chunk := list(itertools.islice(rows_in, size)):
        parsed_chunk = [_item(it, row) for row, it in chunk]
        dims = {len(p[1]) for p in parsed_chunk}
        if len(dims) > 1:
            raise ValueError(f"items from row {start} on have vectors of dimensions {sorted(dims)}")
        subjects = [p[0] for p in parsed_chunk]
        rows = np.stack([p[1] for p in parsed_chunk])
        has_meta = any(p[2] is not None for p in parsed_chunk)
        meta = [p[2] or {} for p in parsed_chunk] if has_meta else None
        given = [p[3] for p in parsed_chunk]
        ids: list[str] | None = None
        if any(g is not None for g in given):
            content = _ids(subjects, rows, meta)
            ids = [str(g) if g is not None else c for g, c in zip(given, content, strict=True)]
        yield _batch(start, subjects, rows, ids, meta)
        start += len(chunk)


def _item(item: Any, row: int) -> tuple[str, np.ndarray, dict[str, Any] | None, str | None]:
    if isinstance(item, Mapping):
        subject, vector = item["subject"], item["embedding"]
        meta, item_id = item.get("metadata"), item.get("item_id")
    else:
        if not 2 <= len(item) <= 4:
            raise ValueError(
                f"row {row}: an item is (subject, vector[, metadata[, item_id]]), got "
                f"{len(item)} values"
            )
        subject, vector, meta, item_id = (*item, None, None)[:4]
    vec = np.asarray(vector, dtype="<f4").reshape(-1)
    return str(subject), vec, None if meta is None else dict(meta), item_id


def _ids(
    subjects: Sequence[str], rows: np.ndarray, metadata: Sequence[Mapping[str, Any]] | None
) -> list[str]:
    raw = rows.tobytes()
    width = rows.shape[1] * 4
    metas = [b""] * len(subjects) if metadata is None else [_meta_bytes(m) for m in metadata]
    return [
        _content_id(s, raw[i * width : (i + 1) * width], m)
        for i, (s, m) in enumerate(zip(subjects, metas, strict=True))
    ]


def _batch(
    start: int,
    subjects: list[str],
    rows: np.ndarray,
    ids: list[str] | None,
    metadata: list[dict[str, Any]] | None,
) -> Batch:
    rows = np.ascontiguousarray(rows, dtype="<f4")
    ids = _ids(subjects, rows, metadata) if ids is None else [str(i) for i in ids]
    batch = Batch(start, subjects, rows, ids, metadata)
    if len(set(ids)) == len(ids):
        return batch
    # the input repeats an item (its id): the first occurrence is sent, the others count as
    # stored already
    first: dict[str, int] = {}
    for i, item_id in enumerate(ids):
        first.setdefault(item_id, i)
    kept = batch._take(sorted(first.values()))
    return Batch(start, kept.subjects, kept.rows, kept.ids, kept.metadata, len(ids) - len(kept))


# --- settling a batch: what to send instead after an error ---------------------------------------
def after_error(batch: Batch, error: Exception, *, resume: bool) -> tuple[list[Batch], int]:
    """After ``error`` answered ``batch``: the batches to send instead and how many of its items
    were found stored already; re-raises ``error`` when nothing else is to be done."""
    status, code = getattr(error, "status", None), getattr(error, "code", None)
    if status == 409 and code == "duplicate_item_id" and resume:
        named = (getattr(error, "detail", None) or {}).get("item_ids") or []
        existing = set(named) & set(batch.ids)
        if existing:
            rest = batch.without(existing)
            return ([rest] if len(rest) else []), len(existing)
    if (status == 413 or (status == 422 and code == "too_many_items")) and len(batch) > 1:
        return list(batch.halves()), 0
    raise error


class Tally:
    """An upload in progress: its counts (shared by the threads or tasks sending batches) and
    its progress display."""

    def __init__(self, total: int | None, progress: Progress, started: float) -> None:
        self.total, self.started = total, started
        self.items = self.stored = self.already = self.requests = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        self._report: Callable[[int], None] | None = None
        if callable(progress):
            self._report = progress
        elif progress:
            self._bar = _bar(total)

    def planned(self, batch: Batch) -> None:
        """A batch of the input was read (its items, the ones it repeats included)."""
        with self._lock:
            self.items += len(batch) + batch.repeated

    def settled(self, stored: int, already: int, requests: int) -> None:
        with self._lock:
            self.stored += stored
            self.already += already
            self.requests += requests
            done = self.stored + self.already
            if self._report is not None:
                self._report(done)
            if self._bar is not None:
                self._bar.update(stored + already)

    def after_error(
        self, batch: Batch, error: Exception, *, resume: bool
    ) -> tuple[list[Batch], int]:
        """:func:`after_error`, and an :class:`UploadError` naming the batch's input rows when
        nothing else is to be done."""
        try:
            return after_error(batch, error, resume=resume)
        except Exception:
            rows = range(batch.start, batch.start + len(batch))
            raise UploadError(
                f"upload stopped at input rows {rows.start}..{rows.stop - 1}: {error} (run the "
                "same upload again to go on: what was stored is skipped)",
                rows=rows,
                done=self.result(),
            ) from error

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def result(self) -> UploadResult:
        with self._lock:
            seconds = time.perf_counter() - self.started
            return UploadResult(self.items, self.stored, self.already, self.requests, seconds)


def _bar(total: int | None) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineBar(total)
    return tqdm(total=total, unit="items", unit_scale=True, desc="upload")


class _LineBar:
    """A progress line on stderr when tqdm is not installed (``pip install './client[progress]'``
    for a bar)."""

    def __init__(self, total: int | None) -> None:
        self.total, self.done = total, 0

    def update(self, n: int) -> None:
        self.done += n
        of = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(f"\rupload: {self.done}{of} items")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
