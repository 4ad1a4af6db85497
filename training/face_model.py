"""The served face model (`make run MODEL=faces`): dlib's descriptor + a head trained on LFW.

The head trains on LFW's *peopleDevTrain* identities (first 4 images of each person with >= 2)
minus 15% of them held out as validation identities, on which the global threshold is calibrated
and the baseline consistency measured. peopleDevTest identities are never touched, so
``studies/faces_serve.py`` can enrol and match them as unseen people.
By default there is no head (see SERVED_HEAD below); the study in docs/results.md compares.

Descriptors come from the cache (training/face_cache.py): the first build extracts 3,427 images
(~3 minutes on two free cores at ~22 images/s), later builds reuse them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from facekit import ALIGNER, DESCRIPTOR, DESCRIPTOR_DIM, DETECTOR, FaceOptions, model_checksums
from tcm import (
    Baseline,
    Calibration,
    Manifest,
    Preprocessing,
    calibrate_threshold,
    consistency_report,
    impostor_pairs_needed,
    retrieval_metrics,
    save_artefact,
    save_openset,
)
from tcm.openset import probe_tails, tau_at_fpir
from training import face_cache as fc
from training.evaluate import openset_summary
from training.face_head import HeadConfig, embed_descriptors, train_head

TARGET_FAR = 1e-3
FAR_RANGE = (1e-4, 1e-2)
# What `make run MODEL=faces` serves: the raw descriptor (no head), the global tau calibrated on
# held-out peopleDevTrain identities. In the descriptor study (docs/results.md) a linear head
# trained on LFW lowered every accuracy figure, and TCM on it kept accuracy but raised OPIS, so
# none is served; ``tcm-train face-model --head linear [--tcm]`` still builds one.
SERVED_HEAD = HeadConfig(kind="none")
SERVED_OPTIONS = FaceOptions(fallback="none")
# Users run 1:N identification against galleries of many photos (issue 28): the served tau
# honours an FPIR target at a reference gallery size, measured on the validation identities as
# probes (tcm.openset), rather than the pair FAR, whenever the validation tails can resolve it;
# the pair FAR and FRR at that tau are still reported. The photo model (N photos of N people)
# is used to choose it: galleries hold several photos per person, which accept fewer strangers
# (tcm.openset.fpir_gallery), so the target holds with room.
SERVED_TARGET_FPIR = 1e-2
SERVED_GALLERY_SIZE = 1000


def build_face_model(
    data_dir: Path,
    out: Path,
    *,
    head: HeadConfig = SERVED_HEAD,
    cache_root: Path = fc.DEFAULT_ROOT,
    val_share: float = 0.15,
    progress: Any = None,
    target_fpir: float | None = SERVED_TARGET_FPIR,
    reference_gallery_size: int = SERVED_GALLERY_SIZE,
) -> Manifest:
    """``target_fpir`` None calibrates tau for the pair FAR (TARGET_FAR) instead."""
    if target_fpir is not None and not 0.0 < target_fpir < 1.0:
        raise ValueError(f"target_fpir must lie in (0, 1), got {target_fpir}")
    if reference_gallery_size < 1:
        raise ValueError(f"the reference gallery size must be >= 1, got {reference_gallery_size}")
    train, val = fc.served_split(data_dir, head.seed, val_share)
    members = val + (train if head.kind != "none" else [])
    desc = fc.descriptors(
        data_dir / fc.LFW_ZIP, members, root=cache_root, options=SERVED_OPTIONS, progress=progress
    )
    # serving refuses photos without a detected face: train and calibrate on the same kind
    desc = desc.take([n for n, d in zip(desc.names, desc.detected, strict=True) if d])
    people = [n.split("/")[-2] for n in desc.names]
    ids = {p: i for i, p in enumerate(sorted(set(people)))}
    val_people = {n.split("/")[-2] for n in val}
    y = np.array([ids[p] for p in people])
    rows_tr = [i for i, p in enumerate(people) if p not in val_people]
    rows_val = [i for i, p in enumerate(people) if p in val_people]
    model = train_head(desc.vectors[rows_tr], y[rows_tr], head)  # "none": nothing to train
    emb_val = embed_descriptors(model, desc.vectors[rows_val])
    cal = calibrate_threshold(emb_val, y[rows_val], target_far=TARGET_FAR)
    tails = probe_tails(emb_val, y[rows_val], resolve_at=cal.tau)
    source = "calibrated"
    if target_fpir is not None:
        tau = tau_at_fpir(tails, target_fpir, reference_gallery_size)
        cal = calibrate_threshold(emb_val, y[rows_val], target_far=TARGET_FAR, tau=tau)
        source = "fpir"
        if not tails.resolved(cal.tau):  # a tau below the FAR one: keep every score above it
            tails = probe_tails(emb_val, y[rows_val], resolve_at=cal.tau)
    rep = consistency_report(emb_val, y[rows_val], far_range=FAR_RANGE)
    ret = retrieval_metrics(emb_val, y[rows_val])
    weights = hashlib.sha256(
        b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    ).hexdigest()
    openset = {
        "file": save_openset(out, tails),
        **openset_summary(
            tails,
            cal.tau,
            cal.far,
            threshold_target="far" if target_fpir is None else "fpir",
            target_fpir=SERVED_TARGET_FPIR if target_fpir is None else target_fpir,
            reference_gallery_size=reference_gallery_size,
        ),
    }
    now = time.time()
    tcm = f"-tcm{head.m_plus}-{head.m_minus}" if head.tcm else ""
    manifest = Manifest(
        model_version=f"lfw-dlib-{head.kind}{tcm}-"
        f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}-{weights[:8]}",
        architecture="face_head",
        architecture_kwargs={
            "in_dim": DESCRIPTOR_DIM,
            "embedding_dim": DESCRIPTOR_DIM,
            "kind": head.kind,
        },
        preprocessing=Preprocessing(
            image_size=(150, 150),
            channels=3,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            extra={"input": "aligned 150x150 face chip (facekit)"},
        ),
        embedding_dim=DESCRIPTOR_DIM,
        calibration=Calibration(
            tau=cal.tau,
            target_far=TARGET_FAR,
            far_at_tau=cal.far,
            frr_at_tau=cal.frr,
            tau_lo=rep.tau_lo,
            tau_hi=rep.tau_hi,
            far_range=FAR_RANGE,
            tau_source=source,
            impostor_pairs=cal.num_impostor,
            impostor_pairs_needed=impostor_pairs_needed(TARGET_FAR),
        ),
        baseline=Baseline(
            opis=rep.opis,
            eps_opis=rep.eps_opis,
            eps=rep.eps,
            recall_at_1=float(ret["recall_at_1"]),
            map_at_r=float(ret["map_at_r"]),
            num_classes=len(val_people),
            num_images=len(rows_val),
        ),
        dataset={
            "name": "lfw",
            "train": "peopleDevTrain minus validation identities",
            "train_identities": len(ids) - len(val_people),
            "train_images": len(rows_tr),
            "validation_identities": len(val_people),
            "images_per_identity_cap": 4,
        },
        training_config={"head": head.to_dict(), "val_share": val_share},
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        face={
            "detector": DETECTOR,
            "aligner": ALIGNER,
            "descriptor": DESCRIPTOR,
            "head": {
                "kind": head.kind,
                "tcm": head.tcm,
                "margins": [head.m_plus, head.m_minus] if head.tcm else None,
            },
            "options": replace(SERVED_OPTIONS).to_dict(),
            "model_files": model_checksums(),
        },
        openset=openset,
    )
    return save_artefact(out, model, manifest)
