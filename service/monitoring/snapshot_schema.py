"""The monitor's snapshot, typed: one set of models for what the builder makes
(:func:`service.monitoring.compute_snapshot`), what ``/metrics`` exposes
(:mod:`service.monitoring.exposition`), what the store keeps and what ``GET /v1/monitor`` serves
(the API's response schemas are these classes: their names, fields and docstrings are its
published OpenAPI components, so change them as an API change).

Stored form: ``MonitorSnapshot.model_dump(mode="json", exclude_unset=True)`` (:func:`to_stored`),
read back with ``model_validate`` (:func:`from_stored`). A key is stored iff the builder set it:
a reference without a ``note`` or a tenant row without ``subjects`` stores no such key, as the
snapshot dicts of earlier versions did, so every replica of a rolling upgrade reads every
other's snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from service.metrics import OUTCOMES


class Rates(BaseModel):
    """Rates at tau of labelled *pairs* in the monitor's window. Which target each compares
    with depends on the source: ``gallery`` pairs (within the tenant's gallery) give the pair
    FAR that ``target_far`` is about; ``feedback`` pairs are (probe, best candidate) of labelled
    1:N decisions, whose impostors are the best of N, so their FAR is an identification rate
    (FPIR-like: compare with an FPIR target, which grows with the gallery, never with
    ``target_far``); ``pooled`` (and a row's own fields) mixes both. The alerts read
    neither: TCMTenantFPIRHigh reads the feedback counters (tcm_decisions_total)."""

    far: float | None = Field(
        description="share of the impostor pairs scoring >= tau (null without impostor "
        "pairs): the pair FAR for gallery pairs; for feedback pairs a best-of-N rate"
    )
    frr: float | None = Field(
        description="share of the genuine pairs scoring < tau (null without genuine pairs)"
    )
    utility: float | None
    genuine_pairs: int
    impostor_pairs: int


class RatesBySource(BaseModel):
    feedback: Rates
    gallery: Rates


class SourceRates(BaseModel):
    pooled: Rates
    by_source: RatesBySource


# one count per outcome name, as they are defined once (service.metrics): the 1:N confusion
# matrix of labelled probes. wrong_accept came later: a snapshot stored without it reads 0.
OutcomeCounts = create_model(
    "OutcomeCounts",
    __doc__="Labelled 1:N decisions in the window by outcome: genuine probes (subject enrolled) "
    "true_accept, wrong_accept (accepted as another subject), false_reject; impostor probes "
    "(subject not enrolled) false_accept, true_reject.",
    **{o: (int, 0 if o == "wrong_accept" else ...) for o in OUTCOMES},
)


class SubjectsReference(BaseModel):
    """A reference interval of OPIS across subjects (docs/architecture.md, "Monitoring")."""

    lo: float
    mid: float
    hi: float
    matched: bool = Field(
        description="measured on held-out classes subsampled to this "
        "gallery's images per subject; false: the manifest's full-count "
        "baseline (an older artefact), which alerts ignore"
    )
    draws: int
    note: str | None = None


class LevelReference(BaseModel):
    """FRR and utility at tau over every pair of count-matched reference galleries shaped like
    the tenant's (held-out classes at its images per subject): intervals over the draws, to
    compare with the tenant's gallery-pair rates (``by_source.gallery``)."""

    frr: dict[str, float] = Field(description="lo, mid, hi over the draws")
    utility: dict[str, float] = Field(description="lo, mid, hi over the draws")
    draws: int


class SubjectsRow(BaseModel):
    """OPIS across one tenant's subjects (null with too few eligible subjects)."""

    subjects: int
    eligible_subjects: int
    images_per_subject: dict[str, float] | None
    opis: float | None
    eps_opis: float | None
    reference: SubjectsReference | None
    unavailable_reason: str | None
    level_reference: LevelReference | None = Field(
        None,
        description="the level signal's reference (absent "
        "without held-out embeddings in the artefact)",
    )


class SubjectsPooled(BaseModel):
    tenants: int
    eligible_subjects: int
    opis: float | None
    reference: SubjectsReference | None
    unavailable_reason: str | None
    left_out_tenant: str | None = Field(
        None,
        description="with 3 or more tenants of "
        "min_subjects eligible subjects, opis pools them with "
        "its most influential tenant left out: this one "
        "(absent: none was)",
    )
    opis_all_tenants: float | None = Field(
        None,
        description="the pool of every tenant's subjects, none left out (absent: the same as opis)",
    )


class SubjectsSignal(BaseModel):
    """OPIS across every tenant's subjects together, and the rules both levels use."""

    rules: dict[str, int]
    level: float
    reference_kind: Literal["matched", "baseline"]
    pooled: SubjectsPooled


class TenantsReference(BaseModel):
    """The across-tenants reference, measured on the served galleries (model registry)."""

    tenants: int = Field(description="tenants it was measured on (left_out_tenant not counted)")
    opis: float
    eps_opis: float
    opis_interval: list[float] | None
    eps_opis_interval: list[float] | None
    deviation: dict[str, float] = Field(
        description="max: the largest shortfall of a tenant's "
        "utility curve below the other tenants' median curve; hi: its bootstrap bound"
    )
    deviation_kind: str | None = Field(
        None,
        description="what deviation measures (absent: an earlier version's symmetric "
        "distance from the median, re-measured at the next refresh)",
    )
    left_out_tenant: str | None = Field(
        None,
        description="with 3 or more tenants, the one left out of "
        "every number because it fell short of the others by more than the alert factor "
        "times their bound (absent: none was)",
    )
    calibration_error: float
    far_at_tau: dict[str, float]
    level: float
    resamples: int
    model_version: str
    measured_at: float
    feedback_pairs: int
    min_pairs: int


class TenantMonitorRow(Rates):
    label: str = Field(description="the tenant's value of the capped metrics label")
    eligible: bool = Field(description="enough genuine and impostor pairs to enter OPIS")
    mean_utility: float | None
    deviation: float | None = Field(
        None,
        description="mean square over the calibration range of "
        "how far the tenant's utility curve lies below the median curve of the other "
        "tenants in OPIS (0 where it is above; in OPIS only)",
    )
    exportable_ratio: float | None = Field(
        None,
        description="share of the tenant's gallery items "
        "with a stored image, which export-dataset can train on (absent: no items)",
    )
    by_source: RatesBySource
    outcomes: OutcomeCounts = Field(
        description="labelled 1:N decisions in the window by outcome (the probe's: FPIR = "
        "false_accept / (false_accept + true_reject); FRR = false_reject / (true_accept + "
        "wrong_accept + false_reject))"
    )
    subjects: SubjectsRow | None = None


class ScoreHistogram(BaseModel):
    buckets: list[int] = Field(description="cumulative counts at score_buckets (le)")
    count: int
    sum: float


class LabelMonitorRow(BaseModel):
    tenants: int
    pooled: Rates
    by_source: RatesBySource
    histograms: dict[
        Literal["genuine", "impostor"], dict[Literal["feedback", "gallery"], ScoreHistogram]
    ]


class BaselineOut(BaseModel):
    opis: float
    eps_opis: float
    eps: float
    opis_interval: list[float] | None = None
    eps_opis_interval: list[float] | None = None
    interval_level: float | None = None
    num_classes: int | None = None
    num_images: int | None = None


class SnapshotHeader(BaseModel):
    """What every monitor snapshot says first: when and over what window it was computed, for
    which model, and the monitor's configuration (the same for the admin and a tenant)."""

    format: int
    computed_at: float
    window_s: float
    since: float
    interval_s: float
    model_version: str
    tau: float
    tau_lo: float
    tau_hi: float
    target_far: float = Field(
        description="the pair FAR tau was calibrated for: compare the pair FAR of gallery "
        "pairs (by_source.gallery.far) with it, not a rate of 1:N decisions"
    )
    num_thresholds: int
    beta: float
    min_pairs: int
    max_pairs: int
    max_gallery_items: int


class TenantMonitorSnapshot(SnapshotHeader):
    """What a tenant key sees: the model's reference points and its own row only."""

    tenant: TenantMonitorRow | None = Field(description="null before the tenant's first row")


class MonitorSnapshot(SnapshotHeader):
    """What the admin token sees: every tenant, OPIS across tenants, global rates."""

    config_key: str
    eps: float
    opis: float | None
    eps_opis: float | None
    opis_unavailable_reason: str | None
    baseline: BaselineOut
    global_: SourceRates = Field(alias="global")
    tenants_total: int
    eligible_tenants: int
    excluded_tenants: list[str]
    tenants: dict[str, TenantMonitorRow]
    labels: dict[str, LabelMonitorRow]
    score_buckets: list[float]
    subjects: SubjectsSignal | None = None
    tenants_reference: TenantsReference | None = None

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


def to_stored(snapshot: MonitorSnapshot) -> dict[str, Any]:
    """The JSON document the store keeps (see the module doc)."""
    return snapshot.model_dump(mode="json", exclude_unset=True)


def from_stored(doc: Mapping[str, Any]) -> MonitorSnapshot:
    """A stored snapshot (this version's or an earlier one's of the same ``format``)."""
    return MonitorSnapshot.model_validate(doc)
