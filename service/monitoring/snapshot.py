"""The monitor's snapshot: per-tenant error rates at tau and live OPIS / eps-OPIS across tenants.

Tenants play the role of classes (SPEC "Live monitoring"). :func:`compute_snapshot` pools each
tenant's labelled pairs (feedback and gallery) into its utility curve over the model's stored
calibration range with ``tcm.consistency_from_scores``, using the manifest's range, grid, beta,
tau and eps, so live OPIS is comparable with the baseline OPIS measured at training time. Rates
are also given per source with the number of pairs behind each, and aggregated per tenant label
(the capped label Prometheus sees) with score histograms.

The snapshot is a :class:`~service.monitoring.snapshot_schema.MonitorSnapshot` (no NaN): it is
stored in the store and served as is.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from service.metrics import OUTCOMES, tenant_label_values
from service.monitoring.pairs import KINDS, SOURCES, LabelledScores, pooled
from service.monitoring.snapshot_schema import (
    BaselineOut,
    LabelMonitorRow,
    MonitorSnapshot,
    OutcomeCounts,
    Rates,
    RatesBySource,
    ScoreHistogram,
    SnapshotHeader,
    SourceRates,
    SubjectsRow,
    SubjectsSignal,
    TenantMonitorRow,
    TenantMonitorSnapshot,
)
from service.monitoring.subjects import ReferenceFn, TenantSubjects, across_subjects
from tcm import Manifest, consistency_from_scores, utility
from tcm.drift import Grid, Rules, shortfalls

SNAPSHOT_FORMAT = 4
POOLED = "pooled"  # the source value of rates over both sources together


@dataclass(frozen=True)
class MonitorConfig:
    """What the monitor computes and how often. Every field but ``interval_s`` and
    ``whatif_cache_pairs`` changes the numbers, so they make up the snapshot's identity
    (:meth:`key`): a replica adopts only a snapshot computed the way it would compute it."""

    interval_s: float = 60.0  # recompute (or adopt a replica's snapshot) this often
    window_s: float = 24 * 3600.0  # sliding window of feedback, by the decision's time
    min_pairs: int = 20  # genuine AND impostor pairs a tenant needs to enter OPIS
    tenant_label_cap: int = 50  # distinct tenant label values; the rest are "other"
    max_gallery_items: int = 1000  # gallery items sampled per tenant (whole subjects)
    max_pairs: int = 20_000  # pairs kept per tenant, kind and source
    fine_step: float = 0.01  # histogram bucket width around the calibration range
    fine_margin: float = 0.1  # ... over [tau_lo - margin, tau_hi + margin]
    coarse_step: float = 0.1  # bucket width elsewhere in [-1, 1]
    whatif_cache_pairs: int = 4_000_000  # pairs kept in memory for what-if queries (float64)
    # OPIS across subjects (tcm.drift.Rules) and its references
    min_subject_pairs: int = 1  # genuine (and impostor) pairs a subject needs for a curve
    min_subjects: int = 5  # eligible subjects OPIS across subjects needs (per tenant, pooled)
    reference_draws: int = 20  # count-matched reference galleries per distinct gallery shape
    bootstrap_resamples: int = 200  # subject resamples of the across-tenants reference
    interval_level: float = 0.9  # central share of the draws / resamples an interval spans
    # the across-tenants reference leaves out a tenant that falls short of the others by more
    # than this factor times their deviation bound (floored): tcm_config:tenant_deviation_factor
    # and tcm_config:opis_reference_floor in deploy/prometheus/rules/tcm_recording.yml
    outlier_factor: float = 3.0
    outlier_floor: float = 0.001

    def __post_init__(self) -> None:
        checks = [
            (self.interval_s > 0, "interval_s must be > 0"),
            (self.window_s > 0, "window_s must be > 0"),
            (self.min_pairs >= 1, "min_pairs must be >= 1"),
            (self.tenant_label_cap >= 0, "tenant_label_cap must be >= 0"),
            (self.max_gallery_items >= 2, "max_gallery_items must be >= 2"),
            (self.max_pairs >= 1, "max_pairs must be >= 1"),
            (0 < self.fine_step <= self.coarse_step <= 2, "need 0 < fine_step <= coarse_step <= 2"),
            (self.fine_margin >= 0, "fine_margin must be >= 0"),
            (self.whatif_cache_pairs >= 0, "whatif_cache_pairs must be >= 0"),
            (self.min_subject_pairs >= 1, "min_subject_pairs must be >= 1"),
            (self.min_subjects >= 2, "min_subjects must be >= 2"),
            (self.reference_draws >= 2, "reference_draws must be >= 2"),
            (self.bootstrap_resamples >= 2, "bootstrap_resamples must be >= 2"),
            (0 < self.interval_level < 1, "interval_level must lie in (0, 1)"),
            (self.outlier_factor >= 1, "outlier_factor must be >= 1"),
            (self.outlier_floor >= 0, "outlier_floor must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid monitor configuration: {message}")

    @classmethod
    def from_settings(cls, settings: Any) -> MonitorConfig:
        """The ``monitor_*`` settings (and ``tenant_label_cap``)."""
        return cls(
            interval_s=settings.monitor_interval_s,
            window_s=settings.monitor_window_s,
            min_pairs=settings.monitor_min_pairs,
            tenant_label_cap=settings.tenant_label_cap,
            max_gallery_items=settings.monitor_max_gallery_items,
            max_pairs=settings.monitor_max_pairs,
            min_subjects=settings.monitor_min_subjects,
            reference_draws=settings.monitor_reference_draws,
        )

    @property
    def rules(self) -> Rules:
        return Rules(
            min_genuine_pairs=self.min_subject_pairs,
            min_impostor_pairs=self.min_subject_pairs,
            min_subjects=self.min_subjects,
        )

    def key(self, model_version: str) -> str:
        d = asdict(self)
        d.pop("interval_s")
        d.pop("whatif_cache_pairs")
        d["model_version"] = model_version
        d["format"] = SNAPSHOT_FORMAT
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def grid_of(manifest: Manifest) -> Grid:
    """The manifest's calibration grid (and tau): what every utility curve is measured on."""
    cal = manifest.calibration
    return Grid.of(cal.tau_lo, cal.tau_hi, cal.num_thresholds, cal.tau, cal.beta)


