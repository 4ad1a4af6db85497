"""Adaptive symmetric score normalisation (AS-norm), as speaker verification uses it.

A raw cosine ``s(e, p)`` between an enrolled item ``e`` and a probe ``p`` is standardised by how
each side scores against a **cohort**: embeddings of identities disjoint from every gallery (for
an artefact, its training classes). Each side keeps only its ``k`` highest cohort scores (the
"adaptive" part: the impostors that resemble it), whose mean and standard deviation describe how
high that side's impostor scores run:

    AS(e, p) = 1/2 [ (s - mu_e) / sigma_e  +  (s - mu_p) / sigma_p ]

so a class whose impostors score high (a red bird among red birds) needs a higher raw cosine to
be accepted, and one whose impostors score low is accepted sooner: one threshold on ``AS`` means
more nearly the same FAR for every class (Matejka et al., Interspeech 2017; Cumani et al. 2011).

The score is a sum of z-scores, not a cosine: it is unbounded and its threshold is calibrated on
normalised scores like any other. Ranking is left to the raw cosine by the caller (AS-norm
reorders candidates, which costs rank-1 accuracy); the decision uses the normalised score.

Numpy only: the service applies it next to FAISS, training on held-out embeddings. Pure
functions; blockwise over the rows so memory stays at ``block x cohort`` floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The spread is floored here so a side whose top-k cohort scores are all equal (a duplicate
#: cohort, k = 1) gives a finite score instead of a division by zero.
MIN_SPREAD = 1e-6

_BLOCK = 1024


@dataclass(frozen=True)
class CohortStats:
    """Per row: the mean and (population) standard deviation of its ``k`` highest cohort
    scores, floored at :data:`MIN_SPREAD`."""

    mean: np.ndarray  # (n,) float32
    std: np.ndarray  # (n,) float32

    def __post_init__(self) -> None:
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError("mean and std must be 1-D and of one length")

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def take(self, rows: np.ndarray) -> CohortStats:
        """The statistics of the given rows, in that order."""
        return CohortStats(self.mean[rows], self.std[rows])


def _unit(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (rows, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what} holds an all-zero row, which has no direction")
    return x / norms


def validate_cohort(cohort: np.ndarray, dim: int, k: int) -> np.ndarray:
    """Return the cohort as unit-norm float32 rows, or raise one line saying what is wrong."""
    c = _unit(cohort, "the cohort")
    if c.shape[1] != dim:
        raise ValueError(f"the cohort's embeddings have dimension {c.shape[1]}, the model's {dim}")
    if not 1 <= k <= c.shape[0]:
        raise ValueError(
            f"AS-norm's top-k must be in [1, {c.shape[0]}] (the cohort's size), got {k}"
        )
    return c


def cohort_stats(embeddings: np.ndarray, cohort: np.ndarray, k: int) -> CohortStats:
    """Mean and spread of each row's ``k`` highest cosine scores against the cohort.

    Rows and cohort are L2-normalised here, so raw embeddings may be passed."""
    e = _unit(embeddings, "the embeddings")
    c = validate_cohort(cohort, e.shape[1], k)
    return _unit_stats(e, c.astype(np.float64), k)


def _unit_stats(e: np.ndarray, c64: np.ndarray, k: int) -> CohortStats:
    """:func:`cohort_stats` of unit rows against a unit float64 cohort.

    The scores, their mean and spread are computed in float64 and only the results rounded to
    float32, so that a row's statistics do not depend on the rows it is computed with: a
    float32 matrix product of one row and of a block that holds it differ in the last bits
    (BLAS picks other kernels), and the service computes an item's statistics alone at
    enrolment and in blocks at start-up. In float64 they differ by ~1e-16, which rounds to the
    same float32 except at a rounding tie (about 1e-9 per number). float64 also keeps the
    spread exact where it is tiny next to the scores (top-k scores of 0.99 +- 1e-4: float32
    scores would leave the spread ~1e-3 off)."""
    mean = np.empty(e.shape[0], dtype=np.float32)
    std = np.empty(e.shape[0], dtype=np.float32)
    for start in range(0, e.shape[0], _BLOCK):
        s = e[start : start + _BLOCK].astype(np.float64) @ c64.T  # (b, C)
        top = np.partition(s, s.shape[1] - k, axis=1)[:, -k:] if k < s.shape[1] else s
        mean[start : start + _BLOCK] = top.mean(axis=1)
        std[start : start + _BLOCK] = top.std(axis=1)
    return CohortStats(mean, np.maximum(std, MIN_SPREAD).astype(np.float32))


@dataclass(frozen=True)
class Cohort:
    """An artefact's cohort, checked once (unit rows, ``1 <= top_k <= size``), so that the
    service's per-query statistics skip the validation :func:`cohort_stats` does."""

    embeddings: np.ndarray  # (C, d) float64, unit rows
    top_k: int

    @classmethod
    def of(cls, cohort: np.ndarray, *, dim: int, top_k: int) -> Cohort:
        validate_cohort(cohort, dim, top_k)
        # normalised in float64: a float32 norm moves each score by ~1e-7, which is not small
        # next to the spread of a tight cohort's top-k scores (1e-4 for an untrained model)
        c = np.asarray(cohort, dtype=np.float64)
        return cls(c / np.linalg.norm(c, axis=1, keepdims=True), int(top_k))

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def stats(self, unit_rows: np.ndarray) -> CohortStats:
        """Statistics of rows that are already L2-normalised (the service's vectors)."""
        e = np.asarray(unit_rows, dtype=np.float32)
        if e.ndim != 2 or e.shape[1] != self.dim:
            raise ValueError(f"expected (rows, {self.dim}) embeddings, got shape {e.shape}")
        return _unit_stats(e, self.embeddings, self.top_k)


