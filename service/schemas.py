"""Every request and response body of the v1 API.

Requests forbid unknown fields (a misspelt ``embeding`` is a 422, not a silently ignored field)
and reject NaN/inf. Limits that depend on settings (``max_k``, batch sizes, the embedding
dimension) are checked by the domain code, which knows the settings.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from service.ids import Id

MAX_METADATA_BYTES = 16 * 1024
# nesting of metadata objects/arrays: responses serialise at most ~255 levels, so deeper
# metadata would be stored and then break every read of the item (and its tenant's listing)
MAX_METADATA_DEPTH = 32
MAX_DIM = 65536

# ids and subjects: the one id pattern of the API (service.ids)
Name = Id
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Embedding = Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_DIM)]
Base64Image = Annotated[str, Field(min_length=1, description="base64 (or a data: URL)")]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _exactly_one(model: BaseModel, fields: tuple[str, ...]) -> None:
    given = [f for f in fields if getattr(model, f) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(fields)} (got {given or 'none'})")


class ErrorBody(BaseModel):
    """The one shape of every error response."""

    code: str = Field(description="stable, machine-readable (e.g. not_found, invalid_embedding)")
    message: str = Field(description="for people: what went wrong and what to do")
    detail: Any = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "malformed JSON"), (401, "missing or invalid API key"),
        (404, "no such resource (or another tenant's)"), (409, "conflict"),
        (413, "request body too large"), (422, "invalid input"),
        (429, "rate limit exceeded (see Retry-After)"), (503, "store unavailable"))
}


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0, ``{}`` and ``[]`` are 1); iterative."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d + 1)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


# --- admin ---------------------------------------------------------------------------------
class TenantCreate(Request):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class TenantCreated(BaseModel):
    tenant_id: str
    name: str
    key_id: str
    api_key: str = Field(description="shown once; only its hash is stored")


class TenantOut(BaseModel):
    tenant_id: str
    name: str
    created_at: datetime


class TenantList(BaseModel):
    tenants: list[TenantOut]


class KeyIssue(Request):
    revoke_existing: bool = Field(
        False, description="revoke the tenant's other keys at once (e.g. after a leak); "
                           "by default they stay valid until revoked, for zero-downtime rotation")


class KeyIssued(BaseModel):
    tenant_id: str
    key_id: str
    api_key: str
    revoked_key_ids: list[str]


class KeyOut(BaseModel):
    key_id: str
    created_at: datetime
    revoked_at: datetime | None
    active: bool


class KeyList(BaseModel):
    keys: list[KeyOut]


# --- gallery -------------------------------------------------------------------------------
class EnrolItem(Request):
    subject: Name
    embedding: Embedding | None = None
    image: Base64Image | None = None
    item_id: Name | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> EnrolItem:
        _exactly_one(self, ("embedding", "image"))
        return self

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(v, allow_nan=False).encode())
        except ValueError as exc:
            raise ValueError(f"metadata must be plain JSON: {exc}") from exc
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes of JSON, the limit is "
                             f"{MAX_METADATA_BYTES}")
        depth = json_depth(v)
        if depth > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata nests {depth} levels deep, the limit is "
                             f"{MAX_METADATA_DEPTH}")
        return v


class EnrolRequest(Request):
    items: list[EnrolItem] = Field(min_length=1)


class EnrolResponse(BaseModel):
    item_ids: list[str]


class GalleryItemOut(BaseModel):
    item_id: str
    subject: str
    metadata: dict[str, Any]
    created_at: datetime
    has_image: bool
    embedding: list[float] | None = None


class GalleryPage(BaseModel):
    items: list[GalleryItemOut]
    next_cursor: str | None


class Deleted(BaseModel):
    deleted: int


# --- match, verify, embed --------------------------------------------------------------------
class MatchRequest(Request):
    embedding: Embedding | None = None
    image: Base64Image | None = None
    k: int = Field(5, description="candidates to return, 1..max_k")

    @model_validator(mode="after")
    def _one_query(self) -> MatchRequest:
        _exactly_one(self, ("embedding", "image"))
        return self


class Candidate(BaseModel):
    item_id: str
    subject: str
    score: float


class DecisionOut(BaseModel):
    accepted: bool
    subject: str | None
    score: float | None = Field(description="best candidate's score; null for an empty gallery")


class MatchResponse(BaseModel):
    match_id: str
    decision: DecisionOut
    candidates: list[Candidate]
    threshold: float
    model_version: str


class VerifyInput(Request):
    image: Base64Image | None = None
    embedding: Embedding | None = None
    item_id: Name | None = None
    subject: Name | None = Field(
        None, description="a subject stands for its best-matching enrolled item (max score)")

    @model_validator(mode="after")
    def _one_kind(self) -> VerifyInput:
        _exactly_one(self, ("image", "embedding", "item_id", "subject"))
        return self


class VerifyRequest(Request):
    a: VerifyInput
    b: VerifyInput


class VerifyResponse(BaseModel):
    score: float
    accepted: bool
    threshold: float
    model_version: str


class EmbedRequest(Request):
    images: list[Base64Image] = Field(min_length=1)


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    model_version: str


# --- feedback --------------------------------------------------------------------------------
class FeedbackRequest(Request):
    """Either ``true_subject`` (null: the query's subject is not enrolled) or ``correct``."""

    match_id: Id
    true_subject: Name | None = None
    correct: bool | None = None

    @model_validator(mode="after")
    def _one_label(self) -> FeedbackRequest:
        has_subject = "true_subject" in self.model_fields_set
        has_correct = self.correct is not None
        if has_subject == has_correct:
            raise ValueError("give exactly one of true_subject (a subject, or null when the "
                             "query's subject is not enrolled) or correct (true/false)")
        return self


Outcome = Literal["true_accept", "false_accept", "true_reject", "false_reject"]


class FeedbackResponse(BaseModel):
    match_id: str
    outcome: Outcome
    genuine: bool | None


# --- model and health ------------------------------------------------------------------------
# a pair as a 2-item list, not a tuple: a tuple's OpenAPI 3.1 ``prefixItems`` is beyond many
# OpenAPI tools (schemathesis 4 among them), and the JSON is the same array either way
Pair = Annotated[list[float], Field(min_length=2, max_length=2)]


class ModelInfo(BaseModel):
    model_version: str
    architecture: str
    embedding_dim: int
    similarity: str
    threshold: float
    target_far: float
    far_at_threshold: float
    frr_at_threshold: float
    calibration_range: Pair
    far_range: Pair
    num_thresholds: int
    baseline_opis: float
    baseline_eps_opis: float
    baseline_eps: float
    baseline_recall_at_1: float
    baseline_map_at_r: float
    preprocessing: dict[str, Any]
    created_at: str
    weights_sha256: str
    activation: Activation | None = None  # a model switch this replica is running, or ran last


class Activation(BaseModel):
    """A model switch as the replica running it sees it."""

    version: str
    from_: str | None = Field(None, alias="from")
    kind: str
    state: Literal["loading", "embedding", "switching", "done", "failed"]
    started_at: float
    finished_at: float | None
    tenants_total: int
    tenants_done: int
    items_total: int
    items_embedded: int
    items_skipped: int
    skipped_by_tenant: dict[str, int]
    error: str | None

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class ModelStage(Request):
    path: str = Field(min_length=1, max_length=4096,
                      description="artefact directory on the service's filesystem")


class ModelVersionOut(BaseModel):
    model_version: str
    path: str
    registered_at: float
    architecture: str
    embedding_dim: int
    threshold: float
    baseline_opis: float
    baseline_eps_opis: float
    created_at: str
    weights_sha256: str = ""
    active: bool = False
    embeddings_purged: bool = False


class ModelRegistryOut(BaseModel):
    active: str | None
    served: str  # the version this replica serves (differs from active only during a switch)
    activation: dict[str, Any] | None  # the registry's running or failed activation
    progress: Activation | None  # this replica's latest switch
    rollback_to: str | None
    versions: list[ModelVersionOut]
    history: list[dict[str, Any]]


ModelInfo.model_rebuild()


class UnembeddedItems(BaseModel):
    model_version: str
    items: dict[str, list[str]]  # tenant id -> item ids without an embedding and without image


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]


# --- monitoring ------------------------------------------------------------------------------
class MonitorView(BaseModel):
    """``GET /v1/monitor``: the monitor's latest snapshot (admin: everything; a tenant key: the
    model's reference points and that tenant's own row only) and, with ``?threshold=``, per-tenant
    FAR/FRR at that candidate threshold. Field meanings: ``service/README.md``."""

    scope: Literal["admin", "tenant"]
    tenant_id: str | None = None
    status: Literal["ok", "pending"]
    message: str | None = None
    snapshot: dict[str, Any] | None = None
    what_if: dict[str, Any] | None = None