# --- error rates ----------------------------------------------------------------------------
def accepted(sorted_scores: np.ndarray, threshold: float) -> int:
    """How many scores are >= threshold (accept iff score >= tau), by binary search."""
    return int(len(sorted_scores) - np.searchsorted(sorted_scores, threshold, side="left"))


def error_rates(
    genuine: np.ndarray, impostor: np.ndarray, threshold: float, *, beta: float = 1.0
) -> Rates:
    """FAR, FRR and F-beta utility at ``threshold`` from sorted scores, with the number of
    pairs behind them; a rate without pairs is None."""
    n_g, n_i = len(genuine), len(impostor)
    far = accepted(impostor, threshold) / n_i if n_i else None
    frr = (n_g - accepted(genuine, threshold)) / n_g if n_g else None
    u = None
    if far is not None and frr is not None:
        u = float(utility(np.array([1.0 - frr]), np.array([1.0 - far]), beta)[0])
    return Rates(far=far, frr=frr, utility=u, genuine_pairs=n_g, impostor_pairs=n_i)


def source_rates(
    parts: Mapping[str, LabelledScores], threshold: float, *, beta: float
) -> SourceRates:
    """Rates pooled over the sources and per source."""
    by_source = {
        src: error_rates(
            parts[src].genuine if src in parts else np.zeros(0),
            parts[src].impostor if src in parts else np.zeros(0),
            threshold,
            beta=beta,
        )
        for src in SOURCES
    }
    return SourceRates(
        pooled=error_rates(
            pooled(parts, "genuine"), pooled(parts, "impostor"), threshold, beta=beta
        ),
        by_source=RatesBySource(**by_source),
    )