def as_norm_class_scores(
    embeddings: np.ndarray, labels: np.ndarray, cohort: Cohort, *, block: int = 1024
) -> tuple[dict[object, np.ndarray], dict[object, np.ndarray]]:
    """Per class, the AS-normalised scores of its genuine pairs (both items in it) and of its
    impostor pairs (one item in it, the other not: each impostor pair counts for both of its
    classes), as ``tcm.consistency_from_scores`` takes them. Memory: about twice
    :func:`as_norm_pair_scores`'."""
    e = _unit(embeddings, "the embeddings")
    y = np.asarray(labels).reshape(-1)
    if len(y) != len(e):
        raise ValueError(f"{len(y)} labels for {len(e)} embeddings")
    st = cohort.stats(e)
    gen: dict[object, list[np.ndarray]] = {}
    imp: dict[object, list[np.ndarray]] = {}
    for start in range(0, len(e), block):
        rows = slice(start, start + block)
        s = as_norm(e[rows] @ e.T, st.take(np.arange(len(e))[rows]), st)
        i, j = np.triu_indices(s.shape[0], k=start + 1, m=len(e))
        vals, yi, yj = s[i, j], y[rows][i], y[j]
        same = yi == yj
        for c in np.unique(y):
            gen.setdefault(c.item(), []).append(vals[same & (yi == c)])
            imp.setdefault(c.item(), []).append(vals[~same & ((yi == c) | (yj == c))])
    return (
        {c: np.concatenate(v) for c, v in gen.items()},
        {c: np.concatenate(v) for c, v in imp.items()},
    )


def as_norm_pair_scores(
    embeddings: np.ndarray, labels: np.ndarray, cohort: Cohort, *, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """AS-normalised scores of every pair ``i < j`` of a labelled set: (genuine, impostor),
    float32, for calibrating a threshold on normalised scores. Memory: one float32 per pair
    (the set's size squared over two) plus ``block x n`` scores at a time."""
    e = _unit(embeddings, "the embeddings")
    y = np.asarray(labels).reshape(-1)
    if len(y) != len(e):
        raise ValueError(f"{len(y)} labels for {len(e)} embeddings")
    st = cohort.stats(e)
    genuine: list[np.ndarray] = []
    impostor: list[np.ndarray] = []
    for start in range(0, len(e), block):
        rows = slice(start, start + block)
        s = as_norm(e[rows] @ e.T, st.take(np.arange(len(e))[rows]), st)
        i, j = np.triu_indices(s.shape[0], k=start + 1, m=len(e))
        vals = s[i, j]
        same = y[rows][i] == y[j]
        genuine.append(vals[same])
        impostor.append(vals[~same])
    return np.concatenate(genuine), np.concatenate(impostor)


def as_norm(
    scores: np.ndarray,
    left: CohortStats,
    right: CohortStats,
) -> np.ndarray:
    """AS-normalised scores of a ``(len(left), len(right))`` score matrix (or of a vector of
    paired scores when ``left`` and ``right`` have one row per score)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2:
        if s.shape != (len(left), len(right)):
            raise ValueError(
                f"a {s.shape} score matrix needs {s.shape[0]} left"
                f" and {s.shape[1]} right statistics"
            )
        lm, ls = left.mean[:, None], left.std[:, None]
        rm, rs = right.mean[None, :], right.std[None, :]
    elif s.ndim == 1:
        if not len(left) == len(right) == s.shape[0]:
            raise ValueError("paired scores need one left and one right statistic per score")
        lm, ls, rm, rs = left.mean, left.std, right.mean, right.std
    else:
        raise ValueError("scores must be a vector of pairs or a (left, right) matrix")
    out = 0.5 * ((s - lm) / ls + (s - rm) / rs)
    return out.astype(np.float32)
