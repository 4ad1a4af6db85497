"""The store's interface and the records it keeps.

The store is the system of record: tenants, API-key hashes, gallery items (with an embedding per
model version and, when enrolled from an image, the image bytes), match records and feedback.
FAISS indexes are caches rebuilt from it. Two implementations exist, embedded SQLite (default)
and Redis (shared by replicas); both pass the same test-suite.

Contract every implementation keeps:

- Methods are **blocking** and **thread-safe**; the service calls them from a thread pool, never
  on the event loop. ``close()`` is called once at shutdown.
- Every piece of tenant data is addressed by ``(tenant_id, ...)``: a lookup with another tenant's
  id behaves exactly as if the thing did not exist.
- A write that returns has been made durable (SQLite: WAL with ``synchronous=FULL``; Redis: as
  durable as the server is configured to be) and multi-record writes are all-or-nothing.
- When the backing server or file cannot be used, methods raise
  :class:`service.errors.StoreUnavailableError` (the API answers 503) and the next call tries
  again, so the service recovers without a restart.
- Conflicts (duplicate item ids, repeated feedback) raise :class:`service.errors.ConflictError`
  with the offending ids in ``detail``.
- Tenant names are unique under :func:`tenant_name_key` (case, Unicode form and spaces aside):
  :meth:`Store.create_tenant` refuses a taken name with :func:`duplicate_name`, atomically (two
  concurrent creates of one name never both succeed), and deleting a tenant frees its name.
- ``seq`` is a positive int64 assigned by the store, unique within its tenant and never reused; it
  is the id of the item's vector in its tenant's FAISS index. (SQLite and one Redis draw every
  tenant's seqs from one counter; Redis Cluster keeps a counter per tenant, in its slot.)
- Times are Unix seconds (float).

Reading for monitoring: :meth:`Store.list_tenants`, :meth:`Store.list_decisions` (match records
joined with their feedback, per tenant) and :meth:`Store.gallery_vectors` (a tenant's enrolled
embeddings with their subjects, for genuine/impostor pairs within the gallery) are the read API the
monitor builds its per-tenant FAR/FRR and live OPIS from; :meth:`Store.put_monitor_snapshot` /
:meth:`Store.get_monitor_snapshot` keep its latest result, so that every replica sharing the store
reports the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from service.errors import ConflictError
from service.metrics import Outcome

# rows per chunk when a gallery is streamed (start-up rebuild): 65,536 x 512-d float32 = 128 MiB
GALLERY_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    name: str
    created_at: float


def tenant_name_key(name: str) -> str:
    """What makes two tenant names the same: Unicode NFKC, case folded, runs of whitespace as
    one space, none at either end. ``"Acme"``, ``"ACME "`` and ``"acme"`` (full-width letters)
    are one name; the name is stored and shown as it was given."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def tenant_name_digest(name: str) -> str:
    """The sha256 (hex) of :func:`tenant_name_key`: a fixed-length key for the name index that
    no client-chosen text reaches."""
    return hashlib.sha256(tenant_name_key(name).encode()).hexdigest()


def duplicate_name(name: str, holder: str) -> ConflictError:
    """The 409 for a tenant name that is taken (by tenant ``holder``)."""
    return ConflictError(
        f"a tenant named {name!r} exists already (tenant {holder}): tenant names are unique, "
        "compared regardless of case, Unicode form and spaces at the ends or repeated",
        code="duplicate_tenant_name",
        detail={"name": name, "tenant_id": holder},
    )


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: only the sha256 of the token, never the token itself."""

    key_id: str
    tenant_id: str
    key_hash: str  # sha256 hex digest of the whole bearer token
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class NewItem:
    """A gallery item to enrol; ``embedding`` is float32, L2-normalised, for one model version."""

    item_id: str
    subject: str
    embedding: np.ndarray
    metadata: Mapping[str, Any] = field(default_factory=dict)
    image: bytes | None = None


@dataclass(frozen=True)
class GalleryItem:
    seq: int
    item_id: str
    subject: str
    metadata: dict[str, Any]
    created_at: float
    has_image: bool
    embedding: np.ndarray | None = None  # for the model version asked for; None when missing
    image: bytes | None = None  # only when asked for


@dataclass(frozen=True)
class GalleryVectors:
    """A tenant's embeddings for one model version, row-aligned, in ``seq`` order."""

    seqs: np.ndarray  # int64 (n,)
    item_ids: list[str]
    subjects: list[str]
    vectors: np.ndarray  # float32 (n, d)
    metadata: list[dict[str, Any]] | None = None  # row-aligned, when asked for

    @classmethod
    def empty(cls, dim: int) -> GalleryVectors:
        return cls(np.zeros(0, np.int64), [], [], np.zeros((0, dim), np.float32), [])

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class MatchRecord:
    """One 1:N decision, kept so that feedback can label it later."""

    match_id: str
    tenant_id: str
    accepted: bool
    subject: str | None  # the decided subject (None when rejected)
    top_item_id: str | None  # best candidate, also when rejected; None for an empty gallery
    top_subject: str | None
    score: float | None  # best candidate's score
    threshold: float
    model_version: str
    created_at: float


