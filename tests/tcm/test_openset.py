"""FPIR / FNIR at a gallery size (tcm.openset): a hand-computed case and brute force over
every probe's full impostor list."""

from __future__ import annotations

import numpy as np
import pytest

from tcm.openset import (
    ProbeTails,
    fnir,
    fpir,
    fpir_from_pair_far,
    probe_tails,
    tau_at_fpir,
)
from tests.tcm.reference import clustered, cosine_matrix


def test_hand_computed_two_probes() -> None:
    # probe 0: 4 impostors, 2 at or above 0.5; probe 1: 2 impostors, none; mates 0.9 and 0.4
    tails = ProbeTails(
        top=np.array([[0.8, 0.5, 0.2], [0.3, 0.1, -np.inf]]),
        impostors=np.array([4, 2]),
        mate=np.array([0.9, 0.4]),
    )
    # p = (2/4, 0): FPIR(N=1) = (0.5 + 0) / 2; N=2: (1 - 0.25) / 2
    assert fpir(tails, 0.5, 1) == pytest.approx(0.25)
    assert fpir(tails, 0.5, 2) == pytest.approx(0.375)
    # FNIR at 0.5, N=1: probe 0's mate 0.9 clears tau, no impostor above it -> hit;
    # probe 1's mate 0.4 < 0.5 -> miss: 1 - 1/2
    assert fnir(tails, 0.5, 1) == pytest.approx(0.5)
    # at tau 0.35: probe 1's mate clears it, 1 of its 2 impostors (0.3? no: 0.3 < 0.4) above:
    # none above 0.4 -> hit; FNIR 0
    assert fnir(tails, 0.35, 10) == pytest.approx(0.0)
    assert fpir_from_pair_far(0.01, 100) == pytest.approx(1 - 0.99**100)


def _brute(x: np.ndarray, y: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Each probe's full impostor score list and best mate (NaN: none)."""
    s = cosine_matrix(x)
    imps, mates = [], []
    for i in range(len(y)):
        imps.append(s[i, y != y[i]])
        same = (y == y[i]) & (np.arange(len(y)) != i)
        mates.append(s[i, same].max() if same.any() else np.nan)
    return imps, np.array(mates)


@pytest.mark.parametrize("seed", range(3))
def test_matches_brute_force(seed: int) -> None:
    x, labels = clustered(seed, num_classes=7, per_class=6)
    y = np.asarray(labels)
    x = np.vstack([x, x[:1] * -1.0])  # one probe whose class has no other image
    y = np.append(y, 99)
    tails = probe_tails(x, y, k=12, block_size=5)
    imps, mates = _brute(x, y)
    checked = 0
    assert np.allclose(tails.mate, mates, equal_nan=True)
    assert list(tails.impostors) == [len(i) for i in imps]
    for tau in np.quantile(np.concatenate(imps), [0.9, 0.97, 0.995]):
        for n in (1, 10, 1000):
            if not tails.resolved(tau):
                continue
            want = np.mean([1 - (1 - np.mean(i >= tau)) ** n for i in imps])
            assert fpir(tails, tau, n) == pytest.approx(want, abs=1e-12)
            hits = [
                (m >= tau) * (1 - np.mean(i > m)) ** n
                for i, m in zip(imps, mates, strict=True)
                if not np.isnan(m)
            ]
            assert fnir(tails, tau, n) == pytest.approx(1 - np.mean(hits), abs=1e-12)
            checked += 1
    assert checked >= 6  # the tail thresholds are resolved by 12 kept scores


def test_tau_at_fpir_is_the_smallest_that_meets_the_target() -> None:
    x, labels = clustered(5, num_classes=10, per_class=8)
    tails = probe_tails(x, labels, k=40)
    for target, n in ((0.05, 10), (0.2, 100), (0.01, 1)):
        tau = tau_at_fpir(tails, target, n)
        assert fpir(tails, tau, n) <= target
        below = tails.top[tails.top < tau]
        if below.size:  # the next lower kept score breaks the target
            assert fpir(tails, below.max(), n) > target
    # FPIR grows with the gallery: a larger N needs a higher tau
    assert tau_at_fpir(tails, 0.05, 100) >= tau_at_fpir(tails, 0.05, 10)


def test_bad_inputs_are_clear_errors() -> None:
    x, labels = clustered(1, num_classes=4, per_class=5)
    tails = probe_tails(x, labels, k=2)
    with pytest.raises(ValueError, match="keep more"):
        tau_at_fpir(tails, 0.5, 1000)  # needs more than 2 scores per probe
    with pytest.raises(ValueError, match="target_fpir"):
        tau_at_fpir(tails, 1.5, 10)
    with pytest.raises(ValueError, match="gallery size"):
        fpir(tails, 0.5, 0)
    with pytest.raises(ValueError, match="two classes"):
        probe_tails(x[:5], [0] * 5)
