"""OPIS across subjects from per-class score histograms, its class-bootstrap interval, and a
reference re-measured on held-out classes subsampled to a live gallery's class sizes.

Why histograms: a subject's utility curve only needs, for each threshold of the calibration
grid, how many of its genuine and impostor pairs score at or above it. Per-class bucket counts
over the grid (``bounds``) can be added up (gallery pairs and feedback pairs of one subject),
resampled (a class bootstrap is a reweighting of rows) and summarised, which the service needs
to compare a live gallery with a reference measured the same way. The numbers equal
:func:`tcm.consistency_from_scores` on the same scores (``tests/tcm/test_drift.py``).

Why a count-matched reference: a subject with 3 images has 3 genuine pairs, so its TPR at a
threshold is 0, 1/3, 2/3 or 1 and OPIS across such subjects is large with no drift at all. The
training baseline uses every held-out image; a live gallery rarely has as many per subject.
:func:`matched_reference` subsamples held-out classes to the live counts and measures OPIS with
the same rules, so live and reference carry the same sampling noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tcm._pairs import counts_at_or_above
from tcm.asnorm import CohortStats, as_norm
from tcm.consistency import _bounds, range_average, utility


@dataclass(frozen=True)
class Grid:
    """The calibration grid (and tau) scores are bucketed on."""

    bounds: np.ndarray  # (M,) sorted: the grid's thresholds and tau
    grid_cols: np.ndarray  # (T,) columns of the grid thresholds in ``bounds``
    tau_col: int
    beta: float = 1.0

    @classmethod
    def of(
        cls, tau_lo: float, tau_hi: float, num_thresholds: int, tau: float, beta: float = 1.0
    ) -> Grid:
        bounds, cols, tau_col = _bounds(tau_lo, tau_hi, num_thresholds, tau)
        assert tau_col is not None
        return cls(bounds, cols, tau_col, float(beta))

    @property
    def width(self) -> int:
        """Buckets per histogram (one more than bounds)."""
        return len(self.bounds) + 1

    def histogram(self, scores: np.ndarray) -> np.ndarray:
        """Bucket counts of ``scores`` (bucket j holds bounds[j-1] <= s < bounds[j])."""
        idx = np.searchsorted(self.bounds, np.asarray(scores, np.float64), side="right")
        return np.bincount(idx, minlength=self.width).astype(np.float64)


@dataclass(frozen=True)
class Rules:
    """When a subject, and OPIS across subjects, is defined."""

    min_genuine_pairs: int = 1  # a subject needs this many genuine pairs (1 = two images) ...
    min_impostor_pairs: int = 1  # ... and impostor pairs to have a utility curve
    min_subjects: int = 5  # OPIS across fewer eligible subjects is undefined


@dataclass(frozen=True)
class Curves:
    """Eligible classes' utility curves over the grid and their rates at tau."""

    classes: list
    utility: np.ndarray  # (C, T)
    utility_at_tau: np.ndarray  # (C,)
    far_at_tau: np.ndarray  # (C,)
    frr_at_tau: np.ndarray  # (C,)
    genuine_pairs: np.ndarray  # (C,)
    impostor_pairs: np.ndarray  # (C,)


