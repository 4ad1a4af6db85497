"""AS-norm: a hand-computed case and a brute-force reference (loops over every pair)."""

from __future__ import annotations

import numpy as np
import pytest

from tcm.asnorm import MIN_SPREAD, CohortStats, as_norm, cohort_stats, validate_cohort


def test_hand_computed_case() -> None:
    # Cohort: the two axes and their negative sum direction; embedding e = x-axis.
    cohort = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=np.float32)
    e = np.array([[2.0, 0.0]], dtype=np.float32)  # normalised to (1, 0)
    # Scores of e against the cohort: 1, 0, -1/sqrt(2); top-2 = {1, 0}: mean 0.5, std 0.5.
    st = cohort_stats(e, cohort, k=2)
    assert st.mean[0] == pytest.approx(0.5)
    assert st.std[0] == pytest.approx(0.5)
    p = CohortStats(np.array([0.2], np.float32), np.array([0.1], np.float32))
    # s = 0.7: 1/2 [(0.7 - 0.5)/0.5 + (0.7 - 0.2)/0.1] = 1/2 [0.4 + 5] = 2.7
    assert as_norm(np.array([[0.7]]), st, p)[0, 0] == pytest.approx(2.7, rel=1e-6)
    assert as_norm(np.array([0.7]), st, p)[0] == pytest.approx(2.7, rel=1e-6)


def test_matches_brute_force_loops() -> None:
    rng = np.random.default_rng(0)
    cohort = rng.normal(size=(37, 8)).astype(np.float32)
    left = rng.normal(size=(5, 8)).astype(np.float32)
    right = rng.normal(size=(4, 8)).astype(np.float32)
    k = 6

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    def stats(v: np.ndarray) -> tuple[float, float]:
        sc = sorted((float(unit(v) @ unit(c)) for c in cohort), reverse=True)[:k]
        return float(np.mean(sc)), float(np.std(sc))

    ls, rs = cohort_stats(left, cohort, k), cohort_stats(right, cohort, k)
    raw = np.array([[float(unit(a) @ unit(b)) for b in right] for a in left])
    got = as_norm(raw, ls, rs)
    for i, a in enumerate(left):
        ma, sa = stats(a)
        assert ls.mean[i] == pytest.approx(ma, abs=1e-6)
        assert ls.std[i] == pytest.approx(sa, abs=1e-6)
        for j, b in enumerate(right):
            mb, sb = stats(b)
            want = 0.5 * ((raw[i, j] - ma) / sa + (raw[i, j] - mb) / sb)
            assert got[i, j] == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_blocks_and_k_equal_to_cohort_agree_with_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    cohort = rng.normal(size=(9, 4))
    e = rng.normal(size=(11, 4))
    whole = cohort_stats(e, cohort, 9)
    monkeypatch.setattr("tcm.asnorm._BLOCK", 3)
    blocked = cohort_stats(e, cohort, 9)
    np.testing.assert_allclose(whole.mean, blocked.mean, rtol=1e-6)
    np.testing.assert_allclose(whole.std, blocked.std, rtol=1e-6)


def test_a_constant_cohort_gives_a_finite_score() -> None:
    cohort = np.ones((4, 3))
    st = cohort_stats(np.array([[1.0, 0.0, 0.0]]), cohort, 2)
    assert st.std[0] == pytest.approx(MIN_SPREAD)
    assert np.isfinite(as_norm(np.array([[0.5]]), st, st)).all()


def test_a_class_with_high_impostors_needs_a_higher_cosine() -> None:
    """The point of the method: the same raw cosine is worth less to a side whose impostors
    score high."""
    crowded = CohortStats(np.array([0.6], np.float32), np.array([0.05], np.float32))
    lonely = CohortStats(np.array([0.2], np.float32), np.array([0.05], np.float32))
    probe = CohortStats(np.array([0.3], np.float32), np.array([0.05], np.float32))
    s = np.array([[0.7]])
    assert as_norm(s, crowded, probe)[0, 0] < as_norm(s, lonely, probe)[0, 0]


