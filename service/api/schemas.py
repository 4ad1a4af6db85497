"""Every request and response body of the v1 API.

The published schema states what validation enforces (a client generated from it builds no
request the service refuses for its shape): requests forbid unknown fields (a misspelt
``embeding`` is a 422, not a silently ignored field) and reject NaN/inf; "exactly one of" rules
are ``oneOf`` of ``required`` (and those fields are never null); base64 is a pattern; a vector
has a non-zero component (``contains``). Limits that depend on settings or on the served model
(``max_k``, batch sizes, list limits, the embedding dimension) are checked by the domain code,
which knows them, and carry an ``x-limit`` marker that ``service.api.openapi`` replaces with the
live bound when it renders ``/openapi.json``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    field_validator,
    model_serializer,
    model_validator,
)

from service.engine.metadata_filter import MAX_METADATA_KEYS, domain_problem, number_problem
from service.ids import ID_PATTERN, Id
from service.metrics import Outcome
from service.monitoring.snapshot_schema import (
    MonitorSnapshot,
    Rates,
    RatesBySource,
    TenantMonitorSnapshot,
    TenantsReference,
)

MAX_METADATA_BYTES = 16 * 1024
# nesting of metadata objects/arrays: responses serialise at most ~255 levels, so deeper
# metadata would be stored and then break every read of the item (and its tenant's listing)
MAX_METADATA_DEPTH = 32
MAX_DIM = 65536

# ids and subjects: the one id pattern of the API (service.ids)
NAME_PATTERN = ID_PATTERN
Name = Id
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _json_int(v: Any) -> Any:
    """JSON Schema's integer: 9 and 9.0, not "9" or true (request models are strict)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


JsonInt = Annotated[int, BeforeValidator(_json_int)]
# a vector needs one non-zero component (the zero vector has no direction): JSON Schema says so
# with "contains"; the dimension is the served model's (x-limit)
Embedding = Annotated[
    list[FiniteFloat],
    Field(
        min_length=1,
        max_length=MAX_DIM,
        description="the model's embedding: embedding_dim finite "
        "numbers, not all zero (normalised by the service)",
        json_schema_extra={
            "contains": {"type": "number", "not": {"const": 0}},
            "x-limit": "embedding_dim",
        },
    ),
]
# exactly what ``service.engine.images.decode_base64`` accepts: standard base64 with its
# padding, not
# empty, optionally behind a data: URL prefix
BASE64_PATTERN = (
    r"^(data:[^,]*,)?([A-Za-z0-9+/]{4})*"
    r"([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$"
)
Base64Image = Annotated[
    str,
    StringConstraints(pattern=BASE64_PATTERN),
    Field(
        description="an image file (PNG, JPEG, BMP, GIF, WEBP, TIFF, PPM) in standard base64, "
        "optionally as a data: URL",
        json_schema_extra={
            "format": "byte",
            "contentEncoding": "base64",
            "contentMediaType": "image/*",
        },
    ),
]
MAX_B64_DIM = 8192  # base64 embeddings: ample for real models, and a small schema bound
# an embedding as base64 of little-endian float32: 4/3 byte per byte instead of ~20 for JSON
# text, and no float parsing; its length and values are checked against the model's dimension
Base64Embedding = Annotated[
    str,
    StringConstraints(
        max_length=(MAX_B64_DIM * 4 + 2) // 3 * 4,
        pattern=r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$",
    ),
    Field(
        description="the embedding as little-endian float32 (4 bytes per dimension) in "
        "standard base64: embedding_dim finite numbers, not all zero",
        json_schema_extra={
            "format": "float32-base64",
            "contentEncoding": "base64",
            "x-limit": "embedding_b64_chars",
        },
    ),
]


def _at_most(n: int) -> str:
    """A regex of the decimal strings (leading zeros allowed, as many digits as ``n`` at most)
    whose value is <= ``n``: what ``gallery.parse_cursor`` accepts, stated in the schema."""
    digits = str(n)
    alts = [f"[0-9]{{1,{len(digits) - 1}}}", digits]
    for i, d in enumerate(digits):
        if d != "0":
            rest = len(digits) - i - 1
            alts.append(digits[:i] + f"[0-{int(d) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return "^(" + "|".join(alts) + ")$"


# Idempotency-Key: what a client may send to make a resend safe (a UUID fits; so does a request
# id); it reaches a Redis key only through key_part
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9._:+/=-]{1,128}$"
# list cursors are the seq of the last item returned: ASCII digits, at most 2**63 - 1
CURSOR_PATTERN = _at_most(2**63 - 1)
# subject cursors: the last subject's UTF-8 bytes in hex (every such string is a valid cursor)
SUBJECT_CURSOR_PATTERN = r"^([0-9a-f]{2}){1,1024}$"
# metadata filters: exact match of top-level keys to scalar values (JSON numbers compare as
# numbers: 1 and 1.0 are equal; true is not 1)
MAX_FILTER_KEYS = 16


