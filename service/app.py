"""The FastAPI application factory.

``create_app(settings)`` builds an app whose lifespan owns every resource: it loads the model,
opens the store, rebuilds the indexes and starts the batcher on start-up, and closes them all on
shutdown. Nothing is created at import time. The Prometheus registry is created here, per app,
and kept at ``app.state.registry`` (the runtime at ``app.state.runtime``, the live monitor at
``app.state.monitor``). Once up, it logs which model it serves from which store (one record,
``event="startup"``: the store's scheme, host and path, never its credentials).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from service.api import docs, error_handlers, forwarding, openapi
from service.api.body_limit import BodySizeLimitMiddleware
from service.api.consistency import ConsistencyTokenMiddleware
from service.api.request_id import RequestIdMiddleware
from service.api.routers import (
    admin,
    embed,
    feedback,
    gallery,
    health,
    match,
    model,
    models,
    monitor,
    verify,
)
from service.metrics import RequestMetricsMiddleware, ServiceMetrics
from service.monitoring import MonitorConfig
from service.monitoring.monitor import Monitor
from service.runtime.runtime import Runtime
from service.settings import Settings, store_location

log = logging.getLogger(__name__)

StartupHook = Callable[[FastAPI, Runtime], object]


def create_app(
    settings: Settings | None = None, *, on_startup: list[StartupHook] | None = None
) -> FastAPI:
    """``on_startup`` hooks run after the runtime is up, after the monitor (attached first
    unless ``monitor_enabled`` is off); an awaitable result is awaited, and one with a
    ``close()`` is closed at shutdown, in reverse order."""
    settings = settings or Settings()
    hooks: list[StartupHook] = [attach_monitor, *(on_startup or [])]
    registry = CollectorRegistry(auto_describe=True)
    metrics = ServiceMetrics(registry, tenant_label_cap=settings.tenant_label_cap)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings, metrics)
        app.state.runtime = runtime
        app.state.forwarder = forwarding.open_forwarder(settings.forward_timeout_s)
        closers = []
        try:
            for hook in hooks:
                result = hook(app, runtime)
                if hasattr(result, "__await__"):
                    result = await result  # type: ignore[misc]
                if hasattr(result, "close"):
                    closers.append(result)
            if settings.admin_token is None:
                log.warning("no admin token configured: the admin API is disabled")
            version, store = (
                runtime.serving.manifest.model_version,
                store_location(settings.store_url),
            )
            log.info(
                "serving model %s from store %s",
                version,
                store,
                extra={"fields": {"event": "startup", "model_version": version, "store": store}},
            )
            yield
        finally:
            for c in reversed(closers):
                try:
                    res = c.close()
                    if hasattr(res, "__await__"):
                        await res
                except Exception:
                    log.exception("closing a start-up hook's resource failed")
            app.state.runtime = None
            app.state.monitor = None
            await app.state.forwarder.aclose()
            await runtime.close()

    app = FastAPI(
        title="threshold-consistent retrieval",
        version="1",
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,
        # Swagger UI and ReDoc from local files (service/api/docs.py), not FastAPI's CDN
        docs_url=None,
        redoc_url=None,
    )
    app.state.registry = registry
    app.state.settings = settings
    app.state.runtime = None
    app.state.monitor = None
    error_handlers.install(app, on_store_error=metrics.store_errors.inc)
    forwarding.install(app)
    for r in (
        health.router,
        model.router,
        models.router,
        admin.router,
        gallery.router,
        match.router,
        verify.router,
        embed.router,
        feedback.router,
        monitor.router,
    ):
        app.include_router(r)
    # the last added is the outermost: request metrics see every response, the 413s of the
    # body limit included, which refuses oversize bodies before any route runs
    # innermost of ours: a gallery write's X-Consistency-Token onto its response
    app.add_middleware(ConsistencyTokenMiddleware)
    # shard groups: a request's placement table version is unanswered until its response
    app.add_middleware(forwarding.UnansweredMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    # outermost: every answer carries X-Request-ID, every request is logged once (the admin
    # token redacted wherever a client pastes it)
    app.add_middleware(
        RequestIdMiddleware,
        redact=[
            settings.admin_token.get_secret_value() if settings.admin_token is not None else ""
        ],
    )
    openapi.install(app, settings)
    docs.install(app)
    return app


async def attach_monitor(app: FastAPI, runtime: Runtime) -> Monitor | None:
    """``create_app`` start-up hook: builds and starts the monitor (``app.state.monitor``);
    the app's lifespan closes it at shutdown. None when ``monitor_enabled`` is off."""
    settings = runtime.settings
    if not settings.monitor_enabled:
        app.state.monitor = None
        return None
    monitor = Monitor(
        runtime.store,
        runtime.serving.manifest,
        runtime.metrics,
        MonitorConfig.from_settings(settings),
        artefact_path=runtime.serving.path,
    )
    app.state.monitor = monitor
    if runtime.lifecycle is not None:  # a model switch resets the baseline to the new model's
        runtime.lifecycle.switch_listeners.append(
            lambda serving: monitor.set_manifest(serving.manifest, serving.path)
        )
    return await monitor.start()
