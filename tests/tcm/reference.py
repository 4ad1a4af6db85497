"""Brute-force references, written as plainly as possible: Python loops over classes and pairs.

They are the oracles for the fast blockwise code in ``tcm``; slow by design, small sets only.
"""

from __future__ import annotations

import math

import numpy as np


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def threshold_at_far(neg_scores: list[float], far: float) -> float:
    """Smallest tau (in float64) with #(s >= tau) / n <= far, found by scanning candidates."""
    s = sorted(neg_scores)
    n = len(s)
    best = None
    # FAR only changes at score values; candidates are every score and just above each score.
    candidates = sorted(set(s) | {math.nextafter(v, math.inf) for v in s})
    for t in candidates:
        accepted = sum(1 for v in s if v >= t)
        if accepted / n <= far * (1 + 1e-12):
            best = t
            break
    return best if best is not None else -1.0


def opis_bruteforce(
    x: np.ndarray,
    labels: list,
    *,
    tau_range=None,
    far_range=(1e-3, 1e-1),
    num_thresholds: int = 101,
    beta: float = 1.0,
    eps: float = 0.05,
    weights: dict | None = None,
) -> dict:
    """``weights``: class -> weight (normalised to sum 1 here); uniform when None."""
    sim = cosine_matrix(x)
    n = len(labels)
    classes = sorted(set(labels))
    all_neg = []
    for i in range(n):
        for j in range(i + 1, n):
            if labels[i] != labels[j]:
                all_neg.append(sim[i, j])
    if tau_range is None:
        lo = threshold_at_far(all_neg, far_range[1])
        hi = threshold_at_far(all_neg, far_range[0])
    else:
        lo, hi = tau_range
    grid = (
        [lo + (hi - lo) * t / (num_thresholds - 1) for t in range(num_thresholds)]
        if num_thresholds > 1
        else [lo]
    )
    grid = list(np.linspace(lo, hi, num_thresholds))
    curves = {}
    for k in classes:
        members = [i for i in range(n) if labels[i] == k]
        if len(members) < 2:
            continue
        pos, neg = [], []
        for i in range(n):
            for j in range(i + 1, n):
                if labels[i] == k and labels[j] == k:
                    pos.append(sim[i, j])
                elif (labels[i] == k) != (labels[j] == k):
                    neg.append(sim[i, j])
        curve = []
        for t in grid:
            tpr = sum(1 for s in pos if s >= t) / len(pos)
            tnr = sum(1 for s in neg if s < t) / len(neg)
            den = beta**2 * tnr + tpr
            curve.append((1 + beta**2) * tpr * tnr / den if den > 0 else 0.0)
        curves[k] = curve

    def avg(f):
        if len(f) == 1:
            return f[0]
        width = len(f) - 1
        return sum((f[i] + f[i + 1]) / 2 for i in range(width)) / width

    ks = list(curves)
    c = len(ks)
    raw = {k: (1.0 if weights is None else float(weights[k])) for k in ks}
    w = {k: raw[k] / sum(raw.values()) for k in ks}
    ubar = [sum(w[k] * curves[k][t] for k in ks) for t in range(len(grid))]
    opis = sum(w[k] * avg([(curves[k][t] - ubar[t]) ** 2 for t in range(len(grid))]) for k in ks)
    means = {k: avg(curves[k]) for k in ks}
    ranked = sorted(ks, key=lambda k: means[k])
    m = max(1, math.ceil(eps * c))
    top, bot = ranked[-m:], ranked[:m]
    gap = [
        sum(curves[k][t] for k in top) / m - sum(curves[k][t] for k in bot) / m
        for t in range(len(grid))
    ]
    return {
        "opis": opis,
        "eps_opis": avg([g * g for g in gap]),
        "tau_lo": lo,
        "tau_hi": hi,
        "curves": curves,
        "mean_utility": means,
    }


def clustered(
    seed: int,
    num_classes: int = 8,
    per_class: int = 6,
    dim: int = 8,
    spread: float = 0.8,
    sizes: list[int] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Random clustered data with per-class spread varying, so classes differ in utility."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [per_class] * num_classes
    xs, ys = [], []
    for k, size in enumerate(sizes):
        center = rng.normal(size=dim)
        scale = spread * rng.uniform(0.5, 1.5)
        xs.append(center + scale * rng.normal(size=(size, dim)))
        ys += [k] * size
    return np.concatenate(xs), ys
