"""Live monitoring: the snapshot and a what-if threshold view (admin token or a tenant key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from service.dependencies import RuntimeDep, bearer_token
from service.errors import InvalidInputError, NotFoundError
from service.monitor import Monitor
from service.schemas import ERROR_RESPONSES, MonitorView
from service.tenants import same_secret

router = APIRouter(tags=["monitor"], responses=ERROR_RESPONSES)

Threshold = Annotated[float | None, Query(
    description="candidate cosine threshold in [-1, 1]: per-tenant FAR/FRR there")]


@router.get("/v1/monitor")
async def monitor_view(request: Request, runtime: RuntimeDep,
                       token: Annotated[str, Depends(bearer_token)],
                       threshold: Threshold = None) -> MonitorView:
    """The admin token sees every tenant; a tenant API key sees only its own row, and
    nothing computed from other tenants' data."""
    admin = runtime.settings.admin_token
    tenant_id: str | None = None
    if admin is None or not same_secret(token, admin.get_secret_value()):
        tenant_id = await runtime.tenants.authenticate(token)  # 401 unless a tenant key
        await runtime.check_rate(tenant_id)
    monitor: Monitor | None = getattr(request.app.state, "monitor", None)
    if monitor is None:
        raise NotFoundError("monitoring is disabled on this service (TCM_MONITOR_ENABLED)",
                            code="monitor_disabled")
    if threshold is not None and not -1.0 <= threshold <= 1.0:  # NaN fails this too
        raise InvalidInputError(f"threshold must be a cosine score in [-1, 1], got {threshold}",
                                code="invalid_threshold", detail={"threshold": str(threshold)})
    snapshot = monitor.view(tenant_id)
    what_if = None
    if threshold is not None:
        what_if = await run_in_threadpool(
            monitor.what_if, threshold, None if tenant_id is None else [tenant_id])
    pending = snapshot is None
    return MonitorView(
        scope="admin" if tenant_id is None else "tenant", tenant_id=tenant_id,
        status="pending" if pending else "ok",
        message=("the monitor has not produced a snapshot yet (it runs every "
                 f"{monitor.config.interval_s:g}s)") if pending else None,
        snapshot=snapshot, what_if=what_if)
