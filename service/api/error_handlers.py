"""The HTTP half of the errors: status codes, and the one place where errors become responses.

``install`` maps each :class:`service.errors.ServiceError` class to a status code and renders
every error, FastAPI's own validation errors and malformed JSON included, in one body shape:
``{"code": ..., "message": ..., "detail": ...}`` (:func:`service.errors.error_body`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.request_id import request_id
from service.errors import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    RateLimitedError,
    ServiceError,
    StoreUnavailableError,
    error_body,
)
from service.ids import ID_PATTERN, ID_RULE

log = logging.getLogger(__name__)


STATUS: dict[type[ServiceError], int] = {
    InvalidInputError: 422,
    NotFoundError: 404,
    ConflictError: 409,
    AuthenticationError: 401,
    PayloadTooLargeError: 413,
    StoreUnavailableError: 503,
    NotReadyError: 503,
    RateLimitedError: 429,
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "too_many_requests",
    503: "unavailable",
}


def status_of(exc: ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


async def service_error(request: Request, exc: Exception) -> JSONResponse:
    """A :class:`ServiceError` in the one body shape (503s with ``Retry-After``, logged)."""
    assert isinstance(exc, ServiceError)
    status = status_of(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "1"}
        log.warning("%s: %s (request_id=%s)", exc.code, exc.message, request_id.get())
        if isinstance(exc, StoreUnavailableError):
            on_store_error = getattr(request.app.state, "on_store_error", None)
            if on_store_error is not None:
                on_store_error()
    elif isinstance(exc, RateLimitedError):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return _response(status, error_body(exc.code, exc.message, exc.detail), headers)


def _clean_validation_errors(errors: Any) -> list[dict[str, Any]]:
    """Keeps loc/msg/type: echoing ``input`` back could return megabytes of base64. An id that
    does not match the id pattern is told the rule in words (which characters are allowed), the
    pattern after it."""
    out = []
    for e in errors:
        item = {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        ctx = e.get("ctx")
        if ctx:
            item["ctx"] = {k: str(v) for k, v in ctx.items()}
            if item["type"] == "string_pattern_mismatch" and ctx.get("pattern") == ID_PATTERN:
                item["msg"] = f"an id must be {ID_RULE} (pattern {ID_PATTERN})"
        out.append(item)
    return out


def _where(loc: list[Any]) -> str:
    """``["body", "items", 0, "subject"]`` -> ``body.items[0].subject``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _summary(errors: list[dict[str, Any]]) -> str:
    """The first problem in the message itself, so that a client printing only the message
    still learns what to change."""
    if not errors:
        return "the request does not match the schema"
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    where = _where(first["loc"])
    at = f"{where}: " if where else ""
    return f"the request does not match the schema: {at}{first['msg']}{more}"


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _clean_validation_errors(exc.errors())
    if any(e["type"] == "json_invalid" for e in errors):
        return _response(
            400, error_body("malformed_json", "the request body is not valid JSON", errors)
        )
    return _response(422, error_body("invalid_input", _summary(errors), errors))


def allowed_methods(request: Request) -> list[str]:
    """Every method the API serves at this path, as its OpenAPI document lists them
    (Starlette's own 405 names only the first route that matched the path, so a path with GET
    and DELETE routes answered ``Allow: GET``). A literal path (``/v1/gallery/upload``) is
    answered with its own methods, not those of a template it also fits."""
    paths: dict[str, set[str]] = {
        p: {m.upper() for m in ops} for p, ops in request.app.openapi().get("paths", {}).items()
    }
    path = request.url.path
    if path in paths:
        return sorted(paths[path])
    patterns = getattr(request.app.state, "path_methods", None)
    if patterns is None:
        patterns = [
            (re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(p)) + "$"), ops)
            for p, ops in paths.items()
        ]
        request.app.state.path_methods = patterns
    methods: set[str] = set()
    for pattern, ops in patterns:
        if pattern.match(path):
            methods |= ops
    return sorted(methods)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        allow = allowed_methods(request)
        headers["Allow"] = ", ".join(allow)
        message = f"{request.method} is not allowed here; use {', '.join(allow)}"
    return _response(exc.status_code, error_body(code, message), headers or None)


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error (request_id=%s)", request_id.get(), exc_info=exc)
    return _response(500, error_body("internal_error", "an unexpected error occurred"))


def install(app: FastAPI, *, on_store_error: Callable[[], None] | None = None) -> None:
    """Renders every error in one body shape; ``on_store_error`` is called for each 503
    ``store_unavailable`` (the app counts them on /metrics)."""
    app.state.on_store_error = on_store_error
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
