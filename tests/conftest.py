"""Suite-wide rules.

``-m gpu`` selects the CUDA twins of the CPU tests. Run where CUDA is missing (a CPU torch
wheel on a GPU machine, a driver that does not load), they fail: a GPU run that skips all of
them and exits 0 would pass without testing anything. ``make test`` deselects them
(``-m "not gpu"``), and the goal run (``-m "not gpu and not goals"``: ``make goals`` runs it).
"""

from __future__ import annotations

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is None:
        return
    import torch

    if not torch.cuda.is_available():
        pytest.fail(
            f"this test is marked gpu but torch {torch.__version__} sees no CUDA device "
            "(a CPU wheel, or no driver): install a CUDA torch, or deselect with -m 'not gpu'",
            pytrace=False,
        )
