from __future__ import annotations

import os
from pathlib import Path

import pytest


def _find_data_dir() -> str:
    """The shared data sets: $TCM_DATA_DIR, else ``../shared/data`` beside the checkout (as the
    Makefile assumes), else the machines' standard place."""
    root = Path(__file__).resolve().parents[2]
    candidates = [
        os.environ.get("TCM_DATA_DIR"),
        root.parent / "shared" / "data",
        "/work/shared/data",
    ]
    for c in candidates:
        if c and Path(c, "omniglot").is_dir():
            return str(c)
    return str(root.parent / "shared" / "data")  # the data_dir fixture fails with this path


DATA_DIR = _find_data_dir()

# Tiny but real: sklearn digits, classes 0-4 train, 5-9 held out.
DIGITS = [
    "dataset=digits",
    "image_size=16",
    "width=8",
    "embedding_dim=32",
    "batch_size=40",
    "m_per_class=8",
    "epochs=2",
    "steps_per_epoch=15",
    "augment=false",
]
OMNIGLOT_SMALL = [
    f"data_dir={DATA_DIR}",
    "dataset=omniglot",
    "max_train_classes=60",
    "max_test_classes=30",
    "image_size=20",
    "width=8",
    "embedding_dim=32",
    "batch_size=64",
    "m_per_class=4",
    "epochs=1",
    "steps_per_epoch=15",
]


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not Path(DATA_DIR, "omniglot").is_dir():
        pytest.fail(f"shared data sets missing at {DATA_DIR}")
    return DATA_DIR
