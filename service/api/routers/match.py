"""1:N match of a query (embedding, base64 image, or uploaded image) against the gallery,
optionally restricted to items whose metadata matches a filter."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, UploadFile

from service.api.auth_first import AuthFirstRoute
from service.api.consistency import consistent_read
from service.api.dependencies import RuntimeDep, TenantId
from service.api.routers.uploads import read_upload
from service.api.schemas import (
    Candidate,
    DecisionOut,
    MatchBatchRequest,
    MatchBatchResponse,
    MatchRequest,
    MatchResponse,
    errors,
    faces_out,
)
from service.domain.serving import Serving
from service.engine.faces import face_report
from service.engine.index import Hit
from service.errors import InvalidInputError
from service.store import MatchRecord

# a request carrying a gallery write's X-Consistency-Token sees that write on any replica
router = APIRouter(
    tags=["match"], route_class=AuthFirstRoute, dependencies=[Depends(consistent_read)]
)


def _response(
    record: MatchRecord, hits: list[Hit], faces: list[dict] | None = None
) -> MatchResponse:
    return MatchResponse(
        match_id=record.match_id,
        decision=DecisionOut(
            accepted=record.accepted,
            subject=record.subject,
            score=record.score,
            cosine=hits[0].cosine if hits else None,
        ),
        candidates=[
            Candidate(item_id=h.item_id, subject=h.subject, score=h.score, cosine=h.cosine)
            for h in hits
        ],
        threshold=record.threshold,
        model_version=record.model_version,
        faces=faces_out(faces or []),
    )


async def _match(
    serving: Serving,
    tenant: str,
    query: np.ndarray,
    k: int,
    where: dict[str, Any] | None = None,
    faces: list[dict] | None = None,
) -> MatchResponse:
    record, hits = await serving.matcher.match(tenant, query, k, where=where)
    return _response(record, hits, faces)


@router.post("/v1/match", operation_id="match", responses=errors(400, 401, 413, 422, 429, 503))
async def match(body: MatchRequest, tenant: TenantId, runtime: RuntimeDep) -> MatchResponse:
    """The k best candidates (among the items matching ``filter`` when given) and the
    decision: accepted iff the best one scores >= the threshold."""
    serving = runtime.serving  # one model answers the whole request, even across a switch
    serving.matcher.check_k(body.k)
    with face_report() as faces:
        if body.embedding is not None:
            query = serving.resolver.embedding(body.embedding, where="embedding")
        else:
            assert body.image is not None
            query = (await serving.resolver.images([("image", body.image)]))[0]
    return await _match(serving, tenant, query, body.k, body.filter, faces)


@router.post(
    "/v1/match/batch", operation_id="matchBatch", responses=errors(400, 401, 413, 422, 429, 503)
)
async def match_batch(
    body: MatchBatchRequest, tenant: TenantId, runtime: RuntimeDep
) -> MatchBatchResponse:
    """Several queries in one request: one index search for all of them, and a match record
    (with its own ``match_id``) per query, in the request's order."""
    serving = runtime.serving
    serving.matcher.check_k(body.k)
    limit = runtime.settings.max_batch_items
    if len(body.queries) > limit:
        raise InvalidInputError(
            f"{len(body.queries)} queries in one request, the limit is {limit}",
            code="too_many_items",
            detail={"max_batch_items": limit},
        )
    await runtime.charge(tenant, len(body.queries))  # one rate-limit unit per query
    resolver = serving.resolver
    queries = np.zeros((len(body.queries), resolver.dim), np.float32)
    images: list[tuple[str, str]] = []
    image_rows: list[int] = []
    for i, q in enumerate(body.queries):
        where = f"queries[{i}]"
        if q.embedding is not None:
            queries[i] = resolver.embedding(q.embedding, where=f"{where}.embedding")
        elif q.embedding_b64 is not None:
            queries[i] = resolver.embedding_b64(q.embedding_b64, where=f"{where}.embedding_b64")
        else:
            assert q.image is not None
            images.append((f"{where}.image", q.image))
            image_rows.append(i)
    if images:
        queries[image_rows] = await resolver.images(images)
    answers = await serving.matcher.match_many(tenant, queries, body.k)
    return MatchBatchResponse(results=[_response(r, h) for r, h in answers])


@router.post(
    "/v1/match/upload", operation_id="matchUpload", responses=errors(400, 401, 413, 422, 429, 503)
)
async def match_upload(
    tenant: TenantId,
    runtime: RuntimeDep,
    file: Annotated[UploadFile, File(description="an image file")],
    k: Annotated[int, Form(ge=1, json_schema_extra={"x-limit": "max_k"})] = 5,
) -> MatchResponse:
    serving = runtime.serving
    serving.matcher.check_k(k)
    data = await read_upload(file, field="file")
    with face_report() as faces:
        query = (await serving.resolver.images([("file", data)]))[0]
    return await _match(serving, tenant, query, k, faces=faces)
