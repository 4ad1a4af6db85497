"""``tcm-train retrain`` on an export too small for the artefact's own batch and calibration:
the batch is sized from the export's classes, and tau is kept (not recalibrated on a handful of
impostor pairs) with a line that says how many pairs a new one needs (issue 29)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from tcm import impostor_pairs_needed, read_manifest
from tests.training.conftest import DIGITS
from training.cli import app
from training.config import load_config
from training.data import _digits
from training.pipeline import train_evaluate_export


def small_export(root: Path) -> Path:
    """Two tenants x three digits x four images, in export-dataset's folder layout."""
    images, labels = _digits()
    for tenant in ("0a1b", "9f8e"):
        for k in (0, 1, 2) if tenant == "0a1b" else (3, 4, 5):
            folder = root / f"{tenant}__digit-{k}-0123abcd"
            folder.mkdir(parents=True)
            for j, i in enumerate(np.flatnonzero(labels == k)[:4]):
                Image.fromarray(images[i]).save(folder / f"{j}.png")  # 8 x 8 uint8
    return root


def test_retrain_on_a_small_export_sizes_its_batch_and_keeps_tau(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    train_evaluate_export(
        load_config(None, DIGITS), tmp_path / "run1", v1, plots=False, progress=False
    )
    tau1 = read_manifest(v1).calibration.tau
    data = small_export(tmp_path / "export")
    r = CliRunner().invoke(
        app,
        [
            "retrain",
            "--from",
            str(v1),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run2"),
            "--export",
            str(tmp_path / "v2"),
            *[
                a
                for s in ("epochs=1", "steps_per_epoch=3", "test_fraction=0.3", "device=cpu")
                for a in ("--set", s)
            ],
        ],
        env={"COLUMNS": "300"},
    )
    assert r.exit_code == 0, r.output
    # 6 classes, one held out per tenant: 4 train classes x m_per_class 8 (v1's batch: 40 = 5 x 8)
    assert "batch_size 40 -> 32: the export has 4 training classes" in r.output, r.output
    cal = read_manifest(tmp_path / "v2").calibration
    # held out: 2 classes x 4 images = 8 images, 28 pairs, 12 genuine, 16 impostor
    assert (cal.tau_source, cal.impostor_pairs) == ("inherited", 16)
    assert cal.impostor_pairs_needed == impostor_pairs_needed(cal.target_far) == 1_000
    assert cal.tau == tau1
    assert f"kept tau {tau1:.4f}" in r.output and "needs 1,000" in r.output, r.output
    saved = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert saved["calibration"]["tau"] == tau1  # the report measured at the kept tau too
