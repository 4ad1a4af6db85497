"""Training a head on frozen, cached face descriptors (base loss, optionally + TCM).

The descriptor network is not trained (dlib's weights are fixed and not differentiable from
torch); the head (:class:`tcm.embedders.FaceHead`) is, on descriptor vectors in memory, so one
head trains in seconds on two cores. Batches hold ``classes_per_batch`` identities with up to
``per_class`` images each, the shape multi-similarity and TCM need (every batch has genuine
pairs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from pytorch_metric_learning import losses

from tcm import TCMLoss
from tcm.embedders import FaceHead


@dataclass(frozen=True)
class HeadConfig:
    kind: str = "linear"
    tcm: bool = False
    m_plus: float = 0.8
    m_minus: float = 0.5
    lambda_plus: float = 1.0
    lambda_minus: float = 1.0
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    ms_base: float = 0.5
    steps: int = 300
    classes_per_batch: int = 32
    per_class: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _batches(labels: np.ndarray, cfg: HeadConfig, rng: np.random.Generator):
    by_class: dict[int, np.ndarray] = {}
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) >= 2:
            by_class[int(c)] = rows
    classes = np.array(sorted(by_class))
    if len(classes) < 2:
        raise ValueError("the head needs at least 2 identities with >= 2 images each")
    p = min(cfg.classes_per_batch, len(classes))
    for _ in range(cfg.steps):
        chosen = rng.choice(classes, size=p, replace=False)
        rows = [
            rng.choice(by_class[c], size=min(cfg.per_class, len(by_class[c])), replace=False)
            for c in chosen
        ]
        yield np.concatenate(rows)


def train_head(descriptors: np.ndarray, labels: np.ndarray, cfg: HeadConfig) -> FaceHead:
    """Descriptors (n, 128) and integer identity labels (n,) -> a trained head (eval mode)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x = torch.as_tensor(np.asarray(descriptors, np.float32))
    y = torch.as_tensor(np.asarray(labels, np.int64))
    head = FaceHead(in_dim=x.shape[1], embedding_dim=x.shape[1], kind=cfg.kind)
    if cfg.kind == "none":
        return head.eval()
    base = losses.MultiSimilarityLoss(alpha=cfg.ms_alpha, beta=cfg.ms_beta, base=cfg.ms_base)
    reg = (
        TCMLoss(
            m_plus=cfg.m_plus,
            m_minus=cfg.m_minus,
            lambda_plus=cfg.lambda_plus,
            lambda_minus=cfg.lambda_minus,
        )
        if cfg.tcm
        else None
    )
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head.train()
    for rows in _batches(y.numpy(), cfg, rng):
        idx = torch.as_tensor(rows)
        emb = head(x[idx])
        loss = base(emb, y[idx])
        if reg is not None:
            loss = loss + reg(emb, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def embed_descriptors(head: FaceHead, descriptors: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out = head(torch.as_tensor(np.asarray(descriptors, np.float32)))
    return out.numpy().astype(np.float32)
