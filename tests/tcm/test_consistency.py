import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tcm import consistency_from_scores, consistency_report, eps_opis, opis
from tests.tcm.reference import clustered, cosine_matrix, opis_bruteforce

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _on(device: str, x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_size", [7, 2048])
def test_matches_bruteforce_found_range(device: str, seed: int, block_size: int) -> None:
    x, y = clustered(seed, num_classes=7, per_class=5)
    ref = opis_bruteforce(x, y, num_thresholds=21)
    got = consistency_report(_on(device, x), y, num_thresholds=21, block_size=block_size)
    assert got.tau_lo == pytest.approx(ref["tau_lo"], abs=1e-12)
    assert got.tau_hi == pytest.approx(ref["tau_hi"], abs=1e-12)
    assert got.opis == pytest.approx(ref["opis"], abs=1e-12)
    assert got.eps_opis == pytest.approx(ref["eps_opis"], abs=1e-12)
    for row, k in enumerate(got.classes):
        np.testing.assert_allclose(got.utility[row], ref["curves"][k], atol=1e-12)
    assert got.opis > 0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beta,eps", [(1.0, 0.05), (2.0, 0.3), (0.5, 0.5)])
def test_matches_bruteforce_given_range(seed: int, beta: float, eps: float) -> None:
    x, y = clustered(10 + seed, num_classes=9, per_class=4)
    ref = opis_bruteforce(x, y, tau_range=(0.1, 0.8), num_thresholds=31, beta=beta, eps=eps)
    got = consistency_report(
        x, y, tau_range=(0.1, 0.8), num_thresholds=31, beta=beta, eps=eps, block_size=5
    )
    assert got.far_range is None
    assert got.opis == pytest.approx(ref["opis"], abs=1e-12)
    assert got.eps_opis == pytest.approx(ref["eps_opis"], abs=1e-12)


def test_float32_agrees_with_float64() -> None:
    x, y = clustered(5, num_classes=10, per_class=8)
    a = consistency_report(x.astype(np.float32), y, tau_range=(0.2, 0.7))
    b = consistency_report(x, y, tau_range=(0.2, 0.7))
    assert a.opis == pytest.approx(b.opis, rel=1e-3, abs=1e-6)


def test_singleton_classes_excluded_but_still_impostors() -> None:
    x, y = clustered(1, sizes=[5, 5, 5, 1, 1])
    ref = opis_bruteforce(x, y, num_thresholds=11)
    got = consistency_report(x, y, num_thresholds=11)
    assert sorted(got.excluded_classes) == [3, 4]
    assert got.classes == [0, 1, 2]
    assert got.opis == pytest.approx(ref["opis"], abs=1e-12)
    # class 0's impostor pairs include the singletons: 5 * (5 + 5 + 1 + 1)
    assert got.num_negative[0] == 5 * 12
    assert got.num_positive[0] == 10


def test_ties_at_thresholds_count_as_accepted() -> None:
    # 1-D-like embeddings on the unit circle with scores exactly on the grid points 0 and 0.5.
    ang = np.array([0.0, np.pi / 3, np.pi / 2, np.pi / 2 + np.pi / 3])
    x = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    y = [0, 0, 1, 1]
    sim = cosine_matrix(x)
    got = consistency_report(x, y, tau_range=(0.0, 0.5), num_thresholds=2, tau=0.5)
    ref = opis_bruteforce(x, y, tau_range=(0.0, 0.5), num_thresholds=2)
    assert sim[0, 1] == pytest.approx(0.5)
    np.testing.assert_allclose(got.utility[0], ref["curves"][0], atol=1e-12)
    # the positive pair of class 0 scores 0.5 (up to rounding) and tau = 0.5 accepts it
    # iff its float64 score >= 0.5, exactly as the brute force decides
    assert got.at_tau.frr[0] == (0.0 if sim[0, 1] >= 0.5 else 1.0)


def test_well_separated_classes_have_zero_opis() -> None:
    # every class: genuine score 1, impostor score far below the range -> all curves equal 1
    rng = np.random.default_rng(0)
    centers = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    x = np.repeat(centers, 3, axis=0)
    y = np.repeat(np.arange(6), 3).tolist()
    got = consistency_report(x, y, tau_range=(0.5, 0.9))
    assert got.opis == pytest.approx(0.0, abs=1e-15)
    assert got.eps_opis == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(got.utility, 1.0)


def test_at_tau_matches_direct_count() -> None:
    x, y = clustered(2, num_classes=5, per_class=6)
    sim = cosine_matrix(x)
    tau = 0.45
    got = consistency_report(x, y, tau=tau, num_thresholds=11)
    yy = np.array(y)
    iu = np.triu_indices(len(y), 1)
    same = yy[iu[0]] == yy[iu[1]]
    s = sim[iu]
    assert got.at_tau.global_far == pytest.approx(np.mean(s[~same] >= tau))
    assert got.at_tau.global_frr == pytest.approx(np.mean(s[same] < tau))
    for row, k in enumerate(got.classes):
        involved = (yy[iu[0]] == k) | (yy[iu[1]] == k)
        assert got.at_tau.far[row] == pytest.approx(np.mean(s[involved & ~same] >= tau))
        assert got.at_tau.frr[row] == pytest.approx(np.mean(s[involved & same] < tau))
    # adding tau does not change the curves on the grid
    plain = consistency_report(x, y, num_thresholds=11)
    assert plain.opis == pytest.approx(got.opis, abs=1e-15)


def test_scores_path_equals_embedding_path() -> None:
    x, y = clustered(4, num_classes=6, per_class=5)
    sim = cosine_matrix(x)
    gen: dict[int, list[float]] = {k: [] for k in set(y)}
    imp: dict[int, list[float]] = {k: [] for k in set(y)}
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            if y[i] == y[j]:
                gen[y[i]].append(sim[i, j])
            else:
                imp[y[i]].append(sim[i, j])
                imp[y[j]].append(sim[i, j])
    a = consistency_report(x, y, tau_range=(0.0, 0.8), tau=0.4)
    b = consistency_from_scores(gen, imp, tau_range=(0.0, 0.8), tau=0.4)
    assert a.opis == pytest.approx(b.opis, abs=1e-12)
    assert a.eps_opis == pytest.approx(b.eps_opis, abs=1e-12)
    np.testing.assert_allclose(a.at_tau.far, b.at_tau.far)


def test_scores_groups_without_both_kinds_are_excluded() -> None:
    gen = {"a": [0.9, 0.8], "b": [0.7], "c": [0.95]}
    imp = {"a": [0.1, 0.2], "b": [0.3, 0.6]}
    rep = consistency_from_scores(gen, imp, tau_range=(0.2, 0.8), num_thresholds=7)
    assert rep.classes == ["a", "b"]
    assert rep.excluded_classes == ["c"]


def test_weights_change_opis_and_validate() -> None:
    x, y = clustered(8, num_classes=5, per_class=5)
    uniform = consistency_report(x, y, tau_range=(0.1, 0.7))
    same = consistency_report(x, y, tau_range=(0.1, 0.7), weights=[2.0] * 5)
    assert same.opis == pytest.approx(uniform.opis, abs=1e-15)
    skewed = consistency_report(x, y, tau_range=(0.1, 0.7), weights={0: 10, 1: 1, 2: 1, 3: 1, 4: 1})
    assert skewed.opis != pytest.approx(uniform.opis)
    with pytest.raises(ValueError, match="weights"):
        consistency_report(x, y, weights=[1.0, 2.0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"far_range": (0.1, 0.01)}, "far_range"),
        ({"far_range": (0.0, 0.1)}, "far_range"),
        ({"tau_range": (0.8, 0.2)}, "tau_range"),
        ({"num_thresholds": 0}, "num_thresholds"),
        ({"beta": 0.0}, "beta"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_bad_parameters_rejected(kwargs: dict, match: str) -> None:
    x, y = clustered(0, num_classes=3, per_class=3)
    with pytest.raises(ValueError, match=match):
        consistency_report(x, y, **kwargs)


def test_bad_inputs_rejected() -> None:
    x, y = clustered(0, num_classes=3, per_class=3)
    with pytest.raises(ValueError, match="lengths must match"):
        consistency_report(x, y[:-1])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        consistency_report(bad, y)
    with pytest.raises(ValueError, match="2-D"):
        consistency_report(x[:, 0], y)
    with pytest.raises(ValueError, match="at least 2 eligible classes"):
        consistency_report(x[:4], [0, 0, 1, 2])
    zero = x.copy()
    zero[1] = 0
    with pytest.raises(ValueError, match="all-zero"):
        consistency_report(zero, y)
    with pytest.raises(ValueError, match="NaN"):
        consistency_from_scores({"a": [np.inf]}, {"a": [0.1]})


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), perm_seed=st.integers(0, 10_000))
def test_invariant_to_relabelling_and_permutation(seed: int, perm_seed: int) -> None:
    x, y = clustered(seed, num_classes=5, per_class=4, dim=4)
    rng = np.random.default_rng(perm_seed)
    perm = rng.permutation(len(y))
    relabel = {k: f"class-{v}" for k, v in zip(range(5), rng.permutation(5), strict=True)}
    base = consistency_report(x, y, num_thresholds=11)
    moved = consistency_report(
        x[perm], [relabel[y[i]] for i in perm], num_thresholds=11, block_size=3
    )
    assert moved.opis == pytest.approx(base.opis, abs=1e-12)
    assert moved.eps_opis == pytest.approx(base.eps_opis, abs=1e-12)
    assert moved.tau_lo == pytest.approx(base.tau_lo, abs=1e-12)
    assert moved.tau_hi == pytest.approx(base.tau_hi, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    gen=st.lists(st.floats(-1, 1), min_size=1, max_size=20),
    imp=st.lists(st.floats(-1, 1), min_size=1, max_size=20),
    groups=st.integers(2, 6),
)
def test_identical_curves_give_zero_opis(gen: list[float], imp: list[float], groups: int) -> None:
    rep = consistency_from_scores(
        {g: gen for g in range(groups)},
        {g: imp for g in range(groups)},
        tau_range=(-0.5, 0.5),
        num_thresholds=17,
    )
    assert rep.opis == pytest.approx(0.0, abs=1e-15)
    assert rep.eps_opis == pytest.approx(0.0, abs=1e-15)