# --- histograms -----------------------------------------------------------------------------
def score_buckets(
    *,
    tau_lo: float,
    tau_hi: float,
    tau: float,
    fine_step: float = 0.01,
    fine_margin: float = 0.1,
    coarse_step: float = 0.1,
    units: str = "cosine",
) -> tuple[float, ...]:
    """Histogram upper bounds (``le``): ``fine_step`` apart over [tau_lo - margin,
    tau_hi + margin] so that FAR/FRR at any threshold in and near the calibration range can be
    read in PromQL, ``coarse_step`` apart elsewhere in [-1, 1], and tau itself (FAR at tau
    exactly). Grid points are on multiples of the step (readable ``le`` labels).

    ``units="as-norm"`` (AS-normalised scores, unbounded, a few units wide where a cosine's
    calibration range is a few tenths): every step and the margin are 10 times wider and the
    coarse buckets span [-10, 10], so the bucket count stays about the cosine one's."""

    def grid(lo: float, hi: float, step: float) -> np.ndarray:
        k0, k1 = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        return np.round(np.arange(k0, k1 + 1) * step, 10)

    span = 1.0
    if units != "cosine":
        span, fine_step, fine_margin, coarse_step = (
            10.0,
            fine_step * 10,
            fine_margin * 10,
            coarse_step * 10,
        )
    lo = max(-span, tau_lo - fine_margin)
    hi = min(span, tau_hi + fine_margin)
    b = np.concatenate([grid(-span, span, coarse_step), grid(lo, hi, fine_step), [tau]])
    b = np.unique(np.clip(b, -span, span))
    return tuple(float(x) for x in b)


def cumulative_counts(sorted_scores: np.ndarray, bounds: Sequence[float]) -> list[int]:
    """Prometheus ``le`` semantics: how many scores are <= each bound."""
    return (
        np.searchsorted(sorted_scores, np.asarray(bounds, np.float64), side="right")
        .astype(int)
        .tolist()
    )


def histogram(sorted_scores: np.ndarray, bounds: Sequence[float]) -> ScoreHistogram:
    return ScoreHistogram(
        buckets=cumulative_counts(sorted_scores, bounds),
        count=len(sorted_scores),
        sum=float(sorted_scores.sum()),
    )


# --- the snapshot ---------------------------------------------------------------------------
def merge_sources(
    scores: Mapping[str, Mapping[str, LabelledScores]], tenants: Sequence[str]
) -> dict[str, LabelledScores]:
    """Several tenants' pairs added up, source by source (sorted)."""

    def cat(src: str, kind: str) -> np.ndarray:
        arrays = [getattr(scores[t][src], kind) for t in tenants if src in scores.get(t, {})]
        return np.sort(np.concatenate(arrays)) if arrays else np.zeros(0, np.float64)

    return {
        src: LabelledScores(genuine=cat(src, "genuine"), impostor=cat(src, "impostor"))
        for src in SOURCES
    }


