"""Threshold-Consistent Margin (TCM) regulariser (Zhang et al., ICLR 2024).

Written here rather than taken from pytorch-metric-learning because PML 2.7-2.9 indexes the query
tensor with reference indices when ``ref_emb`` is given (a memory bank); the formula is otherwise
the same and tests check equality with PML where no reference set is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check(name: str, value: float, lo: float, hi: float) -> float:
    value = float(value)
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return value


class TCMLoss(nn.Module):
    """``L_TCM = lambda_plus * mean(m_plus - s | s in S+, s <= m_plus)
    + lambda_minus * mean(s - m_minus | s in S-, s >= m_minus)``.

    Only hard pairs count; a term with no hard pair is zero (and still carries grad). Add it to any
    base loss: ``loss = base(emb, labels) + tcm(emb, labels)``.
    """

    def __init__(
        self,
        m_plus: float = 0.9,
        m_minus: float = 0.5,
        lambda_plus: float = 1.0,
        lambda_minus: float = 1.0,
    ) -> None:
        super().__init__()
        self.m_plus = _check("m_plus", m_plus, -1.0, 1.0)
        self.m_minus = _check("m_minus", m_minus, -1.0, 1.0)
        self.lambda_plus = _check("lambda_plus", lambda_plus, 0.0, float("inf"))
        self.lambda_minus = _check("lambda_minus", lambda_minus, 0.0, float("inf"))

    def extra_repr(self) -> str:
        return (
            f"m_plus={self.m_plus}, m_minus={self.m_minus}, "
            f"lambda_plus={self.lambda_plus}, lambda_minus={self.lambda_minus}"
        )

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}")
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError("labels must be 1-D with one label per embedding")
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("give ref_emb and ref_labels together")
        query = F.normalize(embeddings.float(), dim=1)
        if ref_emb is None:
            ref, rlabels = query, labels
        else:
            if ref_emb.ndim != 2 or ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError("ref_emb must be 2-D with the embeddings' dimension")
            if ref_labels.shape[0] != ref_emb.shape[0]:  # type: ignore[union-attr]
                raise ValueError("ref_labels must have one label per ref_emb row")
            ref, rlabels = F.normalize(ref_emb.float(), dim=1), ref_labels
        if indices_tuple is None:
            # Dense masked sums over the whole similarity matrix: no boolean indexing (which
            # copies and synchronises), so the regulariser costs a few elementwise passes.
            sims = query @ ref.T
            pos_mask = labels.view(-1, 1) == rlabels.view(1, -1)  # type: ignore[union-attr]
            neg_mask = ~pos_mask
            if ref_emb is None:
                pos_mask = pos_mask & ~torch.eye(
                    len(labels), dtype=torch.bool, device=labels.device
                )
            pos_sims = neg_sims = sims
        else:
            a1, p, a2, n = _to_pairs(indices_tuple)
            pos_sims = (query[a1] * ref[p]).sum(dim=1)
            neg_sims = (query[a2] * ref[n]).sum(dim=1)
            pos_mask = neg_mask = None
        pos_hard = pos_sims <= self.m_plus
        neg_hard = neg_sims >= self.m_minus
        if pos_mask is not None:
            pos_hard = pos_hard & pos_mask
            neg_hard = neg_hard & neg_mask
        pos_term = _masked_mean(self.m_plus - pos_sims, pos_hard)
        neg_term = _masked_mean(neg_sims - self.m_minus, neg_hard)
        return self.lambda_plus * pos_term + self.lambda_minus * neg_term


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where() keeps the graph, so a term with no hard pair is a zero that still has grad_fn.
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def _to_pairs(indices_tuple: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """PML miner output -> (anchor+, positive, anchor-, negative); triplets (a, p, n) too."""
    if len(indices_tuple) == 4:
        return tuple(indices_tuple)
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        return a, p, a, n
    raise ValueError("indices_tuple must be pairs (a1, p, a2, n) or triplets (a, p, n)")
