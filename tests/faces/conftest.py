"""Fixtures for the face tests: a handful of real LFW photos, the real dlib models, and a face
artefact (the raw descriptor behind an identity-initialised linear head).

The threshold of that artefact is 0.90: on LFW's pairs.txt the raw descriptor's genuine cosines
have a 5th percentile of ~0.92 and its impostor cosines a 99th percentile of ~0.91, so these
photos' decisions at 0.90 are right for the pairs the tests use (checked by
``test_same_person_is_closer``).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facekit import (
    ALIGNER,
    DESCRIPTOR,
    DETECTOR,
    FaceFrontEnd,
    FaceOptions,
    model_checksums,
)
from tcm import Baseline, Calibration, Manifest, Preprocessing, build_embedder, save_artefact

DATA = next(
    (p for p in (Path("../shared/data"), Path("/work/shared/data")) if (p / "lfw").is_dir()),
    Path("../shared/data"),
)
ZIP = DATA / "lfw" / "lfw-deepfunneled-crop160.zip"
# three people with several photos each (image numbers as in LFW's file names)
PEOPLE = {
    "Colin_Powell": (1, 2, 3),
    "Gloria_Macapagal_Arroyo": (1, 2, 3),
    "Jean_Chretien": (1, 2, 3),
}
TAU = 0.90


@pytest.fixture(scope="session")
def lfw_bytes() -> dict[tuple[str, int], bytes]:
    with zipfile.ZipFile(ZIP) as z:
        return {
            (p, n): z.read(f"lfw-deepfunneled-c160/{p}/{p}_{n:04d}.jpg")
            for p, nums in PEOPLE.items()
            for n in nums
        }


def rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def front() -> FaceFrontEnd:
    return FaceFrontEnd(FaceOptions())


def write_face_artefact(
    out: Path, *, model_files: dict[str, str] | None = None, fallback: str = "none"
) -> Path:
    head = build_embedder("face_head", in_dim=128, embedding_dim=128, kind="linear").eval()
    manifest = Manifest(
        model_version="faces-test-v1",
        architecture="face_head",
        architecture_kwargs={"in_dim": 128, "embedding_dim": 128, "kind": "linear"},
        preprocessing=Preprocessing(
            image_size=(150, 150), channels=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
        ),
        embedding_dim=128,
        calibration=Calibration(
            tau=TAU, target_far=1e-3, far_at_tau=1e-3, frr_at_tau=0.05, tau_lo=0.85, tau_hi=0.95
        ),
        baseline=Baseline(
            opis=1e-3,
            eps_opis=0.0,
            eps=0.05,
            recall_at_1=0.99,
            map_at_r=0.9,
            num_classes=3,
            num_images=9,
        ),
        dataset={"name": "lfw (test)"},
        created_at="2026-01-01T00:00:00Z",
        face={
            "detector": DETECTOR,
            "aligner": ALIGNER,
            "descriptor": DESCRIPTOR,
            "head": {"kind": "linear", "tcm": False},
            "options": FaceOptions(fallback=fallback).to_dict(),
            "model_files": model_files if model_files is not None else model_checksums(),
        },
    )
    save_artefact(out, head, manifest)
    return out


@pytest.fixture(scope="session")
def face_artefact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_face_artefact(tmp_path_factory.mktemp("face_artefact"))
