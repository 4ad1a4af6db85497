"""1:N open-set calibration end to end: an export with threshold_target=fpir carries tau at the
target FPIR for its reference gallery size, the probes' tails file, and /v1/model states it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tcm import load_openset, read_manifest
from tcm.openset import fnir, fpir, tau_at_fpir
from tests.service.conftest import make_settings
from tests.training.conftest import DIGITS
from training.config import load_config
from training.pipeline import train_evaluate_export


def test_fpir_target_export_and_model_route(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [*DIGITS, "threshold_target=fpir", "target_fpir=0.05", "reference_gallery_size=50"],
    )
    train_evaluate_export(cfg, tmp_path / "run", tmp_path / "art", plots=False, progress=False)
    m = read_manifest(tmp_path / "art")
    tails = load_openset(tmp_path / "art", m)
    assert tails is not None and m.openset is not None
    # tau is the smallest threshold with expected FPIR <= 5% against 50 photos (float32 file)
    assert m.calibration.tau_source == "fpir"
    assert m.calibration.tau == pytest.approx(tau_at_fpir(tails, 0.05, 50), abs=1e-6)
    assert m.openset["fpir_at_tau"] == pytest.approx(fpir(tails, m.calibration.tau, 50), abs=1e-6)
    assert m.openset["fpir_at_tau"] <= 0.05
    assert m.openset["fnir_at_tau"] == pytest.approx(fnir(tails, m.calibration.tau, 50), abs=1e-6)
    assert m.openset["probes"] == tails.top.shape[0] == m.baseline.num_images
    store = {"store_url": f"sqlite:///{tmp_path / 's.db'}"}
    with TestClient(create_app(make_settings(tmp_path / "art", store))) as c:
        info = c.get("/v1/model").json()
    assert info["threshold"] == m.calibration.tau
    assert info["open_set"] == {
        "threshold_target": "fpir",
        "target_fpir": 0.05,
        "reference_gallery_size": 50,
        "fpir_at_threshold": m.openset["fpir_at_tau"],
        "fnir_at_threshold": m.openset["fnir_at_tau"],
        "fpir_from_pair_far": m.openset["fpir_from_pair_far"],
    }


def test_bad_open_set_targets_are_config_errors() -> None:
    for bad, says in (
        ("target_fpir=0", "target_fpir must lie in (0, 1)"),
        ("target_fpir=1", "target_fpir must lie in (0, 1)"),
        ("reference_gallery_size=0", "reference_gallery_size must be >= 1"),
        ("threshold_target=fnir", "threshold_target must be 'far' or 'fpir'"),
    ):
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, [*DIGITS, bad])
