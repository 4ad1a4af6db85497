"""Preprocessing split in two (issue 32): staged per image, normalised per batch, bit for bit
what the per-image function gave. The oracle is that function as it was, kept here verbatim."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tcm.preprocess import Preprocessing, normalise_staged, stage_image, to_input_tensor

RGB = Preprocessing(
    image_size=(24, 20), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
GREY = Preprocessing(image_size=(24, 20), channels=1, mean=(0.5,), std=(0.25,), invert=True)


def per_image_reference(images: list[np.ndarray], spec: Preprocessing) -> torch.Tensor:
    """``tcm.to_input_tensor`` before issue 32: every step on each image's own float tensor."""
    out = []
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    for img in images:
        arr = np.asarray(img)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]
        t = torch.from_numpy(np.array(arr, order="C")).permute(2, 0, 1).float() / 255.0
        if t.shape[0] == 3 and spec.channels == 1:
            t = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]).unsqueeze(0)
        elif t.shape[0] == 1 and spec.channels == 3:
            t = t.expand(3, -1, -1)
        if tuple(t.shape[1:]) != tuple(spec.image_size):
            t = F.interpolate(
                t.unsqueeze(0),
                size=tuple(spec.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            ).squeeze(0)
        if spec.invert:
            t = 1.0 - t
        out.append((t - mean) / std)
    return torch.stack(out)


def _images(rng: np.random.Generator) -> list[np.ndarray]:
    """At the spec's size and not, grey, RGB, RGBA, bool, a non-contiguous view."""
    return [
        rng.integers(0, 256, (24, 20, 3), dtype=np.uint8),  # at size: stays uint8
        rng.integers(0, 256, (24, 20), dtype=np.uint8),  # grey at size
        rng.integers(0, 256, (24, 20, 4), dtype=np.uint8),  # RGBA at size
        rng.integers(0, 256, (37, 41, 3), dtype=np.uint8),  # resized
        rng.integers(0, 256, (13, 9), dtype=np.uint8),  # grey, enlarged
        rng.integers(0, 2, (24, 20)).astype(bool),  # ink masks
        rng.integers(0, 256, (20, 24, 3), dtype=np.uint8).transpose(1, 0, 2),  # a strided view
    ]


@pytest.mark.parametrize("spec", [RGB, GREY], ids=["rgb", "grey-inverted"])
def test_staged_batches_equal_per_image_preprocessing_bit_for_bit(spec: Preprocessing) -> None:
    images = _images(np.random.default_rng(0))
    expected = per_image_reference(images, spec)
    got = to_input_tensor(images, spec)
    assert got.shape == expected.shape
    assert got.is_contiguous()
    assert torch.equal(got, expected)
    # any order, any grouping: each image's rows do not depend on its neighbours
    for order in ([3, 0, 6, 1], [0], [4, 5]):
        part = normalise_staged([stage_image(images[i], spec) for i in order], spec)
        assert torch.equal(part, expected[order])


def test_images_at_the_models_size_stay_uint8_and_others_are_float() -> None:
    rng = np.random.default_rng(1)
    at_size = stage_image(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8), RGB)
    grey_at_size = stage_image(rng.integers(0, 256, (24, 20), dtype=np.uint8), RGB)
    resized = stage_image(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8), RGB)
    grey_model = stage_image(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8), GREY)
    assert (at_size.dtype, at_size.shape) == (np.uint8, (24, 20, 3))
    assert (grey_at_size.dtype, grey_at_size.shape) == (np.uint8, (24, 20, 3))
    assert (resized.dtype, resized.shape) == (np.float32, (3, 24, 20))
    assert (grey_model.dtype, grey_model.shape) == (np.float32, (1, 24, 20))  # needs the maths


def test_bad_pixels_are_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="uint8"):
        stage_image(np.zeros((24, 20, 3), np.float32), RGB)
    with pytest.raises(ValueError, match="shape"):
        stage_image(np.zeros((24, 20, 2), np.uint8), RGB)
    with pytest.raises(ValueError, match="no images"):
        normalise_staged([], RGB)
