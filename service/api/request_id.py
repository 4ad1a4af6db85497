"""``X-Request-ID``: taken from the request (when valid) or generated, echoed on every
response, and logged with each request, so that a client can quote it in a support ticket and
an operator can find that request in the logs.

A pure ASGI middleware (outermost), so every response carries the header, the ones other
middleware answer by themselves (413 of the body limit) included. An id that does not match
:data:`REQUEST_ID_PATTERN` (control characters, spaces, over 128 characters: things that could
forge log lines) is refused with 400 ``invalid_request_id``; the error answer carries a fresh
id. The current id is in :data:`request_id` (a context variable) for log messages.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body

log = logging.getLogger("service.requests")

HEADER = "X-Request-ID"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:+/=-]{1,128}$"
_VALID = re.compile(REQUEST_ID_PATTERN)
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = [v for k, v in scope.get("headers", ()) if k == b"x-request-id"]
        rid = given[-1].decode("latin-1") if given else None
        if rid is not None and (len(given) > 1 or not _VALID.match(rid)):
            await _refuse(send)
            return
        rid = rid or new_request_id()
        token = request_id.set(rid)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                message["headers"] = [*headers, (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            # the route template, never the raw path or query (they may carry pasted secrets)
            log.info(
                "request_id=%s %s %s -> %d in %.1f ms",
                rid,
                scope.get("method", ""),
                route,
                status,
                (time.perf_counter() - start) * 1e3,
            )
            request_id.reset(token)


async def _refuse(send: Send) -> None:
    rid = new_request_id()
    body = json.dumps(
        error_body(
            "invalid_request_id",
            f"{HEADER} must match {REQUEST_ID_PATTERN} (letters, digits and "
            "._:+/=-, at most 128), or be left out to have one generated",
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", rid.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
    log.info("request_id=%s refused: invalid %s", rid, HEADER)
