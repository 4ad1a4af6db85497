"""1:1 verify of two inputs, each an image, an embedding, a gallery item or a subject.

A subject stands for its best-matching enrolled item: the score is the maximum over the
subject's items (over all pairs when both sides are subjects).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, UploadFile

from service.api.auth_first import AuthFirstRoute
from service.api.consistency import consistent_read
from service.api.dependencies import RuntimeDep, TenantId
from service.api.routers.uploads import read_upload
from service.api.schemas import VerifyRequest, VerifyResponse, errors, faces_out
from service.domain.serving import Serving
from service.engine.faces import face_report

# a request carrying a gallery write's X-Consistency-Token sees that write on any replica
router = APIRouter(
    tags=["verify"], route_class=AuthFirstRoute, dependencies=[Depends(consistent_read)]
)


def _response(
    serving: Serving, score: float, accepted: bool, cosine: float | None, faces: list[dict]
) -> VerifyResponse:
    return VerifyResponse(
        score=score,
        cosine=cosine,
        accepted=accepted,
        threshold=serving.threshold,
        model_version=serving.model_version,
        faces=faces_out(faces),
    )


@router.post(
    "/v1/verify", operation_id="verify", responses=errors(400, 401, 404, 409, 413, 422, 429, 503)
)
async def verify(body: VerifyRequest, tenant: TenantId, runtime: RuntimeDep) -> VerifyResponse:
    serving = runtime.serving  # one model answers the whole request, even across a switch
    with face_report() as faces:
        a = await serving.matcher.vectors(tenant, body.a, where="a", filter=body.filter)
        b = await serving.matcher.vectors(tenant, body.b, where="b", filter=body.filter)
    return _response(serving, *await serving.matcher.verify(tenant, a, b), faces)


@router.post(
    "/v1/verify/upload", operation_id="verifyUpload", responses=errors(400, 401, 413, 422, 429, 503)
)
async def verify_upload(
    tenant: TenantId,
    runtime: RuntimeDep,
    a: Annotated[UploadFile, File(description="an image file")],
    b: Annotated[UploadFile, File(description="an image file")],
) -> VerifyResponse:
    images = [("a", await read_upload(a, field="a")), ("b", await read_upload(b, field="b"))]
    serving = runtime.serving
    with face_report() as faces:
        vectors = await serving.resolver.images(images)
    return _response(
        serving, *await serving.matcher.verify(tenant, vectors[:1], vectors[1:]), faces
    )
