"""Images -> embeddings with the served model (no gallery involved)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from service.api.auth_first import AuthFirstRoute
from service.api.dependencies import RuntimeDep, TenantId
from service.api.routers.uploads import read_upload
from service.api.schemas import EmbedRequest, EmbedResponse, errors, faces_out
from service.engine.faces import face_report
from service.errors import InvalidInputError

router = APIRouter(tags=["embed"], route_class=AuthFirstRoute)


@router.post("/v1/embed", operation_id="embed", responses=errors(400, 401, 413, 422, 429, 503))
async def embed(body: EmbedRequest, tenant: TenantId, runtime: RuntimeDep) -> EmbedResponse:
    limit = runtime.settings.max_batch_items
    if len(body.images) > limit:
        raise InvalidInputError(
            f"{len(body.images)} images in one request, the limit is {limit}", code="too_many_items"
        )
    await runtime.charge(tenant, len(body.images))  # one rate-limit unit per image
    serving = runtime.serving
    with face_report() as faces:
        vectors = await serving.resolver.images(
            [(f"images[{i}]", img) for i, img in enumerate(body.images)]
        )
    return EmbedResponse(
        embeddings=vectors.tolist(), model_version=serving.model_version, faces=faces_out(faces)
    )


@router.post(
    "/v1/embed/upload", operation_id="embedUpload", responses=errors(400, 401, 413, 422, 429, 503)
)
async def embed_upload(
    tenant: TenantId,
    runtime: RuntimeDep,
    file: Annotated[UploadFile, File(description="an image file")],
) -> EmbedResponse:
    serving = runtime.serving
    data = await read_upload(file, field="file")
    with face_report() as faces:
        vectors = await serving.resolver.images([("file", data)])
    return EmbedResponse(
        embeddings=vectors.tolist(), model_version=serving.model_version, faces=faces_out(faces)
    )
