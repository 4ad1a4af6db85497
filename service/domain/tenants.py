"""Tenants and their API keys: creation, rotation, revocation, and authentication.

A tenant API key is ``tcm_<key_id>_<secret>``: ``key_id`` (public, 16 hex) finds the stored
record, ``secret`` (32 random bytes) makes it unguessable. Only the sha256 of the whole token is
stored, compared in constant time. Rotation: issuing a key keeps the tenant's other keys valid
(deploy the new key, then revoke the old one by id); ``revoke_existing`` revokes them in the
same transaction, for a leaked key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid

from starlette.concurrency import run_in_threadpool

from service.domain.index_sync import IndexSync
from service.errors import AuthenticationError, NotFoundError
from service.store import ApiKey, Store, Tenant

_TOKEN = re.compile(r"^tcm_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_INVALID = "the API key is missing, malformed, revoked or unknown"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_key(tenant_id: str, now: float) -> tuple[ApiKey, str]:
    key_id = secrets.token_hex(8)
    token = f"tcm_{key_id}_{secrets.token_urlsafe(32)}"
    return ApiKey(key_id, tenant_id, hash_token(token), now), token


def same_secret(presented: str, expected: str) -> bool:
    """Constant-time comparison of two secrets of any length (both hashed first)."""
    return hmac.compare_digest(hash_token(presented), hash_token(expected))


class Tenants:
    def __init__(self, store: Store, sync: IndexSync) -> None:
        self.store = store
        self.sync = sync

    async def create(self, name: str) -> tuple[Tenant, ApiKey, str]:
        now = time.time()
        tenant = Tenant(uuid.uuid4().hex, name, now)
        key, token = new_key(tenant.tenant_id, now)
        await run_in_threadpool(self.store.create_tenant, tenant, key)
        self.sync.tenant_created(tenant.tenant_id)
        return tenant, key, token

    async def list(self) -> list[Tenant]:
        return await run_in_threadpool(self.store.list_tenants)

    async def get(self, tenant_id: str) -> Tenant:
        tenant = await run_in_threadpool(self.store.get_tenant, tenant_id)
        if tenant is None:
            raise NotFoundError(f"no tenant {tenant_id!r}", detail={"tenant_id": tenant_id})
        return tenant

    async def delete(self, tenant_id: str) -> None:
        """Deletes the tenant and drops its index: not in the middle of a model switch, nor of
        one of the tenant's gallery writes on this replica (an enrolment stored before the
        delete must not re-create the dropped index)."""
        async with self.sync.writing(tenant_id):
            if not await run_in_threadpool(self.store.delete_tenant, tenant_id):
                raise NotFoundError(f"no tenant {tenant_id!r}", detail={"tenant_id": tenant_id})
            self.sync.tenant_dropped(tenant_id)
        self.sync.forget_lock(tenant_id)

    async def issue_key(
        self, tenant_id: str, *, revoke_existing: bool
    ) -> tuple[ApiKey, str, list[str]]:
        await self.get(tenant_id)
        now = time.time()
        key, token = new_key(tenant_id, now)
        revoked = await run_in_threadpool(
            lambda: self.store.add_key(key, revoke_others_at=now if revoke_existing else None)
        )
        return key, token, revoked

    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        await self.get(tenant_id)
        return await run_in_threadpool(self.store.list_keys, tenant_id)

    async def revoke_key(self, tenant_id: str, key_id: str) -> None:
        if not await run_in_threadpool(self.store.revoke_key, tenant_id, key_id, time.time()):
            raise NotFoundError(
                f"tenant {tenant_id!r} has no key {key_id!r}",
                detail={"tenant_id": tenant_id, "key_id": key_id},
            )

    async def authenticate(self, token: str) -> str:
        """Bearer token -> tenant id; AuthenticationError for anything but an active key."""
        m = _TOKEN.match(token)
        if m is None:
            raise AuthenticationError(_INVALID, code="invalid_token")
        key = await run_in_threadpool(self.store.get_key, m.group(1))
        # hash and compare even when the key is unknown, so timing says nothing about key ids
        expected = key.key_hash if key is not None else "0" * 64
        matches = hmac.compare_digest(expected, hash_token(token))
        if key is None or not matches or not key.active:
            raise AuthenticationError(_INVALID, code="invalid_token")
        return key.tenant_id
