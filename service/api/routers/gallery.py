"""Gallery items: enrol (JSON batches, columns with one base64 matrix, or one uploaded image),
upsert one (PUT), get, list, delete; subjects: list with item counts, delete."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Request, Response, UploadFile

from service.api.auth_first import AuthFirstRoute
from service.api.dependencies import IdPath, RuntimeDep, TenantId
from service.api.routers.uploads import UPLOAD_PLACEHOLDER, build, parse_json_object, read_upload
from service.api.schemas import (
    CURSOR_PATTERN,
    IDEMPOTENCY_KEY_PATTERN,
    NAME_PATTERN,
    SUBJECT_CURSOR_PATTERN,
    Deleted,
    EnrolColumns,
    EnrolItem,
    EnrolRequest,
    EnrolResponse,
    GalleryItemOut,
    GalleryPage,
    PutItem,
    PutResponse,
    SubjectOut,
    SubjectPage,
    errors,
    faces_out,
    utc,
)
from service.domain.gallery import Enrolled, IdempotencyKey
from service.engine.faces import face_report
from service.ids import ID_MAX_LENGTH
from service.store import GalleryItem

router = APIRouter(tags=["gallery"], route_class=AuthFirstRoute)

Limit = Annotated[
    int,
    Query(
        ge=1,
        description="page size, 1..max_list_limit (default 100, "
        "or max_list_limit when that is smaller)",
        json_schema_extra={"x-limit": "max_list_limit"},
    ),
]


def _page_size(request: Request, limit: int, max_limit: int) -> int:
    """The default page size is capped by the deployment's limit; a given one is checked."""
    return limit if "limit" in request.query_params else min(limit, max_limit)


def _out(item: GalleryItem, *, with_embedding: bool = False) -> GalleryItemOut:
    emb = item.embedding.tolist() if with_embedding and item.embedding is not None else None
    return GalleryItemOut(
        item_id=item.item_id,
        subject=item.subject,
        metadata=item.metadata,
        created_at=utc(item.created_at),
        has_image=item.has_image,
        embedding=emb,
    )


IdempotencyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="makes a resend safe: the key is recorded with the enrolment, atomically, and "
        "for 24 h a request with it gets the first answer again (header Idempotent-Replayed: "
        "true) without writing anything; the same key with another request is a 422 "
        "idempotency_key_reused. Send a fresh key (e.g. a UUID) per request, the same one on "
        "retries",
    ),
]
REPLAYED = {"Idempotent-Replayed": "true"}


def _idempotency(key: str, *sent: bytes) -> IdempotencyKey:
    """The request's key and the fingerprint of what it sent (hashed only when a key came)."""
    fingerprint = hashlib.sha256()
    for part in sent:
        fingerprint.update(part)
    return IdempotencyKey(key, fingerprint.hexdigest())


def _enrolled(done: Enrolled, faces: list[dict], response: Response) -> EnrolResponse:
    if done.replayed:
        response.headers.update(REPLAYED)
    return EnrolResponse(item_ids=done.item_ids, faces=faces_out(faces))


@router.post(
    "/v1/gallery",
    status_code=201,
    operation_id="enrolItems",
    responses=errors(400, 401, 409, 413, 422, 429, 503),
)
async def enrol(
    body: EnrolRequest,
    tenant: TenantId,
    runtime: RuntimeDep,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyHeader = None,
) -> EnrolResponse:
    """All items or none; an item id that exists (or repeats) is a 409."""
    runtime.gallery.check_enrol(body.items)
    await runtime.charge(tenant, len(body.items))  # one rate-limit unit per item
    key = None if idempotency_key is None else _idempotency(idempotency_key, await request.body())
    with face_report() as faces:
        done = await runtime.gallery.enrol(tenant, body.items, idempotency=key)
    return _enrolled(done, faces, response)


@router.post(
    "/v1/gallery/columns",
    status_code=201,
    operation_id="enrolColumns",
    responses=errors(400, 401, 409, 413, 422, 429, 503),
)
async def enrol_columns(
    body: EnrolColumns,
    tenant: TenantId,
    runtime: RuntimeDep,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyHeader = None,
) -> EnrolResponse:
    """Bulk enrolment by embedding, as columns: ``subjects``, the vectors as one base64
    float32 matrix (a row per subject), optional ``item_ids`` and ``metadata``. The same
    rules, limits and answer as ``POST /v1/gallery`` (all items or none; an item id that exists
    or repeats is a 409), at less cost per item: the matrix is decoded in one step."""
    runtime.gallery.check_columns(body)
    await runtime.charge(tenant, len(body.subjects))  # one rate-limit unit per item
    key = None if idempotency_key is None else _idempotency(idempotency_key, await request.body())
    done = await runtime.gallery.enrol_columns(tenant, body, idempotency=key)
    return _enrolled(done, [], response)


