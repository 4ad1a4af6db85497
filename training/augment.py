"""Batch augmentations in torch (torchvision cannot be relied on here): a small random affine.

Applied on the already-normalised batch; ``padding_mode="border"`` fills with the background
(the border of Omniglot, digits and face crops is background), so no colour constant is assumed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(
    x: torch.Tensor,
    *,
    degrees: float = 10.0,
    translate: float = 0.08,
    scale: tuple[float, float] = (0.9, 1.1),
    shear: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = uniform(-degrees, degrees) * math.pi / 180
    s = uniform(*scale)
    sh = uniform(-shear, shear)
    tx, ty = uniform(-translate, translate) * 2, uniform(-translate, translate) * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack(
        [
            torch.stack([cos, -sin + sh, tx], dim=1),
            torch.stack([sin, cos, ty], dim=1),
        ],
        dim=1,
    ).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def horizontal_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    out = x.clone()
    out[flip.to(x.device)] = x[flip.to(x.device)].flip(-1)
    return out


def augment_batch(x: torch.Tensor, dataset: str, generator: torch.Generator) -> torch.Tensor:
    """Sized per data set: characters and digits must not be mirrored; faces may be."""
    if dataset in ("lfw", "att_faces", "imagefolder"):
        x = horizontal_flip(x, generator)
        return random_affine(
            x, degrees=8, translate=0.05, scale=(0.95, 1.05), shear=0.0, generator=generator
        )
    return random_affine(x, generator=generator)
