"""Base losses from pytorch-metric-learning, each optionally plus :class:`tcm.TCMLoss`."""

from __future__ import annotations

import torch
from pytorch_metric_learning import distances, losses
from torch import nn

from tcm import TCMLoss
from training.config import TrainConfig


class CombinedLoss(nn.Module):
    """``base(emb, labels) + tcm(emb, labels)``; reports both terms for progress bars."""

    def __init__(self, base: nn.Module, tcm: TCMLoss | None) -> None:
        super().__init__()
        self.base = base
        self.tcm = tcm
        self.last: dict[str, float] = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        base = self.base(embeddings.float(), labels)
        total = base
        self.last = {"base": float(base.detach())}
        if self.tcm is not None:
            reg = self.tcm(embeddings, labels)
            total = base + reg
            self.last["tcm"] = float(reg.detach())
        return total


def build_loss(config: TrainConfig, num_classes: int) -> CombinedLoss:
    """``num_classes`` sizes the proxies of proxy-based losses (labels must be 0..C-1)."""
    if config.loss == "multi_similarity":
        base: nn.Module = losses.MultiSimilarityLoss(
            alpha=config.ms_alpha, beta=config.ms_beta, base=config.ms_base
        )
    elif config.loss == "contrastive":
        distance = (
            distances.CosineSimilarity()
            if config.contrastive_distance == "cosine"
            else distances.LpDistance()
        )
        base = losses.ContrastiveLoss(
            pos_margin=config.contrastive_pos_margin,
            neg_margin=config.contrastive_neg_margin,
            distance=distance,
        )
    elif config.loss == "supcon":
        base = losses.SupConLoss(temperature=config.supcon_temperature)
    elif config.loss == "proxy_anchor":
        base = losses.ProxyAnchorLoss(
            num_classes=num_classes,
            embedding_size=config.embedding_dim,
            margin=config.proxy_margin,
            alpha=config.proxy_alpha,
        )
    elif config.loss == "arcface":
        base = losses.ArcFaceLoss(
            num_classes=num_classes,
            embedding_size=config.embedding_dim,
            margin=config.arcface_margin,
            scale=config.arcface_scale,
        )
    else:  # pragma: no cover - the config validates the name
        raise ValueError(f"unknown loss {config.loss!r}")
    tcm = None
    if config.tcm:
        tcm = TCMLoss(
            m_plus=config.m_plus,
            m_minus=config.m_minus,
            lambda_plus=config.lambda_plus,
            lambda_minus=config.lambda_minus,
        )
    return CombinedLoss(base, tcm)