@router.post(
    "/v1/gallery/upload",
    status_code=201,
    operation_id="enrolUpload",
    responses=errors(400, 401, 409, 413, 422, 429, 503),
)
async def enrol_upload(
    tenant: TenantId,
    runtime: RuntimeDep,
    response: Response,
    file: Annotated[UploadFile, File(description="an image file")],
    subject: Annotated[str, Form(min_length=1, max_length=ID_MAX_LENGTH, pattern=NAME_PATTERN)],
    item_id: Annotated[str | None, Form(min_length=1, max_length=256, pattern=NAME_PATTERN)] = None,
    metadata: Annotated[str | None, Form(description="a JSON object (as text)")] = None,
    idempotency_key: IdempotencyHeader = None,
) -> EnrolResponse:
    data = await read_upload(file, field="file")
    item = build(
        EnrolItem,
        subject=subject,
        item_id=item_id or None,
        image=UPLOAD_PLACEHOLDER,
        metadata=parse_json_object(metadata, field="metadata"),
    )
    key = (
        None
        if idempotency_key is None
        else _idempotency(idempotency_key, json.dumps([subject, item_id, metadata]).encode(), data)
    )
    with face_report() as faces:
        done = await runtime.gallery.enrol(tenant, [item], images={0: data}, idempotency=key)
    return _enrolled(done, faces, response)


@router.put(
    "/v1/gallery/{item_id}",
    operation_id="putItem",
    responses={
        201: {"model": PutResponse, "description": "created"},
        **errors(400, 401, 409, 413, 422, 429, 503),
    },
)
async def put_item(
    item_id: IdPath, body: PutItem, tenant: TenantId, runtime: RuntimeDep, response: Response
) -> PutResponse:
    """Creates the item, or replaces the one with this id (subject, vector, metadata): sending
    the same request again leaves the same item. 201 when created, 200 when replaced."""
    created = await runtime.gallery.put(tenant, item_id, body)
    response.status_code = 201 if created else 200
    return PutResponse(item_id=item_id, created=created)


@router.get("/v1/gallery", operation_id="listItems", responses=errors(400, 401, 422, 429, 503))
async def list_items(
    request: Request,
    tenant: TenantId,
    runtime: RuntimeDep,
    subject: Annotated[
        str | None, Query(min_length=1, max_length=256, pattern=NAME_PATTERN)
    ] = None,
    cursor: Annotated[
        str | None,
        Query(
            description="next_cursor of the previous page (checked by parse_cursor: 422 "
            "invalid_cursor)",
            json_schema_extra={"pattern": CURSOR_PATTERN},
        ),
    ] = None,
    limit: Limit = 100,
) -> GalleryPage:
    """The tenant's items in enrolment order, a page at a time."""
    items, next_cursor = await runtime.gallery.list(
        tenant,
        subject=subject,
        cursor=cursor,
        limit=_page_size(request, limit, runtime.settings.max_list_limit),
    )
    return GalleryPage(items=[_out(i) for i in items], next_cursor=next_cursor)


@router.get(
    "/v1/gallery/{item_id}", operation_id="getItem", responses=errors(400, 401, 404, 422, 429, 503)
)
async def get_item(
    item_id: IdPath, tenant: TenantId, runtime: RuntimeDep, include_embedding: bool = False
) -> GalleryItemOut:
    return _out(await runtime.gallery.get(tenant, item_id), with_embedding=include_embedding)


@router.delete(
    "/v1/gallery/{item_id}",
    status_code=204,
    operation_id="deleteItem",
    responses=errors(400, 401, 404, 422, 429, 503),
)
async def delete_item(item_id: IdPath, tenant: TenantId, runtime: RuntimeDep) -> Response:
    await runtime.gallery.delete_item(tenant, item_id)
    return Response(status_code=204)


@router.get("/v1/subjects", operation_id="listSubjects", responses=errors(400, 401, 422, 429, 503))
async def list_subjects(
    request: Request,
    tenant: TenantId,
    runtime: RuntimeDep,
    cursor: Annotated[
        str | None,
        Query(pattern=SUBJECT_CURSOR_PATTERN, description=("next_cursor of the previous page")),
    ] = None,
    limit: Limit = 100,
) -> SubjectPage:
    """The tenant's subjects in name order (by code point), each with its item count."""
    rows, next_cursor = await runtime.gallery.subjects(
        tenant, cursor=cursor, limit=_page_size(request, limit, runtime.settings.max_list_limit)
    )
    return SubjectPage(
        subjects=[SubjectOut(subject=s, items=n) for s, n in rows], next_cursor=next_cursor
    )


@router.delete(
    "/v1/subjects/{subject}",
    operation_id="deleteSubject",
    responses=errors(400, 401, 404, 422, 429, 503),
)
async def delete_subject(subject: IdPath, tenant: TenantId, runtime: RuntimeDep) -> Deleted:
    return Deleted(deleted=await runtime.gallery.delete_subject(tenant, subject))