def class_histograms(
    embeddings: np.ndarray,
    labels: Sequence[object],
    grid: Grid,
    *,
    block: int = 512,
    stats: CohortStats | None = None,
) -> tuple[list, np.ndarray, np.ndarray]:
    """Per-class genuine and impostor bucket counts over all pairs of one labelled set.

    Class c's genuine pairs: both items in c; its impostor pairs: one item in c, the other not
    (``tcm.consistency_report``'s definition). Returns ``(classes, pos, neg)`` with pair
    counts (each unordered pair once per class it belongs to). O(n^2) time, O(block * n) memory.
    ``stats`` (the rows' AS-norm cohort statistics, :mod:`tcm.asnorm`): bucket the
    AS-normalised scores instead of the cosines, for a grid in those units.
    """
    x = np.asarray(embeddings, np.float32)
    n = len(x)
    classes, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    c, w = len(classes), grid.width
    pos = np.zeros((c, w), np.float64)
    neg = np.zeros((c, w), np.float64)
    if n >= 2:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        for start in range(0, n, block):
            rows = np.arange(start, min(n, start + block))
            sims = np.clip(x[rows] @ x.T, -1.0, 1.0).astype(np.float64)
            if stats is not None:
                sims = as_norm(sims, stats.take(rows), stats).astype(np.float64)
            buckets = np.searchsorted(grid.bounds, sims, side="right")
            same = codes[rows][:, None] == codes[None, :]
            not_self = rows[:, None] != np.arange(n)[None, :]
            flat = codes[rows][:, None] * w + buckets
            pos += np.bincount(flat[same & not_self], minlength=c * w).reshape(c, w)
            neg += np.bincount(flat[~same], minlength=c * w).reshape(c, w)
        pos /= 2.0  # each genuine pair was seen from both of its items
    return list(classes), pos, neg


def curves(
    classes: Sequence[object], pos: np.ndarray, neg: np.ndarray, grid: Grid, rules: Rules = Rules()
) -> Curves:
    """Utility curves of the classes with enough pairs (rows in ``classes`` order)."""
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    keep = (
        (n_pos >= rules.min_genuine_pairs)
        & (n_neg >= rules.min_impostor_pairs)
        & (n_pos > 0)
        & (n_neg > 0)
    )
    pos, neg, n_pos, n_neg = pos[keep], neg[keep], n_pos[keep], n_neg[keep]
    tpr = counts_at_or_above(pos) / n_pos[:, None] if len(pos) else np.zeros((0, len(grid.bounds)))
    tnr = 1.0 - counts_at_or_above(neg) / n_neg[:, None] if len(neg) else tpr
    u_all = utility(tpr, tnr, grid.beta)
    return Curves(
        classes=[k for k, ok in zip(classes, keep, strict=True) if ok],
        utility=u_all[:, grid.grid_cols],
        utility_at_tau=u_all[:, grid.tau_col],
        far_at_tau=1.0 - tnr[:, grid.tau_col],
        frr_at_tau=1.0 - tpr[:, grid.tau_col],
        genuine_pairs=n_pos,
        impostor_pairs=n_neg,
    )


def opis_of(u: np.ndarray) -> float:
    """OPIS of utility curves (C, T), classes weighted alike."""
    ubar = u.mean(axis=0)
    return float(range_average((u - ubar) ** 2).mean())


def eps_opis_of(u: np.ndarray, eps: float) -> float:
    """eps-OPIS: squared gap between the best and the worst eps share of the curves."""
    n = max(1, math.ceil(eps * len(u)))
    order = np.argsort(range_average(u), kind="stable")
    gap = u[order[-n:]].mean(axis=0) - u[order[:n]].mean(axis=0)
    return float(range_average(gap**2))


