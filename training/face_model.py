"""The served face model (`make run MODEL=faces`): dlib's descriptor + a head trained on LFW.

The head trains on LFW's *peopleDevTrain* identities (first 10 images of each person with >= 2)
minus 15% of them held out as validation identities, on which the global threshold is calibrated
and the baseline consistency measured. peopleDevTest identities are never touched, so
``studies/faces_serve.py`` can enrol and match them as unseen people.
The head's settings are the ones the descriptor study chose (docs/results.md, "Face descriptor").

Descriptors come from the cache (training/face_cache.py): the first build extracts ~5,000 images
(~4 minutes on two free cores), later builds reuse them.
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
    retrieval_metrics,
    save_artefact,
)
from training import face_cache as fc
from training.face_head import HeadConfig, embed_descriptors, train_head

TARGET_FAR = 1e-3
FAR_RANGE = (1e-4, 1e-2)
# what the served model uses; see the descriptor study for why (docs/results.md)
SERVED_HEAD = HeadConfig(kind="linear", tcm=False, steps=400)
SERVED_OPTIONS = FaceOptions(fallback="none")


def dev_train_people(data_dir: Path) -> list[str]:
    rows = (data_dir / "lfw" / "peopleDevTrain.txt").read_text().split("\n")[1:]
    return [r.split("\t")[0] for r in rows if "\t" in r]


def build_face_model(data_dir: Path, out: Path, *, head: HeadConfig = SERVED_HEAD,
                     cache_root: Path = fc.DEFAULT_ROOT, val_share: float = 0.15,
                     progress: Any = None) -> Manifest:
    members = fc.lfw_identity_members(data_dir, dev_train_people(data_dir))
    desc = fc.descriptors(data_dir / fc.LFW_ZIP, members, root=cache_root,
                          options=SERVED_OPTIONS, progress=progress)
    desc = desc.take([n for n, d in zip(desc.names, desc.detected, strict=True) if d])
    people = [n.split("/")[-2] for n in desc.names]
    counts: dict[str, int] = {}
    for p in people:
        counts[p] = counts.get(p, 0) + 1
    ids = sorted(p for p, c in counts.items() if c >= 2)
    rng = np.random.default_rng(head.seed)
    val_ids = set(rng.choice(ids, size=int(val_share * len(ids)), replace=False))
    index = {p: i for i, p in enumerate(ids)}
    rows_tr = [i for i, p in enumerate(people) if p in index and p not in val_ids]
    rows_val = [i for i, p in enumerate(people) if p in val_ids]
    y = np.array([index.get(p, -1) for p in people])
    model = train_head(desc.vectors[rows_tr], y[rows_tr], head)
    emb_val = embed_descriptors(model, desc.vectors[rows_val])
    cal = calibrate_threshold(emb_val, y[rows_val], target_far=TARGET_FAR)
    rep = consistency_report(emb_val, y[rows_val], far_range=FAR_RANGE)
    ret = retrieval_metrics(emb_val, y[rows_val])
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                      for p in model.parameters())).hexdigest()
    now = time.time()
    tcm = f"-tcm{head.m_plus}-{head.m_minus}" if head.tcm else ""
    manifest = Manifest(
        model_version=f"lfw-dlib-{head.kind}{tcm}-"
                      f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}-{weights[:8]}",
        architecture="face_head",
        architecture_kwargs={"in_dim": DESCRIPTOR_DIM, "embedding_dim": DESCRIPTOR_DIM,
                             "kind": head.kind},
        preprocessing=Preprocessing(image_size=(150, 150), channels=3, mean=(0.0, 0.0, 0.0),
                                    std=(1.0, 1.0, 1.0),
                                    extra={"input": "aligned 150x150 face chip (facekit)"}),
        embedding_dim=DESCRIPTOR_DIM,
        calibration=Calibration(tau=cal.tau, target_far=TARGET_FAR, far_at_tau=cal.far,
                                frr_at_tau=cal.frr, tau_lo=rep.tau_lo, tau_hi=rep.tau_hi,
                                far_range=FAR_RANGE),
        baseline=Baseline(opis=rep.opis, eps_opis=rep.eps_opis, eps=rep.eps,
                          recall_at_1=float(ret["recall_at_1"]), map_at_r=float(ret["map_at_r"]),
                          num_classes=len(val_ids), num_images=len(rows_val)),
        dataset={"name": "lfw", "train": "peopleDevTrain minus validation identities",
                 "train_identities": len(ids) - len(val_ids), "train_images": len(rows_tr),
                 "validation_identities": len(val_ids), "images_per_identity_cap": 10},
        training_config={"head": head.to_dict(), "val_share": val_share},
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        face={"detector": DETECTOR, "aligner": ALIGNER, "descriptor": DESCRIPTOR,
              "head": {"kind": head.kind, "tcm": head.tcm,
                       "margins": [head.m_plus, head.m_minus] if head.tcm else None},
              "options": replace(SERVED_OPTIONS).to_dict(), "model_files": model_checksums()},
    )
    return save_artefact(out, model, manifest)