@pytest.mark.parametrize(
    ("cohort", "dim", "k", "message"),
    [
        (np.ones((4, 3)), 5, 2, "dimension 3, the model's 5"),
        (np.ones((4, 3)), 3, 0, "top-k must be in [1, 4]"),
        (np.ones((4, 3)), 3, 5, "top-k must be in [1, 4]"),
        (np.full((4, 3), np.nan), 3, 2, "NaN"),
        (np.zeros((4, 3)), 3, 2, "all-zero row"),
        (np.ones(3), 3, 1, "2-D"),
    ],
)
def test_a_cohort_that_does_not_fit_is_refused_in_one_line(
    cohort: np.ndarray, dim: int, k: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        validate_cohort(cohort, dim, k)
    assert "\n" not in str(err.value)


def test_shape_mismatches_are_refused() -> None:
    st = CohortStats(np.zeros(2, np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="needs 3 left"):
        as_norm(np.zeros((3, 2)), st, st)
    with pytest.raises(ValueError, match="one left and one right"):
        as_norm(np.zeros(3), st, st)


def test_a_rows_statistics_do_not_depend_on_its_batch() -> None:
    """The service computes an item's statistics alone (enrolment) and in blocks (start-up):
    they must be the same numbers, bit for bit."""
    from tcm.asnorm import Cohort

    rng = np.random.default_rng(3)
    cohort = Cohort.of(rng.normal(size=(300, 32)).astype(np.float32), dim=32, top_k=20)
    x = rng.normal(size=(257, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    block = cohort.stats(x)
    for i in range(0, 257, 16):
        one = cohort.stats(x[i : i + 1])
        assert one.mean[0] == block.mean[i] and one.std[0] == block.std[i]
    ref = cohort_stats(x, cohort.embeddings, 20)  # re-normalises x: the last bit may move
    np.testing.assert_allclose(ref.mean, block.mean, rtol=1e-6)


def test_pair_scores_match_brute_force() -> None:
    from tcm.asnorm import Cohort, as_norm_pair_scores

    rng = np.random.default_rng(4)
    cohort = Cohort.of(rng.normal(size=(40, 8)).astype(np.float32), dim=8, top_k=5)
    x = rng.normal(size=(23, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, 4, size=23)
    genuine, impostor = as_norm_pair_scores(x, y, cohort, block=7)
    st = cohort.stats(x)
    want_g, want_i = [], []
    for i in range(23):
        for j in range(i + 1, 23):
            s = float(x[i] @ x[j])
            v = 0.5 * ((s - st.mean[i]) / st.std[i] + (s - st.mean[j]) / st.std[j])
            (want_g if y[i] == y[j] else want_i).append(v)
    np.testing.assert_allclose(np.sort(genuine), np.sort(want_g), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.sort(impostor), np.sort(want_i), rtol=1e-5, atol=1e-5)


def test_class_scores_match_brute_force() -> None:
    """Per class: genuine pairs inside it, impostor pairs with one side in it (each impostor
    pair counted for both its classes)."""
    from tcm.asnorm import Cohort, as_norm_class_scores

    rng = np.random.default_rng(5)
    cohort = Cohort.of(rng.normal(size=(30, 6)).astype(np.float32), dim=6, top_k=4)
    x = rng.normal(size=(17, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, 3, size=17)
    gen, imp = as_norm_class_scores(x, y, cohort, block=5)
    st = cohort.stats(x)
    want_g: dict[int, list[float]] = {}
    want_i: dict[int, list[float]] = {}
    for i in range(17):
        for j in range(i + 1, 17):
            s = float(x[i] @ x[j])
            v = 0.5 * ((s - st.mean[i]) / st.std[i] + (s - st.mean[j]) / st.std[j])
            if y[i] == y[j]:
                want_g.setdefault(int(y[i]), []).append(v)
            else:
                want_i.setdefault(int(y[i]), []).append(v)
                want_i.setdefault(int(y[j]), []).append(v)
    for c in range(3):
        np.testing.assert_allclose(np.sort(gen[c]), np.sort(want_g.get(c, [])), atol=1e-5)
        np.testing.assert_allclose(np.sort(imp[c]), np.sort(want_i[c]), atol=1e-5)
