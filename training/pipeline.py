"""fit -> evaluate -> export as functions, shared by the CLI, the sweeps and the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tcm import Manifest
from training.config import TrainConfig
from training.data import Split, Splits, load_splits
from training.evaluate import (
    embed,
    evaluate_embeddings,
    plot_report,
    report_name,
    write_report,
)
from training.export import export_artefact
from training.trainer import (
    fit,
    is_main_process,
    load_checkpoint,
    load_trained_model,
    resolve_device,
)


def _part(splits: Splits, split: str) -> Split:
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    part = splits.test if split == "test" else splits.val
    if part is None:
        raise ValueError("no validation split: train with val_classes > 0 to evaluate on 'val'")
    return part


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    splits: Splits | None = None,
    plots: bool = True,
    data_dir: str | None = None,
    fallback_tau: float | None = None,
) -> dict[str, Any]:
    """Embeds the held-out (or validation) classes with the run's model and writes its report
    (``fallback_tau``: :func:`training.evaluate.evaluate_embeddings`)."""
    run = Path(run_dir)
    model, config = load_trained_model(run)
    if data_dir is not None:
        config = config.replace(data_dir=data_dir)
    splits = splits or load_splits(config)
    part = _part(splits, split)
    emb = embed(model, part.x, device=resolve_device(config.device))
    result = evaluate_embeddings(emb, part.y, config, fallback_tau=fallback_tau)
    det = None
    if config.dataset == "lfw" and split == "test":  # the official pair protocols as well
        from training.faces import lfw_verification

        result["verification"], det = lfw_verification(
            model,
            splits.preprocessing,
            config.data_dir,
            result["calibration"]["tau"],
            resolve_device(config.device),
        )
    history = load_checkpoint(run)["history"]
    write_report(
        result,
        run,
        split=split,
        extra={
            "split": split,
            "config": config.to_dict(),
            "data": splits.description,
            "history": history,
        },
    )
    if plots:
        title = f"{config.dataset} {config.loss}{' + TCM' if config.tcm else ''} ({split})"
        plot_report(result, emb, part.y, run, title, prefix="" if split == "test" else f"{split}_")
        if det is not None:
            from training.faces import plot_det

            plot_det(det, run / "det.png", title, result["calibration"]["tau"])
    return result


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    splits: Splits | None = None,
    data_dir: str | None = None,
) -> Manifest:
    """Calibrates on the held-out classes and writes the artefact."""
    run = Path(run_dir)
    model, config = load_trained_model(run)
    if data_dir is not None:
        config = config.replace(data_dir=data_dir)
    splits = splits or load_splits(config)
    emb = embed(model, splits.test.x, device=resolve_device(config.device))
    result = evaluate_embeddings(emb, splits.test.y, config)
    manifest = export_artefact(
        model,
        config,
        result,
        splits.preprocessing,
        int(splits.test.x.shape[1]),
        out_dir,
        splits.description,
    )
    return _with_cohort(out_dir, manifest, model, config, splits, emb)


def _with_cohort(
    out_dir: str | Path,
    manifest: Manifest,
    model: nn.Module,
    config: TrainConfig,
    splits: Splits,
    heldout: torch.Tensor | None = None,
) -> Manifest:
    """The exported artefact with an AS-norm cohort when ``cohort_size`` asks for one."""
    if not config.cohort_size:
        return manifest
    from training.cohort import cohort_onto

    return cohort_onto(
        out_dir,
        manifest,
        model,
        splits,
        size=config.cohort_size,
        top_k=config.cohort_top_k,
        seed=config.seed,
        heldout=heldout,
    )


def train_evaluate_export(
    config: TrainConfig,
    run_dir: str | Path,
    artefact_dir: str | Path | None = None,
    *,
    plots: bool = True,
    progress: bool = True,
    resume: bool = False,
    splits: Splits | None = None,
    fallback_tau: float | None = None,
) -> dict[str, Any]:
    """Under torchrun every rank trains; only rank 0 evaluates and exports (others get ``{}``).
    ``fallback_tau``: the tau kept when the held-out classes cannot support a new one."""
    splits = splits or load_splits(config)
    fit(config, run_dir, splits=splits, progress=progress, resume=resume)
    if not is_main_process():
        return {}
    result = evaluate_run(run_dir, splits=splits, plots=plots, fallback_tau=fallback_tau)
    out: dict[str, Any] = {k: v for k, v in result.items() if not k.startswith("_")}
    if artefact_dir is not None:
        model = load_trained_model(run_dir)[0]
        manifest = export_artefact(
            model,
            config,
            result,
            splits.preprocessing,
            int(splits.test.x.shape[1]),
            artefact_dir,
            splits.description,
        )
        manifest = _with_cohort(artefact_dir, manifest, model, config, splits)
        out["model_version"] = manifest.model_version
    return out


def read_report(run_dir: str | Path, split: str = "test") -> dict[str, Any]:
    path = Path(run_dir) / report_name(split)
    if not path.is_file():
        raise ValueError(
            f"no {path.name} in {run_dir}: run "
            f"`tcm-train evaluate --run {run_dir} --split {split}` first"
        )
    return json.loads(path.read_text())
