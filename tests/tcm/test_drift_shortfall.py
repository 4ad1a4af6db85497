"""The per-tenant across-tenants signal (issue 29): each tenant's shortfall below the median
curve of the OTHER tenants. Hand-computed cases, a brute-force oracle, and one bad tenant among
healthy ones for 2, 3 and 10 tenants: the bad one has the largest signal and only it exceeds
the alert bound. The old signal (symmetric distance from the median of all tenants, kept here
as ``old_deviations`` to show what it did) fails each of these."""

from __future__ import annotations

import numpy as np
import pytest

from tcm.consistency import range_average
from tcm.drift import others_median, shortfalls

FACTOR, FLOOR = 3.0, 0.001  # tcm_config:tenant_deviation_factor, tcm_config:opis_reference_floor


def old_deviations(u: np.ndarray) -> np.ndarray:
    """What the monitor used before (tcm.drift.deviations at e9f6ec7)."""
    return range_average((u - np.median(u, axis=0)) ** 2)


def brute_shortfalls(u: np.ndarray) -> np.ndarray:
    out = []
    for i in range(len(u)):
        med = np.median(np.delete(u, i, axis=0), axis=0)
        gap = [max(m - v, 0.0) ** 2 for m, v in zip(med, u[i], strict=True)]
        # trapezoid over an even grid, divided by the range's width
        t = len(gap)
        out.append((sum(gap) - 0.5 * (gap[0] + gap[-1])) / (t - 1))
    return np.array(out)


def test_hand_computed() -> None:
    # three tenants, a 3-point grid; the others' medians are midpoints of the other two
    u = np.array([[0.9, 0.8, 0.7], [0.8, 0.8, 0.8], [0.2, 0.3, 0.4]])
    # tenant 2: others' median (0.85, 0.8, 0.75); gaps 0.65, 0.5, 0.35
    want2 = (0.5 * 0.65**2 + 0.5**2 + 0.5 * 0.35**2) / 2
    # tenant 0: others' median (0.5, 0.55, 0.6): above it everywhere -> 0
    # tenant 1: others' median (0.55, 0.55, 0.55): above -> 0
    np.testing.assert_allclose(shortfalls(u), [0.0, 0.0, want2], rtol=1e-12)
    # two tenants: each against the other, only the worse one is above 0
    two = u[[1, 2]]
    np.testing.assert_allclose(
        shortfalls(two), [0.0, (0.5 * 0.6**2 + 0.5**2 + 0.5 * 0.4**2) / 2], rtol=1e-12
    )
    assert shortfalls(u[:1]).tolist() == [0.0]


@pytest.mark.parametrize("g", [2, 3, 4, 5, 10, 11])
def test_others_median_and_shortfalls_equal_brute_force(g: int) -> None:
    rng = np.random.default_rng(g)
    u = rng.uniform(0, 1, (g, 9))
    u[0, 3] = u[1, 3]  # ties are handled
    want = np.stack([np.median(np.delete(u, i, axis=0), axis=0) for i in range(g)])
    np.testing.assert_allclose(others_median(u), want, rtol=1e-12)
    np.testing.assert_allclose(shortfalls(u), brute_shortfalls(u), rtol=1e-12, atol=1e-15)


def fleet(rng: np.random.Generator, healthy: int, *, bad: bool) -> np.ndarray:
    """Healthy tenants' utility curves (about 0.7 over an 11-point range, small noise), and
    one whose curve is 0.25 lower (it accepts impostors / rejects its own subjects)."""
    grid = np.linspace(0, 1, 11)
    base = 0.75 - 0.1 * grid
    u = base + rng.normal(0, 0.02, (healthy, len(grid)))
    if bad:
        u = np.vstack([u, base - 0.25 + rng.normal(0, 0.02, len(grid))])
    return np.clip(u, 0, 1)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_one_bad_tenant_ranks_worst_and_alone_exceeds_the_bound(n: int) -> None:
    """n tenants, the last one bad. The alert bound is FACTOR x the largest shortfall of a
    healthy fleet of n tenants measured earlier (as the monitor's reference is: on the served
    galleries). Over 20 seeds the bad tenant has the largest shortfall and is the only one
    above the bound."""
    for seed in range(20):
        rng = np.random.default_rng(seed)
        bound = FACTOR * max(float(shortfalls(fleet(rng, n, bad=False)).max()), FLOOR)
        live = fleet(rng, n - 1, bad=True)
        s = shortfalls(live)
        assert int(np.argmax(s)) == n - 1, (seed, s)
        assert np.flatnonzero(s > bound).tolist() == [n - 1], (seed, s, bound)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_the_old_deviation_pointed_at_the_wrong_tenant(n: int) -> None:
    """Regression: the symmetric distance from the median of all tenants ties with 2
    tenants, and with 3 it counts a tenant BETTER than the others as deviating (here one whose
    gallery is easier sits 0.15 above the median: a third of the bad tenant's squared gap,
    flagged for no fault). The shortfall ranks the bad one worst and the good one at 0."""
    grid = np.linspace(0, 1, 11)
    if n == 2:
        u = np.stack([0.8 - 0.1 * grid, 0.5 - 0.1 * grid])
        dev = old_deviations(u)
        assert dev[0] == pytest.approx(dev[1])  # always equal with two
    elif n == 3:
        # healthy 0.8, a very good one at 0.95 and a bad one at 0.55
        u = np.stack([0.8 + 0 * grid, 0.95 + 0 * grid, 0.55 + 0 * grid])
        dev = old_deviations(u)
        assert dev[1] > 0.3 * dev[2]
        assert shortfalls(u)[1] == 0.0
    else:
        u = fleet(np.random.default_rng(0), n - 1, bad=True)
    s = shortfalls(u)
    assert int(np.argmax(s)) == n - 1
    assert np.count_nonzero(s > 0.5 * s.max()) == 1


def test_level_at_tau_equals_brute_force() -> None:
    """A gallery's FRR and utility at tau from per-class histograms equal the rates over its
    pairs counted one by one."""
    from tcm import utility
    from tcm.drift import Grid, class_histograms, level_at_tau

    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 8)).astype(np.float32)
    y = np.repeat(np.arange(10), 3)
    x[y == 2] += 2.0 * rng.standard_normal(8).astype(np.float32)  # some genuine pairs accept
    grid = Grid.of(0.0, 0.6, 13, 0.3)
    _, pos, neg = class_histograms(x, y, grid)
    frr, u = level_at_tau(pos, neg, grid)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = np.clip(xn @ xn.T, -1, 1)
    gen = [s[i, j] for i in range(30) for j in range(i + 1, 30) if y[i] == y[j]]
    imp = [s[i, j] for i in range(30) for j in range(i + 1, 30) if y[i] != y[j]]
    tpr = np.mean(np.array(gen) >= 0.3)
    tnr = np.mean(np.array(imp) < 0.3)
    assert 0 < tpr < 1
    assert frr == pytest.approx(1 - tpr, abs=1e-12)
    assert u == pytest.approx(float(utility(np.array([tpr]), np.array([tnr]), 1.0)[0]), abs=1e-12)
