"""FastAPI dependencies, as ``Annotated`` aliases the routers declare parameters with.

``RuntimeDep`` is the app's :class:`Runtime`; ``TenantId`` authenticates a tenant API key,
takes the request's first work unit from that tenant's rate limit (429 when spent,
``TCM_RATE_LIMIT_*``; routes whose body asks for more work, counted in items, queries or images,
charge the rest with ``Runtime.charge`` once the body is parsed) and yields its tenant id (and
makes sure the indexes are loaded); ``AdminAuth`` checks the admin
token. Both read ``Authorization: Bearer ...`` through FastAPI's ``HTTPBearer`` security
dependency, so that OpenAPI states the two schemes (``adminToken``, ``tenantKey``) and which
operation takes which; ``auto_error=False`` because a missing token is answered with the
service's own error body (401 ``missing_token``), not FastAPI's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.domain.tenants import same_secret
from service.errors import AuthenticationError, NotReadyError
from service.ids import IdPath as IdPath  # every id a path carries: the one id pattern
from service.runtime.runtime import Runtime

admin_bearer = HTTPBearer(
    scheme_name="adminToken", auto_error=False, bearerFormat="opaque",
    description="the admin token (TCM_ADMIN_TOKEN, or the one tcm-serve prints at start-up): "
                "tenants, keys, the model registry, the whole monitor")
tenant_bearer = HTTPBearer(
    scheme_name="tenantKey", auto_error=False, bearerFormat="tcm_<key_id>_<secret>",
    description="a tenant API key (POST /v1/tenants issues the first): that tenant's gallery, "
                "matches and feedback only")

Credentials = HTTPAuthorizationCredentials | None


def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReadyError("the service is starting or stopping")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def token_of(credentials: Credentials) -> str:
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token:
        raise AuthenticationError("send the API key as 'Authorization: Bearer <key>'",
                                  code="missing_token")
    return token


async def tenant_id(runtime: RuntimeDep,
                    credentials: Annotated[Credentials, Security(tenant_bearer)]) -> str:
    tid = await runtime.tenants.authenticate(token_of(credentials))
    await runtime.check_rate(tid)
    await runtime.sync.ensure_loaded()
    return tid


def is_admin(runtime: Runtime, token: str) -> bool:
    admin = runtime.settings.admin_token
    return admin is not None and same_secret(token, admin.get_secret_value())


async def require_admin(runtime: RuntimeDep,
                        credentials: Annotated[Credentials, Security(admin_bearer)]) -> None:
    if not is_admin(runtime, token_of(credentials)):
        raise AuthenticationError(
            "this endpoint needs the admin token" if runtime.settings.admin_token is not None
            else "the admin API is disabled: no admin token is configured",
            code="invalid_admin_token")


TenantId = Annotated[str, Depends(tenant_id)]
AdminAuth = Depends(require_admin)
