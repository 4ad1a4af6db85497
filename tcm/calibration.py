"""The global threshold: the smallest tau whose global FAR is at most the target."""

from __future__ import annotations

from dataclasses import dataclass
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
class ThresholdCalibration:
    tau: float  # accept iff score >= tau
    target_far: float
    far: float  # global FAR at tau (<= target_far)
    frr: float
    tar: float  # 1 - frr: TAR@FAR
    num_genuine: int
    num_impostor: int
    classes: list | None = None
    per_class_far: np.ndarray | None = None
    per_class_frr: np.ndarray | None = None

    @property
    def far_spread(self) -> float | None:
        return None if self.per_class_far is None else float(np.ptp(self.per_class_far))

    @property
    def frr_spread(self) -> float | None:
        return None if self.per_class_frr is None else float(np.ptp(self.per_class_frr))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "tau": self.tau,
            "target_far": self.target_far,
            "far": self.far,
            "frr": self.frr,
            "tar": self.tar,
            "num_genuine": self.num_genuine,
            "num_impostor": self.num_impostor,
        }
        if self.per_class_far is not None and self.per_class_frr is not None:
            d["per_class"] = {
                "far_min": float(self.per_class_far.min()),
                "far_max": float(self.per_class_far.max()),
                "far_std": float(self.per_class_far.std()),
                "frr_min": float(self.per_class_frr.min()),
                "frr_max": float(self.per_class_frr.max()),
                "frr_std": float(self.per_class_frr.std()),
                "far_spread": self.far_spread,
                "frr_spread": self.frr_spread,
            }
        return d


def _check_far(target_far: float) -> float:
    target_far = float(target_far)
    if not (0.0 < target_far < 1.0):
        raise ValueError(f"target_far must lie in (0, 1), got {target_far}")
    return target_far


def threshold_at_far(impostor_scores: object, far: float) -> float:
    """Smallest tau with FAR(tau) = share of impostor scores >= tau at most ``far``."""
    far = _check_far(far)
    s = as_tensor(impostor_scores, "impostor_scores").reshape(-1)
    if s.numel() == 0:
        raise ValueError("no impostor scores")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("impostor_scores contain NaN or inf")
    if not s.is_floating_point():
        s = s.double()
    return tau_from_descending(torch.sort(s, descending=True).values, far)


TAIL_PAIRS = 10  # impostor scores at or above tau that make a calibrated tau supported


def impostor_pairs_needed(target_far: float, tail: int = TAIL_PAIRS) -> int:
    """Impostor pairs a tau at ``target_far`` needs to rest on ``tail`` impostor scores at or
    above it (10: the FAR estimate's relative standard error ~ 1/sqrt(10) = 32%); with fewer,
    tau is set by a handful of scores (or by the largest one) and moves from run to run."""
    return int(np.ceil(tail / _check_far(target_far) - 1e-9))


def calibrate_threshold(
    embeddings: object,
    labels: object,
    *,
    target_far: float = 1e-2,
    block_size: int = DEFAULT_BLOCK,
    tau: float | None = None,
) -> ThresholdCalibration:
    """Global tau over all pairs of a labelled set, with FAR/FRR/TAR there and per class.
    ``tau``: measure at that threshold instead of choosing it (an inherited tau)."""
    target_far = _check_far(target_far)
    ps = prepare(embeddings, labels)
    if tau is None:
        (tau,) = taus_at_far(ps, [target_far], block_size)
    elif not np.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    tau = float(tau)
    tables = pair_tables(ps, np.array([tau]), block_size)
    eligible = np.flatnonzero(ps.class_sizes >= 2)
    n_gen = int(tables.pos.sum())
    n_imp = int(tables.neg_global.sum())
    accepted_imp = int(counts_at_or_above(tables.neg_global)[0])
    accepted_gen = int(counts_at_or_above(tables.pos.sum(axis=0))[0])
    pos_k, neg_k = tables.pos[eligible], tables.neg[eligible]
    frr = 1.0 - accepted_gen / n_gen if n_gen else float("nan")
    return ThresholdCalibration(
        tau=tau,
        target_far=target_far,
        far=accepted_imp / n_imp,
        frr=frr,
        tar=1.0 - frr,
        num_genuine=n_gen,
        num_impostor=n_imp,
        classes=[ps.class_values[i] for i in eligible],
        per_class_far=counts_at_or_above(neg_k)[:, 0] / neg_k.sum(axis=1),
        per_class_frr=1.0 - counts_at_or_above(pos_k)[:, 0] / pos_k.sum(axis=1),
    )


def calibrate_threshold_from_scores(
    genuine: object, impostor: object, *, target_far: float = 1e-2
) -> ThresholdCalibration:
    """The same from pooled genuine and impostor scores (no per-class breakdown)."""
    tau = threshold_at_far(impostor, target_far)
    g = as_tensor(genuine, "genuine").reshape(-1).double()
    i = as_tensor(impostor, "impostor").reshape(-1).double()
    if g.numel() == 0:
        raise ValueError("no genuine scores")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("genuine scores contain NaN or inf")
    frr = float((g < tau).double().mean())
    return ThresholdCalibration(
        tau=tau,
        target_far=float(target_far),
        far=float((i >= tau).double().mean()),
        frr=frr,
        tar=1.0 - frr,
        num_genuine=g.numel(),
        num_impostor=i.numel(),
    )
