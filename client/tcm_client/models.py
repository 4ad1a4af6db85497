"""Typed answers of the tcm-serve v1 API (a copy of the contract, not an import of the
service: the client depends on httpx, pydantic and numpy only). Unknown fields are kept
(``extra="allow"``), so a newer server does not break an older client. Vectors are numpy
arrays (float32)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


class Model(BaseModel):
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True, populate_by_name=True)


def _array(v: Any) -> Any:
    return None if v is None else np.asarray(v, dtype=np.float32)


class TenantCreated(Model):
    tenant_id: str
    name: str
    key_id: str
    api_key: str


class Tenant(Model):
    tenant_id: str
    name: str
    created_at: datetime


class KeyIssued(Model):
    tenant_id: str
    key_id: str
    api_key: str
    revoked_key_ids: list[str]


class Key(Model):
    key_id: str
    created_at: datetime
    revoked_at: datetime | None
    active: bool


class GalleryItem(Model):
    item_id: str
    subject: str
    metadata: dict[str, Any]
    created_at: datetime
    has_image: bool
    embedding: np.ndarray | None = None

    @field_validator("embedding", mode="before")
    @classmethod
    def _vector(cls, v: Any) -> Any:
        return _array(v)


class ItemPage(Model):
    items: list[GalleryItem]
    next_cursor: str | None


class PutResult(Model):
    item_id: str
    created: bool


class Subject(Model):
    subject: str
    items: int


class SubjectPage(Model):
    subjects: list[Subject]
    next_cursor: str | None


class Candidate(Model):
    item_id: str
    subject: str
    score: float
    cosine: float | None = None  # the raw cosine, when the model normalises scores (AS-norm)


class Decision(Model):
    accepted: bool
    subject: str | None
    score: float | None
    cosine: float | None = None


class MatchResult(Model):
    match_id: str
    decision: Decision
    candidates: list[Candidate]
    threshold: float
    model_version: str


class VerifyResult(Model):
    score: float
    accepted: bool
    cosine: float | None = None
    threshold: float
    model_version: str


class EmbedResult(Model):
    embeddings: np.ndarray = Field(description="(n, d) float32")
    model_version: str

    @field_validator("embeddings", mode="before")
    @classmethod
    def _matrix(cls, v: Any) -> np.ndarray:
        return np.asarray(v, dtype=np.float32).reshape(len(v), -1)


class FeedbackResult(Model):
    match_id: str
    outcome: Literal["true_accept", "false_accept", "true_reject", "false_reject", "wrong_accept"]
    genuine: bool | None


class ModelInfo(Model):
    model_version: str
    architecture: str
    embedding_dim: int
    similarity: str
    threshold: float
    target_far: float
    calibration_range: list[float]


class ModelVersion(Model):
    model_version: str
    path: str
    active: bool
    embedding_dim: int
    threshold: float


class ModelRegistry(Model):
    active: str | None
    served: str
    activation: dict[str, Any] | None
    progress: dict[str, Any] | None
    rollback_to: str | None
    versions: list[ModelVersion]
    history: list[dict[str, Any]]


class Activation(Model):
    version: str
    state: str
    kind: str


class MonitorView(Model):
    scope: Literal["admin", "tenant"]
    tenant_id: str | None = None
    status: Literal["ok", "pending"]
    message: str | None = None
    snapshot: dict[str, Any] | None = None
    what_if: dict[str, Any] | None = None


class Readiness(Model):
    status: str
    checks: dict[str, str]


class MonitorReference(Model):
    """``POST /v1/monitor/reference``: the across-tenants drift reference as re-measured
    (``status="undefined"`` with fewer than 2 tenants of enough labelled pairs)."""

    model_version: str
    status: Literal["measured", "undefined"]
    message: str | None = None
    reference: dict[str, Any] | None = None
