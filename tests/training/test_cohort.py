"""AS-norm cohort on the training side: ``tcm-train cohort`` on an exported artefact and the
``cohort_size`` export option write a cohort of training-class images and a tau calibrated on
AS-normalised held-out pair scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tcm import load_artefact, load_cohort, read_manifest, threshold_at_far
from tcm.asnorm import as_norm_pair_scores
from tests.training.conftest import DIGITS
from training.cli import app
from training.cohort import pick_cohort
from training.config import load_config
from training.data import load_splits
from training.evaluate import embed
from training.pipeline import train_evaluate_export


def test_pick_cohort_spreads_over_classes() -> None:
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    idx = pick_cohort(labels, 7, seed=1)
    assert len(idx) == 7 and torch.equal(idx, idx.sort().values)
    counts = torch.bincount(labels[idx], minlength=3)
    assert counts.tolist() in ([3, 2, 2], [2, 3, 2], [2, 2, 3])  # turns: 3 rounds, 7 picks
    assert torch.equal(idx, pick_cohort(labels, 7, seed=1))
    assert len(pick_cohort(labels, 100)) == 20
    with pytest.raises(ValueError, match="size must be >= 1"):
        pick_cohort(labels, 0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    train_evaluate_export(
        load_config(None, DIGITS), out / "run", out / "art", plots=False, progress=False
    )
    return out / "art"


def test_cohort_command_recalibrates_on_as_norm_scores(exported: Path) -> None:
    before = read_manifest(exported)
    assert before.score_norm is None and before.threshold_units == "cosine"
    r = CliRunner().invoke(
        app, ["cohort", str(exported), "--size", "100", "--top-k", "20"], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0, r.output
    assert "as-norm units" in r.output
    m = read_manifest(exported)
    assert m.threshold_units == "as-norm" and m.score_norm is not None
    assert m.score_norm["cohort_size"] == 100 and m.score_norm["top_k"] == 20
    assert m.score_norm["cosine_calibration"]["tau"] == before.calibration.tau
    assert m.calibration.target_far == before.calibration.target_far
    assert m.weights_sha256 == before.weights_sha256
    model, loaded = load_artefact(exported)
    cohort = load_cohort(exported, loaded)
    assert cohort is not None
    # the cohort is training-class images (digits 0-4), none of the held-out ones (5-9)
    splits = load_splits(load_config(None, DIGITS))
    train = embed(model, splits.train.x).numpy().astype(np.float64)
    test = embed(model, splits.test.x).numpy()
    nearest_train = (cohort.embeddings @ train.T).max(axis=1)
    assert (nearest_train > 1 - 1e-3).all()  # each row is a training image (float16)
    assert len(np.unique(splits.train.y.numpy())) == 5
    # tau: the smallest threshold at the target FAR over the held-out AS-normalised pairs
    _, impostor = as_norm_pair_scores(test, splits.test.y.numpy(), cohort)
    assert m.calibration.tau == pytest.approx(threshold_at_far(impostor, 0.01), abs=1e-6)
    assert m.calibration.far_at_tau <= 0.01


def test_cohort_command_refuses_bad_sizes(exported: Path) -> None:
    r = CliRunner().invoke(app, ["cohort", str(exported), "--size", "5000"])
    assert r.exit_code == 2 and "--size must lie in 1..2000" in r.output
    r = CliRunner().invoke(app, ["cohort", str(exported), "--size", "10", "--top-k", "20"])
    assert r.exit_code == 2 and "top-k 20 exceeds" in r.output


def test_export_option_writes_a_cohort(tmp_path: Path) -> None:
    cfg = load_config(None, [*DIGITS, "cohort_size=60", "cohort_top_k=10"])
    train_evaluate_export(cfg, tmp_path / "run", tmp_path / "art", plots=False, progress=False)
    m = read_manifest(tmp_path / "art")
    assert m.threshold_units == "as-norm" and m.score_norm["cohort_size"] == 60
    assert load_cohort(tmp_path / "art", m) is not None
    with pytest.raises(ValueError, match=r"cohort_top_k must lie in 1\.\.cohort_size"):
        load_config(None, [*DIGITS, "cohort_size=5", "cohort_top_k=10"])