def test_opis_and_eps_opis_shortcuts() -> None:
    x, y = clustered(3)
    rep = consistency_report(x, y, eps=0.2)
    assert opis(x, y) == pytest.approx(rep.opis)
    assert eps_opis(x, y, eps=0.2) == pytest.approx(rep.eps_opis)
    d = rep.to_dict()
    assert d["num_classes"] == 8 and len(d["utility"]) == 8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_opis_matches_bruteforce(seed: int) -> None:
    """Weights against the reference (issue 15: only ``skewed != uniform`` was checked, so OPIS
    ignoring its weights, or weighting only Ubar or only the sum, went unnoticed)."""
    x, y = clustered(seed, num_classes=5, per_class=5, spread=1.0)
    weights = {0: 10.0, 1: 1.0, 2: 0.0, 3: 3.5, 4: 0.25}
    ref = opis_bruteforce(x, y, tau_range=(0.1, 0.7), num_thresholds=21, weights=weights)
    uniform = opis_bruteforce(x, y, tau_range=(0.1, 0.7), num_thresholds=21)
    assert ref["opis"] != pytest.approx(uniform["opis"], rel=1e-3)  # the weights matter here
    for w in (weights, [weights[k] for k in range(5)]):
        rep = consistency_report(x, y, tau_range=(0.1, 0.7), num_thresholds=21, weights=w)
        assert rep.opis == pytest.approx(ref["opis"], rel=1e-9, abs=1e-12)