@dataclass(frozen=True)
class Feedback:
    """Ground truth for a match.

    ``genuine`` says whether the query and the best candidate share a subject (None when there was
    no candidate); ``outcome`` places the decision in the confusion matrix.
    """

    match_id: str
    tenant_id: str
    true_subject: str | None
    correct: bool | None
    genuine: bool | None
    outcome: Outcome
    created_at: float


@dataclass(frozen=True)
class Decision:
    """A match record with its feedback (None while unlabelled)."""

    match: MatchRecord
    feedback: Feedback | None


@dataclass(frozen=True)
class Idempotent:
    """An ``Idempotency-Key`` recorded with the write it came with, in the same transaction: the
    request's fingerprint and the write's answer (JSON), kept until ``expires_at``. A resend of
    the request finds it and gets the first answer, whether or not that answer reached the
    client; another request with the same key is told so."""

    key: str
    fingerprint: str
    result: str
    expires_at: float


class IdempotentReplay(Exception):
    """The write's key was already recorded (a concurrent send of the same request won):
    nothing was written; ``record`` is what the earlier send recorded."""

    def __init__(self, record: Idempotent) -> None:
        super().__init__(f"idempotency key {record.key!r} already recorded")
        self.record = record


@dataclass(frozen=True)
class Change:
    """One entry of the change feed replicas tail to keep their indexes in sync."""

    # "resync": entries after the reader's cursor are gone (the feed is capped); the reader must
    # rebuild from the store and follow on from a fresh change_cursor()
    op: Literal["add", "remove", "drop_tenant", "resync"]
    tenant_id: str
    item_ids: tuple[str, ...] = ()  # for "add": look their vectors up (they may be gone again)
    # for "remove"; for "add", row-aligned with item_ids (or empty: written before they were
    # recorded), so a replica skips items its index already holds (its own writes)
    seqs: tuple[int, ...] = ()


class StoreInUseError(RuntimeError):
    """Another serving process holds a store that only one process may serve from."""


