"""Helpers shared by the multipart (``.../upload``) variants of the single-image endpoints."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import UploadFile
from pydantic import BaseModel, ValidationError

from service.errors import InvalidInputError

M = TypeVar("M", bound=BaseModel)
# stands in the JSON model's base64 ``image`` field for an uploaded file (valid base64, so the
# model's pattern passes; the bytes used are the upload's)
UPLOAD_PLACEHOLDER = "dXBsb2Fk"


async def read_upload(file: UploadFile, *, field: str) -> bytes:
    data = await file.read()
    if not data:
        raise InvalidInputError(
            f"the uploaded file {field!r} is empty", code="invalid_image", detail={"where": field}
        )
    return data


def parse_json_object(text: str | None, *, field: str) -> dict[str, Any]:
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"form field {field!r} is not valid JSON: {exc}",
            code="invalid_json_field",
            detail={"where": field},
        ) from exc
    if not isinstance(value, dict):
        raise InvalidInputError(
            f"form field {field!r} must be a JSON object",
            code="invalid_json_field",
            detail={"where": field},
        )
    return value


def build(model: type[M], **fields: Any) -> M:
    """Validates form fields with the JSON endpoint's model, errors as 422."""
    try:
        return model(**fields)
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise InvalidInputError("the form fields do not match the schema", detail=errors) from exc