def _float64_int(v: int) -> int:
    """A filter's integer must be a number metadata can hold (service.engine.metadata_filter)."""
    problem = number_problem(v)
    if problem is not None:
        raise ValueError(problem)
    return v


FilterInt = Annotated[int, AfterValidator(_float64_int)]
FilterValue = (
    Annotated[str, StringConstraints(max_length=1024)] | FiniteFloat | FilterInt | bool | None
)
MetadataFilter = Annotated[
    dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], FilterValue],
    Field(
        max_length=MAX_FILTER_KEYS,
        description=(
            "only gallery items whose metadata has each of these top-level "
            "keys with exactly this value (applied inside the index "
            "search: k results still come back when k items match)"
        ),
    ),
]


def _exact_one_of(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """JSON Schema of a request with a ``one_of`` rule: ``oneOf`` of ``required``, and those
    fields not nullable (a null counts as given, and is refused)."""
    fields: tuple[str, ...] = getattr(cls, "one_of", ())
    if not fields:
        return
    schema["oneOf"] = [{"required": [f]} for f in fields]
    for f in fields:
        prop = schema.get("properties", {}).get(f, {})
        prop.pop("default", None)
        if "anyOf" in prop:  # X | None: keep X
            kept = [s for s in prop.pop("anyOf") if s.get("type") != "null"]
            prop.update(kept[0] if len(kept) == 1 else {"anyOf": kept})


class Request(BaseModel):
    """A request body. ``one_of``: fields of which exactly one must be given, never as null."""

    # strict: a JSON type the schema does not name (0 for a boolean, "5" for k) is refused
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_exact_one_of)
    one_of: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _no_null_choice(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = [f for f in cls.one_of if f in data and data[f] is None]
            if nulls:
                raise ValueError(
                    f"{', '.join(nulls)} must not be null: leave out what you do not give"
                )
        return data

    @model_validator(mode="after")
    def _exactly_one_given(self) -> Request:
        if self.one_of:
            _exactly_one(self, self.one_of)
        return self


def _exactly_one(model: BaseModel, fields: tuple[str, ...]) -> None:
    given = [f for f in fields if getattr(model, f) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(fields)} (got {given or 'none'})")


class ErrorBody(BaseModel):
    """The one shape of every error response."""

    code: str = Field(description="stable, machine-readable (e.g. not_found, invalid_embedding)")
    message: str = Field(description="for people: what went wrong and what to do")
    detail: Any = None


ERROR_TEXT: dict[int, str] = {
    400: "malformed JSON, or an invalid X-Request-ID",
    401: "missing or invalid API key",
    404: "no such resource (or another tenant's)",
    409: "conflict",
    413: "request body too large",
    422: "invalid input",
    429: "rate limit exceeded (see Retry-After)",
    503: "store unavailable or service starting (see Retry-After)",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in ERROR_TEXT.items()
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error responses a route can give (each route lists only its own)."""
    return {s: {"model": ErrorBody, "description": ERROR_TEXT[s]} for s in sorted(statuses)}


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


def check_metadata(v: dict[str, Any], where: str = "metadata") -> dict[str, Any]:
    """An item's metadata: plain JSON, small, shallow, numbers metadata filters can compare."""
    try:
        size = len(json.dumps(v, allow_nan=False).encode())
    except ValueError as exc:
        raise ValueError(f"{where} must be plain JSON: {exc}") from exc
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"{where} is {size} bytes of JSON, the limit is {MAX_METADATA_BYTES}")
    depth = json_depth(v)
    if depth > MAX_METADATA_DEPTH:
        raise ValueError(f"{where} nests {depth} levels deep, the limit is {MAX_METADATA_DEPTH}")
    problem = domain_problem(v, where=where)
    if problem is not None:
        raise ValueError(problem)
    return v


# --- admin ---------------------------------------------------------------------------------
class TenantCreate(Request):
    name: Annotated[
        str,
        StringConstraints(min_length=1, max_length=200),
        Field(
            description="unique among tenants (409 duplicate_tenant_name), compared regardless "
            "of case, Unicode form (NFKC) and spaces at the ends or repeated; kept as given"
        ),
    ]


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
        False,
        description="revoke the tenant's other keys at once (e.g. after a leak); "
        "by default they stay valid until revoked, for zero-downtime rotation",
    )


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
class ItemBody(Request):
    """An item's content: its subject, exactly one of embedding / embedding_b64 / image, and
    metadata."""

    one_of = ("embedding", "embedding_b64", "image")
    subject: Name
    embedding: Embedding | None = None
    embedding_b64: Base64Embedding | None = None
    image: Base64Image | None = None
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"a JSON object, at most {MAX_METADATA_BYTES} bytes "
        f"of JSON, {MAX_METADATA_DEPTH} levels deep and {MAX_METADATA_KEYS} top-level keys; its "
        "numbers are finite float64 values",
    )

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_metadata(v)


