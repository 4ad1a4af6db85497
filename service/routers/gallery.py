"""Gallery items: enrol (JSON batches or one uploaded image), get, list, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from service.dependencies import RuntimeDep, TenantId
from service.ids import IdPath, IdQuery
from service.routers.uploads import build, parse_json_object, read_upload
from service.schemas import (
    ERROR_RESPONSES,
    Deleted,
    EnrolItem,
    EnrolRequest,
    EnrolResponse,
    GalleryItemOut,
    GalleryPage,
    utc,
)
from service.store import GalleryItem

router = APIRouter(tags=["gallery"], responses=ERROR_RESPONSES)


def _out(item: GalleryItem, *, with_embedding: bool = False) -> GalleryItemOut:
    emb = item.embedding.tolist() if with_embedding and item.embedding is not None else None
    return GalleryItemOut(item_id=item.item_id, subject=item.subject, metadata=item.metadata,
                          created_at=utc(item.created_at), has_image=item.has_image,
                          embedding=emb)


@router.post("/v1/gallery", status_code=201)
async def enrol(body: EnrolRequest, tenant: TenantId, runtime: RuntimeDep) -> EnrolResponse:
    return EnrolResponse(item_ids=await runtime.gallery.enrol(tenant, body.items))


@router.post("/v1/gallery/upload", status_code=201)
async def enrol_upload(
    tenant: TenantId, runtime: RuntimeDep, file: Annotated[UploadFile, File()],
    subject: Annotated[str, Form()], item_id: Annotated[str | None, Form()] = None,
    metadata: Annotated[str | None, Form(description="a JSON object")] = None,
) -> EnrolResponse:
    data = await read_upload(file, field="file")
    item = build(EnrolItem, subject=subject, item_id=item_id or None, image="upload",
                 metadata=parse_json_object(metadata, field="metadata"))
    return EnrolResponse(item_ids=await runtime.gallery.enrol(tenant, [item], images={0: data}))


@router.get("/v1/gallery")
async def list_items(
    tenant: TenantId, runtime: RuntimeDep, subject: IdQuery = None,
    cursor: str | None = None, limit: Annotated[int, Query()] = 100,
) -> GalleryPage:
    items, next_cursor = await runtime.gallery.list(tenant, subject=subject, cursor=cursor,
                                                    limit=limit)
    return GalleryPage(items=[_out(i) for i in items], next_cursor=next_cursor)


@router.get("/v1/gallery/{item_id}")
async def get_item(item_id: IdPath, tenant: TenantId, runtime: RuntimeDep,
                   include_embedding: bool = False) -> GalleryItemOut:
    return _out(await runtime.gallery.get(tenant, item_id), with_embedding=include_embedding)


@router.delete("/v1/gallery/{item_id}", status_code=204)
async def delete_item(item_id: IdPath, tenant: TenantId, runtime: RuntimeDep) -> Response:
    await runtime.gallery.delete_item(tenant, item_id)
    return Response(status_code=204)


@router.delete("/v1/subjects/{subject}")
async def delete_subject(subject: IdPath, tenant: TenantId, runtime: RuntimeDep) -> Deleted:
    return Deleted(deleted=await runtime.gallery.delete_subject(tenant, subject))
