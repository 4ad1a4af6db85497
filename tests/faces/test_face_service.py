"""A face artefact served over HTTP with the real dlib models: enrol, match, verify and embed
ordinary photos (the face box in every response), hostile images (clear 4xx, nothing stored),
and the refusal of an artefact built with other model files."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.faces.conftest import TAU, encode, rgb, write_face_artefact
from tests.service.conftest import ADMIN_TOKEN, Api, Tenant, make_settings


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def api(face_artefact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    db = tmp_path_factory.mktemp("face_store") / "tcm.db"
    settings = make_settings(
        face_artefact,
        {"store_url": f"sqlite:///{db}"},
        max_body_bytes=12 * 1024 * 1024,
        max_image_pixels=3000 * 3000,
    )
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings)


@pytest.fixture
def tenant(api: Api) -> Tenant:
    return api.new_tenant()


def count(api: Api, tenant: Tenant) -> int:
    return len(api.client.get("/v1/gallery", headers=tenant.auth).json()["items"])


def test_enrol_match_verify_embed_photos(api: Api, tenant: Tenant, lfw_bytes) -> None:
    items = [
        {"subject": p, "image": b64(lfw_bytes[p, n])}
        for p in ("Colin_Powell", "Jean_Chretien", "Gloria_Macapagal_Arroyo")
        for n in (1, 2)
    ]
    r = api.client.post("/v1/gallery", json={"items": items}, headers=tenant.auth)
    assert r.status_code == 201, r.text
    faces = r.json()["faces"]
    assert [f["where"] for f in faces] == [f"items[{i}].image" for i in range(6)]
    assert all(f["detected"] and len(f["box"]) == 4 for f in faces)
    for p in ("Colin_Powell", "Jean_Chretien", "Gloria_Macapagal_Arroyo"):
        m = api.client.post(
            "/v1/match", json={"image": b64(lfw_bytes[p, 3]), "k": 3}, headers=tenant.auth
        )
        assert m.status_code == 200, m.text
        body = m.json()
        assert body["candidates"][0]["subject"] == p
        assert body["decision"] == {
            "accepted": True,
            "subject": p,
            "score": body["candidates"][0]["score"],
        }
        assert body["threshold"] == pytest.approx(TAU)
        assert body["faces"][0]["where"] == "image" and body["faces"][0]["detected"]
    v = api.client.post(
        "/v1/verify/upload",
        headers=tenant.auth,
        files={
            "a": ("a.jpg", lfw_bytes["Colin_Powell", 3], "image/jpeg"),
            "b": ("b.jpg", lfw_bytes["Jean_Chretien", 3], "image/jpeg"),
        },
    ).json()
    assert not v["accepted"] and v["score"] < TAU
    assert [f["where"] for f in v["faces"]] == ["a", "b"]
    v = api.client.post(
        "/v1/verify",
        headers=tenant.auth,
        json={
            "a": {"image": b64(lfw_bytes["Jean_Chretien", 3])},
            "b": {"subject": "Jean_Chretien"},
        },
    ).json()
    assert v["accepted"] and [f["where"] for f in v["faces"]] == ["a.image"]
    e = api.client.post(
        "/v1/embed", headers=tenant.auth, json={"images": [b64(lfw_bytes["Colin_Powell", 1])]}
    ).json()
    assert len(e["embeddings"][0]) == 128
    assert np.linalg.norm(e["embeddings"][0]) == pytest.approx(1.0, abs=1e-5)
    assert e["faces"][0]["box"] == faces[0]["box"]


def test_photo_formats_and_sizes(api: Api, tenant: Tenant, lfw_bytes) -> None:
    img = rgb(lfw_bytes["Colin_Powell", 1])
    big = np.kron(img, np.ones((15, 15, 1), np.uint8))  # 2400 x 2400, ~5.8 megapixels
    ok = {
        "grey png": encode(img, "PNG", "L"),
        "cmyk jpeg": encode(img, "JPEG", "CMYK"),
        "rgba png": encode(img, "PNG", "RGBA"),
        "big jpeg": encode(big, "JPEG"),
    }
    for name, data in ok.items():
        r = api.client.post(
            "/v1/embed/upload",
            headers=tenant.auth,
            files={"file": ("f", data, "application/octet-stream")},
        )
        assert r.status_code == 200, (name, r.text)
        face = r.json()["faces"][0]
        assert face["detected"], name
        if name == "big jpeg":
            assert face["box"][2] - face["box"][0] > 900  # reported in the photo's pixels


@pytest.mark.parametrize(
    "case", ["no face", "tiny face", "corrupt", "truncated", "too many pixels"]
)
def test_hostile_images_are_4xx_and_store_nothing(
    api: Api, tenant: Tenant, lfw_bytes, case: str
) -> None:
    good = lfw_bytes["Colin_Powell", 1]
    img = rgb(good)
    if case == "no face":
        bad = encode(np.random.default_rng(0).integers(0, 256, (200, 240, 3), dtype=np.uint8))
    elif case == "tiny face":
        canvas = np.full((300, 300, 3), 120, np.uint8)
        small = img[::6, ::6]
        canvas[100 : 100 + small.shape[0], 100 : 100 + small.shape[1]] = small
        bad = encode(canvas)
    elif case == "corrupt":
        bad = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8
    elif case == "truncated":
        bad = good[: len(good) // 3]
    else:
        bad = encode(np.zeros((3100, 3100), np.uint8))
    items = [{"subject": "ok", "image": b64(good)}, {"subject": "bad", "image": b64(bad)}]
    r = api.client.post("/v1/gallery", json={"items": items}, headers=tenant.auth)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()
    assert "items[1].image" in err["message"], err
    expected = {
        "no face": "no_face",
        "tiny face": "no_face",
        "corrupt": "invalid_image",
        "truncated": "invalid_image",
        "too many pixels": "image_too_large",
    }[case]
    assert err["code"] == expected
    assert count(api, tenant) == 0  # all or nothing
    m = api.client.post(
        "/v1/match/upload",
        headers=tenant.auth,
        files={"file": ("f", bad, "application/octet-stream")},
    )
    assert 400 <= m.status_code < 500 and m.json()["code"] == expected


def test_artefact_with_other_model_files_is_refused(
    face_artefact: Path, api: Api, tmp_path: Path
) -> None:
    from facekit import model_checksums

    wrong = {**model_checksums(), "shape_predictor_5_face_landmarks.dat": "f" * 64}
    bad = write_face_artefact(tmp_path / "bad", model_files=wrong)
    r = api.client.post(
        "/v1/models", json={"path": str(bad)}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert r.status_code == 422, r.text
    assert "shape_predictor_5_face_landmarks.dat" in r.json()["message"]
    settings = make_settings(bad, {"store_url": f"sqlite:///{tmp_path / 's.db'}"})
    with (
        pytest.raises(RuntimeError, match="differ from the ones this artefact"),
        TestClient(create_app(settings)),
    ):
        pass
    shutil.rmtree(bad)
