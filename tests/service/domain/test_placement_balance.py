"""The size-aware placement (``service.domain.placement.balanced``), against a brute-force
optimum on small instances and by hand."""

from __future__ import annotations

import itertools
import random

from service.domain.placement import Placement, balanced


def _loads(plan: dict[str, str], sizes: dict[str, int], groups: tuple[str, ...]) -> list[int]:
    return [sum(n for t, n in sizes.items() if plan[t] == g) for g in groups]


def test_within_the_bounds_of_the_best_placement() -> None:
    rng = random.Random(31)
    for _ in range(300):
        groups = tuple(f"g{i}" for i in range(rng.randint(2, 3)))
        sizes = {f"t{i}": rng.randint(1, 1000) for i in range(rng.randint(1, 7))}
        plan = balanced(sizes, Placement(1, groups))
        assert set(plan) == set(sizes) and set(plan.values()) <= set(groups)
        worst = max(_loads(plan, sizes, groups))
        best = min(
            max(_loads(dict(zip(sizes, choice, strict=True)), sizes, groups))
            for choice in itertools.product(groups, repeat=len(sizes))
        )
        assert worst <= 4 / 3 * best  # longest-processing-time first's bound
        assert worst <= sum(sizes.values()) / len(groups) + max(sizes.values())


def test_the_issue_s_uneven_tenants_and_the_moves_it_asks() -> None:
    sizes = dict(zip("abcdefghi", (200, 150, 100, 70, 50, 40, 30, 20, 10), strict=True))
    table = Placement(1, ("g1", "g2", "g3"), explicit=tuple((t, "g1") for t in sizes))
    plan = balanced(sizes, table)
    assert sorted(_loads(plan, sizes, table.groups)) == [220, 220, 230]  # of 670 in all
    assert plan["a"] == "g1"  # ties go to the current owner: the biggest stays


def test_a_balanced_table_moves_nobody() -> None:
    sizes = {"a": 5, "b": 5, "c": 5}
    table = Placement(1, ("g1", "g2", "g3"), explicit=(("a", "g2"), ("b", "g3"), ("c", "g1")))
    assert balanced(sizes, table) == {"a": "g2", "b": "g3", "c": "g1"}
