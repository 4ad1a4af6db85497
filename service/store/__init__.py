"""The system of record behind the service: an interface and two implementations.

``open_store`` picks one from the store URL: ``sqlite:///...`` (default, embedded) or
``redis://...`` / ``rediss://...`` / ``unix://...`` / ``redis+sentinel://...`` (shared by replicas).
"""

from __future__ import annotations

from service.settings import Settings
from service.store.base import (
    ApiKey,
    Change,
    Decision,
    Feedback,
    GalleryItem,
    GalleryVectors,
    Idempotent,
    IdempotentReplay,
    MatchRecord,
    NewItem,
    Store,
    StoreInUseError,
    Tenant,
)


def open_store(settings: Settings) -> Store:
    url = settings.store_url
    if url.startswith("sqlite:///"):
        from service.store.sqlite import SQLiteStore, path_from_url

        return SQLiteStore(path_from_url(url), timeout_s=settings.store_timeout_s)
    from service.settings import CLUSTER_SCHEME
    from service.store.redis_cluster import RedisClusterStore
    from service.store.redis_store import RedisStore

    kind = RedisClusterStore if url.startswith(CLUSTER_SCHEME) else RedisStore
    return kind(
        url,
        prefix=settings.redis_key_prefix,
        timeout_s=settings.store_timeout_s,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
    )


__all__ = [
    "ApiKey",
    "Change",
    "Decision",
    "Feedback",
    "GalleryItem",
    "GalleryVectors",
    "Idempotent",
    "IdempotentReplay",
    "MatchRecord",
    "NewItem",
    "Store",
    "StoreInUseError",
    "Tenant",
    "open_store",
]
