"""A tenant's labelled pairs: scored pairs whose ground truth (genuine or impostor) is known.

Two sources, never mixed up in what is reported about them:

- ``feedback``: a 1:N decision with ground truth is one pair (query, best candidate). Such an
  impostor is the best of N impostors, so its score runs higher than a random impostor pair's;
- ``gallery``: pairs within the tenant's enrolled gallery: same subject = genuine, different
  subjects = impostor. A tenant has a utility curve from these before any feedback arrives.

Everything here is pure and blocking; arrays come back sorted (what-if lookups are binary
searches) in float64.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.metrics import OUTCOMES, Outcome
from service.store.base import Decision
from tcm.asnorm import Cohort, as_norm

KINDS = ("genuine", "impostor")
SOURCES = ("feedback", "gallery")


def _empty() -> np.ndarray:
    return np.zeros(0, np.float64)


@dataclass(frozen=True)
class LabelledScores:
    """One tenant's scored pairs of one source (sorted), and (feedback) its decision outcomes."""

    genuine: np.ndarray = field(default_factory=_empty)
    impostor: np.ndarray = field(default_factory=_empty)
    outcomes: Mapping[Outcome, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @property
    def size(self) -> int:
        return len(self.genuine) + len(self.impostor)


def feedback_scores(
    decisions: Iterable[Decision],
    *,
    model_version: str,
    until: float | None = None,
    max_pairs: int | None = None,
    bounded: bool = True,
) -> LabelledScores:
    """Labelled decisions -> their outcomes (the probe's, as labelled at each decision's own
    threshold) and pairs (query, best candidate).

    Only decisions of ``model_version`` count: another model's scores live on another scale.
    A labelled decision without a candidate (empty gallery) has an outcome but no pair. With
    ``until``, decisions made or labelled later are left out (so that a snapshot's pairs can be
    reloaded exactly); with ``max_pairs`` the most recent pairs of each kind are kept.
    ``bounded``: the scores are cosines, clipped to [-1, 1]; False for AS-normalised scores
    (an artefact with a cohort), which are unbounded and kept as decided.
    """
    genuine: list[float] = []
    impostor: list[float] = []
    outcomes: dict[Outcome, int] = dict.fromkeys(OUTCOMES, 0)
    for d in decisions:
        fb, m = d.feedback, d.match
        if fb is None or m.model_version != model_version:
            continue
        if until is not None and (m.created_at > until or fb.created_at > until):
            continue
        if fb.genuine is not None and m.score is not None:
            (genuine if fb.genuine else impostor).append(float(m.score))
        # the probe's outcome as labelled (1:N confusion matrix), not the pair's: a probe
        # ranked to another subject and rejected is a false reject, its pair an impostor's
        if fb.outcome in outcomes:
            outcomes[fb.outcome] += 1
    g, i = np.asarray(genuine, np.float64), np.asarray(impostor, np.float64)
    if max_pairs is not None:
        g, i = g[-max_pairs:], i[-max_pairs:]
    if bounded:
        g, i = np.clip(g, -1.0, 1.0), np.clip(i, -1.0, 1.0)
    return LabelledScores(np.sort(g), np.sort(i), outcomes)


def seed_for(*parts: str) -> int:
    """A seed every replica derives alike (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:8], "little")


def sample_gallery(
    subjects: Sequence[str], max_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Subject codes of every item, and the rows kept: all of them up to ``max_items``, else
    whole subjects drawn in a seeded order until the budget is filled."""
    n = len(subjects)
    _, codes = np.unique(np.asarray(subjects, dtype=object).astype(str), return_inverse=True)
    idx = np.arange(n)
    if n > max_items:
        # each subject's rows, ascending, from one stable sort: O(n log n) in all, where a scan
        # of every row per subject drawn was O(n) each (quadratic with many small subjects)
        order = np.argsort(codes, kind="stable")
        starts = np.searchsorted(codes[order], np.arange(codes.max() + 2))
        sizes = np.diff(starts)
        smallest = int(sizes.min())
        chosen: list[np.ndarray] = []
        budget = max_items
        for c in rng.permutation(codes.max() + 1):
            members = order[starts[c] : starts[c + 1]]
            if len(members) > budget:
                if budget < 2:
                    if budget < smallest:  # no subject left can fit: nothing more is drawn
                        break
                    continue
                members = rng.choice(members, size=budget, replace=False)
            chosen.append(members)
            budget -= len(members)
            if budget == 0:
                break
        idx = np.sort(np.concatenate(chosen))
    return codes, idx


def gallery_scores(
    subjects: Sequence[str],
    vectors: np.ndarray,
    *,
    max_items: int,
    max_pairs: int,
    seed: int,
    cohort: Cohort | None = None,
) -> LabelledScores:
    """Genuine (same subject) and impostor (different subjects) scores within a gallery.

    Above ``max_items`` items, whole subjects are drawn in a seeded order until the budget is
    filled (drawing single items would break subjects up and starve the genuine pairs); each
    kind is then capped at ``max_pairs`` by a seeded draw. The same gallery and seed give the
    same pairs on every replica. Cost: O(max_items^2 * dim) time, O(max_items^2) memory.
    With ``cohort`` (an artefact's AS-norm cohort) the pairs are scored as the service decides
    them: AS-normalised, with each item's cohort statistics computed from its stored vector
    (the numbers the index keeps for it).
    """
    n = len(subjects)
    if n != len(vectors):
        raise ValueError(f"{n} subjects for {len(vectors)} vectors")
    if n < 2:
        return LabelledScores()
    rng = np.random.default_rng(seed)
    codes, idx = sample_gallery(subjects, max_items, rng)
    x = np.asarray(vectors, dtype=np.float32)[idx]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rows, cols = np.triu_indices(len(idx), k=1)
    scores = np.clip((x @ x.T)[rows, cols].astype(np.float64), -1.0, 1.0)
    if cohort is not None:
        st = cohort.stats(np.asarray(vectors, dtype=np.float32)[idx])
        scores = as_norm(scores, st.take(rows), st.take(cols)).astype(np.float64)
    same = codes[idx][rows] == codes[idx][cols]

    def cap(s: np.ndarray) -> np.ndarray:
        s = s if len(s) <= max_pairs else rng.choice(s, size=max_pairs, replace=False)
        return np.sort(s)

    return LabelledScores(genuine=cap(scores[same]), impostor=cap(scores[~same]))


def pooled(parts: Mapping[str, LabelledScores], kind: str) -> np.ndarray:
    """One kind of pair over all sources (sorted)."""
    arrays = [getattr(p, kind) for p in parts.values()]
    return np.sort(np.concatenate(arrays)) if arrays else _empty()
