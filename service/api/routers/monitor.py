"""Live monitoring: the snapshot and a what-if threshold view (admin token or a tenant key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Security
from starlette.concurrency import run_in_threadpool

from service.api.auth_first import AuthFirstRoute
from service.api.dependencies import (
    AdminAuth,
    Credentials,
    RuntimeDep,
    admin_bearer,
    is_admin,
    tenant_bearer,
)
from service.api.dependencies import token_of as _token
from service.api.schemas import AdminWhatIf, MonitorReference, MonitorView, WhatIf, errors
from service.errors import InvalidInputError, NotFoundError
from service.monitoring.monitor import Monitor

router = APIRouter(tags=["monitor"], route_class=AuthFirstRoute)

Threshold = Annotated[
    float | None,
    Query(
        ge=-1000.0,
        le=1000.0,
        allow_inf_nan=False,
        description="candidate threshold, in the model's threshold units: a cosine in [-1, 1], "
        "or an AS-normalised score when /v1/model has score_normalisation; per-tenant FAR/FRR "
        "there",
        json_schema_extra={"x-limit": "threshold_bound"},
    ),
]


@router.get(
    "/v1/monitor", operation_id="getMonitor", responses=errors(400, 401, 404, 422, 429, 503)
)
async def monitor_view(
    request: Request,
    runtime: RuntimeDep,
    admin: Annotated[Credentials, Security(admin_bearer)],
    tenant: Annotated[Credentials, Security(tenant_bearer)],
    threshold: Threshold = None,
) -> MonitorView:
    """The admin token sees every tenant; a tenant API key sees only its own row, and
    nothing computed from other tenants' data."""
    token = _token(admin or tenant)
    tenant_id: str | None = None
    if not is_admin(runtime, token):
        tenant_id = await runtime.tenants.authenticate(token)  # 401 unless a tenant key
        await runtime.check_rate(tenant_id)
    monitor: Monitor | None = getattr(request.app.state, "monitor", None)
    if monitor is None:
        raise NotFoundError(
            "monitoring is disabled on this service (TCM_MONITOR_ENABLED)", code="monitor_disabled"
        )
    snapshot = monitor.view(tenant_id)
    what_if = None
    cosine = monitor.manifest.threshold_units == "cosine"
    if threshold is not None and cosine and not -1.0 <= threshold <= 1.0:
        raise InvalidInputError(
            f"threshold must lie in [-1, 1] for this model (cosine scores), got {threshold}",
            detail={"threshold": threshold, "units": "cosine"},
        )
    if threshold is not None:
        model = AdminWhatIf if tenant_id is None else WhatIf
        what_if = model.model_validate(
            await run_in_threadpool(
                monitor.what_if, threshold, None if tenant_id is None else [tenant_id]
            )
        )
    pending = snapshot is None
    interval = monitor.config.interval_s
    age = None if snapshot is None else max(0.0, monitor.clock() - snapshot.computed_at)
    stale = age is not None and age > 2 * interval
    message = None
    if pending:
        message = f"the monitor has not produced a snapshot yet (it runs every {interval:g}s)"
    elif stale:
        message = (
            f"the latest snapshot is {age:.0f}s old while the monitor runs every {interval:g}s: "
            'it may have stopped or be failing (tcm_monitor_runs_total{result="failed"}, '
            "the service log)"
        )
    return MonitorView(
        scope="admin" if tenant_id is None else "tenant",
        tenant_id=tenant_id,
        status="pending" if pending else "ok",
        message=message,
        snapshot=snapshot,
        age_s=age,
        stale=stale,
        what_if=what_if,
    )


@router.post(
    "/v1/monitor/reference",
    operation_id="remeasureMonitorReference",
    dependencies=[AdminAuth],
    responses=errors(400, 401, 404, 503),
)
async def remeasure_reference(request: Request) -> MonitorReference:
    """Re-measures the across-tenants reference (OPIS across tenants, the tenants' deviations)
    on the data as of now and stores it for the active model, replacing the one measured when
    it started serving: for after an operator has judged the current state healthy (e.g. new
    tenants joined). Undefined with fewer than 2 tenants in OPIS."""
    monitor: Monitor | None = getattr(request.app.state, "monitor", None)
    if monitor is None:
        raise NotFoundError(
            "monitoring is disabled on this service (TCM_MONITOR_ENABLED)", code="monitor_disabled"
        )
    ref = await run_in_threadpool(monitor.remeasure_tenants_reference)
    version = monitor.manifest.model_version
    if ref is None:
        return MonitorReference(
            model_version=version,
            status="undefined",
            message=f"fewer than 2 tenants have {monitor.config.min_pairs} genuine and "
            "impostor labelled pairs: the across-tenants reference is undefined",
        )
    return MonitorReference(model_version=version, status="measured", reference=ref)
