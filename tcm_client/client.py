"""Sync and async clients of the tcm-serve v1 API, on httpx.

Both are built from one description of each route (:class:`_Routes` returns a :class:`Call`:
method, path, body, parser), so the two cannot drift apart; only sending differs. A 429 or a
503 is retried (``retries`` times) after the server's ``Retry-After`` when it gives one, else
after an exponential backoff (``backoff_s * 2**attempt``, capped at ``max_wait_s``); other
errors raise :class:`ApiError` with the service's stable ``code`` and the ``X-Request-ID`` to
quote. Embeddings go in as numpy arrays (or sequences) and come out as float32 arrays.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload
from urllib.parse import quote

import httpx
import numpy as np
from pydantic import BaseModel

from tcm_client import models as m

T = TypeVar("T")
P = ParamSpec("P")
RETRYABLE = (429, 503)
Vector = np.ndarray | Sequence[float]


class ApiError(Exception):
    """An error answer: ``status``, the service's ``code`` and ``message``, ``detail``, and
    the request's id (``request_id``) to quote in a support ticket."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.detail, self.request_id = detail, request_id


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    files: Any = None
    data: Mapping[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def _model(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda r: cls.model_validate(r.json())


def _none(_: httpx.Response) -> None:
    return None


def _vector(v: Vector) -> list[float]:
    arr = np.asarray(v, dtype=np.float64).reshape(-1)
    return arr.tolist()


def _seg(value: str) -> str:
    return quote(value, safe="")


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _source(embedding: Vector | None, image: str | None) -> dict[str, Any]:
    if (embedding is None) == (image is None):
        raise ValueError("give exactly one of embedding or image")
    return {"embedding": _vector(embedding)} if embedding is not None else {"image": image}


class route(Generic[P, T]):
    """A route of the API: a method building its :class:`Call`. On a :class:`Client` it sends
    the call and returns the typed result; on an :class:`AsyncClient`, an awaitable of it
    (the two cannot drift apart: both are this one description)."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]]) -> None:
        self.build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, obj: AsyncClient, owner: Any) -> Callable[P, Awaitable[T]]: ...

    @overload
    def __get__(self, obj: Client, owner: Any) -> Callable[P, T]: ...

    @overload
    def __get__(self, obj: None, owner: Any) -> route[P, T]: ...

    def __get__(self, obj: Any, owner: Any) -> Any:
        if obj is None:
            return self

        def send(*args: Any, **kwargs: Any) -> Any:
            return obj.send(self.build(obj, *args, **kwargs))

        send.__name__ = self.build.__name__
        send.__doc__ = self.build.__doc__
        return send


class _Routes:
    """Every route of the API as a :class:`Call` (what to send and how to read the answer)."""

    # --- admin: tenants and keys -----------------------------------------------------------
    @route
    def create_tenant(self, name: str) -> Call[m.TenantCreated]:
        return Call("POST", "/v1/tenants", _model(m.TenantCreated), json={"name": name})

    @route
    def list_tenants(self) -> Call[list[m.Tenant]]:
        return Call(
            "GET",
            "/v1/tenants",
            lambda r: [m.Tenant.model_validate(t) for t in r.json()["tenants"]],
        )

    @route
    def get_tenant(self, tenant_id: str) -> Call[m.Tenant]:
        return Call("GET", f"/v1/tenants/{_seg(tenant_id)}", _model(m.Tenant))

    @route
    def delete_tenant(self, tenant_id: str) -> Call[None]:
        return Call("DELETE", f"/v1/tenants/{_seg(tenant_id)}", _none)

    @route
    def issue_key(self, tenant_id: str, *, revoke_existing: bool = False) -> Call[m.KeyIssued]:
        return Call(
            "POST",
            f"/v1/tenants/{_seg(tenant_id)}/keys",
            _model(m.KeyIssued),
            json={"revoke_existing": revoke_existing},
        )

    @route
    def list_keys(self, tenant_id: str) -> Call[list[m.Key]]:
        return Call(
            "GET",
            f"/v1/tenants/{_seg(tenant_id)}/keys",
            lambda r: [m.Key.model_validate(k) for k in r.json()["keys"]],
        )

    @route
    def revoke_key(self, tenant_id: str, key_id: str) -> Call[None]:
        return Call("DELETE", f"/v1/tenants/{_seg(tenant_id)}/keys/{_seg(key_id)}", _none)

    # --- admin: models ---------------------------------------------------------------------
    @route
    def list_models(self) -> Call[m.ModelRegistry]:
        return Call("GET", "/v1/models", _model(m.ModelRegistry))

    @route
    def stage_model(self, path: str) -> Call[m.ModelVersion]:
        return Call("POST", "/v1/models", _model(m.ModelVersion), json={"path": path})

    @route
    def activate_model(self, version: str) -> Call[m.Activation]:
        return Call("POST", f"/v1/models/{_seg(version)}/activate", _model(m.Activation))

    @route
    def rollback_model(self) -> Call[m.Activation]:
        return Call("POST", "/v1/models/rollback", _model(m.Activation))

    @route
    def unembedded_items(self, version: str) -> Call[dict[str, list[str]]]:
        return Call("GET", f"/v1/models/{_seg(version)}/unembedded", lambda r: r.json()["items"])

    # --- gallery ---------------------------------------------------------------------------
    @route
    def enrol(self, items: Sequence[Mapping[str, Any]]) -> Call[list[str]]:
        """Items: ``{"subject", "embedding" (array) | "image" (base64), "item_id"?,
        "metadata"?}``; all or none."""
        body = [
            {**it, "embedding": _vector(it["embedding"])}
            if it.get("embedding") is not None
            else dict(it)
            for it in items
        ]
        return Call("POST", "/v1/gallery", lambda r: r.json()["item_ids"], json={"items": body})

    @route
    def enrol_upload(
        self, file: bytes, *, subject: str, item_id: str | None = None, metadata: str | None = None
    ) -> Call[list[str]]:
        return Call(
            "POST",
            "/v1/gallery/upload",
            lambda r: r.json()["item_ids"],
            files={"file": ("image", file)},
            data=_drop_none({"subject": subject, "item_id": item_id, "metadata": metadata}),
        )

    @route
    def put_item(
        self,
        item_id: str,
        *,
        subject: str,
        embedding: Vector | None = None,
        image: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Call[m.PutResult]:
        body = {"subject": subject, **_source(embedding, image), "metadata": dict(metadata or {})}
        return Call("PUT", f"/v1/gallery/{_seg(item_id)}", _model(m.PutResult), json=body)

    @route
    def list_items(
        self, *, subject: str | None = None, cursor: str | None = None, limit: int | None = None
    ) -> Call[m.ItemPage]:
        return Call(
            "GET",
            "/v1/gallery",
            _model(m.ItemPage),
            params=_drop_none({"subject": subject, "cursor": cursor, "limit": limit}),
        )

    @route
    def get_item(self, item_id: str, *, include_embedding: bool = False) -> Call[m.GalleryItem]:
        return Call(
            "GET",
            f"/v1/gallery/{_seg(item_id)}",
            _model(m.GalleryItem),
            params={"include_embedding": str(include_embedding).lower()},
        )

    @route
    def delete_item(self, item_id: str) -> Call[None]:
        return Call("DELETE", f"/v1/gallery/{_seg(item_id)}", _none)

    @route
    def list_subjects(
        self, *, cursor: str | None = None, limit: int | None = None
    ) -> Call[m.SubjectPage]:
        return Call(
            "GET",
            "/v1/subjects",
            _model(m.SubjectPage),
            params=_drop_none({"cursor": cursor, "limit": limit}),
        )

    @route
    def delete_subject(self, subject: str) -> Call[int]:
        return Call("DELETE", f"/v1/subjects/{_seg(subject)}", lambda r: r.json()["deleted"])

    # --- match, verify, embed, feedback ----------------------------------------------------
    @route
    def match(
        self,
        *,
        embedding: Vector | None = None,
        image: str | None = None,
        k: int = 5,
        filter: Mapping[str, Any] | None = None,
    ) -> Call[m.MatchResult]:
        body = {**_source(embedding, image), "k": k}
        if filter is not None:
            body["filter"] = dict(filter)
        return Call("POST", "/v1/match", _model(m.MatchResult), json=body)

    @route
    def match_upload(self, file: bytes, *, k: int = 5) -> Call[m.MatchResult]:
        return Call(
            "POST",
            "/v1/match/upload",
            _model(m.MatchResult),
            files={"file": ("image", file)},
            data={"k": str(k)},
        )

    @route
    def verify(
        self, a: Mapping[str, Any], b: Mapping[str, Any], *, filter: Mapping[str, Any] | None = None
    ) -> Call[m.VerifyResult]:
        """``a`` and ``b``: one of ``{"embedding": array}``, ``{"image": base64}``,
        ``{"item_id": ...}``, ``{"subject": ...}``."""

        def side(x: Mapping[str, Any]) -> dict[str, Any]:
            return {**x, "embedding": _vector(x["embedding"])} if "embedding" in x else dict(x)

        body: dict[str, Any] = {"a": side(a), "b": side(b)}
        if filter is not None:
            body["filter"] = dict(filter)
        return Call("POST", "/v1/verify", _model(m.VerifyResult), json=body)

    @route
    def verify_upload(self, a: bytes, b: bytes) -> Call[m.VerifyResult]:
        return Call(
            "POST",
            "/v1/verify/upload",
            _model(m.VerifyResult),
            files={"a": ("a", a), "b": ("b", b)},
        )

    @route
    def embed(self, images: Sequence[str]) -> Call[m.EmbedResult]:
        return Call("POST", "/v1/embed", _model(m.EmbedResult), json={"images": list(images)})

    @route
    def embed_upload(self, file: bytes) -> Call[m.EmbedResult]:
        return Call(
            "POST", "/v1/embed/upload", _model(m.EmbedResult), files={"file": ("image", file)}
        )

    @route
    def feedback(
        self,
        match_id: str,
        *,
        correct: bool | None = None,
        true_subject: str | None = None,
        subject_given: bool = False,
    ) -> Call[m.FeedbackResult]:
        """``correct=True/False``, or ``true_subject`` (``subject_given=True`` with
        ``true_subject=None``: the query's subject is not enrolled)."""
        body: dict[str, Any] = {"match_id": match_id}
        if correct is not None:
            body["correct"] = correct
        if true_subject is not None or subject_given:
            body["true_subject"] = true_subject
        return Call("POST", "/v1/feedback", _model(m.FeedbackResult), json=body)

    # --- monitor, model, health ------------------------------------------------------------
    @route
    def monitor(self, *, threshold: float | None = None) -> Call[m.MonitorView]:
        return Call(
            "GET", "/v1/monitor", _model(m.MonitorView), params=_drop_none({"threshold": threshold})
        )

    @route
    def model(self) -> Call[m.ModelInfo]:
        return Call("GET", "/v1/model", _model(m.ModelInfo))

    @route
    def healthz(self) -> Call[bool]:
        return Call("GET", "/healthz", lambda r: r.json()["status"] == "ok")

    @route
    def readyz(self) -> Call[m.Readiness]:
        return Call("GET", "/readyz", _model(m.Readiness))

    @route
    def metrics(self) -> Call[str]:
        return Call("GET", "/metrics", lambda r: r.text)


def _error(r: httpx.Response) -> ApiError:
    try:
        body = r.json()
        code, message, detail = body["code"], body["message"], body.get("detail")
    except (ValueError, KeyError, TypeError):
        code, message, detail = "error", r.text[:500], None
    return ApiError(r.status_code, code, message, detail, r.headers.get("x-request-id"))


def retry_after(r: httpx.Response, attempt: int, *, backoff_s: float, max_wait_s: float) -> float:
    """Seconds to wait before retrying: the server's Retry-After (seconds) when valid, else
    exponential backoff; capped at ``max_wait_s``."""
    header = r.headers.get("retry-after", "")
    try:
        wait = float(header)
    except ValueError:
        wait = backoff_s * 2**attempt
    return min(max(wait, 0.0), max_wait_s)


def _request_args(call: Call[Any]) -> dict[str, Any]:
    return _drop_none(
        {"json": call.json, "params": call.params, "files": call.files, "data": call.data}
    ) | {"headers": dict(call.headers)}


class _Base(_Routes):
    def __init__(
        self, base_url: str, token: str | None, *, retries: int, backoff_s: float, max_wait_s: float
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries, self.backoff_s, self.max_wait_s = retries, backoff_s, max_wait_s
        self.retried = 0  # how many requests were retried (observability, tests)

    def _result(self, call: Call[T], r: httpx.Response) -> T:
        if r.status_code >= 400:
            raise _error(r)
        return call.parse(r)


class Client(_Base):
    """Blocking client: ``Client(url, token).match(embedding=v)``. Use as a context manager
    (or call ``close()``)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        retries: int = 4,
        backoff_s: float = 0.2,
        max_wait_s: float = 30.0,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, token, retries=retries, backoff_s=backoff_s, max_wait_s=max_wait_s
        )
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=timeout_s, transport=transport
        )

    def send(self, call: Call[T]) -> T:
        for attempt in range(self.retries + 1):
            r = self._http.request(call.method, call.path, **_request_args(call))
            if r.status_code not in RETRYABLE or attempt == self.retries:
                return self._result(call, r)
            self.retried += 1
            time.sleep(
                retry_after(r, attempt, backoff_s=self.backoff_s, max_wait_s=self.max_wait_s)
            )
        raise AssertionError("unreachable")

    def iter_items(
        self, *, subject: str | None = None, limit: int | None = None
    ) -> Iterator[m.GalleryItem]:
        """Every item, following the cursors."""
        cursor = None
        while True:
            page = self.list_items(subject=subject, cursor=cursor, limit=limit)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """Asynchronous client: ``await AsyncClient(url, token).match(embedding=v)``."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        retries: int = 4,
        backoff_s: float = 0.2,
        max_wait_s: float = 30.0,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, token, retries=retries, backoff_s=backoff_s, max_wait_s=max_wait_s
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout_s, transport=transport
        )

    async def send(self, call: Call[T]) -> T:
        for attempt in range(self.retries + 1):
            r = await self._http.request(call.method, call.path, **_request_args(call))
            if r.status_code not in RETRYABLE or attempt == self.retries:
                return self._result(call, r)
            self.retried += 1
            await asyncio.sleep(
                retry_after(r, attempt, backoff_s=self.backoff_s, max_wait_s=self.max_wait_s)
            )
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