def others_median(u: np.ndarray) -> np.ndarray:
    """For each curve i of ``u`` (G, T), the pointwise median of the OTHER curves (G-1 of
    them): sorted once per grid point, O(G T log G). Needs G >= 2."""
    u = np.asarray(u, np.float64)
    g = len(u)
    if g < 2:
        raise ValueError("the median of the other curves needs at least 2 curves")
    order = np.argsort(u, axis=0, kind="stable")
    s = np.take_along_axis(u, order, axis=0)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(g)[:, None], u.shape), axis=0)
    m = g - 1  # how many others

    def kth_other(k: int) -> np.ndarray:  # the k-th smallest of the others, per curve
        return np.take_along_axis(s, np.where(k < rank, k, k + 1), axis=0)

    return 0.5 * (kth_other((m - 1) // 2) + kth_other(m // 2))


def shortfalls(u: np.ndarray) -> np.ndarray:
    """How far each group (a tenant) falls short of the others: the mean square, over the
    range, of how far its utility curve lies BELOW the pointwise median of the other groups'
    curves (:func:`others_median`; points where it lies above count 0).

    One-sided, because a tenant better than the fleet needs no action; leave-one-out, because a
    median that includes the tenant itself is pulled towards it (with 2 tenants the two would
    always sit equally far from their midpoint, and with 3 a bad tenant can be the median).
    With 2 groups each is compared with the other, so only the worse one is above 0. 0 for a
    single group."""
    u = np.asarray(u, np.float64)
    if len(u) < 2:
        return np.zeros(len(u))
    return range_average(np.maximum(others_median(u) - u, 0.0) ** 2)


def bootstrap_interval(
    u: np.ndarray,
    *,
    resamples: int = 1000,
    level: float = 0.9,
    seed: int = 0,
    eps: float | None = None,
) -> tuple[float, float]:
    """Percentile interval of OPIS (or eps-OPIS with ``eps``) over class resamples: classes are
    drawn with replacement and their curves kept as measured (the spread of which classes
    happen to be held out)."""
    if len(u) < 2 or resamples < 1:
        raise ValueError("a class bootstrap needs at least 2 classes and 1 resample")
    rng = np.random.default_rng(seed)
    stat = (lambda v: eps_opis_of(v, eps)) if eps is not None else opis_of
    values = np.array([stat(u[rng.integers(0, len(u), len(u))]) for _ in range(resamples)])
    a = (1.0 - level) / 2.0
    return float(np.quantile(values, a)), float(np.quantile(values, 1.0 - a))


@dataclass(frozen=True)
class Summary:
    """What pooling needs of a group of curves: count, mean curve, sum of squared deviations."""

    n: int
    mean: np.ndarray  # (T,)
    sq: np.ndarray  # (T,) sum over curves of (u - mean)^2
    level: tuple[float, float] | None = None  # a reference draw's (FRR, utility) at tau

    @classmethod
    def of(cls, u: np.ndarray) -> Summary:
        m = u.mean(axis=0) if len(u) else np.zeros(u.shape[1] if u.ndim == 2 else 0)
        return cls(len(u), m, ((u - m) ** 2).sum(axis=0) if len(u) else m.copy())


def pooled_opis(parts: Sequence[Summary]) -> float | None:
    """OPIS over every curve of several groups (each curve weighted alike), from summaries."""
    parts = [p for p in parts if p.n > 0]
    total = sum(p.n for p in parts)
    if total == 0:
        return None
    mean = sum(p.n * p.mean for p in parts) / total
    sq = sum(p.sq + p.n * (p.mean - mean) ** 2 for p in parts)
    return float(range_average(sq / total))


def trimmed_pooled_opis(
    parts: Sequence[Summary], *, min_subjects: int
) -> tuple[float | None, int | None]:
    """Pooled OPIS robust to one group (a tenant): with at least 3 groups of ``min_subjects``
    curves or more, the pooled OPIS with the most influential group left out (the one whose
    removal lowers it most, among those whose removal leaves ``min_subjects`` curves), and
    that group's index in ``parts``; else :func:`pooled_opis` of all of them and None.

    One group of many extreme, inconsistent curves can make the plain pool as large as it
    likes; left out, it moves nothing. Drift shared by every group survives any one left out.
    Deterministic (no sampling), O(groups x grid)."""
    live = [i for i, p in enumerate(parts) if p.n > 0]
    if sum(1 for i in live if parts[i].n >= min_subjects) < 3:
        return pooled_opis(parts), None
    n = np.array([parts[i].n for i in live], np.float64)
    means = np.stack([parts[i].mean for i in live])
    sq = np.stack([parts[i].sq for i in live])
    s1 = n[:, None] * means  # (G, T) per-group sums of curves
    s2 = sq + n[:, None] * means**2  # (G, T) per-group sums of squared curves
    rest_n = n.sum() - n
    ok = rest_n >= max(1, min_subjects)
    if not ok.any():
        return pooled_opis(parts), None
    rest_n = np.where(ok, rest_n, 1.0)
    rest_s1, rest_s2 = s1.sum(axis=0) - s1, s2.sum(axis=0) - s2
    rest_var = np.maximum(rest_s2 / rest_n[:, None] - (rest_s1 / rest_n[:, None]) ** 2, 0.0)
    values = np.where(ok, range_average(rest_var), np.inf)
    k = int(np.argmin(values))
    return float(values[k]), live[k]


def matched_draw(
    ref_x: np.ndarray,
    ref_codes: np.ndarray,
    counts: Sequence[int],
    grid: Grid,
    rules: Rules,
    rng: np.random.Generator,
) -> np.ndarray:
    """One reference gallery shaped like a live one: as many held-out classes as the live
    gallery has subjects (at most all of them, without replacement), each subsampled to a live
    subject's image count; returns its eligible utility curves (same rules as live)."""
    classes, pos, neg = _matched_histograms(ref_x, ref_codes, counts, grid, rng)
    return curves(classes, pos, neg, grid, rules).utility


def _matched_histograms(
    ref_x: np.ndarray,
    ref_codes: np.ndarray,
    counts: Sequence[int],
    grid: Grid,
    rng: np.random.Generator,
    stats: CohortStats | None = None,
) -> tuple[list, np.ndarray, np.ndarray]:
    n_classes = int(ref_codes.max()) + 1 if len(ref_codes) else 0
    counts = np.asarray(counts, int)
    if len(counts) > n_classes:
        counts = rng.choice(counts, size=n_classes, replace=False)
    chosen = rng.permutation(n_classes)[: len(counts)]
    idx: list[np.ndarray] = []
    for cls, k in zip(chosen, rng.permutation(counts), strict=True):
        members = np.flatnonzero(ref_codes == cls)
        idx.append(rng.choice(members, size=min(int(k), len(members)), replace=False))
    take = np.concatenate(idx) if idx else np.zeros(0, int)
    sub = None if stats is None else stats.take(take)
    return class_histograms(ref_x[take], ref_codes[take], grid, stats=sub)


def level_at_tau(pos: np.ndarray, neg: np.ndarray, grid: Grid) -> tuple[float, float] | None:
    """A gallery's FRR and utility at tau over all its pairs, from per-class histograms
    (:func:`class_histograms`: an impostor pair is counted once per class, twice in all, which
    leaves its rates unchanged); None without genuine or impostor pairs."""
    g, i = pos.sum(axis=0), neg.sum(axis=0)
    if g.sum() == 0 or i.sum() == 0:
        return None
    tpr = counts_at_or_above(g[None])[0] / g.sum()
    tnr = 1.0 - counts_at_or_above(i[None])[0] / i.sum()
    u = utility(tpr, tnr, grid.beta)
    return float(1.0 - tpr[grid.tau_col]), float(u[grid.tau_col])


def matched_reference(
    ref_x: np.ndarray,
    ref_labels: np.ndarray,
    counts: Sequence[int],
    grid: Grid,
    rules: Rules,
    *,
    draws: int,
    seed: int,
    stats: CohortStats | None = None,
) -> list[Summary]:
    """``draws`` count-matched reference galleries (:func:`matched_draw`), summarised (a draw
    with fewer eligible classes than ``rules.min_subjects`` has no OPIS of its own, but pools),
    each with its FRR and utility at tau over all its pairs (:func:`level_at_tau`).
    ``stats``: the reference rows' AS-norm statistics (AS-normalised scores, as served)."""
    _, codes = np.unique(np.asarray(ref_labels), return_inverse=True)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        classes, pos, neg = _matched_histograms(ref_x, codes, counts, grid, rng, stats)
        summary = Summary.of(curves(classes, pos, neg, grid, rules).utility)
        out.append(dataclasses.replace(summary, level=level_at_tau(pos, neg, grid)))
    return out
