"""The monitor's gallery sample (``service.monitoring.pairs.sample_gallery``) against the rule
it replaced (``reference_sample_gallery``: a scan of every row per subject drawn), side by side,
on galleries of small subjects, the case that was quadratic (issue 25, item 11): every subject
with exactly 3 items leaves a budget of 1 that no subject fits, and the old loop visited every
remaining subject. Both must draw the same rows (checked here and in
``tests/service/monitoring/test_gallery_sampling.py``).

    python -m bench.bench_sampling --items 30000 120000 --per-subject 3 --budget 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from service.monitoring.pairs import sample_gallery


def reference_sample_gallery(
    subjects: list[str], max_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The original rule, as plainly as possible: whole subjects in a seeded order until the
    budget is filled; a subject larger than what is left is subsampled (when 2+ rows are left)
    or skipped."""
    _, codes = np.unique(np.asarray(subjects, dtype=object).astype(str), return_inverse=True)
    if len(subjects) <= max_items:
        return codes, np.arange(len(subjects))
    chosen, budget = [], max_items
    for c in rng.permutation(codes.max() + 1):
        members = np.flatnonzero(codes == c)
        if len(members) > budget:
            if budget < 2:
                continue
            members = rng.choice(members, size=budget, replace=False)
        chosen.append(members)
        budget -= len(members)
        if budget == 0:
            break
    return codes, np.sort(np.concatenate(chosen))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, nargs="+", default=[30_000, 120_000])
    p.add_argument("--per-subject", type=int, default=3)
    p.add_argument("--budget", type=int, default=1000)
    args = p.parse_args()
    print(f"{'items':>8} {'subjects':>9} {'reference s':>12} {'now s':>8} {'ratio':>7} same")
    for n in args.items:
        subjects = [f"s{i // args.per_subject}" for i in range(n)]
        t = time.perf_counter()
        old = reference_sample_gallery(subjects, args.budget, np.random.default_rng(0))
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        new = sample_gallery(subjects, args.budget, np.random.default_rng(0))
        t_new = time.perf_counter() - t
        same = bool((old[1] == new[1]).all())
        print(
            f"{n:>8} {n // args.per_subject:>9} {t_old:>12.3f} {t_new:>8.3f} "
            f"{t_old / t_new:>6.1f}x {same}"
        )


if __name__ == "__main__":
    main()
