import math

import numpy as np
import pytest
import torch

from tcm import (
    calibrate_threshold,
    calibrate_threshold_from_scores,
    impostor_pairs_needed,
    threshold_at_far,
)
from tests.tcm.reference import clustered, cosine_matrix
from tests.tcm.reference import threshold_at_far as threshold_bruteforce

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _pairs(x: np.ndarray, y: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sim = cosine_matrix(x)
    iu = np.triu_indices(len(y), 1)
    yy = np.asarray(y)
    return sim[iu], yy[iu[0]] == yy[iu[1]], iu


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [1e-3, 1e-2, 0.1, 0.37])
def test_smallest_tau_with_far_at_most_target(device: str, seed: int, target: float) -> None:
    x, y = clustered(seed, num_classes=10, per_class=6)
    s, same, _ = _pairs(x, y)
    cal = calibrate_threshold(
        torch.as_tensor(x, device=device), y, target_far=target, block_size=13
    )
    neg = s[~same]
    ref_tau = threshold_bruteforce(neg.tolist(), target)
    # blockwise and full matmuls may round a score differently in the last bit
    assert cal.tau == pytest.approx(ref_tau, abs=1e-12)
    assert np.mean(neg >= ref_tau) <= target
    # any smaller threshold would exceed the target: the next float below accepts one more
    below = math.nextafter(ref_tau, -math.inf)
    assert np.mean(neg >= below) > target
    assert cal.far == pytest.approx(np.mean(neg >= ref_tau))
    assert cal.frr == pytest.approx(np.mean(s[same] < ref_tau))
    assert cal.tar == pytest.approx(1 - cal.frr)
    assert cal.num_impostor == (~same).sum() and cal.num_genuine == same.sum()


def test_per_class_rates_and_spread() -> None:
    x, y = clustered(9, num_classes=6, per_class=5)
    s, same, iu = _pairs(x, y)
    yy = np.asarray(y)
    cal = calibrate_threshold(x, y, target_far=0.05)
    # the pair just below tau sits one float below it: classify with the oracle's own tau
    tau = threshold_bruteforce(s[~same].tolist(), 0.05)
    for row, k in enumerate(cal.classes):
        involved = (yy[iu[0]] == k) | (yy[iu[1]] == k)
        assert cal.per_class_far[row] == pytest.approx(np.mean(s[involved & ~same] >= tau))
        assert cal.per_class_frr[row] == pytest.approx(np.mean(s[involved & same] < tau))
    assert cal.far_spread == pytest.approx(cal.per_class_far.max() - cal.per_class_far.min())
    d = cal.to_dict()
    assert d["per_class"]["frr_max"] >= d["per_class"]["frr_min"]


def test_rates_at_a_given_tau_match_brute_force() -> None:
    """``tau=``: FAR/FRR measured at an inherited threshold, pair by pair."""
    x, y = clustered(4, num_classes=5, per_class=4)
    s, same, _ = _pairs(x, y)
    tau = float(np.quantile(s, 0.7))
    cal = calibrate_threshold(x, y, target_far=0.05, tau=tau)
    assert cal.tau == tau
    assert cal.far == pytest.approx(np.mean(s[~same] >= tau))
    assert cal.frr == pytest.approx(np.mean(s[same] < tau))
    assert cal.num_impostor == int((~same).sum()) and cal.num_genuine == int(same.sum())
    with pytest.raises(ValueError, match="finite"):
        calibrate_threshold(x, y, tau=float("nan"))


@pytest.mark.parametrize(("far", "needed"), [(1e-2, 1_000), (1e-3, 10_000), (0.3, 34)])
def test_impostor_pairs_needed(far: float, needed: int) -> None:
    """10 impostor scores at or above tau: ceil(10 / FAR), by hand."""
    assert impostor_pairs_needed(far) == needed
    assert impostor_pairs_needed(far, tail=1) == math.ceil(1 / far - 1e-9)


def test_scores_version_and_float32_tau_is_exact_in_float32() -> None:
    rng = np.random.default_rng(0)
    imp = rng.normal(0.1, 0.2, size=5000).astype(np.float32)
    gen = rng.normal(0.7, 0.1, size=500).astype(np.float32)
    tau = threshold_at_far(imp, 0.01)
    assert np.mean(imp >= np.float32(tau)) <= 0.01
    assert np.mean(imp >= np.nextafter(np.float32(tau), np.float32(-2))) > 0.01
    cal = calibrate_threshold_from_scores(gen, imp, target_far=0.01)
    assert cal.tau == tau and cal.per_class_far is None
    assert cal.frr == pytest.approx(np.mean(gen < tau))


def test_ties_at_the_quantile() -> None:
    imp = [0.5] * 10 + [0.1] * 90
    # accepting the ten tied 0.5s gives FAR 0.1 > 0.05, so tau must exclude all of them
    tau = threshold_at_far(imp, 0.05)
    assert tau > 0.5 and tau == math.nextafter(0.5, math.inf)
    assert threshold_at_far(imp, 0.1) == math.nextafter(0.1, math.inf)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 2.0])
def test_bad_target_rejected(target: float) -> None:
    with pytest.raises(ValueError, match="target_far"):
        threshold_at_far([0.1, 0.2], target)


def test_bad_scores_rejected() -> None:
    with pytest.raises(ValueError, match="no impostor"):
        threshold_at_far([], 0.1)
    with pytest.raises(ValueError, match="NaN"):
        threshold_at_far([0.1, float("nan")], 0.1)
    with pytest.raises(ValueError, match="no negative pairs"):
        calibrate_threshold(np.eye(3) + 0.1, [0, 0, 0])
