"""Optimiser and learning-rate schedule factories.

Proxy-based losses (ProxyAnchor, ArcFace) learn one proxy per class; the proxies start random and
need a larger step than the pretrained-or-not backbone, so they get their own parameter group
(``proxy_lr``, no weight decay).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import TrainConfig


def parameter_groups(model: nn.Module, loss: nn.Module, config: TrainConfig) -> list[dict]:
    if config.freeze_backbone and config.tune_blocks:  # pretrained blocks: a smaller step
        from training.partial import tuned_suffix

        suffix = tuned_suffix(model)
        tuned = {id(p) for p in suffix.parameters()}
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in tuned], "lr": config.lr},
            {"params": list(suffix.parameters()), "lr": config.lr * config.tune_lr_factor},
        ]
    else:
        groups = [{"params": list(model.parameters()), "lr": config.lr}]
    proxy_params = list(loss.parameters())
    if proxy_params:
        groups.append({"params": proxy_params, "lr": config.proxy_lr, "weight_decay": 0.0})
    return groups


def build_optimiser(
    model: nn.Module, loss: nn.Module, config: TrainConfig
) -> torch.optim.Optimizer:
    groups = parameter_groups(model, loss, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def build_scheduler(
    optimiser: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay to 0 over ``epochs * steps_per_epoch`` steps, stepped once per batch.

    Resuming with a larger ``epochs`` stretches the remaining schedule from the saved step on.
    """
    total = config.epochs * config.steps_per_epoch

    def factor(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
