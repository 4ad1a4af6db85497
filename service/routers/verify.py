"""1:1 verify of two inputs, each an image, an embedding, a gallery item or a subject.

A subject stands for its best-matching enrolled item: the score is the maximum over the
subject's items (over all pairs when both sides are subjects).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from service.dependencies import RuntimeDep, TenantId
from service.routers.uploads import read_upload
from service.schemas import ERROR_RESPONSES, VerifyRequest, VerifyResponse
from service.serving import Serving

router = APIRouter(tags=["verify"], responses=ERROR_RESPONSES)


def _response(serving: Serving, score: float, accepted: bool) -> VerifyResponse:
    return VerifyResponse(score=score, accepted=accepted, threshold=serving.threshold,
                          model_version=serving.model_version)


@router.post("/v1/verify")
async def verify(body: VerifyRequest, tenant: TenantId, runtime: RuntimeDep) -> VerifyResponse:
    serving = runtime.serving  # one model answers the whole request, even across a switch
    a = await serving.matcher.vectors(tenant, body.a, where="a")
    b = await serving.matcher.vectors(tenant, body.b, where="b")
    return _response(serving, *await serving.matcher.verify(tenant, a, b))


@router.post("/v1/verify/upload")
async def verify_upload(tenant: TenantId, runtime: RuntimeDep,
                        a: Annotated[UploadFile, File()],
                        b: Annotated[UploadFile, File()]) -> VerifyResponse:
    images = [("a", await read_upload(a, field="a")), ("b", await read_upload(b, field="b"))]
    serving = runtime.serving
    vectors = await serving.resolver.images(images)
    return _response(serving, *await serving.matcher.verify(tenant, vectors[:1], vectors[1:]))

