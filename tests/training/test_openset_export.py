"""1:N open-set calibration end to end: an export with threshold_target=fpir carries tau at the
target FPIR for its reference gallery size, the probes' tails file, and /v1/model states it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def test_openset_command_adds_what_an_export_would_have(tmp_path: Path) -> None:
    """``tcm-train openset`` on an artefact exported without the section (as the committed
    default was) re-embeds its held-out classes and writes what the export writes now."""
    import dataclasses

    from typer.testing import CliRunner

    from tcm.artefact import write_manifest
    from training.cli import app

    train_evaluate_export(
        load_config(None, DIGITS), tmp_path / "run", tmp_path / "art", plots=False, progress=False
    )
    exported = read_manifest(tmp_path / "art")
    want = load_openset(tmp_path / "art", exported)
    (tmp_path / "art" / exported.openset["file"]).unlink()
    write_manifest(tmp_path / "art", dataclasses.replace(exported, openset=None))
    assert read_manifest(tmp_path / "art").openset is None
    r = CliRunner().invoke(app, ["openset", str(tmp_path / "art")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    added = read_manifest(tmp_path / "art")
    assert added.openset == exported.openset and added.calibration == exported.calibration
    got = load_openset(tmp_path / "art", added)
    assert got is not None and want is not None
    np.testing.assert_array_equal(got.top, want.top)
    assert "expected FPIR" in r.output
