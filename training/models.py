"""The model factory: a training config -> a ``tcm.build_embedder`` network.

The architecture itself lives in ``tcm.embedders`` (half of the artefact contract); this module only
decides which keyword arguments a config passes, so that the very same kwargs go into the
checkpoint, the exported manifest and the service's rebuild.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tcm import build_embedder
from tcm.embedders import PRETRAINED, file_sha256, pretrained_weights_file
from training.config import TrainConfig


def architecture_kwargs(config: TrainConfig, in_channels: int) -> dict[str, Any]:
    """JSON-ready kwargs for ``tcm.build_embedder(config.arch, **kwargs)``."""
    kwargs: dict[str, Any] = {"in_channels": in_channels, "embedding_dim": config.embedding_dim}
    if config.arch == "small_cnn":
        kwargs.update(width=config.width, norm=config.norm)
    if config.arch in PRETRAINED:
        # the packaged ImageNet weights, pinned by their file's sha256
        kwargs.update(
            in_channels=3,
            weights="imagenet",
            backbone_sha256=file_sha256(pretrained_weights_file(config.arch)),
        )
    return kwargs


def build_model(config: TrainConfig, in_channels: int) -> nn.Module:
    """With ``freeze_backbone`` the training input is the backbone's features (``in_channels``
    is their width) and only the head is built; :func:`full_model` puts it on the backbone.
    With ``tune_blocks`` the input is the feature maps at the tuned blocks' input, and those
    blocks are built with the head (``training.partial``)."""
    if config.freeze_backbone and config.tune_blocks:
        from training.partial import partial_model

        return partial_model(config.arch, config.tune_blocks, config.embedding_dim)
    if config.freeze_backbone:
        return build_embedder(
            "feature_head", in_features=in_channels, embedding_dim=config.embedding_dim
        )
    return build_embedder(config.arch, **architecture_kwargs(config, in_channels))


def full_model(model: nn.Module, config: TrainConfig) -> tuple[nn.Module, tuple[str, ...]]:
    """The network the artefact serves, and the state-dict prefixes it need not store: a head
    trained on cached features goes onto its frozen packaged backbone, which the service
    rebuilds from the wheel (so the artefact holds the head's few hundred KB only). Partially
    tuned blocks go in with the head; only the frozen prefix is left to the wheel."""
    if not config.freeze_backbone:
        return model, ()
    net = build_embedder(config.arch, **architecture_kwargs(config, 3))
    if config.tune_blocks:
        from training.partial import frozen_prefixes, load_into

        load_into(model, net)
        return net, frozen_prefixes(net, config.tune_blocks)
    net.head.load_state_dict(model.head.state_dict())
    return net, ("backbone.",)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        path = path / "model.safetensors"  # an exported artefact
    if not path.is_file():
        raise ValueError(f"pretrained weights {str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read pretrained weights {str(path)!r}: {exc}") from exc
    for key in ("state_dict", "model"):  # common wrappers (Lightning, our checkpoints)
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_pretrained(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Loads the tensors of ``path`` that fit ``model``: either the whole embedder (an artefact,
    a checkpoint) or its backbone (e.g. torchvision ResNet weights, whose ``fc`` and, for other
    channel counts, ``conv1`` are skipped). Raises when nothing fits; returns the counts."""
    state = _read_state(Path(path))
    own = model.state_dict()

    def fitting(prefix: str) -> dict[str, torch.Tensor]:
        return {
            prefix + k: v
            for k, v in state.items()
            if prefix + k in own and own[prefix + k].shape == v.shape
        }

    best = max((fitting(""), fitting("backbone.")), key=len)
    if not best:
        raise ValueError(
            f"none of the {len(state)} tensors in {str(path)!r} fit this "
            f"architecture (names or shapes differ)"
        )
    model.load_state_dict(best, strict=False)
    return {"loaded": len(best), "skipped": len(state) - len(best), "model_tensors": len(own)}
