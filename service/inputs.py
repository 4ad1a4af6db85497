"""Client inputs -> normalised query vectors.

An input is a raw embedding, an image (base64 or uploaded bytes), or, for verify, a gallery
item or a whole subject. Embeddings are checked here (dimension, finite, non-zero) and
L2-normalised, so that inner products downstream are cosines; images go through the batcher.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.embedding import EmbeddingBatcher
from service.errors import ConflictError, InvalidInputError, NotFoundError
from service.images import decode_base64, decode_image
from service.store import Store


def as_unit_vector(values: Sequence[float] | np.ndarray, dim: int, *, where: str) -> np.ndarray:
    """Validates an embedding and returns it L2-normalised as float32."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.shape[0] != dim:
        raise InvalidInputError(
            f"{where} has dimension {v.shape[0]}, the model's embeddings have {dim}",
            code="invalid_embedding", detail={"where": where, "expected_dim": dim,
                                              "got_dim": int(v.shape[0])})
    if not np.isfinite(v).all():
        raise InvalidInputError(f"{where} contains NaN or infinite values",
                                code="invalid_embedding", detail={"where": where})
    scale = np.abs(v).max() if v.size else 0.0
    if scale == 0.0:
        raise InvalidInputError(f"{where} is the zero vector, which has no direction",
                                code="invalid_embedding", detail={"where": where})
    v = v / scale  # avoids overflow of the norm for huge but finite values
    return (v / np.linalg.norm(v)).astype(np.float32)


class InputResolver:
    def __init__(self, *, batcher: EmbeddingBatcher, store: Store, dim: int, channels: int,
                 max_image_pixels: int, model_version: str) -> None:
        self.batcher = batcher
        self.store = store
        self.dim = dim
        self.channels = channels
        self.max_image_pixels = max_image_pixels
        self.model_version = model_version

    def embedding(self, values: Sequence[float], *, where: str) -> np.ndarray:
        return as_unit_vector(values, self.dim, where=where)

    async def decode(self, images: Sequence[tuple[str, bytes | str]]) -> list[np.ndarray]:
        """(where, base64 text or raw bytes) pairs -> uint8 arrays, off the event loop."""

        def work() -> list[np.ndarray]:
            out = []
            for where, data in images:
                raw = decode_base64(data, where=where) if isinstance(data, str) else data
                out.append(decode_image(raw, channels=self.channels,
                                        max_pixels=self.max_image_pixels, where=where))
            return out

        return await run_in_threadpool(work)

    async def images(self, images: Sequence[tuple[str, bytes | str]]) -> np.ndarray:
        """Decodes and embeds images; (n, d) float32."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return await self.batcher.embed(await self.decode(images))

    async def item_vector(self, tenant_id: str, item_id: str) -> np.ndarray:
        item = await run_in_threadpool(self.store.get_item, tenant_id, item_id,
                                       model_version=self.model_version)
        if item is None:
            raise NotFoundError(f"no gallery item {item_id!r}", detail={"item_id": item_id})
        if item.embedding is None:
            raise ConflictError(
                f"gallery item {item_id!r} has no embedding for model {self.model_version}",
                code="not_embedded", detail={"item_id": item_id})
        return item.embedding.reshape(1, -1)

    async def subject_vectors(self, tenant_id: str, subject: str) -> np.ndarray:
        vectors = await run_in_threadpool(self.store.gallery_vectors, tenant_id,
                                          model_version=self.model_version, subject=subject)
        if len(vectors) == 0:
            raise NotFoundError(f"no gallery items for subject {subject!r}",
                                detail={"subject": subject})
        return vectors.vectors
