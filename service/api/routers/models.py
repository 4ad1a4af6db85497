"""Admin API (admin token): the model registry. Stage an artefact version, activate it (a hot
swap in the background: ``202`` at once, progress on ``GET /v1/models`` and ``GET /v1/model``),
roll back to the version active before, and list the items a version cannot index.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.api.auth_first import AuthFirstRoute
from service.api.dependencies import AdminAuth, IdPath, RuntimeDep
from service.api.schemas import (
    Activation,
    HistoryEntry,
    ModelRegistryOut,
    ModelStage,
    ModelVersionOut,
    RegistryActivation,
    UnembeddedItems,
    errors,
)
from service.domain import model_registry as reg
from service.errors import NotFoundError, NotReadyError
from service.runtime.lifecycle import ModelLifecycle
from service.runtime.runtime import Runtime

router = APIRouter(
    prefix="/v1/models", tags=["models"], dependencies=[AdminAuth], route_class=AuthFirstRoute
)


def _lifecycle(runtime: Runtime) -> ModelLifecycle:
    if runtime.lifecycle is None:
        raise NotReadyError("the model lifecycle is not running yet")
    return runtime.lifecycle


def _version(doc: reg.Doc, version: str) -> ModelVersionOut:
    return ModelVersionOut(
        model_version=version,
        **doc["versions"][version],
        active=version == doc["active"],
        embeddings_purged=version in doc["purged"],
    )


@router.get("", responses=errors(400, 401, 503))
async def list_models(runtime: RuntimeDep) -> ModelRegistryOut:
    lifecycle = _lifecycle(runtime)
    doc = await run_in_threadpool(lifecycle.registry.read)
    status = lifecycle.status()
    return ModelRegistryOut(
        active=doc["active"],
        served=runtime.serving.model_version,
        activation=None
        if doc["activation"] is None
        else RegistryActivation.model_validate(doc["activation"]),
        progress=Activation.model_validate(status) if status else None,
        rollback_to=reg.previous(doc),
        versions=[
            _version(doc, v)
            for v in sorted(doc["versions"], key=lambda v: doc["versions"][v]["registered_at"])
        ],
        history=[HistoryEntry.model_validate(h) for h in doc["history"]],
    )


@router.post("", status_code=201, responses=errors(400, 401, 404, 409, 413, 422, 503))
async def stage_model(body: ModelStage, runtime: RuntimeDep) -> ModelVersionOut:
    version, doc = await _lifecycle(runtime).stage(body.path)
    return _version(doc, version)


@router.post("/rollback", status_code=202, responses=errors(400, 401, 404, 409, 503))
async def rollback_model(runtime: RuntimeDep) -> Activation:
    return Activation.model_validate(await _lifecycle(runtime).rollback())


@router.post("/{version}/activate", status_code=202, responses=errors(400, 401, 404, 409, 422, 503))
async def activate_model(version: IdPath, runtime: RuntimeDep) -> Activation:
    return Activation.model_validate(await _lifecycle(runtime).activate(version))


@router.get("/{version}/unembedded", responses=errors(400, 401, 404, 422, 503))
async def list_unembedded_items(version: IdPath, runtime: RuntimeDep) -> UnembeddedItems:
    """Items that have no embedding for ``version`` and no stored image to make one from: a
    switch to it leaves them out of the index (they stay in the store)."""
    doc = await run_in_threadpool(_lifecycle(runtime).registry.read)
    if version not in doc["versions"]:
        raise NotFoundError(
            f"no registered model version {version!r}", detail={"model_version": version}
        )
    store = runtime.store

    def scan() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for tenant in store.list_tenants():
            ids = [
                iid
                for iid, img in store.items_without_embedding(
                    tenant.tenant_id, model_version=version
                )
                if img is None
            ]
            if ids:
                out[tenant.tenant_id] = ids
        return out

    return UnembeddedItems(model_version=version, items=await run_in_threadpool(scan))
