"""OPIS and eps-OPIS: how much the utility-vs-threshold curve differs between classes.

Definitions are in ``docs/spec.md`` ("One class's utility curve", "The calibration range and
its grid", "OPIS and ε-OPIS"). Two entry points share one back end: :func:`consistency_report`
for a labelled embedding set (all pairs, streamed blockwise) and :func:`consistency_from_scores`
for labelled scores per group (the service's tenants).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tcm._pairs import (
    DEFAULT_BLOCK,
    as_tensor,
    counts_at_or_above,
    pair_tables,
    prepare,
    tau_from_descending,
    taus_at_far,
)


@dataclass(frozen=True)
class AtThreshold:
    """Per-class error rates at one threshold (the global tau)."""

    tau: float
    far: np.ndarray  # (C,)
    frr: np.ndarray  # (C,)
    utility: np.ndarray  # (C,)
    global_far: float
    global_frr: float


@dataclass(frozen=True)
class ConsistencyReport:
    opis: float
    eps_opis: float
    tau_lo: float
    tau_hi: float
    thresholds: np.ndarray  # (T,)
    classes: list  # eligible classes (or groups), in row order
    utility: np.ndarray  # (C, T)
    tpr: np.ndarray  # (C, T)
    tnr: np.ndarray  # (C, T)
    mean_utility: np.ndarray  # (C,) trapezoid average over the range
    num_positive: np.ndarray  # (C,) genuine pairs per class
    num_negative: np.ndarray  # (C,) impostor pairs per class
    excluded_classes: list = field(default_factory=list)
    far_range: tuple[float, float] | None = None  # None when tau_range was given
    num_thresholds: int = 101
    beta: float = 1.0
    eps: float = 0.05
    at_tau: AtThreshold | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (curves included)."""
        d: dict[str, Any] = {
            "opis": self.opis,
            "eps_opis": self.eps_opis,
            "tau_lo": self.tau_lo,
            "tau_hi": self.tau_hi,
            "far_range": list(self.far_range) if self.far_range else None,
            "num_thresholds": self.num_thresholds,
            "beta": self.beta,
            "eps": self.eps,
            "num_classes": len(self.classes),
            "num_excluded_classes": len(self.excluded_classes),
            "classes": [_jsonable(c) for c in self.classes],
            "thresholds": self.thresholds.tolist(),
            "mean_utility": self.mean_utility.tolist(),
            "num_positive": self.num_positive.tolist(),
            "num_negative": self.num_negative.tolist(),
            "utility": self.utility.tolist(),
        }
        if self.at_tau is not None:
            a = self.at_tau
            d["at_tau"] = {
                "tau": a.tau,
                "far": a.far.tolist(),
                "frr": a.frr.tolist(),
                "utility": a.utility.tolist(),
                "global_far": a.global_far,
                "global_frr": a.global_frr,
            }
        return d


