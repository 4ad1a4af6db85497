"""FaceHead (a head on frozen face descriptors) and the manifest's optional face section."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tcm import build_embedder, load_artefact, read_manifest, save_artefact
from tcm.artefact import Manifest
from tests.tcm.test_artefact import _manifest


def test_linear_head_starts_as_the_normalised_descriptor() -> None:
    x = torch.randn(5, 128) * 3
    for kind in ("none", "linear", "mlp"):
        head = build_embedder("face_head", kind=kind).eval()
        out = head(x)
        assert torch.allclose(out, x / x.norm(dim=1, keepdim=True), atol=1e-6), kind
    assert len(list(build_embedder("face_head", kind="none").parameters())) == 0


def test_head_rejects_bad_kinds() -> None:
    with pytest.raises(ValueError, match="kind"):
        build_embedder("face_head", kind="deep")
    with pytest.raises(ValueError, match="dimension"):
        build_embedder("face_head", kind="none", embedding_dim=64)


def test_manifest_face_section_round_trips(tmp_path) -> None:
    face = {
        "detector": "d",
        "aligner": "a",
        "descriptor": "r",
        "head": {"kind": "linear"},
        "options": {"fallback": "none"},
        "model_files": {"x.dat": "0" * 64},
    }
    m = _manifest(
        architecture="face_head",
        architecture_kwargs={"kind": "linear"},
        embedding_dim=128,
        face=face,
    )
    save_artefact(tmp_path, build_embedder("face_head", kind="linear"), m)
    assert read_manifest(tmp_path).face == face
    model, loaded = load_artefact(tmp_path)
    assert loaded.face == face
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    assert model(torch.from_numpy(x)).shape == (3, 128)
    # manifests written before the field existed read as face=None
    d = json.loads((tmp_path / "manifest.json").read_text())
    del d["face"]
    assert Manifest.from_dict(d).face is None
