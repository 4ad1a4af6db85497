"""Retrieval metrics for reports: Recall@k and MAP@R (Musgrave et al., 2020), blockwise.

Each sample queries all others (itself excluded). Queries whose class has no other sample are
skipped, since neither metric is defined for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tcm._pairs import DEFAULT_BLOCK, prepare


def retrieval_metrics(
    embeddings: object,
    labels: object,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    block_size: int = DEFAULT_BLOCK,
) -> dict[str, float]:
    """``{"recall_at_<k>": ..., "map_at_r": ..., "num_queries": ...}``."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    ps = prepare(embeddings, labels)
    n = ps.emb.shape[0]
    sizes = torch.as_tensor(ps.class_sizes, device=ps.emb.device)[ps.codes]
    r_all = sizes - 1  # relevant items per query
    kmax = min(n - 1, max(max(int(k) for k in ks), int(r_all.max())))
    hits = {int(k): 0.0 for k in ks}
    ap_sum, n_queries = 0.0, 0
    ranks = torch.arange(1, kmax + 1, device=ps.emb.device, dtype=ps.emb.dtype)
    for i0 in range(0, n, block_size):
        q = ps.emb[i0 : i0 + block_size]
        scores = q @ ps.emb.T
        rows = torch.arange(q.shape[0], device=q.device)
        scores[rows, rows + i0] = -torch.inf
        top = scores.topk(kmax, dim=1).indices
        rel = ps.codes[top] == ps.codes[i0 : i0 + block_size, None]
        r = r_all[i0 : i0 + block_size]
        keep = r > 0
        rel, r = rel[keep], r[keep]
        n_queries += int(keep.sum())
        for k in hits:
            hits[k] += float(rel[:, :k].any(dim=1).sum())
        relf = rel.to(ps.emb.dtype)
        precision = relf.cumsum(dim=1) / ranks
        within = ranks[None, :] <= r[:, None]
        ap_sum += float(((precision * relf * within).sum(dim=1) / r).sum())
    if n_queries == 0:
        raise ValueError("no class has 2 or more samples: retrieval metrics are undefined")
    out = {f"recall_at_{k}": hits[k] / n_queries for k in hits}
    out["map_at_r"] = ap_sum / n_queries
    out["num_queries"] = float(n_queries)
    return out


def recall_at_k(embeddings: object, labels: object, k: int = 1) -> float:
    return retrieval_metrics(embeddings, labels, ks=(k,))[f"recall_at_{k}"]


def map_at_r(embeddings: object, labels: object) -> float:
    return retrieval_metrics(embeddings, labels, ks=(1,))["map_at_r"]
