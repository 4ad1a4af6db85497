"""The errors a client may see, as plain exceptions: the service's vocabulary of failure.

Code below the routers raises these and knows nothing of HTTP; ``service.api.error_handlers``
maps each class to a status code and renders every error in one body shape
(:func:`error_body`). ``code`` is stable (clients branch on it), ``message`` is for people.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error a client may see; ``code`` is stable, ``message`` is for people."""

    code = "error"

    def __init__(self, message: str, *, detail: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if code is not None:
            self.code = code


class InvalidInputError(ServiceError):
    code = "invalid_input"


class NotFoundError(ServiceError):
    """Also raised for other tenants' resources, so that their existence does not leak."""

    code = "not_found"


class ConflictError(ServiceError):
    code = "conflict"


class AuthenticationError(ServiceError):
    code = "unauthorized"


class PayloadTooLargeError(ServiceError):
    code = "payload_too_large"


class StoreUnavailableError(ServiceError):
    """The store cannot be reached; the request may be retried once it is back."""

    code = "store_unavailable"


class NotReadyError(ServiceError):
    code = "not_ready"


class RateLimitedError(ServiceError):
    """The tenant's request rate is over its limit; ``retry_after_s`` goes in ``Retry-After``."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, detail: Any = None) -> None:
        super().__init__(message, detail=detail)
        self.retry_after_s = retry_after_s


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    """The one JSON shape of every error answer."""
    return {"code": code, "message": message, "detail": detail}
