"""Grid sweeps (e.g. TCM margins) judged on a validation split of training classes.

Margins are data-dependent (SPEC), so they are chosen on classes carved out of the training set,
never on the held-out test classes whose numbers get reported and exported.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from rich.console import Console

from training.compare import compare
from training.config import TrainConfig, load_config
from training.data import Splits, load_splits
from training.evaluate import report_name
from training.pipeline import evaluate_run
from training.trainer import fit

# config keys that change what load_splits returns
DATA_KEYS = (
    "dataset",
    "data_dir",
    "image_size",
    "max_train_classes",
    "max_test_classes",
    "val_classes",
    "test_fraction",
    "seed",
)


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["m_plus=0.7,0.8", "tcm=true,false"]`` -> ``{"m_plus": ["0.7", "0.8"], ...}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"grid entry {item!r} must look like key=v1,v2,...")
        key, values = item.split("=", 1)
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
        if not grid[key.strip()]:
            raise ValueError(f"grid entry {item!r} lists no values")
    return grid


def _run_name(combo: dict[str, str]) -> str:
    name = "_".join(f"{k}={v}" for k, v in combo.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", name)


def sweep(
    base: TrainConfig,
    grid: dict[str, list[str]],
    out_dir: str | Path,
    *,
    split: str = "val",
    progress: bool = True,
    plots: bool = False,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Trains every combination of ``grid`` on top of ``base`` and compares them on ``split``.

    Every combination is validated before the first one trains. A run whose report already
    exists is reused, so an interrupted sweep picks up where it stopped.
    """
    if split == "val" and base.val_classes <= 0:
        raise ValueError(
            "a sweep on the validation split needs val_classes > 0 (e.g. --set val_classes=200)"
        )
    keys = list(grid)
    combos = [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(grid[k] for k in keys))
    ]
    configs = [load_config(None, [f"{k}={v}" for k, v in c.items()], base=base) for c in combos]
    out = Path(out_dir)
    cache: dict[tuple, Splits] = {}
    runs = []
    for combo, config in zip(combos, configs, strict=True):
        run = out / _run_name(combo)
        runs.append(run)
        if (run / report_name(split)).is_file():
            continue
        data_key = tuple(getattr(config, k) for k in DATA_KEYS)
        if data_key not in cache:
            cache[data_key] = load_splits(config)
        splits = cache[data_key]
        resume = (run / "checkpoint.pt").is_file()
        fit(config, run, splits=splits, progress=progress, resume=resume)
        evaluate_run(run, split=split, splits=splits, plots=plots)
    rows = compare(runs, out / f"compare_{split}.png", console, split=split)
    (out / f"compare_{split}.json").write_text(json.dumps(rows, indent=2, default=str))
    return rows
