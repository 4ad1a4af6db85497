"""Blockwise pass over all unordered pairs of an embedding set: the engine behind OPIS,
calibration and the global FAR quantiles.

Never materialises the N x N similarity matrix or a pair list: it walks the upper triangle in
``block_size`` x ``block_size`` tiles (on the embeddings' device, so CUDA when they are there),
buckets each pair's score against sorted thresholds and scatter-adds per-class counts. Memory is
O(C * T + block_size**2).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_BLOCK = 2048
_FINE_BINS = 1 << 16  # histogram resolution for locating the FAR quantiles (pass 1)


@dataclass(frozen=True)
class PairSet:
    """Validated, normalised embeddings with integer class codes."""

    emb: torch.Tensor  # (N, D), unit rows, float32 or float64
    codes: torch.Tensor  # (N,) int64 in [0, num_codes)
    class_values: list  # label value of each code
    class_sizes: np.ndarray  # (num_codes,)

    @property
    def num_codes(self) -> int:
        return len(self.class_values)


def as_tensor(x: object, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array or tensor: {exc}") from exc


def prepare(embeddings: object, labels: object) -> PairSet:
    emb = as_tensor(embeddings, "embeddings")
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(emb.shape)}")
    if not emb.is_floating_point():
        emb = emb.float()
    dtype = torch.float64 if emb.dtype == torch.float64 else torch.float32
    emb = emb.to(dtype)
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {lab.shape}")
    if lab.shape[0] != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} embeddings but {lab.shape[0]} labels: lengths must match")
    if emb.shape[0] < 2:
        raise ValueError("need at least 2 embeddings")
    if not bool(torch.isfinite(emb).all()):
        raise ValueError("embeddings contain NaN or inf")
    norms = emb.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("embeddings contain an all-zero row, which has no direction")
    values, codes = np.unique(lab, return_inverse=True)
    sizes = np.bincount(codes, minlength=len(values))
    return PairSet(
        emb=emb / norms,
        codes=torch.as_tensor(codes, dtype=torch.int64, device=emb.device),
        class_values=values.tolist(),
        class_sizes=sizes,
    )


def _tiles(
    ps: PairSet, block: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yields (scores, row codes, col codes, valid mask or None) over the strict upper triangle."""
    n = ps.emb.shape[0]
    for i0 in range(0, n, block):
        ei, ci = ps.emb[i0 : i0 + block], ps.codes[i0 : i0 + block]
        for j0 in range(i0, n, block):
            ej, cj = ps.emb[j0 : j0 + block], ps.codes[j0 : j0 + block]
            scores = ei @ ej.T
            valid = None
            if j0 == i0:
                valid = torch.ones_like(scores, dtype=torch.bool).triu(diagonal=1)
            yield scores, ci, cj, valid


def _fine_bin(scores: torch.Tensor) -> torch.Tensor:
    return ((scores + 1.0) * (_FINE_BINS / 2)).floor().long().clamp_(0, _FINE_BINS - 1)


def next_up(value: torch.Tensor) -> float:
    """The smallest representable score above ``value`` in its dtype: with accept iff s >= tau,
    ``tau = next_up(s)`` rejects s and accepts everything above it."""
    return float(
        torch.nextafter(value, torch.tensor(math.inf, dtype=value.dtype, device=value.device))
    )


def num_allowed(far: float, n: int) -> int:
    """How many of n impostor pairs may be accepted at a FAR of ``far`` (float-safe floor)."""
    return min(n, math.floor(far * n * (1 + 1e-12)))


def tau_from_descending(desc: torch.Tensor, far: float) -> float:
    """Smallest tau with FAR(tau) <= far, given impostor scores sorted in descending order."""
    k = num_allowed(far, desc.numel())
    if k >= desc.numel():
        return -1.0
    return next_up(desc[k])


