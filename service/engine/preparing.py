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

Preparing is split in two (issue 32), so that nothing per image runs after a batch is formed:
``stage`` does each image's own work on the CPU (a request's thread, or a decoding process:
``service.engine.decoding``) and ``to_device`` does the batch's, once, on the model's device:
uint8 pixels travel there as one batch and are converted and normalised there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from service.engine.images import decode_image
from tcm import Preprocessing
from tcm.preprocess import normalise_staged, stage_image

Found = list[dict[str, Any]]  # per image, what the preparer found (faces: the face used)


class Preparer(Protocol):
    channels: int
    decode_target: tuple[int, int] | None

    def stage(
        self, images: Sequence[np.ndarray], wheres: Sequence[str] | None = None
    ) -> tuple[list[np.ndarray], Found]:
        """Decoded uint8 images -> each one's staged pixels (CPU work, one image at a time)
        and what was found in each."""
        ...

    def ready(self, image: np.ndarray) -> bool:
        """Whether staging ``image`` costs next to nothing (it is decoded at the model's size),
        so that it may run on the event loop instead of a worker thread."""
        ...

    def to_device(self, staged: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
        """A batch of staged images -> the model's input (n, C, H, W) on ``device``."""
        ...


class PixelPreparer:
    def __init__(self, spec: Preprocessing) -> None:
        self.spec = spec
        self.channels = spec.channels
        self.decode_target: tuple[int, int] | None = tuple(spec.image_size)  # type: ignore[assignment]
        self._ready_shapes = {(*spec.image_size, spec.channels)}
        if spec.channels == 1:
            self._ready_shapes.add(tuple(spec.image_size))

    def stage(
        self, images: Sequence[np.ndarray], wheres: Sequence[str] | None = None
    ) -> tuple[list[np.ndarray], Found]:
        return [stage_image(img, self.spec) for img in images], []

    def ready(self, image: np.ndarray) -> bool:
        """Decoded at the model's size with its channels: staging is a check (microseconds)."""
        return image.dtype == np.uint8 and image.shape in self._ready_shapes

    def to_device(self, staged: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
        return normalise_staged(staged, self.spec, device)


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
