"""Probes and metrics (public): liveness, readiness, Prometheus exposition."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from service.api.auth_first import AuthFirstRoute
from service.api.schemas import Health, Readiness, errors

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"], route_class=AuthFirstRoute)


@router.get("/healthz", operation_id="liveness", responses=errors(400))
async def healthz() -> Health:
    """The process is up and serving HTTP."""
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="readiness",
    responses={**errors(400), 503: {"model": Readiness, "description": "not ready"}},
)
async def readyz(request: Request) -> JSONResponse:
    """Model loaded, store reachable and indexes built: send traffic."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        body = Readiness(status="not_ready", checks={"runtime": "starting"})
        return JSONResponse(body.model_dump(), status_code=503)
    checks = await runtime.readiness()
    ready = all(v == "ok" for v in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    operation_id="metrics",
    responses={200: {"description": "Prometheus text exposition format"}, **errors(400)},
)
async def metrics(request: Request) -> Response:
    await _refresh_tenant_names(request)
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


TENANT_NAMES_TTL_S = 30.0


async def _refresh_tenant_names(request: Request) -> None:
    """Re-reads the tenants' names for ``tcm_tenant_info`` at most every 30 s (a scrape, not
    a request, pays for it); a store that does not answer leaves the last names in place."""
    runtime = request.app.state.runtime
    if runtime is None:
        return
    age = runtime.metrics.tenant_names_age()
    if age is not None and age < TENANT_NAMES_TTL_S:
        return
    try:
        tenants = await run_in_threadpool(runtime.store.list_tenants)
    except Exception:  # the scrape still answers with what it has
        log.warning("tcm_tenant_info: could not list the tenants", exc_info=True)
        return
    runtime.metrics.set_tenant_names([(t.tenant_id, t.name) for t in tenants])
