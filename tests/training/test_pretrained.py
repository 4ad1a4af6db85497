"""Starting from local weights: an exported artefact (fine-tuning) or a backbone's state dict."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tcm import load_artefact
from tcm.embedders import BackboneWithHead
from tests.training.conftest import DIGITS
from training.config import load_config
from training.models import build_model, load_pretrained
from training.pipeline import train_evaluate_export
from training.trainer import fit, load_checkpoint


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pre")
    cfg = load_config(None, [*DIGITS, "epochs=1", "steps_per_epoch=5"])
    train_evaluate_export(cfg, root / "run", root / "artefact", progress=False, plots=False)
    return root / "artefact"


def test_artefact_weights_load_whole(artefact: Path) -> None:
    cfg = load_config(None, DIGITS)
    model = build_model(cfg, in_channels=1)
    counts = load_pretrained(model, artefact)
    assert counts["loaded"] == counts["model_tensors"] and counts["skipped"] == 0
    reference, _ = load_artefact(artefact)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)


def test_fine_tuning_starts_from_the_artefact(artefact: Path, tmp_path: Path) -> None:
    settings = [*DIGITS, "epochs=1", "steps_per_epoch=3"]
    scratch = fit(load_config(None, settings), tmp_path / "scratch", progress=False)
    tuned = fit(
        load_config(None, [*settings, f"pretrained={artefact}"]), tmp_path / "tuned", progress=False
    )
    # a trained start has a lower first-epoch loss than a random one on the same batches
    assert tuned["history"][0]["loss"] < scratch["history"][0]["loss"]
    saved = load_checkpoint(tmp_path / "tuned")
    assert saved["config"]["pretrained"] == str(artefact)


def test_backbone_state_dict_skips_what_does_not_fit(tmp_path: Path) -> None:
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = BackboneWithHead(backbone, 4, 8)
    source = nn.Sequential(nn.Conv2d(1, 4, 3))
    state = {**source.state_dict(), "fc.weight": torch.zeros(10, 4)}  # a classifier to drop
    path = tmp_path / "backbone.pt"
    torch.save(state, path)
    counts = load_pretrained(model, path)
    assert counts == {"loaded": 2, "skipped": 1, "model_tensors": 4}
    torch.testing.assert_close(model.backbone[0].weight, source[0].weight)


def test_unusable_weights_are_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not exist"):
        load_config(None, [*DIGITS, f"pretrained={tmp_path / 'missing.pt'}"])
    path = tmp_path / "other.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(path))
    model = build_model(load_config(None, DIGITS), in_channels=1)
    with pytest.raises(ValueError, match="none of the 1 tensors"):
        load_pretrained(model, path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_pretrained(model, junk)