@runtime_checkable
class Store(Protocol):
    # --- lifecycle -------------------------------------------------------------------------
    def ping(self) -> None:
        """Raises StoreUnavailableError unless the store answers."""

    def claim_serving(self) -> None:
        """Called once by a process that will serve from this store, before it reads or writes
        anything: raises StoreInUseError when the store cannot be shared and another process
        serves from it (SQLite: no change feed, so a second server's indexes would never see
        the first one's writes). Released by :meth:`close` or the process's exit."""

    def close(self) -> None: ...

    # --- tenants and keys ------------------------------------------------------------------
    def create_tenant(self, tenant: Tenant, key: ApiKey) -> None:
        """Creates the tenant together with its first key; a name that another tenant has
        (under :func:`tenant_name_key`) is a :func:`duplicate_name` conflict."""

    def get_tenant(self, tenant_id: str) -> Tenant | None: ...

    def list_tenants(self) -> list[Tenant]:
        """All tenants, oldest first."""

    def delete_tenant(self, tenant_id: str) -> bool:
        """Deletes the tenant and everything it owns; False if there was no such tenant."""

    def add_key(self, key: ApiKey, *, revoke_others_at: float | None = None) -> list[str]:
        """Adds a key; with ``revoke_others_at`` also revokes the tenant's other active keys in
        the same transaction. Returns the ids of the keys it revoked."""

    def get_key(self, key_id: str) -> ApiKey | None: ...

    def list_keys(self, tenant_id: str) -> list[ApiKey]:
        """The tenant's keys, revoked ones included, oldest first."""

    def revoke_key(self, tenant_id: str, key_id: str, at: float) -> bool:
        """Revokes one key (idempotent); False if the tenant has no such key."""

    # --- gallery ---------------------------------------------------------------------------
    def add_items(
        self,
        tenant_id: str,
        items: Sequence[NewItem],
        *,
        model_version: str,
        created_at: float,
        idempotency: Idempotent | None = None,
    ) -> list[int]:
        """Adds all items or none; returns their seqs in order. Raises ConflictError (detail
        ``{"item_ids": [...]}``) if any item id already exists for this tenant.
        ``idempotency`` is recorded in the same atomic step; if its key is already recorded
        (and not expired) nothing is written and IdempotentReplay carries the record."""

    def get_idempotent(self, tenant_id: str, key: str, *, now: float) -> Idempotent | None:
        """The tenant's record of ``key`` unless it expired before ``now``."""

    def get_item(
        self, tenant_id: str, item_id: str, *, model_version: str, with_image: bool = False
    ) -> GalleryItem | None: ...

    def list_items(
        self, tenant_id: str, *, subject: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> list[GalleryItem]:
        """Items with ``seq > after_seq`` in seq order (no embeddings, no images)."""

    def count_items(self, tenant_id: str) -> int: ...

    def put_item(
        self, tenant_id: str, item: NewItem, *, model_version: str, created_at: float
    ) -> tuple[int, int | None]:
        """Adds the item, or replaces the tenant's item with this id (subject, metadata, image,
        embeddings: the old item's embeddings of other model versions are dropped, and its
        ``created_at`` is kept), in one transaction. Returns (new seq, the replaced item's seq
        or None)."""

    def list_subjects(
        self, tenant_id: str, *, after: str | None = None, limit: int = 100
    ) -> list[tuple[str, int]]:
        """(subject, item count) of subjects after ``after`` in code-point order."""

    def delete_item(self, tenant_id: str, item_id: str) -> int | None:
        """Deletes an item; returns its seq, or None if there was no such item."""

    def delete_subject(self, tenant_id: str, subject: str) -> list[int]:
        """Deletes all items of a subject; returns their seqs (empty if none)."""

    def gallery_vectors(
        self,
        tenant_id: str,
        *,
        model_version: str,
        subject: str | None = None,
        with_metadata: bool = False,
    ) -> GalleryVectors:
        """Embeddings of one model version (optionally of one subject), items without one
        skipped; ``with_metadata`` adds each item's metadata (for filtered search)."""

    def iter_gallery_vectors(
        self, tenant_id: str, *, model_version: str, chunk_rows: int = GALLERY_CHUNK_ROWS
    ) -> Iterator[GalleryVectors]:
        """The tenant's whole gallery as :meth:`gallery_vectors` ``(with_metadata=True)`` gives
        it, in ``seq`` order, streamed in chunks of at most ``chunk_rows`` items: what rebuilding
        an index at start-up reads, without ever holding every row as Python objects at once.
        Consume it in one thread (a store may read it through a per-thread connection)."""
        ...

    def items_without_embedding(
        self, tenant_id: str, *, model_version: str
    ) -> list[tuple[str, bytes | None]]:
        """(item_id, image bytes or None) of items lacking an embedding for the version."""

    def put_embeddings(
        self, tenant_id: str, vectors: Mapping[str, np.ndarray], *, model_version: str
    ) -> None:
        """Stores embeddings of a model version for existing items (deleted ones skipped)."""

    def vectors_of_items(
        self, tenant_id: str, item_ids: Sequence[str], *, model_version: str
    ) -> GalleryVectors:
        """Embeddings of the given items that exist and have one for the version, with their
        metadata."""

    # --- matches and feedback --------------------------------------------------------------
    def add_match(self, record: MatchRecord) -> None: ...

    def add_matches(self, records: Sequence[MatchRecord]) -> None:
        """Stores several match records in one write (all or none)."""

    def deferred_matches(self) -> tuple[int, int]:
        """Match records :meth:`add_matches` accepted but has not written yet, and how many it
        has dropped since the process started: (waiting, dropped). Only a store that keeps
        records in memory while a shard has no master (Redis Cluster) has any."""

    def flush_deferred(self) -> int:
        """Writes the waiting match records whose shard is back; returns how many it wrote
        (those still without a master keep waiting)."""

    def get_match(self, tenant_id: str, match_id: str) -> MatchRecord | None: ...

    def add_feedback(self, feedback: Feedback) -> None:
        """Stores feedback for an existing match; ConflictError if it already has some."""

    def list_decisions(
        self,
        tenant_id: str,
        *,
        since: float = 0.0,
        labelled_only: bool = False,
        limit: int | None = None,
    ) -> list[Decision]:
        """Match records created at or after ``since``, oldest first, with their feedback.
        ``labelled_only`` reads only the records that have feedback (what the monitor uses),
        at a cost that grows with them, not with every match in the window."""

    def prune_decisions(self, tenant_id: str, *, before: float, keep: int) -> int:
        """Retention: deletes the tenant's match records (with their feedback) created before
        ``before``, and the oldest beyond the newest ``keep``; returns how many."""

    # --- monitoring ------------------------------------------------------------------------
    def put_monitor_snapshot(self, snapshot: Mapping[str, Any]) -> None:
        """Replaces the latest monitoring snapshot (a JSON-able dict; NaN/inf not allowed)."""

    def get_monitor_snapshot(self) -> dict[str, Any] | None:
        """The latest monitoring snapshot as stored, or None before the first one."""

    # --- model registry --------------------------------------------------------------------
    def get_model_registry(self) -> tuple[dict[str, Any] | None, int]:
        """The model registry document (None before the first write) and its revision (0
        before the first write)."""

    def put_model_registry(self, registry: Mapping[str, Any], *, expected_rev: int) -> bool:
        """Replaces the registry iff its revision is still ``expected_rev`` (compare-and-set:
        replicas racing to change it cannot overwrite each other); False when it moved on."""

    def delete_embeddings(self, model_version: str) -> int:
        """Drops every tenant's embeddings of one model version (retention); returns how many."""

    # --- change feed (replicas) ------------------------------------------------------------
    def get_placement(self) -> tuple[dict[str, Any] | None, int]:
        """The shard groups' placement table (``service.domain.placement``) and its revision;
        (None, 0) before one is written (and always, on a store of one process)."""

    def put_placement(self, table: Mapping[str, Any], *, expected_rev: int) -> bool:
        """Compare-and-set of the placement table: False when its revision is not
        ``expected_rev`` any more."""

    def put_replica(self, url: str, info: Mapping[str, Any], *, now: float) -> None:
        """A service replica's heartbeat: the URL peers forward to, its group and state."""

    def list_replicas(self, *, now: float, max_age_s: float) -> dict[str, dict[str, Any]]:
        """The replicas heard from within ``max_age_s`` (URL -> what they last said)."""

    def follow_only(self, tenants: Callable[[str], bool]) -> None:
        """Narrows :meth:`read_changes` to the tenants ``tenants`` accepts, where the store
        can read less for it (Redis Cluster: one stream per tenant); elsewhere the reader
        filters what it gets."""

    def change_cursor(self, tenant_id: str | None = None) -> str | None:
        """The feed's current end, to tail from after a rebuild; with ``tenant_id``, the
        position a consistency token of that tenant's write names (:meth:`feed_covers`);
        None when the store has no feed because only one process uses it (SQLite)."""

    def cursor_with(self, cursor: str, tenant_id: str, position: str) -> str:
        """``cursor`` reading ``tenant_id``'s changes from ``position`` (its
        :meth:`change_cursor`) on, for a reader that starts following the tenant (it moved
        into the reader's shard group); unchanged where one feed carries every tenant."""

    def feed_covers(self, cursor: str, token: str, tenant_id: str) -> bool:
        """Whether a reader at ``cursor`` (of :meth:`read_changes`) has read the write of
        ``tenant_id`` whose consistency token (:meth:`change_cursor` of that tenant right
        after it) is ``token``."""

    def read_changes(self, cursor: str, *, block_ms: int) -> tuple[str, list[Change]]:
        """Changes after ``cursor`` (waiting up to ``block_ms`` for one) and the new cursor.
        Every gallery write appends to the feed in the same transaction as the write."""

    def interrupt_changes(self) -> None:
        """Makes a :meth:`read_changes` blocked in another thread return now (it raises
        :class:`~service.errors.StoreUnavailableError`); the next read reconnects."""


def decode_vectors(blobs: Sequence[bytes]) -> np.ndarray:
    """Row-aligned (n, d) float32 from n stored vectors of one length, in one pass."""
    # one copy, into a writeable buffer; on little-endian machines "<f4" is float32 already
    flat = np.frombuffer(bytearray().join(blobs), dtype="<f4")
    return flat.reshape(len(blobs), -1).astype(np.float32, copy=False)


def metadata_of(raw: str | bytes | None) -> dict[str, Any]:
    """A stored metadata JSON object; the common empty one without parsing."""
    if raw is None or raw == "{}" or raw == b"{}":
        return {}
    return json.loads(raw)


def encode_vector(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def decode_vector(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4").astype(np.float32)
