"""Sync and async clients of the tcm-serve v1 API, on httpx.

Both are built from one description of each route (:class:`_Routes` returns a :class:`Call`:
method, path, body, parser, whether it is safe to repeat), so the two cannot drift apart; only
sending differs. What is sent again, when and after how long is one :class:`RetryPolicy`
(``retries`` times; 429 and connect errors for every request, 502/503/504 and other transport
errors only for requests that are safe to repeat; waits the server's ``Retry-After`` or an
exponential backoff, ``backoff_s * 2**attempt``, whichever is longer, capped at
``max_wait_s``). Other errors raise :class:`ApiError` with the service's stable ``code`` and the
``X-Request-ID`` to quote; a transport error that is not retried (or no longer) raises
:class:`TransportFailure` (httpx's exception is its ``__cause__``); both are
:class:`ClientError` errors. Embeddings go in as numpy arrays (or sequences), as base64 float32
where the API takes it, and come out as float32 arrays; images as bytes, paths, PIL images or base64
(:mod:`tcm_client.inputs`). Each route also answers ``.raw(...)``: the same request, the
answer's JSON as the server sent it. :meth:`Client.upload` sends many items in columnar batches
(:mod:`tcm_client.upload`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field, replace
from types import EllipsisType
from typing import Any, Concatenate, Generic, Literal, ParamSpec, Protocol, TypeVar, overload
from urllib.parse import quote

import httpx
import numpy as np
from pydantic import BaseModel

from tcm_client import models as m
from tcm_client.inputs import (
    ImageInput,
    Vector,
    image_b64,
    image_bytes,
    matrix_b64,
    vector_field,
    vector_json,
)
from tcm_client.upload import Batch, Plan, Progress, Tally, UploadResult
from tcm_client.upload import plan as plan_upload

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
P = ParamSpec("P")


class ClientError(Exception):
    """Every error the client raises about a request: :class:`ApiError` (the service
    answered with an error) or :class:`TransportFailure` (no answer came).

    ``attempts``: how many times the client sent the request (retries included);
    ``earlier_attempt_may_have_acted``: whether an earlier attempt was sent and its outcome is
    unknown (its answer was lost, or was a 502/503/504), so that this outcome may be about what
    that attempt did (a 409 for the items it stored)."""

    attempts: int = 1
    earlier_attempt_may_have_acted: bool = False


class TransportFailure(ClientError):
    """No answer: the connection could not be made, broke, or timed out (httpx's exception is
    ``__cause__``), and the retry policy did not (or no longer) send the request again.
    ``sent``: whether the last attempt may have reached the server (False for a connect error:
    nothing was sent), so whether the server may have acted on it."""

    def __init__(self, message: str, *, method: str, url: str, sent: bool) -> None:
        super().__init__(message)
        self.method, self.url, self.sent = method, url, sent


class ApiError(ClientError):
    """An error answer: ``status``, the service's ``code`` and ``message``, ``detail``, and
    the request's id (``request_id``) to quote in a support ticket; ``response``: the answer
    itself (headers, body as sent), when the error came from one. ``attempts`` and
    ``earlier_attempt_may_have_acted``: as :class:`ClientError`'s."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        request_id: str | None = None,
        *,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.detail, self.request_id = detail, request_id
        self.response = response


