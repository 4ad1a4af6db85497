"""Threshold-consistent metric learning: TCM loss, OPIS / eps-OPIS, calibration, retrieval metrics.

Torch and numpy only (safetensors for the artefact format). See ``docs/architecture.md``.
"""

from tcm.artefact import (
    Baseline,
    Calibration,
    Manifest,
    load_artefact,
    load_openset,
    load_reference,
    read_manifest,
    save_artefact,
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
    "save_openset",
    "save_reference",
    "tar_at_far",
    "threshold_at_far",
    "to_input_tensor",
    "utility",
]