class EnrolItem(ItemBody):
    item_id: Name | None = Field(None, description="generated when left out")


class EnrolRequest(Request):
    items: list[EnrolItem] = Field(
        min_length=1,
        description="at most max_enrol_items, of which at most max_batch_items images",
        json_schema_extra={"x-limit": "max_enrol_items"},
    )


# the columnar body's matrix: base64 of n x embedding_dim little-endian float32, row-major, no
# data: prefix; its length is one row per subject (checked by the domain: 422 column_lengths)
Base64Matrix = Annotated[
    str,
    StringConstraints(
        min_length=4,
        pattern=r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$",
    ),
    Field(
        description="the items' embeddings as one row-major matrix of little-endian float32 "
        "(len(subjects) rows of embedding_dim values, 4 bytes each) in standard base64; each "
        "row finite and not all zero",
        json_schema_extra={"format": "float32-base64-matrix", "contentEncoding": "base64"},
    ),
]


class EnrolColumns(Request):
    """``POST /v1/gallery/columns``: many items by embedding as columns, the vectors as one
    base64 matrix (decoded at once: no per-item base64 or JSON numbers). Row ``i`` of the
    matrix, ``subjects[i]``, ``item_ids[i]`` and ``metadata[i]`` are item ``i``; every column
    given has one entry per item (422 ``column_lengths`` otherwise)."""

    subjects: list[Name] = Field(
        min_length=1,
        description="one per item, at most max_enrol_items",
        json_schema_extra={"x-limit": "max_enrol_items"},
    )
    embeddings_b64: Base64Matrix
    item_ids: list[Name] | None = Field(
        None,
        description="one per item (generated when left out); an id that exists or repeats is a "
        "409 duplicate_item_id",
        json_schema_extra={"x-limit": "max_enrol_items"},
    )
    metadata: list[dict[str, Any]] | None = Field(
        None,
        description="one JSON object per item, each as an item's metadata (at most "
        f"{MAX_METADATA_BYTES} bytes of JSON, {MAX_METADATA_DEPTH} levels deep, "
        f"{MAX_METADATA_KEYS} top-level keys; finite float64 numbers); none when left out",
        json_schema_extra={"x-limit": "max_enrol_items"},
    )

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v is not None:
            for i, m in enumerate(v):
                check_metadata(m, f"metadata[{i}]")
        return v


class PutItem(ItemBody):
    """``PUT /v1/gallery/{item_id}``: the whole item (replaces one that exists)."""


class PutResponse(BaseModel):
    item_id: str
    created: bool = Field(description="true when there was no such item before")


class FaceOut(BaseModel):
    """The face a face model used for one image (absent for other models)."""

    where: str = Field(description="which image of the request, e.g. items[0].image")
    box: list[int] = Field(description="left, top, right, bottom in the image's pixels")
    detected: bool = Field(
        description="false: no face was found and the model's whole-image fallback was used"
    )
    faces_found: int = Field(description="faces detected; the largest one is used")


def faces_out(faces: list[dict[str, Any]]) -> list[FaceOut] | None:
    return [FaceOut(**f) for f in faces] or None


FacesField = Field(
    default=None,
    description="face models only (absent for other models): the face used for each image",
)


