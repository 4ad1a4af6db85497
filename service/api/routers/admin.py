"""Admin API (admin token): tenants and their API keys.

Tenant names are unique (``service.store.base.tenant_name_key``: case, Unicode form and spaces
aside), enforced by the store atomically.

Key rotation without downtime: ``POST /v1/tenants/{id}/keys`` issues a new key while the old
ones keep working; clients switch, then ``DELETE /v1/tenants/{id}/keys/{key_id}`` revokes the
old one. For a leaked key, ``{"revoke_existing": true}`` revokes all others in the same step.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.auth_first import AuthFirstRoute
from service.api.dependencies import AdminAuth, IdPath, RuntimeDep
from service.api.schemas import (
    KeyIssue,
    KeyIssued,
    KeyList,
    KeyOut,
    TenantCreate,
    TenantCreated,
    TenantList,
    TenantOut,
    errors,
    utc,
)
from service.store import ApiKey, Tenant

router = APIRouter(
    prefix="/v1/tenants", tags=["tenants"], dependencies=[AdminAuth], route_class=AuthFirstRoute
)


def _tenant(t: Tenant) -> TenantOut:
    return TenantOut(tenant_id=t.tenant_id, name=t.name, created_at=utc(t.created_at))


def _key(k: ApiKey) -> KeyOut:
    return KeyOut(
        key_id=k.key_id,
        created_at=utc(k.created_at),
        revoked_at=None if k.revoked_at is None else utc(k.revoked_at),
        active=k.active,
    )


@router.post("", status_code=201, responses=errors(400, 401, 409, 413, 422, 503))
async def create_tenant(body: TenantCreate, runtime: RuntimeDep) -> TenantCreated:
    """A tenant and its first API key. Names are unique (409 ``duplicate_tenant_name``),
    compared regardless of case, Unicode form and spaces at the ends or repeated."""
    tenant, key, token = await runtime.tenants.create(body.name)
    return TenantCreated(
        tenant_id=tenant.tenant_id, name=tenant.name, key_id=key.key_id, api_key=token
    )


@router.get("", responses=errors(400, 401, 503))
async def list_tenants(runtime: RuntimeDep) -> TenantList:
    return TenantList(tenants=[_tenant(t) for t in await runtime.tenants.list()])


@router.get("/{tenant_id}", responses=errors(400, 401, 404, 422, 503))
async def get_tenant(tenant_id: IdPath, runtime: RuntimeDep) -> TenantOut:
    return _tenant(await runtime.tenants.get(tenant_id))


@router.delete("/{tenant_id}", status_code=204, responses=errors(400, 401, 404, 422, 503))
async def delete_tenant(tenant_id: IdPath, runtime: RuntimeDep) -> Response:
    await runtime.tenants.delete(tenant_id)
    return Response(status_code=204)


@router.post("/{tenant_id}/keys", status_code=201, responses=errors(400, 401, 404, 413, 422, 503))
async def issue_key(
    tenant_id: IdPath, runtime: RuntimeDep, body: KeyIssue | None = None
) -> KeyIssued:
    key, token, revoked = await runtime.tenants.issue_key(
        tenant_id, revoke_existing=body.revoke_existing if body else False
    )
    return KeyIssued(tenant_id=tenant_id, key_id=key.key_id, api_key=token, revoked_key_ids=revoked)


@router.get("/{tenant_id}/keys", responses=errors(400, 401, 404, 422, 503))
async def list_keys(tenant_id: IdPath, runtime: RuntimeDep) -> KeyList:
    return KeyList(keys=[_key(k) for k in await runtime.tenants.list_keys(tenant_id)])


@router.delete(
    "/{tenant_id}/keys/{key_id}", status_code=204, responses=errors(400, 401, 404, 422, 503)
)
async def revoke_key(tenant_id: IdPath, key_id: IdPath, runtime: RuntimeDep) -> Response:
    await runtime.tenants.revoke_key(tenant_id, key_id)
    return Response(status_code=204)
