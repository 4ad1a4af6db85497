"""Enrolling, reading and deleting gallery items: the store of record first, then the index.

Every write holds the serving slot's switch gate (shared) from embedding to index update and
uses the model being served when it took the gate, so a model switch never sees half of a write
(see ``service.domain.serving``); the store write and the index update run under the tenant's
write lock, and the index is told by ``service.domain.index_sync`` (the one owner of keeping
indexes in step with the store).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.engine.images import decode_base64
from service.errors import ConflictError, InvalidInputError, NotFoundError
from service.store import GalleryItem, Idempotent, IdempotentReplay, NewItem, Store

if TYPE_CHECKING:
    from service.domain.index_sync import IndexSync
    from service.domain.serving import Serving, ServingSlot


class ItemContent(Protocol):
    """What an item is made of, as a request states it (the API's ``PutItem``): its subject,
    exactly one of an embedding (numbers or base64 float32) or an image, and metadata."""

    @property
    def subject(self) -> str: ...
    @property
    def embedding(self) -> Sequence[float] | None: ...
    @property
    def embedding_b64(self) -> str | None: ...
    @property
    def image(self) -> str | None: ...
    @property
    def metadata(self) -> Mapping[str, Any]: ...


class NewItemContent(ItemContent, Protocol):
    """An item to enrol (the API's ``EnrolItem``): its id is generated when None."""

    @property
    def item_id(self) -> str | None: ...


class ColumnsContent(Protocol):
    """Items to enrol as columns (the API's ``EnrolColumns``): one subject per item, their
    embeddings as one base64 float32 matrix (a row per item), optional ids and metadata."""

    @property
    def subjects(self) -> Sequence[str]: ...
    @property
    def embeddings_b64(self) -> str: ...
    @property
    def item_ids(self) -> Sequence[str] | None: ...
    @property
    def metadata(self) -> Sequence[Mapping[str, Any]] | None: ...


@dataclass(frozen=True)
class IdempotencyKey:
    """A client's ``Idempotency-Key`` for one request, and the fingerprint of that request (a
    resend must carry the same one; another request with the key is refused)."""

    key: str
    fingerprint: str


@dataclass(frozen=True)
class Enrolled:
    item_ids: list[str]
    replayed: bool = False  # the answer recorded by an earlier send of the same request


class Gallery:
    def __init__(
        self,
        *,
        store: Store,
        slot: ServingSlot,
        sync: IndexSync,
        max_batch_items: int,
        max_list_limit: int,
        max_enrol_items: int | None = None,
        idempotency_ttl_s: float = 86400.0,
    ) -> None:
        self.store = store
        self.slot = slot
        self.sync = sync
        self.max_batch_items = max_batch_items
        self.max_enrol_items = max(max_enrol_items or max_batch_items, max_batch_items)
        self.max_list_limit = max_list_limit
        self.idempotency_ttl_s = idempotency_ttl_s

    async def enrol(
        self,
        tenant_id: str,
        items: Sequence[NewItemContent],
        images: dict[int, bytes] | None = None,
        *,
        idempotency: IdempotencyKey | None = None,
    ) -> Enrolled:
        """All items or none. ``images`` optionally gives raw bytes (uploads) by position,
        in place of the base64 ``image`` field. With ``idempotency``, the key is recorded in
        the same atomic write as the items: a resend of the request (its answer lost, a 503
        whose write had committed) gets the first answer and writes nothing, whether it comes
        after the first send or races it; the same key with another request is a 422."""
        images = images or {}
        if idempotency is not None:
            prior = await run_in_threadpool(
                lambda: self.store.get_idempotent(tenant_id, idempotency.key, now=time.time())
            )
            if prior is not None:
                return _replay(prior, idempotency)
        self.check_enrol(items)
        async with self.slot.gate.shared():
            try:
                ids = await self._enrol(self.slot.current, tenant_id, items, images, idempotency)
            except IdempotentReplay as replay:
                assert idempotency is not None
                # the feed is past the first answer's write
                await self.sync.written(tenant_id, publish=False)
                return _replay(replay.record, idempotency)
        await self.sync.written(tenant_id)
        return Enrolled(ids)

    async def enrol_columns(
        self, tenant_id: str, columns: ColumnsContent, *, idempotency: IdempotencyKey | None = None
    ) -> Enrolled:
        """:meth:`enrol` for items given as columns: the same checks, limits, idempotency and
        all-or-none write; the matrix is decoded in one step (``InputResolver.matrix_b64``)."""
        if idempotency is not None:
            prior = await run_in_threadpool(
                lambda: self.store.get_idempotent(tenant_id, idempotency.key, now=time.time())
            )
            if prior is not None:
                return _replay(prior, idempotency)
        self.check_columns(columns)
        async with self.slot.gate.shared():
            serving = self.slot.current
            n = len(columns.subjects)
            vectors = serving.resolver.matrix_b64(columns.embeddings_b64, n, where="embeddings_b64")
            ids = columns.item_ids or [uuid.uuid4().hex for _ in range(n)]
            metadata = columns.metadata or [{}] * n
            new_items = [
                NewItem(item_id=i, subject=s, embedding=v, metadata=m, image=None)
                for i, s, v, m in zip(ids, columns.subjects, vectors, metadata, strict=True)
            ]
            try:
                stored = await self._store(serving, tenant_id, new_items, vectors, idempotency)
            except IdempotentReplay as replay:
                assert idempotency is not None
                # the feed is past the first answer's write
                await self.sync.written(tenant_id, publish=False)
                return _replay(replay.record, idempotency)
        await self.sync.written(tenant_id)
        return Enrolled(stored)

    def check_columns(self, columns: ColumnsContent) -> None:
        """:meth:`check_enrol` for columns, and their lengths: every column given has one entry
        per subject (422 ``column_lengths``; the matrix's rows are checked when decoded)."""
        n = len(columns.subjects)
        if n > self.max_enrol_items:
            raise InvalidInputError(
                f"{n} items in one request, the limit is {self.max_enrol_items}",
                code="too_many_items",
                detail={"max_enrol_items": self.max_enrol_items},
            )
        for name in ("item_ids", "metadata"):
            column = getattr(columns, name)
            if column is not None and len(column) != n:
                raise InvalidInputError(
                    f"{name} has {len(column)} entries and subjects {n}: every column has one "
                    "entry per item",
                    code="column_lengths",
                    detail={"column": name, "entries": len(column), "items": n},
                )
        if columns.item_ids is not None:
            counts = Counter(columns.item_ids)
            dupes = sorted(i for i, c in counts.items() if c > 1)
            if dupes:
                raise ConflictError(
                    "the request repeats item ids",
                    code="duplicate_item_id",
                    detail={"item_ids": dupes},
                )

    def check_enrol(self, items: Sequence[NewItemContent]) -> None:
        """The checks an enrolment passes before any work (its size, repeated ids): 422
        ``too_many_items``, 409 ``duplicate_item_id``. The router runs them before charging the
        request's items to the rate limit, so that such a request costs what any refused one
        does; :meth:`enrol` runs them too."""
        if len(items) > self.max_enrol_items:
            raise InvalidInputError(
                f"{len(items)} items in one request, the limit is {self.max_enrol_items}",
                code="too_many_items",
                detail={"max_enrol_items": self.max_enrol_items},
            )
        n_images = sum(it.image is not None for it in items)
        if n_images > self.max_batch_items:
            raise InvalidInputError(
                f"{n_images} images in one request, the limit is "
                f"{self.max_batch_items} (send embeddings for bulk imports)",
                code="too_many_items",
                detail={"max_batch_items": self.max_batch_items},
            )
        counts = Counter(it.item_id for it in items if it.item_id is not None)
        dupes = sorted(i for i, n in counts.items() if n > 1)
        if dupes:
            raise ConflictError(
                "the request repeats item ids", code="duplicate_item_id", detail={"item_ids": dupes}
            )

    async def _enrol(
        self,
        serving: Serving,
        tenant_id: str,
        items: Sequence[NewItemContent],
        images: dict[int, bytes],
        idempotency: IdempotencyKey | None,
    ) -> list[str]:
        vectors: list[np.ndarray | None] = [None] * len(items)
        to_embed: list[tuple[str, bytes | str]] = []
        positions: list[int] = []
        raw_images: list[bytes | None] = [None] * len(items)
        b64_rows = [i for i, it in enumerate(items) if it.embedding_b64 is not None]
        if b64_rows:
            decoded = serving.resolver.embeddings_b64(
                [items[i].embedding_b64 for i in b64_rows],  # type: ignore[misc]
                [f"items[{i}].embedding_b64" for i in b64_rows],
            )
            for i, v in zip(b64_rows, decoded, strict=True):
                vectors[i] = v
        for i, it in enumerate(items):
            if it.embedding is not None:
                vectors[i] = serving.resolver.embedding(it.embedding, where=f"items[{i}].embedding")
            elif it.embedding_b64 is not None:
                continue
            else:
                data = images.get(i, it.image)
                assert data is not None
                to_embed.append((f"items[{i}].image", data))
                positions.append(i)
        if to_embed:
            decoded_bytes = await run_in_threadpool(_raw_bytes, to_embed)
            for i, raw in zip(positions, decoded_bytes, strict=True):
                raw_images[i] = raw
            embedded = await serving.resolver.images(
                [(w, raw) for (w, _), raw in zip(to_embed, decoded_bytes, strict=True)]
            )
            for i, v in zip(positions, embedded, strict=True):
                vectors[i] = v
        new_items = [
            NewItem(
                item_id=it.item_id or uuid.uuid4().hex,
                subject=it.subject,
                embedding=vec,
                metadata=it.metadata,
                image=raw,
            )
            for it, vec, raw in zip(items, vectors, raw_images, strict=True)
            if vec is not None
        ]
        assert len(new_items) == len(items)
        matrix = np.stack([n.embedding for n in new_items])
        return await self._store(serving, tenant_id, new_items, matrix, idempotency)

    async def _store(
        self,
        serving: Serving,
        tenant_id: str,
        new_items: list[NewItem],
        vectors: np.ndarray,
        idempotency: IdempotencyKey | None,
    ) -> list[str]:
        """The write of an enrolment: the store of record (with the idempotency record, in the
        same atomic step), then the index, under the tenant's write lock."""
        now = time.time()
        record = (
            None
            if idempotency is None
            else Idempotent(
                idempotency.key,
                idempotency.fingerprint,
                json.dumps([n.item_id for n in new_items]),
                now + self.idempotency_ttl_s,
            )
        )
        async with self.sync.write_lock(tenant_id):
            seqs = await run_in_threadpool(
                lambda: self.store.add_items(
                    tenant_id,
                    new_items,
                    model_version=serving.model_version,
                    created_at=now,
                    idempotency=record,
                )
            )
            await self.sync.added(
                serving,
                tenant_id,
                seqs,
                [n.item_id for n in new_items],
                [n.subject for n in new_items],
                vectors,
                [n.metadata for n in new_items],
            )
        return [n.item_id for n in new_items]

    async def put(self, tenant_id: str, item_id: str, body: ItemContent) -> bool:
        """Creates or replaces one item (idempotent); True when it was created."""
        async with self.slot.gate.shared():
            serving = self.slot.current
            if body.embedding is not None:
                vector = serving.resolver.embedding(body.embedding, where="embedding")
                raw = None
            elif body.embedding_b64 is not None:
                vector = serving.resolver.embedding_b64(body.embedding_b64, where="embedding_b64")
                raw = None
            else:
                assert body.image is not None
                raw = (await run_in_threadpool(_raw_bytes, [("image", body.image)]))[0]
                vector = (await serving.resolver.images([("image", raw)]))[0]
            new = NewItem(
                item_id=item_id,
                subject=body.subject,
                embedding=vector,
                metadata=body.metadata,
                image=raw,
            )
            async with self.sync.write_lock(tenant_id):
                seq, old = await run_in_threadpool(
                    lambda: self.store.put_item(
                        tenant_id, new, model_version=serving.model_version, created_at=time.time()
                    )
                )
                if old is not None:
                    await self.sync.removed(serving, tenant_id, [old])
                await self.sync.added(
                    serving,
                    tenant_id,
                    [seq],
                    [item_id],
                    [body.subject],
                    vector[None],
                    [body.metadata],
                )
        await self.sync.written(tenant_id)
        return old is None

    async def subjects(
        self, tenant_id: str, *, cursor: str | None, limit: int
    ) -> tuple[list[tuple[str, int]], str | None]:
        """A page of (subject, item count) in code-point order; the cursor is the last
        subject's UTF-8 in hex (any such text is a valid cursor)."""
        self._check_limit(limit)
        after = None
        if cursor is not None:
            try:
                after = bytes.fromhex(cursor).decode("utf-8", errors="replace")
            except ValueError as exc:
                raise InvalidInputError(
                    "cursor is not one this API returned", code="invalid_cursor"
                ) from exc
        rows = await run_in_threadpool(
            lambda: self.store.list_subjects(tenant_id, after=after, limit=limit + 1)
        )
        page = rows[:limit]
        next_cursor = page[-1][0].encode().hex() if len(rows) > limit else None
        return page, next_cursor

    def _check_limit(self, limit: int) -> None:
        if not 1 <= limit <= self.max_list_limit:
            raise InvalidInputError(
                f"limit must lie in 1..{self.max_list_limit}, got {limit}", code="invalid_limit"
            )

    async def get(self, tenant_id: str, item_id: str) -> GalleryItem:
        item = await run_in_threadpool(
            lambda: self.store.get_item(
                tenant_id, item_id, model_version=self.slot.current.model_version
            )
        )
        if item is None:
            raise NotFoundError(f"no gallery item {item_id!r}", detail={"item_id": item_id})
        return item

    async def list(
        self, tenant_id: str, *, subject: str | None, cursor: str | None, limit: int
    ) -> tuple[list[GalleryItem], str | None]:
        self._check_limit(limit)
        after = 0 if cursor is None else parse_cursor(cursor)
        rows = await run_in_threadpool(
            lambda: self.store.list_items(
                tenant_id, subject=subject, after_seq=after, limit=limit + 1
            )
        )
        page = rows[:limit]
        next_cursor = str(page[-1].seq) if len(rows) > limit else None
        return page, next_cursor

    async def delete_item(self, tenant_id: str, item_id: str) -> None:
        async with self.sync.writing(tenant_id) as serving:
            seq = await run_in_threadpool(self.store.delete_item, tenant_id, item_id)
            if seq is None:
                raise NotFoundError(f"no gallery item {item_id!r}", detail={"item_id": item_id})
            await self.sync.removed(serving, tenant_id, [seq])
        await self.sync.written(tenant_id)

    async def delete_subject(self, tenant_id: str, subject: str) -> int:
        async with self.sync.writing(tenant_id) as serving:
            seqs = await run_in_threadpool(self.store.delete_subject, tenant_id, subject)
            if not seqs:
                raise NotFoundError(
                    f"no gallery items for subject {subject!r}", detail={"subject": subject}
                )
            await self.sync.removed(serving, tenant_id, seqs)
        await self.sync.written(tenant_id)
        return len(seqs)


_CURSOR = re.compile(r"[0-9]{1,19}")
MAX_CURSOR = 2**63 - 1  # SQLite's INTEGER (and the seq counter's) range


def parse_cursor(cursor: str) -> int:
    """A listing cursor (an item's seq, as the API returned it) -> int. ASCII digits only
    (``str.isdigit`` also accepts ``"²"``, which ``int`` refuses) and within SQLite's 64-bit
    range (a larger one overflowed the query): anything else is a 422, never a 500."""
    if _CURSOR.fullmatch(cursor) is None or int(cursor) > MAX_CURSOR:
        raise InvalidInputError(
            "cursor is not one this API returned (use next_cursor from the previous page)",
            code="invalid_cursor",
        )
    return int(cursor)


def _replay(prior: Idempotent, idempotency: IdempotencyKey) -> Enrolled:
    if prior.fingerprint != idempotency.fingerprint:
        raise InvalidInputError(
            "this Idempotency-Key was used for another request: send a new key with each new "
            "request, and the same key only when resending that request",
            code="idempotency_key_reused",
            detail={"idempotency_key": idempotency.key},
        )
    return Enrolled(json.loads(prior.result), replayed=True)


def _raw_bytes(images: list[tuple[str, bytes | str]]) -> list[bytes]:
    return [decode_base64(d, where=w) if isinstance(d, str) else d for w, d in images]
