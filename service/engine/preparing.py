"""How a served model's images become its input tensor: one preparer per model, decided once.

Every path that embeds images (a request's images, stored images re-embedded for another model
version) decodes each image with the preparer's ``channels`` and ``decode_target`` (the size
to shrink towards while decoding, or None to decode whole) and hands the decoded images to the
preparer, which returns the model's input tensor and what it found in each image. Nothing else
branches on the kind of model:

- :class:`PixelPreparer` (every artefact but faces): the artefact's preprocessing
  (:func:`tcm.to_input_tensor`); it finds nothing to report.
- ``service.engine.faces.FacePreparer`` (face artefacts): decodes photos whole (the face may be
  a small part), detects and aligns the face into a chip, and reports the face it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from service.engine.images import decode_image
from tcm import Preprocessing, to_input_tensor

Found = list[dict[str, Any]]  # per image, what the preparer found (faces: the face used)


class Preparer(Protocol):
    channels: int
    decode_target: tuple[int, int] | None

    def __call__(
        self, images: Sequence[np.ndarray], wheres: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, Found]:
        """Decoded uint8 images -> the model's input (n, C, H, W) and what was found."""
        ...


class PixelPreparer:
    def __init__(self, spec: Preprocessing) -> None:
        self.spec = spec
        self.channels = spec.channels
        self.decode_target: tuple[int, int] | None = tuple(spec.image_size)  # type: ignore[assignment]

    def __call__(
        self, images: Sequence[np.ndarray], wheres: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, Found]:
        return to_input_tensor(list(images), self.spec), []


def decode_for(preparer: Preparer, raw: bytes, *, max_pixels: int, where: str) -> np.ndarray:
    """Decodes one image file the way ``preparer`` needs it (InvalidInputError naming
    ``where`` when it is not an image, or too large)."""
    return decode_image(
        raw,
        channels=preparer.channels,
        max_pixels=max_pixels,
        where=where,
        target=preparer.decode_target,
    )
