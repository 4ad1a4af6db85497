"""Authentication before the body: a route that takes a body checks the admin token or tenant key
before a byte of the body is read.

FastAPI reads (and parses) a route's body before it runs the route's dependencies, so with the
checks in dependencies only, anyone could make the service read and parse up to
``TCM_MAX_BODY_BYTES`` per request without a key, all answered 401. :class:`AuthFirstRoute`
(every router's ``route_class``) wraps the handler FastAPI builds for a route that takes a body
and a bearer scheme: :func:`~service.api.dependencies.authenticate_first` runs first, with the
checks and errors of the route's own dependencies; errors go through the app's exception
handlers as any route error does. Which schemes a route takes is read from its dependencies
(the ``HTTPBearer`` instances of ``service.api.dependencies``), so a new route is covered
without being listed. A route without a body never reads one (FastAPI reads only declared
bodies), so its dependencies already run before any byte: it is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.api.dependencies import admin_bearer, authenticate_first, tenant_bearer


def bearer_schemes(dependant: Dependant) -> frozenset[str]:
    """The bearer schemes among a route's dependencies, at any depth."""
    found: set[str] = set()
    stack = [dependant]
    while stack:
        d = stack.pop()
        if d.call is admin_bearer:
            found.add("admin")
        elif d.call is tenant_bearer:
            found.add("tenant")
        stack.extend(d.dependencies)
    return frozenset(found)


class AuthFirstRoute(APIRoute):
    """An ``APIRoute`` that authenticates before FastAPI reads its body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        schemes = bearer_schemes(self.dependant)
        if not schemes or self.body_field is None:
            return handler

        async def authenticated_first(request: Request) -> Response:
            await authenticate_first(request, schemes)
            return await handler(request)

        return authenticated_first
