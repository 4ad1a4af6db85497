"""FastAPI dependencies, as ``Annotated`` aliases the routers declare parameters with.

``RuntimeDep`` is the app's :class:`Runtime`; ``TenantId`` authenticates a tenant API key,
takes one request from that tenant's rate limit (429 when spent, ``TCM_RATE_LIMIT_*``) and
yields its tenant id (and makes sure the indexes are loaded); ``AdminAuth`` checks the admin
token.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import AuthenticationError, NotReadyError
from service.runtime import Runtime
from service.tenants import same_secret


def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReadyError("the service is starting or stopping")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("send the API key as 'Authorization: Bearer <key>'",
                                  code="missing_token")
    return token.strip()


async def tenant_id(runtime: RuntimeDep, token: Annotated[str, Depends(bearer_token)]) -> str:
    tid = await runtime.tenants.authenticate(token)
    await runtime.check_rate(tid)
    await runtime.ensure_indexes()
    return tid


async def require_admin(runtime: RuntimeDep, token: Annotated[str, Depends(bearer_token)]
                        ) -> None:
    admin = runtime.settings.admin_token
    if admin is None or not same_secret(token, admin.get_secret_value()):
        raise AuthenticationError(
            "this endpoint needs the admin token" if admin is not None
            else "the admin API is disabled: no admin token is configured",
            code="invalid_admin_token")


TenantId = Annotated[str, Depends(tenant_id)]
AdminAuth = Depends(require_admin)
