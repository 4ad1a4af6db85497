"""The HTTP side of read-your-writes (``service.domain.consistency``).

:class:`ConsistencyTokenMiddleware` opens each request's token box and puts the write's token,
when a gallery write recorded one, in the response's ``X-Consistency-Token`` header (every
write route answers it, the 204s included, without each route handling it).
:func:`consistent_read` is the match and verify routers' dependency: a request that carries the
header waits until this replica has caught up to it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.dependencies import RuntimeDep, TenantId
from service.domain import consistency
from service.errors import NotReadyError


class ConsistencyTokenMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        box = consistency.open_box()

        async def send_with_token(message: Message) -> None:
            if message["type"] == "http.response.start" and "token" in box:
                message["headers"] = [
                    *message.get("headers", []),
                    (consistency.HEADER.lower().encode(), box["token"].encode()),
                ]
            await send(message)

        await self.app(scope, receive, send_with_token)


async def consistent_read(
    tenant: TenantId,
    runtime: RuntimeDep,
    token: Annotated[
        str | None,
        Header(
            alias=consistency.HEADER,
            pattern=consistency.TOKEN_PATTERN,
            description="the X-Consistency-Token of a gallery write: this request then sees "
            "that write (and every earlier one) whichever replica answers, waiting up to "
            "TCM_CONSISTENCY_WAIT_MS for it (503 not_caught_up after that, with Retry-After)",
        ),
    ] = None,
) -> None:
    """Waits (bounded) until this replica's indexes reflect the write ``token`` names."""
    if token is None:  # (a malformed one is a 422 of the header's pattern, before this)
        return
    wait_s = runtime.settings.consistency_wait_ms / 1e3
    if not await runtime.sync.caught_up(token, wait_s, tenant):
        raise NotReadyError(
            f"this replica has not yet applied the write of {consistency.HEADER} "
            f"{token} (waited {wait_s:g} s): retry, or send the request to the replica that "
            "took the write",
            code="not_caught_up",
        )
