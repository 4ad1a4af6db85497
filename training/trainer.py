"""The training loop: seeded, class-balanced, checkpointed atomically each epoch, resumable, and
data-parallel under ``torchrun``.

Reproducibility: every epoch re-seeds torch, numpy and pytorch-metric-learning's sampler RNG from
``(seed, epoch)``, so a resumed run draws the same batches and augmentations as an uninterrupted
one. Distributed: every rank draws the same global batch and embeds its own shard; embeddings are
all-gathered (the local shard keeps its graph) so each rank computes the loss of the whole global
batch, exactly as one process would (pair-based losses and TCM see every pair of the global batch),
and the loss is scaled by the world size because DDP averages gradients. Batch norm has no CPU sync,
so use ``norm=group`` for exact CPU equivalence (CUDA runs convert to SyncBatchNorm).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from training.augment import augment_batch
from training.config import TrainConfig, save_config
from training.data import Splits, load_splits
from training.losses import CombinedLoss, build_loss
from training.models import build_model, load_pretrained
from training.optimisation import build_optimiser, build_scheduler

CHECKPOINT = "checkpoint.pt"
# keys that may differ between a checkpoint and a resumed run (more epochs, another device)
RESUMABLE_DIFFERENCES = {"epochs", "device", "amp", "data_dir"}


@dataclass(frozen=True)
class RunContext:
    rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0, or not distributed; valid before, during and after a ``torchrun`` fit."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available; use device=cpu or auto")
    return torch.device(name)


def init_distributed(config: TrainConfig) -> RunContext:
    """Single process unless launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(config.device)
    if world <= 1:
        return RunContext(0, 1, device)
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must divide by the world size {world}")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return RunContext(dist.get_rank(), world, device, owns)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    pml_common.NUMPY_RANDOM = np.random.RandomState(seed % 2**32)


def _atomic_save(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"no {CHECKPOINT} in {run_dir}: train it first with `tcm-train fit`")
    # plain dicts of tensors and numbers: no pickled objects, so weights_only loading works
    return torch.load(path, map_location="cpu", weights_only=True)


def config_from_checkpoint(saved: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(saved["config"]) - known)
    if unknown:
        raise ValueError(f"the checkpoint's config has keys this version does not know: {unknown}")
    return TrainConfig(**saved["config"])


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    now = config.to_dict()
    diff = sorted(k for k in now if k not in RESUMABLE_DIFFERENCES and saved.get(k) != now[k])
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in diff)
        raise ValueError(
            f"cannot resume: the checkpoint was trained with another config "
            f"({details}); start a new run folder or use the same settings"
        )


def _gather(local: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    if ctx.world_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local.detach())
    parts[ctx.rank] = local  # keep the graph of this rank's shard
    return torch.cat(parts)


def _label_map(y: torch.Tensor) -> torch.Tensor:
    """Class ids -> 0..C-1 (proxy losses index their proxies by label)."""
    return torch.unique(y, return_inverse=True)[1]


