"""Embedding architectures that an artefact can name.

They live in ``tcm`` (not in ``training``) because they are half of the artefact contract: the
training package builds and trains them, the service rebuilds them from a manifest's
``architecture`` entry and loads the safetensors weights into them, and neither imports the other.
Every embedder maps images ``(N, C, H, W)`` to L2-normalised embeddings ``(N, D)``.

The small CNN is plain torch and trains in minutes on a 2-core CPU. ResNets come from torchvision
and ViTs from timm when those are installed (the ``gpu`` extra); their import is deferred so that
CPU-only installs never need them. Pretrained weights are never downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class L2Normalise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1)


class SmallCNN(nn.Module):
    """Four conv blocks (conv-BN-ReLU, max-pool), global average pool, linear projection."""

    def __init__(self, in_channels: int = 1, embedding_dim: int = 128, width: int = 64,
                 norm: str = "batch") -> None:
        """``norm="group"`` gives batch-independent normalisation: DDP on CPU (where
        SyncBatchNorm is unavailable) then computes exactly what one process would."""
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(4):
            out = width * (2 if i >= 2 else 1)
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out) if norm == "batch" else nn.GroupNorm(min(8, out), out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, embedding_dim)
        self.norm = L2Normalise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.norm(self.head(x))


class BackboneWithHead(nn.Module):
    """A feature extractor with a linear projection head and L2-normalised output."""

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.norm = L2Normalise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(self.backbone(x)))


class FaceHead(nn.Module):
    """A trainable head on frozen face descriptors (not images): ``(N, in_dim) -> (N, D)``.

    The descriptor (dlib's 128-d ResNet, computed by ``facekit`` outside torch) is L2-normalised
    first, so the head sees directions only. ``kind="linear"`` starts as the identity when the
    dimensions agree: training starts from the raw descriptor's geometry and moves away from it
    only as far as the loss asks. ``kind="mlp"`` adds one hidden ReLU layer with a residual
    linear path. ``kind="none"`` serves the raw descriptor (no parameters).
    """

    def __init__(self, in_dim: int = 128, embedding_dim: int = 128, kind: str = "linear",
                 hidden: int = 256) -> None:
        super().__init__()
        if kind not in ("none", "linear", "mlp"):
            raise ValueError(f"face head kind must be 'none', 'linear' or 'mlp', got {kind!r}")
        if kind == "none" and embedding_dim != in_dim:
            raise ValueError("a 'none' head keeps the descriptor's dimension")
        self.kind = kind
        self.linear = nn.Linear(in_dim, embedding_dim) if kind != "none" else None
        if self.linear is not None and in_dim == embedding_dim:
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(in_dim))
                self.linear.bias.zero_()
        self.mlp = (nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(),
                                  nn.Linear(hidden, embedding_dim)) if kind == "mlp" else None)
        if self.mlp is not None:
            nn.init.zeros_(self.mlp[2].weight)  # the residual branch starts silent
            nn.init.zeros_(self.mlp[2].bias)
        self.norm = L2Normalise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        if self.linear is None:
            return self.norm(x)
        y = self.linear(x)
        if self.mlp is not None:
            y = y + self.mlp(x)
        return self.norm(y)


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(in_channels: int = 3, embedding_dim: int = 512, **_: Any) -> nn.Module:
        try:
            import torchvision
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ValueError(
                f"architecture 'resnet{depth}' needs torchvision; install the 'gpu' extra "
                "(pip install '.[gpu]') or use 'small_cnn'"
            ) from exc
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        return BackboneWithHead(net, feature_dim, embedding_dim)

    return build


def _vit(in_channels: int = 3, embedding_dim: int = 384, image_size: int = 224,
         variant: str = "vit_small_patch16_224", **_: Any) -> nn.Module:
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ValueError(
            "architecture 'vit' needs timm; install the 'gpu' extra or use 'small_cnn'"
        ) from exc
    net = timm.create_model(variant, pretrained=False, num_classes=0, in_chans=in_channels,
                            img_size=image_size)
    return BackboneWithHead(net, net.num_features, embedding_dim)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
    "vit": _vit,
    "face_head": FaceHead,
}


def build_embedder(name: str, **kwargs: Any) -> nn.Module:
    """Builds the architecture ``name`` with ``kwargs`` (as stored in a manifest)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kwargs)
