from __future__ import annotations

from pathlib import Path

import pytest

DATA_DIR = str(Path(__file__).resolve().parents[3] / "shared" / "data")

# Tiny but real: sklearn digits, classes 0-4 train, 5-9 held out.
DIGITS = ["dataset=digits", "image_size=16", "width=8", "embedding_dim=32", "batch_size=40",
          "m_per_class=8", "epochs=2", "steps_per_epoch=15", "augment=false"]
OMNIGLOT_SMALL = [f"data_dir={DATA_DIR}", "dataset=omniglot", "max_train_classes=60",
                  "max_test_classes=30", "image_size=20", "width=8", "embedding_dim=32",
                  "batch_size=64", "m_per_class=4", "epochs=1", "steps_per_epoch=15"]


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not Path(DATA_DIR, "omniglot").is_dir():
        pytest.fail(f"shared data sets missing at {DATA_DIR}")
    return DATA_DIR
