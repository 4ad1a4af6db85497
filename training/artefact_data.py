"""An exported artefact's own data, read back: the training config it was exported with (plus
overrides) and the model that embeds that config's splits. Used where an artefact gains a
section after export (``tcm-train openset``, ``tcm-train cohort``) and by studies that score it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tcm import Manifest, load_artefact
from training.config import TrainConfig, load_config
from training.data import SEEDED_SPLITS, load_splits
from training.evaluate import embed


def artefact_config(manifest: Manifest, overrides: list[str] | None = None) -> TrainConfig:
    """The manifest's training config (keys this version knows), ``overrides`` last."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in manifest.training_config.items() if k in known}
    return load_config(None, overrides or [], base=TrainConfig(**values))


def splits_model(model: nn.Module, config: TrainConfig) -> nn.Module:
    """What embeds ``load_splits(config)``: with a frozen backbone the splits hold its cached
    features, so the artefact's head and norm (with ``tune_blocks``, its feature maps: the tuned
    blocks first); otherwise the whole model."""
    if config.freeze_backbone and config.tune_blocks:
        from training.partial import TunedSuffix

        suffix = TunedSuffix(model.backbone, config.tune_blocks)
        return nn.Sequential(suffix, model.head, model.norm)
    return nn.Sequential(model.head, model.norm) if config.freeze_backbone else model


def held_out_embeddings(
    artefact: Path, overrides: list[str] | None = None
) -> tuple[torch.Tensor, np.ndarray, Manifest, TrainConfig]:
    """The artefact's held-out (test) classes embedded with its own weights: (embeddings,
    labels, manifest, config)."""
    model, manifest = load_artefact(artefact)
    cfg = artefact_config(manifest, overrides)
    if cfg.freeze_backbone and cfg.dataset not in SEEDED_SPLITS:
        # only the held-out side is embedded: an official split's test classes do not depend
        # on the training side, whose backbone features need not be extracted
        cfg = cfg.replace(max_train_classes=2)
    splits = load_splits(cfg)
    emb = embed(splits_model(model, cfg), splits.test.x, device="cpu")
    return emb, np.asarray(splits.test.y), manifest, cfg
