"""``X-Request-ID``: taken from the request (when valid) or generated, echoed on every
response, and logged with each request, so that a client can quote it in a support ticket and
an operator can find that request in the logs.

A pure ASGI middleware (outermost), so every response carries the header, the ones other
middleware answer by themselves (413 of the body limit) included. An id that does not match
:data:`REQUEST_ID_PATTERN` (control characters, spaces, over 128 characters: things that could
forge log lines) is refused with 400 ``invalid_request_id``; the error answer carries a fresh
id. The current id is in :data:`request_id` (a context variable) for log messages.

Each request is logged once, when it ends, as one structured record (logger
``service.requests``, fields ``event="request"``, ``request_id``, ``method``, ``route`` (the
route template, ``unmatched`` when none), ``path`` (path and query as sent, secrets-shaped parts
redacted by :func:`service.logs.redact_target`; ``redact`` names the process's own secrets, the
admin token), ``status``, ``duration_ms``). ``tcm-serve`` writes it as one JSON line and turns
uvicorn's access log off: the access log printed the raw path and query, secrets included.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.logs import redact_target

log = logging.getLogger("service.requests")

HEADER = "X-Request-ID"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:+/=-]{1,128}$"
_VALID = re.compile(REQUEST_ID_PATTERN)
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp, redact: Iterable[str] = ()) -> None:
        self.app = app
        self.redact = tuple(s for s in redact if s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = [v for k, v in scope.get("headers", ()) if k == b"x-request-id"]
        rid = given[-1].decode("latin-1") if given else None
        if rid is not None and (len(given) > 1 or not _VALID.match(rid)):
            start = time.perf_counter()
            rid = new_request_id()
            await _refuse(send, rid)
            self._log(scope, rid, 400, start, "refused: invalid " + HEADER)
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
            self._log(scope, rid, status, start)
            request_id.reset(token)

    def _log(self, scope: Scope, rid: str, status: int, start: float, note: str = "") -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "")
        duration_ms = round((time.perf_counter() - start) * 1e3, 1)
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if isinstance(raw, bytes) else scope.get("path", "")
        fields = {
            "event": "request",
            "request_id": rid,
            "method": method,
            "route": route,
            # as sent, but never a pasted secret: the raw target is not logged anywhere
            "path": redact_target(
                path, scope.get("query_string", b"").decode("latin-1"), self.redact
            ),
            "status": status,
            "duration_ms": duration_ms,
        }
        # the message (for other formatters than tcm-serve's) names the route template only
        log.info(
            "request_id=%s %s %s -> %d in %.1f ms%s",
            rid,
            method,
            route,
            status,
            duration_ms,
            f" {note}" if note else "",
            extra={"fields": fields},
        )


async def _refuse(send: Send, rid: str) -> None:
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
