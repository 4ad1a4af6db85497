"""1:1 verification metrics from labelled pair scores: TAR@FAR, ROC/DET points, k-fold accuracy.

The convention is the rest of the library's: a pair is accepted iff its cosine score ``>= tau``.
``tar_at_far`` uses the exact calibration of :mod:`tcm.calibration` (the smallest tau whose FAR is
at most the target). ``kfold_pair_accuracy`` is the standard LFW protocol: for each fold, the
threshold that maximises accuracy on the other folds is applied to it; the result is the mean and
standard deviation of the per-fold accuracies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tcm.calibration import calibrate_threshold_from_scores


def _scores(x: object, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contain NaN or inf")
    return a


def _pairs(scores: object, same: object) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores, "scores")
    y = np.asarray(same).reshape(-1)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("same must be booleans (or 0/1): is each pair genuine?")
        y = y.astype(bool)
    if len(s) != len(y):
        raise ValueError(f"scores ({len(s)}) and same ({len(y)}) differ in length")
    if len(s) == 0:
        raise ValueError("no pairs")
    return s, y


def tar_at_far(genuine: object, impostor: object, far: float) -> dict[str, float]:
    """True-accept rate at the smallest threshold whose FAR is at most ``far``."""
    cal = calibrate_threshold_from_scores(
        _scores(genuine, "genuine"), _scores(impostor, "impostor"), target_far=far
    )
    return {"target_far": far, "tau": cal.tau, "far": cal.far, "tar": cal.tar}


def roc_points(genuine: object, impostor: object) -> dict[str, np.ndarray]:
    """FAR and FRR at every distinct score used as tau (ascending thresholds): the ROC
    (TAR = 1 - FRR against FAR) and DET curves without any binning."""
    g, i = _scores(genuine, "genuine"), _scores(impostor, "impostor")
    if len(g) == 0 or len(i) == 0:
        raise ValueError("need genuine and impostor scores")
    thresholds = np.unique(np.concatenate([g, i]))
    g_sorted, i_sorted = np.sort(g), np.sort(i)
    # accepted iff s >= t: the share of scores at or above each threshold
    far = 1.0 - np.searchsorted(i_sorted, thresholds, side="left") / len(i)
    frr = np.searchsorted(g_sorted, thresholds, side="left") / len(g)
    return {"thresholds": thresholds, "far": far, "frr": frr}


def best_accuracy_threshold(scores: object, same: object) -> tuple[float, float]:
    """The threshold with the highest pair accuracy, and that accuracy. Candidates: the lowest
    score (accept all), the midpoint between each two neighbouring distinct scores, and one above
    them all (reject all); on ties the lowest wins."""
    s, y = _pairs(scores, same)
    values, inverse = np.unique(s, return_inverse=True)
    gen = np.bincount(inverse, weights=y, minlength=len(values))
    imp = np.bincount(inverse, weights=~y, minlength=len(values))
    gen_at_or_above = gen[::-1].cumsum()[::-1]
    imp_below = np.concatenate([[0.0], imp.cumsum()[:-1]])
    correct = np.concatenate([gen_at_or_above + imp_below, [imp.sum()]])
    # accepting the scores >= values[j] is the same decision for any tau in (values[j-1],
    # values[j]]: take the middle of that gap, which generalises better to unseen pairs
    middles = (values[:-1] + values[1:]) / 2
    candidates = np.concatenate([values[:1], middles, [np.nextafter(values[-1], np.inf)]])
    best = int(np.argmax(correct))
    return float(candidates[best]), float(correct[best] / len(s))


def accuracy_at(scores: object, same: object, tau: float) -> float:
    s, y = _pairs(scores, same)
    return float(((s >= tau) == y).mean())


@dataclass(frozen=True)
class PairAccuracy:
    mean: float
    std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kfold_pair_accuracy(scores: object, same: object, folds: object) -> PairAccuracy:
    """Per fold k: tau chosen on every other fold, accuracy measured on fold k."""
    s, y = _pairs(scores, same)
    f = np.asarray(folds).reshape(-1)
    if len(f) != len(s):
        raise ValueError(f"folds ({len(f)}) and scores ({len(s)}) differ in length")
    ids = np.unique(f)
    if len(ids) < 2:
        raise ValueError("k-fold accuracy needs at least 2 folds")
    accs, taus = [], []
    for k in ids:
        test = f == k
        tau, _ = best_accuracy_threshold(s[~test], y[~test])
        taus.append(tau)
        accs.append(float(((s[test] >= tau) == y[test]).mean()))
    return PairAccuracy(
        mean=float(np.mean(accs)),
        std=float(np.std(accs)),
        fold_accuracies=accs,
        fold_thresholds=taus,
    )