def taus_at_far(ps: PairSet, fars: Sequence[float], block: int = DEFAULT_BLOCK) -> list[float]:
    """Exact ``tau_from_descending`` over all negative pairs, in two blockwise passes: a fine
    histogram locates the bin that holds each order statistic, then the scores in those bins are
    gathered and sorted."""
    hist = torch.zeros(2 * _FINE_BINS, dtype=torch.int64, device=ps.emb.device)
    for scores, ci, cj, valid in _tiles(ps, block):
        code = _fine_bin(scores) * 2 + (ci[:, None] == cj[None, :])  # odd codes: genuine pairs
        if valid is not None:
            code = code[valid]
        hist += torch.bincount(code.reshape(-1), minlength=2 * _FINE_BINS)
    hist = hist[0::2]
    n_neg = int(hist.sum())
    if n_neg == 0:
        raise ValueError("no negative pairs: need at least 2 classes")
    hist_np = hist.cpu().numpy()
    above = np.concatenate([np.cumsum(hist_np[::-1])[::-1], [0]])  # above[b] = #neg in bins >= b
    wanted: dict[int, list[tuple[int, int]]] = {}  # bin -> [(position in fars, rank in bin)]
    result: list[float | None] = []
    for pos, far in enumerate(fars):
        k = num_allowed(far, n_neg)
        if k >= n_neg:
            result.append(-1.0)
            continue
        result.append(None)
        # the (k+1)-th largest negative lies in the bin b with above[b+1] <= k < above[b]
        b = int(np.searchsorted(-above, -k, side="left")) - 1
        b = max(b, 0)
        while above[b + 1] > k:
            b += 1
        wanted.setdefault(b, []).append((pos, k - int(above[b + 1])))
    if wanted:
        bins = torch.tensor(sorted(wanted), device=ps.emb.device)
        gathered: list[torch.Tensor] = []
        for scores, ci, cj, valid in _tiles(ps, block):
            neg = ci[:, None] != cj[None, :]
            if valid is not None:
                neg &= valid
            gathered.append(scores[neg & torch.isin(_fine_bin(scores), bins)])
        cand = torch.cat(gathered)
        cand_bins = _fine_bin(cand)
        for b, requests in wanted.items():
            desc = torch.sort(cand[cand_bins == b], descending=True).values
            for pos, rank in requests:
                result[pos] = next_up(desc[rank])
    return [float(r) for r in result]  # type: ignore[arg-type]


@dataclass(frozen=True)
class PairTables:
    """Per-class bucket counts: ``pos[k, b]`` / ``neg[k, b]`` = pairs of class k whose score has
    exactly b of the sorted thresholds <= it (b in 0..M)."""

    pos: np.ndarray  # (num_codes, M + 1) int64
    neg: np.ndarray  # (num_codes, M + 1) int64
    neg_global: np.ndarray  # (M + 1,) every negative pair once


def pair_tables(ps: PairSet, thresholds: np.ndarray, block: int = DEFAULT_BLOCK) -> PairTables:
    """One blockwise pass: bucket every unordered pair against ``thresholds`` (sorted)."""
    bounds = torch.as_tensor(thresholds, dtype=ps.emb.dtype, device=ps.emb.device)
    m1 = len(thresholds) + 1
    c = ps.num_codes
    row = torch.zeros(c * m1 * 2, dtype=torch.int64, device=ps.emb.device)
    col = torch.zeros(c * m1 * 2, dtype=torch.int64, device=ps.emb.device)
    for scores, ci, cj, valid in _tiles(ps, block):
        # code = bucket * 2 + same, then offset by the row's (or column's) class; the column pass
        # is needed only for its negatives (a cross-class pair is an impostor for both classes).
        code = torch.bucketize(scores, bounds, right=True) * 2
        code += ci[:, None] == cj[None, :]
        by_row = code + (ci * (m1 * 2))[:, None]
        by_col = code + (cj * (m1 * 2))[None, :]
        if valid is not None:
            by_row, by_col = by_row[valid], by_col[valid]
        row += torch.bincount(by_row.reshape(-1), minlength=row.numel())
        col += torch.bincount(by_col.reshape(-1), minlength=row.numel())
    row_np = row.view(c, m1, 2).cpu().numpy()
    col_np = col.view(c, m1, 2).cpu().numpy()[:, :, 0]
    return PairTables(
        pos=row_np[:, :, 1], neg=row_np[:, :, 0] + col_np, neg_global=row_np[:, :, 0].sum(axis=0)
    )


def counts_at_or_above(hist: np.ndarray) -> np.ndarray:
    """(…, M + 1) bucket counts -> (…, M): pairs with score >= threshold j, for each j."""
    total = hist.sum(axis=-1, keepdims=True)
    return total - np.cumsum(hist, axis=-1)[..., :-1]
