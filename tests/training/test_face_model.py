"""The face model's build (``tcm-train face-model``): tau calibrated for open-set use.

The descriptors of the validation identities are written into a fresh cache as synthetic
vectors (identities of unequal tightness), so the build runs its real code with no extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facekit import DESCRIPTOR_DIM
from tcm import load_openset, read_manifest
from tcm.openset import fpir
from tests.training.conftest import DATA_DIR
from training import face_cache as fc
from training.face_model import SERVED_OPTIONS, build_face_model


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = Path(DATA_DIR)
    if not (data / fc.LFW_ZIP).is_file():
        pytest.fail(f"shared data sets missing at {DATA_DIR}")
    root = tmp_path_factory.mktemp("face_cache")
    _train, val = fc.served_split(data, 0, 0.15)
    people = sorted({m.split("/")[-2] for m in val})
    rng = np.random.default_rng(0)
    centre = {p: rng.standard_normal(DESCRIPTOR_DIM) for p in people}
    spread = {p: rng.uniform(0.2, 0.6) for p in people}
    vecs = np.stack(
        [
            centre[m.split("/")[-2]]
            + spread[m.split("/")[-2]] * rng.standard_normal(DESCRIPTOR_DIM)
            for m in val
        ]
    )
    folder = root / fc.cache_key(data / fc.LFW_ZIP, SERVED_OPTIONS)
    folder.mkdir(parents=True)
    fc._write_chunk(folder, list(val), vecs, [[0, 0, 1, 1]] * len(val), [True] * len(val))
    return root


def test_tau_honours_the_fpir_target_at_the_reference_gallery(cache: Path, tmp_path: Path) -> None:
    by_far = build_face_model(Path(DATA_DIR), tmp_path / "far", cache_root=cache, target_fpir=None)
    by_fpir = build_face_model(
        Path(DATA_DIR), tmp_path / "fpir", cache_root=cache, target_fpir=0.05
    )
    assert by_far.calibration.tau_source == "calibrated"
    assert by_fpir.calibration.tau_source == "fpir"
    for m, out in ((by_far, "far"), (by_fpir, "fpir")):
        tails = load_openset(tmp_path / out, read_manifest(tmp_path / out))
        assert tails is not None and tails.resolved(m.calibration.tau)
        assert m.openset is not None
        assert m.openset["fpir_at_tau"] == pytest.approx(fpir(tails, m.calibration.tau, 1000))
    assert by_far.openset is not None and by_far.openset["threshold_target"] == "far"
    assert by_fpir.openset is not None and by_fpir.openset["threshold_target"] == "fpir"
    # the 1:N target is met and is stricter here than the pair FAR 1e-3
    assert by_fpir.openset["fpir_at_tau"] <= 0.05 < by_far.openset["fpir_at_tau"]
    assert by_fpir.calibration.tau > by_far.calibration.tau
    assert by_fpir.calibration.far_at_tau < by_far.calibration.far_at_tau


@pytest.mark.parametrize(("target", "size"), [(0.0, 1000), (1.0, 1000), (0.01, 0)])
def test_bad_open_set_settings_are_refused(
    cache: Path, tmp_path: Path, target: float, size: int
) -> None:
    with pytest.raises(ValueError, match=r"target_fpir|gallery size"):
        build_face_model(
            Path(DATA_DIR),
            tmp_path / "x",
            cache_root=cache,
            target_fpir=target,
            reference_gallery_size=size,
        )
