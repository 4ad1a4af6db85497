"""The monitor's gallery sample (issue 25, item 11): whole subjects in a seeded order until the
budget is filled, in O(n log n). The reference (``bench.bench_sampling``) is the original rule,
written as plainly as possible (a scan of every row per subject drawn: quadratic when every
subject has 3 items, the budget stops at 1 and no subject fits any more); the fast one must draw
exactly the same."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_sampling import reference_sample_gallery as reference
from service.monitoring.pairs import sample_gallery


@pytest.mark.parametrize("seed", range(40))
def test_same_draw_as_the_reference(seed: int) -> None:
    gen = np.random.default_rng(seed)
    n = int(gen.integers(2, 400))
    per = [1, 2, 3, 7, 50][seed % 5]  # subject sizes around ``per``, singletons included
    subjects = [f"s{int(i)}" for i in gen.integers(0, max(1, n // per), size=n)]
    max_items = int(gen.integers(2, n + 5))
    want = reference(subjects, max_items, np.random.default_rng(seed))
    got = sample_gallery(subjects, max_items, np.random.default_rng(seed))
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


def test_three_items_per_subject_fills_the_budget_to_one_short() -> None:
    subjects = [f"s{i // 3}" for i in range(3000)]  # the quadratic case, at a small size
    codes, idx = sample_gallery(subjects, 100, np.random.default_rng(0))
    assert len(idx) == 99  # 33 whole subjects; the last row of budget fits no subject
    kept = codes[idx]
    assert all(np.count_nonzero(kept == c) == 3 for c in np.unique(kept))
    want = reference(subjects, 100, np.random.default_rng(0))
    assert (idx == want[1]).all()
