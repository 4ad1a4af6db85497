"""The AS-norm cohort of an artefact (``tcm.asnorm``): embeddings of training-class images,
whose identities no gallery holds (the training classes are disjoint from every evaluation and
served population by construction of the splits), and tau recalibrated on AS-normalised
held-out pair scores (:func:`tcm.artefact.add_cohort`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tcm import Manifest
from tcm.artefact import MAX_COHORT, add_cohort
from training.data import Splits
from training.evaluate import embed

DEFAULT_COHORT_SIZE = MAX_COHORT
DEFAULT_TOP_K = 200


def pick_cohort(labels: torch.Tensor, size: int, *, seed: int = 0) -> torch.Tensor:
    """Up to ``size`` row indices spread evenly over the classes: classes take turns (in a
    seeded order), each giving its next image (seeded order within the class), so a small
    cohort still covers many identities. Sorted ascending."""
    if size < 1:
        raise ValueError(f"the cohort size must be >= 1, got {size}")
    g = torch.Generator().manual_seed(seed)
    queues = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        queues.append(members[torch.randperm(len(members), generator=g)].tolist())
    order = torch.randperm(len(queues), generator=g).tolist()
    picked: list[int] = []
    depth = 0
    while len(picked) < size and any(depth < len(q) for q in queues):
        for q in (queues[i] for i in order):
            if depth < len(q) and len(picked) < size:
                picked.append(q[depth])
        depth += 1
    return torch.tensor(sorted(picked), dtype=torch.long)


def cohort_onto(
    artefact: str | Path,
    manifest: Manifest,
    model: nn.Module,
    splits: Splits,
    *,
    size: int = DEFAULT_COHORT_SIZE,
    top_k: int = DEFAULT_TOP_K,
    seed: int = 0,
    heldout: torch.Tensor | None = None,
) -> Manifest:
    """Embeds up to ``size`` training-class images as the cohort and recalibrates the
    artefact's tau on its held-out classes (``heldout``: their embeddings, when the caller
    has them already). ``model`` embeds the splits' inputs (the head, for cached features)."""
    idx = pick_cohort(splits.train.y, min(size, MAX_COHORT), seed=seed)
    if top_k > len(idx):
        raise ValueError(
            f"cohort top-k {top_k} exceeds the {len(idx)} training images the cohort has; "
            "lower --top-k (cohort_top_k)"
        )
    cohort = embed(model, splits.train.x[idx], device="cpu")
    held = heldout if heldout is not None else embed(model, splits.test.x, device="cpu")
    return add_cohort(
        artefact,
        manifest,
        cohort.numpy(),
        held.numpy(),
        splits.test.y.numpy(),
        top_k=top_k,
    )
