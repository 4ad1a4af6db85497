"""The model factory: a training config -> a ``tcm.build_embedder`` network.

The architecture itself lives in ``tcm.embedders`` (half of the artefact contract); this module only
decides which keyword arguments a config passes, so that the very same kwargs go into the
checkpoint, the exported manifest and the service's rebuild.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tcm import build_embedder
from training.config import TrainConfig


def architecture_kwargs(config: TrainConfig, in_channels: int) -> dict[str, Any]:
    """JSON-ready kwargs for ``tcm.build_embedder(config.arch, **kwargs)``."""
    kwargs: dict[str, Any] = {"in_channels": in_channels, "embedding_dim": config.embedding_dim}
    if config.arch == "small_cnn":
        kwargs.update(width=config.width, norm=config.norm)
    if config.arch == "vit":
        kwargs["image_size"] = config.image_size
    return kwargs


def build_model(config: TrainConfig, in_channels: int) -> nn.Module:
    return build_embedder(config.arch, **architecture_kwargs(config, in_channels))
