"""The served model: version, threshold and calibration, and the progress of a model switch
this replica is running (public)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.auth_first import AuthFirstRoute
from service.api.dependencies import RuntimeDep
from service.api.schemas import ModelInfo, OpenSetCalibration, ScoreNormalisation, errors

router = APIRouter(tags=["model"], route_class=AuthFirstRoute)


@router.get("/v1/model", responses=errors(400, 503))
async def get_model(runtime: RuntimeDep) -> ModelInfo:
    m = runtime.serving.manifest
    cal, base = m.calibration, m.baseline
    return ModelInfo(
        model_version=m.model_version,
        architecture=m.architecture,
        embedding_dim=m.embedding_dim,
        similarity=m.similarity,
        threshold=cal.tau,
        target_far=cal.target_far,
        far_at_threshold=cal.far_at_tau,
        frr_at_threshold=cal.frr_at_tau,
        calibration_range=(cal.tau_lo, cal.tau_hi),
        far_range=cal.far_range,
        num_thresholds=cal.num_thresholds,
        baseline_opis=base.opis,
        baseline_eps_opis=base.eps_opis,
        baseline_eps=base.eps,
        baseline_recall_at_1=base.recall_at_1,
        baseline_map_at_r=base.map_at_r,
        preprocessing=m.preprocessing.to_dict(),
        created_at=m.created_at,
        weights_sha256=m.weights_sha256,
        open_set=open_set(m.openset) if m.threshold_units == "cosine" else None,
        score_normalisation=score_normalisation(m.score_norm),
        activation=runtime.lifecycle.status() if runtime.lifecycle else None,
    )


def open_set(section: dict[str, Any] | None) -> OpenSetCalibration | None:
    if not section:
        return None
    return OpenSetCalibration(
        threshold_target=section["threshold_target"],
        target_fpir=section["target_fpir"],
        reference_gallery_size=section["reference_gallery_size"],
        fpir_at_threshold=section["fpir_at_tau"],
        fnir_at_threshold=section["fnir_at_tau"],
        fpir_from_pair_far=section["fpir_from_pair_far"],
    )


def score_normalisation(section: dict[str, Any] | None) -> ScoreNormalisation | None:
    if not section:
        return None
    return ScoreNormalisation(
        kind=section["kind"],
        top_k=section["top_k"],
        cohort_size=section["cohort_size"],
        threshold_units=section["threshold_units"],
        cosine_threshold=section["cosine_calibration"]["tau"],
    )
