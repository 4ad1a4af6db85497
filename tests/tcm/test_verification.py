"""Verification metrics against hand-computed cases and brute-force references."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcm.verification import (
    accuracy_at,
    best_accuracy_threshold,
    kfold_pair_accuracy,
    roc_points,
    tar_at_far,
)


def brute_best(scores: list[float], same: list[bool]) -> float:
    """Best accuracy over every threshold anyone could pick (midpoints and outside values)."""
    values = sorted(set(scores))
    cands = [values[0] - 1, values[-1] + 1, *values]
    cands += [(a + b) / 2 for a, b in itertools.pairwise(values)]
    best = 0.0
    for t in cands:
        correct = sum((s >= t) == y for s, y in zip(scores, same, strict=True))
        best = max(best, correct / len(scores))
    return best


def test_hand_computed_case() -> None:
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    same = [True, True, False, True, False, False]
    tau, acc = best_accuracy_threshold(scores, same)
    # accepting 0.9, 0.8, 0.7, 0.6: three right accepts, one wrong, two right rejects; tau =
    # 0.55, the middle of the gap below 0.6; accepting only 0.9, 0.8 is as good (0.6 wrongly
    # rejected instead) and the lowest tie wins
    assert (tau, acc) == (pytest.approx(0.55), pytest.approx(5 / 6))
    assert accuracy_at(scores, same, 0.8) == pytest.approx(5 / 6)
    assert accuracy_at(scores, same, 0.85) == pytest.approx(4 / 6)
    roc = roc_points([0.9, 0.8, 0.6], [0.7, 0.5, 0.4])
    i = list(roc["thresholds"]).index(0.7)
    assert roc["far"][i] == pytest.approx(1 / 3) and roc["frr"][i] == pytest.approx(1 / 3)
    r = tar_at_far([0.9, 0.8, 0.6], [0.7, 0.5, 0.4], far=0.34)
    # one impostor of three may pass: tau lands one float step above the second-highest
    # impostor (0.5), so 0.7 passes and every genuine pair (0.6 included) does too
    assert r["far"] == pytest.approx(1 / 3) and r["tar"] == 1.0
    assert r["tau"] == np.nextafter(0.5, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-20, 20), st.booleans()), min_size=1, max_size=40))
def test_best_threshold_matches_brute_force(pairs: list[tuple[int, bool]]) -> None:
    scores = [s / 20 for s, _ in pairs]  # many ties on purpose
    same = [y for _, y in pairs]
    tau, acc = best_accuracy_threshold(scores, same)
    assert acc == pytest.approx(brute_best(scores, same))
    assert accuracy_at(scores, same, tau) == pytest.approx(acc)


def test_kfold_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    same = rng.random(600) < 0.5
    scores = np.where(same, rng.normal(0.6, 0.15, 600), rng.normal(0.3, 0.15, 600))
    folds = np.repeat(np.arange(10), 60)
    got = kfold_pair_accuracy(scores, same, folds)
    for k in range(10):
        train = folds != k
        best_acc, best_t = -1.0, None
        values = sorted(set(scores[train].tolist()))
        for j, t in enumerate(values):
            a = float(((scores[train] >= t) == same[train]).mean())
            if a > best_acc:  # the same decisions as any tau in the gap below t: its middle
                best_acc, best_t = a, t if j == 0 else (values[j - 1] + t) / 2
        assert got.fold_thresholds[k] == pytest.approx(best_t)
        want = float(((scores[folds == k] >= best_t) == same[folds == k]).mean())
        assert got.fold_accuracies[k] == pytest.approx(want)
    assert got.mean == pytest.approx(np.mean(got.fold_accuracies))
    assert 0.75 < got.mean < 0.95


def test_roc_is_monotone_and_complete() -> None:
    rng = np.random.default_rng(0)
    g, i = rng.normal(0.5, 0.2, 300), rng.normal(0.1, 0.2, 500)
    roc = roc_points(g, i)
    assert np.all(np.diff(roc["far"]) <= 0) and np.all(np.diff(roc["frr"]) >= 0)
    assert roc["far"][0] == 1.0 and roc["frr"][0] == 0.0  # lowest threshold accepts all
    t = roc["thresholds"][100]
    assert roc["far"][100] == pytest.approx((i >= t).mean())
    assert roc["frr"][100] == pytest.approx((g < t).mean())
    r = tar_at_far(g, i, far=1e-2)
    assert r["far"] <= 1e-2 and r["tar"] == pytest.approx((g >= r["tau"]).mean())


def test_bad_input_is_explained() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        best_accuracy_threshold([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="NaN"):
        best_accuracy_threshold([0.1, float("nan")], [True, False])
    with pytest.raises(ValueError, match="booleans"):
        best_accuracy_threshold([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="at least 2 folds"):
        kfold_pair_accuracy([0.1, 0.2], [True, False], [0, 0])
