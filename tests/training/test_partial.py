"""Partial fine-tuning (training.partial, issue 27's regime (b)): the frozen prefix and the tuned
suffix compose to exactly the packaged backbone, the trained network drops into the served one,
and the artefact leaves out exactly the frozen part."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tcm import Preprocessing, build_embedder
from tcm.embedders import build_pretrained_backbone
from training.config import TrainConfig, load_config
from training.features import cache_key
from training.models import architecture_kwargs, build_model, full_model
from training.optimisation import parameter_groups
from training.partial import FrozenPrefix, TunedSuffix, frozen_prefixes, partial_model

ARCH = "efficientnet_lite0"


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # 96 px, not the served 224: the same modules compose the same way, at a fifth of the cost
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def config(**kw: object) -> TrainConfig:
    settings = [f"arch={ARCH}", "freeze_backbone=true", "tune_blocks=1", "embedding_dim=16"]
    return load_config(None, [*settings, *(f"{k}={v}" for k, v in kw.items())])


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 6])
def test_prefix_then_suffix_is_the_packaged_backbone(images: torch.Tensor, k: int) -> None:
    backbone = build_pretrained_backbone(ARCH)
    want = backbone(images)
    maps = FrozenPrefix(backbone, k)(images)
    assert maps.shape[1:] == ((192, 3, 3) if k == 1 else (112, 6, 6))
    got = TunedSuffix(backbone, k).eval()(maps)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_training_mode_keeps_batchnorm_statistics(images: torch.Tensor) -> None:
    model = partial_model(ARCH, 1, 16)
    maps = FrozenPrefix(build_pretrained_backbone(ARCH), 1)(images).detach()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    model.train()
    assert model.training and bns and not any(m.training for m in bns)
    trained = model(maps)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True))
    assert torch.allclose(trained, model.eval()(maps), atol=1e-6)  # no batch statistics


def test_the_served_network_computes_what_was_trained(images: torch.Tensor) -> None:
    cfg = config()
    model = build_model(cfg, 192)
    assert isinstance(model.backbone, TunedSuffix)
    # move the tuned weights away from ImageNet's, as training would
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    served, exclude = full_model(model, cfg)
    maps = FrozenPrefix(build_pretrained_backbone(ARCH), 1)(images)
    with torch.no_grad():
        assert torch.allclose(served.eval()(images), model.eval()(maps), atol=1e-5)
    # the artefact keeps the tuned part and the head, and leaves the frozen prefix to the wheel
    kept = [k for k in served.state_dict() if not k.startswith(exclude)]
    assert kept and all(
        k.startswith(("backbone.net._blocks.15.", "backbone.net._conv_head.", "backbone.net._bn1."))
        or k.startswith("head.")
        for k in kept
    ), kept
    assert any(k.startswith("backbone.net._blocks.15.") for k in kept)
    # rebuilt from the wheel, then the kept tensors loaded: the same network again
    fresh = build_embedder(ARCH, **architecture_kwargs(cfg, 3))
    fresh.load_state_dict({k: served.state_dict()[k] for k in kept}, strict=False)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(images), served(images), atol=1e-6)


def test_frozen_prefixes_never_cover_a_tuned_block() -> None:
    served = build_embedder(ARCH, **architecture_kwargs(config(), 3))
    prefixes = frozen_prefixes(served, 1)
    assert "backbone.net._blocks.1." in prefixes and "backbone.net._blocks.15." not in prefixes
    assert not any("backbone.net._blocks.15.w".startswith(p) for p in prefixes)


def test_tuned_blocks_take_the_smaller_step() -> None:
    cfg = config(lr=1e-3, tune_lr_factor=0.1)
    model = build_model(cfg, 192)
    groups = parameter_groups(model, torch.nn.Module(), cfg)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each once
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.backbone.parameters()}


@pytest.mark.parametrize(
    "settings, message",
    [
        (["tune_blocks=1"], "needs freeze_backbone"),
        ([f"arch={ARCH}", "freeze_backbone=true", "tune_blocks=-1"], "must be >= 0"),
        ([f"arch={ARCH}", "freeze_backbone=true", "tune_lr_factor=0"], "tune_lr_factor"),
    ],
)
def test_bad_settings_are_refused(settings: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, settings)


def test_the_last_stage_is_a_third_of_the_backbone() -> None:
    """What regime (b) tunes for Lite0 and k = 1 (the figures docs/architecture.md quotes):
    its last block, head convolution and BatchNorm, ~1.0M of the backbone's ~3.4M weights."""
    tuned = sum(p.numel() for p in partial_model(ARCH, 1, 16).backbone.parameters())
    whole = sum(p.numel() for p in build_pretrained_backbone(ARCH).parameters())
    assert (tuned, whole) == (1_017_600, 3_371_008)


def test_too_many_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match=r"tune_blocks must be in 1\.\.16"):
        partial_model(ARCH, 17, 16)


def test_the_cache_key_of_pooled_features_is_unchanged() -> None:
    """Caches extracted before maps existed keep their names: tune_blocks=0 adds no field."""
    spec = Preprocessing()
    blob = json.dumps(
        {"arch": ARCH, "weights": "w", "preprocessing": spec.to_dict(), "data": "d"},
        sort_keys=True,
    )
    assert cache_key(ARCH, "w", spec, "d") == hashlib.sha256(blob.encode()).hexdigest()
    assert cache_key(ARCH, "w", spec, "d", 1) != cache_key(ARCH, "w", spec, "d")
