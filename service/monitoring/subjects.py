"""The two drift signals the monitor reports, each with a reference measured the same way.

*Across subjects* (the paper's OPIS: subjects are the classes, qualified by tenant). A subject's
genuine pairs are pairs of its own gallery images and feedback on decisions whose best
candidate was it and whose query truly was it; its impostor pairs are its images against the
tenant's other subjects and feedback on decisions whose best candidate was it but whose query
was someone else. OPIS is computed per tenant (with at least ``rules.min_subjects`` eligible
subjects) and pooled over every eligible subject of every tenant (so one tenant suffices); with
3 or more tenants of ``min_subjects`` eligible subjects the pool leaves out its most influential
tenant (:func:`tcm.drift.trimmed_pooled_opis`), so that no one tenant's gallery can move the
model-wide signal, and its reference pools each draw the same way.
Reference: held-out classes of the artefact subsampled to each tenant's images per subject
(:func:`tcm.drift.matched_reference`), measured by the same code; the interval is the spread
over the draws. Each tenant gets its own draws (seeded by tenant and gallery shape), so the
pooled reference combines independent draws and narrows as tenants are added. Artefacts
without held-out embeddings fall back to the manifest's baseline (its class-bootstrap interval,
else the point value), flagged ``matched: false``.

*Across tenants* (one threshold, many customers): OPIS with tenants as classes, and per tenant
its shortfall below the other tenants' median utility curve (:func:`tcm.drift.shortfalls`:
one-sided and leave-one-out, so a worse tenant ranks as worse). Reference: the same numbers on
the served galleries, measured when a model starts serving and re-measured by the monitor
whenever the eligible tenants change (stored in the registry, re-measurable on demand), with a
subject bootstrap interval (each tenant's subjects resampled with replacement). With 3 or more
tenants it leaves out the tenant that falls shortest when that one would alert against the
others (:func:`tenant_reference`): one outlier tenant, present at measurement or joining later,
does not become the reference.

Everything here is pure and blocking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.monitoring.pairs import sample_gallery
from service.store.base import Decision
from tcm import utility
from tcm._pairs import counts_at_or_above
from tcm.asnorm import Cohort
from tcm.drift import (
    Grid,
    Rules,
    Summary,
    class_histograms,
    curves,
    eps_opis_of,
    opis_of,
    pooled_opis,
    shortfalls,
    trimmed_pooled_opis,
)

# (tenant, its gallery's images per subject, sorted) -> count-matched reference draws, drawn
# independently per tenant so that pooling over tenants narrows the interval
ReferenceFn = Callable[[str, tuple[int, ...]], list[Summary]]
# what ``TenantsReference.deviation`` measures: a reference without it (an earlier version's
# symmetric distance from the median) is re-measured
DEVIATION_KIND = "shortfall_below_others_median"


@dataclass(frozen=True)
class TenantSubjects:
    """One tenant's per-subject pair histograms over the grid."""

    subjects: list[str]
    images: np.ndarray  # (S,) gallery images per subject in the monitor's sample
    pos: np.ndarray  # (S, W) genuine pairs (gallery and feedback)
    neg_gallery: np.ndarray  # (S, W) gallery impostor pairs (a pair counts for both subjects)
    neg_feedback: np.ndarray  # (S, W) feedback impostor pairs (for the candidate's subject)

    def tenant_hist(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The tenant's genuine and impostor histograms, subjects weighted by ``weights``
        (each gallery impostor pair once)."""
        w = np.ones(len(self.subjects)) if weights is None else weights
        return w @ self.pos, w @ (self.neg_gallery / 2.0 + self.neg_feedback)


def tenant_subjects(
    subjects: Sequence[str],
    vectors: np.ndarray,
    decisions: Iterable[Decision],
    *,
    grid: Grid,
    max_items: int,
    seed: int,
    model_version: str,
    until: float | None = None,
    cohort: Cohort | None = None,
) -> TenantSubjects:
    """Per-subject histograms of a tenant's gallery sample (the rows ``gallery_scores`` uses for
    the same seed) and its labelled feedback of ``model_version`` up to ``until``."""
    w = grid.width
    names: list[str] = []
    pos = neg_g = np.zeros((0, w))
    images = np.zeros(0)
    if len(subjects) >= 1:
        _, idx = sample_gallery(subjects, max_items, np.random.default_rng(seed))
        kept = [str(subjects[i]) for i in idx]
        rows = np.asarray(vectors, dtype=np.float32)[idx]
        stats = None if cohort is None else cohort.stats(rows)  # AS-norm: scores as decided
        names, pos, neg_g = class_histograms(rows, kept, grid, stats=stats)
        counts = dict(
            zip(
                *np.unique(np.asarray(kept, dtype=object).astype(str), return_counts=True),
                strict=True,
            )
        )
        images = np.array([counts[s] for s in names], np.float64)
    gen: dict[str, list[float]] = {}
    imp: dict[str, list[float]] = {}
    for d in decisions:
        fb, m = d.feedback, d.match
        if (
            fb is None
            or fb.genuine is None
            or m.score is None
            or m.top_subject is None
            or m.model_version != model_version
        ):
            continue
        if until is not None and (m.created_at > until or fb.created_at > until):
            continue
        (gen if fb.genuine else imp).setdefault(m.top_subject, []).append(float(m.score))
    extra = [s for s in dict.fromkeys([*gen, *imp]) if s not in set(names)]
    if extra:
        names = [*names, *extra]
        pad = np.zeros((len(extra), w))
        pos, neg_g = np.vstack([pos, pad]), np.vstack([neg_g, pad])
        images = np.concatenate([images, np.zeros(len(extra))])
    row = {s: i for i, s in enumerate(names)}
    pos = pos.copy()
    neg_f = np.zeros_like(pos)
    lo, hi = (-1.0, 1.0) if cohort is None else (-np.inf, np.inf)  # AS-norm is unbounded
    for s, scores in gen.items():
        pos[row[s]] += grid.histogram(np.clip(scores, lo, hi))
    for s, scores in imp.items():
        neg_f[row[s]] += grid.histogram(np.clip(scores, lo, hi))
    return TenantSubjects(names, images, pos, neg_g, neg_f)


def _quantiles(values: Sequence[float], level: float) -> dict[str, float] | None:
    if len(values) < 2:
        return None
    a = (1.0 - level) / 2.0
    lo, mid, hi = np.quantile(np.asarray(values), [a, 0.5, 1.0 - a])
    return {"lo": float(lo), "mid": float(mid), "hi": float(hi)}


def across_subjects(
    data: Mapping[str, TenantSubjects],
    *,
    grid: Grid,
    rules: Rules,
    eps: float,
    level: float,
    reference: ReferenceFn | None,
    baseline: Mapping[str, Any],
) -> dict[str, Any]:
    """OPIS across subjects per tenant and pooled, each with its reference interval.

    ``reference(counts)`` gives count-matched reference draws for a gallery whose subjects
    have ``counts`` images (None: the artefact keeps no held-out embeddings, so the reference
    is ``baseline``: the manifest's ``opis`` and ``opis_interval``)."""
    tenants: dict[str, Any] = {}
    summaries: dict[str, Summary] = {}
    draws: dict[str, list[Summary]] = {}
    for t, ts in data.items():
        cv = curves(ts.subjects, ts.pos, ts.neg_gallery + ts.neg_feedback, grid, rules)
        summaries[t] = Summary.of(cv.utility)
        row: dict[str, Any] = {
            "subjects": len(ts.subjects),
            "eligible_subjects": len(cv.classes),
            "images_per_subject": _count_summary(ts.images),
            "opis": None,
            "eps_opis": None,
            "reference": None,
            "unavailable_reason": None,
        }
        if len(cv.classes) >= rules.min_subjects:
            row["opis"] = opis_of(cv.utility)
            row["eps_opis"] = eps_opis_of(cv.utility, eps)
        else:
            row["unavailable_reason"] = (
                f"{len(cv.classes)} of {len(ts.subjects)} subject(s) have at least "
                f"{rules.min_genuine_pairs} genuine and {rules.min_impostor_pairs} impostor "
                f"pair(s); OPIS across subjects needs {rules.min_subjects}"
            )
        if reference is not None:
            counts = tuple(sorted(int(c) for c in ts.images if c > 0))
            draws[t] = reference(t, counts) if counts else []
            per_draw = [pooled_opis([s]) for s in draws[t] if s.n >= rules.min_subjects]
            ref = _quantiles([v for v in per_draw if v is not None], level)
            row["reference"] = (
                None if ref is None else {**ref, "matched": True, "draws": len(per_draw)}
            )
            levels = [d.level for d in draws[t] if d.level is not None]
            frr = _quantiles([v[0] for v in levels], level)
            util = _quantiles([v[1] for v in levels], level)
            if frr is not None and util is not None:  # key set only then (stored shape)
                row["level_reference"] = {"frr": frr, "utility": util, "draws": len(levels)}
        else:
            row["reference"] = _baseline_reference(baseline)
        tenants[t] = row

    total = sum(s.n for s in summaries.values())
    pooled: dict[str, Any] = {
        "tenants": sum(1 for s in summaries.values() if s.n),
        "eligible_subjects": total,
        "opis": None,
        "reference": None,
        "unavailable_reason": None,
    }
    if total >= rules.min_subjects:
        names = list(summaries)
        pooled["opis"], left_out = trimmed_pooled_opis(
            list(summaries.values()), min_subjects=rules.min_subjects
        )
        if left_out is not None:  # keys set only then: the stored shape is otherwise as before
            pooled["left_out_tenant"] = names[left_out]
            pooled["opis_all_tenants"] = pooled_opis(list(summaries.values()))
    else:
        pooled["unavailable_reason"] = (
            f"{total} eligible subject(s) over all tenants; OPIS across subjects needs "
            f"{rules.min_subjects}"
        )
    if reference is not None:
        n_draws = min((len(d) for d in draws.values() if d), default=0)
        per_draw = []
        for r in range(n_draws):
            parts = [d[r] for d in draws.values() if d]
            if sum(p.n for p in parts) >= rules.min_subjects:
                per_draw.append(trimmed_pooled_opis(parts, min_subjects=rules.min_subjects)[0])
        ref = _quantiles([v for v in per_draw if v is not None], level)
        pooled["reference"] = (
            None if ref is None else {**ref, "matched": True, "draws": len(per_draw)}
        )
    else:
        pooled["reference"] = _baseline_reference(baseline)
    return {
        "rules": {
            "min_genuine_pairs": rules.min_genuine_pairs,
            "min_impostor_pairs": rules.min_impostor_pairs,
            "min_subjects": rules.min_subjects,
        },
        "level": level,
        "reference_kind": "matched" if reference else "baseline",
        "pooled": pooled,
        "tenants": tenants,
    }


def _count_summary(images: np.ndarray) -> dict[str, float] | None:
    nz = images[images > 0]
    if not len(nz):
        return None
    return {
        "median": float(np.median(nz)),
        "mean": float(nz.mean()),
        "min": float(nz.min()),
        "max": float(nz.max()),
    }


def _baseline_reference(baseline: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's baseline as the reference of an artefact without held-out embeddings:
    measured at the held-out classes' full image counts, so not comparable with small
    galleries (``matched: false``; the alerts ignore it)."""
    interval = baseline.get("opis_interval")
    lo, hi = interval if interval is not None else (baseline["opis"], baseline["opis"])
    return {
        "lo": float(lo),
        "mid": float(baseline["opis"]),
        "hi": float(hi),
        "matched": False,
        "draws": 0,
        "note": "the artefact keeps no held-out embeddings: the reference is its baseline at "
        "full held-out class sizes"
        + ("" if interval is not None else " (no bootstrap interval in the manifest)")
        + "; re-export the model to get a reference matched to the galleries",
    }


# --- across tenants ---------------------------------------------------------------------------
def tenant_curve(pos: np.ndarray, neg: np.ndarray, grid: Grid) -> tuple[np.ndarray, float, float]:
    """A tenant's utility over the grid, and its utility and FAR at tau, from histograms."""
    n_pos, n_neg = pos.sum(), neg.sum()
    tpr = counts_at_or_above(pos) / n_pos
    tnr = 1.0 - counts_at_or_above(neg) / n_neg
    u = utility(tpr, tnr, grid.beta)
    return u[grid.grid_cols], float(u[grid.tau_col]), float(1.0 - tnr[grid.tau_col])


def tenant_reference(
    data: Mapping[str, TenantSubjects],
    eligible: Sequence[str],
    *,
    grid: Grid,
    eps: float,
    level: float,
    resamples: int,
    seed: int,
    calibration_error: float,
    outlier_factor: float = 3.0,
    outlier_floor: float = 0.001,
) -> dict[str, Any] | None:
    """The across-tenants numbers on the given data with a subject-bootstrap interval: OPIS and
    eps-OPIS with tenants as classes, and how far the farthest tenant's utility curve falls
    short of the other tenants' median curve (``deviation``: that maximum of
    :func:`tcm.drift.shortfalls`, and its bootstrap upper bound, which per-tenant alerts compare
    with), and ``members``: the tenants considered. None with fewer than 2 eligible tenants.

    Robust to one outlier: with 3 or more tenants, the one that falls shortest is left out of
    every number (``left_out_tenant``) when its shortfall is above ``outlier_factor`` times the
    deviation bound measured without it (floored at ``outlier_floor``): the tenant that would
    alert against the others' reference does not become the reference. The defaults are the
    alert's factor and floor (``tcm_config:tenant_deviation_factor``,
    ``tcm_config:opis_reference_floor``)."""
    tenants = [t for t in eligible if t in data and len(data[t].subjects)]
    if len(tenants) < 2:
        return None
    common = {
        "grid": grid,
        "eps": eps,
        "level": level,
        "resamples": resamples,
        "seed": seed,
        "calibration_error": calibration_error,
    }
    full = _tenant_reference(data, tenants, **common)
    if full is None:
        return None
    ref, short = full
    if len(short) >= 3:
        worst = max(short, key=lambda t: short[t])
        rest = _tenant_reference(data, [t for t in tenants if t != worst], **common)
        if rest is not None and short[worst] > outlier_factor * max(
            rest[0]["deviation"]["hi"], outlier_floor
        ):
            return {**rest[0], "members": tenants, "left_out_tenant": worst}
    return {**ref, "members": tenants}


def _tenant_reference(
    data: Mapping[str, TenantSubjects],
    tenants: Sequence[str],
    *,
    grid: Grid,
    eps: float,
    level: float,
    resamples: int,
    seed: int,
    calibration_error: float,
) -> tuple[dict[str, Any], dict[str, float]] | None:
    """:func:`tenant_reference` over exactly ``tenants``, and each tenant's shortfall."""

    def measure(
        weights: Mapping[str, np.ndarray] | None,
    ) -> tuple[float, float, dict[str, float], list[float]]:
        """OPIS, eps-OPIS, each tenant's shortfall below the others' median curve
        (:func:`tcm.drift.shortfalls`) and the tenants' FAR at tau."""
        names, rows, fars = [], [], []
        for t in tenants:
            pos, neg = data[t].tenant_hist(None if weights is None else weights[t])
            if pos.sum() == 0 or neg.sum() == 0:
                continue
            u, _, far = tenant_curve(pos, neg, grid)
            names.append(t)
            rows.append(u)
            fars.append(far)
        if len(rows) < 2:
            return float("nan"), float("nan"), {}, fars
        u_all = np.stack(rows)
        short = dict(zip(names, shortfalls(u_all).tolist(), strict=True))
        return opis_of(u_all), eps_opis_of(u_all, eps), short, fars

    opis, eps_opis, short, fars = measure(None)
    if not np.isfinite(opis):  # fewer than 2 tenants with both kinds of pairs
        return None
    rng = np.random.default_rng(seed)
    boot_opis, boot_eps, boot_dev = [], [], []
    for _ in range(resamples):
        weights = {
            t: rng.multinomial(
                len(data[t].subjects), np.full(len(data[t].subjects), 1 / len(data[t].subjects))
            ).astype(np.float64)
            for t in tenants
        }
        o, e, s, _ = measure(weights)
        if np.isfinite(o):
            boot_opis.append(o)
            boot_eps.append(e)
            boot_dev.append(max(s.values()))
    a = (1.0 - level) / 2.0

    def interval(v: list[float]) -> list[float] | None:
        return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))] if len(v) >= 2 else None

    dev_max = max(short.values())
    dev_hi = float(np.quantile(boot_dev, 1 - a)) if len(boot_dev) >= 2 else dev_max
    return {
        "tenants": len(short),
        "opis": opis,
        "eps_opis": eps_opis,
        "opis_interval": interval(boot_opis),
        "eps_opis_interval": interval(boot_eps),
        "deviation": {"max": dev_max, "hi": dev_hi},
        "deviation_kind": DEVIATION_KIND,
        "calibration_error": calibration_error,
        "far_at_tau": {"min": min(fars), "max": max(fars)},
        "level": level,
        "resamples": len(boot_opis),
    }, short
