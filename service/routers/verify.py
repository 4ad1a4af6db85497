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

router = APIRouter(tags=["verify"], responses=ERROR_RESPONSES)


def _response(runtime: RuntimeDep, score: float, accepted: bool) -> VerifyResponse:
    return VerifyResponse(score=score, accepted=accepted, threshold=runtime.threshold,
                          model_version=runtime.model_version)


@router.post("/v1/verify")
async def verify(body: VerifyRequest, tenant: TenantId, runtime: RuntimeDep) -> VerifyResponse:
    a = await runtime.matcher.vectors(tenant, body.a, where="a")
    b = await runtime.matcher.vectors(tenant, body.b, where="b")
    return _response(runtime, *await runtime.matcher.verify(tenant, a, b))


@router.post("/v1/verify/upload")
async def verify_upload(tenant: TenantId, runtime: RuntimeDep,
                        a: Annotated[UploadFile, File()],
                        b: Annotated[UploadFile, File()]) -> VerifyResponse:
    images = [("a", await read_upload(a, field="a")), ("b", await read_upload(b, field="b"))]
    vectors = await runtime.resolver.images(images)
    return _response(runtime, *await runtime.matcher.verify(tenant, vectors[:1], vectors[1:]))