def compute_snapshot(
    scores: Mapping[str, Mapping[str, LabelledScores]],
    *,
    manifest: Manifest,
    config: MonitorConfig,
    tenant_order: Sequence[str],
    now: float | None = None,
    subjects: Mapping[str, TenantSubjects] | None = None,
    reference: ReferenceFn | None = None,
) -> MonitorSnapshot:
    """``scores[tenant][source]`` -> the snapshot (see the module doc).

    A tenant enters OPIS with at least ``config.min_pairs`` genuine and impostor pairs (both
    sources pooled); with fewer than two such tenants OPIS is None and
    ``opis_unavailable_reason`` says why. ``tenant_order`` (oldest first) decides which tenants
    keep their own label under the cap. With ``subjects`` (per-subject histograms) the snapshot
    also has OPIS across subjects (``subjects``, and each tenant's ``subjects`` row) against
    ``reference`` (count-matched draws; None: the manifest baseline). ``tenants_reference`` is
    left None: the monitor sets it from the model registry.
    """
    cal, base = manifest.calibration, manifest.baseline
    now = time.time() if now is None else float(now)
    order = list(dict.fromkeys([*tenant_order, *scores]))
    labels = tenant_label_values(order, config.tenant_label_cap)
    empty: dict[str, LabelledScores] = {}

    tenants: dict[str, TenantMonitorRow] = {}
    for t in order:
        parts = scores.get(t, empty)
        rates = source_rates(parts, cal.tau, beta=cal.beta)
        p = rates.pooled
        fb = parts.get("feedback")
        tenants[t] = TenantMonitorRow(
            **dict(p),
            label=labels[t],
            eligible=p.genuine_pairs >= config.min_pairs and p.impostor_pairs >= config.min_pairs,
            mean_utility=None,
            deviation=None,
            by_source=rates.by_source,
            outcomes=OutcomeCounts.model_validate(
                dict(fb.outcomes) if fb is not None else dict.fromkeys(OUTCOMES, 0)
            ),
        )

    eligible = [t for t in order if tenants[t].eligible]
    opis = eps_opis = None
    reason = None
    if len(eligible) >= 2:
        report = consistency_from_scores(
            {t: pooled(scores[t], "genuine") for t in eligible},
            {t: pooled(scores[t], "impostor") for t in eligible},
            tau_range=(cal.tau_lo, cal.tau_hi),
            num_thresholds=cal.num_thresholds,
            beta=cal.beta,
            eps=base.eps,
            tau=cal.tau,
        )
        opis, eps_opis = float(report.opis), float(report.eps_opis)
        dev = shortfalls(report.utility)
        for row, t in enumerate(report.classes):
            tenants[t].mean_utility = float(report.mean_utility[row])
            tenants[t].deviation = float(dev[row])
    else:
        reason = (
            f"{len(eligible)} of {len(order)} tenant(s) have at least {config.min_pairs} "
            f"genuine and {config.min_pairs} impostor labelled pairs; OPIS compares "
            "tenants, so it needs at least 2"
        )

    bounds = score_buckets(
        tau_lo=cal.tau_lo,
        tau_hi=cal.tau_hi,
        tau=cal.tau,
        fine_step=config.fine_step,
        fine_margin=config.fine_margin,
        coarse_step=config.coarse_step,
        units=manifest.threshold_units,
    )
    by_label: dict[str, LabelMonitorRow] = {}
    for label in dict.fromkeys(labels[t] for t in order):
        members = [t for t in order if labels[t] == label]
        merged = merge_sources(scores, members)
        rates = source_rates(merged, cal.tau, beta=cal.beta)
        by_label[label] = LabelMonitorRow(
            tenants=len(members),
            pooled=rates.pooled,
            by_source=rates.by_source,
            histograms={
                kind: {
                    src: histogram(getattr(merged[src], kind), bounds)
                    for src in SOURCES
                    if len(getattr(merged[src], kind))
                }
                for kind in KINDS
            },
        )

    everyone = merge_sources(scores, order)
    across = None
    if subjects is not None:
        across = across_subjects(
            subjects,
            grid=grid_of(manifest),
            rules=config.rules,
            eps=base.eps,
            level=config.interval_level,
            reference=reference,
            baseline={"opis": base.opis, "opis_interval": base.opis_interval},
        )
        for t, row in across["tenants"].items():
            if t in tenants:
                tenants[t].subjects = SubjectsRow.model_validate(row)
    # every field is set explicitly, defaults included: what is set is what is stored
    return MonitorSnapshot(
        format=SNAPSHOT_FORMAT,
        config_key=config.key(manifest.model_version),
        computed_at=now,
        window_s=config.window_s,
        since=now - config.window_s,
        interval_s=config.interval_s,
        model_version=manifest.model_version,
        tau=cal.tau,
        tau_lo=cal.tau_lo,
        tau_hi=cal.tau_hi,
        target_far=cal.target_far,
        num_thresholds=cal.num_thresholds,
        beta=cal.beta,
        eps=base.eps,
        min_pairs=config.min_pairs,
        max_pairs=config.max_pairs,
        max_gallery_items=config.max_gallery_items,
        opis=opis,
        eps_opis=eps_opis,
        opis_unavailable_reason=reason,
        baseline=BaselineOut(
            opis=base.opis,
            eps_opis=base.eps_opis,
            eps=base.eps,
            opis_interval=list(base.opis_interval) if base.opis_interval else None,
            eps_opis_interval=list(base.eps_opis_interval) if base.eps_opis_interval else None,
            interval_level=base.interval_level,
            num_classes=base.num_classes,
            num_images=base.num_images,
        ),
        subjects=None
        if across is None
        else SubjectsSignal.model_validate({k: v for k, v in across.items() if k != "tenants"}),
        tenants_reference=None,
        global_=source_rates(everyone, cal.tau, beta=cal.beta),
        tenants_total=len(order),
        eligible_tenants=len(eligible),
        excluded_tenants=[t for t in order if not tenants[t].eligible],
        tenants=tenants,
        labels=by_label,
        score_buckets=list(bounds),
    )