def _epoch_order(y: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Sample indices of one epoch, batch after batch, each batch m images of b/m classes."""
    sampler = MPerClassSampler(
        y.numpy(),
        m=config.m_per_class,
        batch_size=config.batch_size,
        length_before_new_iter=config.batch_size * config.steps_per_epoch,
    )
    return torch.as_tensor(list(iter(sampler)), dtype=torch.int64)


def _check_batch_fits(config: TrainConfig, num_classes: int) -> None:
    if config.m_per_class * num_classes < config.batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} needs at least batch_size / m_per_class = "
            f"{config.batch_size // config.m_per_class} training classes, the data has "
            f"{num_classes}: lower batch_size or raise m_per_class"
        )


def _train_step(
    ddp_model: nn.Module,
    loss_fn: CombinedLoss,
    xb: torch.Tensor,
    yb: torch.Tensor,
    optimiser: torch.optim.Optimizer,
    ctx: RunContext,
    use_amp: bool,
) -> float:
    """One global batch: this rank embeds its shard, the loss sees the whole batch."""
    shard = slice(ctx.rank, None, ctx.world_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
    with autocast:
        local = ddp_model(xb[shard])
    emb = _gather(local.float(), ctx)
    # rows of the gathered batch are ordered by rank, then by position in the shard
    y_global = torch.cat([yb[r :: ctx.world_size] for r in range(ctx.world_size)])
    loss = loss_fn(emb, y_global)
    optimiser.zero_grad(set_to_none=True)
    (loss * ctx.world_size).backward()
    if ctx.world_size > 1:
        # proxies sit outside DDP (no averaging): every rank holds world_size x the full gradient
        for p in loss_fn.parameters():
            if p.grad is not None:
                p.grad /= ctx.world_size
    optimiser.step()
    return float(loss.detach())


def fit(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    splits: Splits | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Trains, checkpointing each epoch into ``run_dir``; returns the run's history.

    ``stop_after_epoch`` ends the run early (a time-boxed job, or a simulated interruption)
    without changing the config, so the learning-rate schedule is the full run's and a later
    ``resume=True`` continues exactly where an uninterrupted run would be.
    """
    run = Path(run_dir)
    saved = None
    if resume:
        saved = load_checkpoint(run)
        check_resumable(saved["config"], config)
    elif (run / CHECKPOINT).exists():
        raise ValueError(
            f"{run} already holds a checkpoint: pass --resume to continue it, or "
            "choose another run folder"
        )
    splits = splits or load_splits(config)
    train = splits.train
    y_train = _label_map(train.y)
    num_classes = int(y_train.max()) + 1
    _check_batch_fits(config, num_classes)
    ctx = init_distributed(config)
    try:
        return _fit(
            config, run, ctx, splits, y_train, num_classes, saved, progress, stop_after_epoch
        )
    finally:
        if ctx.owns_process_group:
            dist.destroy_process_group()


def _fit(
    config: TrainConfig,
    run: Path,
    ctx: RunContext,
    splits: Splits,
    y_train: torch.Tensor,
    num_classes: int,
    saved: dict[str, Any] | None,
    progress: bool,
    stop_after_epoch: int | None,
) -> dict[str, Any]:
    train = splits.train
    run.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    model = build_model(config, train.x.shape[1])
    if config.pretrained and saved is None:
        counts = load_pretrained(model, config.pretrained)
        if ctx.is_main:
            print(
                f"pretrained: {counts['loaded']} of {counts['model_tensors']} tensors loaded "
                f"from {config.pretrained} ({counts['skipped']} skipped)",
                flush=True,
            )
    loss_fn = build_loss(config, num_classes)
    start_epoch, history = 0, []
    if saved is not None:
        model.load_state_dict(saved["model"])
        loss_fn.load_state_dict(saved["loss"])
    model.to(ctx.device)
    loss_fn.to(ctx.device)
    if ctx.world_size > 1 and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimiser = build_optimiser(model, loss_fn, config)
    scheduler = build_scheduler(optimiser, config)
    if saved is not None:
        optimiser.load_state_dict(saved["optimiser"])
        scheduler.load_state_dict(saved["scheduler"])
        start_epoch, history = int(saved["epoch"]), list(saved["history"])
    ddp_model: nn.Module = model
    if ctx.world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    use_amp = config.amp and ctx.device.type == "cuda"
    if ctx.is_main:
        save_config(config, run / "config.yaml")
    # the whole (preprocessed) training set fits in memory for the sets this project uses
    x_all = train.x.to(ctx.device)
    y_dev = y_train.to(ctx.device)
    total_steps = config.epochs * config.steps_per_epoch
    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not (progress and ctx.is_main),
    )
    with bar:
        task = bar.add_task(
            "train", total=total_steps, completed=start_epoch * config.steps_per_epoch, info=""
        )
        for epoch in range(start_epoch, last_epoch):
            seed_everything(config.seed * 1000 + epoch)
            generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            order = _epoch_order(y_train, config).to(ctx.device)
            model.train()
            t0 = time.perf_counter()
            losses_epoch = []
            for step in range(config.steps_per_epoch):
                idx = order[step * config.batch_size : (step + 1) * config.batch_size]
                xb = x_all[idx]
                if config.augment and not config.freeze_backbone:  # features: no pixels
                    xb = augment_batch(xb, config.dataset, generator)
                losses_epoch.append(
                    _train_step(ddp_model, loss_fn, xb, y_dev[idx], optimiser, ctx, use_amp)
                )
                scheduler.step()
                info = " ".join(f"{k}={v:.4f}" for k, v in loss_fn.last.items())
                bar.update(task, advance=1, info=f"epoch {epoch + 1}/{config.epochs} {info}")
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": float(np.mean(losses_epoch)),
                    **{f"last_{k}": v for k, v in loss_fn.last.items()},
                    "seconds": time.perf_counter() - t0,
                }
            )
            if ctx.is_main:
                _atomic_save(
                    {
                        "epoch": epoch + 1,
                        "config": config.to_dict(),
                        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "loss": {k: v.detach().cpu() for k, v in loss_fn.state_dict().items()},
                        "optimiser": optimiser.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "history": history,
                        "in_channels": int(train.x.shape[1]),
                    },
                    run / CHECKPOINT,
                )
    if ctx.is_main:
        (run / "history.json").write_text(json.dumps(history, indent=2))
    if ctx.world_size > 1:
        dist.barrier()
    return {"history": history, "data": splits.description}


def load_trained_model(run_dir: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The model of a run's last checkpoint (eval mode, CPU) with its config."""
    saved = load_checkpoint(run_dir)
    config = config_from_checkpoint(saved)
    model = build_model(config, int(saved["in_channels"]))
    model.load_state_dict(saved["model"])
    return model.eval(), config
