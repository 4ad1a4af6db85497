"""Forwarding a tenant's request to a replica of its shard group (issue 31 item 2).

Authentication (``service.api.dependencies.authenticate_tenant``) asks the runtime's
:class:`~service.runtime.groups.GroupRouting` where an authenticated tenant's request belongs;
when it is another replica, it raises :class:`ForwardTo` before the rate limit is taken (the
owner's replica takes it) and before a byte of the body is read (routes with a body
authenticate first: ``service.api.auth_first``). The handler here sends the request as it came
(method, path, query, headers, body, with ``X-TCM-Forwarded: <this replica's table version>``)
to the peer and answers what the peer answered. A forwarded request is never forwarded again
(``service.domain.placement.route``); a peer that cannot be reached is a 503 with
``Retry-After``.

:class:`UnansweredMiddleware` spans each request's whole life, forwarding included, so that
the table version it was routed under counts as unanswered until its response is sent
(``GroupRouting.request_scope``).
"""

from __future__ import annotations

import logging

import httpx
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.error_handlers import service_error
from service.api.request_id import request_id
from service.errors import NotReadyError
from service.runtime.groups import FORWARDED_HEADER

log = logging.getLogger(__name__)

# hop-by-hop headers (RFC 9110 7.6.1) and those httpx sets itself
_NOT_FORWARDED = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-encoding",
}


class ForwardTo(Exception):  # a control-flow signal, handled by forward()
    """This request belongs to shard group ``group``, whose replica at ``url`` takes it."""

    def __init__(self, url: str, group: str, version: int) -> None:
        super().__init__(url)
        self.url = url
        self.group = group
        self.version = version


async def forward(request: Request, exc: Exception) -> Response:
    """Sends the request to ``exc.url``; one that could not connect (the peer died since it
    last said it was alive) goes to another live replica of the group, once."""
    assert isinstance(exc, ForwardTo)
    client: httpx.AsyncClient = request.app.state.forwarder
    metrics = request.app.state.runtime.metrics
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
    headers[FORWARDED_HEADER] = str(exc.version)
    rid = request_id.get()
    if rid is not None:  # one id for the request on both replicas (their logs correlate)
        headers["x-request-id"] = rid
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    body = await request.body()
    url: str | None = exc.url
    tried: set[str] = set()
    while url is not None:
        tried.add(url)
        try:
            answer = await client.request(request.method, url + path, headers=headers, content=body)
        except httpx.ConnectError as err:  # never reached the peer: safe to send elsewhere
            log.warning("forwarding to %s failed: %s", url, err)
            url = None
            if len(tried) < 2:
                groups = request.app.state.runtime.routing.groups
                peer = await run_in_threadpool(groups.peer_of, exc.group, exclude=tried)
                url = None if peer is None else peer.url
            continue
        except httpx.HTTPError as err:  # it may have reached the peer: not sent again
            log.warning("forwarding to %s failed: %s", url, err)
            break
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in _NOT_FORWARDED}
        metrics.forwarded.labels(group=exc.group, outcome="answered").inc()
        return Response(answer.content, status_code=answer.status_code, headers=kept)
    metrics.forwarded.labels(group=exc.group, outcome="unreachable").inc()
    return await service_error(
        request,
        NotReadyError(
            "the replica serving this tenant's shard group could not be reached: retry shortly",
            code="group_unavailable",
            detail={"group": exc.group},
        ),
    )


class UnansweredMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
        if scope["type"] != "http" or runtime is None:
            await self.app(scope, receive, send)
            return
        with runtime.routing.request_scope():
            await self.app(scope, receive, send)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ForwardTo, forward)


def open_forwarder(timeout_s: float) -> httpx.AsyncClient:
    """The app's one HTTP client for forwarding (the lifespan opens and closes it)."""
    return httpx.AsyncClient(timeout=timeout_s)
