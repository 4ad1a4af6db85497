"""Writes the artefact the service loads: safetensors weights + manifest with tau, the
calibration range and the baseline consistency measured on held-out classes.

Export is separate from checkpointing: a checkpoint is for resuming (optimiser state, plain dicts
for ``torch.load``), an artefact is for serving (weights only, never a pickle).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes
from torch import nn

from tcm import (
    Baseline,
    Calibration,
    Manifest,
    Preprocessing,
    save_artefact,
    save_openset,
    save_reference,
)
from training.config import TrainConfig
from training.models import architecture_kwargs, full_model


def weights_sha256(model: nn.Module, exclude: tuple[str, ...] = ()) -> str:
    """The sha256 ``tcm.save_artefact`` will record for these weights (same serialisation)."""
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(exclude)
    }
    return hashlib.sha256(safetensors_bytes(state)).hexdigest()


def model_version(config: TrainConfig, weights_digest: str, when: float | None = None) -> str:
    """``<dataset>-<arch>-<loss>[-tcm]-<yyyymmddHHMMSS UTC>-<first 8 of the weights' sha256>``."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(when))
    tcm = "-tcm" if config.tcm else ""
    return f"{config.dataset}-{config.arch}-{config.loss}{tcm}-{stamp}-{weights_digest[:8]}"


def _pair(v: Any) -> tuple[float, float] | None:
    return None if v is None else (float(v[0]), float(v[1]))


def export_artefact(
    model: nn.Module,
    config: TrainConfig,
    result: dict[str, Any],
    preprocessing: Preprocessing,
    in_channels: int,
    out_dir: str | Path,
    data_description: dict[str, Any],
) -> Manifest:
    """``result`` is :func:`training.evaluate.evaluate_embeddings` on the held-out classes."""
    model, exclude = full_model(model.cpu(), config)
    model = model.eval()
    if exclude:
        in_channels = 3
    now = time.time()
    cal = result["calibration"]
    reference_file = ""
    if result.get("_reference") is not None:
        reference_file = save_reference(out_dir, *result["_reference"])
    openset = None
    if result.get("_openset") is not None:
        openset = {"file": save_openset(out_dir, result["_openset"]), **result["openset"]}
    manifest = Manifest(
        model_version=model_version(config, weights_sha256(model, exclude), now),
        architecture=config.arch,
        architecture_kwargs=architecture_kwargs(config, in_channels),
        preprocessing=preprocessing,
        embedding_dim=config.embedding_dim,
        calibration=Calibration(
            tau=cal["tau"],
            target_far=cal["target_far"],
            far_at_tau=cal["far"],
            frr_at_tau=cal["frr"],
            tau_lo=cal["tau_lo"],
            tau_hi=cal["tau_hi"],
            far_range=(config.far_lo, config.far_hi),
            num_thresholds=config.num_thresholds,
            beta=config.beta,
            tau_source=cal.get("tau_source", "calibrated"),
            impostor_pairs=int(cal.get("impostor_pairs", 0)),
            impostor_pairs_needed=int(cal.get("impostor_pairs_needed", 0)),
        ),
        baseline=Baseline(
            opis=result["opis"],
            eps_opis=result["eps_opis"],
            eps=config.eps,
            recall_at_1=result["recall_at_1"],
            map_at_r=result["map_at_r"],
            num_classes=result["num_classes"],
            num_images=result["num_images"],
            opis_interval=_pair(result.get("opis_interval")),
            eps_opis_interval=_pair(result.get("eps_opis_interval")),
            interval_level=float(result.get("interval_level", 0.9)),
            bootstrap_resamples=int(result.get("bootstrap_resamples", 0)),
            reference_file=reference_file,
        ),
        dataset=data_description,
        training_config=config.to_dict(),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        weights_exclude=exclude,
        openset=openset,
    )
    return save_artefact(out_dir, model, manifest)
