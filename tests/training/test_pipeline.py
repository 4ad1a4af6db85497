"""fit -> evaluate -> export -> the artefact loads, embeds identically and reproduces its FAR."""

import json
import re

import pytest
import torch

from tcm import load_artefact, to_input_tensor
from tests.training.conftest import DIGITS, OMNIGLOT_SMALL
from training.config import load_config
from training.data import load_raw, load_splits
from training.evaluate import embed
from training.pipeline import evaluate_run, export_run, train_evaluate_export
from training.trainer import load_trained_model

CASES = {"digits": DIGITS, "omniglot": OMNIGLOT_SMALL}


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp(request.param)
    cfg = load_config(None, [*CASES[request.param], f"data_dir={data_dir}"])
    result = train_evaluate_export(cfg, root / "run", root / "artefact", progress=False)
    return cfg, root, result


def _held_out_raw(cfg):
    """The held-out images as decoded from disk (uint8 digits, bool Omniglot), before any
    preprocessing, restricted to the classes the run evaluated on."""
    _, test_raw = load_raw(cfg)
    keep = set(load_splits(cfg).test.y.tolist())
    idx = [i for i, y in enumerate(test_raw.labels) if int(y) in keep]
    return [test_raw.images[i] for i in idx], torch.as_tensor(test_raw.labels[idx])


def test_report_has_accuracy_and_consistency(trained) -> None:
    cfg, root, _ = trained
    report = json.loads((root / "run" / "report.json").read_text())
    for key in (
        "recall_at_1",
        "map_at_r",
        "opis",
        "eps_opis",
        "calibration",
        "per_class_at_tau",
        "history",
        "config",
        "data",
    ):
        assert key in report
    classes = report["num_classes"]
    assert classes == (5 if cfg.dataset == "digits" else 30)
    # trained: well above chance (1/classes); the digits model is small but 5 classes are easy
    assert report["recall_at_1"] > (0.6 if cfg.dataset == "digits" else 3 / classes)
    assert report["opis"] > 0 and report["eps_opis"] >= report["opis"]
    cal = report["calibration"]
    assert 0 < cal["far"] <= cfg.target_far
    assert cal["tau_lo"] <= cal["tau"] <= cal["tau_hi"]
    assert cal["tar"] == pytest.approx(1 - cal["frr"])
    spread = report["per_class_at_tau"]
    assert spread["far_min"] <= cal["far"] <= spread["far_max"]
    assert report["config"] == cfg.to_dict()
    for png in ("utility_curves.png", "score_histogram.png"):
        assert (root / "run" / png).stat().st_size > 5000
    if cfg.dataset == "digits":
        assert (root / "run" / "embedding_2d.png").stat().st_size > 5000


def test_artefact_embeds_identically_and_reproduces_far(trained) -> None:
    cfg, root, result = trained
    model, manifest = load_artefact(root / "artefact")
    assert manifest.model_version == result["model_version"]
    pattern = rf"{cfg.dataset}-small_cnn-{cfg.loss}-tcm-\d{{14}}-{manifest.weights_sha256[:8]}"
    assert re.fullmatch(pattern, manifest.model_version)
    assert manifest.baseline.opis == pytest.approx(result["opis"])
    assert manifest.calibration.tau == result["calibration"]["tau"]
    assert manifest.preprocessing.invert == (cfg.dataset == "omniglot")
    # raw held-out pixels through the artefact's own preprocessing, as the service would
    images, y = _held_out_raw(cfg)
    x = to_input_tensor(images, manifest.preprocessing)
    with torch.no_grad():
        emb = model(x)
    trained_model, _ = load_trained_model(root / "run")
    torch.testing.assert_close(
        emb, embed(trained_model, load_splits(cfg).test.x), atol=1e-5, rtol=1e-5
    )
    # the stated FAR (and FRR) at tau hold on the held-out classes, counted pair by pair
    sim = emb @ emb.T
    iu = torch.triu_indices(len(y), len(y), 1)
    s = sim[iu[0], iu[1]]
    neg = y[iu[0]] != y[iu[1]]
    far = float((s[neg] >= manifest.calibration.tau).double().mean())
    assert far == pytest.approx(manifest.calibration.far_at_tau, abs=2e-4)
    assert far <= manifest.calibration.target_far + 2e-4
    frr = float((s[~neg] < manifest.calibration.tau).double().mean())
    assert frr == pytest.approx(manifest.calibration.frr_at_tau, abs=2e-3)
    # the calibration range brackets tau: FAR(tau_lo) ~ far_hi, FAR(tau_hi) ~ far_lo
    far_lo_tau = float((s[neg] >= manifest.calibration.tau_lo).double().mean())
    far_hi_tau = float((s[neg] >= manifest.calibration.tau_hi).double().mean())
    assert far_hi_tau <= cfg.far_lo + 2e-4
    assert far <= far_lo_tau <= cfg.far_hi + 2e-4


def test_export_command_matches_pipeline(trained, tmp_path) -> None:
    _, root, result = trained
    manifest = export_run(root / "run", tmp_path / "again")
    assert manifest.calibration.tau == pytest.approx(result["calibration"]["tau"], abs=1e-6)
    assert manifest.baseline.recall_at_1 == pytest.approx(result["recall_at_1"])
    # same weights -> same sha8 at the end of the version id
    first = load_artefact(root / "artefact")[1]
    assert manifest.weights_sha256 == first.weights_sha256


def test_reevaluation_is_deterministic(trained) -> None:
    _, root, result = trained
    again = evaluate_run(root / "run", plots=False)
    assert again["opis"] == pytest.approx(result["opis"], rel=1e-6)
    assert again["recall_at_1"] == result["recall_at_1"]
