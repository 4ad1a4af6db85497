"""1:N open-set identification in NIST's terms (FPIR, FNIR at a gallery size) from held-out
classes, so that a threshold can be chosen, and read, for how the service is used: a probe is
compared with every item of a gallery of N photos, not with one.

The evidence is kept per probe (:class:`ProbeTails`): each held-out image, as a probe, against
every other held-out image of another class (its impostors, ``m_i`` of them) keeps its
``k`` highest impostor scores, and its best score against its own class (its mate). A
stranger's gallery is modelled as N draws from that probe's impostors (an unseen tenant's
gallery is other photos of other classes):

* ``FPIR(tau, N) = mean_i [1 - (1 - p_i(tau))^N]``, ``p_i(tau)`` = the share of probe i's
  impostor scores at or above tau. Averaging per probe keeps what a pooled FAR loses: a probe
  that resembles many classes (a Summer Tanager among red birds) fails at every gallery size,
  so FPIR grows slower than ``1 - (1 - FAR)^N`` for a fixed pair FAR, and its worst probes
  dominate.
* ``FNIR(tau, N) = 1 - mean_j [1{s_j >= tau} (1 - q_j(s_j))^N]`` over mated probes, ``s_j``
  the mate score and ``q_j(s)`` the share of probe j's impostors scoring above ``s``: the mate
  must clear tau and rank first among N impostors (rank-1 identification).

Only the top ``k`` impostor scores per probe are kept: ``p_i(tau)`` is exact while at most
``k`` of a probe's scores reach tau, which holds for every tau in the tail a target FPIR
selects (:func:`tau_at_fpir` refuses a target the tails cannot resolve).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tcm._pairs import prepare

DEFAULT_TOP_K = 64


@dataclass(frozen=True)
class ProbeTails:
    """Per probe: its ``k`` highest impostor scores (descending; ``-inf`` pads a probe with
    fewer impostors), its number of impostors, and its best mate score (NaN: no mate)."""

    top: np.ndarray  # (P, k) float
    impostors: np.ndarray  # (P,) int
    mate: np.ndarray  # (P,) float

    def __post_init__(self) -> None:
        if self.top.ndim != 2 or self.top.shape[0] != self.impostors.shape[0]:
            raise ValueError("top must be (probes, k) with one impostor count per probe")
        if self.mate.shape != self.impostors.shape:
            raise ValueError("one mate score per probe")
        if (self.impostors < 1).any():
            raise ValueError("every probe needs at least one impostor")

    @property
    def k(self) -> int:
        return int(self.top.shape[1])

    def exceed(self, tau: float) -> np.ndarray:
        """Per probe, how many impostor scores are at or above ``tau`` (exact while below k)."""
        return (self.top >= tau).sum(axis=1)

    def resolved(self, tau: float) -> bool:
        """Whether every probe's count at ``tau`` is exact (fewer than k of its kept scores
        reach tau, or it kept all of its impostors)."""
        c = self.exceed(tau)
        return bool(((c < self.k) | (self.impostors <= self.k)).all())

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"top": self.top, "impostors": self.impostors, "mate": self.mate}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ProbeTails:
        return cls(
            np.asarray(arrays["top"], np.float64),
            np.asarray(arrays["impostors"], np.int64),
            np.asarray(arrays["mate"], np.float64),
        )


def probe_tails(
    embeddings: object, labels: object, *, k: int = DEFAULT_TOP_K, block_size: int = 1024
) -> ProbeTails:
    """Every image of a labelled held-out set as a probe against all the others, blockwise
    (memory O(block_size x N)): its top ``k`` impostor scores, impostor count, best mate."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ps = prepare(embeddings, labels)
    emb, codes = ps.emb, ps.codes
    n = emb.shape[0]
    sizes = torch.as_tensor(ps.class_sizes, dtype=torch.int64)
    impostors = (n - sizes[codes]).numpy()
    if (impostors < 1).any():
        raise ValueError("need at least two classes: a probe needs impostors")
    kk = min(k, int(impostors.max()))
    tops, mates = [], []
    for start in range(0, n, block_size):
        s = emb[start : start + block_size] @ emb.T  # (b, N)
        same = codes[start : start + block_size, None] == codes[None, :]
        rows = torch.arange(s.shape[0])
        mate = s.masked_fill(~same, -torch.inf)
        mate[rows, rows + start] = -torch.inf  # not against itself
        best = mate.max(dim=1).values
        mates.append(torch.where(torch.isinf(best), torch.nan, best))
        tops.append(torch.topk(s.masked_fill(same, -torch.inf), kk, dim=1).values)
    top = torch.cat(tops).double().numpy()
    return ProbeTails(top, impostors.astype(np.int64), torch.cat(mates).double().numpy())


