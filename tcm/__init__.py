"""Threshold-consistent metric learning: TCM loss, OPIS / eps-OPIS, calibration, retrieval metrics.

Torch and numpy only (safetensors for the artefact format). See ``docs/architecture.md``.

The names below are imported lazily (PEP 562): ``import tcm.exported`` or ``tcm.openset``
must not pull in torch, because the service's operator commands import them and stay
torch-free (``tests/service/test_cli.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE: dict[str, str] = {
    "to_input_tensor": "tcm.preprocess",
    "recall_at_k": "tcm.retrieval",
    "retrieval_metrics": "tcm.retrieval",
    "AtThreshold": "tcm.consistency",
    "Baseline": "tcm.artefact",
    "Calibration": "tcm.artefact",
    "ConsistencyReport": "tcm.consistency",
    "Manifest": "tcm.artefact",
    "PairAccuracy": "tcm.verification",
    "Preprocessing": "tcm.preprocess",
    "TCMLoss": "tcm.loss",
    "ThresholdCalibration": "tcm.calibration",
    "accuracy_at": "tcm.verification",
    "best_accuracy_threshold": "tcm.verification",
    "build_embedder": "tcm.embedders",
    "calibrate_threshold": "tcm.calibration",
    "calibrate_threshold_from_scores": "tcm.calibration",
    "consistency_from_scores": "tcm.consistency",
    "consistency_report": "tcm.consistency",
    "eps_opis": "tcm.consistency",
    "impostor_pairs_needed": "tcm.calibration",
    "kfold_pair_accuracy": "tcm.verification",
    "load_artefact": "tcm.artefact",
    "load_cohort": "tcm.artefact",
    "load_openset": "tcm.artefact",
    "load_reference": "tcm.artefact",
    "map_at_r": "tcm.retrieval",
    "opis": "tcm.consistency",
    "range_average": "tcm.consistency",
    "read_manifest": "tcm.artefact",
    "roc_points": "tcm.verification",
    "save_artefact": "tcm.artefact",
    "save_cohort": "tcm.artefact",
    "save_openset": "tcm.artefact",
    "save_reference": "tcm.artefact",
    "tar_at_far": "tcm.verification",
    "threshold_at_far": "tcm.calibration",
    "utility": "tcm.consistency",
}

__all__ = [
    "AtThreshold",
    "Baseline",
    "Calibration",
    "ConsistencyReport",
    "Manifest",
    "PairAccuracy",
    "Preprocessing",
    "TCMLoss",
    "ThresholdCalibration",
    "accuracy_at",
    "best_accuracy_threshold",
    "build_embedder",
    "calibrate_threshold",
    "calibrate_threshold_from_scores",
    "consistency_from_scores",
    "consistency_report",
    "eps_opis",
    "impostor_pairs_needed",
    "kfold_pair_accuracy",
    "load_artefact",
    "load_cohort",
    "load_openset",
    "load_reference",
    "map_at_r",
    "opis",
    "range_average",
    "read_manifest",
    "recall_at_k",
    "retrieval_metrics",
    "roc_points",
    "save_artefact",
    "save_cohort",
    "save_openset",
    "save_reference",
    "tar_at_far",
    "threshold_at_far",
    "to_input_tensor",
    "utility",
]

if TYPE_CHECKING:
    from tcm.artefact import (
        Baseline,
        Calibration,
        Manifest,
        load_artefact,
        load_cohort,
        load_openset,
        load_reference,
        read_manifest,
        save_artefact,
        save_cohort,
        save_openset,
        save_reference,
    )
    from tcm.calibration import (
        ThresholdCalibration,
        calibrate_threshold,
        calibrate_threshold_from_scores,
        impostor_pairs_needed,
        threshold_at_far,
    )
    from tcm.consistency import (
        AtThreshold,
        ConsistencyReport,
        consistency_from_scores,
        consistency_report,
        eps_opis,
        opis,
        range_average,
        utility,
    )
    from tcm.embedders import build_embedder
    from tcm.loss import TCMLoss
    from tcm.preprocess import Preprocessing, to_input_tensor
    from tcm.retrieval import map_at_r, recall_at_k, retrieval_metrics
    from tcm.verification import (
        PairAccuracy,
        accuracy_at,
        best_accuracy_threshold,
        kfold_pair_accuracy,
        roc_points,
        tar_at_far,
    )


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use and cache the attribute."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'tcm' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
