"""The face front-end on real photos with the real dlib models: detection, the largest-face
rule, alignment, the descriptor, hostile images, and the model-file checks."""

from __future__ import annotations

import numpy as np
import pytest

from facekit import (
    CHIP_SIZE,
    FaceFrontEnd,
    FaceOptions,
    ModelFilesError,
    NoFaceError,
    check_model_files,
    model_checksums,
)
from facekit.frontend import shrink
from tests.faces.conftest import TAU, rgb


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_detects_and_aligns_lfw_faces(front: FaceFrontEnd, lfw_bytes) -> None:
    for key, data in lfw_bytes.items():
        img = rgb(data)
        face = front.locate(img, where=str(key))
        left, top, right, bottom = face.box
        assert face.detected and face.faces_found >= 1
        assert 0 <= left < right <= img.shape[1] and 0 <= top < bottom <= img.shape[0]
        assert 60 <= right - left <= 160  # LFW crops: the face is most of the 160 px frame
        assert face.chip.shape == (CHIP_SIZE, CHIP_SIZE, 3) and face.chip.dtype == np.uint8


def test_same_person_is_closer(front: FaceFrontEnd, lfw_bytes) -> None:
    keys = sorted(lfw_bytes)
    desc, _ = front.descriptors([rgb(lfw_bytes[k]) for k in keys])
    assert desc.shape == (len(keys), 128) and np.isfinite(desc).all()
    for i, a in enumerate(keys):
        for j, b in enumerate(keys[i + 1 :], i + 1):
            c = cos(desc[i], desc[j])
            assert (c >= TAU) == (a[0] == b[0]), (a, b, c)


def test_largest_face_is_used(front: FaceFrontEnd, lfw_bytes) -> None:
    big = np.kron(rgb(lfw_bytes["Colin_Powell", 1]), np.ones((2, 2, 1), np.uint8))  # 320 px
    small = rgb(lfw_bytes["Jean_Chretien", 1])  # 160 px
    canvas = np.full((360, 560, 3), 90, np.uint8)
    canvas[20:340, 220:540] = big
    canvas[100:260, 20:180] = small
    face = front.locate(canvas)
    assert face.faces_found == 2
    assert face.box[0] >= 220  # the big face, on the right
    alone, _ = front.descriptors([big])
    chosen = front.describe([face.chip])
    assert cos(alone[0], chosen[0]) > 0.97


def test_no_face_names_the_image(front: FaceFrontEnd) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError, match="no face found in items\\[3\\]"):
        front.locate(noise, where="items[3]")
    with pytest.raises(NoFaceError):
        front.locate(np.full((200, 200), 128, np.uint8))


def test_tiny_face_is_not_found(front: FaceFrontEnd, lfw_bytes) -> None:
    img = rgb(lfw_bytes["Colin_Powell", 1])[::6, ::6]  # face ~15 px wide
    canvas = np.full((300, 300, 3), 120, np.uint8)
    canvas[140 : 140 + img.shape[0], 140 : 140 + img.shape[1]] = img
    with pytest.raises(NoFaceError):
        front.locate(canvas)


def test_whole_image_fallback(lfw_bytes) -> None:
    fb = FaceFrontEnd(FaceOptions(fallback="whole_image"))
    noise = np.random.default_rng(1).integers(0, 256, (120, 100, 3), dtype=np.uint8)
    face = fb.locate(noise)
    assert not face.detected and face.box == (0, 0, 100, 120)
    assert fb.describe([face.chip]).shape == (1, 128)


def test_grey_image_matches_colour(front: FaceFrontEnd, lfw_bytes) -> None:
    img = rgb(lfw_bytes["Gloria_Macapagal_Arroyo", 2])
    grey = (img @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
    d_grey, faces = front.descriptors([grey])
    d_rgb, _ = front.descriptors([img])
    assert faces[0].detected
    assert cos(d_grey[0], d_rgb[0]) > TAU  # still the same person


def test_huge_image_is_shrunk_and_box_is_in_original_pixels(front: FaceFrontEnd, lfw_bytes) -> None:
    img = rgb(lfw_bytes["Jean_Chretien", 2])
    huge = np.kron(img, np.ones((16, 16, 1), np.uint8))  # 2560 x 2560
    face = front.locate(huge)
    small = front.locate(img)
    assert face.detected
    for big_v, small_v in zip(face.box, small.box, strict=True):
        assert abs(big_v - 16 * small_v) <= 16 * 6
    d = front.describe([face.chip, small.chip])
    assert cos(d[0], d[1]) > 0.95


def test_shrink_block_average() -> None:
    img = np.zeros((4000, 3000, 3), np.uint8)
    img[::2] = 200
    out, scale = shrink(img, 1000)
    assert max(out.shape[:2]) <= 1000 and scale == out.shape[0] / 4000
    assert abs(float(out.mean()) - 100) < 1  # averaged, not aliased to 0 or 200


def test_model_file_checks() -> None:
    sums = model_checksums()
    assert set(sums) == {
        "shape_predictor_5_face_landmarks.dat",
        "dlib_face_recognition_resnet_model_v1.dat",
    }
    check_model_files(sums)
    wrong = {**sums, "dlib_face_recognition_resnet_model_v1.dat": "0" * 64}
    with pytest.raises(ModelFilesError, match="differ from the ones this artefact"):
        check_model_files(wrong)


def test_bad_arrays_are_value_errors(front: FaceFrontEnd) -> None:
    with pytest.raises(ValueError, match="uint8"):
        front.locate(np.zeros((50, 50, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        front.locate(np.zeros((50, 50, 2), np.uint8))
