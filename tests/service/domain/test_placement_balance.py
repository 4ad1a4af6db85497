"""The size-aware placement (``service.domain.placement.balanced``), against a brute-force
optimum on small instances and by hand; where a retired group's tenants go (``retiring``)."""

from __future__ import annotations

import itertools
import random

import pytest

from service.domain.placement import Move, Placement, balanced, largest_group_drop, retiring


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


def test_a_retired_group_s_tenants_go_largest_first_to_the_least_loaded() -> None:
    # g1 holds 100, g2 40, g3 (retired) 90 + 50 + 30 + 5: by hand, 90 -> g2 (40 -> 130),
    # 50 -> g1 (100 -> 150), 30 -> g2 (130 -> 160), 5 -> g1 (150 -> 155)
    sizes = {"a": 100, "b": 40, "c": 90, "d": 50, "e": 30, "f": 5}
    owners = {"a": "g1", "b": "g2", "c": "g3", "d": "g3", "e": "g3", "f": "g3"}
    table = Placement(4, ("g1", "g2", "g3"), explicit=tuple(owners.items()))
    assert retiring(sizes, table, "g3") == {"c": "g2", "d": "g1", "e": "g2", "f": "g1"}


def test_retiring_moves_only_the_group_s_tenants_and_every_one_of_them() -> None:
    rng = random.Random(7)
    for _ in range(200):
        groups = tuple(f"g{i}" for i in range(rng.randint(2, 4)))
        table = Placement(1, groups)
        sizes = {f"t{i}": rng.randint(0, 1000) for i in range(rng.randint(0, 12))}
        gone = rng.choice(groups)
        plan = retiring(sizes, table, gone)
        assert set(plan) == {t for t in sizes if table.owner(t) == gone}
        assert gone not in plan.values() and set(plan.values()) <= set(groups)
        loads = {
            g: sum(n for t, n in sizes.items() if plan.get(t, table.owner(t)) == g) for g in groups
        }
        assert loads[gone] == 0 and sum(loads.values()) == sum(sizes.values())
        # each target was the least loaded remaining group when it took its last (smallest)
        # tenant, and loads only grow after that
        others = min(v for g, v in loads.items() if g != gone)
        for g in set(plan.values()):
            assert loads[g] - min(sizes[t] for t, to in plan.items() if to == g) <= others


def test_retiring_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="unknown group 'g9'"):
        retiring({"a": 1}, Placement(1, ("g1", "g2")), "g9")
    with pytest.raises(ValueError, match="the only group"):
        retiring({"a": 1}, Placement(1, ("g1",)), "g1")
    moving = Placement(3, ("g1", "g2"), moves=(Move("a", "g1", "g2"),))
    with pytest.raises(ValueError, match="finish that move first"):
        retiring({"a": 1}, moving, "g2")


def test_the_largest_group_s_drop() -> None:
    assert largest_group_drop({"g1": 400, "g2": 100}, {"g1": 250, "g2": 250}) == 0.375
    assert largest_group_drop({"g1": 200, "g2": 200}, {"g1": 200, "g2": 200}) == 0.0
    assert largest_group_drop({"g1": 0, "g2": 0}, {"g1": 0, "g2": 0}) == 0.0
    assert largest_group_drop({}, {}) == 0.0