def _check_n(gallery_size: float) -> float:
    n = float(gallery_size)
    if not (np.isfinite(n) and n >= 1):
        raise ValueError(f"a gallery size must be >= 1, got {gallery_size}")
    return n


def fpir(tails: ProbeTails, tau: float, gallery_size: float) -> float:
    """Expected FPIR at ``tau`` against a gallery of ``gallery_size`` photos (module doc)."""
    n = _check_n(gallery_size)
    p = tails.exceed(tau) / tails.impostors
    return float(np.mean(1.0 - (1.0 - p) ** n))


def fnir(tails: ProbeTails, tau: float, gallery_size: float) -> float:
    """Expected rank-1 FNIR at ``tau`` with ``gallery_size`` impostor photos beside the mate
    (module doc), over the probes that have a mate; NaN when none has."""
    n = _check_n(gallery_size)
    mated = ~np.isnan(tails.mate)
    if not mated.any():
        return float("nan")
    s = tails.mate[mated]
    above = (tails.top[mated] > s[:, None]).sum(axis=1) / tails.impostors[mated]
    hit = (s >= tau) * (1.0 - above) ** n
    return float(1.0 - hit.mean())


def tau_at_fpir(tails: ProbeTails, target_fpir: float, gallery_size: float) -> float:
    """The smallest tau whose expected FPIR at ``gallery_size`` is at most ``target_fpir``
    (FPIR only changes at kept scores: the search runs over them). Raises when the kept
    tails cannot resolve that tau (keep more scores per probe, or hold out more classes)."""
    if not (0.0 < float(target_fpir) < 1.0):
        raise ValueError(f"target_fpir must lie in (0, 1), got {target_fpir}")
    n = _check_n(gallery_size)
    scores = np.unique(tails.top[np.isfinite(tails.top)])  # ascending
    candidates = np.append(scores, np.nextafter(scores[-1], np.inf))
    lo, hi = 0, len(candidates) - 1  # FPIR at candidates[hi] is 0 <= target
    if fpir(tails, candidates[0], n) <= target_fpir:
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fpir(tails, candidates[mid], n) <= target_fpir:
            hi = mid
        else:
            lo = mid
    tau = float(candidates[hi])
    if not tails.resolved(tau):
        raise ValueError(
            f"FPIR {target_fpir:g} at a gallery of {n:g} needs tau {tau:.4f}, where some "
            f"probes have more than the {tails.k} impostor scores kept above it: keep more "
            "(k) or hold out more classes"
        )
    return tau


def fpir_from_pair_far(pair_far: float, gallery_size: float) -> float:
    """What a pooled pair FAR implies under independence, ``1 - (1 - FAR)^N``: the textbook
    compounding, for comparison with :func:`fpir`."""
    return float(1.0 - (1.0 - float(pair_far)) ** _check_n(gallery_size))


__all__ = [
    "DEFAULT_TOP_K",
    "ProbeTails",
    "fnir",
    "fpir",
    "fpir_from_pair_far",
    "probe_tails",
    "tau_at_fpir",
]
