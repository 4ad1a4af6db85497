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

FastAPI reads and parses a request's body before it runs dependencies, so a route that takes a
body authenticates first, before any byte of it is read (``authenticate_first``, run by
:class:`service.api.auth_first.AuthFirstRoute`), with these same checks and errors; the
dependency then finds the request authenticated and neither looks the key up nor takes a rate
limit token again (:func:`authenticate_tenant` runs once per request).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.forwarding import ForwardTo
from service.domain.tenants import same_secret
from service.errors import AuthenticationError, InvalidInputError, NotReadyError
from service.ids import IdPath as IdPath  # every id a path carries: the one id pattern
from service.runtime.groups import FORWARDED_HEADER
from service.runtime.runtime import Runtime

admin_bearer = HTTPBearer(
    scheme_name="adminToken",
    auto_error=False,
    bearerFormat="opaque",
    description="the admin token (TCM_ADMIN_TOKEN, or the one tcm-serve prints at start-up): "
    "tenants, keys, the model registry, the whole monitor",
)
tenant_bearer = HTTPBearer(
    scheme_name="tenantKey",
    auto_error=False,
    bearerFormat="tcm_<key_id>_<secret>",
    description="a tenant API key (POST /v1/tenants issues the first): that tenant's gallery, "
    "matches and feedback only",
)

Credentials = HTTPAuthorizationCredentials | None


def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReadyError("the service is starting or stopping")
    return runtime


async def runtime_of(request: Request) -> Runtime:
    """``get_runtime`` as a dependency: ``async`` because FastAPI runs a plain ``def``
    dependency in the thread pool, a thread hop per request for one attribute read (issue 32)."""
    return get_runtime(request)


RuntimeDep = Annotated[Runtime, Depends(runtime_of)]


def token_of(credentials: Credentials) -> str:
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token:
        raise AuthenticationError(
            "send the API key as 'Authorization: Bearer <key>'", code="missing_token"
        )
    return token


_AUTHENTICATED_TENANT = "tcm_authenticated_tenant"  # request.state: the tenant of this request


async def authenticate_tenant(request: Request, runtime: Runtime, token: str) -> str:
    """Tenant key -> tenant id, and one request taken from that tenant's rate limit: once per
    request, whether the route authenticated before its body (``authenticate_first``), in its
    ``TenantId`` dependency, or both."""
    tid: str | None = getattr(request.state, _AUTHENTICATED_TENANT, None)
    if tid is None:
        tid = await runtime.tenants.authenticate(token)
        # shard groups: another group's tenant goes there, before its rate limit is taken
        # (the owner's replica takes it) and before its body is read
        peer = await runtime.routing.route(tid, _forwarded_under(request))
        if peer is not None:
            raise ForwardTo(*peer, runtime.routing.groups.version)
        await runtime.check_rate(tid)
        setattr(request.state, _AUTHENTICATED_TENANT, tid)
    return tid


def _forwarded_under(request: Request) -> int | None:
    """The sender's placement table version, on a request another replica forwarded."""
    raw = request.headers.get(FORWARDED_HEADER)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidInputError(
            f"{FORWARDED_HEADER} must be a placement table version (digits)",
            code="invalid_header",
        )
    return int(raw)


async def tenant_id(
    request: Request,
    runtime: RuntimeDep,
    credentials: Annotated[Credentials, Security(tenant_bearer)],
) -> str:
    tid = await authenticate_tenant(request, runtime, token_of(credentials))
    await runtime.sync.ensure_loaded()
    return tid


def is_admin(runtime: Runtime, token: str) -> bool:
    admin = runtime.settings.admin_token
    return admin is not None and same_secret(token, admin.get_secret_value())


def check_admin(runtime: Runtime, token: str) -> None:
    if not is_admin(runtime, token):
        raise AuthenticationError(
            "this endpoint needs the admin token"
            if runtime.settings.admin_token is not None
            else "the admin API is disabled: no admin token is configured",
            code="invalid_admin_token",
        )


async def require_admin(
    runtime: RuntimeDep, credentials: Annotated[Credentials, Security(admin_bearer)]
) -> None:
    check_admin(runtime, token_of(credentials))


async def authenticate_first(request: Request, schemes: Collection[str]) -> None:
    """What a route's own dependencies check, before its body is read: ``schemes`` are the
    bearer schemes it takes (``"admin"``, ``"tenant"``; both: the admin token or a tenant key,
    as ``/v1/monitor``). The same steps in the same order as ``get_runtime``, the bearer
    parsing, ``token_of``, ``tenant_id`` and ``require_admin``, so the same errors (503
    ``not_ready``; 401 ``missing_token``, ``invalid_token``, ``invalid_admin_token``; 429)."""
    runtime = get_runtime(request)
    token = token_of(await tenant_bearer(request))  # both schemes parse the same header
    if "tenant" in schemes and not ("admin" in schemes and is_admin(runtime, token)):
        await authenticate_tenant(request, runtime, token)
    else:
        check_admin(runtime, token)


TenantId = Annotated[str, Depends(tenant_id)]
AdminAuth = Depends(require_admin)
