"""FPIR / FNIR at a gallery size (tcm.openset): a hand-computed case and brute force over
every probe's full impostor list."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tcm.artefact import load_openset, save_openset
from tcm.openset import (
    ProbeTails,
    fnir,
    fpir,
    fpir_from_pair_far,
    fpir_gallery,
    gallery_shape,
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


# --- a gallery of subjects with several photos each (fpir_gallery) ----------------------------


def test_gallery_shape_hand_computed() -> None:
    # 3 classes of 2, 2 and 4 photos; probe 0 (class 0) has 1 of class 1's 2 photos and 2 of
    # class 2's 4 photos at or above 0.5; probe 1 (class 1) has none.
    tails = ProbeTails(
        top=np.array([[0.9, 0.7, 0.6, 0.1], [0.4, 0.3, 0.2, 0.1]]),
        impostors=np.array([6, 6]),
        mate=np.array([np.nan, np.nan]),
        top_class=np.array([[2, 1, 2, 1], [0, 2, 2, 2]]),
        probe_class=np.array([0, 1]),
        class_sizes=np.array([2, 2, 4]),
    )
    # probe 0: p = (1/2, 2/4) for classes 1, 2. One subject of 2 photos:
    # m = mean(1 - ... ) = mean((1/2)^2, (1/2)^2) = 1/4 -> FPIR_0 = 3/4; probe 1: 0
    assert fpir_gallery(tails, 0.5, [2]) == pytest.approx(0.375)
    # two subjects of 1 photo: m = mean(1/2, 1/2) = 1/2 -> 1 - 1/4 = 3/4 -> mean 0.375 again;
    # one of 1 and one of 3: (1/2) * (1/8) -> 15/16
    assert fpir_gallery(tails, 0.5, {1: 2}) == pytest.approx(0.375)
    assert fpir_gallery(tails, 0.5, [1, 3]) == pytest.approx(15 / 32)
    assert fpir_gallery(tails, 0.95, [5, 5]) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_gallery_fpir_matches_brute_force_over_classes(seed: int) -> None:
    x, labels = clustered(seed, num_classes=7, sizes=[4, 6, 5, 7, 6, 3, 5])
    y = np.asarray(labels)
    tails = probe_tails(x, y, k=40, block_size=5)  # k >= every probe's impostors: exact
    s = cosine_matrix(x)
    classes = np.unique(y)
    # (the +1e-7 keeps tau off a score: the pair (i, j) appears twice, so a quantile can land
    # on one exactly, where float32 and float64 cosines disagree)
    for tau in np.quantile(s[y[:, None] != y[None, :]], [0.5, 0.9, 0.99]) + 1e-7:
        for shape in ([1], [3, 3], [1, 2, 4, 4], [8] * 5):
            want = []
            for i in range(len(y)):
                miss = [
                    np.mean([(1 - np.mean(s[i, y == c] >= tau)) ** p for c in classes if c != y[i]])
                    for p in shape
                ]
                want.append(1 - np.prod(miss))
            assert fpir_gallery(tails, tau, shape) == pytest.approx(np.mean(want), abs=1e-12)


def test_one_photo_per_subject_and_equal_classes_is_the_photo_model() -> None:
    x, labels = clustered(3, num_classes=6, per_class=5)
    tails = probe_tails(x, np.asarray(labels), k=25)
    for tau in (0.2, 0.5, 0.8):
        for g in (1, 4, 30):
            assert fpir_gallery(tails, tau, [1] * g) == pytest.approx(fpir(tails, tau, g))


def test_photos_of_one_subject_hit_together_so_the_gallery_model_is_lower() -> None:
    """Monte Carlo under the model's own sampling (subjects: classes drawn with replacement;
    photos: drawn from their class with replacement) agrees with the formula, and it is below
    the photo model at the same number of photos."""
    x, labels = clustered(5, num_classes=8, per_class=6)
    y = np.asarray(labels)
    tails = probe_tails(x, y, k=48)
    s = cosine_matrix(x)
    tau = float(np.quantile(s[y[:, None] != y[None, :]], 0.9))
    rng = np.random.default_rng(0)
    shape = [4, 4, 4]
    hits = 0
    trials = 20000
    for _ in range(trials):
        i = rng.integers(len(y))
        others = np.unique(y[y != y[i]])
        accepted = False
        for p in shape:
            c = rng.choice(others)
            photos = rng.choice(np.flatnonzero(y == c), p)
            accepted |= bool((s[i, photos] >= tau).any())
        hits += accepted
    assert fpir_gallery(tails, tau, shape) == pytest.approx(hits / trials, abs=0.015)
    assert fpir_gallery(tails, tau, shape) < fpir(tails, tau, sum(shape))


def test_class_ids_survive_the_artefact_and_old_tails_still_load(tmp_path: Path) -> None:
    x, labels = clustered(1, num_classes=5, per_class=4)
    tails = probe_tails(x, np.asarray(labels), k=8)
    manifest = SimpleNamespace(openset={"file": save_openset(tmp_path, tails)})
    back = load_openset(tmp_path, manifest)  # type: ignore[arg-type]
    assert back is not None and back.has_classes
    assert fpir_gallery(back, 0.5, [2, 2]) == pytest.approx(fpir_gallery(tails, 0.5, [2, 2]))
    old = ProbeTails(tails.top, tails.impostors, tails.mate)  # written before class ids
    save_openset(tmp_path, old)
    back = load_openset(tmp_path, manifest)  # type: ignore[arg-type]
    assert back is not None and not back.has_classes
    with pytest.raises(ValueError, match="re-run tcm-train openset"):
        fpir_gallery(back, 0.5, [2])


def test_bad_gallery_shapes_and_partial_class_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one subject"):
        gallery_shape([])
    with pytest.raises(ValueError, match="at least one subject"):
        gallery_shape([2, 0])
    assert gallery_shape([2, 2, 5]) == {2: 2, 5: 1}
    with pytest.raises(ValueError, match="come together"):
        ProbeTails(np.zeros((1, 1)), np.ones(1, int), np.zeros(1), top_class=np.zeros((1, 1), int))


def test_resolve_at_keeps_every_impostor_score_above_that_tau() -> None:
    """The bird default's tails at k = 64 were not exact at its own tau (289 of 2,474 probes
    had more impostors above it); ``resolve_at`` raises k until they are."""
    x, labels = clustered(2, num_classes=8, per_class=6, spread=1.4)
    y = np.asarray(labels)
    s = cosine_matrix(x)
    tau = float(np.quantile(s[y[:, None] != y[None, :]], 0.7))
    small = probe_tails(x, y, k=3)
    assert not small.resolved(tau)  # the case this guards against
    exact = probe_tails(x, y, k=3, resolve_at=tau)
    assert exact.resolved(tau) and exact.k > 3
    full = probe_tails(x, y, k=100)
    assert fpir(exact, tau, 50) == pytest.approx(fpir(full, tau, 50), abs=1e-12)
    assert fpir_gallery(exact, tau, [3, 3]) == pytest.approx(fpir_gallery(full, tau, [3, 3]))