def _jsonable(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v


def utility(tpr: np.ndarray, tnr: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """F-beta combination of TPR (as recall) and TNR; 0 where the denominator is 0."""
    b2 = beta * beta
    den = b2 * tnr + tpr
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (1 + b2) * tpr * tnr / den
    return np.where(den > 0, u, 0.0)


def range_average(curves: np.ndarray) -> np.ndarray:
    """Trapezoid rule over an evenly spaced grid, divided by the range's width."""
    t = curves.shape[-1]
    if t == 1:
        return curves[..., 0]
    return (curves.sum(axis=-1) - 0.5 * (curves[..., 0] + curves[..., -1])) / (t - 1)


def _validate_params(
    far_range: Sequence[float],
    num_thresholds: int,
    beta: float,
    eps: float,
    tau_range: Sequence[float] | None,
) -> None:
    lo, hi = (float(x) for x in far_range)
    if not (0.0 < lo < hi < 1.0):
        raise ValueError(f"far_range must satisfy 0 < far_lo < far_hi < 1, got {far_range}")
    if int(num_thresholds) < 1:
        raise ValueError(f"num_thresholds must be >= 1, got {num_thresholds}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive number, got {beta}")
    if not (0.0 < eps <= 0.5):
        raise ValueError(f"eps must lie in (0, 0.5], got {eps}")
    if tau_range is not None:
        if len(tau_range) != 2:
            raise ValueError("tau_range must be (tau_lo, tau_hi)")
        t_lo, t_hi = (float(x) for x in tau_range)
        if not (math.isfinite(t_lo) and math.isfinite(t_hi) and t_lo <= t_hi):
            raise ValueError(f"tau_range must be finite with tau_lo <= tau_hi, got {tau_range}")


def _weights(weights: object, classes: list) -> np.ndarray:
    c = len(classes)
    if weights is None:
        return np.full(c, 1.0 / c)
    if isinstance(weights, Mapping):
        missing = [k for k in classes if k not in weights]
        if missing:
            raise ValueError(f"weights has no entry for classes {missing[:5]}")
        w = np.array([float(weights[k]) for k in classes])
    else:
        w = np.asarray(weights, dtype=float).reshape(-1)
        if w.shape[0] != c:
            raise ValueError(f"weights must have one value per eligible class ({c}), got {len(w)}")
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def _build_report(
    pos_hist: np.ndarray,
    neg_hist: np.ndarray,
    neg_global: np.ndarray,
    bounds: np.ndarray,
    grid_cols: np.ndarray,
    tau_col: int | None,
    classes: list,
    excluded: list,
    *,
    tau_lo: float,
    tau_hi: float,
    far_range: tuple[float, float] | None,
    num_thresholds: int,
    beta: float,
    eps: float,
    weights: object,
    tau: float | None,
) -> ConsistencyReport:
    n_pos = pos_hist.sum(axis=1)
    n_neg = neg_hist.sum(axis=1)
    if len(classes) < 2:
        raise ValueError(
            f"need at least 2 eligible classes (with >= 2 samples, or with both genuine and "
            f"impostor scores); got {len(classes)} ({len(excluded)} excluded)"
        )
    pos_ge = counts_at_or_above(pos_hist).astype(float)
    neg_ge = counts_at_or_above(neg_hist).astype(float)
    tpr_all = pos_ge / n_pos[:, None]
    tnr_all = 1.0 - neg_ge / n_neg[:, None]
    tpr, tnr = tpr_all[:, grid_cols], tnr_all[:, grid_cols]
    u = utility(tpr, tnr, beta)
    w = _weights(weights, classes)
    ubar = w @ u
    opis_value = float(w @ range_average((u - ubar) ** 2))
    mean_u = range_average(u)
    n = max(1, math.ceil(eps * len(classes)))
    order = np.argsort(mean_u, kind="stable")
    gap = u[order[-n:]].mean(axis=0) - u[order[:n]].mean(axis=0)
    eps_value = float(range_average(gap**2))
    at = None
    if tau_col is not None and tau is not None:
        frr = 1.0 - tpr_all[:, tau_col]
        far = 1.0 - tnr_all[:, tau_col]
        glob_neg = counts_at_or_above(neg_global)[tau_col] / max(1, neg_global.sum())
        glob_pos = counts_at_or_above(pos_hist.sum(axis=0))[tau_col] / max(1, n_pos.sum())
        at = AtThreshold(
            tau=float(tau),
            far=far,
            frr=frr,
            utility=utility(tpr_all[:, tau_col], tnr_all[:, tau_col], beta),
            global_far=float(glob_neg),
            global_frr=float(1.0 - glob_pos),
        )
    return ConsistencyReport(
        opis=opis_value,
        eps_opis=eps_value,
        tau_lo=float(tau_lo),
        tau_hi=float(tau_hi),
        thresholds=bounds[grid_cols].astype(float),
        classes=classes,
        utility=u,
        tpr=tpr,
        tnr=tnr,
        mean_utility=mean_u,
        num_positive=n_pos,
        num_negative=n_neg,
        excluded_classes=excluded,
        far_range=far_range,
        num_thresholds=num_thresholds,
        beta=beta,
        eps=eps,
        at_tau=at,
    )


def _bounds(
    tau_lo: float,
    tau_hi: float,
    num_thresholds: int,
    tau: float | None,
) -> tuple[np.ndarray, np.ndarray, int | None]:
    grid = np.linspace(tau_lo, tau_hi, int(num_thresholds))
    if tau is None:
        return grid, np.arange(len(grid)), None
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    bounds = np.concatenate([grid, [float(tau)]])
    order = np.argsort(bounds, kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return bounds[order], inverse[:-1], int(inverse[-1])


def consistency_report(
    embeddings: object,
    labels: object,
    *,
    tau_range: Sequence[float] | None = None,
    far_range: Sequence[float] = (1e-3, 1e-1),
    num_thresholds: int = 101,
    beta: float = 1.0,
    weights: object = None,
    eps: float = 0.05,
    tau: float | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> ConsistencyReport:
    """OPIS, eps-OPIS and the per-class utility curves of a labelled embedding set.

    ``tau_range`` given: use it (live monitoring, comparisons between models); otherwise the range
    is where the global FAR lies in ``far_range``. ``tau`` adds per-class FAR/FRR at that
    threshold. Classes with fewer than 2 samples are excluded (listed in ``excluded_classes``) but
    their samples still count as impostors for the other classes.
    """
    _validate_params(far_range, num_thresholds, beta, eps, tau_range)
    ps = prepare(embeddings, labels)
    if tau_range is None:
        lo_far, hi_far = far_range
        tau_lo, tau_hi = taus_at_far(ps, [hi_far, lo_far], block_size)
        used_far: tuple[float, float] | None = (float(lo_far), float(hi_far))
    else:
        tau_lo, tau_hi = (float(x) for x in tau_range)
        used_far = None
    bounds, grid_cols, tau_col = _bounds(tau_lo, tau_hi, num_thresholds, tau)
    tables = pair_tables(ps, bounds, block_size)
    eligible = np.flatnonzero(ps.class_sizes >= 2)
    excluded = [ps.class_values[i] for i in np.flatnonzero(ps.class_sizes < 2)]
    return _build_report(
        tables.pos[eligible],
        tables.neg[eligible],
        tables.neg_global,
        bounds,
        grid_cols,
        tau_col,
        [ps.class_values[i] for i in eligible],
        excluded,
        tau_lo=tau_lo,
        tau_hi=tau_hi,
        far_range=used_far,
        num_thresholds=int(num_thresholds),
        beta=float(beta),
        eps=float(eps),
        weights=weights,
        tau=tau,
    )


def _scores(x: object, name: str) -> torch.Tensor:
    t = as_tensor(x, name).reshape(-1).to(torch.float64).cpu()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def consistency_from_scores(
    genuine: Mapping[object, object],
    impostor: Mapping[object, object],
    *,
    tau_range: Sequence[float] | None = None,
    far_range: Sequence[float] = (1e-3, 1e-1),
    num_thresholds: int = 101,
    beta: float = 1.0,
    weights: object = None,
    eps: float = 0.05,
    tau: float | None = None,
) -> ConsistencyReport:
    """The same report from labelled scores per group (e.g. per tenant): ``genuine[g]`` are the
    scores of same-identity pairs of group g, ``impostor[g]`` those of different-identity pairs.
    Groups lacking either kind are excluded. Without ``tau_range`` the range comes from the
    pooled impostor scores."""
    _validate_params(far_range, num_thresholds, beta, eps, tau_range)
    groups = list(dict.fromkeys([*genuine.keys(), *impostor.keys()]))
    gen = {g: _scores(genuine.get(g, ()), f"genuine[{g!r}]") for g in groups}
    imp = {g: _scores(impostor.get(g, ()), f"impostor[{g!r}]") for g in groups}
    eligible = [g for g in groups if gen[g].numel() > 0 and imp[g].numel() > 0]
    excluded = [g for g in groups if g not in eligible]
    if tau_range is None:
        pooled = torch.cat([imp[g] for g in groups] or [torch.zeros(0, dtype=torch.float64)])
        if pooled.numel() == 0:
            raise ValueError("no impostor scores: cannot find the calibration range")
        desc = torch.sort(pooled, descending=True).values
        lo_far, hi_far = far_range
        tau_lo, tau_hi = tau_from_descending(desc, hi_far), tau_from_descending(desc, lo_far)
        used_far: tuple[float, float] | None = (float(lo_far), float(hi_far))
    else:
        tau_lo, tau_hi = (float(x) for x in tau_range)
        used_far = None
    bounds, grid_cols, tau_col = _bounds(tau_lo, tau_hi, num_thresholds, tau)
    b = torch.as_tensor(bounds, dtype=torch.float64)
    m1 = len(bounds) + 1

    def hist(x: torch.Tensor) -> np.ndarray:
        return torch.bincount(torch.bucketize(x, b, right=True), minlength=m1).numpy()

    pos = np.stack([hist(gen[g]) for g in eligible]) if eligible else np.zeros((0, m1), np.int64)
    neg = np.stack([hist(imp[g]) for g in eligible]) if eligible else np.zeros((0, m1), np.int64)
    return _build_report(
        pos,
        neg,
        neg.sum(axis=0),
        bounds,
        grid_cols,
        tau_col,
        eligible,
        excluded,
        tau_lo=tau_lo,
        tau_hi=tau_hi,
        far_range=used_far,
        num_thresholds=int(num_thresholds),
        beta=float(beta),
        eps=float(eps),
        weights=weights,
        tau=tau,
    )


def opis(embeddings: object, labels: object, **kwargs: Any) -> float:
    """OPIS of a labelled embedding set; keyword arguments as :func:`consistency_report`."""
    return consistency_report(embeddings, labels, **kwargs).opis


def eps_opis(embeddings: object, labels: object, *, eps: float = 0.05, **kwargs: Any) -> float:
    """eps-OPIS of a labelled embedding set; keyword arguments as :func:`consistency_report`."""
    return consistency_report(embeddings, labels, eps=eps, **kwargs).eps_opis