# --- the retry policy ---------------------------------------------------------------------------
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
REFUSED_STATUS = frozenset({429})  # the server did nothing: retried for every request
TRANSIENT_STATUS = frozenset({502, 503, 504})  # it may have acted: retried if safe to repeat
# the request never left this machine (no connection was made, or none was free in the pool)
NOT_SENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
# sent, maybe acted on, the answer lost: retried if safe to repeat
LOST_ANSWER_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """When :class:`Client` and :class:`AsyncClient` send a request again, and after how long
    (the one retry policy of the package, and of the tools built on it: ``tcm-serve import``
    and ``tcm-serve models``).

    A request is *safe to repeat* (:attr:`Call.safe`) when a second copy cannot change what
    the first one did: GET, PUT, DELETE (HEAD, OPTIONS); the query POSTs (match, verify,
    embed: they write nothing a caller reads back); and the POSTs the server deduplicates
    (staging a model: the same path is the same version; feedback: a second one is refused
    with 409); and every write that carries an ``Idempotency-Key`` (every enrolment and upload
    batch: the service records the key with the write, atomically, and answers a resend with
    the first answer, writing nothing). A POST that creates something without a key (a tenant,
    a key, an activation, a rollback) is not (:meth:`safe_to_repeat`).

    - ``429``: retried for every request: the server refused it before doing anything.
    - connect errors (:data:`NOT_SENT_ERRORS`): retried for every request: it was never sent.
    - ``502``, ``503``, ``504`` and the transport errors after sending (:data:`LOST_ANSWER_ERRORS`:
      read/write errors and timeouts, a dropped connection): retried only when safe to repeat,
      since the server may have acted on the request before its answer was lost.
    - anything else (4xx, 500, a malformed URL) is answered (or raised) at once.

    A transport error that is not retried (or no longer) raises :class:`TransportFailure`.

    At most ``retries`` times (``retries + 1`` attempts in all). Before retry ``attempt`` (0
    first) it waits the longer of the server's ``Retry-After`` (seconds; the server's earliest)
    and ``backoff_s * 2**attempt`` (growing while the trouble lasts), at most ``max_wait_s``.
    No jitter: waits are deterministic.
    """

    retries: int = 4
    backoff_s: float = 0.2
    max_wait_s: float = 30.0

    @staticmethod
    def safe_to_repeat(
        method: str, headers: Mapping[str, str] | None = None, declared: bool | None = None
    ) -> bool:
        """Whether a request may be sent twice: as ``declared`` by the route when it says
        (a query POST, a POST the server deduplicates); else a request carrying an
        ``Idempotency-Key`` is (the server answers a resend with the first answer); else by
        method (:data:`SAFE_METHODS`: reads, PUT, DELETE)."""
        if declared is not None:
            return declared
        if any(name.lower() == IDEMPOTENCY_HEADER.lower() for name in headers or {}):
            return True
        return method.upper() in SAFE_METHODS

    def retries_status(self, status: int, *, safe: bool) -> bool:
        """Whether an answer with ``status`` is retried (for a request safe to repeat or not)."""
        return status in REFUSED_STATUS or (safe and status in TRANSIENT_STATUS)

    def retries_error(self, error: Exception, *, safe: bool) -> bool:
        """Whether a transport error is retried (httpx's exception classes)."""
        return isinstance(error, NOT_SENT_ERRORS) or (
            safe and isinstance(error, LOST_ANSWER_ERRORS)
        )

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry ``attempt`` (0 first), after ``response`` if any."""
        backoff = min(self.backoff_s * 2**attempt, self.max_wait_s)
        if response is None:
            return max(backoff, 0.0)
        asked = retry_after(response, attempt, backoff_s=self.backoff_s, max_wait_s=self.max_wait_s)
        return max(asked, backoff, 0.0)

    def next_wait(
        self,
        attempt: int,
        *,
        safe: bool,
        response: httpx.Response | None = None,
        error: Exception | None = None,
    ) -> float | None:
        """After attempt ``attempt`` (0 first) ended in ``response`` or ``error``: the seconds
        to wait before sending again, or None (give the answer, or raise the error)."""
        if attempt >= self.retries:
            return None
        if error is not None:
            retry = self.retries_error(error, safe=safe)
        else:
            assert response is not None
            retry = self.retries_status(response.status_code, safe=safe)
        return self.delay(attempt, response) if retry else None


IDEMPOTENCY_HEADER = "Idempotency-Key"
# read-your-writes across replicas: every gallery write answers its token, and the client sends
# the newest one it has seen with each match and verify (the server waits, bounded, until the
# replica answering has applied that write)
CONSISTENCY_HEADER = "X-Consistency-Token"
CONSISTENT_READS = ("/v1/match", "/v1/verify")


def _feed_position(token: str) -> tuple[int, int]:
    """A token's place in the server's change feed (``<ms>-<seq>[#<n>]``); (-1, -1) for a
    token of another shape, which then never replaces a known one."""
    ms, _, seq = token.partition("#")[0].partition("-")
    seq = seq or "0"  # "<ms>" alone is "<ms>-0"
    return (int(ms), int(seq)) if ms.isdigit() and seq.isdigit() else (-1, -1)


def _idempotency_key() -> str:
    """A fresh key for one write: the service records it with the write, so a resend of that
    request (its answer lost) gets the first answer instead of writing again."""
    return uuid.uuid4().hex


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
    content: bytes | None = None  # a body already encoded (then ``headers`` has its type)
    idempotent: bool | None = None  # safe to repeat; None: by method (:data:`SAFE_METHODS`)

    @property
    def safe(self) -> bool:
        """Whether sending it twice is no different from once
        (:meth:`RetryPolicy.safe_to_repeat`)."""
        return RetryPolicy.safe_to_repeat(self.method, self.headers, self.idempotent)


def _model(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda r: cls.model_validate(r.json())


def _none(_: httpx.Response) -> None:
    return None


def _json(r: httpx.Response) -> Any:
    return r.json() if r.content else None


def _seg(value: str) -> str:
    return quote(value, safe="")


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _source(
    embedding: Vector | None, image: ImageInput | None, *, base64: bool = False
) -> dict[str, Any]:
    """An embedding (as base64 float32 where the route takes it) or an image, exactly one."""
    if (embedding is None) == (image is None):
        raise ValueError("give exactly one of embedding or image")
    if embedding is not None:
        return dict([vector_field(embedding)]) if base64 else {"embedding": vector_json(embedding)}
    return {"image": image_b64(image)}


def _item(item: Mapping[str, Any], where: str, *, encoding: str) -> dict[str, Any]:
    """An enrolment item as the API takes it: its vector as base64 float32 (``encoding=
    "base64"``) or JSON numbers, its image as base64 (from any image form)."""
    out = dict(item)
    if out.get("embedding") is not None:
        vector = out.pop("embedding")
        if encoding == "base64":
            name, value = vector_field(vector)
            out[name] = value
        else:
            out["embedding"] = vector_json(vector)
    elif out.get("image") is not None:
        out["image"] = image_b64(out["image"], where=f"{where}.image")
    return out


class BoundRoute(Protocol[P, T_co]):
    """A route of a :class:`Client`: call it for the typed answer; ``.raw(...)`` sends the
    same request and returns the answer's JSON as the server sent it (keys in its order;
    None for an empty answer), for tools that print or forward answers verbatim."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T_co: ...

    def raw(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...


class AsyncBoundRoute(Protocol[P, T_co]):
    """A route of an :class:`AsyncClient`: as :class:`BoundRoute`, awaitable."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[T_co]: ...

    def raw(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[Any]: ...


class _Bound:
    """A route bound to a client (what :class:`BoundRoute` and :class:`AsyncBoundRoute`
    describe)."""

    def __init__(self, client: Any, build: Callable[..., Call[Any]]) -> None:
        self._client, self._build = client, build
        self.__name__ = build.__name__
        self.__doc__ = build.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.send(self._build(self._client, *args, **kwargs))

    def raw(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.send(replace(self._build(self._client, *args, **kwargs), parse=_json))

    def __repr__(self) -> str:
        return f"<route {self.__name__} of {self._client!r}>"


class route(Generic[P, T]):
    """A route of the API: a method building its :class:`Call`. On a :class:`Client` it sends
    the call and returns the typed result; on an :class:`AsyncClient`, an awaitable of it
    (the two cannot drift apart: both are this one description). Either way ``.raw(...)``
    gives the answer's JSON instead."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]]) -> None:
        self.build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, obj: AsyncClient, owner: Any) -> AsyncBoundRoute[P, T]: ...

    @overload
    def __get__(self, obj: Client, owner: Any) -> BoundRoute[P, T]: ...

    @overload
    def __get__(self, obj: None, owner: Any) -> route[P, T]: ...

    def __get__(self, obj: Any, owner: Any) -> Any:
        if obj is None:
            return self
        return _Bound(obj, self.build)


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
        """Registers the artefact at ``path`` (on the server). Safe to repeat: the same path
        is the same version."""
        return Call(
            "POST", "/v1/models", _model(m.ModelVersion), json={"path": path}, idempotent=True
        )

    @route
    def activate_model(self, version: str) -> Call[m.Activation]:
        """Starts switching to ``version`` (202: progress on :meth:`list_models`)."""
        return Call("POST", f"/v1/models/{_seg(version)}/activate", _model(m.Activation))

    @route
    def rollback_model(self) -> Call[m.Activation]:
        """Starts switching back to the version active before (not safe to repeat: a second
        rollback switches forth again)."""
        return Call("POST", "/v1/models/rollback", _model(m.Activation))

    @route
    def unembedded_items(self, version: str) -> Call[dict[str, list[str]]]:
        return Call("GET", f"/v1/models/{_seg(version)}/unembedded", lambda r: r.json()["items"])

    # --- gallery ---------------------------------------------------------------------------
    @route
    def enrol(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        idempotent: bool = False,
        encoding: Literal["base64", "json"] = "base64",
    ) -> Call[list[str]]:
        """Items: ``{"subject", "embedding" (array) | "image" (bytes, path, PIL image or
        base64), "item_id"?, "metadata"?}``; all or none. Embeddings go as base64 float32
        (``embedding_b64``; ``encoding="json"``: JSON numbers, about 5x slower to send and
        parse). Sent with a fresh ``Idempotency-Key`` (the same on every retry of this call),
        so it is retried like a request safe to repeat: a resend whose first answer was lost
        gets that answer, and nothing is stored twice. ``idempotent`` is kept for callers that
        set it; every enrolment is safe now. Many items: :meth:`Client.upload`."""
        if encoding not in ("base64", "json"):
            raise ValueError(f"encoding is 'base64' or 'json', not {encoding!r}")
        body = [_item(it, f"items[{i}]", encoding=encoding) for i, it in enumerate(items)]
        return Call(
            "POST",
            "/v1/gallery",
            lambda r: r.json()["item_ids"],
            json={"items": body},
            headers={IDEMPOTENCY_HEADER: _idempotency_key()},
        )

    @route
    def enrol_columns(
        self,
        vectors: np.ndarray,
        subjects: Sequence[str],
        *,
        item_ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> Call[list[str]]:
        """One columnar enrolment (``POST /v1/gallery/columns``): an (n, d) matrix sent as
        one base64 float32 matrix, ``subjects`` (and ``item_ids``, ``metadata``) one per row;
        all or none, with a fresh ``Idempotency-Key`` as :meth:`enrol`. For more items than
        one request takes, batching, parallel requests and resuming: :meth:`Client.upload`."""
        rows = np.asarray(vectors)
        if rows.ndim != 2 or len(rows) != len(subjects):
            raise ValueError(
                f"vectors must be (len(subjects), d): {rows.shape}, {len(subjects)} subjects"
            )
        body: dict[str, Any] = {"subjects": list(subjects), "embeddings_b64": matrix_b64(rows)}
        if item_ids is not None:
            body["item_ids"] = list(item_ids)
        if metadata is not None:
            body["metadata"] = [dict(x) for x in metadata]
        return Call(
            "POST",
            "/v1/gallery/columns",
            lambda r: r.json()["item_ids"],
            json=body,
            headers={IDEMPOTENCY_HEADER: _idempotency_key()},
        )

    @route
    def enrol_raw(
        self, items: Sequence[Mapping[str, Any]], *, idempotent: bool = False
    ) -> Call[list[str]]:
        """Bulk enrolment of items exactly as the API takes them (``embedding_b64``: base64
        of little-endian float32, or ``embedding`` as a JSON list; ``subject``, ``item_id``?,
        ``metadata``?), sent untouched: no conversion, so the service judges (and names) each
        item as given; for loaders that encode their own rows. All or none; sent with an
        ``Idempotency-Key`` as :meth:`enrol` is."""
        body = json.dumps({"items": list(items)}, separators=(",", ":")).encode()
        return Call(
            "POST",
            "/v1/gallery",
            lambda r: r.json()["item_ids"],
            content=body,
            headers={"Content-Type": "application/json", IDEMPOTENCY_HEADER: _idempotency_key()},
        )

    @route
    def enrol_upload(
        self,
        file: ImageInput,
        *,
        subject: str,
        item_id: str | None = None,
        metadata: str | Mapping[str, Any] | None = None,
    ) -> Call[list[str]]:
        """One uploaded image (bytes, a path or a PIL image); ``metadata``: an object or its
        JSON text. Sent with an ``Idempotency-Key`` as :meth:`enrol` is."""
        meta = metadata if metadata is None or isinstance(metadata, str) else json.dumps(metadata)
        return Call(
            "POST",
            "/v1/gallery/upload",
            lambda r: r.json()["item_ids"],
            files={"file": ("image", image_bytes(file, where="file"))},
            data=_drop_none({"subject": subject, "item_id": item_id, "metadata": meta}),
            headers={IDEMPOTENCY_HEADER: _idempotency_key()},
        )

    @route
    def put_item(
        self,
        item_id: str,
        *,
        subject: str,
        embedding: Vector | None = None,
        image: ImageInput | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Call[m.PutResult]:
        """Creates or replaces the item (idempotent): an embedding (sent as base64 float32)
        or an image (bytes, path, PIL image or base64)."""
        body = {
            "subject": subject,
            **_source(embedding, image, base64=True),
            "metadata": dict(metadata or {}),
        }
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

    # --- match, verify, embed (queries: safe to repeat), feedback --------------------------
    @route
    def match(
        self,
        *,
        embedding: Vector | None = None,
        image: ImageInput | None = None,
        k: int = 5,
        filter: Mapping[str, Any] | None = None,
    ) -> Call[m.MatchResult]:
        """The ``k`` best candidates for an embedding or an image (bytes, path, PIL image or
        base64), among the items whose metadata matches ``filter`` when given."""
        body = {**_source(embedding, image), "k": k}
        if filter is not None:
            body["filter"] = dict(filter)
        return Call("POST", "/v1/match", _model(m.MatchResult), json=body, idempotent=True)

    @route
    def match_batch(
        self,
        embeddings: np.ndarray | Sequence[Vector] | None = None,
        *,
        images: Sequence[ImageInput] | None = None,
        k: int = 5,
    ) -> Call[list[m.MatchResult]]:
        """Several queries in one request (``POST /v1/match/batch``: one index search, a match
        record and ``match_id`` per query): an (n, d) matrix or sequence of embeddings (sent as
        base64 float32), or images; one result per query, in order."""
        if (embeddings is None) == (images is None):
            raise ValueError("give exactly one of embeddings or images")
        if embeddings is not None:
            queries = [dict([vector_field(v)]) for v in embeddings]
        else:
            assert images is not None
            queries = [
                {"image": image_b64(img, where=f"images[{i}]")} for i, img in enumerate(images)
            ]
        return Call(
            "POST",
            "/v1/match/batch",
            lambda r: [m.MatchResult.model_validate(x) for x in r.json()["results"]],
            json={"queries": queries, "k": k},
            idempotent=True,
        )

    @route
    def match_upload(self, file: ImageInput, *, k: int = 5) -> Call[m.MatchResult]:
        """:meth:`match` of one uploaded image (bytes, a path or a PIL image)."""
        return Call(
            "POST",
            "/v1/match/upload",
            _model(m.MatchResult),
            files={"file": ("image", image_bytes(file, where="file"))},
            data={"k": str(k)},
            idempotent=True,
        )

    @route
    def verify(
        self, a: Mapping[str, Any], b: Mapping[str, Any], *, filter: Mapping[str, Any] | None = None
    ) -> Call[m.VerifyResult]:
        """``a`` and ``b``: one of ``{"embedding": array}``, ``{"image": bytes, path, PIL
        image or base64}``, ``{"item_id": ...}``, ``{"subject": ...}``."""

        def side(x: Mapping[str, Any], name: str) -> dict[str, Any]:
            out = dict(x)
            if out.get("embedding") is not None:
                out["embedding"] = vector_json(out["embedding"])
            if out.get("image") is not None:
                out["image"] = image_b64(out["image"], where=f"{name}.image")
            return out

        body: dict[str, Any] = {"a": side(a, "a"), "b": side(b, "b")}
        if filter is not None:
            body["filter"] = dict(filter)
        return Call("POST", "/v1/verify", _model(m.VerifyResult), json=body, idempotent=True)

    @route
    def verify_upload(self, a: ImageInput, b: ImageInput) -> Call[m.VerifyResult]:
        """:meth:`verify` of two uploaded images (bytes, paths or PIL images)."""
        return Call(
            "POST",
            "/v1/verify/upload",
            _model(m.VerifyResult),
            files={
                "a": ("a", image_bytes(a, where="a")),
                "b": ("b", image_bytes(b, where="b")),
            },
            idempotent=True,
        )

    @route
    def embed(self, images: Sequence[ImageInput]) -> Call[m.EmbedResult]:
        """The served model's embeddings of images (bytes, paths, PIL images or base64)."""
        return Call(
            "POST",
            "/v1/embed",
            _model(m.EmbedResult),
            json={"images": [image_b64(x, where=f"images[{i}]") for i, x in enumerate(images)]},
            idempotent=True,
        )

    @route
    def embed_upload(self, file: ImageInput) -> Call[m.EmbedResult]:
        """:meth:`embed` of one uploaded image (bytes, a path or a PIL image)."""
        return Call(
            "POST",
            "/v1/embed/upload",
            _model(m.EmbedResult),
            files={"file": ("image", image_bytes(file, where="file"))},
            idempotent=True,
        )

    @route
    def feedback(
        self,
        match_id: str,
        *,
        correct: bool | None = None,
        true_subject: str | EllipsisType | None = ...,
        subject_given: bool = False,
    ) -> Call[m.FeedbackResult]:
        """Labels a match: ``correct=True/False`` (was the decision right?), or ``true_subject``:
        the probe's real subject, or ``None`` for "the probe's subject is not enrolled" (sent as
        ``"true_subject": null``). Left out, no subject is sent. ``subject_given=True`` is the
        older spelling of ``true_subject=None`` and still works. Safe to repeat: the service
        keeps one feedback per match (a second is 409 ``feedback_exists``)."""
        body: dict[str, Any] = {"match_id": match_id}
        if correct is not None:
            body["correct"] = correct
        if true_subject is not ...:
            body["true_subject"] = true_subject
        elif subject_given:
            body["true_subject"] = None
        return Call("POST", "/v1/feedback", _model(m.FeedbackResult), json=body, idempotent=True)

    # --- monitor, model, health ------------------------------------------------------------
    @route
    def monitor(self, *, threshold: float | None = None) -> Call[m.MonitorView]:
        return Call(
            "GET", "/v1/monitor", _model(m.MonitorView), params=_drop_none({"threshold": threshold})
        )

    @route
    def remeasure_reference(self) -> Call[m.MonitorReference]:
        """Admin: re-measures the across-tenants drift reference on the data as of now and
        stores it for the active model (``POST /v1/monitor/reference``; after judging the
        current state healthy, e.g. when new tenants joined). Safe to repeat: a second call
        measures the same data again and stores that."""
        return Call("POST", "/v1/monitor/reference", _model(m.MonitorReference), idempotent=True)

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


def _may_have_acted(outcome: httpx.Response | Exception) -> bool:
    """Whether the server may have acted on an attempt that ended in ``outcome`` (retried):
    its answer was lost after sending, or a 502/503/504 (a 429 or a connect error: it did
    nothing)."""
    if isinstance(outcome, httpx.Response):
        return outcome.status_code in TRANSIENT_STATUS
    return not isinstance(outcome, NOT_SENT_ERRORS)


def _error(r: httpx.Response) -> ApiError:
    try:
        body = r.json()
        code, message, detail = body["code"], body["message"], body.get("detail")
    except (ValueError, KeyError, TypeError):
        code, message, detail = "error", r.text[:500], None
    return ApiError(r.status_code, code, message, detail, r.headers.get("x-request-id"), response=r)


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
        {
            "json": call.json,
            "params": call.params,
            "files": call.files,
            "data": call.data,
            "content": call.content,
        }
    ) | {"headers": dict(call.headers)}


class _Base(_Routes):
    def __init__(
        self, base_url: str, token: str | None, *, retries: int, backoff_s: float, max_wait_s: float
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries, self.backoff_s, self.max_wait_s = retries, backoff_s, max_wait_s
        self.policy = RetryPolicy(retries=retries, backoff_s=backoff_s, max_wait_s=max_wait_s)
        self.retried = 0  # how many times a request was sent again (observability, tests)
        # the newest X-Consistency-Token a write answered; sent with matches and verifies
        # (``consistent_reads``) so that they see this client's writes on any replica
        self.consistency_token: str | None = None
        self.consistent_reads = True

    def _args(self, call: Call[Any]) -> dict[str, Any]:
        args = _request_args(call)
        token = self.consistency_token
        if token is not None and self.consistent_reads and call.path.startswith(CONSISTENT_READS):
            args["headers"][CONSISTENCY_HEADER] = token
        return args

    def _saw(self, r: httpx.Response) -> None:
        token = r.headers.get(CONSISTENCY_HEADER)
        if token is not None and (
            self.consistency_token is None
            or _feed_position(token) > _feed_position(self.consistency_token)
        ):
            self.consistency_token = token

    def _batch_call(self, batch: Batch) -> Call[bool]:
        """One upload batch as a columnar enrolment; its answer: whether it was a replay (the
        batch was stored by an earlier send of the same body)."""
        body = batch.body()
        return Call(
            "POST",
            "/v1/gallery/columns",
            lambda r: r.headers.get("idempotent-replayed") == "true",
            content=body,
            headers={"Content-Type": "application/json", IDEMPOTENCY_HEADER: batch.key(body)},
        )

    def _failure(
        self, call: Call[Any], exc: httpx.TransportError, *, attempts: int, acted: bool
    ) -> TransportFailure:
        # a connect error, a pool timeout, a URL the client cannot send (UnsupportedProtocol):
        # nothing reached the server; a read/write error, timeout or dropped connection: maybe
        sent = isinstance(exc, LOST_ANSWER_ERRORS) and not isinstance(exc, NOT_SENT_ERRORS)
        what = "the answer was lost" if sent else "it was not sent"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        failure = TransportFailure(
            f"{call.method} {self.base_url}{call.path}: {type(exc).__name__}: {exc or 'no detail'}"
            f" ({what}{tries})",
            method=call.method,
            url=f"{self.base_url}{call.path}",
            sent=sent,
        )
        failure.attempts, failure.earlier_attempt_may_have_acted = attempts, acted
        return failure

    def _result(
        self, call: Call[T], r: httpx.Response, *, attempts: int = 1, acted: bool = False
    ) -> T:
        if r.status_code >= 300:  # an error, or a redirect (never the API's answer)
            error = _error(r)
            error.attempts, error.earlier_attempt_may_have_acted = attempts, acted
            raise error
        self._saw(r)
        return call.parse(r)


class Client(_Base):
    """Blocking client: ``Client(url, token).match(embedding=v)``. Use as a context manager
    (or call ``close()``). One instance may be shared by threads. ``retries``, ``backoff_s``
    and ``max_wait_s`` make its :class:`RetryPolicy` (``client.policy``); ``sleep`` waits
    between attempts (tests inject their own)."""

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
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            base_url, token, retries=retries, backoff_s=backoff_s, max_wait_s=max_wait_s
        )
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=timeout_s, transport=transport
        )

    def send(self, call: Call[T]) -> T:
        """Sends ``call`` (again, as :attr:`policy` says) and returns its parsed answer;
        raises :class:`ApiError` for an error answer, :class:`TransportFailure` for a transport
        error not (or no longer) retried."""
        attempt, acted = 0, False
        while True:
            try:
                r = self._http.request(call.method, call.path, **self._args(call))
            except httpx.TransportError as exc:
                wait = self.policy.next_wait(attempt, safe=call.safe, error=exc)
                if wait is None:
                    raise self._failure(call, exc, attempts=attempt + 1, acted=acted) from exc
                acted = acted or _may_have_acted(exc)
            else:
                wait = self.policy.next_wait(attempt, safe=call.safe, response=r)
                if wait is None:
                    return self._result(call, r, attempts=attempt + 1, acted=acted)
                acted = acted or _may_have_acted(r)
            self.retried += 1
            attempt += 1
            self._sleep(wait)

    def upload(
        self,
        vectors: np.ndarray | Iterable[Any],
        subjects: Sequence[str] | None = None,
        *,
        ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int | None = None,
        parallel: int = 1,
        progress: Progress = False,
        resume: bool = True,
    ) -> UploadResult:
        """Enrols many items by embedding, in batches of columnar requests
        (``POST /v1/gallery/columns``), the shape of qdrant-client's ``upload_points``.

        ``vectors``: an (n, d) matrix with ``subjects`` (one per row) and optional ``ids`` and
        ``metadata``; or an iterable of items ``(subject, vector[, metadata[, item_id]])`` or
        mappings with those keys (``embedding`` for the vector), consumed lazily.
        ``batch_size``: items per request (default: 2,000, fewer for large vectors so that a
        request stays under 8 MiB; a batch the service finds too large is split).
        ``parallel``: requests in flight at once. ``progress``: True for a bar (tqdm when
        installed, else a line on stderr), or a callable given the items done so far.
        ``resume`` (default): an item whose id is stored already is skipped, so running the
        same upload again after an interruption stores only what is missing and never
        duplicates (ids: the caller's, or derived from each item's content; see
        :mod:`tcm_client.upload`). Raises :class:`UploadError` naming the input rows of a batch
        that was refused or could not be sent (retried first as :attr:`policy` says)."""
        started = time.perf_counter()
        planned: Plan = plan_upload(vectors, subjects, ids, metadata, batch_size)
        tally = Tally(planned.total, progress, started)
        try:
            if parallel <= 1:
                for batch in planned.batches:
                    tally.planned(batch)
                    self._settle(batch, tally, resume)
            else:
                self._upload_parallel(planned, tally, resume, parallel)
        finally:
            tally.close()
        return tally.result()

    bulk_enrol = upload

    def _upload_parallel(self, planned: Plan, tally: Tally, resume: bool, parallel: int) -> None:
        with ThreadPoolExecutor(parallel, thread_name_prefix="tcm-upload") as pool:
            pending: set[Future[None]] = set()
            try:
                for batch in planned.batches:
                    tally.planned(batch)
                    pending.add(pool.submit(self._settle, batch, tally, resume))
                    if len(pending) >= 2 * parallel:  # a bounded read-ahead of the input
                        done, pending = wait_for(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            f.result()
                done, pending = wait_for(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    f.result()
            except BaseException:
                for f in pending:
                    f.cancel()
                raise

    def _settle(self, batch: Batch, tally: Tally, resume: bool) -> None:
        """Sends ``batch`` until its every item is stored or found stored."""
        todo, stored, already, requests = [batch], 0, batch.repeated, 0
        while todo:
            b = todo.pop()
            requests += 1
            try:
                replayed = self.send(self._batch_call(b))
            except ClientError as exc:
                more, found = tally.after_error(b, exc, resume=resume)
                todo.extend(more)
                already += found
                continue
            stored, already = (stored, already + len(b)) if replayed else (stored + len(b), already)
        tally.settled(stored, already, requests)

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
    """Asynchronous client: ``await AsyncClient(url, token).match(embedding=v)``; the same
    :class:`RetryPolicy` as :class:`Client` (``sleep``: an awaitable wait)."""

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
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(
            base_url, token, retries=retries, backoff_s=backoff_s, max_wait_s=max_wait_s
        )
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout_s, transport=transport
        )

    async def send(self, call: Call[T]) -> T:
        """As :meth:`Client.send`, awaitable."""
        attempt, acted = 0, False
        while True:
            try:
                r = await self._http.request(call.method, call.path, **self._args(call))
            except httpx.TransportError as exc:
                wait = self.policy.next_wait(attempt, safe=call.safe, error=exc)
                if wait is None:
                    raise self._failure(call, exc, attempts=attempt + 1, acted=acted) from exc
                acted = acted or _may_have_acted(exc)
            else:
                wait = self.policy.next_wait(attempt, safe=call.safe, response=r)
                if wait is None:
                    return self._result(call, r, attempts=attempt + 1, acted=acted)
                acted = acted or _may_have_acted(r)
            self.retried += 1
            attempt += 1
            await self._sleep(wait)

    async def upload(
        self,
        vectors: np.ndarray | Iterable[Any],
        subjects: Sequence[str] | None = None,
        *,
        ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int | None = None,
        parallel: int = 1,
        progress: Progress = False,
        resume: bool = True,
    ) -> UploadResult:
        """As :meth:`Client.upload`; ``parallel``: requests in flight at once (tasks)."""
        started = time.perf_counter()
        planned: Plan = plan_upload(vectors, subjects, ids, metadata, batch_size)
        tally = Tally(planned.total, progress, started)
        slots = asyncio.Semaphore(max(1, parallel))
        tasks: set[asyncio.Task[None]] = set()

        async def settle(batch: Batch) -> None:
            try:
                await self._settle(batch, tally, resume)
            finally:
                slots.release()

        try:
            for batch in planned.batches:
                tally.planned(batch)
                await slots.acquire()
                for task in [t for t in tasks if t.done()]:
                    tasks.discard(task)
                    task.result()  # the first failure stops the upload
                tasks.add(asyncio.create_task(settle(batch)))
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            tally.close()
        return tally.result()

    bulk_enrol = upload

    async def _settle(self, batch: Batch, tally: Tally, resume: bool) -> None:
        """As :meth:`Client._settle`, awaitable."""
        todo, stored, already, requests = [batch], 0, batch.repeated, 0
        while todo:
            b = todo.pop()
            requests += 1
            try:
                replayed = await self.send(self._batch_call(b))
            except ClientError as exc:
                more, found = tally.after_error(b, exc, resume=resume)
                todo.extend(more)
                already += found
                continue
            stored, already = (stored, already + len(b)) if replayed else (stored + len(b), already)
        tally.settled(stored, already, requests)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