def tenant_view(snapshot: MonitorSnapshot, tenant_id: str) -> TenantMonitorSnapshot:
    """What a tenant may see of a snapshot: the header (the model's reference points and the
    monitor's configuration) and its own row, never anything computed from other tenants'
    data (OPIS, global rates, other rows or labels)."""
    header = {name: getattr(snapshot, name) for name in SnapshotHeader.model_fields}
    return TenantMonitorSnapshot(**header, tenant=snapshot.tenants.get(tenant_id))


def what_if(
    pairs: Mapping[str, Mapping[str, LabelledScores]],
    threshold: float,
    *,
    tau: float,
    beta: float,
    include_pooled: bool = True,
    units: str = "cosine",
) -> dict[str, Any]:
    """Per-tenant FAR/FRR at a candidate threshold (and at tau, for comparison), per source and
    pooled, with the pairs behind each; ``pooled_over_tenants`` adds all tenants' pairs up.
    Cost: O(tenants * log pairs) on sorted scores. ``units``: the scores' ("cosine": a
    threshold in [-1, 1]; "as-norm": any finite one)."""
    finite = isinstance(threshold, int | float) and math.isfinite(threshold)
    if units == "cosine" and not (finite and -1.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a cosine score in [-1, 1], got {threshold!r}")
    if not finite:
        raise ValueError(f"threshold must be a finite score, got {threshold!r}")
    tenants: dict[str, Any] = {}
    totals = {src: {"g": 0, "i": 0, "fa": 0, "fr": 0} for src in SOURCES}
    for t, parts in pairs.items():
        at = source_rates(parts, threshold, beta=beta)
        at_tau = source_rates(parts, tau, beta=beta).pooled
        tenants[t] = {
            **at.pooled.model_dump(),
            "by_source": at.by_source.model_dump(),
            "at_tau": {"far": at_tau.far, "frr": at_tau.frr},
        }
        for src, p in parts.items():
            tot = totals[src]
            tot["g"] += len(p.genuine)
            tot["i"] += len(p.impostor)
            tot["fa"] += accepted(p.impostor, threshold)
            tot["fr"] += len(p.genuine) - accepted(p.genuine, threshold)
    out: dict[str, Any] = {"threshold": float(threshold), "tau": tau, "tenants": tenants}
    if include_pooled:
        g = sum(v["g"] for v in totals.values())
        i = sum(v["i"] for v in totals.values())
        out["pooled_over_tenants"] = {
            "far": sum(v["fa"] for v in totals.values()) / i if i else None,
            "frr": sum(v["fr"] for v in totals.values()) / g if g else None,
            "genuine_pairs": g,
            "impostor_pairs": i,
        }
    return out