class WithFaces(BaseModel):
    """A response that embedded images: its ``faces`` (``FacesField``, the face used for each
    photo) is there for face models only; for every other model the key is left out, not sent
    as null."""

    # no return annotation: pydantic would publish it as the response's schema
    @model_serializer(mode="wrap")
    def _without_null_faces(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        if isinstance(data, dict) and data.get("faces") is None:
            data.pop("faces", None)
        return data


class EnrolResponse(WithFaces):
    item_ids: list[str]
    faces: list[FaceOut] | None = FacesField


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


class SubjectOut(BaseModel):
    subject: str
    items: int = Field(description="gallery items enrolled under it")


class SubjectPage(BaseModel):
    subjects: list[SubjectOut]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null at the end")


# --- match, verify, embed --------------------------------------------------------------------
class MatchRequest(Request):
    one_of = ("embedding", "image")
    embedding: Embedding | None = None
    image: Base64Image | None = None
    k: JsonInt = Field(
        5,
        ge=1,
        description="candidates to return, 1..max_k",
        json_schema_extra={"x-limit": "max_k"},
    )
    filter: MetadataFilter | None = None


def _cosine_field(what: str) -> Any:
    """The raw cosine beside a normalised score: present only when the served artefact
    normalises scores (AS-norm, ``GET /v1/model`` ``score_normalisation``); absent otherwise,
    where ``score`` is the cosine itself."""
    return Field(
        None,
        description=f"{what}'s raw cosine similarity, present only when the model normalises "
        "scores (score_normalisation on /v1/model): then score is the AS-normalised score "
        "that the decision compares with the threshold, and candidates are ranked by this "
        "cosine",
        exclude_if=lambda v: v is None,
    )


class Candidate(BaseModel):
    item_id: str
    subject: str
    score: float = Field(
        description="the score decisions use: the cosine, or the AS-normalised score when the "
        "model normalises scores"
    )
    cosine: float | None = _cosine_field("the candidate")


class DecisionOut(BaseModel):
    accepted: bool
    subject: str | None
    score: float | None = Field(
        description="best candidate's score (the one compared with the threshold); null for an "
        "empty gallery"
    )
    cosine: float | None = _cosine_field("the best candidate")


class MatchResponse(WithFaces):
    match_id: str
    decision: DecisionOut
    candidates: list[Candidate]
    threshold: float
    model_version: str
    faces: list[FaceOut] | None = FacesField


class MatchQuery(Request):
    """One query of a multi-query match (JSON embeddings up to 8,192 dimensions: a request
    holds many queries, so each one's schema bound is kept small)."""

    one_of = ("embedding", "embedding_b64", "image")
    embedding: (
        Annotated[
            list[FiniteFloat],
            Field(
                min_length=1,
                max_length=MAX_B64_DIM,
                description="the model's embedding",
                json_schema_extra={
                    "contains": {"type": "number", "not": {"const": 0}},
                    "x-limit": "embedding_dim",
                },
            ),
        ]
        | None
    ) = None
    embedding_b64: Base64Embedding | None = None
    image: Base64Image | None = None


class MatchBatchRequest(Request):
    """Several queries in one request: one index search for all, a match record (and
    ``match_id``) per query."""

    queries: list[MatchQuery] = Field(
        min_length=1,
        description="at most max_batch_items",
        json_schema_extra={"x-limit": "max_batch_items"},
    )
    k: JsonInt = Field(
        5,
        ge=1,
        description="candidates to return per query, 1..max_k",
        json_schema_extra={"x-limit": "max_k"},
    )


class MatchBatchResponse(BaseModel):
    results: list[MatchResponse] = Field(description="one per query, in the request's order")


class VerifyInput(Request):
    one_of = ("image", "embedding", "item_id", "subject")
    image: Base64Image | None = None
    embedding: Embedding | None = None
    item_id: Name | None = None
    subject: Name | None = Field(
        None, description="a subject stands for its best-matching enrolled item (max score)"
    )


class VerifyRequest(Request):
    a: VerifyInput
    b: VerifyInput
    filter: MetadataFilter | None = Field(
        None,
        description=(
            "gallery inputs (item_id, subject) count only items whose metadata matches (exact "
            "match of each key); an item that does not is answered like one that does not exist"
        ),
    )


class VerifyResponse(WithFaces):
    score: float = Field(
        description="the best pair's score (the one compared with the threshold): the cosine, "
        "or the AS-normalised score of the best pair by cosine when the model normalises scores"
    )
    cosine: float | None = _cosine_field("the best pair")
    accepted: bool
    threshold: float
    model_version: str
    faces: list[FaceOut] | None = FacesField


class EmbedRequest(Request):
    images: list[Base64Image] = Field(
        min_length=1, json_schema_extra={"x-limit": "max_batch_items"}
    )


class EmbedResponse(WithFaces):
    embeddings: list[list[float]]
    model_version: str
    faces: list[FaceOut] | None = FacesField


# --- feedback --------------------------------------------------------------------------------
def _feedback_schema(schema: dict[str, Any]) -> None:
    schema["oneOf"] = [
        {"required": ["match_id", "true_subject"]},
        {"required": ["match_id", "correct"]},
    ]
    correct = schema["properties"]["correct"]
    correct.pop("anyOf", None)
    correct.pop("default", None)
    correct["type"] = "boolean"
    schema["properties"]["true_subject"].pop("default", None)


class FeedbackRequest(BaseModel):
    """Either ``true_subject`` (null: the query's subject is not enrolled) or ``correct``."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_feedback_schema)
    match_id: Id
    true_subject: Name | None = Field(
        None,
        description="the probe's real subject; null (sent explicitly) means its subject is not "
        "enrolled, so accepting it as anyone was a false accept",
    )
    correct: bool | None = Field(None, description="whether the decision was right")

    @model_validator(mode="before")
    @classmethod
    def _correct_not_null(cls, data: Any) -> Any:
        if isinstance(data, dict) and "correct" in data and data["correct"] is None:
            raise ValueError("correct must be true or false (leave it out to give true_subject)")
        return data

    @model_validator(mode="after")
    def _one_label(self) -> FeedbackRequest:
        has_subject = "true_subject" in self.model_fields_set
        has_correct = self.correct is not None
        if has_subject == has_correct:
            raise ValueError(
                "give exactly one of true_subject (a subject, or null when the "
                "query's subject is not enrolled) or correct (true/false)"
            )
        return self


class FeedbackResponse(BaseModel):
    match_id: str
    outcome: Outcome = Field(
        description="where the decision falls in the 1:N confusion matrix of probes: a genuine "
        "probe (its subject enrolled) is true_accept (accepted as itself), wrong_accept "
        "(accepted as another subject) or false_reject (rejected, whoever ranked first); an "
        "impostor probe (not enrolled) is false_accept or true_reject. With correct alone a "
        "wrong accept counts as false_accept (whether the subject is enrolled is unknown)"
    )
    genuine: bool | None = Field(
        description="whether the query and its best candidate share a subject (the pair's "
        "label; null without a candidate)"
    )


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
    target_far: float = Field(
        description="the pair FAR tau was calibrated for (impostor pairs scoring >= tau); a 1:N "
        "false-accept rate of probes (FPIR) grows with the gallery and has its own target"
    )
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
    open_set: OpenSetCalibration | None = Field(
        default=None,
        description="1:N open-set calibration (null for an artefact exported without it, and "
        "for one whose threshold is in as-norm units: the open-set tails are cosine scores)",
    )
    score_normalisation: ScoreNormalisation | None = Field(
        default=None,
        description="serve-time score normalisation; null: scores are raw cosine similarities",
        exclude_if=lambda v: v is None,
    )
    activation: Activation | None = None  # a model switch this replica is running, or ran last


class ScoreNormalisation(BaseModel):
    """Adaptive S-norm (``tcm.asnorm``): each side of a pair is standardised by the mean and
    spread of its top_k cosine scores against a cohort of training-class embeddings (identities
    no gallery holds); the score is the mean of the two z-scores. Candidates stay ranked by
    cosine; decisions, FAR/FRR and the threshold use the normalised score."""

    kind: Literal["as-norm"]
    top_k: int
    cohort_size: int
    threshold_units: Literal["as-norm"] = Field(
        description="the threshold (and calibration range) is in AS-normalised units"
    )
    cosine_threshold: float = Field(
        description="the cosine threshold the model had before normalisation, for reference"
    )


class OpenSetCalibration(BaseModel):
    """What the one threshold means for 1:N identification against a gallery of
    ``reference_gallery_size`` photos, measured on the held-out classes (``tcm.openset``)."""

    threshold_target: Literal["far", "fpir"] = Field(
        description="which target the threshold honours: the pair FAR (target_far) or FPIR "
        "at the reference gallery size (target_fpir)"
    )
    target_fpir: float
    reference_gallery_size: int
    fpir_at_threshold: float = Field(
        description="expected share of stranger probes (subject not enrolled) that get a "
        "candidate at or above the threshold from a gallery of reference_gallery_size photos"
    )
    fnir_at_threshold: float = Field(
        description="expected share of enrolled subjects' probes not returned at rank 1 at or "
        "above the threshold, with reference_gallery_size other photos in the gallery"
    )
    fpir_from_pair_far: float = Field(
        description="1 - (1 - far_at_threshold)^N: what the pair FAR implies if every "
        "comparison were independent (for comparison)"
    )


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
    path: str = Field(
        min_length=1, max_length=4096, description="artefact directory on the service's filesystem"
    )


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


class RegistryActivation(BaseModel):
    """The registry's running (or last failed) activation, shared by every replica."""

    version: str
    from_: str | None = Field(alias="from")
    kind: str
    started_at: float
    heartbeat: float
    owner: str
    state: Literal["running", "failed"]
    error: str | None = None

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class HistoryEntry(BaseModel):
    """One switch of the active model."""

    version: str
    from_: str | None = Field(alias="from")
    kind: str
    at: float
    skipped: dict[str, int] = Field(
        default_factory=dict,
        description="per tenant: items left out of the index (no embedding for this model, "
        "no image)",
    )

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class ModelRegistryOut(BaseModel):
    active: str | None
    served: str  # the version this replica serves (differs from active only during a switch)
    activation: RegistryActivation | None  # the registry's running or failed activation
    progress: Activation | None  # this replica's latest switch
    rollback_to: str | None
    versions: list[ModelVersionOut]
    history: list[HistoryEntry]


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
# The snapshot's models are the monitor's own (service.monitoring.snapshot_schema): the same
# classes are built, exposed on /metrics, stored and served. The what-if view is described here.
class AtTau(BaseModel):
    """The same tenant's pair FAR and FRR at tau (both pair sources pooled), for comparison."""

    far: float | None
    frr: float | None


class WhatIfTenant(Rates):
    by_source: RatesBySource
    at_tau: AtTau


class PooledRates(BaseModel):
    """Pair FAR and FRR of every tenant's labelled pairs added up (a rate of pairs, not of 1:N
    decisions: see ``Rates``)."""

    far: float | None
    frr: float | None
    genuine_pairs: int
    impostor_pairs: int


class WhatIf(BaseModel):
    """A tenant's what-if: its own row only."""

    threshold: float
    tau: float
    tenants: dict[str, WhatIfTenant]
    in_calibration_range: bool
    tau_lo: float
    tau_hi: float
    pairs_as_of: float
    window_s: float


class AdminWhatIf(WhatIf):
    """The admin's what-if: every tenant, and their pairs added up."""

    pooled_over_tenants: PooledRates


class MonitorView(BaseModel):
    """``GET /v1/monitor``: the monitor's latest snapshot (admin: everything; a tenant key: the
    model's reference points and that tenant's own row only) and, with ``?threshold=``, per-tenant
    FAR/FRR at that candidate threshold. Field meanings: ``service/README.md``."""

    scope: Literal["admin", "tenant"]
    tenant_id: str | None = None
    status: Literal["ok", "pending"]
    message: str | None = None
    snapshot: MonitorSnapshot | TenantMonitorSnapshot | None = None
    age_s: float | None = Field(
        default=None,
        description="seconds since the snapshot was computed (it is recomputed every "
        "interval_s; /v1/monitor answers from the latest one)",
    )
    stale: bool = Field(
        default=False,
        description="true when the snapshot is older than twice the monitor's interval: the "
        'monitor may have stopped (tcm_monitor_runs_total{result="failed"})',
    )
    what_if: AdminWhatIf | WhatIf | None = None


class MonitorReference(BaseModel):
    """``POST /v1/monitor/reference``: the across-tenants drift reference re-measured on the
    served galleries (and feedback in the window) as of now, stored in the model registry."""

    model_version: str
    status: Literal["measured", "undefined"]
    message: str | None = None
    reference: TenantsReference | None = None
